import Tensor

/// Column concatenation and the Cayley map (orthogonal matrices from unconstrained ones), for
/// MatryoshkaKV's per-head projections.
extension Tape {
  /// `[a_0 | a_1 | ...]`: the parts side by side (same rows).
  @_specialize(exported:true,where T == Float)
  public func concatenateColumns(_ parts: [Var]) -> Var {
    let values = parts.map { value($0) }
    let rows = values[0].rows
    precondition(values.allSatisfy { $0.rows == rows }, "concatenateColumns: parts of different heights")
    let widths = values.map(\.columns)
    let total = widths.reduce(0, +)
    var out = Matrix<T>(zeros: rows, total)
    var offset = 0
    for m in values {
      for r in 0..<rows { for c in 0..<m.columns { out.values[r * total + offset + c] = m.values[r * m.columns + c] } }
      offset += m.columns
    }
    return record(out, inputs: parts) { [unowned self] g in
      var offset = 0
      for (part, width) in zip(parts, widths) {
        var d = Matrix<T>(zeros: rows, width)
        for r in 0..<rows { for c in 0..<width { d.values[r * width + c] = g.values[r * total + offset + c] } }
        accumulate(part, d)
        offset += width
      }
    }
  }

  /// The Cayley map of the skew-symmetric part of a square `x`: with `A = x - x^T`,
  /// `U = (I - A/2)^-1 (I + A/2)`, an orthogonal matrix with determinant +1 (`x = 0` gives `I`).
  /// Solved in double precision. Backward: `dA = 1/2 (I - A/2)^-T G (I + U)^T`, `dx = dA - dA^T`.
  @_specialize(exported:true,where T == Float)
  public func cayley(_ x: Var) -> Var {
    let m = value(x)
    precondition(m.rows == m.columns, "cayley needs a square matrix")
    let n = m.rows
    var minus = DoubleMatrix(zeros: n, n)
    var plus = DoubleMatrix(zeros: n, n)
    for i in 0..<n {
      for j in 0..<n {
        let a = Double(m[i, j]) - Double(m[j, i])
        minus.values[i * n + j] = (i == j ? 1 : 0) - a / 2
        plus.values[i * n + j] = (i == j ? 1 : 0) + a / 2
      }
    }
    // I - A/2 with A skew is always invertible (its eigenvalues are 1 - i w / 2).
    let inverse = (try? LAPACK.solve(minus, DoubleMatrix.identity(n))) ?? DoubleMatrix.identity(n)
    let u = BLAS.matmul(inverse, plus)
    let out = Matrix<T>(rows: n, columns: n, values: u.values.map { T($0) })
    return record(out, inputs: [x]) { [unowned self] g in
      var onePlusU = u
      for i in 0..<n { onePlusU.values[i * n + i] += 1 }
      let gd = DoubleMatrix(rows: n, columns: n, values: g.values.map { Double($0) })
      let da = BLAS.matmul(BLAS.matmul(inverse, gd, transposeA: true), onePlusU, transposeB: true)
      var dx = Matrix<T>(zeros: n, n)
      for i in 0..<n {
        for j in 0..<n { dx.values[i * n + j] = T(0.5 * (da.values[i * n + j] - da.values[j * n + i])) }
      }
      accumulate(x, dx)
    }
  }
}
