import CKernels

/// Exact top-k by magnitude without sorting: two radix-histogram passes over the bit patterns of
/// |x| (for non-negative floats the bit pattern orders like the value) find the k-th largest
/// magnitude, then one pass marks the elements. The order is total: larger |x| first, and among
/// equal magnitudes the lower index first, so the result is unique and machine independent.
/// NaN magnitudes rank above infinity.
public enum Selection {
  /// `mask[i]` is true for exactly `min(k, count)` elements: the k largest by |x|. The whole
  /// array as one range of a `MagnitudeRanker`.
  public static func largestMagnitudes(_ values: [Float], keep k: Int) -> [Bool] {
    var ranker = MagnitudeRanker(keep: k, count: values.count)
    if ranker.needsPasses {
      ranker.addHigh(MagnitudeRanker.highCounts(values))
      ranker.finishHigh()
      ranker.addLow(ranker.lowCounts(values))
      ranker.finishLow()
    }
    return ranker.mask(values, equalBefore: 0)
  }
}

/// Exact top-k by magnitude over a tensor seen in consecutive ranges (streaming), with the same
/// total order as `Selection.largestMagnitudes`. Three passes, each made of pure per-range
/// summaries (so ranges can be summarised in parallel) added up in any order:
/// 1. `highCounts` of every range, added with `addHigh`, then `finishHigh`;
/// 2. `lowCounts` of every range, added with `addLow`, then `finishLow` (the exact threshold);
/// 3. only when `needsTieOrder`: `equalCount` of every range, for the running count of
///    threshold-equal elements before each range, which `mask` needs to keep ties by lowest index.
public struct MagnitudeRanker: Sendable {
  public let keep: Int
  public let count: Int
  private var high = [Int](repeating: 0, count: 65536)
  private var low = [Int](repeating: 0, count: 65536)
  private var prefix: UInt32 = 0
  private var above = 0
  /// The threshold key and how many elements equal to it are kept (after both passes).
  public private(set) var threshold: (key: UInt32, equalToKeep: Int) = (0, 0)

  public init(keep: Int, count: Int) {
    self.keep = max(0, min(keep, count))
    self.count = count
  }

  /// Whether the passes are needed (keeping none or all is decided without looking).
  public var needsPasses: Bool { keep > 0 && keep < count }

  /// A ranker whose threshold is already known (found by `MagnitudeBracket`).
  public init(keep: Int, count: Int, threshold: (key: UInt32, equalToKeep: Int), needsTieOrder: Bool) {
    self.init(keep: keep, count: count)
    self.threshold = threshold
    self.needsTieOrder = needsTieOrder
  }

  /// The kept magnitudes as an inclusive key range `minKey...0x7FFF_FFFF` when ties need no
  /// order (every threshold-equal element kept, or none), nil when they do. Keeping none is the
  /// empty range `0x8000_0000...`.
  public var keptKeys: ClosedRange<UInt32>? {
    if keep == 0 { return 0x8000_0000...0x8000_0000 }
    if keep == count { return 0...0x7FFF_FFFF }
    guard !needsTieOrder else { return nil }
    return (threshold.equalToKeep > 0 ? threshold.key : threshold.key + 1)...0x7FFF_FFFF
  }

  /// Pass 1 summary of one range: counts by the high 16 bits of |x| (the same for every ranker,
  /// so a pass can take them before it knows how many to keep).
  public static func highCounts(_ values: [Float]) -> [UInt32] {
    var counts = [UInt32](repeating: 0, count: 65536)
    values.withUnsafeBufferPointer { v in
      guard let start = v.baseAddress else { return }
      let x = UnsafeRawPointer(start).assumingMemoryBound(to: UInt32.self)
      counts.withUnsafeMutableBufferPointer { h in
        for i in 0..<values.count { h[Int((x[i] & 0x7FFF_FFFF) >> 16)] &+= 1 }
      }
    }
    return counts
  }

