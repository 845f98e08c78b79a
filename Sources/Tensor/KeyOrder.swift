/// Orders of 64-bit keys without comparisons.
public enum KeyOrder {
  /// The indices of `keys` in ascending key order, equal keys in index order: a stable LSD
  /// radix sort, eight bits a pass, skipping the passes whose digit every key shares. It
  /// replaces a comparison sort of index-tagged keys where many short arrays are ranked (DELLA
  /// ranks every row of every task vector by magnitude): one sweep counts all eight digits,
  /// then each pass that matters scatters the keys by its digit.
  public static func ascending(_ keys: UnsafeBufferPointer<UInt64>) -> [Int32] {
    let n = keys.count
    precondition(n <= Int(Int32.max))
    var counts = [Int](repeating: 0, count: 8 * 256)
    counts.withUnsafeMutableBufferPointer { c in
      for key in keys {
        for digit in 0..<8 { c[256 * digit + Int(truncatingIfNeeded: (key >> UInt64(8 * digit)) & 255)] += 1 }
      }
    }
    var current = Array(keys)
    var order = (0..<n).map { Int32($0) }
    var nextKeys = [UInt64](repeating: 0, count: n)
    var nextOrder = [Int32](repeating: 0, count: n)
    for digit in 0..<8 {
      let (base, shift) = (256 * digit, UInt64(8 * digit))
      // A digit every key shares leaves the order as it is.
      guard let key = keys.first, counts[base + Int(truncatingIfNeeded: (key >> shift) & 255)] != n else { continue }
      var running = 0
      for b in 0..<256 {
        let c = counts[base + b]
        counts[base + b] = running
        running += c
      }
      counts.withUnsafeMutableBufferPointer { c in
        current.withUnsafeBufferPointer { k in
          order.withUnsafeBufferPointer { o in
            nextKeys.withUnsafeMutableBufferPointer { nk in
              nextOrder.withUnsafeMutableBufferPointer { no in
                for i in 0..<n {
                  let slot = base + Int(truncatingIfNeeded: (k[i] >> shift) & 255)
                  let at = c[slot]
                  c[slot] = at + 1
                  nk[at] = k[i]
                  no[at] = o[i]
                }
              }
            }
          }
        }
      }
      swap(&current, &nextKeys)
      swap(&order, &nextOrder)
    }
    return order
  }
}
