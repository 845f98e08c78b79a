import Checkpoint
import Foundation
import Merge
import Nets

/// `synthetic-data`: a multi-task classification data set made on the spot (no download).
public struct SyntheticDataOperation: MergekitOperation {
  public init() {}
  public let name = "synthetic-data"
  public let summary = "Write a synthetic multi-task classification data set (no download needed)."
  public let discussion = """
    Each class is a Gaussian cluster seen through a fixed random non-linear map; task t owns \
    classes_per_task classes (disjoint from the other tasks' unless shared_classes > 0). The same \
    seed with another split gives fresh samples of the same tasks (train and test sets). \
    Writes safetensors with features (f32), labels and tasks (i64).
    """
  public let inputs = OperationInputs(models: 0...0, modelHelp: "it makes its data from its parameters")
  public let output = OutputKind.file(extension: "safetensors")
  public let parameters: [ParameterSpec] = [
    .integer("task_count", default: 2, help: "number of tasks"),
    .integer("classes_per_task", in: 2...Int.max, default: 5, help: "classes per task"),
    .integer(
      "shared_classes", in: 0...Int.max, default: 0,
      help: "classes each task shares with the next (fewer than classes_per_task)"),
    .integer("features", in: 2...Int.max, default: 16, help: "feature dimension"),
    .integer("samples_per_class", default: 100, help: "samples per class"),
    .number(
      "noise", .global, in: ParameterSpec.nonNegative, default: 1,
      help: "noise around each class centre (the centres have unit spread)"),
    .integer("seed", in: 0...Int.max, default: 0, help: "seed of the tasks (centres and map)"),
    .text("split", default: "train", help: "name of the split: samples differ per split"),
  ]

  public func check(_ request: OperationRequest) throws {
    let p = request.parameters
    guard p.int("shared_classes") < p.int("classes_per_task") else {
      throw OperationError.conflict(
        operation: name, name: "shared_classes",
        reason: "must be fewer than classes_per_task (\(p.int("classes_per_task")))")
    }
    // Rows x features floats are held in memory: at most 2^28 (1 GiB), counted without overflow.
    var values = 1
    for n in [p.int("task_count"), p.int("classes_per_task"), p.int("samples_per_class"), p.int("features")] {
      let (product, overflow) = values.multipliedReportingOverflow(by: n)
      values = overflow ? Int.max : product
    }
    guard values <= 1 << 28 else {
      throw OperationError.conflict(
        operation: name, name: "samples_per_class",
        reason: "task_count x classes_per_task x samples_per_class x features is more than 2^28 values (1 GiB)")
    }
  }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    var o = SyntheticTasks.Options()
    (o.tasks, o.classesPerTask, o.sharedClasses, o.features) = (
      p.int("task_count"), p.int("classes_per_task"), p.int("shared_classes"), p.int("features")
    )
    (o.samplesPerClass, o.noise, o.seed) = (p.int("samples_per_class"), p.double("noise"), p.seed())
    let data = try SyntheticTasks.make(o, split: p.text("split"))
    let output = try request.requireOutput()
    try NetworkFiles.writeLabeled(data, to: output, overwrite: context.overwrite)
    return OperationResult(lines: [
      "\(output): \(data.count) rows, \(data.features.columns) features, \(data.classCount) classes in \(data.taskIDs.count) tasks"
    ])
  }
}

/// `synthetic-tokens`: token sequences with learnable structure, for language-model examples.
public struct SyntheticTokensOperation: MergekitOperation {
  public init() {}
  public let name = "synthetic-tokens"
  public let summary =
    "Write synthetic token sequences (JSON lines) with learnable structure, for language-model examples."
  public let discussion =
    "Each sequence walks the vocabulary from its own start with its own stride; each token is replaced by a random one with probability noise. Another split gives fresh sequences."
  public let inputs = OperationInputs(models: 0...0, modelHelp: "it makes its data from its parameters")
  public let output = OutputKind.file(extension: "jsonl")
  public let parameters: [ParameterSpec] = [
    .integer("sequences", in: 1...10_000_000, default: 64, help: "number of sequences"),
    .integer("length", in: 2...1_000_000, default: 32, help: "tokens per sequence"),
    .integer("vocabulary", in: 2...Int(Int32.max), default: 2048, help: "vocabulary size"),
    .integers(
      "offsets", in: 0...Int(Int32.max), default: [0],
      help:
        "first token id of each domain (ids offset ..< offset + vocabulary); several: sequence i is in domain i mod their count"
    ),
    .number("noise", .global, in: 0...1, default: 0.2, help: "probability of a random token"),
    .integer("seed", in: 0...Int.max, default: 0, help: "seed"),
    .text("split", default: "train", help: "name of the split: sequences differ per split"),
    .flag(
      "labelled", default: false,
      help:
        "write {input_ids, label, task} objects for sequence classification: the task is the domain (offset) and "
        + "the label its own class for the walk's stride (task t, stride s: t * strides + s - 1)"),
  ]

  public func check(_ request: OperationRequest) throws {
    let p = request.parameters
    guard p.int("sequences") * p.int("length") <= 100_000_000 else {
      throw OperationError.conflict(operation: name, name: "sequences", reason: "asks for more than 100 million tokens")
    }
  }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    var o = SyntheticTokens.Options()
    (o.sequences, o.length, o.vocabulary, o.noise, o.seed) = (
      p.int("sequences"), p.int("length"), p.int("vocabulary"), p.double("noise"), p.seed()
    )
    let output = try request.requireOutput()
    try request.requireNewOutput(overwrite: context.overwrite)
    let offsets = p.optionalIntegers("offsets") ?? [0]
    let walks = try SyntheticTokens.walks(o, split: p.text("split"))
    let sequences = walks.enumerated().map { i, walk in walk.tokens.map { $0 + offsets[i % max(offsets.count, 1)] } }
    if p.flag("labelled") {
      let strides = SyntheticTokens.strideCount(o)
      let lines = walks.indices.map { i in
        let task = i % max(offsets.count, 1)
        return "{\"input_ids\": [\(sequences[i].map(String.init).joined(separator: ", "))], \"label\": "
          + "\(task * strides + walks[i].stride - 1), \"task\": \(task)}"
      }
      try writeFileAtomically(Array((lines.joined(separator: "\n") + "\n").utf8), to: output)
    } else {
      try NetworkFiles.writeTokens(sequences, to: output)
    }
    return OperationResult(lines: ["\(output): \(o.sequences) sequences of \(o.length) tokens"])
  }
}

extension OperationRequest {
  /// The output path (`prepare` checked it is there for operations that need one).
  public func requireOutput() throws -> String {
    guard let output else { throw OperationError.badOutput(operation: operation, reason: "needs an output (-o PATH)") }
    return output
  }

  /// Refuses to replace an existing output unless asked to.
  public func requireNewOutput(overwrite: Bool) throws {
    for path in (output.map { [$0] } ?? []) where !overwrite && FileManager.default.fileExists(atPath: path) {
      throw OperationError.outputExists(path: path)
    }
  }
}
