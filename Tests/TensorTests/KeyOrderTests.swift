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
  /// The digits cover exactly the bits where keys differ, however wide that span and wherever
  /// it lies (constant bits above and below it): as few passes as digits of 11 bits allow (8
  /// for fewer than 1024 keys), and the ranks those of a comparison sort by (key, index).
  @Test func digitsSpanTheBitsWhereKeysDiffer() {
    let rng = CounterRNG(seed: 11, stream: "key-order-digits")
    var workspace = KeyOrder.Workspace()
    for (round, (span, count)) in [
      (1, 1_500), (8, 1_500), (11, 1_500), (12, 1_500), (21, 2_048), (22, 2_048), (23, 2_048), (32, 1_024),
      (9, 300), (17, 300), (32, 1_023),
    ].enumerated() {
      let shift = (32 - span) / 2
      let low = UInt32((UInt64(1) << span) - 1)
      // The span's lowest and highest bits both differ between keys; the bits outside it are
      // the same in every key (ones above, zeros below).
      var keys = (0..<count).map { rng.bits32(UInt64(round * 10_000 + $0)) & low }
      keys[0] = 0
      keys[1] = low
      let high = span + shift == 32 ? UInt32(0) : ~UInt32(0) << UInt32(span + shift)
      keys = keys.map { $0 << UInt32(shift) | high }
      let digits = keys.withUnsafeBufferPointer { KeyOrder.Digits($0) }
      let widest = count >= 1024 ? 11 : 8
      #expect(digits.lowest == shift, "span \(span)")
      #expect(digits.passes == (span + widest - 1) / widest, "span \(span), \(count) keys")
      #expect(digits.passes * digits.width >= span && digits.width <= widest && digits.bins == 1 << digits.width)
      var expected = [Int32](repeating: -1, count: count)
      for (rank, index) in keys.indices.sorted(by: { (keys[$0], $0) < (keys[$1], $1) }).enumerated() {
        expected[index] = Int32(rank)
      }
      var ranks = [Int32](repeating: -1, count: count)
      ranks.withUnsafeMutableBufferPointer { out in keys.withUnsafeBufferPointer { workspace.ranks(of: $0, into: out) }
      }
      #expect(ranks == expected, "span \(span), \(count) keys")
    }
  }
}
