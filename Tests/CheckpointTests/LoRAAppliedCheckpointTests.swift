import Foundation
import Tensor
import Testing

@testable import Checkpoint
@testable import TestSupport

/// `base+adapter`: a weight reads as base + (alpha / r) B A, computed for the rows a byte range
/// needs only; every range is the slice of the whole, in both of PEFT's orientations.
@Suite struct LoRAAppliedCheckpointTests {
  @Test(arguments: [false, true])
  func rangesAreSlicesOfTheAppliedWeight(_ fanInFanOut: Bool) throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let (out, input, rank) = (7, 5, 2)
    let stored = fanInFanOut ? [input, out] : [out, input]
    let weight = CounterRNG(seed: 3, stream: "w").normalTensor(stored)
    try ModelFolder.write(
      [("m.q.weight", weight)], files: ["config.json": "{}"], dtype: .bf16, to: folder.file("base"), overwrite: false)
    let a = CounterRNG(seed: 3, stream: "a").normalTensor([rank, input], scale: 0.1)
    let b = CounterRNG(seed: 3, stream: "b").normalTensor([out, rank], scale: 0.1)
    try FileManager.default.createDirectory(atPath: folder.file("lora"), withIntermediateDirectories: true)
    try writeCheckpoint(
      [
        ("base_model.model.m.q.lora_A.weight", a.encoded(as: .f32)),
        ("base_model.model.m.q.lora_B.weight", b.encoded(as: .f32)),
      ], to: folder.file("lora/adapter_model.safetensors"))
    try Data(#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": \#(fanInFanOut)}"#.utf8).write(
      to: URL(fileURLWithPath: folder.file("lora/adapter_config.json")))
    let applied = try openCheckpoint(folder.file("base") + "+" + folder.file("lora"))
    let base = try openCheckpoint(folder.file("base")).tensor(named: "m.q.weight")
    // Float64 reference: base + 2 (B A), transposed with fan_in_fan_out.
    let expected = (0..<(out * input)).map { e -> Double in
      let (i, j) = (e / stored[1], e % stored[1])
      let (o, n) = fanInFanOut ? (j, i) : (i, j)
      let delta = (0..<rank).reduce(0.0) { $0 + Double(b.scalars[o * rank + $1]) * Double(a.scalars[$1 * input + n]) }
      return Double(base.scalars[e]) + 2 * delta
    }
    let whole = try applied.tensor(named: "m.q.weight")
    #expect(zip(whole.scalars, expected).allSatisfy { abs(Double($0) - $1) <= 1e-2 * max(1, abs($1)) })
    let bytes = try applied.read("m.q.weight").bytes
    for range in [0..<2, 3..<11, (bytes.count - 5)..<bytes.count, 0..<bytes.count] {
      #expect(try applied.withBytes(of: "m.q.weight", range: range) { Array($0) } == Array(bytes[range]), "\(range)")
    }
  }
}
