/// A matrix kept as its leading singular triplets, `u diag(s) vt`: `u` is m x k with orthonormal
/// columns, `s` descending, `vt` k x n with orthonormal rows (a truncated SVD). Low-rank task
/// vectors store their matrices this way; the SVD-based merges read the triplets directly.
public struct SingularFactors: Sendable, Equatable {
  public var u: Tensor
  public var s: [Float]
  public var vt: Tensor

  /// Factors of matching shapes: `u` [m, k], `s` [k], `vt` [k, n].
  public init(u: Tensor, s: [Float], vt: Tensor) {
    precondition(
      u.shape.count == 2 && vt.shape.count == 2 && u.shape[1] == s.count && vt.shape[0] == s.count,
      "singular factors \(u.shape), [\(s.count)], \(vt.shape)")
    self.u = u
    self.s = s
    self.vt = vt
  }

  public var rank: Int { s.count }
  public var rows: Int { u.shape[0] }
  public var columns: Int { vt.shape[1] }

  /// Rows `range` of `u diag(s) vt`, row-major, in Float (one product of `range.count x k` by
  /// `k x n`): only those rows are ever formed.
  public func rows(_ range: Range<Int>) -> [Float] {
    let (k, n) = (rank, columns)
    guard !range.isEmpty, n > 0 else { return [] }
    var left = [Float](repeating: 0, count: range.count * k)
    for (i, row) in range.enumerated() { for j in 0..<k { left[i * k + j] = u.scalars[row * k + j] * s[j] } }
    var out = [Float](repeating: 0, count: range.count * n)
    guard k > 0 else { return out }
    BLAS.gemm(left, range.count, k, vt.scalars, k, n, into: &out)
    return out
  }

  /// The whole matrix, `u diag(s) vt`.
  public var dense: Tensor { Tensor(shape: [rows, columns], scalars: rows(0..<rows)) }
}
