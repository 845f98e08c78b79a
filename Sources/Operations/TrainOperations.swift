import Checkpoint
import Foundation
import Merge
import Nets

extension ParameterSpec {
  /// How labelled data is read: the labels of a .npy features file, and which tasks' rows.
  public static let labelledDataSpecs: [ParameterSpec] = [
    .path("labels", help: "labels of a .npy features file (a second .npy)"),
    .integers("tasks", optional: true, help: "use only the rows of these task ids"),
  ]
}

extension OperationRequest {
  /// The labelled data set (`data`, with `labels` and `tasks`), or the data set at `path`.
  public func labelledData(_ path: String? = nil) throws -> LabeledFeatures {
    guard let file = path ?? data else { throw OperationError.inputs(operation: operation, reason: "needs data") }
    return try NetworkFiles.labeled(
      file, labels: path == nil ? parameters.optionalText("labels") : nil,
      tasks: path == nil ? parameters.optionalIntegers("tasks") : nil)
  }

  /// The `data` path (checked present by `prepare` when the operation requires it).
  public func requireData() throws -> String {
    guard let data else { throw OperationError.inputs(operation: operation, reason: "needs data") }
    return data
  }
}

/// `train`: trains a new MLP classifier, or fine-tunes one.
public struct TrainOperation: MergekitOperation {
  public init() {}
  public let name = "train"
  public let summary = "Train or fine-tune an MLP classifier on labelled features, or a decoder on token sequences."
  public let discussion = """
    A new MLP takes the data's feature count as input and its class count as output, with \
    hidden layers between (initialised as PyTorch does, from seed). Given a model, fine-tunes \
    it instead: an MLP on labelled features, a Llama-style decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 2) \
    with next-token cross-entropy on token sequences (.jsonl or safetensors input_ids; \
    padding is not predicted). freeze keeps the weights whose names match a regular \
    expression fixed; train_only trains only those that match. An MLP is written as a model \
    folder (config.json and f32 safetensors), a decoder next to its source's files in its \
    dtype.
    """
  public let inputs = OperationInputs(
    models: 0...1, modelHelp: "an MLP or a decoder to fine-tune (none: a new MLP)", data: .required,
    dataHelp: "labelled features (MLPs) or token sequences (decoders)")
  public let output = OutputKind.model
  public let parameters: [ParameterSpec] =
    ParameterSpec.labelledDataSpecs + [
      .integers("hidden", in: 1...1 << 20, default: [64, 64], help: "hidden layer sizes of a new MLP"),
      .integer(
        "classes", in: 1...1 << 20, default: nil, optional: true,
        help: "output classes of a new MLP (default: the data's, over every task)"),
      .choice(
        "activation", ["relu", "gelu", "gelu_new", "silu", "tanh"], default: "relu", help: "activation of a new MLP"),
      .flag("layer_norm", default: false, help: "LayerNorm after each hidden linear layer of a new MLP"),
      .integer("epochs", in: 1...1_000_000, default: 20, help: "epochs"),
      .integer("batch_size", in: 1...1 << 24, default: 64, help: "mini-batch size"),
      .choice("optimizer", ["adam", "sgd"], default: "adam", help: "adam (AdamW) or sgd (with momentum)"),
      .number("lr", .global, in: ParameterSpec.nonNegative, openBelow: true, default: 1e-3, help: "learning rate"),
      .number("momentum", .global, in: 0...1, default: 0.9, help: "SGD momentum"),
      .number("weight_decay", .global, in: ParameterSpec.nonNegative, default: 0, help: "weight decay"),
      .number(
        "clip", .global, in: ParameterSpec.nonNegative, openBelow: true, default: nil, optional: true,
        help: "clip gradients to this global L2 norm"),
      .integer("seed", in: 0...Int.max, default: 0, help: "seed of the initialisation and the mini-batch order"),
      .pattern("freeze", help: "keep weights whose names match this regular expression fixed"),
      .pattern("train_only", help: "train only the weights whose names match this regular expression"),
    ]

