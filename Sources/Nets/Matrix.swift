import Tensor

/// A dense row-major matrix: the value type of the Nets runtime. Activations are
/// `(batch * sequence) x features`; a linear weight is `out x in`, as Hugging Face stores it.
public struct Matrix<T: NetScalar>: Sendable, Equatable {
  public let rows: Int
  public let columns: Int
  /// Elements in row-major order; `values.count == rows * columns`.
  public var values: [T]

  @_specialize(exported:true,where T == Float)
  public init(rows: Int, columns: Int, values: [T]) {
    precondition(
      rows >= 0 && columns >= 0 && values.count == rows * columns,
      "\(rows) x \(columns) matrix with \(values.count) values")
    self.rows = rows
    self.columns = columns
    self.values = values
  }

  @_specialize(exported:true,where T == Float)
  public init(zeros rows: Int, _ columns: Int) {
    self.init(rows: rows, columns: columns, values: [T](repeating: 0, count: rows * columns))
  }

  /// A tensor's values as a matrix: 2-D as is, 1-D as one row.
  @_specialize(exported:true,where T == Float)
  public init(_ tensor: Tensor) {
    let (rows, columns) =
      tensor.shape.count == 1 ? (1, tensor.shape[0]) : (tensor.shape.dropLast().reduce(1, *), tensor.shape.last ?? 1)
    // A Float matrix takes the tensor's array as it is: no copy, and no conversion per element
    // (which runs generic, element by element, when called from unoptimised code).
    let values = T.self == Float.self ? unsafeBitCast(tensor.scalars, to: [T].self) : tensor.scalars.map { T($0) }
    self.init(rows: rows, columns: columns, values: values)
  }

  /// The values as a `Float` tensor of `shape` (default `[rows, columns]`).
  @_specialize(exported:true,where T == Float)
  public func tensor(shape: [Int]? = nil) -> Tensor {
    Tensor(
      shape: shape ?? [rows, columns],
      scalars: T.self == Float.self ? unsafeBitCast(values, to: [Float].self) : values.map { Float($0) })
  }

  public var count: Int { values.count }
  public var shape: (rows: Int, columns: Int) { (rows, columns) }

  public subscript(row: Int, column: Int) -> T {
    get { values[row * columns + column] }
    set { values[row * columns + column] = newValue }
  }

  /// `op(self) * op(b)` by BLAS.
  @_specialize(exported:true,where T == Float)
  public func matmul(_ b: Matrix, transposeSelf: Bool = false, transposeB: Bool = false) -> Matrix {
    let m = transposeSelf ? columns : rows
    let n = transposeB ? b.rows : b.columns
    let c = BLAS.product(
      values, rows, columns, transposeA: transposeSelf, b.values, b.rows, b.columns, transposeB: transposeB)
    return Matrix(rows: m, columns: n, values: c)
  }

  /// `self += alpha * op(a) * op(b)` by BLAS.
  @_specialize(exported:true,where T == Float)
  public mutating func addProduct(
    _ a: Matrix, _ b: Matrix, transposeA: Bool = false, transposeB: Bool = false, alpha: T = 1
  ) {
    BLAS.gemm(
      a.values, a.rows, a.columns, transposeA: transposeA, b.values, b.rows, b.columns, transposeB: transposeB,
      into: &values, alpha: alpha, beta: 1)
  }

  /// `self += other`, element-wise.
  @_specialize(exported:true,where T == Float)
  public mutating func add(_ other: Matrix) {
    precondition(
      rows == other.rows && columns == other.columns, "adding \(other.rows) x \(other.columns) to \(rows) x \(columns)")
    self = combined(other, .sum)
  }

  /// `f` applied to every element, large matrices on all cores (element by element, so the
  /// same bits as a plain loop).
  @inlinable public func map(_ f: (T) -> T) -> Matrix {
    let mapped = values.withUnsafeBufferPointer { input in
      Elementwise.mapBlocks(input.count) { (range, out: UnsafeMutableBufferPointer<T>) in
        let start = range.lowerBound
        for k in out.indices { out[k] = f(input[start + k]) }
      }
    }
    return Matrix(rows: rows, columns: columns, values: mapped)
  }

  /// The two element-wise combinations of matrices the layers use.
  public enum Combination: Sendable { case sum, product }

  /// `self[i] + other[i]` or `self[i] * other[i]` for every element (same shapes), on all cores
  /// when large. The operation is chosen once per block, not passed as a function, so that each
  /// loop is compiled to vector instructions (a function value was called per element).
  @_specialize(exported:true,where T == Float)
  public func combined(_ other: Matrix, _ combination: Combination) -> Matrix {
    precondition(rows == other.rows && columns == other.columns, "element-wise shapes")
    let mapped = values.withUnsafeBufferPointer { left in
      other.values.withUnsafeBufferPointer { right in
        Elementwise.mapBlocks(left.count) { (range, out: UnsafeMutableBufferPointer<T>) in
          let start = range.lowerBound
          switch combination {
          case .sum: for k in out.indices { out[k] = left[start + k] + right[start + k] }
          case .product: for k in out.indices { out[k] = left[start + k] * right[start + k] }
          }
        }
      }
    }
    return Matrix(rows: rows, columns: columns, values: mapped)
  }

  /// The sum of each column (a `1 x columns` row), accumulated in `T`.
  @_specialize(exported:true,where T == Float)
  public func columnSums() -> Matrix {
    var sums = [T](repeating: 0, count: columns)
    for r in 0..<rows { for c in 0..<columns { sums[c] += values[r * columns + c] } }
    return Matrix(rows: 1, columns: columns, values: sums)
  }

  /// The rows at `indices`, in that order (a mini-batch; the non-padding tokens of a batch).
  public func rows(_ indices: [Int]) -> Matrix {
    var out: [T] = []
    out.reserveCapacity(indices.count * columns)
    for i in indices { out += values[(i * columns)..<((i + 1) * columns)] }
    return Matrix(rows: indices.count, columns: columns, values: out)
  }

  public var transposed: Matrix {
    var t = Matrix(zeros: columns, rows)
    for i in 0..<rows { for j in 0..<columns { t.values[j * rows + i] = values[i * columns + j] } }
    return t
  }
}

extension Matrix where T == Float {
  /// A tensor's values as a `Float` matrix (2-D as is, 1-D as one row): the generic
  /// `init(_:)` made concrete, so unoptimised callers (a debug build's command layer) on a
  /// hot path do not run the generic per-element code.
  public init(floats tensor: Tensor) {
    let (rows, columns) =
      tensor.shape.count == 1 ? (1, tensor.shape[0]) : (tensor.shape.dropLast().reduce(1, *), tensor.shape.last ?? 1)
    self.init(rows: rows, columns: columns, values: tensor.scalars)
  }
}
