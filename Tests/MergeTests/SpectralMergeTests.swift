import Foundation
import Testing

@testable import Merge
@testable import Tensor

/// TSV-M, Iso-C and Iso-CTS against float64 references written from the papers' code with full
/// SVDs (`dgesdd`) and SVD-based polar factors: an independent route from the methods' Gram
/// matrices and eigendecompositions. The base is zero so the merged tensor is `alpha M` itself.
@Suite struct SpectralMergeTests {
  typealias SVDParts = (u: DoubleMatrix, s: [Double], vt: DoubleMatrix)

  func tasks(_ count: Int, _ shape: (Int, Int), _ seed: String) -> [Tensor] {
    (0..<count).map { random([shape.0, shape.1], "\(seed)\($0)", scale: 0.1) }
  }

  func merge(
    _ method: any MergeMethod, _ tasks: [Tensor], _ global: [String: ParameterValue] = [:],
    name: String = "layers.0.mlp.up_proj.weight"
  ) throws -> Tensor {
    let p = try resolve(method, global, models: Array(repeating: [:], count: tasks.count), tensor: name)
    return try method.merge(
      MergeInputs(name: name, base: Tensor(zeros: tasks[0].shape), models: tasks), p)
  }

  func svd(_ a: DoubleMatrix) throws -> SVDParts { try LAPACK.svd(a) }

  /// The first `k` columns of `u`, entries of `s`, rows of `vt`.
  func leading(_ f: SVDParts, _ k: Int) -> SVDParts {
    let u = DoubleMatrix(rows: f.u.rows, columns: k, values: (0..<f.u.rows).flatMap { i in (0..<k).map { f.u[i, $0] } })
    let vt = DoubleMatrix(rows: k, columns: f.vt.columns, values: Array(f.vt.values.prefix(k * f.vt.columns)))
    return (u, Array(f.s.prefix(k)), vt)
  }

  /// Columns side by side.
  func hstack(_ parts: [DoubleMatrix]) -> DoubleMatrix {
    let rows = parts[0].rows
    let columns = parts.reduce(0) { $0 + $1.columns }
    var out = DoubleMatrix(zeros: rows, columns)
    var offset = 0
    for part in parts {
      for i in 0..<rows { for j in 0..<part.columns { out[i, offset + j] = part[i, j] } }
      offset += part.columns
    }
    return out
  }

  /// The nearest matrix with orthonormal columns: `P Qᵀ` from `a = P S Qᵀ`.
  func polar(_ a: DoubleMatrix) throws -> DoubleMatrix {
    let f = try svd(a)
    return BLAS.matmul(f.u, f.vt)
  }

  func sum(_ tasks: [Tensor]) -> DoubleMatrix {
    var out = DoubleMatrix(zeros: tasks[0].shape[0], tasks[0].shape[1])
    for t in tasks { for i in out.values.indices { out.values[i] += Double(t.scalars[i]) } }
    return out
  }

  /// `u diag(s) vᵀ` with `v` given as columns.
  func product(_ u: DoubleMatrix, _ s: [Double], _ v: DoubleMatrix) -> DoubleMatrix {
    var scaled = u
    for i in 0..<u.rows { for j in 0..<s.count { scaled[i, j] *= s[j] } }
    return BLAS.matmul(scaled, v, transposeB: true)
  }

  func tsvReference(_ tasks: [Tensor], fraction: Double? = nil) throws -> DoubleMatrix {
    let r = min(tasks[0].shape[0], tasks[0].shape[1])
    let k = Int((Double(r) * (fraction ?? 1 / Double(tasks.count))).rounded(.down))
    let parts = try tasks.map { leading(try svd(DoubleMatrix($0)), k) }
    let u = try polar(hstack(parts.map(\.u)))
    let v = try polar(hstack(parts.map(\.vt.transposed)))
    return product(u, parts.flatMap(\.s), v)
  }

