import Foundation
import Testing

@testable import Merge
@testable import Tensor

/// DELLA's magnitude-ranked drop: keep rates by rank, L1 rescaling, determinism, and the
/// no-drop limit (task arithmetic) against closed forms.
@Suite struct DELLAMergeTests {
  static let n = 20_000
  /// A task vector whose magnitudes grow with the index (rank = index), on a zero base.
  static let delta = Tensor(shape: [n], scalars: (0..<n).map { Float($0 + 1) * (($0 % 2 == 0) ? 1 : -1) * 1e-4 })
  static let base = Tensor(shape: [n], scalars: [Float](repeating: 0, count: n))

  func della(_ global: [String: ParameterValue], _ perModel: [String: ParameterValue], linear: Bool = true) throws
    -> [Float]
  {
    let method = linear ? DELLAMerge.dellaLinear : DELLAMerge.della
    return try method.merge(
      MergeInputs(name: "w", base: Self.base, models: [Self.delta]), try resolve(method, global, models: [perModel])
    ).scalars
  }

  @Test func keepRatesFollowTheMagnitudeRanks() throws {
    let out = try della(["rescale": .flag(false)], ["density": .number(0.5), "epsilon": .number(0.2)])
    let kept = out.map { $0 != 0 }
    func rate(_ range: Range<Int>) -> Double { Double(range.filter { kept[$0] }.count) / Double(range.count) }
    let tenth = Self.n / 10
    // Probabilities 0.3 + 0.4 r: about 0.32 in the smallest tenth, 0.68 in the largest, 0.5 overall.
    #expect(abs(rate(0..<tenth) - 0.32) < 0.04)
    #expect(abs(rate((Self.n - tenth)..<Self.n) - 0.68) < 0.04)
    #expect(abs(rate(0..<Self.n) - 0.5) < 0.02)
    // Kept entries are unchanged without rescale.
    #expect(zip(out, Self.delta.scalars).allSatisfy { $0 == 0 || $0 == $1 })
  }

  @Test func rescaleKeepsTheL1NormAndSeedsAreReproducible() throws {
    let params: [String: ParameterValue] = ["density": .number(0.4), "epsilon": .number(0.1)]
    let out = try della([:], params)
    let before = Self.delta.scalars.reduce(0.0) { $0 + abs(Double($1)) }
    let after = out.reduce(0.0) { $0 + abs(Double($1)) }
    #expect(abs(after - before) / before < 1e-5)
    #expect(try della([:], params) == out)
    #expect(try della(["seed": .number(1)], params) != out)
  }

  @Test func withoutDropItIsTaskArithmeticOrTIES() throws {
    let a = Tensor(shape: [3], scalars: [1, -2, 3])
    let b = Tensor(shape: [3], scalars: [2, 1, -1])
    let base = Tensor(shape: [3], scalars: [0.5, 0.5, 0.5])
    let weights: [[String: ParameterValue]] = [["weight": .number(0.6)], ["weight": .number(0.4)]]
    let linear = try DELLAMerge.dellaLinear.merge(
      MergeInputs(name: "w", base: base, models: [a, b]), try resolve(DELLAMerge.dellaLinear, [:], models: weights))
    expectClose(
      linear.scalars, (0..<3).map { 0.5 + 0.6 * (Double(a.scalars[$0]) - 0.5) + 0.4 * (Double(b.scalars[$0]) - 0.5) },
      relative: 1e-7)
    // With consensus and normalize: deltas (0.5, -2.5, 2.5) and (1.5, 0.5, -1.5), weighted
    // (0.3, -1.5, 1.5) and (0.6, 0.2, -0.6); elected signs +, -, +; agreeing weights 1, 0.6, 0.6.
    let ties = try DELLAMerge.della.merge(
      MergeInputs(name: "w", base: base, models: [a, b]), try resolve(DELLAMerge.della, [:], models: weights))
    expectClose(ties.scalars, [0.5 + 0.9 / 1.0, 0.5 - 1.5 / 0.6, 0.5 + 1.5 / 0.6], relative: 1e-7)
  }

  @Test func epsilonMustKeepProbabilitiesInsideZeroOne() throws {
    #expect(throws: MergeError.self) { try della([:], ["density": .number(0.9), "epsilon": .number(0.2)]) }
  }
}
