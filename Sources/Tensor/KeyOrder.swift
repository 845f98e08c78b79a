/// Ranks of unsigned integer keys without comparisons: a stable LSD radix sort, eight bits a
/// pass, in place of a comparison sort of index-tagged keys where many short arrays are ranked
/// (DELLA ranks every row of every task vector by magnitude). One sweep finds the digits where
/// keys differ, then each of those passes counts and scatters the keys by its digit.
public enum KeyOrder {
  /// Scratch for ranking many short arrays one after another (DELLA's rows): its buffers grow
  /// to the longest array seen and are reused, so that ranking a row allocates nothing. One
  /// workspace per thread.
  public struct Workspace {
    private var counts = [Int32](repeating: 0, count: 2 * 256)
    private var keys32 = ([UInt32](), [UInt32]())
    private var keys64 = ([UInt64](), [UInt64]())
    private var indices = ([Int32](), [Int32]())

    public init() {}

    /// Writes into `ranks[i]` the position of `keys[i]` in ascending key order, equal keys in
    /// index order (`ranks` holds at least `keys.count` elements).
    public mutating func ranks(of keys: UnsafeBufferPointer<UInt32>, into ranks: UnsafeMutableBufferPointer<Int32>) {
      grow(to: keys.count)
      Self.radixRanks(keys, &keys32.0, &keys32.1, &counts, &indices.0, &indices.1, into: ranks)
    }

    /// `ranks(of:into:)` for 64-bit keys.
    public mutating func ranks(of keys: UnsafeBufferPointer<UInt64>, into ranks: UnsafeMutableBufferPointer<Int32>) {
      grow(to: keys.count)
      Self.radixRanks(keys, &keys64.0, &keys64.1, &counts, &indices.0, &indices.1, into: ranks)
    }

    private mutating func grow(to n: Int) {
      precondition(n <= Int(Int32.max))
      guard indices.0.count < n else { return }
      keys32 = ([UInt32](repeating: 0, count: n), [UInt32](repeating: 0, count: n))
      keys64 = ([UInt64](repeating: 0, count: n), [UInt64](repeating: 0, count: n))
      indices = ([Int32](repeating: 0, count: n), [Int32](repeating: 0, count: n))
    }

    /// The radix passes: keys and indices move between the two scratch buffers, and the last
    /// pass that matters writes each key's rank instead of moving it.
    private static func radixRanks<Key: FixedWidthInteger & UnsignedInteger>(
      _ keys: UnsafeBufferPointer<Key>, _ firstKeys: inout [Key], _ secondKeys: inout [Key], _ counts: inout [Int32],
      _ firstIndices: inout [Int32], _ secondIndices: inout [Int32], into ranks: UnsafeMutableBufferPointer<Int32>
    ) {
      firstKeys.withUnsafeMutableBufferPointer { firstKeys in
        secondKeys.withUnsafeMutableBufferPointer { secondKeys in
          counts.withUnsafeMutableBufferPointer { counts in
            firstIndices.withUnsafeMutableBufferPointer { firstIndices in
              secondIndices.withUnsafeMutableBufferPointer { secondIndices in
                radixRanks(
                  keys, keys: (firstKeys, secondKeys), counts: counts, indices: (firstIndices, secondIndices),
                  into: ranks)
              }
            }
          }
        }
      }
    }

    private static func radixRanks<Key: FixedWidthInteger & UnsignedInteger>(
      _ keys: UnsafeBufferPointer<Key>,
      keys keyScratch: (UnsafeMutableBufferPointer<Key>, UnsafeMutableBufferPointer<Key>),
      counts c: UnsafeMutableBufferPointer<Int32>,
      indices: (UnsafeMutableBufferPointer<Int32>, UnsafeMutableBufferPointer<Int32>),
      into ranks: UnsafeMutableBufferPointer<Int32>
    ) {
      let n = keys.count
      precondition(ranks.count >= n)
      guard n > 0 else { return }
      let digits = Key.bitWidth / 8
      // The digits not every key shares: those where some bit differs.
      var (anySet, allSet) = (Key.zero, ~Key.zero)
      for key in keys {
        anySet |= key
        allSet &= key
      }
      let passes = (0..<digits).filter { d in (anySet ^ allSet) >> (8 * d) & 255 != 0 }
      guard let lastPass = passes.last else {
        for i in 0..<n { ranks[i] = Int32(truncatingIfNeeded: i) }
        return
      }
      // Each pass counts and places the two halves of its source with tables of their own,
      // side by side: two chains of counter updates instead of one, where runs of keys share
      // a digit (the exponent's). Within a digit value the first half's keys go first, so
      // the order stays stable.
      let half = n / 2
      let second = 256
      // Pass p reads from `source` (the input keys and identity indices at first) and writes
      // to buffer p % 2.
      var sourceKeys = UnsafeBufferPointer(rebasing: keys[0..<n])
      var sourceIndices: UnsafeBufferPointer<Int32>? = nil
      for (p, d) in passes.enumerated() {
        let shift = 8 * d
        @inline(__always) func byte(_ i: Int) -> Int { Int(truncatingIfNeeded: (sourceKeys[i] >> shift) & 255) }
        for b in 0..<512 { c[b] = 0 }
        for i in 0..<half {
          c[byte(i)] += 1
          c[second + byte(half + i)] += 1
        }
        if n % 2 == 1 { c[second + byte(n - 1)] += 1 }
        var running: Int32 = 0
        for b in 0..<256 {
          let (first, other) = (c[b], c[second + b])
          c[b] = running
          c[second + b] = running + first
          running += first + other
        }
        let targetKeys = p % 2 == 0 ? keyScratch.0 : keyScratch.1
        let targetIndices = p % 2 == 0 ? indices.0 : indices.1
        // Places each key: `place(i, at)` with its position in the pass's output.
        @inline(__always) func sweep(_ place: (Int, Int32) -> Void) {
          @inline(__always) func slot(_ i: Int, _ table: Int) -> Int32 {
            let s = table + byte(i)
            let at = c[s]
            c[s] = at + 1
            return at
          }
          for i in 0..<half {
            place(i, slot(i, 0))
            place(half + i, slot(half + i, second))
          }
          if n % 2 == 1 { place(n - 1, slot(n - 1, second)) }
        }
        switch (sourceIndices, d == lastPass) {
        case (nil, true):
          sweep { i, at in ranks[i] = at }
        case (let indices?, true):
          sweep { i, at in ranks[Int(indices[i])] = at }
        case (nil, false):
          sweep { i, at in
            targetKeys[Int(at)] = sourceKeys[i]
            targetIndices[Int(at)] = Int32(truncatingIfNeeded: i)
          }
        case (let indices?, false):
          sweep { i, at in
            targetKeys[Int(at)] = sourceKeys[i]
            targetIndices[Int(at)] = indices[i]
          }
        }
        sourceKeys = UnsafeBufferPointer(rebasing: targetKeys[0..<n])
        sourceIndices = UnsafeBufferPointer(rebasing: targetIndices[0..<n])
      }
    }
  }
}
