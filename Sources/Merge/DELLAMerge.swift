import Foundation
import Tensor

/// mergekit's `della` and `della_linear` (DELLA: drop and rescale by magnitude-ranked
/// probabilities). Per model, `delta = model - base`; within each row (the whole tensor for a
/// vector) the entries are ranked by magnitude, smallest first, and entry of normalised rank
/// `r` in [0, 1] is kept with probability `density - epsilon + 2 epsilon r` (so larger entries
/// survive more often), drawn from a counter-based generator keyed by `seed`, tensor and model
/// (the same on any machine and thread count; mergekit's torch draws are equal in
/// distribution, not in value). With `rescale` (default) the kept entries are scaled back to the
/// delta's L1 norm. The weighted deltas are then combined as in TIES (`della`: sign consensus,
/// normalised by the agreeing weights) or summed (`della_linear`), scaled by `lambda` and added
/// to the base. Magnitude ties rank in index order. Computed in `Double`.
///
/// Streamed by rows: a first pass over blocks of whole rows sums each model's L1 norms before
/// and after the drop; each range of the merge then reads the whole rows it touches, ranks and
/// draws again (the same draws), and keeps its own elements. Memory stays at a few ranges
/// whatever the tensor; a whole tensor merges through the same code (`mergeThroughRanges`).
public struct DELLAMerge: StreamingMerge {
  public let name: String
  public let consensus: Bool
  public let defaultNormalize: Bool
  /// The most memory (bytes) the drawn flags of one tensor's dropping models may take to be
  /// kept from the L1 pass for the merge: DARE's limit (`TaskVectorMerge.keptDrawsLimit`,
  /// 32 MiB); the merge ranks and draws a larger tensor's rows again.
  var keptFlagsBudget = TaskVectorMerge.keptDrawsLimit

  public static let della = DELLAMerge(name: "della", consensus: true, defaultNormalize: true)
  public static let dellaLinear = DELLAMerge(name: "della-linear", consensus: false, defaultNormalize: false)

  public var summary: String {
    consensus
      ? "magnitude-ranked random drop and rescale, then TIES sign consensus"
      : "magnitude-ranked random drop and rescale, then task arithmetic"
  }
  public var reference: String {
    "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, "
      + "arXiv:2406.11617; mergekit's \(name.replacingOccurrences(of: "-", with: "_"))"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number("weight", .perModel, default: 1, help: "scale of each model's task vector"),
      .number("density", .perModel, in: 0...1, default: 1, help: "mean fraction of each task vector's entries kept"),
      .number(
        "epsilon", .perModel, in: 0...1, default: 0.15,
        help: "spread of the keep probabilities around density (density +- epsilon must lie in (0, 1))"),
      .number("lambda", .global, default: 1, help: "scale of the merged task vector"),
      .flag("normalize", default: defaultNormalize, help: "divide by the sum of the (agreeing) weights"),
      .flag("rescale", default: true, help: "rescale each pruned task vector to its original L1 norm"),
      .number(
        "seed", .global, in: 0...9.007_199_254_740_992e15, default: 0,
        help: "random seed; the same seed gives the same output on any machine"),
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let base = inputs.base else { throw MergeError.baseRequired(method: name) }
    guard !streams(tensor: inputs.name, shape: base.shape) else { return try mergeThroughRanges(inputs, p) }
    // Rows longer than a range: the whole tensor as one range, so that each row is ranked once.
    let whole = RangeInputs(offset: 0, base: base.scalars, models: inputs.models.map(\.scalars))
    let scan = TensorScan(ranges: [0..<base.count]) { _ in whole }
    guard let merger = try prepare(tensor: inputs.name, shape: base.shape, p, scan: scan) else {
      throw MergeError.notStreamable(method: name, tensor: inputs.name)
    }
    return Tensor(shape: base.shape, scalars: try merger.merge(whole))
  }

