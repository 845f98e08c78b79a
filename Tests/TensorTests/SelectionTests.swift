import Testing

@testable import Tensor

@Suite struct SelectionTests {
  /// Reference: sort indices by (|x| descending, index ascending), keep the first k.
  func referenceMask(_ x: [Float], _ k: Int) -> [Bool] {
    let order = x.indices.sorted { (abs(x[$0]), -$0) > (abs(x[$1]), -$1) }
    var mask = [Bool](repeating: false, count: x.count)
    for i in order.prefix(k) { mask[i] = true }
    return mask
  }

  @Test(arguments: [0, 1, 7, 500, 99_999, 100_000, 100_001])
  func largestMagnitudesMatchesASortOnRandomValues(_ k: Int) {
    let x = CounterRNG(seed: 1, stream: "sel").normalTensor([100_000]).scalars
    let mask = Selection.largestMagnitudes(x, keep: k)
    #expect(mask.filter { $0 }.count == min(k, x.count))
    #expect(mask == referenceMask(x, k))
  }

  @Test func tiesAreBrokenTowardTheLowerIndex() {
    // Many equal magnitudes of both signs, spread over several parallel blocks.
    let x: [Float] = (0..<200_000).map { (i: Int) -> Float in
      if i % 3 != 0 { return Float(i % 7) * 0.01 }
      return i % 2 == 0 ? 0.5 : -0.5
    }
    for k in [1, 1000, 66_667, 70_000] {
      #expect(Selection.largestMagnitudes(x, keep: k) == referenceMask(x, k))
    }
  }

  @Test func thresholdSplitsTheHighHistogramBin() {
    // Values sharing their top 16 bits differ only in the low bits.
    let x: [Float] = (0..<1000).map { Float(bitPattern: 0x3F80_0000 | UInt32(($0 * 7919) % 1000)) }
    #expect(Selection.largestMagnitudes(x, keep: 333) == referenceMask(x, 333))
  }

  @Test func elementwiseSumIsIndependentOfThreadsAndMatchesDouble() {
    let x = CounterRNG(seed: 2, stream: "sum").normalTensor([300_001]).scalars
    let sum = Elementwise.sum(x.count) { Double(x[$0]) }
    var blocked = 0.0
    for start in stride(from: 0, to: x.count, by: Elementwise.blockSize) {
      blocked += x[start..<min(x.count, start + Elementwise.blockSize)].reduce(0.0) { $0 + Double($1) }
    }
    #expect(sum == blocked)  // bit-identical: blocks are fixed and combined in order
    #expect(Elementwise.map(x.count) { x[$0] * 2 } == x.map { $0 * 2 })
  }
}