  public func check(_ request: OperationRequest) throws {
    if !request.models.isEmpty {
      // classes may add a classification head to a BERT encoder; the rest describe a new MLP.
      for key in ["hidden", "activation", "layer_norm"] where request.parameters.isGiven(key) {
        throw OperationError.conflict(
          operation: name, name: key, reason: "describes a new MLP; a fine-tuned model keeps its architecture")
      }
    }
    // The weights between hidden layers (and to the classes) are allocated at once: at most 2^28 values (1 GiB).
    let sizes =
      (request.parameters.optionalIntegers("hidden") ?? [])
      + (request.parameters.optionalInt("classes").map { [$0] } ?? [])
    let weights = zip(sizes, sizes.dropFirst()).reduce(0) { total, pair in total + pair.0 * pair.1 }
    guard weights <= 1 << 28 else {
      throw OperationError.conflict(
        operation: name, name: "hidden", reason: "layers of \(sizes) need more than 2^28 weights (1 GiB)")
    }
  }

  /// The optimiser options of the parameters.
  func trainingOptions(_ p: OperationParameters) -> TrainingOptions {
    var options = TrainingOptions()
    (options.epochs, options.batchSize, options.seed) = (p.int("epochs"), p.int("batch_size"), p.seed())
    (options.learningRate, options.momentum, options.weightDecay) = (
      p.float("lr"), p.float("momentum"), p.float("weight_decay")
    )
    options.clipNorm = p.optionalDouble("clip").map(Float.init)
    options.optimizer = p.text("optimizer") == "sgd" ? .sgd : .adam
    return options
  }

  /// The model card of a fine-tuned transformer: what it was trained with (`training`: the
  /// loss and the data) and how (epochs, optimiser, learning rate).
  static func fineTuneCard(_ model: String, title: String, training: String, options: TrainingOptions) -> Data {
    ModelCard.adaptation(
      method: "train", title: title, models: [model],
      description:
        "`mergekit train` fine-tuned \(model) with \(training) (\(options.epochs) epochs, "
        + "\(options.optimizer == .sgd ? "SGD" : "AdamW"), learning rate \(options.learningRate)).",
      loadsInTransformers: true, howToRun: ModelCard.transformersUsage)
  }

  /// Training progress on `meter`: batches done of all epochs, with the epoch and its loss.
  static func reporting(to meter: any ProgressMeter) -> (TrainingProgress) -> Void {
    { progress in
      meter.update(
        (progress.epoch - 1) * progress.batches + progress.batch, progress.epochs * progress.batches,
        note: String(format: "epoch %d  loss %.4f", progress.epoch, progress.loss))
    }
  }

  /// Which weights train: not those `freeze` matches, and only those `train_only` matches.
  func trainable(_ p: OperationParameters) throws -> (String) -> Bool {
    let frozen = try p.optionalText("freeze").map { try Regex($0) }
    let only = try p.optionalText("train_only").map { try Regex($0) }
    return { name in
      (frozen.map { !name.contains($0) } ?? true) && (only.map { name.contains($0) } ?? true)
    }
  }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    let loaded = try request.models.first.map { try NetworkFiles.load($0) }
    if let loaded {
      switch loaded.config {
      case .decoder: return try trainDecoder(loaded, request, context)
      case .bert: return try trainClassifier(loaded, request, context)
      case .mlp:
        if p.isGiven("classes") {
          throw OperationError.conflict(
            operation: name, name: "classes", reason: "describes a new MLP; a fine-tuned model keeps its architecture")
        }
      }
    }
    let train = try request.labelledData()
    var network: Network<Float>
    if let loaded {
      network = loaded
    } else {
      guard let activation = Activation(configName: p.text("activation")) else {
        throw OperationError.invalidParameter(
          operation: name, name: "activation", value: p.text("activation"), reason: "is not a known activation")
      }
      // The classes of the whole data set, not only of the tasks trained on: models trained on
      // different tasks of one data set then share an output layer (and can be zipped or merged).
      let classes =
        try p.optionalInt("classes")
        ?? (p.isGiven("tasks")
          ? NetworkFiles.labeled(try request.requireData(), labels: p.optionalText("labels")).classCount
          : train.classCount)
      let sizes = [train.features.columns] + (p.optionalIntegers("hidden") ?? []) + [classes]
      network = .initializedMLP(
        MLPConfig(layerSizes: sizes, activation: activation, layerNorm: p.flag("layer_norm")), seed: p.seed())
    }
    let options = trainingOptions(p)
    let meter = context.meter("train", .items("batches"))
    let losses = try Training.classify(
      &network, on: train, options: options, trainable: try trainable(p), progress: Self.reporting(to: meter))
    meter.finish()
    // The labels seen in training (with those of the model fine-tuned, when it records them),
    // so that `zip` knows which outputs each model was taught.
    if case .mlp(var c) = network.config, request.models.isEmpty || c.trainedClasses != nil {
      c.trainedClasses = Array(Set(train.labels).union(c.trainedClasses ?? [])).sorted()
      network = try Network(
        config: .mlp(c), tensors: Dictionary(uniqueKeysWithValues: network.tensors.map { ($0.name, $0.tensor) }))
    }
    let output = try request.requireOutput()
    try NetworkFiles.saveMLP(network, to: output, overwrite: context.overwrite)
    let result = try Training.evaluate(network, on: train)
    return OperationResult(lines: [
      String(
        format: "%@: %d epochs, final loss %.4f, training accuracy %.2f%%", output, options.epochs, losses.last ?? 0,
        result.accuracy * 100)
    ])
  }
}