  public mutating func addHigh(_ counts: [UInt32]) {
    for bin in 0..<65536 { high[bin] += Int(counts[bin]) }
  }

  /// Ends the first pass: picks the high 16 bits of the threshold.
  public mutating func finishHigh() {
    var bin = 65535
    while above + high[bin] < keep {
      above += high[bin]
      bin -= 1
    }
    prefix = UInt32(bin)
  }

  /// Pass 2 summary of one range: counts by the low 16 bits of |x|, among the elements whose
  /// high bits are the threshold's.
  public func lowCounts(_ values: [Float]) -> [UInt32] {
    var counts = [UInt32](repeating: 0, count: 65536)
    let p = prefix
    values.withUnsafeBufferPointer { v in
      guard let start = v.baseAddress else { return }
      let x = UnsafeRawPointer(start).assumingMemoryBound(to: UInt32.self)
      counts.withUnsafeMutableBufferPointer { h in
        for i in 0..<values.count {
          let b = x[i] & 0x7FFF_FFFF
          if b >> 16 == p { h[Int(b & 0xFFFF)] &+= 1 }
        }
      }
    }
    return counts
  }

  public mutating func addLow(_ counts: [UInt32]) {
    for bin in 0..<65536 { low[bin] += Int(counts[bin]) }
  }

  /// Ends the second pass: fixes the exact threshold.
  public mutating func finishLow() {
    var bin = 65535
    var total = above
    while total + low[bin] < keep {
      total += low[bin]
      bin -= 1
    }
    threshold = (prefix << 16 | UInt32(bin), keep - total)
    needsTieOrder = low[bin] > keep - total
  }

  /// Whether some elements equal to the threshold are dropped, so that `mask` needs the
  /// `equalCount` pass: when all of them are kept (the usual case), order does not matter.
  public private(set) var needsTieOrder = false

  /// Pass 3 summary of one range: how many of its elements equal the threshold in magnitude.
  public func equalCount(_ values: [Float]) -> Int {
    let key = threshold.key
    return values.withUnsafeBufferPointer { v in
      guard let x = v.baseAddress else { return 0 }
      var equal = 0
      for i in 0..<values.count { equal &+= Int((((x[i].bitPattern & 0x7FFF_FFFF) ^ key) &- 1) >> 31) }
      return equal
    }
  }

  /// The kept elements of one range, given how many threshold-equal elements came before it.
  /// A branch-free comparison first; threshold-equal elements (rare) are then settled in order.
  public func mask(_ values: [Float], equalBefore: Int) -> [Bool] {
    if keep == 0 || values.isEmpty { return [Bool](repeating: false, count: values.count) }
    if keep == count { return [Bool](repeating: true, count: values.count) }
    let (key, equalToKeep) = threshold
    return [Bool](unsafeUninitializedCapacity: values.count) { out, initialized in
      values.withUnsafeBufferPointer { v in
        guard let x = v.baseAddress, let o = out.baseAddress else { return }
        var equal = 0
        for i in 0..<values.count {
          let b = x[i].bitPattern & 0x7FFF_FFFF
          (o + i).initialize(to: (key &- b) >> 31 == 1)  // b > key, both below 2^31
          equal &+= Int(((b ^ key) &- 1) >> 31)  // b == key
        }
        var rank = equalBefore
        if equal > 0 && rank < equalToKeep {
          for i in 0..<values.count where x[i].bitPattern & 0x7FFF_FFFF == key {
            o[i] = rank < equalToKeep
            rank += 1
          }
        }
        initialized = values.count
      }
    }
  }
}

