/// Exact top-k by magnitude without sorting: two radix-histogram passes over the bit patterns of
/// |x| (for non-negative floats the bit pattern orders like the value) find the k-th largest
/// magnitude, then one pass marks the elements. The order is total: larger |x| first, and among
/// equal magnitudes the lower index first, so the result is unique and machine independent.
/// NaN magnitudes rank above infinity.
public enum Selection {
  /// `mask[i]` is true for exactly `min(k, count)` elements: the k largest by |x|.
  public static func largestMagnitudes(_ values: [Float], keep k: Int) -> [Bool] {
    let n = values.count
    if k <= 0 { return [Bool](repeating: false, count: n) }
    if k >= n { return [Bool](repeating: true, count: n) }
    let (threshold, equalToKeep) = threshold(values, k)
    // Elements equal to the threshold are kept in index order: count them per block first.
    let blockSize = Elementwise.blockSize
    let blocks = (n + blockSize - 1) / blockSize
    var equalBefore = [Int](repeating: 0, count: blocks + 1)
    equalBefore.withUnsafeMutableBufferPointer { slots in
      let out = SendablePointer(slots.baseAddress)
      try? Parallel.forEach(blocks) { _, block in
        var c = 0
        for i in (block * blockSize)..<min(n, (block + 1) * blockSize) where key(values[i]) == threshold { c += 1 }
        out.pointer![block + 1] = c
      }
    }
    for b in 0..<blocks { equalBefore[b + 1] += equalBefore[b] }
    return [Bool](unsafeUninitializedCapacity: n) { buffer, initialized in
      let out = SendablePointer(buffer.baseAddress)
      try? Parallel.forEach(blocks) { _, block in
        var rank = equalBefore[block]
        for i in (block * blockSize)..<min(n, (block + 1) * blockSize) {
          let b = key(values[i])
          var keep = b > threshold
          if b == threshold {
            keep = rank < equalToKeep
            rank += 1
          }
          (out.pointer! + i).initialize(to: keep)
        }
      }
      initialized = n
    }
  }

  /// The magnitude bit pattern of the k-th largest element (1 <= k <= count) and how many
  /// elements equal to it belong to the top k.
  static func threshold(_ values: [Float], _ k: Int) -> (key: UInt32, equalToKeep: Int) {
    let high = histogram(values) { key($0) >> 16 }
    var above = 0
    var bin = 65535
    while above + high[bin] < k {
      above += high[bin]
      bin -= 1
    }
    let prefix = UInt32(bin)
    let low = histogram(values) { v -> UInt32? in
      let b = key(v)
      return b >> 16 == prefix ? b & 0xFFFF : nil
    }
    var lowBin = 65535
    while above + low[lowBin] < k {
      above += low[lowBin]
      lowBin -= 1
    }
    return (prefix << 16 | UInt32(lowBin), k - above)
  }

  @inline(__always) static func key(_ v: Float) -> UInt32 { v.bitPattern & 0x7FFF_FFFF }

  /// Counts of `bin(v)` over 65,536 bins (nil: not counted), one histogram per worker, summed.
  static func histogram(_ values: [Float], _ bin: (Float) -> UInt32?) -> [Int] {
    let n = values.count
    let blockSize = Elementwise.blockSize
    let blocks = (n + blockSize - 1) / blockSize
    let workers = min(Parallel.threadCount, max(1, blocks))
    var counts = [Int](repeating: 0, count: workers * 65536)
    counts.withUnsafeMutableBufferPointer { slots in
      let out = SendablePointer(slots.baseAddress)
      try? Parallel.forEach(blocks, workers: workers) { worker, block in
        let h = out.pointer! + worker * 65536
        for i in (block * blockSize)..<min(n, (block + 1) * blockSize) {
          if let b = bin(values[i]) { h[Int(b)] += 1 }
        }
      }
    }
    var total = [Int](repeating: 0, count: 65536)
    for w in 0..<workers { for b in 0..<65536 { total[b] += counts[w * 65536 + b] } }
    return total
  }
}
