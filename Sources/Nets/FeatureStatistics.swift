import Tensor

/// Streaming statistics of one activation point in Float64: the row count, the sum of rows and
/// the sum of outer products `X^T X` (accumulated by dgemm batch by batch), so memory is
/// `width^2` doubles whatever the data size. Mean, covariance and correlation follow. For two
/// models run on the same inputs, feed `concatenated(a, b)`: the off-diagonal block of the
/// joint covariance is the cross-covariance ZipIt matches features with.
public struct FeatureStatistics: Sendable, Equatable {
  public let width: Int
  public private(set) var count = 0
  public private(set) var sum: [Double]
  /// `sum over rows of x x^T`, row-major `width x width`.
  public private(set) var products: [Double]

  public init(width: Int) {
    self.width = width
    sum = [Double](repeating: 0, count: width)
    products = [Double](repeating: 0, count: width * width)
  }

  /// Restores saved statistics (as written by `mergekit stats`).
  public init(count: Int, sum: [Double], products: [Double]) {
    precondition(products.count == sum.count * sum.count)
    width = sum.count
    self.count = count
    self.sum = sum
    self.products = products
  }

  /// Adds every row of `batch` (`rows x width`).
  public mutating func add<T: NetScalar>(_ batch: Matrix<T>) {
    precondition(batch.columns == width, "statistics of width \(width) fed \(batch.columns) columns")
    let x = batch.values.map { Double($0) }
    for r in 0..<batch.rows { for c in 0..<width { sum[c] += x[r * width + c] } }
    BLAS.gemm(x, batch.rows, width, transposeA: true, x, batch.rows, width, into: &products, beta: 1)
    count += batch.rows
  }

  /// Merges statistics gathered on other data (the same point).
  public mutating func add(_ other: FeatureStatistics) {
    precondition(other.width == width)
    count += other.count
    for i in sum.indices { sum[i] += other.sum[i] }
    for i in products.indices { products[i] += other.products[i] }
  }

  public var mean: [Double] { sum.map { $0 / Double(max(count, 1)) } }

  /// `E[x x^T]`, row-major.
  public var secondMoment: [Double] { products.map { $0 / Double(max(count, 1)) } }

  /// Population covariance `E[x x^T] - mean mean^T`, row-major.
  public var covariance: [Double] {
    let m = mean
    let n = Double(max(count, 1))
    return (0..<(width * width)).map { products[$0] / n - m[$0 / width] * m[$0 % width] }
  }

  /// Pearson correlation; a feature with zero variance correlates 0 with others and 1 with itself.
  public var correlation: [Double] {
    let c = covariance
    let deviation = (0..<width).map { c[$0 * width + $0].squareRoot() }
    return (0..<(width * width)).map { k in
      let (i, j) = (k / width, k % width)
      if i == j { return 1 }
      let d = deviation[i] * deviation[j]
      return d > 0 ? c[k] / d : 0
    }
  }
}

extension Matrix {
  /// `[a b]`: the columns of `b` after those of `a` (same rows), e.g. two models' features.
  public static func concatenated(_ a: Matrix, _ b: Matrix) -> Matrix {
    precondition(a.rows == b.rows, "concatenating \(a.rows) rows with \(b.rows)")
    var out = Matrix(zeros: a.rows, a.columns + b.columns)
    for r in 0..<a.rows {
      for c in 0..<a.columns { out.values[r * out.columns + c] = a.values[r * a.columns + c] }
      for c in 0..<b.columns { out.values[r * out.columns + a.columns + c] = b.values[r * b.columns + c] }
    }
    return out
  }
}
