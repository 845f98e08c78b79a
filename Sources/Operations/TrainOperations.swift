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
  public let summary = "Train or fine-tune an MLP classifier on labelled features."
  public let discussion = """
    A new MLP takes the data's feature count as input and its class count as output, with \
    hidden layers between (initialised as PyTorch does, from seed). Given a model, fine-tunes \
    it instead. freeze keeps the weights whose names match a regular expression fixed. Writes \
    a model folder (config.json and f32 safetensors) that every command reads.
    """
  public let inputs = OperationInputs(
    models: 0...1, modelHelp: "an MLP to fine-tune (none: a new one)", data: .required, dataHelp: "labelled features")
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
    ]

  public func check(_ request: OperationRequest) throws {
    if !request.models.isEmpty {
      for key in ["hidden", "classes", "activation", "layer_norm"] where request.parameters.isGiven(key) {
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

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    let train = try request.labelledData()
    var network: Network<Float>
    if let initial = request.models.first {
      network = try NetworkFiles.load(initial)
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
    var options = TrainingOptions()
    (options.epochs, options.batchSize, options.seed) = (p.int("epochs"), p.int("batch_size"), p.seed())
    (options.learningRate, options.momentum, options.weightDecay) = (
      p.float("lr"), p.float("momentum"), p.float("weight_decay")
    )
    options.clipNorm = p.optionalDouble("clip").map(Float.init)
    options.optimizer = p.text("optimizer") == "sgd" ? .sgd : .adam
    let frozen = try p.optionalText("freeze").map { try Regex($0) }
    let meter = context.meter("train", .items("batches"))
    let losses = try Training.classify(
      &network, on: train, options: options, trainable: { name in frozen.map { !name.contains($0) } ?? true }
    ) { progress in
      meter.update(
        (progress.epoch - 1) * progress.batches + progress.batch, progress.epochs * progress.batches,
        note: String(format: "epoch %d  loss %.4f", progress.epoch, progress.loss))
    }
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
    case .mlp:
      let e = try Training.evaluate(network, on: try request.labelledData())
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
      let ext = URL(fileURLWithPath: data).pathExtension.lowercased()
      guard ["jsonl", "json", "safetensors"].contains(ext) else {
        throw OperationError.inputs(
          operation: name,
          reason: "a language model is evaluated on token sequences (.jsonl or .safetensors input_ids), not '\(data)'")
      }
      let p = try Training.perplexity(network, on: try DataFiles.readTokens(data))
      result = OperationResult(
        lines: [String(format: "tokens %d  loss %.4f  perplexity %.3f", p.tokens, p.loss, p.perplexity)],
        json: ["model": model, "tokens": p.tokens, "loss": p.loss, "perplexity": p.perplexity])
    default:
      throw OperationError.inputs(
        operation: name,
        reason:
          "eval scores MLP classifiers and decoder language models; '\(model)' is a BERT encoder with no head to score")
    }
    if let output = request.output, let json = result.json {
      try NetworkFiles.writeReport(json, to: output, overwrite: context.overwrite)
    }
    return result
  }
}