/// An order statistic of magnitude keys (bit patterns of |x|, below 2^31) counted in descending
/// order, with the counts the tie order needs: found without sorting the keys, by one pass
/// counting them by their high 15 bits and a second collecting the keys of the bins the wanted
/// ranks fall in (a small share of them), which alone are sorted. `MagnitudeBracket` takes its
/// ends from a sample this way, and its threshold from the keys its pass kept.
public struct KeyOrderStatistic: Equatable, Sendable {
  /// The key at the rank.
  public var key: UInt32
  /// How many keys are larger than `key`, and how many equal it, over all parts.
  public var larger: Int
  public var equal: Int
  /// How many keys equal `key`, part by part.
  public var equalByPart: [Int]

  /// The statistics at `ranks` (from 0: rank 0 is the largest key; each below the key count)
  /// of the keys of all `parts` together, in the order of `ranks`.
  public static func select(_ parts: [[UInt32]], ranks: [Int]) -> [KeyOrderStatistic] {
    let total = parts.reduce(0) { $0 + $1.count }
    precondition(ranks.allSatisfy { (0..<total).contains($0) }, "ranks \(ranks) of \(total) keys")
    guard !ranks.isEmpty else { return [] }
    var counts = [Int](repeating: 0, count: 1 << 15)
    counts.withUnsafeMutableBufferPointer { bins in
      for part in parts {
        part.withUnsafeBufferPointer { keys in
          for key in keys { bins[Int((key & 0x7FFF_FFFF) >> 16)] &+= 1 }
        }
      }
    }
    // Each rank's bin, and how many keys lie in the bins above it.
    var binOf = [Int](repeating: 0, count: ranks.count)
    var aboveBin = [Int](repeating: 0, count: ranks.count)
    for (r, rank) in ranks.enumerated() {
      var bin = counts.count - 1
      var above = 0
      while above + counts[bin] <= rank {
        above += counts[bin]
        bin -= 1
      }
      (binOf[r], aboveBin[r]) = (bin, above)
    }
    // The keys of those bins, part by part.
    let bins = Array(Set(binOf)).sorted()
    var collected = [[[UInt32]]](repeating: [], count: bins.count)
    for part in parts {
      var byBin = [[UInt32]](repeating: [], count: bins.count)
      part.withUnsafeBufferPointer { keys in
        for key in keys {
          let bin = Int((key & 0x7FFF_FFFF) >> 16)
          if let b = bins.firstIndex(of: bin) { byBin[b].append(key & 0x7FFF_FFFF) }
        }
      }
      for b in bins.indices { collected[b].append(byBin[b]) }
    }
    return ranks.indices.map { r in
      let b = bins.firstIndex(of: binOf[r]) ?? 0
      let inBin = Array(collected[b].joined())
      let key = keyAt(ranks[r] - aboveBin[r], inBin: inBin)
      let larger = aboveBin[r] + inBin.reduce(0) { $0 + ($1 > key ? 1 : 0) }
      let equalByPart = collected[b].map { keys in keys.reduce(0) { $0 + ($1 == key ? 1 : 0) } }
      return KeyOrderStatistic(key: key, larger: larger, equal: equalByPart.reduce(0, +), equalByPart: equalByPart)
    }
  }

  /// The key at `rank` (from 0) in descending order of `keys`, which share their high 16 bits:
  /// sorted when there are few, else by a histogram of their low 16 bits.
  static func keyAt(_ rank: Int, inBin keys: [UInt32]) -> UInt32 {
    if keys.count <= 1 << 12 { return keys.sorted(by: >)[rank] }
    var counts = [Int](repeating: 0, count: 1 << 16)
    counts.withUnsafeMutableBufferPointer { bins in
      keys.withUnsafeBufferPointer { keys in
        for key in keys { bins[Int(key & 0xFFFF)] &+= 1 }
      }
    }
    var bin = counts.count - 1
    var above = 0
    while above + counts[bin] <= rank {
      above += counts[bin]
      bin -= 1
    }
    return keys[0] & 0xFFFF_0000 | UInt32(bin)
  }
}

