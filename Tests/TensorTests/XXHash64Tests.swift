import Testing

@testable import Tensor

@Suite struct XXHash64Tests {
  /// Reference values from the C implementation (Python's xxhash package).
  @Test func matchesReferenceVectors() {
    #expect(XXHash64.hash([UInt8]()) == 0xEF46_DB37_51D8_E999)
    #expect(XXHash64.hash(Array("a".utf8)) == 0xD24E_C4F1_A98C_6E5B)
    #expect(XXHash64.hash(Array("abc".utf8)) == 0x44BC_2CF5_AD77_0999)
    #expect(XXHash64.hash(Array("abc".utf8), seed: 7) == 0x9E75_5206_1566_76D7)
    let long =
      Array((0..<256).map { UInt8($0) }) + Array((0..<256).map { UInt8($0) }) + Array((0..<256).map { UInt8($0) })
      + Array("xyz".utf8)
    #expect(XXHash64.hash(long) == 0xE921_A1B4_5BD7_79F8)
    #expect(XXHash64.hash(long, seed: 7) == 0xB635_55D1_BF05_377F)
  }
}

@Suite struct CounterRNGTests {
  @Test func drawsArePureFunctionsOfSeedStreamAndIndex() {
    let a = CounterRNG(seed: 5, stream: "layer.0")
    let b = CounterRNG(seed: 5, stream: "layer.0")
    let forward = (0..<100).map { a.bits(UInt64($0)) }
    let backward = (0..<100).reversed().map { b.bits(UInt64($0)) }.reversed()
    #expect(forward == Array(backward))
    #expect(CounterRNG(seed: 6, stream: "layer.0").bits(0) != a.bits(0))
    #expect(CounterRNG(seed: 5, stream: "layer.1").bits(0) != a.bits(0))
  }

  @Test func normalDrawsHaveUnitMomentsAndUniformDrawsStayInRange() {
    let rng = CounterRNG(seed: 9, stream: "moments")
    let n = 200_000
    var sum = 0.0
    var squares = 0.0
    for i in 0..<n {
      let x = Double(rng.normal(UInt64(i)))
      sum += x
      squares += x * x
    }
    let mean = sum / Double(n)
    let variance = squares / Double(n) - mean * mean
    #expect(abs(mean) < 0.01)  // standard error 0.0022
    #expect(abs(variance - 1) < 0.02)  // standard error 0.0032
    #expect((0..<10_000).allSatisfy { (0..<1).contains(rng.uniform(UInt64($0))) })
  }

  /// DARE's 32-bit keep draws: each bit is balanced; at density 0.3 the kept fraction, and the
  /// fraction of pairs both kept (neighbours, the same counter in two models' streams, counters
  /// 2^32 apart) match independent draws, each within 5 standard errors.
  @Test func keepDrawsAreBalancedAndIndependent() {
    let (a, b) = (CounterRNG(seed: 3, stream: "w#0"), CounterRNG(seed: 3, stream: "w#1"))
    let n = 1 << 20
    var ones = [Int](repeating: 0, count: 32)
    var (kept, neighbours, streams, far) = (0, 0, 0, 0)
    guard let bound = CounterRNG.keepBound(density: 0.3) else {
      Issue.record("density 0.3 keeps every draw")
      return
    }
    func keeps(_ rng: CounterRNG, _ i: UInt64) -> Bool { rng.bits32(i) < bound }
    for i in 0..<UInt64(n) {
      let draw = a.bits32(i)
      for bit in 0..<32 where draw >> UInt32(bit) & 1 == 1 { ones[bit] += 1 }
      let k = keeps(a, i)
      if k { kept += 1 }
      if k && keeps(a, i + 1) { neighbours += 1 }
      if k && keeps(b, i) { streams += 1 }
      if k && keeps(a, i + (1 << 32)) { far += 1 }
    }
    let count = Double(n)
    for bit in 0..<32 { #expect(abs(Double(ones[bit]) / count - 0.5) < 5 * (0.25 / count).squareRoot()) }
    #expect(abs(Double(kept) / count - 0.3) < 5 * (0.21 / count).squareRoot())
    for both in [neighbours, streams, far] {
      #expect(abs(Double(both) / count - 0.09) < 5 * (0.09 * 0.91 / count).squareRoot())
    }
    #expect(CounterRNG.keepBound(density: 1) == nil && CounterRNG.keepBound(density: 0.5) == 0x8000_0000)
  }
}
