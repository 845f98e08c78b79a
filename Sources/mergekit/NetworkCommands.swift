import ArgumentParser
import Checkpoint
import Foundation
import Nets
import Recipe
import Tensor

/// Where the labelled data comes from, shared by train and eval.
struct DataOptions: ParsableArguments {
  @Option(help: "Data: labelled features (.safetensors with features/labels[/tasks], .csv, or .npy with --labels), or token sequences (.jsonl, .safetensors input_ids) for eval.")
  var data: String

  @Option(help: "Labels of a .npy features file (a second .npy).")
  var labels: String?

  @Option(help: "Use only the rows of these tasks (comma-separated task ids).")
  var tasks: String?

  func validate() throws {
    try requireExisting(data, "data")
    if let labels { try requireExisting(labels, "labels") }
    _ = try taskList()
  }

  func taskList() throws -> [Int]? { try tasks.map { try parseIntegers($0, "--tasks") } }
}

/// `1,2,3` as integers (a usage error otherwise).
func parseIntegers(_ text: String, _ flag: String) throws -> [Int] {
  let values = text.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
  guard !values.isEmpty, values.allSatisfy({ $0 != nil }) else { throw ValidationError("\(flag) takes integers separated by commas, got '\(text)'") }
  return values.map { $0! }
}

struct SyntheticDataCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "synthetic-data",
    abstract: "Write a synthetic multi-task classification data set (no download needed).",
    discussion: """
      Each class is a Gaussian cluster seen through a fixed random non-linear map; task t owns \
      CLASSES classes (disjoint from the other tasks' unless --shared-classes > 0). The same \
      --seed with another --split gives fresh samples of the same tasks (train and test sets). \
      Writes safetensors with features (f32), labels and tasks (i64).
      """)

  @Option(name: .shortAndLong, help: "Output .safetensors file.") var output: String
  @Option(help: "Number of tasks.") var taskCount = 2
  @Option(help: "Classes per task.") var classesPerTask = 5
  @Option(help: "Classes each task shares with the next.") var sharedClasses = 0
  @Option(help: "Feature dimension.") var features = 16
  @Option(help: "Samples per class.") var samplesPerClass = 100
  @Option(help: "Noise around each class centre (the centres have unit spread).") var noise = 1.0
  @Option(help: "Seed of the tasks (centres and map).") var seed: UInt64 = 0
  @Option(help: "Name of the split: samples differ per split.") var split = "train"
  @Flag(help: "Replace an existing output.") var overwrite = false

  func validate() throws {
    guard output.hasSuffix(".safetensors") else { throw ValidationError("the output must be a .safetensors file") }
    try requireNewOutput(output, overwrite: overwrite)
  }

  func run() throws {
    var o = SyntheticTasks.Options()
    (o.tasks, o.classesPerTask, o.sharedClasses, o.features, o.samplesPerClass, o.noise, o.seed) = (taskCount, classesPerTask, sharedClasses, features, samplesPerClass, noise, seed)
    let data: LabeledFeatures
    do { data = try SyntheticTasks.make(o, split: split) } catch let error as NetsError { throw ValidationError(error.description) }
    try NetworkFiles.writeLabeled(data, to: output, overwrite: overwrite)
    print("\(output): \(data.count) rows, \(data.features.columns) features, \(data.classCount) classes in \(data.taskIDs.count) tasks")
  }
}

