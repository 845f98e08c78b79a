import Testing

@testable import Tensor

@Suite struct KeyOrderTests {
  /// The radix order is the order of a comparison sort by (key, index): on no key, one key,
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
      let expected = keys.indices.sorted { (keys[$0], $0) < (keys[$1], $1) }.map { Int32($0) }
      let order = keys.withUnsafeBufferPointer { KeyOrder.ascending($0) }
      #expect(order == expected, "\(keys.count) keys")
    }
  }
}
