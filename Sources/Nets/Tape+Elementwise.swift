import Tensor

/// Element-wise operations, sums and activations.
extension Tape {
  /// `a + b`; `b` may also be one row (`1 x columns`, a bias) added to every row of `a`.
  @_specialize(exported:true,where T == Float)
  public func add(_ a: Var, _ b: Var) -> Var {
    let (x, y) = (value(a), value(b))
    precondition(
      x.columns == y.columns && (x.rows == y.rows || y.rows == 1),
      "add: \(x.rows) x \(x.columns) and \(y.rows) x \(y.columns)")
    var out = x
    if y.rows == x.rows {
      out.add(y)
    } else {
      for r in 0..<x.rows { for c in 0..<x.columns { out.values[r * x.columns + c] += y.values[c] } }
    }
    let broadcast = y.rows != x.rows
    return record(out, inputs: [a, b]) { [unowned self] g in
      accumulate(a, g)
      accumulate(b, broadcast ? g.columnSums() : g)
    }
  }

  /// `a - b` (same shapes).
  @_specialize(exported:true,where T == Float)
  public func subtract(_ a: Var, _ b: Var) -> Var { add(a, scale(b, -1)) }

  /// `a * b` element-wise (same shapes).
  @_specialize(exported:true,where T == Float)
  public func multiply(_ a: Var, _ b: Var) -> Var {
    let (x, y) = (value(a), value(b))
    precondition(
      x.rows == y.rows && x.columns == y.columns, "multiply: \(x.rows) x \(x.columns) and \(y.rows) x \(y.columns)")
    let out = x.combined(y, .product)
    return record(out, inputs: [a, b]) { [unowned self] g in
      accumulate(a, g.combined(y, .product))
      accumulate(b, g.combined(x, .product))
    }
  }

  /// `c * a` for a constant `c`.
  @_specialize(exported:true,where T == Float)
  public func scale(_ a: Var, _ c: T) -> Var {
    record(value(a).map { $0 * c }, inputs: [a]) { [unowned self] g in accumulate(a, g.map { $0 * c }) }
  }

  /// `s * a` where `s` is a `1 x 1` node (a learned coefficient: aTLAS's lambda).
  @_specialize(exported:true,where T == Float)
  public func scale(_ a: Var, by s: Var) -> Var {
    let (x, k) = (value(a), value(s))
    precondition(k.count == 1, "scale(by:) needs a 1 x 1 factor")
    let factor = k.values[0]
    return record(x.map { $0 * factor }, inputs: [a, s]) { [unowned self] g in
      accumulate(a, g.map { $0 * factor })
      accumulate(s, Matrix(rows: 1, columns: 1, values: [zip(g.values, x.values).reduce(0) { $0 + $1.0 * $1.1 }]))
    }
  }

  /// The sum of all elements, `1 x 1`.
  @_specialize(exported:true,where T == Float)
  public func sum(_ a: Var) -> Var {
    let x = value(a)
    return record(Matrix(rows: 1, columns: 1, values: [x.values.reduce(0, +)]), inputs: [a]) { [unowned self] g in
      accumulate(a, Matrix(rows: x.rows, columns: x.columns, values: [T](repeating: g.values[0], count: x.count)))
    }
  }

  /// The largest absolute value of all elements, `1 x 1` (an infinity norm). Its subgradient
  /// flows to the first element of largest magnitude only, with that element's sign.
  @_specialize(exported:true,where T == Float)
  public func maxAbs(_ a: Var) -> Var {
    let x = value(a)
    var at = 0
    for i in x.values.indices where abs(x.values[i]) > abs(x.values[at]) { at = i }
    let largest = x.values.isEmpty ? 0 : abs(x.values[at])
    return record(Matrix(rows: 1, columns: 1, values: [largest]), inputs: [a]) { [unowned self] g in
      guard !x.values.isEmpty else { return }
      var dx = Matrix<T>(zeros: x.rows, x.columns)
      dx.values[at] = x.values[at] < 0 ? -g.values[0] : g.values[0]
      accumulate(a, dx)
    }
  }

  /// The mean of all elements, `1 x 1`.
  @_specialize(exported:true,where T == Float)
  public func mean(_ a: Var) -> Var { scale(sum(a), 1 / T(value(a).count)) }

