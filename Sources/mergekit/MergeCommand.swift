import ArgumentParser
import Checkpoint
import Foundation
import Merge

struct MergeCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "merge",
    abstract: "Merge models of one architecture into one, tensor by tensor.",
    discussion: """
      Without --method: linear (equal weights) when no base is given, task-arithmetic when one is. \
      Method parameters are flags: a per-model parameter given once applies to every model, given \
      once per model it goes to each model in order; a comma list (0,0.5,1) is a gradient across \
      layers. Tensors are streamed from memory-mapped inputs and merged on all cores; the output \
      follows the sharding of the base (or first model) and gets its config and tokenizer files.

      Methods:
      \(MethodFlags.reference(MergeRegistry.methods))
      """)

  @Option(help: "Base model (the models' common ancestor), for methods that use one.")
  var base: String?

  @Option(help: "Merge method (see below).")
  var method: String?

  @OptionGroup var output: OutputOptions

  @Argument(
    parsing: .allUnrecognized,
    help: ArgumentHelp(
      "Models to merge (.safetensors or .mkz files, or model folders), and method parameter flags.",
      valueName: "models-and-flags"))
  var arguments: [String] = []

  /// The positional arguments: the models.
  var models: [String] { MethodFlags.split(arguments).models }

  func validate() throws {
    guard !models.isEmpty else { throw ValidationError("give the models to merge") }
    for model in models { try requireExisting(model, "model") }
    if let base { try requireExisting(base, "base") }
    let method = try chosenMethod()
    try asUsage { try method.checkInputs(hasBase: base != nil, modelCount: models.count) }
    _ = try MethodFlags(MethodFlags.split(arguments).flags, method: method, modelCount: models.count)
  }

  /// `--method`, or the default: linear without a base, task arithmetic with one.
  func chosenMethod() throws -> any MergeMethod {
    guard let method else { return base == nil ? LinearMerge() : TaskVectorMerge.taskArithmetic }
    return try resolvedMethod(method)
  }

  func resolvedMethod(_ name: String) throws -> any MergeMethod {
    try asUsage { try MergeRegistry.method(named: name) }
  }

  func run() throws {
    let method = try chosenMethod()
    let flags = try MethodFlags(MethodFlags.split(arguments).flags, method: method, modelCount: models.count)
    try output.execute(
      "merge", method: method, base: base, models: models, global: flags.global, perModel: flags.perModel,
      defaultFormat: .safetensors)
  }
}
