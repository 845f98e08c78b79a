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

  /// The whole-tensor algorithm, written plainly: per model, rank each row's |delta|, draw,
  /// rescale by the whole tensor's L1 norms, weight; then consensus or sum.
  func reference(base: [Float], models: [[Float]], rowLength: Int, p: ResolvedParameters, consensus: Bool) -> [Double] {
    let n = base.count
    var deltas: [[Double]] = []
    for (m, model) in models.enumerated() {
      let delta = (0..<n).map { Double(model[$0]) - Double(base[$0]) }
      let (density, epsilon) = (p.number("density", model: m), p.number("epsilon", model: m))
      let rng = CounterRNG(seed: UInt64(p.number("seed")), stream: "\(consensus ? "della" : "della-linear")#\(m)")
      var kept = [Double](repeating: 0, count: n)
      for start in stride(from: 0, to: n, by: rowLength) {
        let row = start..<min(n, start + rowLength)
        let order = row.sorted { abs(delta[$0]) < abs(delta[$1]) || (abs(delta[$0]) == abs(delta[$1]) && $0 < $1) }
        for (rank, i) in order.enumerated() {
          let probability = density - epsilon + 2 * epsilon * Double(rank) / Double(max(order.count - 1, 1))
          if Double(rng.uniform(UInt64(i))) < probability { kept[i] = delta[i] }
        }
      }
      let (before, after) = (delta.reduce(0) { $0 + abs($1) }, kept.reduce(0) { $0 + abs($1) })
      deltas.append(kept.map { $0 * before / after * p.number("weight", model: m) })
    }
    let weights = models.indices.map { p.number("weight", model: $0) }
    return (0..<n).map { i in
      var (mixed, divisor) = (0.0, 0.0)
      if consensus {
        let majority: Double = deltas.reduce(0) { $0 + $1[i] } >= 0 ? 1 : -1
        for (d, w) in zip(deltas, weights) where d[i] != 0 && (d[i] > 0 ? 1.0 : -1.0) == majority {
          mixed += d[i]
          divisor += w
        }
        mixed /= divisor == 0 ? 1 : divisor
      } else {
        mixed = deltas.reduce(0) { $0 + $1[i] }
      }
      return Double(base[i]) + mixed
    }
  }

  /// Streamed by rows: with rows that straddle the merge ranges (3 rows of 100,000 against
  /// ranges of 262,144), each range reads the whole rows it touches and gets the whole-tensor
  /// algorithm's result, and the rescale keeps each model's L1 norm. Rows longer than a range
  /// are merged whole.
  @Test(arguments: [true, false])
  func rowsStraddlingRangesMergeAsTheWholeTensor(_ consensus: Bool) throws {
    let method = consensus ? DELLAMerge.della : DELLAMerge.dellaLinear
    let shape = [3, 100_000]
    let n = 300_000
    #expect(n > MergeRanges.size && method.streams(tensor: "w", shape: shape))
    #expect(!method.streams(tensor: "v", shape: [n]))
    let base = random([n], "della-base").scalars
    let models = (0..<2).map { t in zip(base, random([n], "della-\(t)", scale: 0.01).scalars).map { $0 + $1 } }
    let p = try resolve(
      method, ["seed": .number(3)],
      models: [
        ["density": .number(0.5), "epsilon": .number(0.1), "weight": .number(0.7)],
        ["density": .number(0.3), "epsilon": .number(0.2), "weight": .number(0.5)],
      ])
    let out = try method.merge(
      MergeInputs(
        name: "w", base: Tensor(shape: shape, scalars: base), models: models.map { Tensor(shape: shape, scalars: $0) }),
      p)
    let expected = reference(base: base, models: models, rowLength: 100_000, p: p, consensus: consensus)
    #expect(out.shape == shape)
    // The flags drawn in the L1 pass kept for the merge, or drawn again there: the same bits.
    var redrawing = method
    redrawing.keptFlagsBudget = 0
    let redrawn = try redrawing.merge(
      MergeInputs(
        name: "w", base: Tensor(shape: shape, scalars: base), models: models.map { Tensor(shape: shape, scalars: $0) }),
      p)
    #expect(redrawn.scalars.map(\.bitPattern) == out.scalars.map(\.bitPattern))
    // The same kept entries; values to the rounding of the L1 sums' order.
    #expect(zip(out.scalars, base).map { $0 != $1 } == zip(expected, base).map { Float($0) != $1 })
    expectClose(out.scalars, expected, relative: 1e-6)
    // The same values as one row longer than a range: merged whole, ranked once.
    let vector = try method.merge(
      MergeInputs(
        name: "v", base: Tensor(shape: [n], scalars: base), models: models.map { Tensor(shape: [n], scalars: $0) }),
      p)
    let expectedVector = reference(base: base, models: models, rowLength: n, p: p, consensus: consensus)
    #expect(zip(vector.scalars, base).map { $0 != $1 } == zip(expectedVector, base).map { Float($0) != $1 })
    expectClose(vector.scalars, expectedVector, relative: 1e-6)
  }

  @Test func epsilonMustKeepProbabilitiesInsideZeroOne() throws {
    #expect(throws: MergeError.self) { try della([:], ["density": .number(0.9), "epsilon": .number(0.2)]) }
  }

  /// Packed flags appended in blocks of any length read back as the flags in order.
  @Test func packedFlagsAppendAtAnyBitOffset() {
    let rng = CounterRNG(seed: 2, stream: "della-flags")
    var packed = DELLAMerge.PackedFlags()
    var flags: [Bool] = []
    for (b, length) in [64, 1, 63, 100, 0, 200, 7, 128].enumerated() {
      let block = (0..<length).map { rng.bits32(UInt64(1_000 * b + $0)) & 1 == 1 }
      packed.append(Kernels.packBits(block), count: length)
      flags += block
    }
    #expect(packed.count == flags.count)
    let unpacked = packed.withWords { words in
      (0..<flags.count).map { words[$0 / 64] >> UInt64($0 % 64) & 1 == 1 }
    }
    #expect(unpacked == flags)
    // The bits past the last flag are 0.
    let padding = packed.withWords { words in
      words.count * 64 - flags.count == 0 ? 0 : words[words.count - 1] >> UInt64(flags.count % 64)
    }
    #expect(padding == 0)
  }

  /// The block merge's weighing from packed flags, from any first flag (inside a word, across
  /// words), gives each element's `(kept ? delta * before / after : 0) * weight` to the bit.
  @Test func weighingFromPackedFlagsIsWeighingFromFlags() {
    let rng = CounterRNG(seed: 4, stream: "della-weigh")
    let n = 700
    let flags = (0..<n).map { rng.bits32(UInt64($0)) & 1 == 1 }
    let packed = Kernels.packBits(flags)
    let values = (0..<n).map { rng.normal(UInt64(1_000 + $0)) }
    let base = (0..<n).map { rng.normal(UInt64(2_000 + $0)) }
    var drop = DELLAMerge.Drop(density: 0.5, epsilon: 0.1, rng: rng)
    (drop.before, drop.after) = (3.7, 1.9)
    for (first, count) in [(0, n), (70, 300), (63, 2), (128, 64), (5, 0)] {
      let range = first..<first + count
      let expected = range.map { i in
        (flags[i] ? (Double(values[i]) - Double(base[i])) * drop.before / drop.after : 0) * -0.7
      }
      var weighted = [Double](repeating: 0, count: count)
      Array(values[range]).withUnsafeBufferPointer { v in
        Array(base[range]).withUnsafeBufferPointer { b in
          packed.withUnsafeBufferPointer { words in
            weighted.withUnsafeMutableBufferPointer {
              DELLAMerge.weigh(v, minus: b, flags: words, from: first, drop: drop, weight: -0.7, into: $0)
            }
          }
        }
      }
      #expect(weighted.map(\.bitPattern) == expected.map(\.bitPattern), "from \(first), \(count) flags")
      #expect(zip(weighted, flags[range]).allSatisfy { $1 || $0 == 0 })
    }
  }
}
