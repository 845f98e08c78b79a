import ArgumentParser
import Checkpoint
import Foundation
import Merge
import Nets
import Recipe

struct ZipCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "zip",
    abstract: "ZipIt!: merge MLPs trained on different tasks (and from different inits) by matching their features.",
    discussion: """
      Runs every model over the data's features (labels unused) to correlate their hidden \
      features, matches them (zipit: greedy zip across and within models; permute: one-to-one \
      Hungarian matching to the first model; average: same-index units), and folds the matching \
      into the weights. --stop-at K zips the first K hidden layers and keeps the rest of every \
      model as a head (partial zipping; the result scores each class by its best head); \
      --keep-heads keeps separate output layers after zipping every hidden layer. Llama-style \
      decoders are zipped from token sequences: heads are aligned across the models, then the \
      residual stream (one merge point), every layer's MLP hidden units and each KV head's value \
      features are matched; queries and keys of aligned heads are averaged. \
      Paper: \
      Stoica, Bolya et al., ZipIt!, ICLR 2024 (arXiv:2305.03053).
      """)

  @Argument(help: "Two or more MLPs, or Llama-style decoders, of one architecture.") var models: [String]
  @Option(help: "Data the models run on (labels unused): features (.safetensors, .csv, .npy) for MLPs, token sequences (.jsonl) for decoders.") var data: String?
  @Option(help: "Labels of a .npy features file (not used, but the reader wants them).") var labels: String?
  @Option(help: "Use only the rows of these tasks (comma-separated task ids).") var tasks: String?
  @Option(help: "Statistics from `mergekit stats A B --at 'hidden$'` instead of --data.") var stats: String?
  @Option(help: "Matching: zipit, permute or average.") var method = "zipit"
  @Option(help: "ZipIt's alpha: how strongly a merged feature competes again (0 never).") var alpha = 0.3
  @Option(help: "ZipIt's beta: share of each model's merges allowed within itself.") var beta = 0.125
  @Option(help: "Zip only the first K hidden layers (1...); the rest of each model becomes a head.") var stopAt: Int?
  @Flag(help: "Keep each model's output layer as a head.") var keepHeads = false
  @Option(name: .shortAndLong, help: "Output model folder.") var output: String
  @Flag(help: "Replace an existing output.") var overwrite = false

  func validate() throws {
    guard models.count >= 2 else { throw ValidationError("give at least two models to zip") }
    for m in models { try requireExisting(m, "model") }
    guard (data == nil) != (stats == nil) else { throw ValidationError("give the data (--data) or its statistics (--stats), one of them") }
    if let data { try requireExisting(data, "data") }
    if let stats { try requireExisting(stats, "statistics") }
    guard ZipIt.Method(rawValue: method) != nil else { throw ValidationError("unknown --method '\(method)' (use zipit, permute or average)") }
    guard alpha >= 0, (0...1).contains(beta) else { throw ValidationError("--alpha must be >= 0 and --beta within [0, 1]") }
    if let stopAt, stopAt < 1 { throw ValidationError("--stop-at counts hidden layers from 1") }
    try requireNewOutput(output, overwrite: overwrite)
  }

  func run() throws {
    let networks = try models.map { try NetworkFiles.load($0) }
    if case .decoder = networks[0].config {
      guard let data, stats == nil, stopAt == nil, !keepHeads else {
        throw ValidationError("decoders are zipped whole from token data (--data T.jsonl); --stats, --stop-at and --keep-heads are for MLPs")
      }
      var options = ZipIt.Options()
      (options.method, options.alpha, options.beta) = (ZipIt.Method(rawValue: method)!, alpha, beta)
      let zipped = try ZipIt.zipDecoders(networks, sequences: try DataFiles.readTokens(data), options: options)
      try NetworkFiles.save(zipped, like: models[0], to: output, overwrite: overwrite)
      print("\(output): \(method) of \(models.count) decoders (residual stream, MLP hidden units and value features matched)")
      return
    }
    var options = ZipIt.Options()
    (options.method, options.alpha, options.beta, options.stop, options.keepHeads) = (ZipIt.Method(rawValue: method)!, alpha, beta, stopAt, keepHeads)
    let statistics: [FeatureStatistics]
    if let stats {
      statistics = try readStatistics(stats, points: try ZipIt.commonConfig(networks).layerCount - 1, width: networks.count)
    } else {
      let rows = try tasks.map { try parseIntegers($0, "--tasks") }
      statistics = try ZipIt.statistics(networks, inputs: try NetworkFiles.labeled(data!, labels: labels, tasks: rows).features)
    }
    let zipped = try ZipIt.apply(networks, matchings: try ZipIt.matchings(statistics, models: networks.count, options: options), keepHeads: keepHeads)
    try NetworkFiles.saveMLP(zipped, to: output, overwrite: overwrite)
    guard case .mlp(let c) = zipped.config else { return }
    print("\(output): \(method) of \(models.count) models, \(c.sharedLayers) shared layer\(c.sharedLayers == 1 ? "" : "s")" + (c.heads > 1 ? ", \(c.heads) heads" : ""))
  }

  /// Joint statistics of every merge point (`layers.{i}.hidden`) from a `mergekit stats` file
  /// made with all the models, in the same order.
  func readStatistics(_ path: String, points: Int, width models: Int) throws -> [FeatureStatistics] {
    let file = try openCheckpoint(path)
    return try (0..<points).map { p in
      let name = "layers.\(p).hidden"
      guard file.lookup(name + ".products") != nil, let count = try file.tensor(named: name + ".count").scalars.first else {
        throw DataFileError(file: path, reason: "no statistics of '\(name)'; make them with mergekit stats \(models == 2 ? "A B" : "MODELS...") --at 'hidden$'")
      }
      let sum = try file.read(name + ".sum").doubles()
      let products = try file.read(name + ".products").doubles()
      guard sum.count * sum.count == products.count, sum.count % models == 0 else {
        throw DataFileError(file: path, reason: "statistics of '\(name)' do not hold \(models) models' features side by side")
      }
      return FeatureStatistics(count: Int(count), sum: sum, products: products)
    }
  }
}