struct TrainCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "train",
    abstract: "Train or fine-tune an MLP classifier on labelled features.",
    discussion: """
      A new MLP takes the data's feature count as input and its class count as output, with \
      --hidden layers between (initialised as PyTorch does, from --seed). --init fine-tunes an \
      existing MLP instead. --freeze keeps the weights whose names match a regular expression \
      fixed. Writes a model folder (config.json and f32 safetensors) that every command reads.
      """)

  @OptionGroup var data: DataOptions
  @Option(help: "Fine-tune this MLP instead of training a new one.") var initial: String?
  @Option(help: "Hidden layer sizes of a new MLP.") var hidden = "64,64"
  @Option(help: "Output classes of a new MLP (default: the data's).") var classes: Int?
  @Option(help: "Activation of a new MLP: relu, gelu, gelu_new, silu, tanh.") var activation = "relu"
  @Flag(help: "LayerNorm after each hidden linear layer of a new MLP.") var layerNorm = false
  @Option(help: "Epochs.") var epochs = 20
  @Option(help: "Mini-batch size.") var batchSize = 64
  @Option(help: "Optimiser: adam (AdamW) or sgd (with momentum).") var optimizer = "adam"
  @Option(help: "Learning rate.") var lr: Float = 1e-3
  @Option(help: "SGD momentum.") var momentum: Float = 0.9
  @Option(help: "Weight decay.") var weightDecay: Float = 0
  @Option(help: "Clip gradients to this global L2 norm.") var clip: Float?
  @Option(help: "Seed of the initialisation and the mini-batch order.") var seed: UInt64 = 0
  @Option(help: "Keep weights whose names match this regular expression fixed.") var freeze: String?
  @Option(name: .shortAndLong, help: "Output model folder.") var output: String
  @Flag(help: "Replace an existing output.") var overwrite = false
  @Flag(name: .shortAndLong, help: "No progress output.") var quiet = false

  func validate() throws {
    if let initial { try requireExisting(initial, "model") }
    guard Activation(configName: activation) != nil else { throw ValidationError("unknown --activation '\(activation)'") }
    guard Optimizer<Float>.Kind(rawValue: optimizer) != nil else { throw ValidationError("unknown --optimizer '\(optimizer)' (use adam or sgd)") }
    guard epochs >= 1, batchSize >= 1, lr > 0 else { throw ValidationError("--epochs, --batch-size and --lr must be positive") }
    if let freeze, (try? Regex(freeze)) == nil { throw ValidationError("--freeze '\(freeze)' is not a valid regular expression") }
    _ = try parseIntegers(hidden, "--hidden")
    try requireNewOutput(output, overwrite: overwrite)
  }

  func run() throws {
    let train = try NetworkFiles.labeled(data.data, labels: data.labels, tasks: try data.taskList())
    var network: Network<Float>
    if let initial {
      network = try NetworkFiles.load(initial)
    } else {
      let sizes = [train.features.columns] + (try parseIntegers(hidden, "--hidden")) + [classes ?? train.classCount]
      network = .initializedMLP(MLPConfig(layerSizes: sizes, activation: Activation(configName: activation)!, layerNorm: layerNorm), seed: seed)
    }
    var options = TrainingOptions()
    (options.epochs, options.batchSize, options.learningRate, options.momentum, options.weightDecay, options.clipNorm, options.seed) =
      (epochs, batchSize, lr, momentum, weightDecay, clip, seed)
    options.optimizer = Optimizer<Float>.Kind(rawValue: optimizer)!
    let frozen = try freeze.map { try Regex($0) }
    let progress = Progress("train", quiet: quiet, unit: .items("batches"))
    let losses = try Training.classify(&network, on: train, options: options, trainable: { name in frozen.map { !name.contains($0) } ?? true }) { p in
      progress.update((p.epoch - 1) * p.batches + p.batch, p.epochs * p.batches, note: String(format: "epoch %d  loss %.4f", p.epoch, p.loss))
    }
    progress.finish()
    try NetworkFiles.saveMLP(network, to: output, overwrite: overwrite)
    let result = try Training.evaluate(network, on: train)
    print(String(format: "%@: %d epochs, final loss %.4f, training accuracy %.2f%%", output, epochs, losses.last ?? 0, result.accuracy * 100))
  }
}

struct EvalCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "eval",
    abstract: "Evaluate a model: accuracy and loss on labelled features (per task), or perplexity on token sequences.",
    discussion: """
      For labelled data with several tasks, each task's accuracy is given twice: over all \
      classes, and with the prediction restricted to the task's own classes (as a task-specific \
      head would see it); and the joint accuracy of ZipIt's protocol: softmax within each \
      task's classes, then the most probable class overall.
      """)

  @Argument(help: "The model (a folder with config.json, or a file with --config).") var model: String
  @Option(help: "config.json of a lone tensor file.") var config: String?
  @OptionGroup var data: DataOptions
  @Flag(help: "Print JSON.") var json = false

  func validate() throws { try requireExisting(model, "model") }

  func run() throws {
    let network = try NetworkFiles.load(model, config: config)
    let ext = URL(fileURLWithPath: data.data).pathExtension.lowercased()
    if case .mlp = network.config {
      let result = try Training.evaluate(network, on: try NetworkFiles.labeled(data.data, labels: data.labels, tasks: try data.taskList()))
      if json {
        try printJSON([
          "rows": result.count, "loss": result.loss, "accuracy": result.accuracy, "joint_accuracy": result.jointAccuracy,
          "tasks": result.tasks.map { ["task": $0.task, "rows": $0.count, "accuracy": $0.accuracy, "accuracy_within_task": $0.accuracyWithinTask] },
        ])
        return
      }
      print(String(format: "rows %d  loss %.4f  accuracy %.2f%%", result.count, result.loss, result.accuracy * 100))
      if result.tasks.count > 1 {
        print(String(format: "joint accuracy (softmax within each task's classes) %.2f%%", result.jointAccuracy * 100))
        for t in result.tasks {
          print(String(format: "task %d: rows %d  accuracy %.2f%%  within its classes %.2f%%", t.task, t.count, t.accuracy * 100, t.accuracyWithinTask * 100))
        }
      }
      return
    }
    guard case .decoder = network.config else { throw ValidationError("eval supports MLP classifiers and decoder language models; BERT has no head to score") }
    guard ext == "jsonl" || ext == "json" || ext == "safetensors" else { throw ValidationError("a language model is evaluated on token sequences (.jsonl or .safetensors input_ids)") }
    let result = try Training.perplexity(network, on: try DataFiles.readTokens(data.data))
    if json {
      try printJSON(["tokens": result.tokens, "loss": result.loss, "perplexity": result.perplexity])
    } else {
      print(String(format: "tokens %d  loss %.4f  perplexity %.3f", result.tokens, result.loss, result.perplexity))
    }
  }
}
