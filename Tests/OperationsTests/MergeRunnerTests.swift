import Checkpoint
import Foundation
import Merge
import Tensor
import Testing

@testable import Operations
@testable import TestSupport

/// Whole-tensor methods run several tensors in flight within the plan's memory budget, counting
/// the method's declared scratch; the output does not depend on how many were in flight.
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

  @Test func tensorsInFlightFitTheBudgetWithTheMethodsScratchAndGiveTheSameBytes() throws {
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
    let sizes = try plan.items.map { try MergeRunner.workingSet($0, plan: plan) }
    for budget in [1, 1 << 30] {
      plan.memoryBudget = budget
      // One run of whole tensors: it holds the budget at most, or its largest tensor alone.
      let groups = try MergeRunner.groups(plan)
      #expect(groups.count == 1)
      #expect(try MergeRunner.workingSetBytes(plan) == (budget == 1 ? sizes.max() : sizes.reduce(0, +)))
      let out = folder.file("merged-\(budget).safetensors")
      try MergeRunner.run(plan, to: out, options: WriteOptions(overwrite: true))
      outputs.append(readBytes(out))
    }
    #expect(outputs[0] == outputs[1])
  }
}

extension MergeRunnerTests {
  /// A whole tensor's working set counts its inputs' stored bytes (their mapped pages stay until
  /// it is written) besides the decoded inputs and result.
  @Test func workingSetsCountTheInputsStoredBytes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let (base, models) = try models(in: folder)
    let stf = try MergePlan(
      method: STFMerge(), base: base, models: models, global: [:], perModel: Array(repeating: [:], count: 3))
    for item in stf.items {
      let decoded = item.count * (4 * 5 + item.outputType.size)
      #expect(item.bytesRead == 4 * item.count * 4)
      #expect(try MergeRunner.workingSet(item, plan: stf) >= item.bytesRead + decoded)
    }
  }
}

extension MergeRunnerTests {
  /// SLERP's statistics pass reads the stored BF16 bytes when streamed and the decoded values
  /// (as F32) when merged whole: both give the same bits, on a tensor of several ranges and
  /// blocks and on one shorter than a block.
  @Test func slerpStreamedFromStoredBytesEqualsTheWholeTensorMerge() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let shapes: [(String, [Int])] = [("a.weight", [613, 1001]), ("b.weight", [3, 7])]
    var paths: [String] = []
    for (i, label) in ["base", "model"].enumerated() {
      let path = folder.file("\(label).safetensors")
      try writeCheckpoint(
        shapes.enumerated().map { j, entry in
          (entry.0, randomTensorData(.bf16, shape: entry.1, seed: UInt64(10 * i + j), scale: 0.5))
        }, to: path)
      paths.append(path)
    }
    let (base, model) = (try openCheckpoint(paths[0]), try openCheckpoint(paths[1]))
    let plan = try MergePlan(
      method: SlerpMerge(), base: base, models: [model], global: ["t": .number(0.3)], perModel: [[:]])
    let out = folder.file("merged.safetensors")
    try MergeRunner.run(plan, to: out, options: WriteOptions(overwrite: true))
    let merged = try openCheckpoint(out)
    for (name, _) in shapes {
      let whole = try SlerpMerge().merge(
        MergeInputs(name: name, base: try base.tensor(named: name), models: [try model.tensor(named: name)]),
        try plan.parameters(name))
      #expect(try merged.read(name) == whole.encoded(as: .bf16), "\(name)")
    }
  }
}

