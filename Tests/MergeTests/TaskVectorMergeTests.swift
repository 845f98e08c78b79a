import Foundation
import Testing

@testable import Merge
@testable import Tensor

/// Resolves `method`'s parameters for one tensor from plain dictionaries.
func resolve(
  _ method: any MergeMethod, _ global: [String: ParameterValue] = [:], models: [[String: ParameterValue]],
  tensor: String = "w"
) throws -> ResolvedParameters {
  try ParameterResolver(
    method: method.name, specs: method.parameters, global: global, models: models,
    positions: LayerPositions(layerCount: 0)
  ).resolve(tensor: tensor)
}

func random(_ shape: [Int], _ stream: String, scale: Float = 1) -> Tensor {
  CounterRNG(seed: 11, stream: stream).normalTensor(shape, scale: scale)
}

func expectClose(
  _ a: [Float], _ b: [Double], relative: Double = 1e-6, sourceLocation: SourceLocation = #_sourceLocation
) {
  let scale = max(b.map(abs).max() ?? 0, 1e-30)
  var worst = 0.0
  var first: Int?
  for i in a.indices {
    let d = abs(Double(a[i]) - b[i])
    worst = max(worst, d)
    if d > relative * scale && first == nil { first = i }
  }
  #expect(
    first == nil, "max abs difference \(worst) (relative \(worst / scale)); first failing index \(first ?? -1)",
    sourceLocation: sourceLocation)
}

/// Float64 reference of mergekit's generalized task arithmetic with magnitude sparsification
/// (sort-based top-k, ties toward the lower index), explicit kept entries per model (`keep`:
/// DARE's draws), or none.
func referenceTaskVectors(
  base: [Float], models: [[Float]], weights: [Double], density: Double? = nil, densities: [Double]? = nil,
  gamma: Double? = nil, keep: [[Bool]]? = nil,
  consensus: Bool, normalize: Bool, lambda: Double, rescale: Bool = false
) -> [Double] {
  let n = base.count
  var deltas: [[Double]] = models.map { m in (0..<n).map { Double(m[$0]) - Double(base[$0]) } }
  for t in deltas.indices {
    let d = deltas[t].map { Double(Float($0)) }  // the engine keeps deltas in Float
    var masked = [Double](repeating: 0, count: n)
    if let keep {
      for i in 0..<n where keep[t][i] { masked[i] = d[i] }
    } else if let density = densities?[t] ?? density, density < 1 {
      let order = d.indices.sorted { (abs(d[$0]), -$0) > (abs(d[$1]), -$1) }
      let kept = Int(density * Double(n))
      var top = gamma.map { Int($0 * Double(n)) } ?? 0
      if n - kept - top < 0 { top = n - kept }
      for i in order[top..<(top + kept)] { masked[i] = d[i] }
    } else {
      continue
    }
    if rescale {
      let before = d.reduce(0) { $0 + abs($1) }
      let after = masked.reduce(0) { $0 + abs($1) }
      if before >= 1e-7 && after >= 1e-7 { masked = masked.map { $0 * before / after } }
    }
    deltas[t] = masked
  }
  return (0..<n).map { i in
    var mixed = 0.0
    var divisor = 0.0
    if consensus {
      let total = deltas.indices.reduce(0.0) { $0 + weights[$1] * deltas[$1][i] }
      let elected = total >= 0 ? 1.0 : -1.0
      for t in deltas.indices {
        let d = weights[t] * deltas[t][i]
        if d != 0 && (d > 0) == (elected > 0) {
          mixed += d
          divisor += weights[t]
        }
      }
      if divisor == 0 { divisor = 1 }
    } else {
      for t in deltas.indices {
        mixed += weights[t] * deltas[t][i]
        divisor += weights[t]
      }
      if abs(divisor) < 1e-8 { divisor = 1 }
    }
    return Double(base[i]) + lambda * (normalize ? mixed / divisor : mixed)
  }
}

@Suite struct TaskVectorMergeTests {
  let base = random([64, 47], "base")  // not a multiple of the kernels' chunk
  var models: [Tensor] {
    (0..<3).map { t in
      Tensor(
        shape: [64, 47], scalars: zip(base.scalars, random([64, 47], "delta\(t)", scale: 0.05).scalars).map { $0 + $1 })
    }
  }

