import Testing

@testable import Tensor

@Suite struct KeyOrderTests {
  /// The radix ranks are those of a comparison sort by (key, index): on no key, one key,
  /// keys all equal, keys that differ only in their top or bottom byte (passes skipped and
  /// not), many duplicates, and keys spread over all 64 bits.
  @Test func radixOrderIsTheComparisonOrder() {
    let rng = CounterRNG(seed: 5, stream: "key-order")
    func draw(_ i: Int) -> UInt64 { UInt64(rng.bits32(UInt64(2 * i))) << 32 | UInt64(rng.bits32(UInt64(2 * i + 1))) }
    let cases: [[UInt64]] = [
      [], [42], [UInt64](repeating: 7, count: 100),
      (0..<500).map { UInt64($0 % 3) << 56 }, (0..<500).map { UInt64(($0 * 7) % 5) },
      (0..<3_000).map { draw($0) & 0x0000_00FF_F000_0000 },  // duplicates, middle bytes only
      (0..<3_000).map { draw($0) },
      (0..<3_000).map { Double(Float(bitPattern: UInt32(truncatingIfNeeded: draw($0)) & 0x3FFF_FFFF)).bitPattern },
    ]
    for keys in cases {
      var expected = [Int32](repeating: -1, count: keys.count)
      for (rank, index) in keys.indices.sorted(by: { (keys[$0], $0) < (keys[$1], $1) }).enumerated() {
        expected[index] = Int32(rank)
      }
      var workspace = KeyOrder.Workspace()
      var ranks = [Int32](repeating: -1, count: keys.count)
      ranks.withUnsafeMutableBufferPointer { out in keys.withUnsafeBufferPointer { workspace.ranks(of: $0, into: out) }
      }
      #expect(ranks == expected, "\(keys.count) keys")
    }
  }

  /// One workspace ranks 32-bit and 64-bit arrays of different lengths one after another (its
  /// buffers reused, longest first and last), each as a comparison sort by (key, index) ranks
  /// them.
  @Test func reusedWorkspaceRanksAsTheComparisonSort() {
    let rng = CounterRNG(seed: 9, stream: "key-order-ranks")
    var workspace = KeyOrder.Workspace()
    func expectedRanks<Key: Comparable>(_ keys: [Key]) -> [Int32] {
      var ranks = [Int32](repeating: -1, count: keys.count)
      for (rank, index) in keys.indices.sorted(by: { (keys[$0], $0) < (keys[$1], $1) }).enumerated() {
        ranks[index] = Int32(rank)
      }
      return ranks
    }
    for (round, length) in [2_048, 1, 0, 700, 2_048, 5_000].enumerated() {
      let draws = (0..<length).map { rng.bits32(UInt64(round * 10_000 + $0)) }
      // Few distinct values (ties), values in the low bytes only, and full 32 bits.
      for keys in [draws.map { $0 % 7 }, draws.map { $0 & 0xFFF }, draws] {
        var ranks = [Int32](repeating: -1, count: length)
        ranks.withUnsafeMutableBufferPointer { out in
          keys.withUnsafeBufferPointer { workspace.ranks(of: $0, into: out) }
        }
        #expect(ranks == expectedRanks(keys), "32-bit keys, \(length) of them")
        let wide = keys.enumerated().map { UInt64($0.element) << 32 | UInt64($0.offset % 3) }
        ranks.withUnsafeMutableBufferPointer { out in
          wide.withUnsafeBufferPointer { workspace.ranks(of: $0, into: out) }
        }
        #expect(ranks == expectedRanks(wide), "64-bit keys, \(length) of them")
      }
    }
  }
}
