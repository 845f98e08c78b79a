import Foundation
import Tensor

/// How the rank of a factored matrix is chosen.
public enum RankRule: Sendable, Equatable, CustomStringConvertible {
  /// Keep this fraction of the layer's parameters: `r = floor(in out keep / (in + out))`
  /// (PELA's compression ratio `c = 1 / keep`).
  case keep(Double)
  /// A fixed rank (capped at `min(out, in)`).
  case rank(Int)
  /// The smallest rank whose singular values hold this fraction of the squared Frobenius norm.
  case energy(Double)

  public var description: String {
    switch self {
    case .keep(let f): return "keep \(f) of the parameters"
    case .rank(let r): return "rank \(r)"
    case .energy(let e): return "energy \(e)"
    }
  }

  /// Whether this rule needs the whole spectrum (an exact SVD) to pick the rank.
  public var needsSpectrum: Bool {
    if case .energy = self { return true }
    return false
  }

  /// The rank for an `rows x columns` matrix; `singularValues` (descending) only for `energy`.
  public func rank(rows: Int, columns: Int, singularValues: [Double] = []) -> Int {
    let full = min(rows, columns)
    switch self {
    case .keep(let fraction):
      // A tiny epsilon keeps exact products (768 x 768 at 1/2: 192) from rounding down.
      return min(full, Int((Double(rows * columns) * fraction / Double(rows + columns) + 1e-9).rounded(.down)))
    case .rank(let r):
      return min(full, r)
    case .energy(let fraction):
      let squares = singularValues.map { $0 * $0 }
      let total = squares.reduce(0, +)
      guard total > 0 else { return 0 }
      var kept = 0.0
      for (i, s) in squares.enumerated() {
        kept += s
        if kept >= fraction * total * (1 - 1e-12) { return i + 1 }
      }
      return full
    }
  }

  /// Whether two factors of rank `rank` hold fewer parameters than the dense matrix.
  public static func saves(rank: Int, rows: Int, columns: Int) -> Bool {
    rank >= 1 && rank * (rows + columns) < rows * columns
  }
}

/// The best rank-r approximation `W ~ B A` of an `out x in` matrix, split evenly:
/// `B = U_r S_r^(1/2)` (out x r), `A = S_r^(1/2) V_r^T` (r x in), as PELA does.
public struct LowRankFactors: Sendable {
  /// `r x in`: the first linear map (no bias).
  public let a: Tensor
  /// `out x r`: the second linear map (the layer's bias goes with it).
  public let b: Tensor
  /// The kept singular values, descending.
  public let singularValues: [Float]
  /// `|W|_F^2`, in double precision.
  public let totalEnergy: Double
  /// `|W - B A|_F^2 = |W|_F^2 - sum of the kept squared singular values` (Eckart-Young).
  public let discardedEnergy: Double

  public var rank: Int { singularValues.count }

  /// `B A`, the dense approximation.
  public var product: Tensor { BLAS.matmul(b, a) }
}

/// Truncated SVD factorisation of weight matrices.
public enum LowRank {
  /// `exact`: a full SVD (sgesdd); `randomized`: a randomized range finder (a sketch twice the
  /// rank wide, at least rank + 10; four power iterations, then more while one more still raises
  /// the captured energy by over 0.1% of the energy left out) then a small SVD, within 1% of the
  /// optimal squared error at every rank up to half the matrix (tested on flat spectra, the hardest
  /// case); `automatic`: randomized when the rank is at most a sixteenth of `min(out, in)` and
  /// that is at least 512, where it is measured at a sixth to a quarter of the exact time
  /// (`make bench-adapt`; at n/8 it is 0.8 of it, and slower above), else exact.
  public enum Solver: String, Sendable, CaseIterable {
    case exact, randomized, automatic
  }

  /// Factors `w` (`out x in`) at the rank `rule` gives. Returns nil when that rank would not save
  /// parameters (`r (out + in) >= out in`) or is 0.
  public static func factor(_ w: Tensor, rule: RankRule, solver: Solver = .automatic, seed: UInt64 = 0) throws
    -> LowRankFactors?
  {
    precondition(w.shape.count == 2, "factor needs a matrix, got \(w.shape)")
    let (rows, columns) = (w.shape[0], w.shape[1])
    var spectrum: SVD?
    if rule.needsSpectrum { spectrum = try LAPACK.svd(w) }
    let r = rule.rank(rows: rows, columns: columns, singularValues: spectrum?.s.map(Double.init) ?? [])
    guard RankRule.saves(rank: r, rows: rows, columns: columns) else { return nil }
    return try factor(w, rank: r, solver: solver, seed: seed, spectrum: spectrum)
  }

  /// Factors `w` at rank `rank` (1 ... min(out, in)).
  public static func factor(_ w: Tensor, rank: Int, solver: Solver = .automatic, seed: UInt64 = 0, spectrum: SVD? = nil)
    throws -> LowRankFactors
  {
    let (rows, columns) = (w.shape[0], w.shape[1])
    precondition(rank >= 1 && rank <= min(rows, columns), "rank \(rank) for a \(rows) x \(columns) matrix")
    let useRandomized: Bool
    switch solver {
    case .exact: useRandomized = false
    case .randomized: useRandomized = spectrum == nil
    case .automatic: useRandomized = spectrum == nil && min(rows, columns) >= 512 && rank * 16 <= min(rows, columns)
    }
    let svd =
      useRandomized
      ? try LAPACK.randomizedSVD(
        w, rank: rank, oversampling: max(10, rank), powerIterations: 4, seed: seed, tolerance: 1e-3)
      : LAPACK.truncated(try spectrum ?? LAPACK.svd(w), to: rank)
    return split(svd, total: w.scalars.reduce(0.0) { $0 + Double($1) * Double($1) })
  }

  /// `B = U S^(1/2)`, `A = S^(1/2) V^T` from a (truncated) SVD of a matrix of energy `total`.
  static func split(_ svd: SVD, total: Double) -> LowRankFactors {
    let r = svd.s.count
    let roots = svd.s.map { $0.squareRoot() }
    var b = svd.u
    for i in 0..<b.shape[0] { for j in 0..<r { b.scalars[i * r + j] *= roots[j] } }
    var a = svd.vt
    let columns = a.shape[1]
    for i in 0..<r { for j in 0..<columns { a.scalars[i * columns + j] *= roots[i] } }
    let kept = svd.s.reduce(0.0) { $0 + Double($1) * Double($1) }
    return LowRankFactors(a: a, b: b, singularValues: svd.s, totalEnergy: total, discardedEnergy: max(0, total - kept))
  }
}