  @Test func taskArithmeticMatchesTheFloat64Reference() throws {
    let weights = [0.7, 1.3, -0.4]
    let p = try resolve(
      TaskVectorMerge.taskArithmetic, ["lambda": .number(0.8)], models: weights.map { ["weight": .number($0)] })
    let out = try TaskVectorMerge.taskArithmetic.merge(MergeInputs(name: "w", base: base, models: models), p)
    expectClose(
      out.scalars,
      referenceTaskVectors(
        base: base.scalars, models: models.map(\.scalars), weights: weights, consensus: false, normalize: false,
        lambda: 0.8))
  }

  @Test(arguments: [0.2, 0.5, 1.0])
  func tiesMatchesTheFloat64Reference(_ density: Double) throws {
    let weights = [1.0, 0.5, 2.0]
    let p = try resolve(
      TaskVectorMerge.ties, ["lambda": .number(1.2)],
      models: weights.map { ["weight": .number($0), "density": .number(density)] })
    let out = try TaskVectorMerge.ties.merge(MergeInputs(name: "w", base: base, models: models), p)
    expectClose(
      out.scalars,
      referenceTaskVectors(
        base: base.scalars, models: models.map(\.scalars), weights: weights, density: density, consensus: true,
        normalize: true, lambda: 1.2))
  }

  @Test func breadcrumbsMatchesTheFloat64Reference() throws {
    for method in [TaskVectorMerge.breadcrumbs, .breadcrumbsTies] {
      let p = try resolve(method, models: (0..<3).map { _ in ["density": .number(0.6), "gamma": .number(0.05)] })
      let out = try method.merge(MergeInputs(name: "w", base: base, models: models), p)
      expectClose(
        out.scalars,
        referenceTaskVectors(
          base: base.scalars, models: models.map(\.scalars), weights: [1, 1, 1], density: 0.6, gamma: 0.05,
          consensus: method.consensus, normalize: false, lambda: 1))
    }
  }

  @Test func rescaledMagnitudeTrimKeepsTheL1Norm() throws {
    let engine = TaskVectorMerge.ties
    let p = try resolve(engine, ["rescale": .flag(true)], models: [["density": .number(0.3)]])
    let delta = random([5000], "l1").scalars
    let sparse = try engine.sparsify(delta, model: 0, tensor: "w", p)
    #expect(sparse.filter { $0 != 0 }.count == 1500)
    let before = delta.reduce(0.0) { $0 + Double(abs($1)) }
    let after = sparse.reduce(0.0) { $0 + Double(abs($1)) }
    #expect(abs(after - before) < 1e-4 * before)
  }

