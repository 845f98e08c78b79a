import ArgumentParser
import Checkpoint
import Foundation
import Merge
import Nets
import Recipe
import Tensor

struct ATLASCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "atlas",
    abstract: "aTLAS: task vectors scaled block by block with learned coefficients.",
    discussion: """
      `learn` fits one coefficient per task vector and parameter tensor (or per random partition \
      of it) by gradient descent with every weight frozen; `apply` adds the task vectors to the \
      base with a coefficient file, streamed like a merge. Paper: Zhang et al., NeurIPS 2024 \
      (arXiv:2407.02880).
      """,
    subcommands: [ATLASLearnCommand.self, ATLASApplyCommand.self])
}

struct ATLASApplyCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "apply", abstract: "theta = base + sum over tasks and blocks of lambda * tau, from a coefficient file.")

  @Argument(help: "The base model.") var base: String
  @Argument(help: "Task vectors, in the coefficient file's order.") var vectors: [String] = []
  @Option(help: "Coefficient file (from `atlas learn`, or written by hand).") var coefficients: String
  @OptionGroup var output: OutputOptions

  func validate() throws {
    try requireExisting(base, "base")
    guard !vectors.isEmpty else { throw ValidationError("give at least one task vector") }
    for v in vectors { try requireExisting(v, "task vector") }
    try requireExisting(coefficients, "coefficient file")
  }

  func run() throws {
    let c = try ATLASCoefficients(json: try Data(contentsOf: URL(fileURLWithPath: coefficients)))
    let baseCheckpoint = try openCheckpoint(base)
    try c.check(baseShapes: Dictionary(uniqueKeysWithValues: baseCheckpoint.tensors.map { ($0.name, $0.shape) }), taskVectors: vectors.count)
    try output.execute(
      "atlas", method: ATLASApply(c), base: base, models: vectors, global: [:], perModel: vectors.map { _ in [:] }, defaultFormat: .safetensors,
      metadata: ["mergekit.kind": "atlas", "mergekit.coefficients": coefficients])
  }
}

