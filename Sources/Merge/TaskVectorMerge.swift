import Tensor

/// The task-vector engine behind task arithmetic, TIES, DARE and breadcrumbs: per tensor,
/// `delta_i = model_i - base`; each delta is sparsified (by magnitude, at random, or by magnitude
/// without outliers) and optionally rescaled to keep its L1 norm; deltas are weighted; a sign
/// consensus (TIES) keeps per element only the deltas agreeing with the sign of the weighted sum;
/// the result is summed, optionally divided by the summed weights, scaled by `lambda`, and added
/// to the base. Semantics and defaults follow mergekit's generalized task arithmetic, so a
/// mergekit config gives the same result (up to rounding: we compute in Float with Double sums
/// and round once; with `MergeArithmetic.rounded`, each step is rounded as mergekit's torch
/// operations round it in the compute dtype, `combineRounded`).
public struct TaskVectorMerge: StreamingMerge {
  public enum Sparsification: Sendable {
    /// Keep the `density` fraction of largest |delta| (exactly k = floor(density * n)).
    case magnitude
    /// Keep each element with probability `density` (DARE), from a counter-based generator
    /// keyed by `seed`, tensor name and model index.
    case random
    /// Drop the `gamma` fraction of largest |delta|, then the smallest, to keep `density` (breadcrumbs).
    case magnitudeOutliers
  }

