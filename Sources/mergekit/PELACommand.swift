import Adapt
import ArgumentParser
import Checkpoint
import Foundation
import Recipe

/// How many of a layer's parameters to keep: the rank flags shared by `pela` and `extract-lora`.
struct RankOptions: ParsableArguments {
  @Option(help: "Keep this fraction of each layer's parameters: rank floor(in out keep / (in + out)).") var keep: Double?
  @Option(help: "A fixed rank for every layer.") var rank: Int?
  @Option(help: "The smallest rank holding this fraction of each matrix's squared singular values.") var energy: Double?
  @Option(help: "Layers to factor: a regular expression on layer names (a weight's name without .weight). Default: attention and MLP projections (an MLP: its hidden layers).")
  var select: String?
  @Option(help: "SVD: exact, randomized, or automatic (randomized for ranks up to 1/16 of large matrices).") var solver = "automatic"

  func validate(defaultKeep: Double?) throws {
    let given = [keep != nil, rank != nil, energy != nil].filter { $0 }.count
    guard given == 1 || (given == 0 && defaultKeep != nil) else { throw ValidationError("give one of --keep, --rank or --energy") }
    if let keep, !(keep > 0 && keep < 1) { throw ValidationError("--keep is a fraction in (0, 1)") }
    if let rank, rank < 1 { throw ValidationError("--rank must be at least 1") }
    if let energy, !(energy > 0 && energy <= 1) { throw ValidationError("--energy is a fraction in (0, 1]") }
    guard LowRank.Solver(rawValue: solver) != nil else { throw ValidationError("unknown --solver '\(solver)' (use exact, randomized or automatic)") }
  }

  func options(defaultKeep: Double?) -> PELA.Options {
    let rule: RankRule = keep.map { .keep($0) } ?? rank.map { .rank($0) } ?? energy.map { .energy($0) } ?? .keep(defaultKeep ?? 0.5)
    var options = PELA.Options(rule: rule)
    options.select = select
    options.solver = LowRank.Solver(rawValue: solver) ?? .automatic
    return options
  }
}

/// Prints one line per candidate layer and the totals.
func printLayerReports(_ layers: [PELA.LayerReport]) {
  let width = min(60, layers.map(\.layer.count).max() ?? 10)
  for l in layers {
    let name = l.layer.padding(toLength: width, withPad: " ", startingAt: 0)
    if let rank = l.rank {
      print("\(name)  \(l.rows)x\(l.columns) -> rank \(rank)  (\(l.parametersAfter) of \(l.parametersBefore) parameters, error \(String(format: "%.4f", l.relativeError ?? 0)))")
    } else {
      print("\(name)  \(l.rows)x\(l.columns) dense: \(l.reason ?? "")")
    }
  }
}

