import Adapt
import Checkpoint
import Foundation
import Nets
import Tensor

/// Low-rank factorisation of checkpoints on disk, tensor by tensor (memory: one weight and its
/// factors at a time): PELA's factored or dense outputs, and LoRA adapters extracted from a
/// fine-tune. Untouched tensors are copied byte for byte.
public enum LowRankFiles {
  public enum Format: String, Sendable, CaseIterable {
    /// `L.0.weight` (A), `L.1.weight` (B), `L.1.bias`, ranks in config.json's `low_rank`.
    case factored
    /// `L.weight = B A`: the same names and shapes as the input, loadable by any tool.
    case dense
  }

  /// The config of a model folder, when it has one that Nets knows.
  static func config(of model: String) -> (NetworkConfig?, Data?) {
    guard let folder = ModelFolder.modelFolder(of: model), InputFile.isRegularFile(folder + "/config.json"),
      let json = try? Data(InputFile.read(folder + "/config.json"))
    else { return (nil, nil) }
    return (try? NetworkConfig(json: json), json)
  }

  /// The candidate layers of a checkpoint and the rank each gets (nil: stays dense, with why).
  /// The energy rule needs each weight's spectrum, so it reads and decomposes them here.
  static func plan(
    _ checkpoint: any Checkpoint, config: NetworkConfig?, options: PELA.Options, progress: ((Int, Int) -> Void)?
  ) throws -> [(layer: String, rank: Int?, reason: String?)] {
    let weights = checkpoint.tensors.map { ($0.name, $0.shape) }
    let layers = try PELA.candidateLayers(weights, config: config, options: options)
    guard !layers.isEmpty else {
      throw AdaptError.noLayers(options.select ?? "the default layers (attention and MLP projections)")
    }
    return try layers.enumerated().map { i, layer in
      defer { progress?(i + 1, layers.count) }
      let shape = try checkpoint.info(layer + ".weight").shape
      let spectrum =
        options.rule.needsSpectrum && shape[0] >= options.minimumOutputs
        ? try LAPACK.svd(try checkpoint.tensor(named: layer + ".weight")).s.map(Double.init) : []
      let planned = PELA.plannedRank(rows: shape[0], columns: shape[1], options: options, singularValues: spectrum)
      return (layer, planned.rank, planned.reason)
    }
  }

  /// Factors the selected layers of `model` into `output` (a folder or a single file), copying
  /// every other tensor and the folder's other files. Returns one report per candidate layer.
  public static func factor(
    _ model: String, to output: String, options: PELA.Options, format: Format, outputFormat: CheckpointFormat,
    overwrite: Bool,
    progress: ((String, Int, Int) -> Void)? = nil
  ) throws -> [PELA.LayerReport] {
    let checkpoint = try openCheckpoint(model)
    let (config, configJSON) = config(of: model)
    let plan = try plan(checkpoint, config: config, options: options) { progress?("planning", $0, $1) }
    let ranks = Dictionary(uniqueKeysWithValues: plan.compactMap { p in p.rank.map { (p.layer, $0) } })
    let factored = format == .factored ? ranks : [:]
    var infos: [TensorInfo] = []
    for info in checkpoint.tensors {
      let layout = Network<Float>.factoredLayout(info.name, shape: info.shape, lowRank: factored)
      // Factors are floating point even for an integer weight; everything else keeps its dtype.
      let dtype = layout.count == 2 && !info.dtype.isFloatingPoint ? .f32 : info.dtype
      infos += layout.map { TensorInfo(name: $0.name, dtype: dtype, shape: $0.shape) }
    }
    var write = WriteOptions(
      format: outputFormat, metadata: checkpoint.metadata, copyFilesFrom: ModelFolder.modelFolder(of: model),
      overwrite: overwrite)
    write.skippedFiles.formUnion(ModelCard.replacedFiles)
    write.files["README.md"] = pelaCard(model: model, layers: factored.count, factored: !factored.isEmpty)
    if !factored.isEmpty {
      let rankJSON = try JSONSerialization.data(withJSONObject: factored, options: [.sortedKeys])
      write.metadata["low_rank"] = String(decoding: rankJSON, as: UTF8.self)
      if let configJSON {
        write.files["config.json"] = try NetworkConfig.addingLowRank(to: configJSON, ranks: factored, method: "pela")
      }
    }
    let writer = try CheckpointWriter(destination: output, tensors: infos, options: write)
    var reports: [String: PELA.LayerReport] = [:]
    var done = 0
    for info in checkpoint.tensors {
      let layer = info.name.hasSuffix(".weight") ? String(info.name.dropLast(7)) : ""
      let storage = info.dtype.isFloatingPoint ? info.dtype : .f32
      if let r = ranks[layer] {
        let w = try checkpoint.tensor(named: info.name)
        let factors = try LowRank.factor(w, rank: r, solver: options.solver, seed: options.seed)
        if format == .factored {
          try writer.write(layer + ".0.weight", factors.a, as: storage)
          try writer.write(layer + ".1.weight", factors.b, as: storage)
        } else {
          try writer.write(info.name, factors.product, as: storage)
        }
        reports[layer] = PELA.LayerReport(layer: layer, rows: info.shape[0], columns: info.shape[1], factors: factors)
        done += 1
        progress?("factoring", done, ranks.count)
      } else {
        // Copied byte for byte, under its factored name when it is a factored layer's bias.
        try writer.write(
          Network<Float>.factoredLayout(info.name, shape: info.shape, lowRank: factored)[0].name,
          try checkpoint.read(info.name))
      }
    }
    try writer.finish()
    return try plan.map { p in
      if let report = reports[p.layer] { return report }
      let shape = try checkpoint.info(p.layer + ".weight").shape
      return PELA.LayerReport(layer: p.layer, rows: shape[0], columns: shape[1], denseBecause: p.reason)
    }
  }
}