/// Exact top-k by magnitude in ONE pass over a streamed tensor, in the common case: a sample of
/// the values (taken before the pass) brackets the threshold between two keys; the pass counts
/// the elements above the bracket and keeps the keys inside it, range by range. If the k-th
/// largest magnitude falls inside the bracket, the kept keys give the exact threshold, and their
/// per-range counts give the threshold-equal elements before every range (the tie order), so no
/// other pass is needed; otherwise (an unlucky sample, or more bracket keys than `budget`) it
/// reports failure and the caller runs `MagnitudeRanker`'s passes. Same total order and result
/// as `MagnitudeRanker`.
public struct MagnitudeBracket: Sendable {
  public let keep: Int
  public let count: Int
  /// Keys (magnitude bit patterns) collected by the pass: `low...high`.
  public let low: UInt32
  public let high: UInt32
  /// The most bracket keys the pass may keep over the whole tensor.
  public let budget: Int

  /// One range's summary: counts above the bracket and at its two ends (heavily repeated
  /// magnitudes, such as zeros or a low-precision step, land there), and the keys strictly inside.
  public struct Summary: Sendable {
    public var above = 0
    public var atHigh = 0
    public var atLow = 0
    public var inner: [UInt32] = []
  }

  /// The bracket for keeping `keep` of `count` elements, from `sample` (values spread over the
  /// tensor): sample ranks `r -/+ margin` around the k-th largest's expected rank `r`, with a
  /// margin of 8 standard deviations of a sampled quantile plus 2 (blocks of neighbouring
  /// values are correlated). Nil when no pass is needed or the sample is empty.
  public init?(keep: Int, count: Int, sample: [Float], budget: Int) {
    guard keep > 0, keep < count, !sample.isEmpty else { return nil }
    self.keep = keep
    self.count = count
    self.budget = budget
    let s = Double(sample.count)
    let q = Double(keep) / Double(count)
    let rank = q * s
    let margin = 8 * (s * q * (1 - q)).squareRoot() + 2
    let upper = Int((rank - margin).rounded(.down))
    let lower = Int((rank + margin).rounded(.up))
    let ends = Self.descendingKeys(sample, at: [upper, lower].filter { sample.indices.contains($0) })
    high = upper < 0 ? 0x7FFF_FFFF : ends[0]
    low = lower >= sample.count ? 0 : ends[ends.count - 1]
  }

  /// The same bracket for keeping `keep` elements instead: for a count known only after the
  /// pass (SCE keeps a share of the nonzero variances), whose threshold may still fall inside.
  public func keeping(_ keep: Int) -> MagnitudeBracket {
    MagnitudeBracket(keep: keep, count: count, low: low, high: high, budget: budget)
  }

  /// A bracket with the given ends (`low <= high`), for tests.
  init(keep: Int, count: Int, low: UInt32, high: UInt32, budget: Int) {
    (self.keep, self.count, self.low, self.high, self.budget) = (keep, count, low, high, budget)
  }

  /// The magnitude keys at `indices` (from 0) of `values`' keys in descending order: the
  /// thresholds of keeping `index + 1` of them.
  static func descendingKeys(_ values: [Float], at indices: [Int]) -> [UInt32] {
    KeyOrderStatistic.select([values.map { $0.bitPattern & 0x7FFF_FFFF }], ranks: indices).map(\.key)
  }

  /// The pass's summary of one range: by AVX-512 or AVX2 where the machine has it and `unit`
  /// allows it, else portably; the same summary every way.
  public func summarize(_ values: [Float], unit: VectorUnit = .machine) -> Summary {
    let sweep: KeySweep
    switch unit.available {
    case .portable: return summarizePortably(values)
    case .avx2: sweep = mergekit_bracket_summary_avx2
    case .avx512: sweep = mergekit_bracket_summary_avx512
    }
    return values.withUnsafeBytes { raw in
      summarizeVectorized(mergekit_key_source(first: raw.baseAddress, second: nil), count: values.count, sweep: sweep)
    }
  }

