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
}
