import Foundation
import Testing

@testable import Merge
@testable import Tensor

@Suite struct STFMergeTests {
  let m = 48
  let n = 32
  let tasks = 3

  func taskMatrices(seed: String) -> [DoubleMatrix] {
    (0..<tasks).map { DoubleMatrix(random([m, n], "\(seed)\($0)", scale: 0.1)) }
  }

  func norm(_ x: [Double]) -> Double { x.reduce(0) { $0 + $1 * $1 }.squareRoot() }

  func apply(_ a: DoubleMatrix, _ v: [Double]) -> [Double] {
    (0..<a.rows).map { i in (0..<a.columns).reduce(0.0) { $0 + a[i, $1] * v[$1] } }
  }

  @Test func outputsModeReproducesEveryKeptFeature() throws {
    let deltas = taskMatrices(seed: "out")
    let f = try STFMerge.features(of: deltas, rank: n / tasks)  // K = 30 <= n
    #expect(f.s.count == 30)
    let merged = try STFMerge.superpose(f, mode: "outputs", rcond: 1e-6, rows: m, columns: n)
    for j in 0..<f.s.count {
      let task = j / (n / tasks)
      let v = f.v.column(j)
      let expected = apply(deltas[task], v)
      let got = apply(merged, v)
      #expect(norm(zip(got, expected).map { $0 - $1 }) <= 1e-6 * norm(expected))
    }
  }