  /// The summary of the differences `model - base` (rounded to `Float`) of `count` stored
  /// elements: the summary of `Kernels.differences` of them. Two BF16 inputs on a machine with
  /// AVX-512 or AVX2 (when `unit` allows it) form each difference in a register as the loops go,
  /// without decoding the base or writing the differences out.
  public func summarize(
    differenceOf model: Kernels.StoredElements, minus base: Kernels.StoredElements, count: Int,
    unit: VectorUnit = .machine
  ) -> Summary {
    let sweep: KeySweep?
    switch unit.available {
    case .avx512: sweep = mergekit_bracket_summary_bf16_differences_avx512
    case .avx2: sweep = mergekit_bracket_summary_bf16_differences_avx2
    case .portable: sweep = nil
    }
    guard let sweep, model.dtype == .bf16, base.dtype == .bf16 else {
      return summarize(Kernels.differences([model], minus: base.decoded(count: count))[0], unit: unit)
    }
    return summarizeVectorized(mergekit_key_source(first: model.start, second: base.start), count: count, sweep: sweep)
  }

  /// A `CKernels` bracket sweep (`mergekit_bracket_summary_*`): reads `n` keys from a source,
  /// writes the counts above, at `high` and at `low`, and the inside keys in order; returns how
  /// many keys are inside.
  typealias KeySweep = (
    mergekit_key_source, Int, UInt32, UInt32, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt32>?
  ) -> Int

  /// `summarize` by vector compares in one sweep over the keys `sweep` reads from `source`: the
  /// end counts kept per lane, the inside keys compressed out a vector at a time (no branch per
  /// block, where about a third of the blocks of 16 hold a key inside a typical bracket) into
  /// scratch with room for all (only the pages written are touched), copied out. The same
  /// summary as the portable loop.
  func summarizeVectorized(_ source: mergekit_key_source, count n: Int, sweep: KeySweep) -> Summary {
    var summary = Summary()
    guard n > 0, source.first != nil else { return summary }
    let (low, high) = (self.low, self.high)
    var counts: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
    withUnsafeTemporaryAllocation(of: UInt32.self, capacity: n + 16) { scratch in
      let inside = withUnsafeMutableBytes(of: &counts) { c in
        sweep(source, n, low, high, c.baseAddress?.assumingMemoryBound(to: UInt64.self), scratch.baseAddress)
      }
      if inside > 0 { summary.inner = Array(scratch.prefix(inside)) }
    }
    summary.above = Int(counts.0)
    summary.atHigh = Int(counts.1)
    summary.atLow = low == high ? 0 : Int(counts.2)
    return summary
  }

