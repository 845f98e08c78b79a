import ArgumentParser
import Checkpoint
import Foundation
import Merge
import Operations
import Tensor

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

  @Option(
    name: .customLong("alpha-search"),
    help: ArgumentHelp(
      "Choose alpha on --data: try start:end:step (0.5:2:0.1), score each merge with the Nets runtime (a classifier's mean task accuracy, a decoder's perplexity), print the curve and write the best.",
      valueName: "start:end:step"))
  var alphaSearch: String?

  @Option(help: "Validation data for --alpha-search (labelled features, labelled token sequences, or token sequences).")
  var data: String?

  @Option(help: "config.json of the merged network for --alpha-search (default: the base's, else the first model's).")
  var config: String?

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
    let flags = try MethodFlags(MethodFlags.split(arguments).flags, method: method, modelCount: models.count)
    if let alphaSearch {
      guard let data else { throw ValidationError("--alpha-search needs --data (the validation data)") }
      try requireExisting(data, "data")
      try asUsage { _ = try AlphaSearch.grid(alphaSearch) }
      guard method.parameters.contains(where: { $0.name == "alpha" }) else {
        throw ValidationError("--alpha-search: \(method.name) has no alpha parameter (tsv, iso-c and iso-cts do)")
      }
      guard flags.global["alpha"] == nil else { throw ValidationError("give --alpha or --alpha-search, not both") }
    } else if data != nil || config != nil {
      throw ValidationError("--data and --config are for --alpha-search")
    }
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
    var global = flags.global
    if let alphaSearch, let data, !output.dryRun {
      global["alpha"] = .number(try searchAlpha(method, grid: alphaSearch, data: data, flags: flags))
    }
    try output.execute(
      "merge", method: method, base: base, models: models, global: global, perModel: flags.perModel,
      defaultFormat: .safetensors)
  }

  /// Runs the search, prints the curve, and returns the best alpha.
  func searchAlpha(_ method: any MergeMethod, grid text: String, data: String, flags: MethodFlags) throws -> Double {
    MemoryPolicy.reuseTensorMemory()
    let grid = try AlphaSearch.grid(text)
    let configPath = try NetworkFiles.configPath(model: base ?? models[0], config: config)
    let baseModel = try base.map { try openCheckpoint($0) }
    let inputs = try models.map { try openCheckpoint($0, base: baseModel) }
    let (points, best) = try AlphaSearch.run(
      method: method, base: baseModel, models: inputs, global: flags.global, perModel: flags.perModel, grid: grid,
      data: data, config: configPath,
      progress: { point in
        if !output.quiet { print("alpha \(point.alpha.formatted()): \(point.score.label) \(point.score.formatted)") }
      })
    print(
      "best alpha \(best.alpha.formatted()) of \(points.count): \(best.score.label) \(best.score.formatted) on \(data)")
    return best.alpha
  }
}
