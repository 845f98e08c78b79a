import Foundation
import Testing

@testable import Merge
@testable import Tensor

/// In-memory scans of whole tensors, as the runner gives a model-wide method.
func scans(base: [Tensor], models: [[Tensor]]) -> [TensorScan] {
  base.indices.map { t in
    TensorScan(ranges: MergeRanges.ranges(base[t].count)) { r in
      RangeInputs(offset: r.lowerBound, base: Array(base[t].scalars[r]), models: models.map { Array($0[t].scalars[r]) })
    }
  }
}

/// The official algorithm in float64 over the flattened model: per task, keep |tau| >= the
/// (D - k)-th smallest magnitude (1-based), k = floor(density D); elect sign(sum), the global
/// majority sign where the sum is 0; average the agreeing non-zero entries.
func referenceOfficialTIES(base: [Tensor], models: [[Tensor]], density: Double, lambda: Double) -> [[Double]] {
  let flatBase = base.flatMap(\.scalars)
  let taus = models.map { m in zip(m.flatMap(\.scalars), flatBase).map { Double(Float($0) - Float($1)) } }
  let d = flatBase.count
  let k = Int((density * Double(d)).rounded(.down))
  let trimmed = taus.map { tau -> [Double] in
    guard k < d else { return tau }
    let threshold = tau.map(abs).sorted()[d - k - 1]
    return tau.map { abs($0) >= threshold ? $0 : 0 }
  }
  let sums = (0..<d).map { i in trimmed.reduce(0.0) { $0 + $1[i] } }
  let elected = sums.map { $0 > 0 ? 1.0 : ($0 < 0 ? -1.0 : 0) }
  let total = elected.reduce(0, +)
  let majority = total > 0 ? 1.0 : (total < 0 ? -1.0 : 0)
  let merged = (0..<d).map { i -> Double in
    let sign = elected[i] != 0 ? elected[i] : majority
    let agreeing = trimmed.map { $0[i] }.filter { $0 != 0 && ($0 > 0 ? 1.0 : -1.0) == sign }
    return Double(flatBase[i]) + lambda * agreeing.reduce(0, +) / Double(max(agreeing.count, 1))
  }
  var out: [[Double]] = []
  var start = 0
  for t in base {
    out.append(Array(merged[start..<(start + t.count)]))
    start += t.count
  }
  return out
}

@Suite struct TIESGlobalMergeTests {
  func merged(base: [Tensor], models: [[Tensor]], density: Double, lambda: Double = 1) throws -> [[Float]] {
    let p = try resolve(
      TIESGlobalMerge(), ["density": .number(density), "lambda": .number(lambda)], models: models.map { _ in [:] })
    let method = try TIESGlobalMerge().prepared(scans(base: base, models: models), parameters: p)
    return try base.indices.map { t in
      try method.merge(MergeInputs(name: "t\(t)", base: base[t], models: models.map { $0[t] }), p).scalars
    }
  }

  @Test(arguments: [0.1, 0.2, 0.5, 1.0])
  func matchesTheFloat64ReferenceOverTheWholeModel(_ density: Double) throws {
    let shapes = [[37, 11], [300], [9, 9]]
    let base = shapes.enumerated().map { random($1, "gb\($0)") }
    let models = (0..<3).map { m in
      base.enumerated().map { t, b in
        Tensor(
          shape: b.shape,
          scalars: zip(b.scalars, random(b.shape, "gd\(m).\(t)", scale: 0.02 * Float(t + 1)).scalars).map { $0 + $1 })
      }
    }
    let out = try merged(base: base, models: models, density: density, lambda: 0.9)
    let reference = referenceOfficialTIES(base: base, models: models, density: density, lambda: 0.9)
    for t in base.indices { expectClose(out[t], reference[t], relative: 1e-6) }
  }

  /// The spec's hand examples: (a) a zero sum takes the model-wide majority sign; (b) trimming is
  /// global: a tensor of small changes loses all of them, where per-tensor TIES keeps some.
  @Test func zeroSumsTakeTheMajoritySignAndTrimmingIsGlobal() throws {
    // (a) entries 0-2 elect +, entry 3 has a zero sum (+1 and -1): the majority (+) wins, so
    // the +1 is kept alone; at density 1 nothing is trimmed.
    let base = [Tensor(shape: [4], scalars: [0, 0, 0, 0])]
    let models = [[Tensor(shape: [4], scalars: [1, 2, 3, 1])], [Tensor(shape: [4], scalars: [1, 2, 3, -1])]]
    #expect(try merged(base: base, models: models, density: 1) == [[1, 2, 3, 1]])
    // (b) tensor 0 moves by about 1, tensor 1 by about 0.01: at density 0.5 over 8 entries k = 4,
    // and the official rule keeps |tau| >= the 4th smallest, the 5 largest: all of tensor 0 and
    // only the largest change of tensor 1.
    let base2 = [Tensor(zeros: [4]), Tensor(zeros: [4])]
    let one = [
      [Tensor(shape: [4], scalars: [1, 1.1, 1.2, 1.3]), Tensor(shape: [4], scalars: [0.01, 0.02, 0.03, 0.04])]
    ]
    let out = try merged(base: base2, models: one, density: 0.5)
    #expect(out[0] == [1, 1.1, 1.2, 1.3] && out[1] == [0, 0, 0, 0.04])
    let perTensor = try TaskVectorMerge.ties.merge(
      MergeInputs(name: "w", base: base2[1], models: [one[0][1]]),
      try resolve(TaskVectorMerge.ties, models: [["density": .number(0.5)]]))
    #expect(perTensor.scalars == [0, 0, 0.03, 0.04])
  }

  @Test func unpreparedUseIsRefused() throws {
    let p = try resolve(TIESGlobalMerge(), models: [[:]])
    #expect(throws: MergeError.self) {
      try TIESGlobalMerge().merge(MergeInputs(name: "w", base: Tensor(zeros: [3]), models: [Tensor(zeros: [3])]), p)
    }
  }
}
