import Adapt
import Checkpoint
import Foundation
import Merge
import Nets

/// Recipe steps that make data sets and models by computation rather than merge tensors:
///
/// | method | reads | parameters | result |
/// | --- | --- | --- | --- |
/// | `synthetic-data` | | `tasks`, `classes_per_task`, `shared_classes`, `features`, `samples_per_class`, `noise`, `seed`, `split` | a data set (`.safetensors`) |
/// | `train` | `data`, optionally `model` (fine-tune) | `hidden`, `classes`, `activation`, `layer_norm`, `epochs`, `batch_size`, `optimizer`, `lr`, `momentum`, `weight_decay`, `clip`, `seed`, `tasks` | an MLP |
/// | `zip` | `models` (MLPs or decoders), `data` (features or tokens) | `method` (zipit, permute, average), `alpha`, `beta`, `stop_at`, `keep_heads` | an MLP |
/// | `atlas` | `base`, `models` (task vectors), `data` | `objective`, `blocks`, `keep`, `negate_tasks`, `exclude`, `epochs`, `batch_size`, `lr`, `weight_decay`, `seed` | an MLP, with `atlas-coefficients.json` in its folder |
/// | `pela` | `model`, optionally `data` (distillation) | `keep`/`rank`/`energy`, `select`, `solver`, `format`, `distill`, `epochs`, `batch_size`, `lr`, `weight_decay`, `task_weight`, `feature_weight`, `logit_weight`, `perturbation_weight`, `perturbation_epsilon`, `train_all`, `seed` | a factored (or dense) model |
/// | `extract-lora` | `model` (the fine-tune), `base` | `rank`/`energy`/`keep`, `select`, `solver` | a PEFT LoRA adapter folder |
/// | `synthetic-tokens` | | `sequences`, `length`, `vocabulary`, `noise`, `seed`, `split` | token sequences (`.jsonl`) |
/// | `mkv` | `model` (a decoder), `data` (tokens) | `budget`, `step`, `ranks`, `per_round`, `data_free`, `train`, `epochs`, `batch_size`, `lr`, `kl_weight`, `ce_weight`, `seed` | the model with K/V projections |
/// | `eval` | `model`, `data` | `tasks` | a JSON report (also printed): accuracy, or perplexity on tokens |
enum NetworkSteps {
  static let operations = ["synthetic-data", "synthetic-tokens", "train", "zip", "atlas", "pela", "extract-lora", "mkv", "eval"]

  /// Where a step's result goes when it is not an output: data sets and reports need a file name.
  static func spillName(_ step: Recipe.Step) -> String {
    switch step.operation {
    case "synthetic-data": return step.label + ".safetensors"
    case "synthetic-tokens": return step.label + ".jsonl"
    case "eval": return step.label + ".json"
    default: return step.label
    }
  }

  /// Parameter access with errors naming the YAML path.
  struct Parameters {
    let step: Recipe.Step
    let file: String
    let allowed: [String]

    init(_ step: Recipe.Step, file: String, allowed: [String]) throws {
      self.step = step
      self.file = file
      self.allowed = allowed
      if let unknown = step.global.keys.sorted().first(where: { !allowed.contains($0) }) {
        throw fail(unknown, "unknown parameter for \(step.operation); expected one of \(allowed.joined(separator: ", "))")
      }
    }

    func fail(_ key: String, _ reason: String) -> RecipeError { .invalid(file: file, path: "\(step.location).parameters.\(key)", line: nil, reason: reason) }

    func number(_ key: String) throws -> Double? {
      guard let value = step.global[key] else { return nil }
      guard case .number(let x) = value else { throw fail(key, "expected a number") }
      return x
    }

    func int(_ key: String, _ fallback: Int, minimum: Int = 1) throws -> Int {
      guard let x = try number(key) else { return fallback }
      guard let n = Int(exactly: x), n >= minimum else { throw fail(key, "expected an integer of at least \(minimum)") }
      return n
    }

    func integers(_ key: String) throws -> [Int]? {
      switch step.global[key] {
      case nil: return nil
      case .number(let x)?: return [Int(x)]
      case .gradient(let xs)?: return xs.map { Int($0) }
      default: throw fail(key, "expected an integer or a list of integers")
      }
    }