  /// `summarize` with Swift's vectors, on any CPU: a branch-free counting loop over 16 lanes at
  /// a time (keys are below 2^31, so `(a - b) >> 31` is `b > a`; the scalar form of the loop
  /// compiled to comparisons and flag moves, 2-3 cycles an element), then, only when some keys
  /// fall inside, a loop collecting them in order from the blocks of 16 that hold one.
  func summarizePortably(_ values: [Float]) -> Summary {
    var summary = Summary()
    let (low, high) = (self.low, self.high)
    typealias Lanes = SIMD16<UInt32>
    let lanes = Lanes.scalarCount
    values.withUnsafeBytes { raw in
      guard let x = raw.baseAddress else { return }
      let n = values.count
      let (lowV, highV, magnitude) = (Lanes(repeating: low), Lanes(repeating: high), Lanes(repeating: 0x7FFF_FFFF))
      var (above, atHigh, atLow, inside) = (Lanes(), Lanes(), Lanes(), Lanes())
      var block = 0
      while block + lanes <= n {
        let b = x.loadUnaligned(fromByteOffset: 4 * block, as: Lanes.self) & magnitude
        above &+= (highV &- b) &>> 31  // b > high
        atHigh &+= ((b ^ highV) &- 1) &>> 31  // b == high
        atLow &+= ((b ^ lowV) &- 1) &>> 31  // b == low
        inside &+= ((lowV &- b) &>> 31) & ((b &- highV) &>> 31)  // low < b < high
        block += lanes
      }
      var (tailAbove, tailHigh, tailLow, tailInside): (UInt32, UInt32, UInt32, UInt32) = (0, 0, 0, 0)
      for i in block..<n {
        let b = x.load(fromByteOffset: 4 * i, as: UInt32.self) & 0x7FFF_FFFF
        tailAbove &+= (high &- b) >> 31
        tailHigh &+= ((b ^ high) &- 1) >> 31
        tailLow &+= ((b ^ low) &- 1) >> 31
        tailInside &+= ((low &- b) >> 31) & ((b &- high) >> 31)
      }
      summary.above = Int(above.wrappedSum() &+ tailAbove)
      summary.atHigh = Int(atHigh.wrappedSum() &+ tailHigh)
      summary.atLow = low == high ? 0 : Int(atLow.wrappedSum() &+ tailLow)
      let count = Int(inside.wrappedSum() &+ tailInside)
      guard count > 0 else { return }
      summary.inner = [UInt32](unsafeUninitializedCapacity: count) { out, initialized in
        var k = 0
        func collect(_ range: Range<Int>) {
          for i in range {
            let b = x.load(fromByteOffset: 4 * i, as: UInt32.self) & 0x7FFF_FFFF
            if b > low && b < high {
              out[k] = b
              k += 1
            }
          }
        }
        // Only the blocks of 16 with a key inside are collected one by one.
        var first = 0
        while first + lanes <= n {
          let b = x.loadUnaligned(fromByteOffset: 4 * first, as: Lanes.self) & magnitude
          if any((b .> lowV) .& (b .< highV)) { collect(first..<(first + lanes)) }
          first += lanes
        }
        collect(block..<n)
        initialized = k
      }
    }
    return summary
  }

  /// The ranker with its exact threshold, and the threshold-equal elements before each range
  /// (in range order) and in the whole tensor, from every range's summary in order; nil when the
  /// k-th largest is outside the bracket or more than `budget` keys fell strictly inside it.
  public func ranker(_ summaries: [Summary]) -> (ranker: MagnitudeRanker, equalBefore: [Int], equalTotal: Int)? {
    let above = summaries.reduce(0) { $0 + $1.above }
    let atHigh = summaries.reduce(0) { $0 + $1.atHigh }
    let atLow = summaries.reduce(0) { $0 + $1.atLow }
    let inside = summaries.reduce(0) { $0 + $1.inner.count }
    guard above < keep, inside <= budget else { return nil }
    let key: UInt32
    let equalToKeep: Int
    let equalByRange: [Int]
    if keep <= above + atHigh {
      (key, equalToKeep, equalByRange) = (high, keep - above, summaries.map(\.atHigh))
    } else if keep <= above + atHigh + inside {
      // The (keep - above - atHigh)-th largest inner key.
      let wanted = keep - above - atHigh
      let statistic = KeyOrderStatistic.select(summaries.map(\.inner), ranks: [wanted - 1])[0]
      (key, equalToKeep, equalByRange) = (statistic.key, wanted - statistic.larger, statistic.equalByPart)
    } else if keep <= above + atHigh + inside + atLow {
      (key, equalToKeep, equalByRange) = (low, keep - above - atHigh - inside, summaries.map(\.atLow))
    } else {
      return nil
    }
    var before: [Int] = []
    before.reserveCapacity(equalByRange.count)
    var running = 0
    for equal in equalByRange {
      before.append(running)
      running += equal
    }
    return (
      MagnitudeRanker(keep: keep, count: count, threshold: (key, equalToKeep), needsTieOrder: running > equalToKeep),
      before, running
    )
  }
}