  func isoCReference(_ tasks: [Tensor]) throws -> DoubleMatrix {
    let f = try svd(sum(tasks))
    let mean = f.s.reduce(0, +) / Double(f.s.count)
    return product(f.u, Array(repeating: mean, count: f.s.count), f.vt.transposed)
  }

  func isoCTSReference(_ tasks: [Tensor], common c: Double) throws -> DoubleMatrix {
    let (m, n) = (tasks[0].shape[0], tasks[0].shape[1])
    let r = min(m, n)
    let t = tasks.count
    var commonCount = Int(Double(r) * c)
    let perTask = Int((Double(r - commonCount) / Double(t)).rounded(.toNearestOrEven))
    commonCount = r - perTask * t
    let common = leading(try svd(sum(tasks)), commonCount)
    var parts: [SVDParts] = []
    for task in tasks {
      let d = DoubleMatrix(task)
      let projected = BLAS.matmul(common.u, BLAS.matmul(common.u, d, transposeA: true))
      var specific = d
      for i in specific.values.indices { specific.values[i] -= projected.values[i] }
      parts.append(leading(try svd(specific), perTask))
    }
    parts.append(common)
    let u = try polar(hstack(parts.map(\.u)))
    let v = try polar(hstack(parts.map(\.vt.transposed)))
    let s = parts.flatMap(\.s)
    let mean = s.reduce(0, +) / Double(r)
    return product(u, Array(repeating: mean, count: s.count), v)
  }

  /// The exact SVD (below 256) and the Gram route (the last shape), tall and wide.
  static let shapes = [(40, 24), (24, 40), (300, 264)]

  @Test(arguments: shapes)
  func tsvMatchesTheReference(_ shape: (Int, Int)) throws {
    let t = tasks(3, shape, "tsv")
    expectClose(try merge(TSVMerge(), t).scalars, try tsvReference(t).values, relative: 1e-5)
    expectClose(
      try merge(TSVMerge(), t, ["task_fraction": .number(0.2), "alpha": .number(1.5)]).scalars,
      try tsvReference(t, fraction: 0.2).values.map { 1.5 * $0 }, relative: 1e-5)
  }

  @Test(arguments: shapes)
  func isoCMatchesTheReferenceAndHasOneSingularValue(_ shape: (Int, Int)) throws {
    let t = tasks(3, shape, "isoc")
    let merged = try merge(IsoCMerge(), t)
    let reference = try isoCReference(t)
    expectClose(merged.scalars, reference.values, relative: 1e-5)
    let s = try svd(DoubleMatrix(merged)).s
    #expect(s.allSatisfy { abs($0 - s[0]) <= 1e-5 * s[0] })
  }

  @Test(arguments: shapes)
  func isoCTSMatchesTheReference(_ shape: (Int, Int)) throws {
    let t = tasks(4, shape, "isocts")
    for c in [0.8, 0.5] {
      let merged = try merge(IsoCTSMerge(), t, ["common_space_fraction": .number(c)])
      expectClose(merged.scalars, try isoCTSReference(t, common: c).values, relative: 1e-5)
      let s = try svd(DoubleMatrix(merged)).s
      #expect(s.allSatisfy { abs($0 - s[0]) <= 1e-5 * s[0] }, "c \(c)")
    }
    // All directions common: Iso-C.
    expectClose(
      try merge(IsoCTSMerge(), t, ["common_space_fraction": .number(1)]).scalars, try isoCReference(t).values,
      relative: 1e-5)
  }

  /// One task at full rank gives the task matrix back.
  @Test func tsvOfOneTaskAtFullRankIsTheTaskMatrix() throws {
    let t = tasks(1, (30, 20), "one")
    expectClose(try merge(TSVMerge(), t).scalars, t[0].scalars.map(Double.init), relative: 1e-6)
  }