struct PELACommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "pela",
    abstract: "PELA: factor a model's linear layers into low-rank pairs, optionally distilled from the original.",
    discussion: """
      Every selected weight W (out x in) becomes A = S^1/2 V^T (r x in) and B = U S^1/2 (out x r) \
      from its truncated SVD, the best rank-r approximation; layers where two factors would not \
      save parameters stay dense. --format factored writes L.0.weight (A), L.1.weight (B) and \
      L.1.bias with the ranks in config.json (low_rank), which `mergekit eval` runs at the lower \
      cost; --format dense writes W = B A under the original names. --distill then trains the \
      factors against the frozen original (cross-entropy + feature MSE at every hidden layer of \
      an MLP or block output of a decoder, the paper's intermediate pre-training). Paper: Guo et al., PELA, CVPR 2024 (arXiv:2311.13459).
      """)

  @Argument(help: "The model (a folder, or a .safetensors/.mkz file).") var model: String
  @OptionGroup var ranks: RankOptions
  @Option(help: "factored (two tensors per layer, ranks in config.json) or dense (W = B A).") var format = "factored"
  @Flag(help: "Distil the factored model from the original on --data.") var distill = false
  @Option(help: "Distillation data: labelled features for an MLP (.safetensors, .csv, or .npy with --labels), token sequences for a decoder (.jsonl).") var data: String?
  @Option(help: "Labels of a .npy features file.") var labels: String?
  @Option(help: "Held-out data for the accuracy (perplexity) printed before and after distillation (default: --data).") var validation: String?
  @Option(help: "Distillation epochs.") var epochs = 10
  @Option(help: "Mini-batch size.") var batchSize = 64
  @Option(help: "Peak learning rate (AdamW, cosine schedule to 0).") var lr: Float = 1e-3
  @Option(help: "AdamW weight decay.") var weightDecay: Float = 0.05
  @Option(help: "Weight of the cross-entropy on the labels (0: unlabelled distillation).") var taskWeight: Float = 1
  @Option(help: "Weight of the feature MSE at every hidden layer or block output (kd_alpha).") var featureWeight: Float = 1
  @Option(help: "Weight of the MSE between logits (kd_beta).") var logitWeight: Float = 0
  @Option(help: "Weight of the weight-perturbation regulariser (max |B A - W| - eps)^2.") var perturbationWeight: Float = 0
  @Option(help: "Its epsilon.") var perturbationEpsilon: Float = 1e-3
  @Flag(help: "Train every weight of the student, not only the factors (the official code).") var trainAll = false
  @Option(help: "Seed of the mini-batch order (and of the randomized SVD).") var seed: UInt64 = 0
  @Option(name: .shortAndLong, help: "Output: a folder, or a .safetensors/.mkz file.") var output: String
  @Flag(help: "Replace an existing output.") var overwrite = false
  @Flag(name: .shortAndLong, help: "No progress output.") var quiet = false

  func validate() throws {
    try requireExisting(model, "model")
    try ranks.validate(defaultKeep: 0.5)
    guard LowRankFiles.Format(rawValue: format) != nil else { throw ValidationError("unknown --format '\(format)' (use factored or dense)") }
    if distill {
      guard let data else { throw ValidationError("--distill needs --data") }
      try requireExisting(data, "data")
      guard epochs >= 1, batchSize >= 1 else { throw ValidationError("--epochs and --batch-size must be at least 1") }
    } else if data != nil {
      throw ValidationError("--data is used by --distill only; add --distill or drop --data")
    }
    if let validation { try requireExisting(validation, "validation data") }
    try requireNewOutput(output, overwrite: overwrite)
  }

  func run() throws {
    var run = LowRankFiles.PELARun(options: ranks.options(defaultKeep: 0.5))
    run.options.seed = seed
    run.format = LowRankFiles.Format(rawValue: format)!
    if distill {
      var d = PELA.DistillationOptions()
      (d.epochs, d.batchSize, d.learningRate, d.weightDecay, d.seed, d.trainEverything) = (epochs, batchSize, lr, weightDecay, seed, trainAll)
      (d.taskWeight, d.featureWeight, d.logitWeight, d.perturbationWeight, d.perturbationEpsilon) = (taskWeight, featureWeight, logitWeight, perturbationWeight, perturbationEpsilon)
      run.distillation = d
      (run.data, run.labels, run.evaluation) = (data, labels, validation)
    }
    let outputFormat = CheckpointFormat(pathExtension: URL(fileURLWithPath: output).pathExtension) ?? .safetensors
    let progress = Progress("pela", quiet: quiet, unit: .items("layers"))
    let training = Progress("distill", quiet: quiet, unit: .items("epochs"))
    let result = try LowRankFiles.pela(
      model, to: output, run: run, outputFormat: outputFormat, overwrite: overwrite,
      progress: { stage, done, total in progress.update(done, total, note: stage) },
      epoch: { training.update($0.epoch, epochs, note: String(format: "loss %.4f, features %.4f", $0.loss, $0.features)) })
    progress.finish()
    if distill { training.finish() }
    printLayerReports(result.layers)
    let (before, after) = result.parameters
    print("\(output): \(after) parameters of \(before) (\(String(format: "%.1f", 100 * Double(after) / Double(max(before, 1))))%), \(result.layers.filter { $0.rank != nil }.count) layers factored, \(format)")
    if let q = result.quality {
      print(String(format: "%@ on %@: %.4f original, %.4f truncated, %.4f distilled", q.measure, validation ?? data ?? "", q.original, q.truncated, q.distilled))
    }
  }
}

struct ExtractLoRACommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "extract-lora",
    abstract: "Write a PEFT LoRA adapter holding (fine-tune - base) at low rank.",
    discussion: """
      For every selected layer, the truncated SVD of the difference gives lora_B (out x r) and \
      lora_A (r x in) with lora_alpha = r (scale 1), so base + B A is the fine-tune's best \
      rank-r approximation. Writes adapter_model.safetensors and adapter_config.json (peft_type \
      LORA, rank_pattern per layer). Tensors outside the selected layers that differ from the base \
      (biases, norms, embeddings) cannot be held by the adapter; they are listed.
      """)

  @Argument(help: "The fine-tuned model.") var finetuned: String
  @Option(help: "The base model it was fine-tuned from.") var base: String
  @OptionGroup var ranks: RankOptions
  @Option(name: .shortAndLong, help: "Output adapter folder.") var output: String
  @Flag(help: "Replace an existing output.") var overwrite = false
  @Flag(name: .shortAndLong, help: "No progress output.") var quiet = false

  func validate() throws {
    try requireExisting(finetuned, "fine-tuned model")
    try requireExisting(base, "base")
    try ranks.validate(defaultKeep: nil)
    try requireNewOutput(output, overwrite: overwrite)
  }

  func run() throws {
    let options = ranks.options(defaultKeep: nil)
    let progress = Progress("extract-lora", quiet: quiet, unit: .items("layers"))
    let result = try LowRankFiles.extractLoRA(finetuned: finetuned, base: base, to: output, options: options, overwrite: overwrite) { progress.update($0, $1) }
    progress.finish()
    printLayerReports(result.layers)
    let size = result.layers.reduce(0) { total, layer in total + (layer.rank.map { $0 * (layer.rows + layer.columns) } ?? 0) }
    print("\(output): LoRA adapter of \(result.layers.filter { $0.rank != nil }.count) layers, \(size) parameters")
    if !result.otherChangedTensors.isEmpty {
      let names = result.otherChangedTensors
      print("note: \(names.count) other tensor\(names.count == 1 ? "" : "s") differ from the base and are not in the adapter: \(names.prefix(5).joined(separator: ", "))\(names.count > 5 ? ", ..." : "")")
    }
  }
}
