/// Ranks of unsigned integer keys without comparisons: a stable LSD radix sort, in place of a
/// comparison sort of index-tagged keys where many short arrays are ranked (DELLA ranks every
/// row of every task vector by magnitude). One sweep finds the span of bits where keys differ
/// and cuts it into as few digits of up to 11 bits as it takes (`Digits`), then each pass counts
/// and scatters the keys by its digit.
public enum KeyOrder {
  /// Scratch for ranking many short arrays one after another (DELLA's rows): its buffers grow
  /// to the longest array seen and are reused, so that ranking a row allocates nothing. One
  /// workspace per thread.
  public struct Workspace {
    private var counts = [Int32](repeating: 0, count: Digits.tableSize)
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
      let digits = Digits(keys)
      guard digits.passes > 0 else {
        for i in 0..<n { ranks[i] = Int32(truncatingIfNeeded: i) }
        return
      }
      let (width, bins, passes) = (digits.width, digits.bins, digits.passes)
      // Each pass has two tables, one for each half of its source: two chains of counter
      // updates instead of one where runs of keys share a digit (the exponent's, or the few
      // values of a task vector's quantised differences). Within a digit value the first
      // half's keys go first, so the order stays stable.
      let tableSize = 2 * bins
      precondition(c.count >= tableSize)
      let (half, odd) = (n / 2, n % 2 == 1)
      let mask = Key(truncatingIfNeeded: bins - 1)
      @inline(__always) func digit(_ key: Key, _ pass: Int) -> Int {
        Int(truncatingIfNeeded: key &>> (digits.lowest + pass * width) & mask)
      }
      // Pass p reads from `source` (the input keys and identity indices at first) and writes
      // to buffer p % 2; the last writes each key's rank instead of moving it.
      var sourceKeys = UnsafeBufferPointer(rebasing: keys[0..<n])
      var sourceIndices: UnsafeBufferPointer<Int32>? = nil
      for p in 0..<passes {
        let table = UnsafeMutableBufferPointer(rebasing: c[0..<tableSize])
        // The pass's counts for each half of its source, then the first positions of each
        // digit's keys from either half.
        for b in 0..<tableSize { table[b] = 0 }
        for i in 0..<half {
          table[digit(sourceKeys[i], p)] += 1
          table[bins + digit(sourceKeys[half + i], p)] += 1
        }
        if odd { table[bins + digit(sourceKeys[n - 1], p)] += 1 }
        var running: Int32 = 0
        for b in 0..<bins {
          let (first, second) = (table[b], table[b + bins])
          table[b] = running
          table[b + bins] = running + first
          running += first + second
        }
        let targetKeys = p % 2 == 0 ? keyScratch.0 : keyScratch.1
        let targetIndices = p % 2 == 0 ? indices.0 : indices.1
        // Places each key: `place(i, at)` with its position in the pass's output.
        @inline(__always) func sweep(_ place: (Int, Int32) -> Void) {
          @inline(__always) func slot(_ i: Int, _ second: Int) -> Int32 {
            let s = second + digit(sourceKeys[i], p)
            let at = table[s]
            table[s] = at + 1
            return at
          }
          for i in 0..<half {
            place(i, slot(i, 0))
            place(half + i, slot(half + i, bins))
          }
          if odd { place(n - 1, slot(n - 1, bins)) }
        }
        switch (sourceIndices, p == passes - 1) {
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

  /// The digits a radix sort of some keys takes: only the span of bits where some keys differ
  /// (from the lowest such bit to the highest), cut into `passes` digits of `width` bits, as
  /// few passes as digits of at most 11 bits allow (8 for fewer than 1024 keys, where clearing
  /// and summing larger tables would cost more than the keys).
  struct Digits {
    /// The lowest bit where two keys differ.
    let lowest: Int
    /// Bits per digit, and the size of each pass's table (`1 << width`).
    let width: Int
    let bins: Int
    /// How many passes: 0 when every key is the same.
    let passes: Int

    init<Key: FixedWidthInteger & UnsignedInteger>(_ keys: UnsafeBufferPointer<Key>) {
      var (anySet, allSet) = (Key.zero, ~Key.zero)
      for key in keys {
        anySet |= key
        allSet &= key
      }
      let differ = anySet ^ allSet
      guard differ != 0 else {
        (lowest, width, bins, passes) = (0, 0, 1, 0)
        return
      }
      lowest = differ.trailingZeroBitCount
      let span = Key.bitWidth - differ.leadingZeroBitCount - lowest
      let widest = keys.count >= 1024 ? Self.widest : 8
      passes = (span + widest - 1) / widest
      width = (span + passes - 1) / passes
      bins = 1 << width
    }

    /// The widest digit: a pass's two tables of 2048 counters (16 KB) stay in the first-level
    /// cache.
    static let widest = 11

    /// Counters a pass's two tables take at most.
    static let tableSize = 2 << widest
  }
}