    func text(_ key: String) throws -> String? {
      guard let value = step.global[key] else { return nil }
      guard case .text(let s) = value else { throw fail(key, "expected a word") }
      return s
    }

    func flag(_ key: String) throws -> Bool {
      guard let value = step.global[key] else { return false }
      guard case .flag(let b) = value else { throw fail(key, "expected true or false") }
      return b
    }
  }

  /// A JSON report, written atomically.
  static func writeReport(_ json: [String: Any], to destination: String, overwrite: Bool) throws {
    let bytes = try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys])
    guard overwrite || !FileManager.default.fileExists(atPath: destination) else { throw CheckpointError.outputExists(path: destination) }
    do { try bytes.write(to: URL(fileURLWithPath: destination), options: .atomic) } catch { throw CheckpointError.cannotWrite(file: destination, reason: error.localizedDescription) }
  }

  /// The rank rule (`keep`, `rank` or `energy`, one of them), layer pattern and solver of a
  /// low-rank step.
  static func rankOptions(_ p: Parameters, defaultKeep: Double?) throws -> PELA.Options {
    let keep = try p.number("keep")
    let energy = try p.number("energy")
    let rank = try p.number("rank") == nil ? nil : try p.int("rank", 1)
    guard [keep, energy, rank.map(Double.init)].compactMap({ $0 }).count <= 1 else { throw p.fail("rank", "give one of keep, rank or energy") }
    if let keep, !(keep > 0 && keep < 1) { throw p.fail("keep", "a fraction in (0, 1)") }
    if let energy, !(energy > 0 && energy <= 1) { throw p.fail("energy", "a fraction in (0, 1]") }
    guard let rule: RankRule = keep.map({ .keep($0) }) ?? rank.map({ .rank($0) }) ?? energy.map({ .energy($0) }) ?? defaultKeep.map({ .keep($0) }) else {
      throw p.fail("rank", "give one of keep, rank or energy")
    }
    var options = PELA.Options(rule: rule)
    options.select = try p.text("select")
    guard let solver = LowRank.Solver(rawValue: try p.text("solver") ?? "automatic") else { throw p.fail("solver", "use exact, randomized or automatic") }
    options.solver = solver
    return options
  }

  static func run(_ step: Recipe.Step, file: String, model: (String) -> String, to destination: String, overwrite: Bool, report: (String) -> Void) throws {
    func data() throws -> String {
      guard let data = step.data else { throw RecipeError.invalid(file: file, path: step.location, line: nil, reason: "\(step.operation) needs 'data'") }
      return model(data)
    }
    switch step.operation {
    case "synthetic-data":
      let p = try Parameters(step, file: file, allowed: ["tasks", "classes_per_task", "shared_classes", "features", "samples_per_class", "noise", "seed", "split"])
      var o = SyntheticTasks.Options()
      o.tasks = try p.int("tasks", o.tasks)
      o.classesPerTask = try p.int("classes_per_task", o.classesPerTask, minimum: 2)
      o.sharedClasses = try p.int("shared_classes", 0, minimum: 0)
      o.features = try p.int("features", o.features, minimum: 2)
      o.samplesPerClass = try p.int("samples_per_class", o.samplesPerClass)
      o.noise = try p.number("noise") ?? o.noise
      o.seed = UInt64(try p.int("seed", 0, minimum: 0))
      let set = try SyntheticTasks.make(o, split: try p.text("split") ?? "train")
      try NetworkFiles.writeLabeled(set, to: destination, overwrite: overwrite)
      report("  \(set.count) rows, \(set.classCount) classes in \(set.taskIDs.count) tasks")
    case "train":
      let p = try Parameters(
        step, file: file,
        allowed: ["hidden", "classes", "activation", "layer_norm", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "clip", "seed", "tasks"])
      let set = try NetworkFiles.labeled(try data(), tasks: try p.integers("tasks"))
      var network: Network<Float>
      if let initial = step.models.first {
        network = try NetworkFiles.load(model(initial))
      } else {
        guard let activation = Activation(configName: try p.text("activation") ?? "relu") else { throw p.fail("activation", "unknown activation") }
        let sizes = [set.features.columns] + (try p.integers("hidden") ?? [64, 64]) + [try p.int("classes", set.classCount)]
        network = .initializedMLP(MLPConfig(layerSizes: sizes, activation: activation, layerNorm: try p.flag("layer_norm")), seed: UInt64(try p.int("seed", 0, minimum: 0)))
      }
      var options = TrainingOptions()
      options.epochs = try p.int("epochs", options.epochs)
      options.batchSize = try p.int("batch_size", options.batchSize)
      guard let kind = Optimizer<Float>.Kind(rawValue: try p.text("optimizer") ?? "adam") else { throw p.fail("optimizer", "use adam or sgd") }
      options.optimizer = kind
      options.learningRate = Float(try p.number("lr") ?? Double(options.learningRate))
      options.momentum = Float(try p.number("momentum") ?? Double(options.momentum))
      options.weightDecay = Float(try p.number("weight_decay") ?? 0)
      options.clipNorm = try p.number("clip").map { Float($0) }
      options.seed = UInt64(try p.int("seed", 0, minimum: 0))
      let losses = try Training.classify(&network, on: set, options: options)
      try NetworkFiles.saveMLP(network, to: destination, overwrite: overwrite)
      report(String(format: "  %d epochs, final loss %.4f", options.epochs, losses.last ?? 0))
    case "zip":
      let p = try Parameters(step, file: file, allowed: ["method", "alpha", "beta", "stop_at", "keep_heads"])
      var options = ZipIt.Options()
      guard let method = ZipIt.Method(rawValue: try p.text("method") ?? "zipit") else { throw p.fail("method", "use zipit, permute or average") }
      options.method = method
      options.alpha = try p.number("alpha") ?? options.alpha
      options.beta = try p.number("beta") ?? options.beta
      options.stop = try p.number("stop_at") == nil ? nil : try p.int("stop_at", 1)
      options.keepHeads = try p.flag("keep_heads")
      let networks = try step.models.map { try NetworkFiles.load(model($0)) }
      if case .decoder = networks.first?.config {
        guard options.stop == nil, !options.keepHeads else { throw p.fail("stop_at", "decoders are zipped whole; stop_at and keep_heads are for MLPs") }
        let zipped = try ZipIt.zipDecoders(networks, sequences: try DataFiles.readTokens(try data()), options: options)
        try NetworkFiles.save(zipped, like: model(step.models[0]), to: destination, overwrite: overwrite)
      } else {
        let zipped = try ZipIt.zip(networks, inputs: try NetworkFiles.labeled(try data()).features, options: options)
        try NetworkFiles.saveMLP(zipped, to: destination, overwrite: overwrite)
      }
    case "atlas":
      let p = try Parameters(step, file: file, allowed: ["objective", "blocks", "keep", "negate_tasks", "exclude", "epochs", "batch_size", "lr", "weight_decay", "seed"])
      guard let base = step.base else { throw RecipeError.invalid(file: file, path: step.location, line: nil, reason: "atlas needs 'base' (the models are its task vectors)") }
      guard let objective = ATLAS.Objective(rawValue: try p.text("objective") ?? "ce") else { throw p.fail("objective", "use ce, few-shot, negate, entropy or ufm") }
      var options = ATLAS.Options(objective: objective)
      switch step.global["blocks"] {
      case nil, .text("tensor")?: break
      case .text("isotropic")?: options.isotropic = true
      case .number(let k)? where k >= 1 && k == k.rounded(): options.partitions = Int(k)
      default: throw p.fail("blocks", "use tensor, isotropic or a number of partitions")
      }
      options.keepFraction = try p.number("keep")
      options.negateTasks = Set(try p.integers("negate_tasks") ?? [])
      options.epochs = try p.int("epochs", options.epochs)
      options.batchSize = try p.int("batch_size", options.batchSize)
      options.learningRate = Float(try p.number("lr") ?? Double(options.learningRate))
      options.weightDecay = Float(try p.number("weight_decay") ?? Double(options.weightDecay))
      options.seed = UInt64(try p.int("seed", 0, minimum: 0))
      let problem = try ATLAS.Problem(
        base: try NetworkFiles.load(model(base)), taskVectors: try step.models.map { try NetworkFiles.tensors(model($0)) }, names: step.models, exclude: try p.text("exclude"))
      let (coefficients, epochs) = try ATLAS.learn(problem, data: try NetworkFiles.labeled(try data()), options: options)
      try NetworkFiles.saveMLP(
        problem.network(coefficients), to: destination, overwrite: overwrite, files: ["atlas-coefficients.json": String(decoding: try coefficients.json(), as: UTF8.self)])
      report(String(format: "  %d epochs, final loss %.4f", epochs.count, epochs.last?.loss ?? 0))
    case "pela":
      let p = try Parameters(
        step, file: file,
        allowed: ["keep", "rank", "energy", "select", "solver", "format", "distill", "epochs", "batch_size", "lr", "weight_decay", "task_weight", "feature_weight",
          "logit_weight", "perturbation_weight", "perturbation_epsilon", "train_all", "seed"])
      guard step.models.count == 1 else { throw RecipeError.invalid(file: file, path: step.location, line: nil, reason: "pela takes one model") }
      var run = LowRankFiles.PELARun(options: try rankOptions(p, defaultKeep: 0.5))
      guard let format = LowRankFiles.Format(rawValue: try p.text("format") ?? "factored") else { throw p.fail("format", "use factored or dense") }
      run.format = format
      run.options.seed = UInt64(try p.int("seed", 0, minimum: 0))
      if try p.flag("distill") {
        var d = PELA.DistillationOptions()
        d.epochs = try p.int("epochs", d.epochs)
        d.batchSize = try p.int("batch_size", d.batchSize)
        d.learningRate = Float(try p.number("lr") ?? Double(d.learningRate))
        d.weightDecay = Float(try p.number("weight_decay") ?? Double(d.weightDecay))
        d.taskWeight = Float(try p.number("task_weight") ?? Double(d.taskWeight))
        d.featureWeight = Float(try p.number("feature_weight") ?? Double(d.featureWeight))
        d.logitWeight = Float(try p.number("logit_weight") ?? Double(d.logitWeight))
        d.perturbationWeight = Float(try p.number("perturbation_weight") ?? Double(d.perturbationWeight))
        d.perturbationEpsilon = Float(try p.number("perturbation_epsilon") ?? Double(d.perturbationEpsilon))
        d.trainEverything = try p.flag("train_all")
        d.seed = run.options.seed
        run.distillation = d
        run.data = try data()
      }
      let result = try LowRankFiles.pela(model(step.models[0]), to: destination, run: run, overwrite: overwrite)
      let factored = result.layers.filter { $0.rank != nil }.count
      report("  \(factored) layers factored: \(result.parameters.after) parameters of \(result.parameters.before)")
      if let q = result.quality { report(String(format: "  %@ on the data: %.4f original, %.4f truncated, %.4f distilled", q.measure, q.original, q.truncated, q.distilled)) }
    case "extract-lora":
      let p = try Parameters(step, file: file, allowed: ["keep", "rank", "energy", "select", "solver"])
      guard step.models.count == 1, let base = step.base else { throw RecipeError.invalid(file: file, path: step.location, line: nil, reason: "extract-lora takes one model (the fine-tune) and its base") }
      let result = try LowRankFiles.extractLoRA(finetuned: model(step.models[0]), base: model(base), to: destination, options: try rankOptions(p, defaultKeep: nil), overwrite: overwrite)
      report("  LoRA adapter of \(result.layers.filter { $0.rank != nil }.count) layers")
    case "synthetic-tokens":
      let p = try Parameters(step, file: file, allowed: ["sequences", "length", "vocabulary", "noise", "seed", "split"])
      var o = SyntheticTokens.Options()
      o.sequences = try p.int("sequences", o.sequences)
      o.length = try p.int("length", o.length, minimum: 2)
      o.vocabulary = try p.int("vocabulary", o.vocabulary, minimum: 2)
      o.noise = try p.number("noise") ?? o.noise
      o.seed = UInt64(try p.int("seed", 0, minimum: 0))
      guard overwrite || !FileManager.default.fileExists(atPath: destination) else { throw CheckpointError.outputExists(path: destination) }
      try NetworkFiles.writeTokens(try SyntheticTokens.make(o, split: try p.text("split") ?? "train"), to: destination)
      report("  \(o.sequences) sequences of \(o.length) tokens")
    case "mkv":
      let p = try Parameters(step, file: file, allowed: ["budget", "step", "ranks", "per_round", "data_free", "train", "epochs", "batch_size", "lr", "kl_weight", "ce_weight", "seed"])
      guard step.models.count == 1 else { throw RecipeError.invalid(file: file, path: step.location, line: nil, reason: "mkv takes one model") }
      var run = KVProjectionFiles.Run()
      run.budget = try p.number("budget") ?? run.budget
      run.step = try p.number("step") == nil ? nil : try p.int("step", 1)
      guard let search = KVProjectionFiles.RankSearch(rawValue: try p.text("ranks") ?? "adaptive") else { throw p.fail("ranks", "use adaptive or uniform") }
      run.search = search
      run.perRound = try p.number("per_round") == nil ? nil : try p.int("per_round", 1)
      run.dataFree = try p.flag("data_free")
      run.data = try step.data.map { _ in try data() }
      if try p.flag("train") {
        var t = MatryoshkaKV.TrainingOptions()
        t.epochs = try p.int("epochs", t.epochs)
        t.batchSize = try p.int("batch_size", t.batchSize)
        t.learningRate = Float(try p.number("lr") ?? Double(t.learningRate))
        t.klWeight = Float(try p.number("kl_weight") ?? Double(t.klWeight))
        t.crossEntropyWeight = Float(try p.number("ce_weight") ?? Double(t.crossEntropyWeight))
        t.seed = UInt64(try p.int("seed", 0, minimum: 0))
        run.training = t
      }
      let result = try KVProjectionFiles.run(model(step.models[0]), to: destination, run: run, overwrite: overwrite)
      report(String(format: "  KV cache %.1f%% of the original; key ranks %@, value ranks %@", result.ranks.keptFraction(dimension: result.headDimension) * 100,
        result.ranks.keyRanks.map { $0.map(String.init).joined(separator: " ") }.joined(separator: " | "), result.ranks.valueRanks.map { $0.map(String.init).joined(separator: " ") }.joined(separator: " | ")))
    case "eval":
      let p = try Parameters(step, file: file, allowed: ["tasks"])
      guard step.models.count == 1 else { throw RecipeError.invalid(file: file, path: step.location, line: nil, reason: "eval takes one model") }
      let network = try NetworkFiles.load(model(step.models[0]))
      if case .decoder = network.config {
        let result = try Training.perplexity(network, on: try DataFiles.readTokens(try data()))
        report(String(format: "  %d tokens, loss %.4f, perplexity %.3f", result.tokens, result.loss, result.perplexity))
        try writeReport(["model": step.models[0], "tokens": result.tokens, "loss": result.loss, "perplexity": result.perplexity], to: destination, overwrite: overwrite)
        return
      }
      let result = try Training.evaluate(network, on: try NetworkFiles.labeled(try data(), tasks: try p.integers("tasks")))
      var lines = [String(format: "  accuracy %.2f%%, joint accuracy %.2f%%, loss %.4f", result.accuracy * 100, result.jointAccuracy * 100, result.loss)]
      lines += result.tasks.map { String(format: "  task %d: accuracy %.2f%%, within its classes %.2f%%", $0.task, $0.accuracy * 100, $0.accuracyWithinTask * 100) }
      lines.forEach(report)
      let json: [String: Any] = [
        "model": step.models[0], "accuracy": result.accuracy, "joint_accuracy": result.jointAccuracy, "loss": result.loss,
        "tasks": result.tasks.map { ["task": $0.task, "accuracy": $0.accuracy, "accuracy_within_task": $0.accuracyWithinTask] },
      ]
      try writeReport(json, to: destination, overwrite: overwrite)
    default:
      preconditionFailure("not a network step: \(step.operation)")
    }
  }
}