  public let name: String
  public let summary: String
  public let reference: String
  public let sparsification: Sparsification?
  public let consensus: Bool
  public let defaultNormalize: Bool
  public let defaultRescale: Bool

  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }

  public var parameters: [ParameterSpec] {
    var specs: [ParameterSpec] = [
      .number("weight", .perModel, default: 1, help: "scale of each model's task vector"),
      .number("lambda", .global, default: 1, help: "scale of the merged task vector"),
      .flag(
        "normalize", default: defaultNormalize,
        help: "divide by the sum of the weights (of the agreeing models, with consensus)"),
    ]
    if let sparsification {
      specs.append(
        .number(
          "density", .perModel, in: 0...1, openBelow: true, default: 1,
          help: "fraction of each task vector's entries to keep, in (0, 1]"))
      specs.append(
        .flag("rescale", default: defaultRescale, help: "rescale each sparsified task vector to its original L1 norm"))
      if sparsification == .magnitudeOutliers {
        specs.append(
          .number(
            "gamma", .perModel, in: 0...1, default: 0.01,
            help: "fraction of the largest-magnitude entries removed as outliers"))
      }
      if sparsification == .random {
        specs.append(
          .number(
            "seed", .global, in: 0...9.007_199_254_740_992e15, default: 0,
            help: "random seed; the same seed gives the same output on any machine"))
      }
    }
    return specs
  }

  public static let taskArithmetic = TaskVectorMerge(
    name: "task-arithmetic", summary: "base + lambda * sum of weight_i * (model_i - base)",
    reference: "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    sparsification: nil, consensus: false, defaultNormalize: false, defaultRescale: false)
  public static let ties = TaskVectorMerge(
    name: "ties", summary: "trim task vectors to the largest entries, elect signs, average the agreeing entries",
    reference: "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)",
    sparsification: .magnitude, consensus: true, defaultNormalize: true, defaultRescale: false)
  public static let dareLinear = TaskVectorMerge(
    name: "dare-linear", summary: "drop task-vector entries at random and rescale, then task arithmetic",
    reference: "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
    sparsification: .random, consensus: false, defaultNormalize: false, defaultRescale: true)
  public static let dareTies = TaskVectorMerge(
    name: "dare-ties", summary: "DARE's random drop and rescale, then TIES sign consensus",
    reference: "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
    sparsification: .random, consensus: true, defaultNormalize: false, defaultRescale: true)
  public static let breadcrumbs = TaskVectorMerge(
    name: "breadcrumbs",
    summary: "drop the largest outliers and the smallest entries of each task vector, then task arithmetic",
    reference: "Davari and Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795)",
    sparsification: .magnitudeOutliers, consensus: false, defaultNormalize: false, defaultRescale: false)
  public static let breadcrumbsTies = TaskVectorMerge(
    name: "breadcrumbs-ties", summary: "breadcrumbs sparsification with TIES sign consensus",
    reference: "Davari and Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795)",
    sparsification: .magnitudeOutliers, consensus: true, defaultNormalize: false, defaultRescale: false)

  public var readsTaskVectors: Bool { true }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard inputs.base != nil else { throw MergeError.baseRequired(method: name) }
    return try mergeThroughRanges(inputs, p)
  }

  /// How one model's task vector is sparsified on this tensor.
  struct Sparsity: Sendable {
    /// Magnitude rankers: keep `rankers[0]`'s top entries minus `rankers[1]`'s (outliers).
    var rankers: [MagnitudeRanker] = []
    /// Random keep probability (DARE), with the model's generator.
    var random: (density: Float, rng: CounterRNG)?
    /// Count of threshold-equal elements before each range, per ranker (keyed by range offset).
    var equalBefore: [[Int: Int]] = []
    /// Count of threshold-equal elements in the whole tensor, per ranker (when tie order matters).
    var equalTotal: [Int] = []
    /// L1 rescale factor (1 when not rescaling).
    var scale = 1.0

    var isIdentity: Bool { rankers.isEmpty && random == nil }

    /// The kept entries of one range as a rule: a band of magnitudes when the thresholds need no
    /// tie order (no mask to build), else the mask.
    func rule(_ delta: [Float], offset: Int) -> Kernels.KeepRule {
      rule(offset: offset, count: delta.count) ?? keep(delta, offset: offset).map { .mask($0) } ?? .all
    }

    /// The keep rule of the range of `count` elements at `offset` when it needs no deltas (a
    /// band of magnitudes, or all); nil when it does (DARE's draws, or the range where the kept
    /// ties at a threshold run out).
    func rule(offset: Int, count: Int) -> Kernels.KeepRule? {
      guard random == nil else { return nil }
      if rankers.isEmpty { return .all }
      if rankers.count == 1 { return keptBand(0, offset: offset, count: count).map { .magnitudes($0) } }
      if rankers.count == 2, let upper = keptBand(0, offset: offset, count: count),
        let outliers = keptBand(1, offset: offset, count: count)
      {
        // Kept by the first and not among the outliers: below the outliers' lowest kept key.
        guard outliers.lowerBound <= 0x7FFF_FFFF else { return .magnitudes(upper) }
        guard outliers.lowerBound > upper.lowerBound else { return .magnitudes(Self.noKeys) }
        return .magnitudes(upper.lowerBound...(outliers.lowerBound - 1))
      }
      return nil
    }

    /// The band of magnitude keys that selects nothing (every key is below 2^31).
    static let noKeys: ClosedRange<UInt32> = 0x8000_0000...0x8000_0000

    /// The magnitude keys ranker `r` keeps in the range of `count` elements at `offset`, as a
    /// band `low...0x7FFF_FFFF` (or `noKeys`), when they form one there: always when no tie
    /// order is needed; with ties ordered by index, in every range but the one where the kept
    /// ties at the threshold run out (that one needs a mask: nil).
    func keptBand(_ r: Int, offset: Int, count: Int) -> ClosedRange<UInt32>? {
      if let kept = rankers[r].keptKeys { return kept }
      let (key, allowed) = rankers[r].threshold
      let before = equalBefore[r][offset] ?? 0
      let after = equalBefore[r][offset + count] ?? equalTotal[r]
      if before >= allowed { return key < 0x7FFF_FFFF ? (key + 1)...0x7FFF_FFFF : Self.noKeys }
      if after <= allowed { return key...0x7FFF_FFFF }
      return nil
    }

    /// The kept entries of one range.
    func keep(_ delta: [Float], offset: Int) -> [Bool]? {
      if let (density, rng) = random {
        return Kernels.randomKeep(delta.count, offset: offset, rng: rng, density: density)
      }
      guard !rankers.isEmpty else { return nil }
      if case .magnitudes(let band)? = rule(offset: offset, count: delta.count) {
        return Kernels.magnitudeMask(delta, band: band)
      }
      let upper = rankers[0].mask(delta, equalBefore: equalBefore[0][offset] ?? 0)
      guard rankers.count > 1 else { return upper }
      let outliers = rankers[1].mask(delta, equalBefore: equalBefore[1][offset] ?? 0)
      return Kernels.andNot(upper, outliers)
    }
  }

  /// Reads the tensor in as many passes as its sparsification needs (none for task arithmetic):
  /// magnitude thresholds take two histogram passes, and a pass counting ties in index order
  /// when some elements equal to a threshold are dropped;
  /// L1 rescaling sums |delta| before and after the drop. Then every range merges alone.
  public func prepare(tensor name: String, count n: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    try prepare(tensor: name, count: n, p, scan: scan, keptDrawsLimit: Self.keptDrawsLimit)
  }

  /// The most bytes of DARE draws (a bit per element and model) kept from the rescale pass for
  /// the merge pass: 32 MiB, 89M elements with 3 models. A larger tensor (a 128k-token
  /// vocabulary's embedding) draws again in the merge pass, the same draws from the same
  /// counters, so that memory stays flat in model size.
  static let keptDrawsLimit = 32 << 20

  /// `prepare`, keeping DARE's draws for the merge pass when they take at most `keptDrawsLimit`
  /// bytes.
  func prepare(tensor name: String, count n: Int, _ p: ResolvedParameters, scan: TensorScan, keptDrawsLimit: Int)
    throws -> RangeMerger?
  {
    let models = p.models.count
    var plans = [Sparsity](repeating: Sparsity(), count: models)
    if let sparsification {
      for m in 0..<models {
        let density = p.number("density", model: m)
        guard density < 1 else { continue }
        let kept = Int(density * Double(n))
        switch sparsification {
        case .magnitude:
          // mergekit keeps at least one element of a non-empty tensor.
          plans[m].rankers = [MagnitudeRanker(keep: max(kept, min(n, 1)), count: n)]
        case .magnitudeOutliers:
          var top = Int(p.number("gamma", model: m) * Double(n))
          if n - kept - top < 0 { top = n - kept }
          plans[m].rankers = [MagnitudeRanker(keep: top + kept, count: n), MagnitudeRanker(keep: top, count: n)]
        case .random:
          plans[m].random = (Float(density), CounterRNG(seed: UInt64(p.number("seed")), stream: "\(name)#\(m)"))
        }
        plans[m].equalBefore = Array(repeating: [:], count: plans[m].rankers.count)
        plans[m].equalTotal = Array(repeating: 0, count: plans[m].rankers.count)
      }
    }
    let rescale = sparsification != nil && p.flag("rescale") && plans.contains { !$0.isIdentity }
    let arithmetic = p.arithmetic
    @Sendable func deltas(_ range: RangeInputs) throws -> [[Float]] {
      try range.modelsMinusBase(method: self.name).map(arithmetic.round)
    }
    // The rankers that need passes, as (model, ranker) pairs; each pass summarises every range
    // for all of them at once.
    var ranked = plans.indices.flatMap { m in
      plans[m].rankers.indices.filter { plans[m].rankers[$0].needsPasses }.map { (m, $0) }
    }
    if !ranked.isEmpty {
      // One pass, bracketed by a sample; the rankers it cannot settle take the passes below.
      ranked = try bracketedThresholds(
        ranked, &plans, count: n, scan: scan, deltas: deltas, storedDeltas: !arithmetic.isRounded)
    }
    if !ranked.isEmpty {
      try scan.pass { range in
        let d = try deltas(range)
        return ranked.map { m, _ in MagnitudeRanker.highCounts(d[m]) }
      } combine: { counts in
        for (k, (m, r)) in ranked.enumerated() { plans[m].rankers[r].addHigh(counts[k]) }
      }
      for (m, r) in ranked { plans[m].rankers[r].finishHigh() }
      var rankers = plans
      try scan.pass { range in
        let d = try deltas(range)
        return ranked.map { m, r in rankers[m].rankers[r].lowCounts(d[m]) }
      } combine: { counts in
        for (k, (m, r)) in ranked.enumerated() { plans[m].rankers[r].addLow(counts[k]) }
      }
      for (m, r) in ranked { plans[m].rankers[r].finishLow() }
      rankers = plans
      let tied = ranked.filter { m, r in plans[m].rankers[r].needsTieOrder }
      var running = [Int](repeating: 0, count: tied.count)
      if !tied.isEmpty {
        try scan.pass { range in
          let d = try deltas(range)
          return (range.offset, tied.map { m, r in rankers[m].rankers[r].equalCount(d[m]) })
        } combine: { offset, equal in
          for (k, (m, r)) in tied.enumerated() {
            plans[m].equalBefore[r][offset] = running[k]
            running[k] += equal[k]
          }
        }
        for (k, (m, r)) in tied.enumerated() { plans[m].equalTotal[r] = running[k] }
      }
    }
    // DARE's random masks, drawn once in the rescale pass and kept for the merge (packed: a bit
    // per element and model), by range offset.
    var drawnMasks: [Int: [[UInt64]?]] = [:]
    let mergesChunkwise = !arithmetic.isRounded
    let keepsDraws = mergesChunkwise && models * ((n + 63) / 64) * 8 <= keptDrawsLimit
    if rescale {
      var before = [Double](repeating: 0, count: models)
      var after = [Double](repeating: 0, count: models)
      let sparsity = plans
      /// Model m's two L1 sums over a range (and DARE's draws, packed, when the merge keeps them):
      /// `storedSums` sums the stored differences under given draws, `delta` forms the range's
      /// task vector where a rule needs its values.
      func sums(
        _ m: Int, offset: Int, count: Int, delta: () -> [Float], storedSums: (([UInt64]) -> (Double, Double))?
      ) -> (Double, Double, [UInt64]?) {
        if let (density, rng) = sparsity[m].random {
          // DARE's draws go straight into packed bits, kept for the merge pass when it uses them.
          let bits = Kernels.randomKeepBits(count, offset: offset, rng: rng, density: density)
          let (all, kept) = storedSums?(bits) ?? Kernels.absoluteSums(delta(), keepBits: bits)
          return (all, kept, keepsDraws ? bits : nil)
        }
        let d = delta()
        guard let keep = sparsity[m].keep(d, offset: offset) else { return (0, 0, nil) }
        return (Kernels.absoluteSum(d), Kernels.absoluteSum(d, keep: keep), nil)
      }
      let combine = { (offset: Int, sums: [(Double, Double, [UInt64]?)]) in
        for m in 0..<models {
          before[m] += sums[m].0
          after[m] += sums[m].1
        }
        if sums.contains(where: { $0.2 != nil }) { drawnMasks[offset] = sums.map(\.2) }
      }
      if arithmetic.isRounded {
        try scan.pass(
          { range in
            let d = try deltas(range)
            return (
              range.offset,
              (0..<models).map { m in sums(m, offset: range.offset, count: d[m].count, delta: { d[m] }, storedSums: nil)
              }
            )
          }, combine: combine)
      } else {
        // From the stored bytes: DARE's sums form each difference in a register (BF16 inputs).
        try scan.storedPass(
          { inputs, elements in
            guard inputs.count == models + 1 else { throw MergeError.baseRequired(method: self.name) }
            let taskVectors = StoredTaskVectors(inputs, count: elements.count)
            return (
              elements.lowerBound,
              (0..<models).map { m in
                sums(
                  m, offset: elements.lowerBound, count: elements.count, delta: { taskVectors.model(m) },
                  storedSums: { bits in
                    Kernels.absoluteSums(
                      differenceOf: inputs[1 + m], minus: inputs[0], count: elements.count, keepBits: bits)
                  })
              }
            )
          }, combine: combine)
      }
      for m in 0..<models {
        // mergekit's norms and their ratio are tensors of the compute dtype.
        let (b, a) =
          arithmetic.isRounded
          ? (Double(arithmetic.round(before[m])), Double(arithmetic.round(after[m]))) : (before[m], after[m])
        guard b >= 1e-7 && a >= 1e-7 else { continue }
        plans[m].scale = arithmetic.isRounded ? Double(arithmetic.round(Float(b) / Float(a))) : b / a
      }
    }
    let sparsity = plans
    if !consensus && plans.allSatisfy(\.isIdentity) && !arithmetic.isRounded {
      // Task arithmetic: base + scale * sum_t w_t (model_t - base), `linearWeights`' sum.
      let (weights, scale) = linearWeights(p)
      return RangeMerger(
        WeightedSumForm(
          method: name, terms: WeightedSumForm.models(models), weights: weights, scale: scale, addsBase: true,
          subtractsBase: true))
    }
    if mergesChunkwise {
      // The kept entries are formed chunk by chunk inside the consensus merge: with the sign
      // election (TIES-style), or without it for the sparsified task arithmetic (breadcrumbs,
      // DARE): the weighted sum of the kept deltas, the weights' sum folded into the scale.
      let (weights, scale) = linearWeights(p)
      let (lambda, normalize, elect) =
        consensus ? (p.number("lambda"), p.flag("normalize"), true) : (scale, false, false)
      let drawn = drawnMasks
      let scales = sparsity.map(\.scale)
      return RangeMerger { range in
        let d = try deltas(range)
        guard let base = range.base else { throw MergeError.baseRequired(method: self.name) }
        let kept = drawn[range.offset]
        return Kernels.sparseConsensusMerge(
          base: base, deltas: d,
          keep: d.indices.map { m in
            kept?[m].map { .bits($0) } ?? sparsity[m].rule(d[m], offset: range.offset)
          },
          scales: scales, weights: weights, lambda: lambda, normalize: normalize, elect: elect)
      } stored: { inputs, elements, dtype in
        // The deltas formed chunk by chunk from the stored bytes. A model whose rule needs its
        // deltas (the range where the kept ties at a threshold run out, DARE's draws of a large
        // tensor) gets them formed once here, as `deltas` would, for its mask, packed to bits.
        guard inputs.count == models + 1 else { throw MergeError.baseRequired(method: self.name) }
        let kept = drawn[elements.lowerBound]
        var rules: [Kernels.KeepRule] = []
        let taskVectors = StoredTaskVectors(inputs, count: elements.count)
        for m in 0..<models {
          if let rule = kept?[m].map({ .bits($0) })
            ?? sparsity[m].rule(offset: elements.lowerBound, count: elements.count)
          {
            rules.append(rule)
            continue
          }
          let delta = taskVectors.model(m)
          rules.append(sparsity[m].keep(delta, offset: elements.lowerBound).map { .bits(Kernels.packBits($0)) } ?? .all)
        }
        return TensorData(dtype: dtype, count: elements.count) { out in
          Kernels.sparseConsensusMerge(
            base: inputs[0], models: Array(inputs.dropFirst()), count: elements.count, keep: rules, scales: scales,
            weights: weights, lambda: lambda, normalize: normalize, elect: elect, into: out, as: dtype)
        }
      }
    }
    // Only mergekit's narrow compute dtypes get here: every operation rounded as torch rounds it.
    return RangeMerger { range in
      let sparse: [[Float]] = try deltas(range).enumerated().map { m, delta in
        guard let keep = sparsity[m].keep(delta, offset: range.offset) else { return delta }
        return arithmetic.round(Kernels.masked(delta, keep: keep, scale: sparsity[m].scale))
      }
      guard let base = range.base else { throw MergeError.baseRequired(method: self.name) }
      return self.combineRounded(base: base, deltas: sparse, p)
    }
  }

  /// Settles the magnitude thresholds of `ranked` (model, ranker) pairs in one pass over the
  /// tensor (`MagnitudeBracket`): a sample of every model's task vector, 64 neighbouring
  /// elements at a time at evenly spaced places (about n / 256 values, 2^16 to 2^20), brackets
  /// each threshold; the pass keeps the keys inside the brackets. Returns the pairs it could not
  /// settle (their threshold fell outside the bracket, or the bracket held more than n / 32 keys),
  /// which need the ranker's own passes.
  func bracketedThresholds(
    _ ranked: [(Int, Int)], _ plans: inout [Sparsity], count n: Int, scan: TensorScan,
    deltas: (RangeInputs) throws -> [[Float]], storedDeltas: Bool
  ) throws -> [(Int, Int)] {
    var samples = [[Float]](repeating: [], count: plans.count)
    let models = plans.count
    // Each sampled model once, also when two of its rankers take the pass (breadcrumbs).
    let sampled = Array(Set(ranked.map(\.0))).sorted()
    try scan.sampleBlocks(
      count: n,
      produce: { batchStarts, length -> [[Float]] in
        var part = [[Float]](repeating: [], count: models)
        // The batch's blocks copied from every input in one go, their differences formed from
        // the stored bytes: a short read costs a copy, not a range's bookkeeping.
        if storedDeltas,
          let values = try scan.withStoredBlocks(
            batchStarts, length: length,
            { inputs -> [[Float]] in
              guard inputs.count == models + 1 else { throw MergeError.baseRequired(method: self.name) }
              let taskVectors = StoredTaskVectors(inputs, count: batchStarts.count * length)
              return sampled.map { taskVectors.model($0) }
            })
        {
          for (m, sample) in zip(sampled, values) { part[m] = sample }
          return part
        }
        for start in batchStarts {
          let d = try deltas(try scan.read(start..<(start + length)))
          for m in sampled { part[m] += d[m] }
        }
        return part
      },
      consume: { part in
        for m in sampled { samples[m] += part[m] }
      })
    // Each pair's bracket, and below its settlement, side by side: the other cores would idle.
    let keeps = ranked.map { m, r in plans[m].rankers[r].keep }
    let brackets = try Parallel.map(ranked.count) { k in
      MagnitudeBracket(keep: keeps[k], count: n, sample: samples[ranked[k].0], budget: max(1 << 18, n / 32))
    }
    var summaries = [[MagnitudeBracket.Summary]](repeating: [], count: ranked.count)
    var offsets: [Int] = []
    let combine = { (offset: Int, parts: [MagnitudeBracket.Summary?]) in
      offsets.append(offset)
      for k in ranked.indices { if let part = parts[k] { summaries[k].append(part) } }
    }
    if storedDeltas {
      // The differences formed from the stored bytes inside the summary's loops.
      try scan.storedPass(
        { inputs, elements in
          guard inputs.count == plans.count + 1 else { throw MergeError.baseRequired(method: self.name) }
          return (
            elements.lowerBound,
            ranked.indices.map { k in
              brackets[k]?.summarize(differenceOf: inputs[1 + ranked[k].0], minus: inputs[0], count: elements.count)
            }
          )
        }, combine: combine)
    } else {
      try scan.pass(
        { range in
          let d = try deltas(range)
          return (range.offset, ranked.indices.map { k in brackets[k]?.summarize(d[ranked[k].0]) })
        }, combine: combine)
    }
    let settled = try Parallel.map(ranked.count) { k in brackets[k]?.ranker(summaries[k]) }
    var unsettled: [(Int, Int)] = []
    for (k, (m, r)) in ranked.enumerated() {
      guard let (ranker, before, total) = settled[k] else {
        unsettled.append((m, r))
        continue
      }
      plans[m].rankers[r] = ranker
      plans[m].equalBefore[r] = Dictionary(uniqueKeysWithValues: zip(offsets, before))
      plans[m].equalTotal[r] = total
    }
    return unsettled
  }

  /// The weighted sum of the (sparsified) deltas, with TIES's sign consensus when enabled,
  /// scaled and added to the base, as mergekit computes it in a narrow dtype, each torch
  /// operation rounded: the weights are cast to the dtype; each delta is multiplied by its
  /// weight; the sign election sums the weighted deltas; the kept deltas and the divisor (the
  /// kept weights, or all) are summed in float and rounded; then the division, the scaling by
  /// lambda and the addition to the base are each rounded.
  func combineRounded(base: [Float], deltas: [[Float]], _ p: ResolvedParameters) -> [Float] {
    let r = p.arithmetic
    return r.withRule(
      RoundedConsensus(
        base: base, deltas: deltas, weights: deltas.indices.map { r.round(Float(p.number("weight", model: $0))) },
        lambda: Float(p.number("lambda")), normalize: p.flag("normalize"), elect: consensus))
  }

  /// The weights and overall scale of the non-consensus sum: lambda, over the weights' sum when
  /// normalising (a sum near 0 counts as 1).
  func linearWeights(_ p: ResolvedParameters) -> (weights: [Double], scale: Double) {
    let weights = p.models.indices.map { p.number("weight", model: $0) }
    let lambda = p.number("lambda")
    var divisor = weights.reduce(0, +)
    if abs(divisor) < 1e-8 { divisor = 1 }
    return (weights, p.flag("normalize") ? lambda / divisor : lambda)
  }

  /// One model's task vector after sparsification and rescaling, whole (for tests and tools).
  func sparsify(_ delta: [Float], model: Int, tensor: String, _ p: ResolvedParameters) throws -> [Float] {
    var parameters = p
    for m in parameters.models.indices where m != model { parameters.models[m]["density"] = .number(1) }
    let zero = [Float](repeating: 0, count: delta.count)
    let models = parameters.models.indices.map { $0 == model ? delta : zero }
    var single = parameters
    single.global["lambda"] = .number(1)
    single.global["normalize"] = .flag(false)
    for m in single.models.indices { single.models[m]["weight"] = .number(m == model ? 1 : 0) }
    let inputs = MergeInputs(
      name: tensor, base: Tensor(shape: [delta.count], scalars: zero),
      models: models.map { Tensor(shape: [delta.count], scalars: $0) })
    return try merge(inputs, single).scalars
  }
}