extension LowRankFiles {
  /// What `extractLoRA` wrote: one report per candidate layer, and the tensors outside those
  /// layers that differ from the base (a LoRA adapter cannot hold them).
  public struct LoRAExtraction: Sendable {
    public let layers: [PELA.LayerReport]
    public let otherChangedTensors: [String]
  }

  /// Writes a PEFT LoRA adapter folder (`adapter_model.safetensors`, `adapter_config.json`) whose
  /// `B A` is the best rank-r approximation of `finetuned - base` for every selected layer:
  /// `base_model.model.<layer>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r), with
  /// `lora_alpha = r` per layer so PEFT's scaling is 1. Layers the fine-tune left unchanged are
  /// skipped. Memory: one layer at a time plus the (small) factors.
  public static func extractLoRA(
    finetuned: String, base: String, to output: String, options: PELA.Options, savesModules: Bool = false,
    overwrite: Bool, progress: ((Int, Int) -> Void)? = nil
  ) throws -> LoRAExtraction {
    let tuned = try openCheckpoint(finetuned)
    let original = try openCheckpoint(base)
    if !overwrite && FileManager.default.fileExists(atPath: output) { throw CheckpointError.outputExists(path: output) }
    let (networkConfig, configJSON) = config(of: finetuned)
    let layers = try PELA.candidateLayers(
      tuned.tensors.map { ($0.name, $0.shape) }, config: networkConfig, options: options)
    guard !layers.isEmpty else {
      throw AdaptError.noLayers(options.select ?? "the default layers (attention and MLP projections)")
    }
    let configObject = configJSON.flatMap { (try? JSONSerialization.jsonObject(with: $0)) as? [String: Any] }
    // GPT-2's Conv1D layers store the weight as (in x out): the update is factored transposed
    // and the adapter says fan_in_fan_out, as PEFT needs for them.
    let conv1D = Set(layers.filter { Self.isConv1D($0, config: configObject) })
    guard conv1D.isEmpty || conv1D.count == layers.count else {
      throw AdaptError.noLayers(
        "both Conv1D (\(conv1D.sorted().prefix(2).joined(separator: ", "))) and linear layers; PEFT takes one "
          + "orientation per adapter: select one kind with --select")
    }
    var factors: [(layer: String, factors: LowRankFactors)] = []
    var reports: [PELA.LayerReport] = []
    for (i, layer) in layers.enumerated() {
      let name = layer + ".weight"
      guard let info = original.lookup(name) else { throw CheckpointError.missingTensor(file: base, tensor: name) }
      let w = try tuned.tensor(named: name)
      guard info.shape == w.shape else {
        throw CheckpointError.invalidEntry(
          file: base, tensor: name,
          reason: "shape \(info.shape), the fine-tune has \(w.shape); the LoRA must come from the fine-tune's own base")
      }
      var delta = w
      let b = try original.tensor(named: name)
      for e in delta.scalars.indices { delta.scalars[e] -= b.scalars[e] }
      if conv1D.contains(layer) { delta = delta.transposed() }
      let (rows, columns) = (delta.shape[0], delta.shape[1])
      defer { progress?(i + 1, layers.count) }
      guard delta.scalars.contains(where: { $0 != 0 }) else {
        reports.append(
          PELA.LayerReport(layer: layer, rows: rows, columns: columns, denseBecause: "unchanged from the base"))
        continue
      }
      let spectrum = options.rule.needsSpectrum ? try LAPACK.svd(delta) : nil
      let r = options.rule.rank(rows: rows, columns: columns, singularValues: spectrum?.s.map(Double.init) ?? [])
      guard r >= 1 else {
        reports.append(PELA.LayerReport(layer: layer, rows: rows, columns: columns, denseBecause: "rank 0"))
        continue
      }
      let f = try LowRank.factor(delta, rank: r, solver: options.solver, seed: options.seed, spectrum: spectrum)
      factors.append((layer, f))
      reports.append(PELA.LayerReport(layer: layer, rows: rows, columns: columns, factors: f))
    }
    guard !factors.isEmpty else {
      throw AdaptError.nothingToDo(
        method: "extract-lora",
        reason: "the fine-tune does not differ from the base in any selected layer; nothing to extract")
    }
    let covered = Set(factors.map { $0.layer + ".weight" })
    var others: [String] = []
    for info in tuned.tensors where !covered.contains(info.name) {
      guard let b = original.lookup(info.name), b.shape == info.shape, b.dtype == info.dtype else {
        others.append(info.name)
        continue
      }
      if try tuned.read(info.name) != original.read(info.name) { others.append(info.name) }
    }
    // PEFT's modules_to_save: the changed modules outside the LoRA layers, named by their last
    // component; PEFT wraps every module whose name ends with one, so all of those are saved.
    let loraLayers = Set(factors.map(\.layer))
    func module(_ tensor: String) -> String { tensor.split(separator: ".").dropLast().joined(separator: ".") }
    let savedKeys =
      savesModules
      ? Array(
        Set(
          others.map(module).filter { !$0.isEmpty && !loraLayers.contains($0) }.map {
            String($0.split(separator: ".").last ?? "")
          })
      ).sorted() : []
    let saved = tuned.tensors.filter { info in
      let m = module(info.name)
      return !loraLayers.contains(m) && savedKeys.contains { m == $0 || m.hasSuffix("." + $0) }
    }
    others = others.filter { name in !saved.contains { $0.name == name } }

    let prefix = "base_model.model."
    let infos =
      factors.flatMap { layer, f in
        [
          TensorInfo(name: prefix + layer + ".lora_A.weight", dtype: .f32, shape: f.a.shape),
          TensorInfo(name: prefix + layer + ".lora_B.weight", dtype: .f32, shape: f.b.shape),
        ]
      } + saved.map { TensorInfo(name: prefix + $0.name, dtype: $0.dtype, shape: $0.shape) }
    let ranks = Dictionary(uniqueKeysWithValues: factors.map { ($0.layer, $0.factors.rank) })
    let top = ranks.values.max() ?? 0
    var adapterConfig: [String: Any] = [
      "peft_type": "LORA", "r": top, "lora_alpha": top, "rank_pattern": ranks, "alpha_pattern": ranks,
      "target_modules": factors.map(\.layer), "base_model_name_or_path": base, "bias": "none",
      "fan_in_fan_out": !conv1D.isEmpty, "lora_dropout": 0.0, "use_rslora": false, "inference_mode": true,
      "task_type": Self.taskType(configObject) ?? NSNull(),
    ]
    if !savedKeys.isEmpty { adapterConfig["modules_to_save"] = savedKeys }
    let card = Self.adapterCard(
      base: base, finetuned: finetuned, layers: factors.count, rank: top, conv1D: !conv1D.isEmpty, saved: savedKeys,
      taskType: Self.taskType(configObject))
    try ModelFolder.publishing(output, overwrite: overwrite) { staging in
      let writer = try CheckpointWriter(
        destination: staging + "/adapter_model.safetensors", tensors: infos,
        options: WriteOptions(metadata: ["format": "pt"]))
      for (layer, f) in factors {
        try writer.write(prefix + layer + ".lora_A.weight", f.a, as: .f32)
        try writer.write(prefix + layer + ".lora_B.weight", f.b, as: .f32)
      }
      for info in saved { try writer.write(prefix + info.name, try tuned.read(info.name)) }
      try writer.finish()
      do {
        try JSONSerialization.data(withJSONObject: adapterConfig, options: [.prettyPrinted, .sortedKeys]).write(
          to: URL(fileURLWithPath: staging + "/adapter_config.json"))
        try Data(card.utf8).write(to: URL(fileURLWithPath: staging + "/README.md"))
      } catch {
        throw CheckpointError.cannotWrite(file: output + "/adapter_config.json", reason: error.localizedDescription)
      }
    }
    return LoRAExtraction(layers: reports, otherChangedTensors: others)
  }
}

