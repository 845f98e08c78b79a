// Adapt benchmarks: prints figures, asserts nothing.
//
//   swift run -c release AdaptBenchmarks
//
// PELA's factorisation of one weight matrix (singular values 0.995^i, a slowly decaying
// spectrum like trained projections), square and rectangular: the exact SVD against the
// randomized solver and the automatic choice at ranks n/32, n/8, n/4 and n/2, as time and as the
// squared error |W - B A|_F^2 relative to the Eckart-Young optimum (the energy of the discarded
// singular values).
import Adapt
import BenchmarkSupport
import Foundation
import Tensor

func matrix(_ rows: Int, _ columns: Int, decay: Double) -> (Tensor, [Double]) {
  let k = min(rows, columns)
  let u = LAPACK.qr(CounterRNG(seed: 1, stream: "u").normalTensor([rows, k])).q
  let v = LAPACK.qr(CounterRNG(seed: 1, stream: "v").normalTensor([columns, k])).q
  let values = (0..<k).map { pow(decay, Double($0)) }
  var scaled = u
  for i in 0..<rows { for j in 0..<k { scaled.scalars[i * k + j] *= Float(values[j]) } }
  return (BLAS.matmul(scaled, v, transposeB: true), values)
}

func squaredError(_ a: Tensor, _ b: Tensor) -> Double {
  zip(a.scalars, b.scalars).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) }
}

BLAS.restartWithTheCPUsKernels()
BLAS.shortenIdleSpin()  // as mergekit does
print("== one matrix, singular values 0.995^i, \(Parallel.threadCount) threads, OpenBLAS kernels \(BLAS.coreName)")
for (rows, columns) in [(2048, 2048), (4096, 1024)] {
  let (w, values) = matrix(rows, columns, decay: 0.995)
  let exact = try seconds { _ = try LowRank.factor(w, rank: 16, solver: .exact) }
  print(String(format: "%d x %d: exact SVD (sgesdd) %.3f s", rows, columns, exact))
  record("adapt", "exact svd", exact, unit: "s", ["rows": rows, "columns": columns])
  let n = min(rows, columns)
  for rank in [n / 32, n / 8, n / 4, n / 2] {
    var factors: LowRankFactors?
    let time = try seconds { factors = try LowRank.factor(w, rank: rank, solver: .randomized) }
    var chosen: LowRankFactors?
    let automatic = try seconds { chosen = try LowRank.factor(w, rank: rank, solver: .automatic) }
    let optimum = values[rank...].reduce(0.0) { $0 + $1 * $1 }
    print(
      String(
        format:
          "  rank %4d (n/%2d) randomized %.3f s (%.3f of the exact time), squared error %.4f x the optimum; auto %.3f s, %.4f x",
        rank, n / rank, time, time / exact, (factors.map { squaredError(w, $0.product) } ?? .nan) / optimum,
        automatic, (chosen.map { squaredError(w, $0.product) } ?? .nan) / optimum))
    record(
      "adapt", "randomized svd", time, unit: "s",
      [
        "rows": rows, "columns": columns, "rank": rank, "of_exact_time": time / exact,
        "error_over_optimum": (factors.map { squaredError(w, $0.product) } ?? .nan) / optimum,
      ])
  }
}