/// The task vectors of one range's stored elements (`TensorScan.StoredReader`'s order: the
/// base, then the models), formed on demand as `RangeInputs.modelsMinusBase` forms them, for the
/// rules that need a model's values; the base is decoded once, on first use.
final class StoredTaskVectors {
  private let inputs: [Kernels.StoredElements]
  private let count: Int
  private var base: [Float]?

  init(_ inputs: [Kernels.StoredElements], count: Int) {
    self.inputs = inputs
    self.count = count
  }

  /// Model `m` minus the base, rounded to `Float`.
  func model(_ m: Int) -> [Float] {
    let base = self.base ?? inputs[0].decoded(count: count)
    self.base = base
    return Kernels.differences([inputs[1 + m]], minus: base)[0]
  }
}

/// `TaskVectorMerge.combineRounded`'s arithmetic, written once per rounding dtype: per element,
/// each delta times its (rounded) weight, rounded; with the election, their float sum's sign
/// (+0 counts as positive) picks the agreeing nonzero products, whose float sum is `mixed` and
/// whose weights' float sum, rounded (0 -> 1), is the divisor; without it, `mixed` is the float
/// sum of all the products and the divisor the rounded sum of all the weights (below 1e-8 in
/// magnitude -> 1). `mixed` is rounded, divided by the divisor when normalising, scaled by
/// lambda when it is not 1 (each rounded) and added to the base (rounded).
struct RoundedConsensus: RoundedComputation {
  let base: [Float]
  let deltas: [[Float]]
  let weights: [Float]
  let lambda: Float
  let normalize: Bool
  let elect: Bool