extension LowRankFiles {
  /// PELA on a model on disk: factor, and with `distillation` distil the factored model from the
  /// original on `data` (labelled features for an MLP, token sequences for a decoder), measuring
  /// it before and after on `evaluation` (or `data`).
  public struct PELARun {
    public var options: PELA.Options
    public var format: Format = .factored
    public var distillation: PELA.DistillationOptions?
    public var data: String?
    public var labels: String?
    public var evaluation: String?
    public init(options: PELA.Options) { self.options = options }
  }

  public struct PELAResult: Sendable {
    public let layers: [PELA.LayerReport]
    /// Parameters of the whole model before and after.
    public let parameters: (before: Int, after: Int)
    /// Accuracy (MLPs) or perplexity (decoders) after plain truncation and after distillation,
    /// and of the original (distillation runs only).
    public let quality: (measure: String, original: Double, truncated: Double, distilled: Double)?
    public let epochs: [PELA.DistillationReport]
  }

  public static func pela(
    _ model: String, to output: String, run: PELARun, outputFormat: CheckpointFormat = .safetensors, overwrite: Bool,
    progress: ((String, Int, Int) -> Void)? = nil, epoch: ((PELA.DistillationReport) -> Void)? = nil
  ) throws -> PELAResult {
    guard let distillation = run.distillation else {
      let before = try openCheckpoint(model).tensors.reduce(0) { $0 + $1.count }
      let layers = try factor(
        model, to: output, options: run.options, format: run.format, outputFormat: outputFormat, overwrite: overwrite,
        progress: progress)
      let saved = layers.reduce(0) { $0 + $1.parametersBefore - $1.parametersAfter }
      return PELAResult(layers: layers, parameters: (before, before - saved), quality: nil, epochs: [])
    }
    guard let data = run.data else { throw AdaptError.missingData(method: "PELA distillation", needed: "data") }
    if !overwrite && FileManager.default.fileExists(atPath: output) { throw CheckpointError.outputExists(path: output) }
    let teacher = try NetworkFiles.load(model)
    var (student, layers) = try PELA.factor(teacher, options: run.options) { progress?("factoring", $0, $1) }
    let train: PELA.DistillationData
    let measure: (Network<Float>) throws -> Double
    let name: String
    switch teacher.config {
    case .mlp:
      let labelled = try NetworkFiles.labeled(data, labels: run.labels)
      let check = try run.evaluation.map { try NetworkFiles.labeled($0) } ?? labelled
      (train, name, measure) = (.features(labelled), "accuracy", { try Training.evaluate($0, on: check).accuracy })
    case .decoder:
      let sequences = try DataFiles.readTokens(data)
      let check = try run.evaluation.map { try DataFiles.readTokens($0) } ?? sequences
      (train, name, measure) = (.tokens(sequences), "perplexity", { try Training.perplexity($0, on: check).perplexity })
    case .bert:
      // An encoder's quality: the relative error of its last hidden states against the original's.
      let sequences = try DataFiles.readTokens(data)
      let check = try run.evaluation.map { try DataFiles.readTokens($0) } ?? sequences
      (train, name, measure) = (
        .tokens(sequences), "hidden-state error", { try Training.hiddenStateError($0, reference: teacher, on: check) }
      )
    }
    let (original, truncated) = (try measure(teacher), try measure(student))
    let epochs = try PELA.distill(&student, teacher: teacher, on: train, options: distillation, progress: epoch)
    let distilled = try measure(student)
    let result = run.format == .dense ? try PELA.densified(student) : student
    if case .mlp = teacher.config {
      try NetworkFiles.saveMLP(result, to: output, overwrite: overwrite)
    } else {
      try NetworkFiles.save(
        result, like: model, to: output, overwrite: overwrite,
        card: pelaCard(model: model, layers: result.lowRank.count, factored: !result.lowRank.isEmpty))
    }
    return PELAResult(
      layers: layers, parameters: (PELA.parameterCount(teacher), PELA.parameterCount(student)),
      quality: (name, original, truncated, distilled), epochs: epochs)
  }
}

