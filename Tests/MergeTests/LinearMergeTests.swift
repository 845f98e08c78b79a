import Testing

@testable import Merge
@testable import Tensor

@Suite struct LinearMergeTests {
  let models = (0..<3).map { random([40, 30], "linear\($0)") }

  @Test func weightedAverageMatchesTheFloat64Reference() throws {
    let weights = [0.2, 0.5, 1.3]
    for normalize in [true, false] {
      let p = try resolve(
        LinearMerge(), ["normalize": .flag(normalize)], models: weights.map { ["weight": .number($0)] })
      let out = try LinearMerge().merge(MergeInputs(name: "w", base: nil, models: models), p)
      let total = normalize ? weights.reduce(0, +) : 1
      let reference = (0..<out.count).map { i in
        (0..<3).reduce(0.0) { $0 + weights[$1] * Double(models[$1].scalars[i]) } / total
      }
      expectClose(out.scalars, reference)
    }
  }

  @Test func identicalInputsReturnTheInput() throws {
    let p = try resolve(LinearMerge(), models: [[:], [:], [:]])
    let out = try LinearMerge().merge(MergeInputs(name: "w", base: nil, models: [models[0], models[0], models[0]]), p)
    expectClose(out.scalars, models[0].scalars.map(Double.init), relative: 1e-7)
  }

  @Test func weightsSummingToZeroAreAnError() throws {
    let p = try resolve(LinearMerge(), models: [["weight": .number(1)], ["weight": .number(-1)]])
    #expect(throws: MergeError.zeroWeightSum(method: "linear", tensor: "w")) {
      try LinearMerge().merge(MergeInputs(name: "w", base: nil, models: [models[0], models[1]]), p)
    }
  }
}

/// Model Stock in float64 over `indices` of the tensors: t = N cos / (1 + (N - 1) cos) from the
/// mean pairwise cosine of the task vectors, then t * mean(models) + (1 - t) * base.
func referenceModelStock(base: Tensor, models: [Tensor], indices: Range<Int>? = nil) -> (t: Double, merged: [Double]) {
  let indices = indices ?? 0..<base.count
  let n = models.count
  let deltas = models.map { m in indices.map { Double(m.scalars[$0]) - Double(base.scalars[$0]) } }
  func dot(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } }
  var cosines: [Double] = []
  for i in 0..<n {
    for j in (i + 1)..<n {
      cosines.append(dot(deltas[i], deltas[j]) / (dot(deltas[i], deltas[i]) * dot(deltas[j], deltas[j])).squareRoot())
    }
  }
  let cosine = cosines.reduce(0, +) / Double(cosines.count)
  let t = Double(n) * cosine / (1 + Double(n - 1) * cosine)
  return (
    t,
    indices.map { i in
      t * models.reduce(0.0) { $0 + Double($1.scalars[i]) } / Double(n) + (1 - t) * Double(base.scalars[i])
    }
  )
}

@Suite struct ModelStockMergeTests {
  @Test func matchesTheFloat64Formula() throws {
    let base = random([50, 40], "ms-base")
    let models = (0..<3).map { t in
      Tensor(
        shape: base.shape,
        scalars: zip(base.scalars, random(base.shape, "ms\(t)", scale: 0.1).scalars).map { $0 + $1 + 0.02 })
    }
    let out = try ModelStockMerge().merge(
      MergeInputs(name: "w", base: base, models: models), try resolve(ModelStockMerge(), models: [[:], [:], [:]]))
    let (t, reference) = referenceModelStock(base: base, models: models)
    #expect(t > 0.05 && t < 0.95)  // the shared offset makes the task vectors partly aligned
    expectClose(out.scalars, reference)
  }

  /// `filter_wise`: one cosine and one t per row (the last dimension), as mergekit; a 1-D
  /// tensor is a single row, so it matches the tensor-wise result.
  @Test func filterWiseUsesOneFactorPerRow() throws {
    let base = random([6, 25], "fw-base")
    let models = (0..<3).map { t in
      Tensor(
        shape: base.shape,
        scalars: zip(base.scalars, random(base.shape, "fw\(t)", scale: 0.1).scalars).enumerated().map {
          $1.0 + $1.1 + 0.01 * Float($0 / 25)
        })
    }
    let p = try resolve(ModelStockMerge(), ["filter_wise": .flag(true)], models: [[:], [:], [:]])
    let out = try ModelStockMerge().merge(MergeInputs(name: "w", base: base, models: models), p)
    let reference = (0..<6).flatMap { row in
      referenceModelStock(base: base, models: models, indices: (row * 25)..<((row + 1) * 25)).merged
    }
    expectClose(out.scalars, reference)
    // Rows get different factors, so the result differs from the tensor-wise one.
    let whole = try ModelStockMerge().merge(
      MergeInputs(name: "w", base: base, models: models), try resolve(ModelStockMerge(), models: [[:], [:], [:]]))
    #expect(whole.scalars != out.scalars)
    let vector = Tensor(shape: [25], scalars: Array(base.scalars[0..<25]))
    let vectors = models.map { Tensor(shape: [25], scalars: Array($0.scalars[0..<25])) }
    #expect(
      try ModelStockMerge().merge(MergeInputs(name: "b", base: vector, models: vectors), p).scalars
        == ModelStockMerge().merge(
          MergeInputs(name: "b", base: vector, models: vectors),
          try resolve(ModelStockMerge(), models: [[:], [:], [:]])
        ).scalars)
  }

  @Test func identicalModelsGiveThatModel() throws {
    let base = random([30], "msb")
    let model = Tensor(shape: [30], scalars: base.scalars.map { $0 + 0.5 })
    let out = try ModelStockMerge().merge(
      MergeInputs(name: "w", base: base, models: [model, model]), try resolve(ModelStockMerge(), models: [[:], [:]]))
    expectClose(out.scalars, model.scalars.map(Double.init), relative: 1e-6)  // cos = 1 gives t = 1
  }
}