  /// Model by model over the elements (loops the compiler vectorises), with running sums per
  /// element: an agreeing product or weight is added, a disagreeing one adds +0, which leaves
  /// the sums (+0 or nonzero, never -0) as they are.
  func callAsFunction<R: RoundingRule>(_: R.Type) -> [Float] {
    let count = base.count
    var allWeights: Float = 0
    for w in weights { allWeights += w }
    var sumDivisor = R.round(allWeights)
    if abs(sumDivisor) < 1e-8 { sumDivisor = 1 }
    let (lambda, normalize, elect) = (self.lambda, self.normalize, self.elect)
    var mixed = [Float](repeating: 0, count: count)
    var agreeing = [Float](repeating: 0, count: count)
    var total = [Float](repeating: 0, count: elect ? count : 0)
    deltas.withUnsafeBufferPointers { d in
      mixed.withUnsafeMutableBufferPointer { mixedBuffer in
        agreeing.withUnsafeMutableBufferPointer { agreeingBuffer in
          total.withUnsafeMutableBufferPointer { totalBuffer in
            guard let sum = mixedBuffer.baseAddress, let kept = agreeingBuffer.baseAddress else { return }
            guard elect, let signs = totalBuffer.baseAddress else {
              for (delta, w) in zip(d, weights) { for j in 0..<count { sum[j] += R.round(delta[j] * w) } }
              return
            }
            for (delta, w) in zip(d, weights) { for j in 0..<count { signs[j] += R.round(delta[j] * w) } }
            for (delta, w) in zip(d, weights) {
              for j in 0..<count {
                let product = R.round(delta[j] * w)
                let agrees = signs[j] >= 0 ? product > 0 : product < 0
                sum[j] += agrees ? product : 0
                kept[j] += agrees ? w : 0
              }
            }
          }
        }
      }
    }
    return [Float](unsafeUninitializedCapacity: count) { out, initialized in
      for j in 0..<count {
        let agreed = R.round(agreeing[j])
        let divisor = elect ? (agreed == 0 ? 1 : agreed) : sumDivisor
        let sum = R.round(mixed[j])
        let normalized = normalize ? R.round(sum / divisor) : sum
        out[j] = R.round(base[j] + (lambda != 1 ? R.round(normalized * lambda) : normalized))
      }
      initialized = count
    }
  }
}
