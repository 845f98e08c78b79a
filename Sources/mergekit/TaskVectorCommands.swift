import ArgumentParser
import Checkpoint
import Foundation
import Merge
import Operations

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

  @OptionGroup var output: OutputOptions

  func validate() throws {
    try requireExisting(finetuned, "fine-tuned model")
    try requireExisting(base, "base")
  }

  func run() throws {
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
