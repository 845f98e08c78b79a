import Foundation
import Nets
import Testing

@testable import Merge
@testable import Tensor

@Suite struct STFMergeTests {
  let m = 48
  let n = 32
  let tasks = 3

  func taskMatrices(seed: String) -> [Matrix<Double>] {
    (0..<tasks).map { Matrix<Double>(random([m, n], "\(seed)\($0)", scale: 0.1)) }
  }

  func norm(_ x: [Double]) -> Double { x.reduce(0) { $0 + $1 * $1 }.squareRoot() }

  func apply<T: NetScalar>(_ a: Matrix<T>, _ v: [T]) -> [Double] {
    (0..<a.rows).map { i in (0..<a.columns).reduce(0.0) { $0 + Double(a[i, $1]) * Double(v[$1]) } }
  }

  /// Row `j` of a matrix (feature `j` of `Features.u` or `.v`).
  func row<T: NetScalar>(_ a: Matrix<T>, _ j: Int) -> [T] { Array(a.values[(j * a.columns)..<((j + 1) * a.columns)]) }

  @Test func outputsModeReproducesEveryKeptFeature() throws {
    let deltas = taskMatrices(seed: "out")
    let f = try STFMerge.features(of: deltas, rank: n / tasks)  // K = 30 <= n
    #expect(f.s.count == 30)
    let merged = try STFMerge.superpose(f, mode: "outputs", rcond: 1e-6)
    for j in 0..<f.s.count {
      let task = j / (n / tasks)
      let v = row(f.v, j)
      let expected = apply(deltas[task], v)
      let got = apply(merged, v)
      #expect(norm(zip(got, expected).map { $0 - $1 }) <= 1e-6 * norm(expected))
    }
  }

