import Adapt
import Checkpoint
import Foundation
import Merge

extension ParameterSpec {
  /// How many of a layer's parameters to keep, which layers and which SVD: shared by `pela` and
  /// `extract-lora`.
  public static let rankSpecs: [ParameterSpec] = [
    .number(
      "keep", .global, in: 0...1, openBelow: true, default: nil, optional: true,
      help: "keep this fraction of each layer's parameters: rank floor(in out keep / (in + out)), below 1"),
    .integer("rank", in: 1...1 << 30, default: nil, optional: true, help: "a fixed rank for every layer"),
    .number(
      "energy", .global, in: 0...1, openBelow: true, default: nil, optional: true,
      help: "the smallest rank holding this fraction of each matrix's squared singular values"),
    .pattern(
      "select",
      help:
        "layers to factor: a regular expression on layer names (a weight's name without .weight); default: attention and MLP projections (an MLP: its hidden layers)"
    ),
    .choice(
      "solver", LowRank.Solver.allCases.map(\.rawValue), default: "automatic",
      help: "SVD: exact, randomized, or automatic (randomized for ranks up to 1/16 of large matrices)"),
  ]
}

extension OperationRequest {
  /// The rank rule (one of keep, rank or energy; `defaultKeep` when none is given), layer
  /// pattern and solver. Throws `OperationError.conflict` when more than one rule is given, or
  /// none and there is no default.
  func rankOptions(defaultKeep: Double?) throws -> PELA.Options {
    let p = parameters
    let given = ["keep", "rank", "energy"].filter { p.isGiven($0) }
    guard given.count <= 1 else {
      throw OperationError.conflict(
        operation: operation, name: given[1],
        reason: "give one of keep, rank or energy, not \(given.joined(separator: " and "))")
    }
    if p.optionalDouble("keep") == 1 {
      throw OperationError.invalidParameter(
        operation: operation, name: "keep", value: "1", reason: "keeps every parameter; use a fraction below 1")
    }
    guard
      let rule: RankRule = p.optionalDouble("keep").map({ .keep($0) }) ?? p.optionalInt("rank").map({ .rank($0) })
        ?? p.optionalDouble("energy").map({ .energy($0) })
        ?? defaultKeep.map({ .keep($0) })
    else {
      throw OperationError.conflict(operation: operation, name: "rank", reason: "give one of keep, rank or energy")
    }
    var options = PELA.Options(rule: rule)
    options.select = p.optionalText("select")
    options.solver = LowRank.Solver(rawValue: p.text("solver")) ?? .automatic
    options.seed = UInt64(clamping: p.optionalInt("seed") ?? 0)
    return options
  }
}

/// Lines for the layers a factorisation considered: rank and error, or why it stayed dense.
func layerLines(_ layers: [PELA.LayerReport]) -> [String] {
  let width = min(60, layers.map(\.layer.count).max() ?? 10)
  return layers.map { l in
    let name = l.layer.padding(toLength: width, withPad: " ", startingAt: 0)
    guard let rank = l.rank else { return "\(name)  \(l.rows)x\(l.columns) dense: \(l.reason ?? "")" }
    return
      "\(name)  \(l.rows)x\(l.columns) -> rank \(rank)  (\(l.parametersAfter) of \(l.parametersBefore) parameters, error \(String(format: "%.4f", l.relativeError ?? 0)))"
  }
}

