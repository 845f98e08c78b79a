import Checkpoint
import Foundation
import Merge
import Nets

/// Task vectors read from their files tensor by tensor when the learner needs them (the files
/// stay mapped; nothing is held decoded between steps).
struct CheckpointTaskVectors: TaskVectorSource {
  let files: [any Checkpoint]
  init(_ paths: [String]) throws { files = try paths.map { try openCheckpoint($0) } }
  var count: Int { files.count }
  func shape(of name: String, in i: Int) -> [Int]? { files[i].lookup(name)?.shape }
  func values(of name: String, in i: Int) throws -> Matrix<Float> { Matrix(floats: try files[i].tensor(named: name)) }
}

/// `atlas-learn` (`mergekit atlas learn`, recipe `atlas`): learns aTLAS coefficients on data and
/// writes the model with `atlas-coefficients.json` in its folder.
public struct ATLASLearnOperation: MergekitOperation {
  public init() {}
  public let name = "atlas-learn"
  public let commandPath = ["atlas", "learn"]
  public let aliases = ["atlas"]
  /// The coefficient file written into every learned model's folder.
  public static let coefficientsFile = "atlas-coefficients.json"
  public let summary = "Learn aTLAS coefficients for task vectors on data, then write the model and the coefficients."
  public let discussion = """
    Objectives: ce (labelled data of one or several tasks, each row scored within its task's \
    classes), few-shot (a few labelled samples of one task; lr 0.1, cosine, 10 epochs), negate \
    (negate_tasks forgotten while the other tasks are kept), entropy (unlabelled: minimise \
    prediction entropy), ufm (unlabelled: FixMatch with trusted pseudo-labels). AdamW on the \
    coefficients only (lr 1e-3, weight decay 0.1, clip 1.0; cosine decay for few-shot and the \
    unsupervised objectives), from 0 (the base). validation keeps the best epoch (negate: the \
    lowest target accuracy whose control accuracy stays at 95% of the base's). The output \
    folder holds the model and atlas-coefficients.json (also written to coefficients_out when \
    given), which `atlas apply` reuses. A Llama-style decoder learns on token sequences with \
    ce (next-token cross-entropy) or entropy (of the next-token distributions); validation \
    then keeps the epoch with the lowest next-token loss. Task vectors are read from their \
    files block by block at every step (they stay mapped, never held decoded). \
    Paper: Zhang et al., NeurIPS 2024 (arXiv:2407.02880).
    """
  public let inputs = OperationInputs(
    models: 1...Int.max, modelHelp: "task vectors of the base (from `mergekit task-vector`)", base: .required,
    baseHelp: "the base MLP or decoder",
    data: .required, dataHelp: "labelled features (MLPs) or token sequences (decoders)", baseIsFirstArgument: true)
  public let output = OutputKind.model
  public let parameters: [ParameterSpec] =
    ParameterSpec.labelledDataSpecs + [
      .path("validation", help: "labelled validation data to select the best epoch"),
      .choice(
        "objective", ATLAS.Objective.allCases.map(\.rawValue), default: "ce",
        help: "ce, few-shot, negate, entropy or ufm"),
      .text(
        "blocks", default: "tensor",
        help:
          "tensor (one coefficient per tensor), isotropic (one per task vector), or K (K random partitions per tensor)"),
      .number(
        "keep", .global, in: 0...1, openBelow: true, default: nil, optional: true,
        help: "train only this fraction of coefficients, those with the largest gradients at 0"),
      .integers("negate_tasks", optional: true, help: "target tasks of negate"),
      .pattern(
        "exclude",
        help: "leave tensors matching this regular expression out of the blocks (they keep the base's values)"),
      .integer(
        "epochs", in: 1...1_000_000, default: nil, optional: true, help: "epochs (default: the objective's, 20 or 10)"),
      .integer(
        "batch_size", in: 1...1 << 24, default: nil, optional: true,
        help: "mini-batch size (default: 128 feature rows, 8 token sequences)"),
      .number(
        "lr", .global, in: ParameterSpec.nonNegative, openBelow: true, default: nil, optional: true,
        help: "learning rate (default: the objective's, 1e-3 or 0.1 for few-shot)"),
      .number(
        "weight_decay", .global, in: ParameterSpec.nonNegative, default: 0.1,
        help: "weight decay (pulls coefficients toward 0, the base)"),
      .integer("seed", in: 0...Int.max, default: 0, help: "seed of the mini-batch order and augmentations"),
      .path("coefficients_out", writes: true, help: "also write the coefficient file (JSON) here"),
    ]

