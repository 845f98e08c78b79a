import ArgumentParser
import Checkpoint
import Foundation
import Merge
import Operations
import Tensor

/// Output flags shared by the commands that write a merged checkpoint.
struct OutputOptions: ParsableArguments {
  @Option(name: .shortAndLong, help: "Output: a .safetensors or .mkz file, or a model folder.")
  var output: String

  @Option(help: "Output format: safetensors or mkz (default: from the output's extension, else the command's default).")
  var format: String?

  @Option(help: "Store floating-point tensors as bf16, f16, f32 or f64 (default: the inputs' dtype).")
  var dtype: String?

  @Option(
    help: ArgumentHelp(
      "exact (default: computed exactly, rounded once when stored) or mergekit (inputs cast to --dtype, or each tensor's own, and every operation rounded to it, as mergekit's torch arithmetic does).",
      valueName: "mode"))
  var compute = "exact"

  @Option(
    name: .customLong("shard-size"),
    help: "Largest shard of a folder output, e.g. 5GB (default: the reference input's sharding).")
  var shardSize: String?

  @Flag(
    name: .customLong("allow-missing"),
    help: "Copy tensors some models lack from the base (or first model), and ignore tensors only some models have.")
  var allowMissing = false

  @Flag(
    name: .customLong("dry-run"),
    help: "Print the plan (tensors, bytes to read and write, memory) and exit without writing.")
  var dryRun = false

  @Flag(help: "Replace the output if it exists (only after the new output is complete).")
  var overwrite = false

  @Flag(name: .shortAndLong, help: "No progress output.")
  var quiet = false

  func validate() throws {
    try validateOutput(output, format: format, dtype: dtype, shardSize: shardSize, mayExist: overwrite || dryRun)
    guard MergePlan.Compute(name: compute, dtype: nil) != nil else {
      throw ValidationError("invalid --compute '\(compute)' (use exact or mergekit)")
    }
  }

  var outputType: DType? { dtype.flatMap { DType(userSpelling: $0) } }

  /// Plans, then prints the plan (`--dry-run`) or runs it with a progress bar.
  func execute(
    _ label: String, method: any MergeMethod, base: String?, models: [String], global: [String: ParameterValue],
    perModel: [[String: ParameterValue]],
    defaultFormat: CheckpointFormat, metadata: [String: String] = [:]
  ) throws {
    MemoryPolicy.reuseTensorMemory()
    try ModelFolder.checkOutput(output, isNotAmong: (base.map { [$0] } ?? []) + models)
    // Every value and required parameter, before any input is opened or output created.
    try method.checkInputs(hasBase: base != nil, modelCount: models.count)
    try ParameterResolver(
      method: method.name, specs: method.parameters, global: global, models: perModel,
      positions: LayerPositions(layerCount: 0)
    ).checkValues()
    let baseModel = try base.map { try openCheckpoint($0) }
    let inputs = try models.map { try openCheckpoint($0, base: baseModel) }
    var plan = try MergePlan(
      method: method, base: baseModel, models: inputs, global: global, perModel: perModel, outputType: outputType,
      allowMissing: allowMissing)
    plan.compute = MergePlan.Compute(name: compute, dtype: outputType) ?? .exact
    let outputFormat =
      format.flatMap { CheckpointFormat(rawValue: $0.lowercased()) } ?? CheckpointFormat(
        pathExtension: URL(fileURLWithPath: output).pathExtension) ?? defaultFormat
    if dryRun {
      try printPlan(plan, format: outputFormat)
      return
    }
    var options = WriteOptions(
      format: outputFormat, shardSize: shardSize.flatMap(parseByteSize), metadata: metadata, overwrite: overwrite)
    options.copyFilesFrom = ModelFolder.modelFolder(of: base ?? models[0])
    let command = (["mergekit"] + CommandLine.arguments.dropFirst()).joined(separator: " ")
    if MergeRegistry.methods.contains(where: { $0.name == method.name }) {
      options = ModelCard.adding(
        to: options, output: output, method: method, base: base, models: models, configuration: command, isYAML: false)
    } else if CheckpointFormat(pathExtension: URL(fileURLWithPath: output).pathExtension) == nil {
      // task-vector, apply, atlas apply: a card saying what was done, never the base's own.
      options.skippedFiles.formUnion(ModelCard.replacedFiles)
      let inputs = (base.map { [$0] } ?? []) + models
      options.files["README.md"] = ModelCard.adaptation(
        method: method.name, title: "\(label) of \(inputs.joined(separator: ", "))", models: inputs,
        description: "Made by `\(command)`: \(method.summary).", loadsInTransformers: metadata["mergekit.kind"] == nil,
        howToRun: metadata["mergekit.kind"] == nil
          ? ModelCard.transformersUsage
          : "A task vector (differences from the base), not a model: `mergekit apply` adds it to a base.")
    }
    let progress = Progress(label, quiet: quiet)
    try MergeRunner.run(plan, to: output, options: options, progress: { progress.update($0, $1) })
    progress.finish()
  }

  func printPlan(_ plan: MergePlan, format: CheckpointFormat) throws {
    let merged = plan.items.filter { $0.action == .merge }.count
    print("method:        \(plan.method.name) (\(plan.method.reference))")
    if let base = plan.base { print("base:          \(base.path)") }
    for (i, model) in plan.models.enumerated() { print("model \(i + 1):       \(model.path)") }
    print("tensors:       \(plan.items.count) (\(merged) merged, \(plan.items.count - merged) copied)")
    print("read:          \(formatBytes(plan.bytesRead))")
    print("write:         \(formatBytes(plan.bytesWritten)) as \(format.rawValue) to \(output)")
    print(
      "memory:        about \(formatBytes(try MergeRunner.workingSetBytes(plan) + MergeRunner.bufferBytes)) (the largest group of tensors processed together: stored, decoded to f32, the method's scratch, I/O buffers; budget \(formatBytes(plan.memoryBudget)))"
    )
    let parameters = plan.method.parameters.map(\.name)
    if !parameters.isEmpty, let first = plan.items.first(where: { $0.action == .merge }),
      let resolved = try? plan.resolver.resolve(tensor: first.name)
    {
      let shown = parameters.compactMap { name -> String? in
        if let g = resolved.global[name] { return "\(name)=\(g)" }
        let per = resolved.models.compactMap { $0[name] }
        return per.isEmpty ? nil : "\(name)=[\(per.map { "\($0)" }.joined(separator: ", "))]"
      }
      print("parameters:    \(shown.joined(separator: " ")) (for \(first.name))")
    }
  }
}