  @Test func projectionModeKeepsEachFeatureStrength() throws {
    let deltas = taskMatrices(seed: "proj")
    let f = try STFMerge.features(of: deltas, rank: n / tasks)
    let merged = try STFMerge.superpose(f, mode: "projection", rcond: 1e-6, rows: m, columns: n)
    for j in 0..<f.s.count {
      let projected = zip(f.u.column(j), apply(merged, f.v.column(j))).reduce(0) { $0 + $1.0 * $1.1 }
      #expect(abs(projected - f.s[j]) <= 1e-6 * f.s[j])
    }
    // dW* lies in span{u_j v_jᵀ}: its rank is at most K, with columns in span(U), rows in span(V).
    let (uu, _, _) = try LAPACK.svd(f.u)
    let residual = BLAS.matmul(uu, BLAS.matmul(uu, merged, transposeA: true))
    for (a, b) in zip(residual.values, merged.values) { #expect(abs(a - b) < 1e-10) }
  }

  @Test func orthogonalFeaturesReduceToTaskArithmetic() throws {
    // Orthonormal U (m x 12) and V (n x 12) split between three tasks, 4 features each.
    let u = DoubleMatrix(LAPACK.qr(random([m, 12], "ou")).q)
    let v = DoubleMatrix(LAPACK.qr(random([n, 12], "ov")).q)
    let deltas: [DoubleMatrix] = (0..<tasks).map { t in
      var scaled = DoubleMatrix(zeros: m, 4)
      var vt = DoubleMatrix(zeros: n, 4)
      for k in 0..<4 {
        for i in 0..<m { scaled[i, k] = u[i, 4 * t + k] * Double(5 - k) }
        for i in 0..<n { vt[i, k] = v[i, 4 * t + k] }
      }
      return BLAS.matmul(scaled, vt, transposeB: true)
    }
    var sum = DoubleMatrix(zeros: m, n)
    for d in deltas { for i in sum.values.indices { sum.values[i] += d.values[i] } }
    for mode in ["projection", "outputs"] {
      let merged = try STFMerge.superpose(
        try STFMerge.features(of: deltas, rank: 10), mode: mode, rcond: 1e-6, rows: m, columns: n)
      for (a, b) in zip(merged.values, sum.values) { #expect(abs(a - b) < 1e-6, "\(mode)") }
    }
  }

  @Test func mergingAModelWithItselfAtFullRankGivesTheModel() throws {
    let base = random([m, n], "base")
    let tuned = Tensor(
      shape: [m, n], scalars: zip(base.scalars, random([m, n], "self", scale: 0.1).scalars).map { $0 + $1 })
    for mode in ["projection", "outputs"] {
      let p = try resolve(STFMerge(), ["mode": .text(mode), "rank": .number(Double(n))], models: [[:], [:]])
      let out = try STFMerge().merge(
        MergeInputs(name: "model.layers.0.mlp.up_proj.weight", base: base, models: [tuned, tuned]), p)
      expectClose(out.scalars, tuned.scalars.map(Double.init), relative: 1e-6)
    }
  }

  @Test func taskOrderDoesNotMatter() throws {
    let base = random([m, n], "ob")
    let tuned = (0..<tasks).map { t in
      Tensor(shape: [m, n], scalars: zip(base.scalars, random([m, n], "ord\(t)", scale: 0.1).scalars).map { $0 + $1 })
    }
    let p = try resolve(STFMerge(), models: [[:], [:], [:]])
    let a = try STFMerge().merge(MergeInputs(name: "attn.q_proj.weight", base: base, models: tuned), p)
    let b = try STFMerge().merge(MergeInputs(name: "attn.q_proj.weight", base: base, models: tuned.reversed()), p)
    expectClose(a.scalars, b.scalars.map(Double.init), relative: 1e-6)
  }

  @Test func outputsModeHasMinimumNorm() throws {
    let f = try STFMerge.features(of: taskMatrices(seed: "min"), rank: 5)  // K = 15 < n: many solutions
    let merged = try STFMerge.superpose(f, mode: "outputs", rcond: 1e-6, rows: m, columns: n)
    // Z = R (I - V V⁺) satisfies Z V = 0; adding it can only grow the norm.
    let (q, _, _) = try LAPACK.svd(f.v)  // orthonormal basis of span(V)
    let r = DoubleMatrix(random([m, n], "R"))
    let projected = BLAS.matmul(BLAS.matmul(r, q), q, transposeB: true)
    var z = r
    for i in z.values.indices { z.values[i] -= projected.values[i] }
    let zv = BLAS.matmul(z, f.v)
    #expect(zv.values.allSatisfy { abs($0) < 1e-10 })
    let base = norm(merged.values)
    #expect(norm(zip(merged.values, z.values).map { $0 + 0.01 * $1 }) > base)
  }

  @Test func tensorsThatAreNotLinearMapsAverageTheModels() throws {
    let base = random([64], "norm")
    let tuned = (0..<2).map { t in
      Tensor(shape: [64], scalars: zip(base.scalars, random([64], "n\(t)").scalars).map { $0 + $1 })
    }
    let p = try resolve(STFMerge(), models: [[:], [:]])
    let out = try STFMerge().merge(MergeInputs(name: "model.norm.weight", base: base, models: tuned), p)
    expectClose(out.scalars, (0..<64).map { (Double(tuned[0].scalars[$0]) + Double(tuned[1].scalars[$0])) / 2 })
    #expect(!STFMerge.isLinearMap("model.embed_tokens.weight", shape: [100, 8]))
    #expect(STFMerge.isLinearMap("model.layers.3.self_attn.k_proj.weight", shape: [8, 16]))
  }

  /// The Gram route for large matrices gives the same top singular triplets as dgesdd: the same
  /// singular values, orthonormal vectors and `A v = s u`, for wide and tall task matrices; and
  /// so the same merge.
  @Test(arguments: [(40, 90), (90, 40)])
  func gramTripletsMatchTheExactSVD(_ shape: (Int, Int)) throws {
    let (m, n) = shape
    let k = min(m, n)
    let q1 = LAPACK.qr(random([m, k], "q1")).q
    let q2 = LAPACK.qr(random([n, k], "q2")).q
    var a = DoubleMatrix(zeros: m, n)
    for i in 0..<m {
      for j in 0..<n {
        for r in 0..<k {
          a[i, j] += Double(q1.scalars[i * k + r]) * pow(0.85, Double(r)) * Double(q2.scalars[j * k + r])
        }
      }
    }
    let exact = try STFMerge.exactTriplets(a, rank: 12)
    let gram = try STFMerge.topTriplets(a, rank: 12)
    #expect(gram.s.count == 12)
    for j in 0..<12 {
      #expect(abs(gram.s[j] - exact.s[j]) <= 1e-9 * exact.s[0])
      let av = (0..<m).map { i in (0..<n).reduce(0.0) { $0 + a[i, $1] * gram.v[j][$1] } }
      #expect(zip(av, gram.u[j]).allSatisfy { abs($0 - gram.s[j] * $1) <= 1e-9 * exact.s[0] })
      for l in 0..<12 {
        let uu = zip(gram.u[j], gram.u[l]).reduce(0.0) { $0 + $1.0 * $1.1 }
        let vv = zip(gram.v[j], gram.v[l]).reduce(0.0) { $0 + $1.0 * $1.1 }
        #expect(abs(uu - (j == l ? 1 : 0)) < 1e-9 && abs(vv - (j == l ? 1 : 0)) < 1e-9)
      }
    }
    let tasks = [
      a, DoubleMatrix(rows: m, columns: n, values: random([m, n], "second", scale: 0.05).scalars.map(Double.init)),
    ]
    for mode in ["projection", "outputs"] {
      let viaGram = try STFMerge.superpose(
        try STFMerge.features(of: tasks, rank: 12, gramSide: 1), mode: mode, rcond: 1e-6, rows: m, columns: n)
      let viaSVD = try STFMerge.superpose(
        try STFMerge.features(of: tasks, rank: 12, gramSide: 10_000), mode: mode, rcond: 1e-6, rows: m, columns: n)
      let scale = viaSVD.values.map(abs).max()!
      let worst = zip(viaGram.values, viaSVD.values).map { abs($0 - $1) }.max()!
      #expect(worst <= 1e-7 * scale, "\(mode): \(worst / scale)")
    }
  }
}