extension TrainOperation {
  /// Next-token training of a decoder on the token sequences of `data`.
  func trainDecoder(_ initial: Network<Float>, _ request: OperationRequest, _ context: OperationContext) throws
    -> OperationResult
  {
    let p = request.parameters
    for key in ["labels", "tasks"] where p.isGiven(key) {
      throw OperationError.conflict(
        operation: name, name: key, reason: "is for labelled features; a decoder trains on tokens")
    }
    guard case .decoder(let c) = initial.config else { preconditionFailure("trainDecoder takes decoders") }
    let data = try request.requireData()
    let sequences = try EvalOperation.tokenSequences(data, vocabulary: c.vocabularySize, operation: name)
    var network = initial
    let options = trainingOptions(p)
    let before = try Training.perplexity(network, on: sequences)
    let meter = context.meter("train", .items("batches"))
    let losses = try Training.languageModel(
      &network, on: sequences, options: options, trainable: try trainable(p), progress: Self.reporting(to: meter))
    meter.finish()
    let after = try Training.perplexity(network, on: sequences)
    let output = try request.requireOutput()
    let model = request.models[0]
    let card = Self.fineTuneCard(
      model, title: "\(model) trained on \(URL(fileURLWithPath: data).lastPathComponent)",
      training: "next-token cross-entropy on \(sequences.count) sequences of \(data)", options: options)
    try NetworkFiles.save(network, like: model, to: output, overwrite: context.overwrite, card: card)
    return OperationResult(lines: [
      String(
        format: "%@: %d epochs, final loss %.4f, training perplexity %.3f (%.3f before)", output, options.epochs,
        losses.last ?? 0, after.perplexity, before.perplexity)
    ])
  }
}

extension TrainOperation {
  /// Fine-tunes a BERT classifier on labelled token sequences; a BERT encoder without a head
  /// first gets one (`classes` labels: the encoder's pooler when its checkpoint has one, a new
  /// classifier drawn as transformers initialises it).
  func trainClassifier(_ initial: Network<Float>, _ request: OperationRequest, _ context: OperationContext) throws
    -> OperationResult
  {
    let p = request.parameters
    let model = request.models[0]
    guard case .bert(let c) = initial.config else { preconditionFailure("trainClassifier takes BERT") }
    let data = try request.requireData()
    let read = try DataFiles.readLabelledTokens(data)
    let train = try LabeledTokens(sequences: read.sequences, labels: read.labels, tasks: read.tasks, source: data)
    let selected = p.optionalIntegers("tasks").map { Set($0) }
    let rows = selected.map { wanted in train.labels.indices.filter { wanted.contains(train.tasks?[$0] ?? 0) } }
    let examples = rows.map { train.rows($0) } ?? train
    try EvalOperation.checkTokens(examples.sequences, vocabulary: c.vocabularySize, data: data, operation: name)
    for (index, sequence) in examples.sequences.enumerated() {
      guard sequence.count <= c.maxPositions else {
        throw OperationError.inputs(
          operation: name,
          reason: "\(data): sequence \(index + 1) has \(sequence.count) tokens, more than \(c.maxPositions)")
      }
    }
    var network = initial
    var config: Data?
    if c.classifierLabels == nil {
      guard let classes = p.optionalInt("classes") else {
        throw OperationError.missingParameter(
          operation: name, name: "classes", help: "'\(model)' is a BERT encoder without a head: the labels of a new one"
        )
      }
      (network, config) = try NetworkFiles.withClassificationHead(
        initial, source: model, labels: classes, seed: p.seed())
    } else if p.isGiven("classes") {
      throw OperationError.conflict(
        operation: name, name: "classes", reason: "'\(model)' already has a classification head")
    }
    let options = trainingOptions(p)
    let meter = context.meter("train", .items("batches"))
    let losses = try Training.classify(
      &network, on: examples, options: options, trainable: try trainable(p), progress: Self.reporting(to: meter))
    meter.finish()
    let output = try request.requireOutput()
    let card = Self.fineTuneCard(
      model, title: "\(model) trained as a sequence classifier",
      training: "cross-entropy on \(examples.count) labelled sequences of \(data)", options: options)
    try NetworkFiles.save(
      network, like: model, to: output, overwrite: context.overwrite, card: card,
      files: config.map { ["config.json": $0] } ?? [:])
    let result = try Training.evaluate(network, on: examples)
    return OperationResult(lines: [
      String(
        format: "%@: %d epochs, final loss %.4f, training accuracy %.2f%%", output, options.epochs, losses.last ?? 0,
        result.accuracy * 100)
    ])
  }
}