  @Test func projectionModeKeepsEachFeatureStrength() throws {
    let deltas = taskMatrices(seed: "proj")
    let f = try STFMerge.features(of: deltas, rank: n / tasks)
    let merged = try STFMerge.superpose(f, mode: "projection", rcond: 1e-6)
    for j in 0..<f.s.count {
      let projected = zip(row(f.u, j), apply(merged, row(f.v, j))).reduce(0) { $0 + $1.0 * $1.1 }
      #expect(abs(projected - f.s[j]) <= 1e-6 * f.s[j])
    }
    // dW* lies in span{u_j v_jᵀ}: its rank is at most K, with columns in span(U), rows in span(V).
    let (uu, _, _) = try LAPACK.svd(DoubleMatrix(rows: f.u.rows, columns: m, values: f.u.values).transposed)
    let d = DoubleMatrix(rows: m, columns: n, values: merged.values)
    let residual = BLAS.matmul(uu, BLAS.matmul(uu, d, transposeA: true))
    for (a, b) in zip(residual.values, merged.values) { #expect(abs(a - b) < 1e-10) }
  }

  @Test func orthogonalFeaturesReduceToTaskArithmetic() throws {
    // Orthonormal U (m x 12) and V (n x 12) split between three tasks, 4 features each.
    let u = DoubleMatrix(LAPACK.qr(random([m, 12], "ou")).q)
    let v = DoubleMatrix(LAPACK.qr(random([n, 12], "ov")).q)
    let deltas: [Matrix<Double>] = (0..<tasks).map { t in
      var scaled = DoubleMatrix(zeros: m, 4)
      var vt = DoubleMatrix(zeros: n, 4)
      for k in 0..<4 {
        for i in 0..<m { scaled[i, k] = u[i, 4 * t + k] * Double(5 - k) }
        for i in 0..<n { vt[i, k] = v[i, 4 * t + k] }
      }
      return Matrix(rows: m, columns: n, values: BLAS.matmul(scaled, vt, transposeB: true).values)
    }
    var sum = DoubleMatrix(zeros: m, n)
    for d in deltas { for i in sum.values.indices { sum.values[i] += d.values[i] } }
    for mode in ["projection", "outputs"] {
      let merged = try STFMerge.superpose(try STFMerge.features(of: deltas, rank: 10), mode: mode, rcond: 1e-6)
      for (a, b) in zip(merged.values, sum.values) { #expect(abs(a - b) < 1e-6, "\(mode)") }
    }
  }

  @Test func mergingAModelWithItselfAtFullRankGivesTheModel() throws {
    let base = random([m, n], "base")
    let tuned = Tensor(
      shape: [m, n], scalars: zip(base.scalars, random([m, n], "self", scale: 0.1).scalars).map { $0 + $1 })
    for mode in ["projection", "outputs"] {
      for precision in ["float64", "float32"] {
        let p = try resolve(
          STFMerge(), ["mode": .text(mode), "rank": .number(Double(n)), "precision": .text(precision)],
          models: [[:], [:]])
        let out = try STFMerge().merge(
          MergeInputs(name: "model.layers.0.mlp.up_proj.weight", base: base, models: [tuned, tuned]), p)
        expectClose(out.scalars, tuned.scalars.map(Double.init), relative: 1e-6)
      }
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
    let merged = try STFMerge.superpose(f, mode: "outputs", rcond: 1e-6)
    // Z = R (I - V V⁺) satisfies Z V = 0; adding it can only grow the norm.
    let v = DoubleMatrix(rows: f.v.rows, columns: n, values: f.v.values).transposed  // n x K
    let (q, _, _) = try LAPACK.svd(v)  // orthonormal basis of span(V)
    let r = DoubleMatrix(random([m, n], "R"))
    let projected = BLAS.matmul(BLAS.matmul(r, q), q, transposeB: true)
    var z = r
    for i in z.values.indices { z.values[i] -= projected.values[i] }
    let zv = BLAS.matmul(z, v)
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

  /// Large tensors that are not linear maps are streamed (their whole inputs would fill the memory
  /// budget); linear maps and small tensors are merged whole. The streamed merger gives the
  /// whole-tensor merge's bits, with `fallback_lambda` applied.
  @Test func largeTensorsThatAreNotLinearMapsAreStreamed() throws {
    let stf = STFMerge()
    #expect(stf.streams(tensor: "model.embed_tokens.weight", shape: [32_000, 2048]))
    #expect(stf.streams(tensor: "lm_head.weight", shape: [1 << 22]))
    #expect(!stf.streams(tensor: "model.norm.weight", shape: [2048]))
    #expect(!stf.streams(tensor: "model.layers.0.mlp.up_proj.weight", shape: [5632, 2048]))
    let base = random([700], "embed")
    let tuned = (0..<3).map { t in
      Tensor(shape: [700], scalars: zip(base.scalars, random([700], "e\(t)").scalars).map { $0 + $1 })
    }
    let p = try resolve(stf, ["fallback_lambda": .number(0.5)], models: [[:], [:], [:]])
    let whole = try stf.merge(MergeInputs(name: "lm_head.weight", base: base, models: tuned), p)
    let scan = TensorScan(ranges: [0..<700]) { _ in
      RangeInputs(offset: 0, base: base.scalars, models: tuned.map(\.scalars))
    }
    let merger = try #require(try stf.prepare(tensor: "lm_head.weight", count: 700, p, scan: scan))
    // A linear map is never streamed as task arithmetic.
    #expect(try stf.prepare(tensor: "model.layers.0.mlp.up_proj.weight", shape: [35, 20], p, scan: scan) == nil)
    let form = try #require(merger.weightedSum)
    #expect(form.scale == 0.5 && form.addsBase && form.subtractsBase)
    let streamed = try merger.merge(RangeInputs(offset: 0, base: base.scalars, models: tuned.map(\.scalars)))
    #expect(streamed == whole.scalars)
    expectClose(
      whole.scalars,
      (0..<700).map { i in
        Double(base.scalars[i]) + 0.5 * tuned.reduce(0) { $0 + Double($1.scalars[i]) - Double(base.scalars[i]) }
      })
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
    let task = Matrix(rows: m, columns: n, values: a.values)
    let exact = try STFMerge.exactTriplets(task, rank: 12)
    let gram = try STFMerge.gramTriplets(task, rank: 12)
    #expect(gram.s.count == 12)
    for j in 0..<12 {
      #expect(abs(gram.s[j] - exact.s[j]) <= 1e-9 * exact.s[0])
      let av = apply(task, row(gram.v, j))
      #expect(zip(av, row(gram.u, j)).allSatisfy { abs($0 - gram.s[j] * $1) <= 1e-9 * exact.s[0] })
      for l in 0..<12 {
        let uu = zip(row(gram.u, j), row(gram.u, l)).reduce(0.0) { $0 + $1.0 * $1.1 }
        let vv = zip(row(gram.v, j), row(gram.v, l)).reduce(0.0) { $0 + $1.0 * $1.1 }
        #expect(abs(uu - (j == l ? 1 : 0)) < 1e-9 && abs(vv - (j == l ? 1 : 0)) < 1e-9)
      }
    }
    let tasks = [task, Matrix<Double>(random([m, n], "second", scale: 0.05))]
    for mode in ["projection", "outputs"] {
      let viaGram = try STFMerge.superpose(
        try STFMerge.features(of: tasks, rank: 12, gramSide: 1), mode: mode, rcond: 1e-6)
      let viaSVD = try STFMerge.superpose(
        try STFMerge.features(of: tasks, rank: 12, gramSide: 10_000), mode: mode, rcond: 1e-6)
      let scale = viaSVD.values.map(abs).max()!
      let worst = zip(viaGram.values, viaSVD.values).map { abs($0 - $1) }.max()!
      #expect(worst <= 1e-7 * scale, "\(mode): \(worst / scale)")
    }
  }

  /// The default float32 path (Gram matrices, top eigenpairs, products in Float; systems in
  /// Double) keeps each mode's identity to float32 accuracy (1e-4 of the largest feature; 1e-3 in
  /// outputs mode, whose K = n system is less well conditioned), and its merge stays within 1e-4
  /// of the float64 reference: far below the bf16 rounding (4e-3) of a stored model.
  @Test func float32PathKeepsTheIdentitiesToItsPrecision() throws {
    let (m, n) = (72, 60)
    let tasks64 = (0..<3).map { Matrix<Double>(random([m, n], "f32-\($0)", scale: 0.1)) }
    let tasks32 = tasks64.map { Matrix<Float>(rows: m, columns: n, values: $0.values.map { Float($0) }) }
    for mode in ["projection", "outputs"] {
      let f = try STFMerge.features(of: tasks32, rank: 20, gramSide: 1)
      #expect(f.s.count == 60)
      let merged = try STFMerge.superpose(f, mode: mode, rcond: 1e-6)
      for j in 0..<f.s.count {
        let image = apply(merged, row(f.v, j))
        if mode == "projection" {
          let projected = zip(row(f.u, j), image).reduce(0) { $0 + Double($1.0) * $1.1 }
          #expect(abs(projected - f.s[j]) <= 1e-4 * f.s[0], "feature \(j)")
        } else {
          let expected = apply(tasks32[j / 20], row(f.v, j))
          #expect(norm(zip(image, expected).map { $0 - $1 }) <= 1e-3 * f.s[0], "feature \(j)")
        }
      }
      let reference = try STFMerge.superpose(
        try STFMerge.features(of: tasks64, rank: 20, gramSide: 1), mode: mode, rcond: 1e-6)
      let difference = norm(zip(merged.values, reference.values).map { Double($0) - $1 })
      #expect(difference <= 1e-4 * norm(reference.values), "\(mode)")
    }
  }

  /// The Cholesky route and the eigendecomposition route give the same solution when the system
  /// is well conditioned, and a rank-deficient system goes to the eigendecomposition, whose
  /// minimum-norm solution it must match.
  @Test func choleskyAndEigenRoutesAgree() throws {
    let a = DoubleMatrix(random([30, 20], "spd"))
    let spd = BLAS.gram(a)  // 20 x 20, full rank
    let b = DoubleMatrix(random([20, 3], "rhs"))
    let cholesky = try #require(try LAPACK.wellConditionedCholeskySolve(spd, b, maxCondition: 1e8))
    let viaEigen = BLAS.matmul(try STFMerge.pseudoInverse(spd, rcond: 1e-12), b)
    for (x, y) in zip(cholesky.values, viaEigen.values) { #expect(abs(x - y) <= 1e-9 * max(1, abs(y))) }
    // Rank 5: singular, so Cholesky must decline and the solver must take the pseudo-inverse.
    let low = BLAS.gram(DoubleMatrix(random([5, 20], "low")))
    #expect(try LAPACK.wellConditionedCholeskySolve(low, b, maxCondition: 1e8) == nil)
    let solved = try STFMerge.solve(low, b, rcond: 1e-6)
    let expected = BLAS.matmul(try STFMerge.pseudoInverse(low, rcond: 1e-6), b)
    #expect(solved == expected)
  }
}