/// `pela`: low-rank factorisation of a model's projections, optionally distilled.
public struct PELAOperation: MergekitOperation {
  public init() {}
  public let name = "pela"
  public let summary =
    "PELA: factor a model's linear layers into low-rank pairs, optionally distilled from the original."
  public let discussion = """
    Every selected weight W (out x in) becomes A = S^1/2 V^T (r x in) and B = U S^1/2 (out x r) \
    from its truncated SVD, the best rank-r approximation; layers where two factors would not \
    save parameters stay dense. format factored writes L.0.weight (A), L.1.weight (B) and \
    L.1.bias with the ranks in config.json (low_rank), which `mergekit eval` runs at the lower \
    cost; format dense writes W = B A under the original names. distill then trains the \
    factors against the frozen original (cross-entropy + feature MSE at every hidden layer of \
    an MLP or block output of a decoder; feature MSE at every layer output of a BERT encoder; \
    the paper's intermediate pre-training). The output is \
    a folder, or a .safetensors/.mkz file. Paper: Guo et al., PELA, CVPR 2024 (arXiv:2311.13459).
    """
  public let inputs = OperationInputs(
    models: 1...1, modelHelp: "the model (a folder, or a .safetensors/.mkz file)", data: .optional,
    dataHelp: "distillation data: labelled features for an MLP, token sequences (.jsonl) for a decoder or BERT")
  public let output = OutputKind.model
  public let parameters: [ParameterSpec] =
    ParameterSpec.rankSpecs + [
      .choice(
        "format", LowRankFiles.Format.allCases.map(\.rawValue), default: "factored",
        help: "factored (two tensors per layer, ranks in config.json) or dense (W = B A)"),
      .flag("distill", default: false, help: "distil the factored model from the original on the data"),
      .path("labels", help: "labels of a .npy features file"),
      .path(
        "validation",
        help:
          "held-out data for the accuracy (perplexity; BERT: hidden-state error) reported before and after distillation (default: the data)"
      ),
      .integer("epochs", in: 1...1_000_000, default: 10, help: "distillation epochs"),
      .integer("batch_size", in: 1...1 << 24, default: 64, help: "mini-batch size"),
      .number(
        "lr", .global, in: ParameterSpec.nonNegative, openBelow: true, default: 1e-3,
        help: "peak learning rate (AdamW, cosine schedule to 0)"),
      .number("weight_decay", .global, in: ParameterSpec.nonNegative, default: 0.05, help: "AdamW weight decay"),
      .number(
        "task_weight", .global, in: ParameterSpec.nonNegative, default: 1,
        help: "weight of the cross-entropy on the labels (0: unlabelled distillation)"),
      .number(
        "feature_weight", .global, in: ParameterSpec.nonNegative, default: 1,
        help: "weight of the feature MSE at every hidden layer or block output (kd_alpha)"),
      .number(
        "logit_weight", .global, in: ParameterSpec.nonNegative, default: 0,
        help: "weight of the MSE between logits (kd_beta)"),
      .number(
        "perturbation_weight", .global, in: ParameterSpec.nonNegative, default: 0,
        help: "weight of the weight-perturbation regulariser (max |B A - W| - eps)^2"),
      .number("perturbation_epsilon", .global, in: ParameterSpec.nonNegative, default: 1e-3, help: "its epsilon"),
      .flag(
        "train_all", default: false, help: "train every weight of the student, not only the factors (the official code)"
      ),
      .integer("seed", in: 0...Int.max, default: 0, help: "seed of the mini-batch order (and of the randomized SVD)"),
    ]

