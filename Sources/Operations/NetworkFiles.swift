import Checkpoint
import Foundation
import Nets
import Tensor

/// Loading and saving runnable models and data sets, for the data-driven commands and recipe
/// steps. Errors are `CheckpointError.badDataFile`s naming the file.
public enum NetworkFiles {
  /// The config.json of a model: `config` when given, else the one in the model's folder.
  public static func configPath(model: String, config: String?) throws -> String {
    if let config { return config }
    guard let folder = ModelFolder.modelFolder(of: model) else {
      throw CheckpointError.badDataFile(
        file: model, reason: "a lone tensor file has no config.json; pass the config explicitly")
    }
    return folder + "/config.json"
  }

  /// A model as a runnable network: its config and the tensors the architecture reads.
  public static func load(_ model: String, config: String? = nil) throws -> Network<Float> {
    try load(config: try configPath(model: model, config: config), checkpoint: try openCheckpoint(model))
  }

  /// A network from `checkpoint`'s tensors (a file, or one held in memory) with the config at
  /// `path`.
  public static func load(config path: String, checkpoint: any Checkpoint) throws -> Network<Float> {
    let model = checkpoint.path
    let json = Data(try InputFile.read(path))
    let networkConfig: NetworkConfig
    let lowRank: [String: Int]
    let kvProjection: KVProjection?
    do {
      networkConfig = try NetworkConfig(json: json)
      lowRank = try NetworkConfig.lowRankRanks(json: json)
      kvProjection = try KVProjection.fromConfig(json: json)
    } catch let error as NetsError { throw CheckpointError.badDataFile(file: path, reason: error.description) }
    do { try networkConfig.checkLayers(against: checkpoint.tensors.map(\.name)) } catch let error as NetsError {
      throw CheckpointError.badDataFile(file: path, reason: error.description)
    }
    let needed = Set(
      Network<Float>.expectedShapes(networkConfig, lowRank: lowRank).map(\.name)
        + Network<Float>.expectedShapes(networkConfig, prefix: "bert.", lowRank: lowRank).map(\.name))
    var tensors: [String: Tensor] = [:]
    for info in checkpoint.tensors where needed.contains(info.name) {
      tensors[info.name] = try checkpoint.tensor(named: info.name)
    }
    if kvProjection != nil {
      tensors.merge(try KVProjectionFiles.tensors(folder: URL(fileURLWithPath: path).deletingLastPathComponent().path))
      { a, _ in a }
    }
    do {
      return try Network(config: networkConfig, tensors: tensors, lowRank: lowRank, kvProjection: kvProjection)
    } catch let error as NetsError { throw CheckpointError.badDataFile(file: model, reason: error.description) }
  }

  /// Saves an MLP as a model folder (config.json with its factored layers, f32 safetensors, and
  /// `files` by name).
  public static func saveMLP(
    _ network: Network<Float>, to folder: String, overwrite: Bool, files: [String: String] = [:]
  ) throws {
    guard case .mlp(let config) = network.config else {
      throw CheckpointError.badDataFile(file: folder, reason: "only MLPs are written as new models")
    }
    var configJSON = config.json
    if !network.lowRank.isEmpty {
      configJSON = String(
        decoding: try NetworkConfig.addingLowRank(to: Data(config.json.utf8), ranks: network.lowRank, method: "pela"),
        as: UTF8.self)
    }
    try ModelFolder.write(
      network.tensors, files: files.merging(["config.json": configJSON]) { $1 }, dtype: .f32, to: folder,
      overwrite: overwrite)
  }

  /// Saves any network as a model folder next to the files of `source` (tokenizer, generation
  /// config), in the source's floating dtype, with config.json recording its factored layers,
  /// `card` as its README.md (the source's own card is never copied) and `files` besides.
  public static func save(
    _ network: Network<Float>, like source: String, to folder: String, overwrite: Bool, card: Data? = nil,
    files: [String: Data] = [:]
  ) throws {
    let original = try openCheckpoint(source)
    let dtype = original.tensors.first { $0.dtype.isFloatingPoint }?.dtype ?? .f32
    var options = WriteOptions(
      format: .safetensors, metadata: ["format": "pt"], copyFilesFrom: ModelFolder.modelFolder(of: source),
      overwrite: overwrite)
    if let configPath = ModelFolder.modelFolder(of: source).map({ $0 + "/config.json" }),
      InputFile.isRegularFile(configPath)
    {
      var json = Data(try InputFile.read(configPath))
      if case .decoder(let c) = network.config, c.tails > 1 { json = try NetworkConfig.addingTails(to: json, c) }
      options.files["config.json"] =
        network.lowRank.isEmpty
        ? json : try NetworkConfig.addingLowRank(to: json, ranks: network.lowRank, method: "pela")
    }
    options.skippedFiles.formUnion(ModelCard.replacedFiles)
    if let card { options.files["README.md"] = card }
    options.files.merge(files) { $1 }
    let tensors = network.tensors
    let writer = try CheckpointWriter(
      destination: folder, tensors: tensors.map { TensorInfo(name: $0.name, dtype: dtype, shape: $0.tensor.shape) },
      options: options)
    for (name, tensor) in tensors { try writer.write(name, tensor, as: dtype) }
    try writer.finish()
  }

