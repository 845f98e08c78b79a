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
      ranker.observeHigh(values)
      ranker.finishHigh()
      ranker.observeLow(values)
      ranker.finishLow()
    }
    return ranker.mask(values, equalBefore: 0).mask
  }
}

/// Exact top-k by magnitude over a tensor seen in consecutive ranges (streaming), with the same
/// total order as `Selection.largestMagnitudes`: two histogram passes find the threshold, then a
/// pass in index order marks the elements, keeping those equal to the threshold by lowest index.
/// Feed every range to `observeHigh`, then every range to `observeLow`, then call `mask` on the
/// ranges in order, passing the running count of threshold-equal elements seen before.
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

  public mutating func observeHigh(_ values: [Float]) {
    guard !values.isEmpty else { return }
    values.withUnsafeBufferPointer { v in
      let x = UnsafeRawPointer(v.baseAddress!).assumingMemoryBound(to: UInt32.self)
      high.withUnsafeMutableBufferPointer { h in
        for i in 0..<values.count { h[Int((x[i] & 0x7FFF_FFFF) >> 16)] += 1 }
      }
    }
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

  public mutating func observeLow(_ values: [Float]) {
    guard !values.isEmpty else { return }
    let p = prefix
    values.withUnsafeBufferPointer { v in
      let x = UnsafeRawPointer(v.baseAddress!).assumingMemoryBound(to: UInt32.self)
      low.withUnsafeMutableBufferPointer { h in
        for i in 0..<values.count {
          let b = x[i] & 0x7FFF_FFFF
          if b >> 16 == p { h[Int(b & 0xFFFF)] += 1 }
        }
      }
    }
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
  }

  /// The kept elements of one range, given how many threshold-equal elements came before it;
  /// also returns how many the range holds (add it to the running count).
  public func mask(_ values: [Float], equalBefore: Int) -> (mask: [Bool], equalCount: Int) {
    if keep == 0 || values.isEmpty { return ([Bool](repeating: false, count: values.count), 0) }
    if keep == count { return ([Bool](repeating: true, count: values.count), 0) }
    let (key, equalToKeep) = threshold
    var rank = equalBefore
    let mask = [Bool](unsafeUninitializedCapacity: values.count) { out, initialized in
      values.withUnsafeBufferPointer { v in
        let x = UnsafeRawPointer(v.baseAddress!).assumingMemoryBound(to: UInt32.self)
        for i in 0..<values.count {
          let b = x[i] & 0x7FFF_FFFF
          var keep = b > key
          if b == key {
            keep = rank < equalToKeep
            rank += 1
          }
          (out.baseAddress! + i).initialize(to: keep)
        }
      }
      initialized = values.count
    }
    return (mask, rank - equalBefore)
  }
}