  public func check(_ request: OperationRequest) throws {
    _ = try request.rankOptions(defaultKeep: 0.5)
    let distill = request.parameters.flag("distill")
    if distill && request.data == nil {
      throw OperationError.conflict(operation: name, name: "distill", reason: "distillation needs data")
    }
    if !distill && request.data != nil {
      throw OperationError.conflict(
        operation: name, name: "distill", reason: "the data is used by distill only; add distill or drop the data")
    }
  }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    var run = LowRankFiles.PELARun(options: try request.rankOptions(defaultKeep: 0.5))
    run.format = LowRankFiles.Format(rawValue: p.text("format")) ?? .factored
    if p.flag("distill") {
      var d = PELA.DistillationOptions()
      (d.epochs, d.batchSize, d.learningRate, d.weightDecay, d.seed, d.trainEverything) = (
        p.int("epochs"), p.int("batch_size"), p.float("lr"), p.float("weight_decay"), p.seed(), p.flag("train_all")
      )
      (d.taskWeight, d.featureWeight, d.logitWeight) = (
        p.float("task_weight"), p.float("feature_weight"), p.float("logit_weight")
      )
      (d.perturbationWeight, d.perturbationEpsilon) = (p.float("perturbation_weight"), p.float("perturbation_epsilon"))
      run.distillation = d
      (run.data, run.labels, run.evaluation) = (request.data, p.optionalText("labels"), p.optionalText("validation"))
    }
    let output = try request.requireOutput()
    let outputFormat = CheckpointFormat(pathExtension: URL(fileURLWithPath: output).pathExtension) ?? .safetensors
    let factoring = context.meter("pela", .items("layers"))
    let training = context.meter("distill", .items("epochs"))
    let result = try LowRankFiles.pela(
      request.models[0], to: output, run: run, outputFormat: outputFormat, overwrite: context.overwrite,
      progress: { stage, done, total in factoring.update(done, total, note: stage) },
      epoch: {
        training.update(
          $0.epoch, p.int("epochs"), note: String(format: "loss %.4f, features %.4f", $0.loss, $0.features))
      })
    factoring.finish()
    if run.distillation != nil { training.finish() }
    let (before, after) = result.parameters
    let factored = result.layers.filter { $0.rank != nil }.count
    var lines = layerLines(result.layers)
    lines.append(
      "\(output): \(after) parameters of \(before) (\(String(format: "%.1f", 100 * Double(after) / Double(max(before, 1))))%), \(factored) layers factored, \(run.format.rawValue)"
    )
    if let q = result.quality {
      lines.append(
        String(
          format: "%@ on %@: %.4f original, %.4f truncated, %.4f distilled", q.measure,
          p.optionalText("validation") ?? request.data ?? "", q.original, q.truncated, q.distilled))
    }
    return OperationResult(lines: lines)
  }
}

/// `extract-lora`: a PEFT LoRA adapter holding a fine-tune's change at low rank.
public struct ExtractLoRAOperation: MergekitOperation {
  public init() {}
  public let name = "extract-lora"
  public let summary = "Write a PEFT LoRA adapter holding (fine-tune - base) at low rank."
  public let discussion = """
    For every selected layer, the truncated SVD of the difference gives lora_B (out x r) and \
    lora_A (r x in) with lora_alpha = r (scale 1), so base + B A is the fine-tune's best \
    rank-r approximation. Writes adapter_model.safetensors and adapter_config.json (peft_type \
    LORA, rank_pattern per layer). Tensors outside the selected layers that differ from the base \
    (biases, norms, embeddings) cannot be held by the adapter; they are listed.
    """
  public let inputs = OperationInputs(
    models: 1...1, modelHelp: "the fine-tuned model", base: .required, baseHelp: "the model it was fine-tuned from")
  public let output = OutputKind.model
  public let parameters: [ParameterSpec] =
    ParameterSpec.rankSpecs + [
      .integer("seed", in: 0...Int.max, default: 0, help: "seed of the randomized SVD"),
      .flag(
        "save_modules", default: false,
        help:
          "also save the changed modules outside the LoRA layers (embeddings, head, norms) in full, as PEFT's modules_to_save"
      ),
    ]

  public func check(_ request: OperationRequest) throws { _ = try request.rankOptions(defaultKeep: nil) }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    guard let base = request.base else { throw OperationError.inputs(operation: name, reason: "needs base") }
    let output = try request.requireOutput()
    let meter = context.meter("extract-lora", .items("layers"))
    let result = try LowRankFiles.extractLoRA(
      finetuned: request.models[0], base: base, to: output, options: try request.rankOptions(defaultKeep: nil),
      savesModules: request.parameters.flag("save_modules"), overwrite: context.overwrite
    ) { meter.update($0, $1, note: nil) }
    meter.finish()
    var lines = layerLines(result.layers)
    let size = result.layers.reduce(0) { total, layer in
      total + (layer.rank.map { $0 * (layer.rows + layer.columns) } ?? 0)
    }
    lines.append(
      "\(output): LoRA adapter of \(result.layers.filter { $0.rank != nil }.count) layers, \(size) parameters")
    let names = result.otherChangedTensors
    if !names.isEmpty {
      lines.append(
        "note: \(names.count) other tensor\(names.count == 1 ? "" : "s") differ from the base and are not in the adapter: \(names.prefix(5).joined(separator: ", "))\(names.count > 5 ? ", ..." : "") (save_modules keeps whole modules)"
      )
    }
    return OperationResult(lines: lines)
  }
}
