import Foundation
import Tensor
import Testing

@testable import Checkpoint
@testable import TestSupport

@Suite struct SurgeryTests {
  static let names = [
    "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
    "lm_head.weight",
  ]

  @Test func selectDropAndRenameInOrder() throws {
    let selection = try TensorSelection(
      select: "^model\\.", drop: "self_attn", renames: ["^model\\.layers\\.(\\d+)\\.=blocks.$1.", "up_proj=fc1"])
    let result = try selection.apply(to: Self.names, file: "m")
    #expect(result.map(\.source) == ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"])
    #expect(result.map(\.target) == ["blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight"])
  }

  @Test func collisionsEmptySelectionsAndBadPatternsAreErrors() throws {
    #expect(
      throws: CheckpointError.nameCollision(
        file: "m", first: "model.layers.0.mlp.up_proj.weight", second: "model.layers.1.mlp.up_proj.weight", target: "x")
    ) {
      try TensorSelection(select: "up_proj", renames: ["^.*$=x"]).apply(to: Self.names, file: "m")
    }
    #expect(throws: CheckpointError.nothingSelected(file: "m")) {
      try TensorSelection(select: "nothing").apply(to: Self.names, file: "m")
    }
    #expect(throws: CheckpointError.invalidPattern("([")) { try TensorSelection(select: "([") }
    #expect(throws: CheckpointError.invalidRename("abc")) { try TensorSelection(renames: ["abc"]) }
  }

  @Test func copyCastsOnlyFloatingTensorsAndKeepsValuesWithinRounding() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let weights = CounterRNG(seed: 1, stream: "w").normalTensor([300, 40])
    let ids = randomTensorData(.i64, shape: [5], seed: 2)
    let source = try openCheckpoint(
      try writeCheckpoint([("w", weights.encoded(as: .f32)), ("ids", ids)], to: folder.file("s.safetensors")))
    try copyCheckpoint(from: source, to: folder.file("c.mkz"), castTo: .bf16, options: WriteOptions(format: .mkz))
    let copy = try openCheckpoint(folder.file("c.mkz"))
    #expect(try copy.info("w").dtype == .bf16)
    #expect(try copy.read("ids") == ids)
    let values = try copy.tensor(named: "w").scalars
    for (v, w) in zip(values, weights.scalars) { #expect(abs(v - w) <= abs(w) * 0x1p-8) }  // bf16: half an ulp
    #expect(try copy.read("w") == weights.encoded(as: .bf16))
  }

  @Test func renamedCopyToAFolderUsesGeneratedShards() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let tensors = (0..<4).map { ("l.\($0)", randomTensorData(.f16, shape: [1000], seed: UInt64($0))) }
    let source = try openCheckpoint(try writeCheckpoint(tensors, to: folder.file("s.safetensors")))
    try copyCheckpoint(
      from: source, to: folder.file("out"), selection: try TensorSelection(renames: ["^l=layer"]),
      options: WriteOptions(shardSize: 4000))
    let copy = try openCheckpoint(folder.file("out"))
    #expect(copy.tensors.map(\.name) == ["layer.0", "layer.1", "layer.2", "layer.3"])
    #expect(copy.files.count == 2)
    for (name, data) in tensors { #expect(try copy.read("layer" + name.dropFirst()) == data) }
  }
}

@Suite struct ExampleModelsTests {
  @Test func fineTunesDifferFromTheBaseByALowRankPlusSparseChange() {
    let arch = ExampleModels.Architecture()
    let base = ExampleModels.baseWeights(arch)
    let tuned = ExampleModels.fineTune(base, seed: 1, sparseFraction: 0)
    #expect(base.map(\.name) == arch.tensors.map(\.name))
    let (_, w) = base[2]
    let (_, t) = tuned[2]
    // The low-rank change has entries of about lowRankScale (0.001), 5% of the weights' 0.02.
    let change = zip(t.scalars, w.scalars).map { Double($0 - $1) }
    let rms = (change.reduce(0) { $0 + $1 * $1 } / Double(change.count)).squareRoot()
    #expect(rms > 0.0005 && rms < 0.002, "change rms \(rms)")
    let weightRMS = (w.squaredNorm / Double(w.count)).squareRoot()
    #expect(abs(weightRMS - 0.02) < 0.001)
  }
}
