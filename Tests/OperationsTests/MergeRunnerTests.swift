import Checkpoint
import Foundation
import Merge
import Tensor
import Testing

@testable import Operations
@testable import TestSupport

/// Whole-tensor methods run in groups that fit the plan's memory budget, counting the method's
/// declared scratch; the output does not depend on how the tensors were grouped.
@Suite struct MergeRunnerTests {
  func models(in folder: TemporaryFolder) throws -> (base: any Checkpoint, models: [any Checkpoint]) {
    let shapes: [(String, [Int])] = [
      ("model.layers.0.self_attn.q_proj.weight", [40, 32]), ("model.layers.0.input_layernorm.weight", [32]),
      ("model.layers.0.mlp.up_proj.weight", [64, 32]), ("model.layers.0.mlp.down_proj.weight", [32, 64]),
    ]
    var paths: [String] = []
    for (i, label) in ["base", "a", "b", "c"].enumerated() {
      let path = folder.file("\(label).safetensors")
      try writeCheckpoint(
        shapes.enumerated().map { j, entry in
          (entry.0, randomTensorData(.f32, shape: entry.1, seed: UInt64(10 * i + j), scale: i == 0 ? 0.5 : 0.05))
        }, to: path)
      paths.append(path)
    }
    let opened = try paths.map { try openCheckpoint($0) }
    return (opened[0], Array(opened.dropFirst()))
  }

  @Test func groupsFitTheBudgetWithTheMethodsScratchAndGiveTheSameBytes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let (base, models) = try models(in: folder)
    var plan = try MergePlan(
      method: STFMerge(), base: base, models: models, global: [:], perModel: Array(repeating: [:], count: 3))
    let parameters = try plan.parameters("model.layers.0.mlp.up_proj.weight")
    let scratch = STFMerge().scratchBytes(
      name: "model.layers.0.mlp.up_proj.weight", shape: [64, 32], models: 3, parameters)
    // At least the three task matrices in Float.
    #expect(scratch >= 3 * 64 * 32 * 4)
    #expect(
      STFMerge().scratchBytes(name: "model.layers.0.input_layernorm.weight", shape: [32], models: 3, parameters) == 0)

    var outputs: [[UInt8]] = []
    for budget in [1, 1 << 30] {
      plan.memoryBudget = budget
      let groups = try MergeRunner.groups(plan)
      #expect(groups.count == (budget == 1 ? 4 : 1))
      for group in groups where group.range.count > 1 { #expect(group.bytes <= budget) }
      let sum = try plan.items.reduce(0) { try $0 + MergeRunner.workingSet($1, plan: plan) }
      #expect(try MergeRunner.workingSetBytes(plan) == (budget == 1 ? groups.map(\.bytes).max() : sum))
      let out = folder.file("merged-\(budget).safetensors")
      try MergeRunner.run(plan, to: out, options: WriteOptions(overwrite: true))
      outputs.append(readBytes(out))
    }
    #expect(outputs[0] == outputs[1])
  }
}