  /// Rows longer than a merge range (a large vector is one row) are merged whole, in one piece:
  /// each range would rank the whole row again.
  public func streams(tensor name: String, shape: [Int]) -> Bool {
    Self.rowLength(shape) <= MergeRanges.size
  }

  /// The length of the rows ranks are taken in: the last dimensions of a matrix or more, the
  /// whole tensor for a vector.
  static func rowLength(_ shape: [Int]) -> Int {
    let count = shape.reduce(1, *)
    return shape.count >= 2 ? count / max(shape[0], 1) : count
  }

  /// As a vector (one row): `prepare(tensor:shape:)` is the one the runner calls.
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    try prepare(tensor: name, shape: [count], p, scan: scan)
  }

  /// Flags packed 64 to a word (flag i: bit `i % 64` of word `i / 64`, as `Kernels.packBits`
  /// packs them), appended block by block at any bit offset.
  struct PackedFlags: Sendable {
    private var words: [UInt64] = []
    private(set) var count = 0

    /// Empty, with room for `capacity` flags.
    init(capacity: Int = 0) { words.reserveCapacity((capacity + 63) / 64) }

    /// Appends the first `count` flags of `packed` (its bits past them are 0).
    mutating func append(_ packed: [UInt64], count added: Int) {
      let shift = count % 64
      if shift == 0 {
        words += packed
      } else {
        // The last word is partly filled (count > 0 here).
        for word in packed {
          words[words.count - 1] |= word << UInt64(shift)
          words.append(word >> UInt64(64 - shift))
        }
      }
      count += added
      words.removeLast(max(0, words.count - (count + 63) / 64))
    }

    /// The packed words (flag i: bit `i % 64` of word `i / 64`; the bits past `count` are 0).
    func withWords<R>(_ body: (UnsafeBufferPointer<UInt64>) throws -> R) rethrows -> R {
      try words.withUnsafeBufferPointer(body)
    }
  }

  /// One model's drop on this tensor.
  struct Drop: Sendable {
    var density: Double
    var epsilon: Double
    var rng: CounterRNG
    /// L1 norm before over after the drop (1 without `rescale`), as a ratio `before / after`.
    var before = 1.0
    var after = 1.0

    /// Whether entries are dropped at all (0 < density < 1).
    var drops: Bool { density > 0 && density < 1 }
  }

  public func prepare(tensor name: String, shape: [Int], _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    let count = shape.reduce(1, *)
    let rowLength = max(Self.rowLength(shape), 1)
    let models = p.models.count
    let seed = UInt64(p.number("seed"))
    var drops = try (0..<models).map { m -> Drop in
      let (density, epsilon) = (p.number("density", model: m), p.number("epsilon", model: m))
      if density > 0 && density < 1 && !(density - epsilon > 0 && density + epsilon < 1) {
        throw MergeError.invalidParameter(
          method: self.name, name: "epsilon", tensor: name,
          reason: "must leave density +- epsilon inside (0, 1) (density \(density), epsilon \(epsilon))")
      }
      return Drop(density: density, epsilon: epsilon, rng: CounterRNG(seed: seed, stream: "\(self.name)#\(m)"))
    }
    // With `rescale`, the L1 pass draws every dropping model's flags once; where they fit
    // `keptFlagsBudget`, they are kept for the merge, which then neither ranks nor draws again.
    var cached: [PackedFlags?] = Array(repeating: nil, count: models)
    if p.flag("rescale") && drops.contains(where: \.drops) {
      // Blocks of whole rows, about a range each, summed in order.
      let blocks = MergeRanges.rowBlocks(count, rowLength: rowLength)
      var sums = [(before: Double, after: Double)](repeating: (0, 0), count: models)
      let fixed = drops
      let keep = drops.filter(\.drops).count * ((count + 63) / 64) * 8 <= keptFlagsBudget
      var flags = drops.map { $0.drops && keep ? PackedFlags(capacity: count) : nil }
      try TensorScan(ranges: blocks, read: scan.read, release: scan.release).pass { rows in
        var draws = RowDraws()
        return try (0..<models).map { m -> (before: Double, after: Double, flags: [UInt64], count: Int) in
          guard fixed[m].drops else { return (0, 0, [], 0) }
          try draws.draw(rows, model: m, drop: fixed[m], rowLength: rowLength, method: self.name)
          let (before, after) = draws.l1Norms()
          return (before, after, keep ? Kernels.packBits(Array(draws.kept[0..<draws.count])) : [], draws.count)
        }
      } combine: { parts in
        for m in 0..<models {
          sums[m].before += parts[m].before
          sums[m].after += parts[m].after
          flags[m]?.append(parts[m].flags, count: parts[m].count)
        }
      }
      for m in 0..<models where drops[m].drops && sums[m].before >= 1e-7 && sums[m].after >= 1e-7 {
        (drops[m].before, drops[m].after) = sums[m]
      }
      cached = flags
    }
    let weights = (0..<models).map { p.number("weight", model: $0) }
    let (lambda, normalize, consensus) = (p.number("lambda"), p.flag("normalize"), self.consensus)
    let fixed = drops
    let read = scan.read
    let flags = cached
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: self.name) }
      let (first, end) = (range.offset, range.offset + base.count)
      // The whole rows the range touches, unless every dropping model's flags are kept.
      let ranks = (0..<models).contains { fixed[$0].drops && flags[$0] == nil }
      let rowsStart = ranks ? first / rowLength * rowLength : first
      let rowsEnd = ranks ? min(count, (end + rowLength - 1) / rowLength * rowLength) : end
      let rows = rowsStart == first && rowsEnd == end ? range : try read(rowsStart..<rowsEnd)
      let (length, skip) = (end - first, first - rowsStart)
      var out = [Float](repeating: 0, count: length)
      guard ranks else {
        // Every drop's flags kept: block by block in cache, each model's weighted, kept (and
        // rescaled) deltas, then their combination.
        try Self.mergeBlocks(
          range, flags: flags, drops: fixed, weights: weights, consensus: consensus, normalize: normalize,
          lambda: lambda, into: &out, method: self.name)
        return out
      }
      // Each model's weighted, kept (and rescaled) delta on the range's elements, model by
      // model in one buffer.
      var weighted = [Double](repeating: 0, count: models * length)
      var draws = RowDraws()
      for m in 0..<models {
        let (drop, weight) = (fixed[m], weights[m])
        try draws.draw(rows, model: m, drop: drop, rowLength: rowLength, method: self.name)
        draws.deltas.withUnsafeBufferPointer { deltas in
          draws.kept.withUnsafeBufferPointer { kept in
            weighted.withUnsafeMutableBufferPointer { out in
              Self.weigh(
                UnsafeBufferPointer(rebasing: deltas[skip..<skip + length]),
                kept: UnsafeBufferPointer(rebasing: kept[skip..<skip + length]), drop: drop, weight: weight,
                into: UnsafeMutableBufferPointer(rebasing: out[m * length..<(m + 1) * length]))
            }
          }
        }
      }
      weighted.withUnsafeBufferPointer { deltas in
        base.withUnsafeBufferPointer { base in
          out.withUnsafeMutableBufferPointer { out in
            Self.combine(
              deltas, models: models, length: length, base: base, weights: weights, consensus: consensus,
              normalize: normalize, lambda: lambda, into: out)
          }
        }
      }
      return out
    }
  }

  /// The merge of one range whose dropping models' flags were all kept from the L1 pass: for
  /// each block of elements, each model's weighted, kept (and rescaled) deltas, formed from its
  /// values, the base and the packed flags in one sweep, then `combine`; everything a block
  /// needs stays in cache.
  static func mergeBlocks(
    _ range: RangeInputs, flags: [PackedFlags?], drops: [Drop], weights: [Double], consensus: Bool,
    normalize: Bool, lambda: Double, into out: inout [Float], method: String
  ) throws {
    guard let base = range.base else { throw MergeError.baseRequired(method: method) }
    let (models, count, block) = (range.models.count, base.count, 1024)
    var weighted = [Double](repeating: 0, count: models * block)
    base.withUnsafeBufferPointer { base in
      out.withUnsafeMutableBufferPointer { out in
        for start in stride(from: 0, to: count, by: block) {
          let n = min(block, count - start)
          let blockBase = UnsafeBufferPointer(rebasing: base[start..<start + n])
          for m in 0..<models {
            let (drop, weight) = (drops[m], weights[m])
            precondition(
              flags[m] != nil || !drop.drops, "DELLA's block merge needs every dropping model's kept flags")
            range.models[m].withUnsafeBufferPointer { values in
              weighted.withUnsafeMutableBufferPointer { weighted in
                let into = UnsafeMutableBufferPointer(rebasing: weighted[m * n..<(m + 1) * n])
                let values = UnsafeBufferPointer(rebasing: values[start..<start + n])
                if let flags = flags[m] {
                  flags.withWords { words in
                    weigh(
                      values, minus: blockBase, flags: words, from: range.offset + start, drop: drop, weight: weight,
                      into: into)
                  }
                } else {
                  let all: UInt64 = drop.density >= 1 ? ~0 : 0
                  withUnsafePointer(to: all) { word in
                    weigh(
                      values, minus: blockBase, flags: UnsafeBufferPointer(start: word, count: 1), from: 0,
                      repeating: true, drop: drop, weight: weight, into: into)
                  }
                }
              }
            }
          }
          weighted.withUnsafeBufferPointer { weighted in
            combine(
              weighted, models: models, length: n, base: blockBase, weights: weights, consensus: consensus,
              normalize: normalize, lambda: lambda, into: UnsafeMutableBufferPointer(rebasing: out[start..<start + n]))
          }
        }
      }
    }
  }

  /// One element's weighted, kept (and rescaled) delta: `(kept ? delta * before / after : 0) *
  /// weight`, the dropped delta masked to +0 without a branch on the random flag (`kept` is 0
  /// or 1). Before / after is 1 / 1, exact, without rescale or drop.
  @inline(__always) static func weighted(_ delta: Double, kept: UInt64, drop: Drop, weight: Double) -> Double {
    Double(bitPattern: (delta * drop.before / drop.after).bitPattern & (0 &- kept)) * weight
  }

  /// One model's weighted, kept (and rescaled) deltas.
  static func weigh(
    _ deltas: UnsafeBufferPointer<Double>, kept: UnsafeBufferPointer<Bool>, drop: Drop, weight: Double,
    into out: UnsafeMutableBufferPointer<Double>
  ) {
    kept.withMemoryRebound(to: UInt8.self) { kept in
      for j in 0..<deltas.count { out[j] = weighted(deltas[j], kept: UInt64(kept[j] & 1), drop: drop, weight: weight) }
    }
  }

  /// One model's weighted, kept (and rescaled) deltas `values - base`, element j kept when
  /// flag `first + j` of the packed `flags` is set (with `repeating`, flag `j % 64` of the
  /// first word), a word of flags at a time.
  static func weigh(
    _ values: UnsafeBufferPointer<Float>, minus base: UnsafeBufferPointer<Float>, flags: UnsafeBufferPointer<UInt64>,
    from first: Int, repeating: Bool = false, drop: Drop, weight: Double, into out: UnsafeMutableBufferPointer<Double>
  ) {
    var j = 0
    while j < values.count {
      let i = first + j
      let word = flags[repeating ? 0 : i &>> 6] &>> UInt64(i & 63)
      let run = min(64 - (i & 63), values.count - j)
      for k in 0..<run {
        let delta = Double(values[j + k]) - Double(base[j + k])
        out[j + k] = weighted(delta, kept: word &>> UInt64(k) & 1, drop: drop, weight: weight)
      }
      j += run
    }
  }

  /// `base + lambda * mixed` for each element j of a range, from the models' weighted deltas
  /// (model m's at `deltas[m * length + j]`): with `consensus`, `mixed` sums the deltas of the
  /// majority sign (that of their sum, + for 0), divided when `normalize` by those models'
  /// weights (1 if none); else it sums all of them, divided by the weights' sum (1 if about
  /// 0). Model by model over blocks of elements, so that the loops run in vectors without
  /// branches (the signs are random), each element's sums taken in model order.
  static func combine(
    _ deltas: UnsafeBufferPointer<Double>, models: Int, length: Int, base: UnsafeBufferPointer<Float>,
    weights: [Double],
    consensus: Bool, normalize: Bool, lambda: Double, into out: UnsafeMutableBufferPointer<Float>
  ) {
    guard let first = deltas.baseAddress else { return }
    let block = 1024
    let weightSum = weights.reduce(0, +)
    let sumDivisor = abs(weightSum) < 1e-8 ? 1 : weightSum
    // One scratch of three blocks, through plain pointers, so that the loops vectorize.
    let scratch = UnsafeMutableBufferPointer<Double>.allocate(capacity: 3 * block)
    defer { scratch.deallocate() }
    guard let total = scratch.baseAddress, let out = out.baseAddress, let base = base.baseAddress else { return }
    let (mixed, divisor) = (total + block, total + 2 * block)
    for start in stride(from: 0, to: length, by: block) {
      let n = min(block, length - start)
      for j in 0..<n { (total[j], mixed[j], divisor[j]) = (0, 0, 0) }
      for m in 0..<models {
        let row = first + m * length + start
        for j in 0..<n { total[j] += row[j] }
      }
      if consensus {
        // The deltas of the other sign masked to +0: adding it changes nothing, as neither
        // sum can be -0 (both start at +0 and take only nonzero deltas and weights' sums).
        for m in 0..<models {
          let (row, weight) = (first + m * length + start, weights[m].bitPattern)
          for j in 0..<n {
            let delta = row[j]
            let agrees: UInt64 = delta != 0 && (delta > 0) == (total[j] >= 0) ? ~0 : 0
            mixed[j] += Double(bitPattern: delta.bitPattern & agrees)
            divisor[j] += Double(bitPattern: weight & agrees)
          }
        }
        for j in 0..<n {
          let d = divisor[j] == 0 ? 1 : divisor[j]
          let m = normalize ? mixed[j] / d : mixed[j]
          out[start + j] = Float(Double(base[start + j]) + m * lambda)
        }
      } else {
        for j in 0..<n {
          let m = normalize ? total[j] / sumDivisor : total[j]
          out[start + j] = Float(Double(base[start + j]) + m * lambda)
        }
      }
    }
  }

  /// One model's drop over whole rows: each element's `model - base` in Double and whether the
  /// drop keeps it, with the scratch that ranks the rows. Buffers grow to the longest rows
  /// drawn and are reused; one per thread.
  struct RowDraws {
    /// `model - base` of each element drawn, in Double.
    var deltas: [Double] = []
    /// Whether the drop keeps each element (always when it drops none at density 1; never at 0).
    var kept: [Bool] = []
    /// How many elements the last `draw` filled.
    var count = 0
    private var keys32: [UInt32] = []
    private var keys64: [UInt64] = []
    private var ranks: [Int32] = []
    private var workspace = KeyOrder.Workspace()

    /// Fills `deltas` and `kept` for every element of `rows` (whole rows of `rowLength`, the
    /// last one possibly shorter at the tensor's end) for model `m`. Within each row the
    /// entries are ranked by magnitude (equal magnitudes in index order; a NaN above +inf, as
    /// torch's sort puts it), and entry of rank `r` is kept when its draw is below
    /// `density - epsilon + 2 epsilon r / (length - 1)`. Throws `MergeError.baseRequired`
    /// without a base.
    mutating func draw(_ rows: RangeInputs, model m: Int, drop: Drop, rowLength: Int, method: String) throws {
      let n = try fillDeltas(rows, model: m, method: method)
      let rowCapacity = min(rowLength, n)
      if ranks.count < rowCapacity {
        (keys32, keys64) = ([UInt32](repeating: 0, count: rowCapacity), [UInt64](repeating: 0, count: rowCapacity))
        ranks = [Int32](repeating: 0, count: rowCapacity)
      }
      guard drop.drops else {
        let keepAll = drop.density >= 1
        kept.withUnsafeMutableBufferPointer { $0.update(repeating: keepAll) }
        return
      }
      var start = 0
      while start < n {
        let length = min(rowLength, n - start)
        rankRow(start..<start + length)
        let span = Double(max(length - 1, 1))
        let firstIndex = rows.offset + start
        ranks.withUnsafeBufferPointer { ranks in
          kept.withUnsafeMutableBufferPointer { kept in
            for k in 0..<length {
              let probability = drop.density - drop.epsilon + 2 * drop.epsilon * Double(ranks[k]) / span
              kept[start + k] = Double(drop.rng.uniform(UInt64(firstIndex + k))) < probability
            }
          }
        }
        start += length
      }
    }

    /// Sizes the buffers for `rows` and fills `deltas`; returns the element count.
    private mutating func fillDeltas(_ rows: RangeInputs, model m: Int, method: String) throws -> Int {
      guard let base = rows.base else { throw MergeError.baseRequired(method: method) }
      let values = rows.models[m]
      let n = base.count
      count = n
      if deltas.count < n {
        deltas = [Double](repeating: 0, count: n)
        kept = [Bool](repeating: false, count: n)
      }
      deltas.withUnsafeMutableBufferPointer { d in
        for k in 0..<n { d[k] = Double(values[k]) - Double(base[k]) }
      }
      return n
    }

    /// Ranks the magnitudes of `deltas[row]` into `ranks[0 ..< row.count]`. Non-negative
    /// doubles order as their bit patterns; where every magnitude of the row is a `Float`
    /// exactly (differences of BF16 or F16 values nearly always are), as the `Float`'s, whose
    /// radix sort takes half the passes.
    private mutating func rankRow(_ row: Range<Int>) {
      let length = row.count
      // Whether every magnitude converts to `Float` and back unchanged, as a byte AND so that
      // the loop runs in vectors.
      var allExact: UInt8 = 1
      deltas.withUnsafeBufferPointer { d in
        keys32.withUnsafeMutableBufferPointer { keys in
          for k in 0..<length {
            let magnitude = abs(d[row.lowerBound + k])
            let single = Float(magnitude)
            allExact &= Double(single) == magnitude ? 1 : 0
            keys[k] = single.bitPattern
          }
        }
      }
      let exact = allExact == 1
      ranks.withUnsafeMutableBufferPointer { ranks in
        if exact {
          keys32.withUnsafeBufferPointer {
            workspace.ranks(of: UnsafeBufferPointer(rebasing: $0[0..<length]), into: ranks)
          }
        } else {
          deltas.withUnsafeBufferPointer { d in
            keys64.withUnsafeMutableBufferPointer { keys in
              for k in 0..<length { keys[k] = abs(d[row.lowerBound + k]).bitPattern }
            }
          }
          keys64.withUnsafeBufferPointer {
            workspace.ranks(of: UnsafeBufferPointer(rebasing: $0[0..<length]), into: ranks)
          }
        }
      }
    }

    /// The L1 norms of the drawn deltas before and after the drop, summed in index order.
    func l1Norms() -> (before: Double, after: Double) {
      var (before, after) = (0.0, 0.0)
      deltas.withUnsafeBufferPointer { d in
        kept.withUnsafeBufferPointer { kept in
          // The dropped magnitudes masked to +0, which leaves the sum as it is (it is never
          // -0), without a branch on the random flags.
          kept.withMemoryRebound(to: UInt8.self) { kept in
            for k in 0..<count {
              before += abs(d[k])
              after += Double(bitPattern: abs(d[k]).bitPattern & (0 &- UInt64(kept[k] & 1)))
            }
          }
        }
      }
      return (before, after)
    }
  }
}