extension MergeRunnerTests {
  /// TIES, DARE-TIES and breadcrumbs-TIES streamed from BF16 files form their task vectors from
  /// the stored bytes inside the consensus merge (and fall back to arrays in the range where
  /// the kept ties at a threshold run out), and breadcrumbs and DARE-linear inside the same
  /// merge without its election: the bits of the whole-tensor merge, on a tensor of several
  /// ranges whose coarse values tie often.
  @Test func taskVectorMergesFromStoredBytesEqualTheWholeTensorMerge() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let shape = [700, 1_000]
    let n = shape[0] * shape[1]
    var paths: [String] = []
    for (i, label) in ["base", "a", "b", "c"].enumerated() {
      let rng = CounterRNG(seed: UInt64(40 + i), stream: label)
      // Multiples of 1/64 near zero: many task-vector entries share a magnitude.
      let values = (0..<n).map { j in (rng.normal(UInt64(j)) * (i == 0 ? 4 : 1)).rounded() / 64 }
      let path = folder.file("\(label).safetensors")
      try writeCheckpoint([("w", Tensor(shape: shape, scalars: values).encoded(as: .bf16))], to: path)
      paths.append(path)
    }
    let opened = try paths.map { try openCheckpoint($0) }
    let methods: [(any MergeMethod, [String: ParameterValue])] = [
      (TaskVectorMerge.ties, ["density": .number(0.5)]), (TaskVectorMerge.dareTies, ["density": .number(0.4)]),
      (TaskVectorMerge.breadcrumbsTies, ["density": .number(0.8), "gamma": .number(0.05)]),
      (TaskVectorMerge.breadcrumbs, ["density": .number(0.8), "gamma": .number(0.05)]),
      (TaskVectorMerge.dareLinear, ["density": .number(0.4)]),
    ]
    for (method, global) in methods {
      try expectStreamedIsTheWholeTensorMerge(method, global: global, of: opened, in: folder)
    }
  }

  /// `method` run by the runner on `opened` (the base first, then the models, each holding a
  /// BF16 tensor "w") writes the bits of its whole-tensor merge over the decoded values.
  func expectStreamedIsTheWholeTensorMerge(
    _ method: any MergeMethod, global: [String: ParameterValue], of opened: [any Checkpoint],
    in folder: TemporaryFolder
  ) throws {
    let plan = try MergePlan(
      method: method, base: opened[0], models: Array(opened.dropFirst()), global: global,
      perModel: Array(repeating: [:], count: opened.count - 1))
    let out = folder.file("\(method.name).safetensors")
    try MergeRunner.run(plan, to: out, options: WriteOptions(overwrite: true))
    let whole = try method.merge(
      MergeInputs(
        name: "w", base: try opened[0].tensor(named: "w"),
        models: try opened.dropFirst().map { try $0.tensor(named: "w") }),
      try plan.parameters("w"))
    #expect(try openCheckpoint(out).read("w") == whole.encoded(as: .bf16), "\(method.name)")
  }

  /// RAM and RAM+TL streamed from BF16 files merge and count from the stored bytes
  /// (`Kernels.changeMerge`, `Kernels.changeCounts`): the bits of the whole-tensor merge over
  /// decoded values, on a tensor of several ranges where each model leaves a third of the
  /// entries unchanged and some changes are below epsilon.
  @Test func ramFromStoredBytesEqualsTheWholeTensorMerge() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let shape = [700, 1_000]
    let n = shape[0] * shape[1]
    let base = (0..<n).map { j in CounterRNG(seed: 70, stream: "base").normal(UInt64(j)) * 0.05 }
    var paths = [folder.file("base.safetensors")]
    try writeCheckpoint([("w", Tensor(shape: shape, scalars: base).encoded(as: .bf16))], to: paths[0])
    for t in 0..<3 {
      let rng = CounterRNG(seed: UInt64(71 + t), stream: "model")
      let values = (0..<n).map { j -> Float in
        switch (j + t) % 3 {
        case 0: return base[j]
        case 1 where j % 7 == 0: return base[j] + 1e-7
        default: return base[j] + rng.normal(UInt64(j)) * 0.01
        }
      }
      paths.append(folder.file("m\(t).safetensors"))
      try writeCheckpoint([("w", Tensor(shape: shape, scalars: values).encoded(as: .bf16))], to: paths[t + 1])
    }
    let opened = try paths.map { try openCheckpoint($0) }
    for method in [RAMMerge.ram, RAMMerge.ramPlus] {
      try expectStreamedIsTheWholeTensorMerge(method, global: [:], of: opened, in: folder)
    }
  }

  /// Arcee fusion streamed from BF16 files collects its quantile keys and fuses from the stored
  /// bytes (`Kernels.importanceKeys` and `fuseByImportance` over stored elements): the bits of
  /// the whole-tensor merge over decoded values, on rows that straddle the ranges, each row's
  /// changes of a different size, some elements unchanged.
  @Test func arceeFusionFromStoredBytesEqualsTheWholeTensorMerge() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let shape = [130, 4_099]
    let n = shape[0] * shape[1]
    let base = (0..<n).map { j in CounterRNG(seed: 80, stream: "base").normal(UInt64(j)) }
    let rng = CounterRNG(seed: 81, stream: "model")
    let model = (0..<n).map { j -> Float in
      j % 5 == 0 ? base[j] : base[j] + rng.normal(UInt64(j)) * 0.01 * Float(1 + (j / shape[1]) % 7)
    }
    let paths = [folder.file("base.safetensors"), folder.file("model.safetensors")]
    for (path, values) in zip(paths, [base, model]) {
      try writeCheckpoint([("w", Tensor(shape: shape, scalars: values).encoded(as: .bf16))], to: path)
    }
    try expectStreamedIsTheWholeTensorMerge(
      ArceeFusionMerge(), global: [:], of: try paths.map { try openCheckpoint($0) }, in: folder)
  }

  /// A statistics sample's blocks come as stored from every input, the base first, each input's
  /// back to back in the order asked (`rangeAccess`'s block reader): inputs of two dtypes, a
  /// block repeated and one at the tensor's end.
  @Test func sampleBlocksAreEveryInputsStoredBytes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let shape = [50, 40]
    let dtypes: [DType] = [.bf16, .f32, .bf16]
    var paths: [String] = []
    for (i, dtype) in dtypes.enumerated() {
      let path = folder.file("m\(i).safetensors")
      try writeCheckpoint([("w", randomTensorData(dtype, shape: shape, seed: UInt64(60 + i)))], to: path)
      paths.append(path)
    }
    let inputs = try paths.map { try openCheckpoint($0) }
    let plan = try MergePlan(
      method: TaskVectorMerge.ties, base: inputs[0], models: Array(inputs.dropFirst()),
      global: ["density": .number(0.5)], perModel: Array(repeating: [:], count: 2))
    let item = try #require(plan.items.first { $0.name == "w" })
    let blocks = try #require(MergeRunner.rangeAccess(item, plan: plan, inputs: inputs).blocks)
    let (starts, length) = ([64, 1000, 64, 2000 - 64, 7], 64)
    var seen: [[UInt8]] = []
    try blocks(starts, length) { stored in
      seen = zip(stored, dtypes).map { elements, dtype in
        Array(UnsafeRawBufferPointer(start: elements.start, count: starts.count * length * dtype.size))
      }
      #expect(stored.map(\.dtype) == dtypes)
    }
    for (i, input) in inputs.enumerated() {
      let (bytes, size) = (try input.read("w").bytes, dtypes[i].size)
      #expect(seen[i] == starts.flatMap { bytes[($0 * size)..<(($0 + length) * size)] }, "input \(i)")
    }
  }
}