  /// A BERT encoder with a new classification head of `labels` classes
  /// (`BertForSequenceClassification`): the encoder's tensors under `bert.`, its checkpoint's
  /// pooler when it has one (else drawn like the classifier), and a classifier drawn from
  /// N(0, 0.02^2) with zero bias, as transformers initialises it. Returns the network and its
  /// config.json (the source's, with the architecture, `num_labels` and label maps).
  public static func withClassificationHead(_ encoder: Network<Float>, source: String, labels: Int, seed: UInt64) throws
    -> (Network<Float>, Data)
  {
    guard case .bert(var c) = encoder.config else { preconditionFailure("withClassificationHead takes BERT") }
    c.classifierLabels = labels
    var tensors = Dictionary(
      uniqueKeysWithValues: encoder.tensors.map { ("bert." + $0.name.dropFirst(encoder.tensorPrefix.count), $0.tensor) }
    )
    let checkpoint = try openCheckpoint(source)
    let h = c.hiddenSize
    func drawn(_ name: String, _ shape: [Int]) -> Tensor {
      CounterRNG(seed: seed, stream: "head-" + name).normalTensor(shape, scale: 0.02)
    }
    for suffix in ["weight", "bias"] {
      let stored = ["pooler.dense." + suffix, "bert.pooler.dense." + suffix].first { checkpoint.lookup($0) != nil }
      tensors["bert.pooler.dense." + suffix] =
        try stored.map { try checkpoint.tensor(named: $0) }
        ?? (suffix == "weight"
          ? drawn("pooler", [h, h]) : Tensor(shape: [h], scalars: [Float](repeating: 0, count: h)))
    }
    tensors["classifier.weight"] = drawn("classifier", [labels, h])
    tensors["classifier.bias"] = Tensor(shape: [labels], scalars: [Float](repeating: 0, count: labels))
    let network = try Network<Float>(config: .bert(c), tensors: tensors)
    var object: [String: Any] = [:]
    if let folder = ModelFolder.modelFolder(of: source), InputFile.isRegularFile(folder + "/config.json") {
      object =
        (try? JSONSerialization.jsonObject(with: Data(InputFile.read(folder + "/config.json")))) as? [String: Any]
        ?? [:]
    }
    object["architectures"] = ["BertForSequenceClassification"]
    object["num_labels"] = labels
    object["id2label"] = Dictionary(uniqueKeysWithValues: (0..<labels).map { ("\($0)", "LABEL_\($0)") })
    object["label2id"] = Dictionary(uniqueKeysWithValues: (0..<labels).map { ("LABEL_\($0)", $0) })
    let json = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
    return (network, json)
  }

  /// A JSON report (sorted keys), written atomically; refuses to replace an existing file
  /// unless `overwrite`.
  public static func writeReport(_ json: [String: Any], to destination: String, overwrite: Bool) throws {
    guard overwrite || !FileManager.default.fileExists(atPath: destination) else {
      throw CheckpointError.outputExists(path: destination)
    }
    let bytes: Data
    do { bytes = try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys]) } catch {
      throw CheckpointError.cannotWrite(file: destination, reason: error.localizedDescription)
    }
    try writeFileAtomically([UInt8](bytes), to: destination)
  }

  /// The tensors of a checkpoint (task vectors), decoded.
  public static func tensors(_ path: String) throws -> [String: Tensor] {
    let checkpoint = try openCheckpoint(path)
    return Dictionary(
      uniqueKeysWithValues: try checkpoint.tensors.map { ($0.name, try checkpoint.tensor(named: $0.name)) })
  }

  /// Labelled features from a data file, optionally only the rows of some tasks.
  public static func labeled(_ path: String, labels: String? = nil, tasks: [Int]? = nil) throws -> LabeledFeatures {
    let table = try DataFiles.readLabeled(path, labels: labels)
    var data: LabeledFeatures
    do {
      data = try LabeledFeatures(
        features: Matrix(rows: table.rows, columns: table.columns, values: table.features), labels: table.labels,
        tasks: table.tasks, source: path)
    } catch let error as NetsError { throw CheckpointError.badDataFile(file: path, reason: error.description) }
    if let tasks {
      data = data.tasks(Set(tasks))
      guard data.count > 0 else {
        throw CheckpointError.badDataFile(
          file: path, reason: "no rows belong to tasks \(tasks.map(String.init).joined(separator: ","))")
      }
    }
    return data
  }

  /// Writes token sequences as JSON lines (one array of ids per line), atomically.
  public static func writeTokens(_ sequences: [[Int]], to path: String) throws {
    let text = sequences.map { "[" + $0.map(String.init).joined(separator: ", ") + "]" }.joined(separator: "\n") + "\n"
    try writeFileAtomically(Array(text.utf8), to: path)
  }

  /// Writes labelled features as safetensors.
  public static func writeLabeled(_ data: LabeledFeatures, to path: String, overwrite: Bool) throws {
    try DataFiles.writeLabeled(
      FeatureTable(
        features: data.features.values, columns: data.features.columns, labels: data.labels, tasks: data.tasks),
      to: path, overwrite: overwrite)
  }
}