  /// Tasks whose features span orthogonal subspaces (orthonormal U and V split between them):
  /// decorrelation changes nothing, so TSV-M is the sum of the task matrices.
  @Test func tsvOfOrthogonalTasksIsTheirSum() throws {
    let (m, n) = (36, 24)
    let u = DoubleMatrix(LAPACK.qr(random([m, 24], "ou")).q)
    let v = DoubleMatrix(LAPACK.qr(random([n, 24], "ov")).q)
    let t: [Tensor] = (0..<3).map { task in
      var d = DoubleMatrix(zeros: m, n)
      for k in 0..<8 {
        let column = 8 * task + k
        let strength = Double(8 - k) * 0.1
        for i in 0..<m { for j in 0..<n { d[i, j] += strength * u[i, column] * v[j, column] } }
      }
      return d.tensor
    }
    expectClose(try merge(TSVMerge(), t).scalars, sum(t).values, relative: 1e-5)
  }

  /// Tensors that are not matrices, and excluded names, take `alpha` times the mean task vector.
  @Test func otherTensorsTakeTheMeanTaskVector() throws {
    let base = random([6, 5], "base")
    let models = (0..<2).map { m in
      Tensor(shape: [6, 5], scalars: zip(base.scalars, random([6, 5], "m\(m)").scalars).map { $0 + 0.1 * $1 })
    }
    for method in [TSVMerge(), IsoCMerge(), IsoCTSMerge()] as [any MergeMethod] {
      for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let p = try resolve(method, ["alpha": .number(2)], models: [[:], [:]], tensor: name)
        let out = try method.merge(MergeInputs(name: name, base: base, models: models), p)
        let expected = (0..<30).map { i in
          Double(base.scalars[i])
            + 2 * (Double(models[0].scalars[i]) + Double(models[1].scalars[i]) - 2 * Double(base.scalars[i])) / 2
        }
        expectClose(out.scalars, expected, relative: 1e-6)
      }
      // An empty pattern makes every 2-D tensor a matrix.
      let p = try resolve(method, ["exclude": .text("")], models: [[:], [:]], tensor: "lm_head.weight")
      let out = try method.merge(MergeInputs(name: "lm_head.weight", base: base, models: models), p)
      #expect(out.scalars != base.scalars)
    }
    #expect(throws: MergeError.self) {
      try resolve(TSVMerge(), ["exclude": .text("(")], models: [[:]], tensor: "w")
    }
  }

  @Test func isoCTSSubspaceSizesFollowTheOfficialRounding() {
    // 384 * 0.8 = 307.2 -> 307; (384 - 307) / 8 = 9.625 -> 10 per task; 384 - 80 = 304 common.
    #expect(IsoCTSMerge.subspaceSizes(side: 384, tasks: 8, commonFraction: 0.8) == (304, 10))
    // 0.5 rounds to even: (10 - 8) / 4 = 0.5 -> 0, so every direction is common.
    #expect(IsoCTSMerge.subspaceSizes(side: 10, tasks: 4, commonFraction: 0.8) == (10, 0))
    // 1.5 rounds to 2, but 2 tasks x 2 > 3 directions: lowered to 1.
    #expect(IsoCTSMerge.subspaceSizes(side: 3, tasks: 2, commonFraction: 0) == (1, 1))
  }
}

extension SpectralMergeTests {
  /// 1-D tensors (norms, biases) take the mean task vector too.
  @Test func vectorsTakeTheMeanTaskVector() throws {
    let base = random([7], "vb")
    let models = (0..<3).map { m in random([7], "v\(m)") }
    for method in [TSVMerge(), IsoCMerge(), IsoCTSMerge()] as [any MergeMethod] {
      let p = try resolve(method, ["alpha": .number(0.5)], models: [[:], [:], [:]], tensor: "model.norm.weight")
      let out = try method.merge(MergeInputs(name: "model.norm.weight", base: base, models: models), p)
      let expected = (0..<7).map { i in
        Double(base.scalars[i]) + 0.5 * models.reduce(0.0) { $0 + Double($1.scalars[i]) - Double(base.scalars[i]) } / 3
      }
      expectClose(out.scalars, expected, relative: 1e-6)
    }
  }
}
