import Foundation
import Tensor
import Testing

@testable import Adapt

/// An `rows x columns` matrix with singular values `decay^i` (random orthonormal factors), so
/// truncation errors are known and not all alike.
func matrixWithSpectrum(_ rows: Int, _ columns: Int, decay: Double, seed: UInt64) -> (Tensor, [Double]) {
  let k = min(rows, columns)
  let rng = CounterRNG(seed: seed, stream: "spectrum")
  let u = LAPACK.qr(Tensor(shape: [rows, k], scalars: (0..<(rows * k)).map { rng.normal(UInt64($0)) })).q
  let v = LAPACK.qr(Tensor(shape: [columns, k], scalars: (0..<(columns * k)).map { rng.normal(UInt64(1 << 32 + $0)) }))
    .q
  let s = (0..<k).map { pow(decay, Double($0)) }
  var scaled = u
  for i in 0..<rows { for j in 0..<k { scaled.scalars[i * k + j] *= Float(s[j]) } }
  return (BLAS.matmul(scaled, v, transposeB: true), s)
}

/// `|a - b|_F^2` in double precision.
func squaredDistance(_ a: Tensor, _ b: Tensor) -> Double {
  zip(a.scalars, b.scalars).reduce(0.0) { $0 + (Double($1.0) - Double($1.1)) * (Double($1.0) - Double($1.1)) }
}

@Suite struct LowRankTests {
  /// The spec's worked examples of `r = floor(in out / (c (in + out)))`.
  @Test func rankRules() {
    #expect(RankRule.keep(0.5).rank(rows: 768, columns: 768) == 192)
    #expect(RankRule.keep(0.5).rank(rows: 3072, columns: 768) == 307)
    #expect(RankRule.keep(1.0 / 3).rank(rows: 768, columns: 768) == 128)
    #expect(RankRule.rank(900).rank(rows: 768, columns: 300) == 300)
    // Energy: singular values 3, 2, 1 hold 9, 4, 1 of 14.
    #expect(RankRule.energy(0.6).rank(rows: 3, columns: 3, singularValues: [3, 2, 1]) == 1)
    #expect(RankRule.energy(0.9).rank(rows: 3, columns: 3, singularValues: [3, 2, 1]) == 2)
    #expect(RankRule.energy(13.0 / 14).rank(rows: 3, columns: 3, singularValues: [3, 2, 1]) == 2)
    #expect(RankRule.energy(1).rank(rows: 3, columns: 3, singularValues: [3, 2, 1]) == 3)
    #expect(!RankRule.saves(rank: 5, rows: 10, columns: 10) && RankRule.saves(rank: 4, rows: 10, columns: 10))
  }

  /// Eckart-Young: `|W - B A|_F^2` equals the energy of the discarded singular values of an
  /// independent float64 SVD, and the factors split the singular values evenly.
  @Test(arguments: [(60, 40), (40, 60), (50, 50)])
  func truncationErrorIsTheDiscardedEnergy(_ shape: (Int, Int)) throws {
    let (w, _) = matrixWithSpectrum(shape.0, shape.1, decay: 0.9, seed: 3)
    let reference = try LAPACK.svd(DoubleMatrix(w)).s
    let factors = try #require(try LowRank.factor(w, rule: .keep(0.5), solver: .exact))
    let r = RankRule.keep(0.5).rank(rows: shape.0, columns: shape.1)
    #expect(factors.rank == r && factors.a.shape == [r, shape.1] && factors.b.shape == [shape.0, r])
    let discarded = reference.dropFirst(r).reduce(0.0) { $0 + $1 * $1 }
    let measured = squaredDistance(w, factors.product)
    #expect(abs(measured - discarded) / discarded < 1e-5, "measured \(measured), optimum \(discarded)")
    #expect(abs(factors.discardedEnergy - discarded) / discarded < 1e-5)
    for factor in [factors.a, factors.b] {
      let s = try LAPACK.svd(DoubleMatrix(factor)).s
      for i in 0..<r { #expect(abs(s[i] - reference[i].squareRoot()) < 1e-5 * reference[0].squareRoot()) }
    }
  }

  /// The randomized solver reaches within 1% of the optimal error (the benchmark prints its speed).
  @Test func randomizedFactorsAreNearlyOptimal() throws {
    let (w, _) = matrixWithSpectrum(600, 520, decay: 0.99, seed: 4)
    let reference = try LAPACK.svd(DoubleMatrix(w)).s
    let factors = try LowRank.factor(w, rank: 40, solver: .randomized)
    let optimum = reference.dropFirst(40).reduce(0.0) { $0 + $1 * $1 }
    #expect(squaredDistance(w, factors.product) <= 1.01 * optimum)
  }

  /// At every rank the tool uses (n/32 to n/2 of the smaller side), square and rectangular, on
  /// the hardest spectrum for a sketch (a Gaussian matrix: nearly flat singular values), the
  /// randomized solver stays within 1% of the optimal squared error, measured against a float64
  /// SVD.
  @Test(arguments: [(384, 384), (512, 256)])
  func randomizedFactorsStayNearlyOptimalAtEveryRank(rows: Int, columns: Int) throws {
    let w = CounterRNG(seed: 9, stream: "flat").normalTensor([rows, columns])
    let reference = try LAPACK.svd(DoubleMatrix(w)).s
    let n = min(rows, columns)
    for rank in [n / 32, n / 8, n / 4, n / 2] {
      let factors = try LowRank.factor(w, rank: rank, solver: .randomized)
      let optimum = reference.dropFirst(rank).reduce(0.0) { $0 + $1 * $1 }
      let ratio = squaredDistance(w, factors.product) / optimum
      #expect(ratio <= 1.01, "rank \(rank): \(ratio)")
    }
  }

  @Test func layersThatWouldNotShrinkStayDense() throws {
    let (w, _) = matrixWithSpectrum(10, 10, decay: 0.5, seed: 5)
    #expect(try LowRank.factor(w, rule: .rank(5)) == nil)
    #expect(try LowRank.factor(w, rule: .rank(4))?.rank == 4)
    #expect(try LowRank.factor(w, rule: .keep(0.05)) == nil)  // rank 0
  }
}
