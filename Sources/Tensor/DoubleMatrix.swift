/// A dense row-major matrix of `Double`: for the small, precision-sensitive parts of the maths
/// (Gram matrices, the linear systems of STF, eigendecompositions), where `Float` is not enough.
public struct DoubleMatrix: Sendable, Equatable {
  public let rows: Int
  public let columns: Int
  /// Elements in row-major order; `values.count == rows * columns`.
  public var values: [Double]

  public init(rows: Int, columns: Int, values: [Double]) {
    precondition(
      rows >= 0 && columns >= 0 && values.count == rows * columns,
      "\(rows) x \(columns) matrix with \(values.count) values")
    self.rows = rows
    self.columns = columns
    self.values = values
  }

  /// A matrix of zeros.
  public init(zeros rows: Int, _ columns: Int) {
    self.init(rows: rows, columns: columns, values: [Double](repeating: 0, count: rows * columns))
  }

  /// The `n x n` identity.
  public static func identity(_ n: Int) -> DoubleMatrix {
    var m = DoubleMatrix(zeros: n, n)
    for i in 0..<n { m.values[i * n + i] = 1 }
    return m
  }

  /// A 2-D tensor widened to `Double`.
  public init(_ tensor: Tensor) {
    precondition(tensor.shape.count == 2, "a matrix needs a 2-D tensor, got \(tensor.shape)")
    self.init(rows: tensor.shape[0], columns: tensor.shape[1], values: tensor.scalars.map(Double.init))
  }

  /// Rounded to a `Float` tensor of shape `[rows, columns]`.
  public var tensor: Tensor { Tensor(shape: [rows, columns], scalars: values.map(Float.init)) }

  public subscript(row: Int, column: Int) -> Double {
    get { values[row * columns + column] }
    set { values[row * columns + column] = newValue }
  }

  /// The transpose.
  public var transposed: DoubleMatrix {
    var t = DoubleMatrix(zeros: columns, rows)
    for i in 0..<rows { for j in 0..<columns { t.values[j * rows + i] = values[i * columns + j] } }
    return t
  }

  /// Column `j` as an array.
  public func column(_ j: Int) -> [Double] { (0..<rows).map { values[$0 * columns + j] } }
}