  public func check(_ request: OperationRequest) throws {
    let p = request.parameters
    let blocks = p.text("blocks")
    guard blocks == "tensor" || blocks == "isotropic" || (Int(blocks) ?? 0) >= 1 else {
      throw OperationError.invalidParameter(
        operation: name, name: "blocks", value: blocks, reason: "is not tensor, isotropic or a number of partitions")
    }
    if p.text("objective") == "negate" && p.optionalIntegers("negate_tasks") == nil {
      throw OperationError.conflict(
        operation: name, name: "negate_tasks", reason: "the negate objective needs its target tasks")
    }
  }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    guard let base = request.base else { throw OperationError.inputs(operation: name, reason: "needs base") }
    let network = try NetworkFiles.load(base)
    let problem = try ATLAS.Problem(
      base: network, taskVectors: try CheckpointTaskVectors(request.models), names: request.modelNames,
      exclude: p.optionalText("exclude"))
    let (decoder, classifier): (Bool, Bool)
    switch network.config {
    case .mlp: (decoder, classifier) = (false, false)
    case .decoder: (decoder, classifier) = (true, false)
    case .bert(let c):
      guard c.classifierLabels != nil else {
        throw OperationError.inputs(
          operation: name,
          reason:
            "'\(base)' is a BERT encoder without a classification head: aTLAS learns a BERT classifier's coefficients "
            + "(add a head with `mergekit train BASE --classes N`)")
      }
      (decoder, classifier) = (false, true)
    }
    var options = ATLAS.Options(objective: ATLAS.Objective(rawValue: p.text("objective")) ?? .ce)
    (options.epochs, options.learningRate) = (
      p.optionalInt("epochs") ?? options.epochs, p.optionalDouble("lr").map(Float.init) ?? options.learningRate
    )
    (options.batchSize, options.weightDecay, options.seed, options.keepFraction) = (
      p.optionalInt("batch_size") ?? (decoder || classifier ? 8 : 128), p.float("weight_decay"), p.seed(),
      p.optionalDouble("keep")
    )
    options.isotropic = p.text("blocks") == "isotropic"
    options.partitions = Int(p.text("blocks")) ?? 1
    options.negateTasks = Set(p.optionalIntegers("negate_tasks") ?? [])
    func read(_ path: String) throws -> ATLAS.TrainingData {
      if classifier {
        let read = try DataFiles.readLabelledTokens(path)
        return .labelledTokens(
          try LabeledTokens(sequences: read.sequences, labels: read.labels, tasks: read.tasks, source: path))
      }
      guard decoder, case .decoder(let c) = network.config else { return .features(try request.labelledData(path)) }
      return .tokens(try EvalOperation.tokenSequences(path, vocabulary: c.vocabularySize, operation: name))
    }
    let data: ATLAS.TrainingData =
      decoder || classifier ? try read(try request.requireData()) : .features(try request.labelledData())
    if !p.isGiven("epochs") && !p.isGiven("lr") { options = options.adaptedToDataSize(examples: data.count) }
    let validation = try p.optionalText("validation").map { try read($0) }
    let meter = context.meter("atlas", .items("epochs"))
    let (coefficients, reports) = try ATLAS.learn(problem, on: data, validation: validation, options: options) {
      report in
      let metric = report.metric.map {
        decoder ? String(format: "  validation perplexity %.3f", exp(-$0)) : String(format: "  validation %.4f", $0)
      }
      let stage = report.choosing ? "choosing the epochs on a held-out fifth: " : ""
      meter.update(
        report.epoch, report.epochs, note: stage + String(format: "loss %.4f", report.loss) + (metric ?? ""))
    }
    meter.finish()
    let json = try coefficients.json()
    let output = try request.requireOutput()
    let card = ModelCard.adaptation(
      method: "atlas", title: "aTLAS merge of \(request.models.count) task vectors", models: request.models,
      description:
        "`mergekit atlas-learn` learned block-wise coefficients for the task vectors of \(request.models.joined(separator: ", ")) "
        + "on \(request.base ?? "the base") (aTLAS, arXiv:2407.07089); they are in `\(Self.coefficientsFile)`.",
      loadsInTransformers: decoder || classifier,
      howToRun: decoder || classifier
        ? ModelCard.transformersUsage
        : "`mergekit eval THIS_FOLDER --data DATA` runs the merged MLP (it is not a transformers model).")
    if decoder || classifier {
      try NetworkFiles.save(
        problem.network(coefficients), like: base, to: output, overwrite: context.overwrite, card: card,
        files: [Self.coefficientsFile: json])
    } else {
      try NetworkFiles.saveMLP(
        problem.network(coefficients), to: output, overwrite: context.overwrite,
        files: [
          Self.coefficientsFile: String(decoding: json, as: UTF8.self),
          "README.md": String(decoding: card, as: UTF8.self),
        ])
    }
    if let path = p.optionalText("coefficients_out") {
      try writeFileAtomically([UInt8](json), to: path)
    }
    let (t, b, k) = (coefficients.tasks.count, coefficients.blocks.count, coefficients.partitions)
    let learned =
      options.isotropic
      ? "\(t) coefficients (one per task vector, isotropic)"
      : "\(t * b * k) coefficients (\(t) task vectors x \(b) blocks x \(k))"
    return OperationResult(lines: [
      "\(output): \(learned) after \(reports.count) epochs"
        + (reports.last.map { String(format: ", loss %.4f", $0.loss) } ?? "")
    ])
  }
}
