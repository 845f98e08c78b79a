/// Matrix products and lookups.
extension Tape {
  /// `op(a) * op(b)`.
  @_specialize(exported:true,where T == Float)
  public func matmul(_ a: Var, _ b: Var, transposeA: Bool = false, transposeB: Bool = false) -> Var {
    let (x, y) = (value(a), value(b))
    let out = x.matmul(y, transposeSelf: transposeA, transposeB: transposeB)
    return record(out, inputs: [a, b]) { [unowned self] g in
      // C = A B: dA = G B^T, dB = A^T G; transposed operands swap roles.
      if isTracked(a) {
        accumulate(
          a,
          transposeA ? y.matmul(g, transposeSelf: transposeB, transposeB: true) : g.matmul(y, transposeB: !transposeB))
      }
      if isTracked(b) {
        accumulate(
          b,
          transposeB
            ? g.matmul(x, transposeSelf: true, transposeB: transposeA) : x.matmul(g, transposeSelf: !transposeA))
      }
    }
  }

  /// A linear layer, `x W^T + b`, with `W` stored `out x in` (Hugging Face / PyTorch layout)
  /// and `b` a `1 x out` row.
  @_specialize(exported:true,where T == Float)
  public func linear(_ x: Var, weight: Var, bias: Var? = nil) -> Var {
    precondition(
      value(x).columns == value(weight).columns,
      "linear: input has \(value(x).columns) features, weight is \(value(weight).rows) x \(value(weight).columns)")
    let y = matmul(x, weight, transposeB: true)
    return bias.map { add(y, $0) } ?? y
  }

  /// Rows of `table` (`vocabulary x width`) picked by `ids`: an embedding lookup. Gradients
  /// are added back into the picked rows.
  @_specialize(exported:true,where T == Float)
  public func embedding(_ ids: [Int], table: Var) -> Var {
    let t = value(table)
    var out = Matrix<T>(zeros: ids.count, t.columns)
    for (r, id) in ids.enumerated() {
      precondition(id >= 0 && id < t.rows, "token id \(id) outside the vocabulary of \(t.rows)")
      for c in 0..<t.columns { out.values[r * t.columns + c] = t.values[id * t.columns + c] }
    }
    return record(out, inputs: [table]) { [unowned self] g in
      var dt = Matrix<T>(zeros: t.rows, t.columns)
      for (r, id) in ids.enumerated() {
        for c in 0..<t.columns { dt.values[id * t.columns + c] += g.values[r * t.columns + c] }
      }
      accumulate(table, dt)
    }
  }

  /// Rows `indices` of `a`, in that order (each sequence's first token of a batch).
  @_specialize(exported:true,where T == Float)
  public func rows(_ a: Var, _ indices: [Int]) -> Var {
    let x = value(a)
    let out = x.rows(indices)
    return record(out, inputs: [a]) { [unowned self] g in
      var dx = Matrix<T>(zeros: x.rows, x.columns)
      for (j, r) in indices.enumerated() {
        for c in 0..<x.columns { dx.values[r * x.columns + c] += g.values[j * x.columns + c] }
      }
      accumulate(a, dx)
    }
  }

  /// Columns `range` of `a` (one head of a projection, one half of a fused weight).
  @_specialize(exported:true,where T == Float)
  public func columns(_ a: Var, _ range: Range<Int>) -> Var {
    let x = value(a)
    var out = Matrix<T>(zeros: x.rows, range.count)
    for r in 0..<x.rows {
      for (j, c) in range.enumerated() { out.values[r * range.count + j] = x.values[r * x.columns + c] }
    }
    return record(out, inputs: [a]) { [unowned self] g in
      var dx = Matrix<T>(zeros: x.rows, x.columns)
      for r in 0..<x.rows {
        for (j, c) in range.enumerated() { dx.values[r * x.columns + c] = g.values[r * range.count + j] }
      }
      accumulate(a, dx)
    }
  }

  /// The same values read as `rows x columns` (row-major order kept): `rows x (heads * d)`
  /// becomes `(rows * heads) x d`, one head per row, and back.
  public func reshaped(_ a: Var, rows: Int, columns: Int) -> Var {
    let x = value(a)
    precondition(rows * columns == x.values.count, "reshape keeps the element count")
    return record(Matrix(rows: rows, columns: columns, values: x.values), inputs: [a]) { [unowned self] g in
      accumulate(a, Matrix(rows: x.rows, columns: x.columns, values: g.values))
    }
  }
}
