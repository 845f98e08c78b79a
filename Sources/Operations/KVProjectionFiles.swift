import Adapt
import Checkpoint
import Foundation
import Nets
import Tensor

/// MatryoshkaKV on models on disk. The output is a model folder: the source model's files
/// (hard-linked where the file system allows, else copied), `kv_projections.safetensors` with
/// every layer's bases, means and ranks, and config.json with a `kv_projection` section that
/// Nets reads (so `mergekit eval` runs the model with its projected cache).
public enum KVProjectionFiles {
  public static let fileName = "kv_projections.safetensors"

  public enum RankSearch: String, Sendable, CaseIterable {
    case adaptive, uniform
  }

  public struct Run: Sendable {
    public var budget = 0.5
    /// Rank step; nil: an eighth of the head dimension (16 for heads of 128, as the paper).
    public var step: Int?
    public var search: RankSearch = .adaptive
    public var perRound: Int?
    /// Bases from the weights alone instead of PCA of activations.
    public var dataFree = false
    /// Calibration token sequences (PCA statistics and the rank search).
    public var data: String?
    public var training: MatryoshkaKV.TrainingOptions?
    /// Training sequences (default: `data`).
    public var trainingData: String?
    /// Held-out sequences on which the result is measured against the model without projections.
    public var validation: String?
    public init() {}
  }

  public struct Result: Sendable {
    public let ranks: KVProjection
    public let headDimension: Int
    public let dataFree: Bool
    public let trained: Bool
    /// On the validation data: logit KL and final-hidden-state error of the result, and of the
    /// PCA bases at the same ranks when the bases were trained.
    public let validation: (kl: Double, error: Double, pcaKL: Double?)?
  }

  public static func run(
    _ model: String, to output: String, run: Run, overwrite: Bool, progress: ((String, Int, Int) -> Void)? = nil
  ) throws -> Result {
    if !overwrite && FileManager.default.fileExists(atPath: output) { throw CheckpointError.outputExists(path: output) }
    let network = try NetworkFiles.load(model)
    guard case .decoder(let c) = network.config else {
      throw AdaptError.unsupportedModel(
        method: "MatryoshkaKV",
        reason: "it projects the keys and values of decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 2)")
    }
    guard network.kvProjection == nil else {
      throw AdaptError.unsupportedModel(
        method: "MatryoshkaKV", reason: "\(model) already has K/V projections; start from the original model")
    }
    let step = run.step ?? max(1, c.headDimension / 4)
    try MatryoshkaKV.checkBudget(c, budget: run.budget, step: step)
    let calibration = try run.data.map { try DataFiles.readTokens($0) }
    /// The calibration sequences, which PCA, the adaptive search and training need.
    func sequences() throws -> [[Int]] {
      guard let calibration else {
        throw AdaptError.missingData(
          method: "MatryoshkaKV",
          needed: "token data for PCA, the adaptive rank search and training (or use data_free with uniform ranks)")
      }
      return calibration
    }
    if !(run.dataFree && run.search == .uniform && run.training == nil) { _ = try sequences() }
    let bases: MatryoshkaKV.Bases
    if run.dataFree {
      bases = try MatryoshkaKV.dataFreeBases(network)
    } else {
      let stats = try MatryoshkaKV.statistics(network, sequences: try sequences()) { progress?("statistics", $0, $1) }
      bases = try MatryoshkaKV.pcaBases(network, statistics: stats)
    }
    let full = try MatryoshkaKV.apply(
      network, bases: bases,
      ranks: KVProjection(layers: c.layerCount, heads: c.keyValueHeadCount, rank: c.headDimension))
    let ranks: KVProjection
    switch run.search {
    case .uniform: ranks = MatryoshkaKV.uniformRanks(c, budget: run.budget, step: step)
    case .adaptive:
      ranks = try MatryoshkaKV.searchRanks(
        full, sequences: try sequences(), budget: run.budget, step: step, perRound: run.perRound
      ) { state in
        progress?(
          String(format: "rank search round %d, cache at %.1f%%", state.round, state.keptFraction * 100),
          state.evaluations, state.estimatedEvaluations)
      }
    }
    var projected = full
    projected.kvProjection = ranks
    let pca = projected
    if var training = run.training {
      training.step = step
      let trainingSequences = try run.trainingData.map { try DataFiles.readTokens($0) } ?? sequences()
      projected = try MatryoshkaKV.train(projected, teacher: network, sequences: trainingSequences, options: training) {
        done, total, _ in progress?("training", done, total)
      }.network
    }
    var measured: (Double, Double, Double?)?
    if let validation = run.validation {
      progress?("validation", 0, 1)
      let held = try DataFiles.readTokens(validation)
      let kl = try MatryoshkaKV.logitKL(projected, teacher: network, sequences: held)
      let error = try MatryoshkaKV.outputError(projected, reference: network, sequences: held)
      measured = (
        kl, error, run.training == nil ? nil : try MatryoshkaKV.logitKL(pca, teacher: network, sequences: held)
      )
    }
    try write(
      projected, source: model, to: output, overwrite: overwrite,
      details: [
        "bases": run.dataFree ? "data-free" : "pca", "trained": run.training != nil, "budget": run.budget, "step": step,
        "rank_search": run.search.rawValue,
      ])
    return Result(
      ranks: ranks, headDimension: c.headDimension, dataFree: run.dataFree, trained: run.training != nil,
      validation: measured)
  }