extension LowRankFiles {
  /// Whether `layer` is a GPT-2 style Conv1D (weight stored in x out): `c_attn`, `c_proj` and
  /// `c_fc` of a `gpt2` model.
  static func isConv1D(_ layer: String, config: [String: Any]?) -> Bool {
    guard config?["model_type"] as? String == "gpt2" else { return false }
    return ["c_attn", "c_proj", "c_fc"].contains { layer.hasSuffix("." + $0) }
  }

  /// PEFT's `task_type` for the architecture config.json names (`*ForCausalLM` -> CAUSAL_LM ...).
  static func taskType(_ config: [String: Any]?) -> String? {
    guard let architecture = (config?["architectures"] as? [String])?.first else { return nil }
    let types = [
      ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
      ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
      ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("Model", "FEATURE_EXTRACTION"),
    ]
    return types.first { architecture.hasSuffix($0.0) }?.1
  }

  /// The adapter's README.md: what it holds and how to load it.
  static func adapterCard(
    base: String, finetuned: String, layers: Int, rank: Int, conv1D: Bool, saved: [String], taskType: String?
  ) -> String {
    let loader = taskType == "CAUSAL_LM" ? "AutoPeftModelForCausalLM" : "AutoPeftModel"
    return """
      ---
      base_model: \(base)
      library_name: peft
      tags:
      - lora
      - mergekit
      ---

      # LoRA adapter extracted from \(finetuned)

      `mergekit extract-lora` factored the difference between \(finetuned) and its base \(base) in
      \(layers) layers, each at rank up to \(rank) (the truncated SVD: the best approximation at
      that rank), with `lora_alpha` equal to the rank so that the update is `B A` exactly\(conv1D
        ? "; the layers are Conv1D, so the adapter sets `fan_in_fan_out`" : "").\(saved.isEmpty
        ? "" : " Modules saved in full (`modules_to_save`): \(saved.joined(separator: ", ")).")

      ```python
      from peft import \(loader)
      model = \(loader).from_pretrained("path/to/this/folder")
      ```

      """
  }
}

extension LowRankFiles {
  /// The card of a PELA output: what was factored and, for a factored folder (which
  /// transformers refuses by its `model_type`), how to run it or get a standard model.
  static func pelaCard(model: String, layers: Int, factored: Bool) -> Data {
    let description =
      factored
      ? "`mergekit pela` replaced \(layers) linear layers of \(model) by two low-rank factors each (PELA, "
        + "arXiv:2311.13459). Its config.json has `model_type: mergekit-pela-factored` (the original under "
        + "`mergekit_original`), so transformers refuses the folder instead of loading the plain architecture "
        + "with the factored layers missing."
      : "`mergekit pela --format dense` factored linear layers of \(model) at low rank (PELA, arXiv:2311.13459) "
        + "and stored each product back as a plain weight: a standard model of the same architecture."
    let run =
      factored
      ? "`mergekit eval THIS_FOLDER --data TOKENS` runs it. For a model transformers loads, write the products "
        + "back as plain weights: `mergekit pela \(model) --format dense ...` with the same rank flags."
      : ModelCard.transformersUsage
    return ModelCard.adaptation(
      method: "pela", title: "PELA low-rank version of \(model)", models: [model], description: description,
      loadsInTransformers: !factored, howToRun: run)
  }
}
