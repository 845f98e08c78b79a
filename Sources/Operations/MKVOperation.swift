import Adapt
import Foundation
import Merge

/// `mkv`: MatryoshkaKV projections of a decoder's keys and values, with per-head ranks.
public struct MKVOperation: MergekitOperation {
  public init() {}
  public let name = "mkv"
  public let summary =
    "MatryoshkaKV: orthogonal projections of a decoder's attention keys and values, ranked per head under a cache budget."
  public let discussion = """
    PCA of every layer's keys (after rotary) and values per KV head on the data gives nested \
    orthogonal bases; the greedy search lowers the heads whose reduction changes the final \
    hidden states least until the average kept fraction is budget (ranks uniform: the \
    same rank everywhere). train then trains the bases (U = U0 Cayley(X), model frozen) \
    with ranks sampled per head and step, distilling from the model without projections. \
    Writes a model folder: the model's files, kv_projections.safetensors and config.json's \
    kv_projection, which `mergekit eval` runs. Paper: Lin et al., MatryoshkaKV, ICLR 2025 \
    (arXiv:2410.14731). Layout: docs/matryoshka-kv.md.
    """
  public let inputs = OperationInputs(
    models: 1...1, modelHelp: "a Llama/Mistral/Qwen2 model folder", data: .optional,
    dataHelp: "calibration token sequences (.jsonl or .safetensors input_ids): PCA and the rank search")
  public let output = OutputKind.model
  public let parameters: [ParameterSpec] = [
    .number(
      "budget", .global, in: 0...1, openBelow: true, default: 0.5, help: "average kept fraction of the K/V dimensions"),
    .integer(
      "step", in: 1...1 << 20, default: nil, optional: true,
      help: "rank step (default: head dimension / 4, as the official search script)"),
    .choice(
      "ranks", KVProjectionFiles.RankSearch.allCases.map(\.rawValue), default: "adaptive",
      help: "adaptive (greedy search) or uniform"),
    .integer(
      "per_round", in: 1...1 << 20, default: nil, optional: true,
      help: "heads lowered per search round (default: 3/4 of them)"),
    .flag(
      "data_free", default: false, help: "bases from the weights alone (no data; keys ignore rotary); weaker than PCA"),
    .flag("train", default: false, help: "train the bases after PCA"),
    .path("train_data", help: "training sequences (default: the data)"),
    .integer("epochs", in: 1...1_000_000, default: 1, help: "training epochs"),
    .integer("batch_size", in: 1...1 << 20, default: 4, help: "sequences per batch"),
    .number(
      "lr", .global, in: ParameterSpec.nonNegative, openBelow: true, default: 1e-3,
      help: "peak learning rate (AdamW, warm-up then cosine)"),
    .number(
      "kl_weight", .global, in: ParameterSpec.nonNegative, default: 0.25, help: "weight of KL(teacher || student)"),
    .number(
      "ce_weight", .global, in: ParameterSpec.nonNegative, default: 0.75, help: "weight of the next-token cross-entropy"
    ),
    .path(
      "validation", help: "held-out sequences to measure the result on (KL and hidden-state error against the model)"),
    .integer("seed", in: 0...Int.max, default: 0, help: "seed of the sampled ranks and the batch order"),
  ]

  public func check(_ request: OperationRequest) throws {
    let p = request.parameters
    if request.data == nil && !(p.flag("data_free") && p.text("ranks") == "uniform" && !p.flag("train")) {
      throw OperationError.inputs(
        operation: name,
        reason: "needs data (PCA, the adaptive search and training); without data use data_free with ranks uniform")
    }
  }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    var run = KVProjectionFiles.Run()
    (run.budget, run.step, run.perRound, run.dataFree) = (
      p.double("budget"), p.optionalInt("step"), p.optionalInt("per_round"), p.flag("data_free")
    )
    run.search = KVProjectionFiles.RankSearch(rawValue: p.text("ranks")) ?? .adaptive
    (run.data, run.trainingData, run.validation) = (
      request.data, p.optionalText("train_data"), p.optionalText("validation")
    )
    if p.flag("train") {
      var t = MatryoshkaKV.TrainingOptions()
      (t.epochs, t.batchSize, t.learningRate, t.klWeight, t.crossEntropyWeight, t.seed) = (
        p.int("epochs"), p.int("batch_size"), p.float("lr"), p.float("kl_weight"), p.float("ce_weight"), p.seed()
      )
      run.training = t
    }
    let output = try request.requireOutput()
    let meter = context.meter("mkv", .items("steps"))
    let result = try KVProjectionFiles.run(request.models[0], to: output, run: run, overwrite: context.overwrite) {
      stage, done, total in meter.update(done, total, note: stage)
    }
    meter.finish()
    let d = result.headDimension
    var lines = zip(result.ranks.keyRanks, result.ranks.valueRanks).enumerated().map { layer, ranks in
      "layer \(layer): key ranks \(ranks.0.map(String.init).joined(separator: " "))  value ranks \(ranks.1.map(String.init).joined(separator: " "))  (of \(d))"
    }
    let keys =
      Double(result.ranks.keyRanks.joined().reduce(0, +)) / Double(max(result.ranks.keyRanks.joined().count * d, 1))
    let values =
      Double(result.ranks.valueRanks.joined().reduce(0, +)) / Double(max(result.ranks.valueRanks.joined().count * d, 1))
    let bases = result.dataFree ? "data-free (from the weights, not activations)" : "PCA"
    lines.append(
      String(
        format: "%@: KV cache %.1f%% of the original (keys %.1f%%, values %.1f%%), %@ bases%@", output,
        result.ranks.keptFraction(dimension: d) * 100, keys * 100, values * 100, bases,
        result.trained ? ", trained" : ""))
    if let m = result.validation {
      lines.append(
        String(
          format: "on %@: next-token KL %.4f, final hidden-state error %.4f", p.optionalText("validation") ?? "", m.kl,
          m.error) + (m.pcaKL.map { String(format: " (PCA bases at the same ranks: KL %.4f)", $0) } ?? ""))
    }
    return OperationResult(lines: lines)
  }
}