  /// Writes the model folder: the source's files, the projections and the amended config.json.
  static func write(
    _ network: Network<Float>, source: String, to output: String, overwrite: Bool, details: [String: Any]
  ) throws {
    guard let folder = ModelFolder.modelFolder(of: source), let projection = network.kvProjection,
      case .decoder(let c) = network.config
    else {
      throw AdaptError.unsupportedModel(
        method: "MatryoshkaKV", reason: "\(source) is not a model folder with a config.json")
    }
    let fm = FileManager.default
    guard let json = try? Data(InputFile.read(folder + "/config.json")),
      var object = try? JSONSerialization.jsonObject(with: json) as? [String: Any]
    else {
      throw CheckpointError.cannotWrite(file: output, reason: "cannot read \(folder)/config.json")
    }
    var section = projection.json.merging(details) { a, _ in a }
    section["file"] = fileName
    section["kept_fraction"] = projection.keptFraction(dimension: c.headDimension)
    object["kv_projection"] = section
    object = NetworkConfig.markedAsOurs(object, format: "matryoshka-kv")
    let names = KVProjection.shapes(c)
    let rankNames = (0..<c.layerCount).flatMap { l in
      KVProjection.Kind.allCases.map { (l, $0, "model.layers.\(l).self_attn.\($0.rawValue)_ranks") }
    }
    let infos =
      names.map { TensorInfo(name: $0.name, dtype: .f32, shape: $0.shape) }
      + rankNames.map { TensorInfo(name: $0.2, dtype: .i64, shape: [c.keyValueHeadCount]) }
    try ModelFolder.publishing(output, overwrite: overwrite) { staging in
      do {
        for name in try fm.contentsOfDirectory(atPath: folder).sorted()
        where name != "config.json" && name != fileName && !name.hasPrefix(".")
          && !ModelCard.replacedFiles.contains(name)
        {
          var isDirectory: ObjCBool = false
          guard fm.fileExists(atPath: folder + "/" + name, isDirectory: &isDirectory), !isDirectory.boolValue else {
            continue
          }
          try ModelFolder.copyEntry(folder + "/" + name, to: staging + "/" + name, from: folder, hardLink: true)
        }
      } catch let error as CheckpointError {
        throw error
      } catch { throw CheckpointError.cannotWrite(file: output, reason: error.localizedDescription) }
      let card = ModelCard.adaptation(
        method: "matryoshka-kv", title: "MatryoshkaKV projections for \(source)", models: [source],
        description:
          "`mergekit mkv` fitted orthogonal projections of every layer's keys and values (MatryoshkaKV, "
          + "arXiv:2410.14731) in `\(fileName)`, keeping \(String(format: "%.0f", 100 * projection.keptFraction(dimension: c.headDimension)))% of the KV cache. "
          + "The weights are \(source)'s. config.json has `model_type: mergekit-matryoshka-kv` (the original under "
          + "`mergekit_original`), so transformers refuses the folder instead of running it without the projections.",
        loadsInTransformers: false,
        howToRun:
          "`mergekit eval THIS_FOLDER --data TOKENS` runs the model with its projections. The unprojected model is \(source)."
      )
      // A new file: the source's card, which may be hard-linked into the staging folder, is skipped above.
      try card.write(to: URL(fileURLWithPath: staging + "/README.md"))
      let writer = try CheckpointWriter(
        destination: staging + "/" + fileName, tensors: infos,
        options: WriteOptions(metadata: ["format": "pt", "mergekit.kind": "matryoshka-kv"]))
      for (name, shape) in names {
        try writer.write(name, try network.weights.required(name).tensor(shape: shape), as: .f32)
      }
      for (layer, kind, name) in rankNames {
        let ranks = projection.ranks(kind)[layer].map { Int64($0).littleEndian }
        try writer.write(
          name, TensorData(dtype: .i64, shape: [ranks.count], bytes: ranks.withUnsafeBytes { Array($0) }))
      }
      try writer.finish()
      do {
        try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]).write(
          to: URL(fileURLWithPath: staging + "/config.json"))
      } catch { throw CheckpointError.cannotWrite(file: output + "/config.json", reason: error.localizedDescription) }
    }
  }

  /// The projection tensors of a model folder whose config declares them.
  static func tensors(folder: String) throws -> [String: Tensor] {
    let path = folder + "/" + fileName
    guard FileManager.default.fileExists(atPath: path) else {
      throw CheckpointError.badDataFile(
        file: path, reason: "config.json declares kv_projection but this file is missing")
    }
    let file = try openCheckpoint(path)
    var out: [String: Tensor] = [:]
    for info in file.tensors where info.dtype.isFloatingPoint { out[info.name] = try file.tensor(named: info.name) }
    return out
  }
}
