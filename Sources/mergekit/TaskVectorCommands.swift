import ArgumentParser
import Checkpoint
import Foundation
import Merge
import Operations
import Tensor

struct TaskVectorCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "task-vector",
    abstract: "Write the task vector of a fine-tune: fine-tuned minus base, tensor by tensor.",
    discussion: """
      The result is a checkpoint like any other (every command takes it). By default it is stored \
      as f32 (the difference of two bf16 or f16 weights is exact in f32) in the compressed .mkz \
      format, where the small differences compress well.
      """)

  @Argument(help: "The fine-tuned model.")
  var finetuned: String

  @Option(help: "The base model it was fine-tuned from.")
  var base: String

  @Option(
    name: .customLong("rank-fraction"),
    help: ArgumentHelp(
      "Keep each matrix as its leading singular triplets, at the rank where they take this fraction of its dense size (0.1: about a tenth of the file).",
      valueName: "fraction"))
  var rankFraction: Double?

  @Option(
    help: ArgumentHelp(
      "Keep each matrix as the fewest singular triplets that hold this fraction of its energy (0.9).",
      valueName: "fraction"))
  var energy: Double?

  @OptionGroup var output: OutputOptions

  func validate() throws {
    try requireExisting(finetuned, "fine-tuned model")
    try requireExisting(base, "base")
    let operation = StreamedOperation.taskVector
    try asUsage {
      try operation.checkParameters(hasBase: true, modelCount: 1, global: lowRankParameters, perModel: [[:]])
      _ = try LowRankTaskVector.rule(lowRankParameters)
    }
    if !lowRankParameters.isEmpty, let dtype = output.dtype, DType(userSpelling: dtype) != .f32 {
      throw ValidationError("a low-rank task vector is stored in f32; --dtype \(dtype) does not apply")
    }
  }

  /// `--rank-fraction` and `--energy` as the operation's parameters.
  var lowRankParameters: [String: ParameterValue] {
    var global: [String: ParameterValue] = [:]
    if let rankFraction { global["rank_fraction"] = .number(rankFraction) }
    if let energy { global["energy"] = .number(energy) }
    return global
  }

  func run() throws {
    if let rule = try LowRankTaskVector.rule(lowRankParameters) { return try writeLowRank(rule) }
    let operation = StreamedOperation.taskVector
    var options = output
    if options.dtype == nil { options.dtype = operation.defaultDType?.rawValue.lowercased() }
    try options.execute(
      operation.name, method: try operation.method(), base: base, models: [finetuned], global: [:], perModel: [[:]],
      defaultFormat: operation.defaultFormat,
      metadata: [
        "mergekit.kind": operation.kind ?? operation.name, "mergekit.finetuned": finetuned, "mergekit.base": base,
      ])
  }
}

extension TaskVectorCommand {
  /// `--rank-fraction` / `--energy`: the factored task vector, then a line per matrix.
  func writeLowRank(_ rule: LowRankTaskVector.Rule) throws {
    MemoryPolicy.reuseTensorMemory()
    try ModelFolder.checkOutput(output.output, isNotAmong: [base, finetuned])
    let baseModel = try openCheckpoint(base)
    let model = try openCheckpoint(finetuned)
    let format =
      output.format.flatMap { CheckpointFormat(rawValue: $0.lowercased()) }
      ?? CheckpointFormat(pathExtension: URL(fileURLWithPath: output.output).pathExtension) ?? .mkz
    var options = WriteOptions(
      format: format, shardSize: output.shardSize.flatMap(parseByteSize),
      metadata: ["mergekit.kind": "task-vector", "mergekit.finetuned": finetuned, "mergekit.base": base],
      overwrite: output.overwrite)
    options.copyFilesFrom = ModelFolder.modelFolder(of: base)
    options.skippedFiles.formUnion(ModelCard.replacedFiles)
    let progress = Progress("task-vector", quiet: output.quiet)
    let entries = try LowRankTaskVector.write(
      finetuned: model, base: baseModel, rule: rule, to: output.output, options: options,
      progress: { progress.update($0, $1) })
    progress.finish()
    guard !output.quiet else { return }
    for entry in entries where entry.rank != nil {
      print(
        String(
          format: "%@  %@  rank %d  %.1f%% of its f32 size  energy kept %.4f", entry.name,
          entry.shape.map(String.init).joined(separator: " x "), entry.rank ?? 0,
          100 * Double(entry.storedBytes) / Double(entry.denseBytes), entry.keptEnergy))
    }
    let stored = entries.reduce(0) { $0 + $1.storedBytes }
    let dense = entries.reduce(0) { $0 + $1.denseBytes }
    print(
      "\(entries.filter { $0.rank != nil }.count) of \(entries.count) tensors factored: "
        + "\(formatBytes(stored)) of tensor data, \(String(format: "%.1f", 100 * Double(stored) / Double(max(dense, 1))))% of the dense f32 task vector"
    )
  }
}

struct ApplyCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "apply",
    abstract: "Add scaled task vectors to a base model: base + sum of scale_i * tau_i.",
    discussion: """
      --scale once applies to every task vector; once per task vector, each in order. A negative \
      scale subtracts (forgetting); tau_C + tau_B - tau_A with scales 1, 1, -1 is an analogy. A \
      comma list (0,0.5,1) is a gradient across layers.
      """)

  @Argument(help: "The base model.")
  var base: String

  @Argument(help: "Task vectors (from `mergekit task-vector`).")
  var vectors: [String] = []

  @Option(
    parsing: .unconditionalSingleValue, help: "Scale (lambda): once for all task vectors, or once per task vector.")
  var scale: [String] = []

  @OptionGroup var output: OutputOptions

  func validate() throws {
    try requireExisting(base, "base")
    guard !vectors.isEmpty else { throw ValidationError("give at least one task vector") }
    for vector in vectors { try requireExisting(vector, "task vector") }
  }

  func run() throws {
    let operation = StreamedOperation.apply
    let method = try operation.method()
    let flags = try MethodFlags(scale.flatMap { ["--scale", $0] }, method: method, modelCount: vectors.count)
    try output.execute(
      operation.name, method: method, base: base, models: vectors, global: flags.global, perModel: flags.perModel,
      defaultFormat: operation.defaultFormat)
  }
}