/// `eval`: accuracy of a classifier (per task) or perplexity of a language model.
public struct EvalOperation: MergekitOperation {
  public init() {}
  public let name = "eval"
  public let summary =
    "Evaluate a model: accuracy and loss on labelled features (per task), or perplexity on token sequences."
  public let discussion = """
    For labelled data with several tasks, each task's accuracy is given twice: over all \
    classes, and with the prediction restricted to the task's own classes (as a task-specific \
    head would see it); and the joint accuracy of ZipIt's protocol: softmax within each \
    task's classes, then the most probable class overall. The output, when given, is the \
    report as JSON.
    """
  public let inputs = OperationInputs(
    models: 1...1, modelHelp: "the model: a folder with config.json, or a file with config", data: .required,
    dataHelp: OperationInputs.dataHelp)
  public let output = OutputKind.report
  public let parameters: [ParameterSpec] =
    ParameterSpec.labelledDataSpecs + [.path("config", help: "config.json of a lone tensor file")]

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let model = request.models[0]
    let network = try NetworkFiles.load(model, config: request.parameters.optionalText("config"))
    let data = try request.requireData()
    let result: OperationResult
    switch network.config {
    case .mlp, .bert:
      if case .bert(let c) = network.config, c.classifierLabels == nil {
        throw OperationError.inputs(
          operation: name,
          reason:
            "eval scores classifiers and decoder language models; '\(model)' is a BERT encoder with no head to score")
      }
      let e = try Self.classifierEvaluation(network, data: data, features: { try request.labelledData() })
      var lines = [String(format: "rows %d  loss %.4f  accuracy %.2f%%", e.count, e.loss, e.accuracy * 100)]
      if e.tasks.count > 1 {
        lines.append(
          String(format: "joint accuracy (softmax within each task's classes) %.2f%%", e.jointAccuracy * 100))
        lines += e.tasks.map {
          String(
            format: "task %d: rows %d  accuracy %.2f%%  within its classes %.2f%%", $0.task, $0.count,
            $0.accuracy * 100, $0.accuracyWithinTask * 100)
        }
      }
      let json: [String: Any] = [
        "model": model, "rows": e.count, "loss": e.loss, "accuracy": e.accuracy, "joint_accuracy": e.jointAccuracy,
        "tasks": e.tasks.map {
          ["task": $0.task, "rows": $0.count, "accuracy": $0.accuracy, "accuracy_within_task": $0.accuracyWithinTask]
        },
      ]
      result = OperationResult(lines: lines, json: json)
    case .decoder:
      guard case .decoder(let c) = network.config else { preconditionFailure("matched .decoder") }
      let p = try Training.perplexity(
        network, on: try Self.tokenSequences(data, vocabulary: c.vocabularySize, operation: name))
      // A partially zipped decoder: each tail alone too (task-aware, as the ZipIt! paper reads its heads).
      let tails = p.tailLosses.enumerated().map { t, loss in
        (
          String(format: "tail %d: loss %.4f  perplexity %.3f", t, loss, exp(loss)),
          ["tail": t, "loss": loss, "perplexity": exp(loss)]
        )
      }
      var json: [String: Any] = ["model": model, "tokens": p.tokens, "loss": p.loss, "perplexity": p.perplexity]
      if !tails.isEmpty { json["tails"] = tails.map(\.1) }
      result = OperationResult(
        lines: [String(format: "tokens %d  loss %.4f  perplexity %.3f", p.tokens, p.loss, p.perplexity)]
          + tails.map(\.0),
        json: json)
    }
    if let output = request.output, let json = result.json {
      try NetworkFiles.writeReport(json, to: output, overwrite: context.overwrite)
    }
    return result
  }

  /// A classifier's evaluation: a BERT classifier on labelled token sequences read from `data`,
  /// an MLP on the labelled features `features` reads.
  static func classifierEvaluation(
    _ network: Network<Float>, data: String, features: () throws -> LabeledFeatures
  ) throws -> Evaluation {
    guard case .bert = network.config else { return try Training.evaluate(network, on: try features()) }
    let read = try DataFiles.readLabelledTokens(data)
    return try Training.evaluate(
      network, on: try LabeledTokens(sequences: read.sequences, labels: read.labels, tasks: read.tasks, source: data))
  }

  /// A model's figure of merit on `data`, for choosing among candidates: a classifier's mean
  /// accuracy within each task's classes (its accuracy with one task), a decoder's perplexity.
  public static func score(_ network: Network<Float>, data: String) throws -> ModelScore {
    switch network.config {
    case .mlp, .bert:
      if case .bert(let c) = network.config, c.classifierLabels == nil {
        throw OperationError.inputs(
          operation: "eval", reason: "a BERT encoder with no classification head has nothing to score")
      }
      let e = try classifierEvaluation(network, data: data, features: { try NetworkFiles.labeled(data) })
      let value =
        e.tasks.count > 1 ? e.tasks.reduce(0) { $0 + $1.accuracyWithinTask } / Double(e.tasks.count) : e.accuracy
      return ModelScore(
        value: value, higherIsBetter: true, label: e.tasks.count > 1 ? "mean task accuracy" : "accuracy")
    case .decoder(let c):
      let p = try Training.perplexity(
        network, on: try tokenSequences(data, vocabulary: c.vocabularySize, operation: "eval"))
      return ModelScore(value: p.perplexity, higherIsBetter: false, label: "perplexity")
    }
  }

  /// Throws naming the first sequence of `data` with a token id outside `vocabulary`.
  static func checkTokens(_ sequences: [[Int]], vocabulary: Int, data: String, operation: String) throws {
    for (index, sequence) in sequences.enumerated() {
      if let bad = sequence.first(where: { !(0..<vocabulary).contains($0) }) {
        throw OperationError.inputs(
          operation: operation,
          reason: "\(data): sequence \(index + 1) has token id \(bad), outside the model's vocabulary of \(vocabulary)")
      }
    }
  }

  /// The token sequences of `data` for a decoder with `vocabulary` tokens, checked: a token
  /// file, ids within the vocabulary, and at least one sequence of two or more tokens (else
  /// there is nothing to predict).
  static func tokenSequences(_ data: String, vocabulary: Int, operation: String) throws -> [[Int]] {
    let ext = URL(fileURLWithPath: data).pathExtension.lowercased()
    guard ["jsonl", "json", "safetensors"].contains(ext) else {
      throw OperationError.inputs(
        operation: operation,
        reason: "a language model reads token sequences (.jsonl or .safetensors input_ids), not '\(data)'")
    }
    let sequences = try DataFiles.readTokens(data)
    try checkTokens(sequences, vocabulary: vocabulary, data: data, operation: operation)
    guard sequences.contains(where: { $0.count >= 2 }) else {
      throw OperationError.inputs(
        operation: operation,
        reason:
          "\(data) has no sequence of two or more tokens (\(sequences.count) sequences): there is no next token to predict"
      )
    }
    return sequences
  }
}

/// One model's figure of merit on some data (`EvalOperation.score`).
public struct ModelScore: Sendable, Equatable {
  public let value: Double
  public let higherIsBetter: Bool
  /// What the value is: "accuracy", "mean task accuracy" or "perplexity".
  public let label: String

  /// Whether this score beats `other` (strictly).
  public func beats(_ other: ModelScore) -> Bool { higherIsBetter ? value > other.value : value < other.value }

  /// The value as printed: percent for accuracies.
  public var formatted: String {
    higherIsBetter ? String(format: "%.2f%%", value * 100) : String(format: "%.3f", value)
  }
}