struct ATLASLearnCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "learn",
    abstract: "Learn aTLAS coefficients for task vectors on data, then write the model and the coefficients.",
    discussion: """
      Objectives: ce (labelled data of one or several tasks, each row scored within its task's \
      classes), few-shot (a few labelled samples of one task; lr 0.1, cosine, 10 epochs), negate (--negate-tasks forgotten while the other tasks are kept), entropy \
      (unlabelled: minimise prediction entropy), ufm (unlabelled: FixMatch with trusted \
      pseudo-labels). AdamW on the coefficients only (lr 1e-3, weight decay 0.1, clip 1.0; \
      cosine decay for few-shot and the unsupervised objectives), from 0 (the base). --validation keeps the best epoch (negate: the lowest target accuracy whose \
      control accuracy stays at 95% of the base's).
      """)

  @Argument(help: "The base model (an MLP).") var base: String
  @Argument(help: "Task vectors of the base (from `mergekit task-vector`).") var vectors: [String] = []
  @OptionGroup var data: DataOptions
  @Option(help: "Labelled validation data to select the best epoch.") var validation: String?
  @Option(help: "Objective: ce, few-shot, negate, entropy or ufm.") var objective = "ce"
  @Option(help: "Blocks: tensor (one coefficient per tensor), isotropic (one per task vector), or K (K random partitions per tensor).") var blocks = "tensor"
  @Option(help: "Train only this fraction of coefficients, those with the largest gradients at 0.") var keep: Double?
  @Option(help: "Target tasks of negate (comma-separated task ids).") var negateTasks: String?
  @Option(help: "Leave tensors matching this regular expression out of the blocks (they keep the base's values).") var exclude: String?
  @Option(help: "Epochs (default: the objective's, 20 or 10).") var epochs: Int?
  @Option(help: "Mini-batch size.") var batchSize = 128
  @Option(help: "Learning rate (default: the objective's, 1e-3 or 0.1 for few-shot).") var lr: Float?
  @Option(help: "Weight decay (pulls coefficients toward 0, the base).") var weightDecay: Float = 0.1
  @Option(help: "Seed of the mini-batch order and augmentations.") var seed: UInt64 = 0
  @Option(name: .shortAndLong, help: "Output model folder.") var output: String
  @Option(help: "Where to write the coefficient file (JSON).") var coefficientsOut: String?
  @Flag(help: "Replace existing outputs.") var overwrite = false
  @Flag(name: .shortAndLong, help: "No progress output.") var quiet = false

  func validate() throws {
    try requireExisting(base, "base")
    guard !vectors.isEmpty else { throw ValidationError("give at least one task vector") }
    for v in vectors { try requireExisting(v, "task vector") }
    guard ATLAS.Objective(rawValue: objective) != nil else { throw ValidationError("unknown --objective '\(objective)' (use ce, few-shot, negate, entropy or ufm)") }
    if let epochs, epochs < 1 { throw ValidationError("--epochs must be at least 1") }
    guard blocks == "tensor" || blocks == "isotropic" || (Int(blocks) ?? 0) >= 1 else { throw ValidationError("--blocks takes tensor, isotropic or a number of partitions") }
    if objective == "negate" && negateTasks == nil { throw ValidationError("negate needs --negate-tasks") }
    if let keep, !(keep > 0 && keep <= 1) { throw ValidationError("--keep is a fraction in (0, 1]") }
    if let validation { try requireExisting(validation, "validation data") }
    for path in [output] + (coefficientsOut.map { [$0] } ?? []) { try requireNewOutput(path, overwrite: overwrite) }
  }

  func run() throws {
    let network = try NetworkFiles.load(base)
    let tensors = try vectors.map { try NetworkFiles.tensors($0) }
    let problem = try ATLAS.Problem(base: network, taskVectors: tensors, names: vectors, exclude: exclude)
    var options = ATLAS.Options(objective: ATLAS.Objective(rawValue: objective)!)
    (options.epochs, options.learningRate) = (epochs ?? options.epochs, lr ?? options.learningRate)
    (options.batchSize, options.weightDecay, options.seed, options.keepFraction) = (batchSize, weightDecay, seed, keep)
    options.isotropic = blocks == "isotropic"
    options.partitions = Int(blocks) ?? 1
    options.negateTasks = Set(try negateTasks.map { try parseIntegers($0, "--negate-tasks") } ?? [])
    let train = try NetworkFiles.labeled(data.data, labels: data.labels, tasks: try data.taskList())
    let check = try validation.map { try NetworkFiles.labeled($0) }
    let progress = Progress("atlas", quiet: quiet, unit: .items("epochs"))
    let (coefficients, reports) = try ATLAS.learn(problem, data: train, validation: check, options: options) { report in
      progress.update(report.epoch, options.epochs, note: String(format: "loss %.4f", report.loss) + (report.metric.map { String(format: "  validation %.4f", $0) } ?? ""))
    }
    progress.finish()
    try NetworkFiles.saveMLP(problem.network(coefficients), to: output, overwrite: overwrite)
    if let coefficientsOut {
      do { try coefficients.json().write(to: URL(fileURLWithPath: coefficientsOut), options: .atomic) } catch { throw CheckpointError.cannotWrite(file: coefficientsOut, reason: error.localizedDescription) }
    }
    let (t, b, k) = (coefficients.tasks.count, coefficients.blocks.count, coefficients.partitions)
    let learned = options.isotropic ? "\(t) coefficients (one per task vector, isotropic)" : "\(t * b * k) coefficients (\(t) task vectors x \(b) blocks x \(k))"
    print("\(output): \(learned) after \(reports.count) epochs" + (reports.last.map { String(format: ", loss %.4f", $0.loss) } ?? ""))
  }
}
