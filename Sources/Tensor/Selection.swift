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
      ranker.addHigh(ranker.highCounts(values))
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

  /// Pass 1 summary of one range: counts by the high 16 bits of |x|.
  public func highCounts(_ values: [Float]) -> [UInt32] {
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