  /// Applies `f` element-wise, with `derivative(x, f(x))` for the backward pass.
  func pointwise(_ a: Var, _ f: (T) -> T, derivative: @escaping (T, T) -> T) -> Var {
    pointwise(a, output: value(a).map(f), derivative: derivative)
  }

  /// Records `y`, a function of `a` computed element by element, with `derivative(x, y)` for
  /// the backward pass.
  @_specialize(where T == Float)
  func pointwise(_ a: Var, output y: Matrix<T>, derivative: @escaping (T, T) -> T) -> Var {
    let x = value(a)
    return record(y, inputs: [a]) { [unowned self] g in
      accumulate(
        a,
        Matrix(
          rows: g.rows, columns: g.columns,
          values: Elementwise.map(g.values.count) { i in g.values[i] * derivative(x.values[i], y.values[i]) }))
    }
  }

  @_specialize(exported:true,where T == Float)
  public func relu(_ a: Var) -> Var { pointwise(a, { max($0, 0) }, derivative: { x, _ in x > 0 ? 1 : 0 }) }

  /// GELU with the exact erf form, `x * Phi(x)` (BERT's `gelu`).
  @_specialize(exported:true,where T == Float)
  public func gelu(_ a: Var) -> Var {
    let r: T = 1 / T(2).squareRoot()
    let c: T = 1 / T(2 * Double.pi).squareRoot()
    return pointwise(
      a, { $0 * (1 + T.erf($0 * r)) / 2 }, derivative: { x, _ in (1 + T.erf(x * r)) / 2 + x * c * T.exp(-x * x / 2) })
  }

  /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
  @_specialize(exported:true,where T == Float)
  public func geluTanh(_ a: Var) -> Var {
    let k: T = T(2 / Double.pi).squareRoot()
    let cubic: T = 0.044715
    @inline(__always) func inner(_ x: T) -> T { k * (x + cubic * x * x * x) }
    return pointwise(a, { x in x * (1 + T.tanh(inner(x))) / 2 }) { x, _ in
      let t = T.tanh(inner(x))
      let slope: T = k * (1 + 3 * cubic * x * x)
      let half: T = (1 + t) / 2
      return half + x * (1 - t * t) * slope / 2
    }
  }

  /// SiLU (swish), `x * sigmoid(x)`: Llama's MLP activation.
  @_specialize(exported:true,where T == Float)
  public func silu(_ a: Var) -> Var {
    // x / (1 + e^-x), a block at a time: the block's exponentials in one vector sweep
    // (`NetScalar.exponentiate`), then the quotients; `exp` per element cost most of the time.
    let x = value(a)
    let y = x.values.withUnsafeBufferPointer { input in
      Elementwise.mapBlocks(x.count) { (range, out: UnsafeMutableBufferPointer<T>) in
        let start = range.lowerBound
        for k in out.indices { out[k] = -input[start + k] }
        T.exponentiate(out)
        for k in out.indices { out[k] = input[start + k] / (1 + out[k]) }
      }
    }
    return pointwise(a, output: Matrix(rows: x.rows, columns: x.columns, values: y)) { x, _ in
      let s = 1 / (1 + T.exp(-x))
      return s * (1 + x * (1 - s))
    }
  }

  @_specialize(exported:true,where T == Float)
  public func tanh(_ a: Var) -> Var { pointwise(a, { T.tanh($0) }, derivative: { _, y in 1 - y * y }) }

  /// The named activation of a config (`relu`, `gelu`, `gelu_new`/`gelu_pytorch_tanh`, `silu`/`swish`, `tanh`).
  @_specialize(exported:true,where T == Float)
  public func activation(_ name: Activation, _ a: Var) -> Var {
    switch name {
    case .relu: return relu(a)
    case .gelu: return gelu(a)
    case .geluTanh: return geluTanh(a)
    case .silu: return silu(a)
    case .tanh: return tanh(a)
    }
  }
}

/// Activation functions by their Hugging Face config names.
public enum Activation: String, Sendable, CaseIterable {
  case relu, gelu, geluTanh = "gelu_new", silu, tanh

  /// Parses a config's `hidden_act` (aliases included); nil when unknown.
  public init?(configName: String) {
    switch configName.lowercased() {
    case "relu": self = .relu
    case "gelu": self = .gelu
    case "gelu_new", "gelu_pytorch_tanh", "gelu_fast": self = .geluTanh
    case "silu", "swish": self = .silu
    case "tanh": self = .tanh
    default: return nil
    }
  }
}