  @Test func lambdaZeroAndIdenticalInputsReturnTheBase() throws {
    for method in MergeRegistry.methods.compactMap({ $0 as? TaskVectorMerge }) {
      let zero = try resolve(method, ["lambda": .number(0)], models: (0..<3).map { _ in [:] })
      #expect(
        try method.merge(MergeInputs(name: "w", base: base, models: models), zero).scalars == base.scalars,
        "\(method.name)")
      let same = try resolve(
        method, models: (0..<2).map { _ in ["density": .number(0.5)].filter { _ in method.sparsification != nil } })
      #expect(
        try method.merge(MergeInputs(name: "w", base: base, models: [base, base]), same).scalars == base.scalars,
        "\(method.name)")
    }
  }

  @Test func tiesAtFullDensityWithoutConflictsIsTheMeanTaskVector() throws {
    // All deltas positive: no sign conflict, so TIES = base + lambda * mean(delta).
    let positive = (0..<3).map { t in
      Tensor(
        shape: base.shape,
        scalars: zip(base.scalars, random(base.shape, "pos\(t)").scalars).map { $0 + abs($1) * 0.1 + 0.001 })
    }
    let ties = try TaskVectorMerge.ties.merge(
      MergeInputs(name: "w", base: base, models: positive), try resolve(TaskVectorMerge.ties, models: [[:], [:], [:]]))
    let mean = try TaskVectorMerge.taskArithmetic.merge(
      MergeInputs(name: "w", base: base, models: positive),
      try resolve(TaskVectorMerge.taskArithmetic, ["normalize": .flag(true)], models: [[:], [:], [:]]))
    expectClose(ties.scalars, mean.scalars.map(Double.init), relative: 1e-7)
  }

  @Test func signElectionFollowsMergekitRules() throws {
    // Element 0: weighted sum exactly 0 -> elected +1, only the positive delta counts.
    // Element 1: deltas +1, -3 -> elected -1. Element 2: a zero delta never agrees.
    let base = Tensor(shape: [3], scalars: [0, 0, 0])
    let a = Tensor(shape: [3], scalars: [2, 1, 0])
    let b = Tensor(shape: [3], scalars: [-2, -3, 4])
    let p = try resolve(TaskVectorMerge.ties, models: [[:], [:]])
    let out = try TaskVectorMerge.ties.merge(MergeInputs(name: "w", base: base, models: [a, b]), p)
    #expect(out.scalars == [2, -3, 4])
  }

  @Test func dareAtDensityOneIsTaskArithmetic() throws {
    let dare = try TaskVectorMerge.dareLinear.merge(
      MergeInputs(name: "w", base: base, models: models),
      try resolve(TaskVectorMerge.dareLinear, models: [[:], [:], [:]]))
    let plain = try TaskVectorMerge.taskArithmetic.merge(
      MergeInputs(name: "w", base: base, models: models),
      try resolve(TaskVectorMerge.taskArithmetic, models: [[:], [:], [:]]))
    #expect(dare.scalars == plain.scalars)
  }

  @Test func dareDropsTheRightFractionAndIsUnbiasedAndSeeded() throws {
    let engine = TaskVectorMerge.dareLinear
    let delta = random([4000], "dare", scale: 0.01).scalars
    let p = try resolve(
      engine, ["rescale": .flag(false)], models: [["density": .number(0.3)], ["density": .number(0.3)]])
    let once = try engine.sparsify(delta, model: 0, tensor: "w", p)
    let kept = Double(once.filter { $0 != 0 }.count) / 4000
    #expect(abs(kept - 0.3) < 4 * (0.3 * 0.7 / 4000).squareRoot())
    #expect(try engine.sparsify(delta, model: 0, tensor: "w", p) == once)  // same seed, same draw
    #expect(try engine.sparsify(delta, model: 1, tensor: "w", p) != once)  // other model, other draw
    // With 1/density scaling the mean over seeds approaches the delta.
    let seeds = 400
    var mean = [Double](repeating: 0, count: 200)
    for seed in 0..<seeds {
      let ps = try resolve(
        engine, ["rescale": .flag(false), "seed": .number(Double(seed))], models: [["density": .number(0.3)]])
      let s = try engine.sparsify(Array(delta.prefix(200)), model: 0, tensor: "w", ps)
      for i in 0..<200 { mean[i] += Double(s[i]) / 0.3 / Double(seeds) }
    }
    var outside = 0
    for i in 0..<200 {
      let d = Double(delta[i])
      let standardError = abs(d) * (0.7 / 0.3 / Double(seeds)).squareRoot()
      if abs(mean[i] - d) > 4 * standardError { outside += 1 }
    }
    #expect(outside <= 1)
    // L1 rescale (mergekit's default) keeps the L1 norm exactly.
    let l1 = try engine.sparsify(delta, model: 0, tensor: "w", try resolve(engine, models: [["density": .number(0.3)]]))
    let before = delta.reduce(0.0) { $0 + Double(abs($1)) }
    #expect(abs(l1.reduce(0.0) { $0 + Double(abs($1)) } - before) < 1e-5 * before)
  }

  /// DARE-TIES keeps its draws from the rescale pass for the merge pass only up to a size; a
  /// larger tensor draws again from the same counters, with the same bits.
  @Test func dareTiesDrawsAgainWhenItsDrawsAreNotKept() throws {
    let engine = TaskVectorMerge.dareTies
    let n = MergeRanges.size + 5_000
    let base = random([n], "draws-base").scalars
    let models = (0..<3).map { t in zip(base, random([n], "draws-\(t)", scale: 0.01).scalars).map { $0 + $1 } }
    let p = try resolve(engine, ["seed": .number(7)], models: Array(repeating: ["density": .number(0.4)], count: 3))
    let ranges = MergeRanges.ranges(n)
    @Sendable func slice(_ r: Range<Int>) -> RangeInputs {
      RangeInputs(offset: r.lowerBound, base: Array(base[r]), models: models.map { Array($0[r]) })
    }
    let merged = try [0, Int.max].map { limit -> [Float] in
      let merger = try #require(
        try engine.prepare(
          tensor: "w", count: n, p, scan: TensorScan(ranges: ranges, read: slice), keptDrawsLimit: limit))
      return try ranges.flatMap { try merger.merge(slice($0)) }
    }
    #expect(merged[0] == merged[1])
    #expect(merged[0].count == n && zip(merged[0], base).contains { $0 != $1 })
  }

  @Test func rangesSpanningATensorGiveTheWholeTensorResult() throws {
    // 2 ranges; deltas quantised to multiples of 1/64 so that many magnitudes tie, including
    // across the range boundary: the index-order tie rule must hold over the whole tensor.
    let n = MergeRanges.size + 7_000
    let base = random([n], "long-base")
    let models = (0..<2).map { t in
      Tensor(
        shape: [n], scalars: zip(base.scalars, random([n], "long\(t)").scalars).map { $0 + ($1 * 4).rounded() / 64 })
    }
    for (method, rescale) in [(TaskVectorMerge.ties, false), (.breadcrumbs, true)] {
      let p = try resolve(
        method, ["rescale": .flag(rescale)],
        models: [
          ["density": .number(0.3), "gamma": .number(0.02)], ["density": .number(0.7), "gamma": .number(0.02)],
        ].map { m in m.filter { $0.key != "gamma" || method.sparsification == .magnitudeOutliers } })
      let out = try method.merge(MergeInputs(name: "w", base: base, models: models), p)
      let reference = referenceTaskVectors(
        base: base.scalars, models: models.map(\.scalars), weights: [1, 1], densities: [0.3, 0.7],
        gamma: method.sparsification == .magnitudeOutliers ? 0.02 : nil,
        consensus: method.consensus, normalize: method.defaultNormalize, lambda: 1, rescale: rescale)
      expectClose(out.scalars, reference, relative: 1e-6)
    }
  }

  @Test func breadcrumbsOnATinyTensorWhereOutliersAndKeptFillIt() throws {
    // n = 10, density 0.95 keeps 9, gamma 0.2 would drop 2 outliers: only 1 can go, so the
    // "upper" ranking keeps everything (no passes needed) and the outlier ranking keeps 1.
    let base = Tensor(shape: [10], scalars: [Float](repeating: 0, count: 10))
    let model = Tensor(shape: [10], scalars: (0..<10).map { Float($0 + 1) * 0.1 })
    let p = try resolve(TaskVectorMerge.breadcrumbs, models: [["density": .number(0.95), "gamma": .number(0.2)]])
    let out = try TaskVectorMerge.breadcrumbs.merge(MergeInputs(name: "w", base: base, models: [model]), p)
    #expect(out.scalars == Array(model.scalars.dropLast()) + [0])  // the largest entry is the outlier dropped
  }

  /// Breadcrumbs' keep rule of a range is a band of magnitudes wherever both rankings' kept ties
  /// are settled there (none of the range's threshold-equal entries kept, or all of them), and
  /// that band keeps exactly the entries the rankings' masks keep: on magnitudes with many ties
  /// at both thresholds, over ranges where the ties run out and ranges where they do not.
  @Test func breadcrumbsBandsKeepWhatTheMasksKeep() throws {
    let (n, length) = (12_000, 1_000)
    // Magnitudes in steps of 1/16 up to 6/16: every threshold falls on hundreds of equal keys.
    let delta = random([n], "crumbs").scalars.map { ($0 * 2).rounded() / 16 }
    var plan = TaskVectorMerge.Sparsity()
    plan.rankers = [MagnitudeRanker(keep: 4_000, count: n), MagnitudeRanker(keep: 600, count: n)]
    for r in 0..<2 {
      plan.rankers[r].addHigh(MagnitudeRanker.highCounts(delta))
      plan.rankers[r].finishHigh()
      plan.rankers[r].addLow(plan.rankers[r].lowCounts(delta))
      plan.rankers[r].finishLow()
      #expect(plan.rankers[r].needsTieOrder)
    }
    plan.equalBefore = [[:], [:]]
    plan.equalTotal = [0, 0]
    for r in 0..<2 {
      for offset in stride(from: 0, to: n, by: length) {
        plan.equalBefore[r][offset] = plan.equalTotal[r]
        plan.equalTotal[r] += plan.rankers[r].equalCount(Array(delta[offset..<(offset + length)]))
      }
    }
    var (banded, masked, kept) = (0, 0, 0)
    for offset in stride(from: 0, to: n, by: length) {
      let slice = Array(delta[offset..<(offset + length)])
      let masks = (0..<2).map { plan.rankers[$0].mask(slice, equalBefore: plan.equalBefore[$0][offset] ?? 0) }
      let expected = zip(masks[0], masks[1]).map { $0 && !$1 }
      if case .magnitudes(let band)? = plan.rule(offset: offset, count: length) {
        banded += 1
        #expect(slice.map { band.contains($0.bitPattern & 0x7FFF_FFFF) } == expected, "range at \(offset)")
      } else {
        masked += 1
      }
      #expect(plan.keep(slice, offset: offset) == expected, "range at \(offset)")
      kept += expected.filter { $0 }.count
    }
    #expect(kept == 4_000 - 600)
    #expect(banded >= 8 && masked >= 1)
  }
}
