import Testing

@testable import Merge
@testable import Tensor

@Suite struct LinearMergeTests {
  let models = (0..<3).map { random([40, 30], "linear\($0)") }

  @Test func weightedAverageMatchesTheFloat64Reference() throws {
    let weights = [0.2, 0.5, 1.3]
    for normalize in [true, false] {
      let p = try resolve(LinearMerge(), ["normalize": .flag(normalize)], models: weights.map { ["weight": .number($0)] })
      let out = try LinearMerge().merge(MergeInputs(name: "w", base: nil, models: models), p)
      let total = normalize ? weights.reduce(0, +) : 1
      let reference = (0..<out.count).map { i in (0..<3).reduce(0.0) { $0 + weights[$1] * Double(models[$1].scalars[i]) } / total }
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
