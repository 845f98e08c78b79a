import ArgumentParser
import Checkpoint
import Foundation
import Nets
import Recipe
import Tensor

struct StatsCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "stats",
    abstract: "Activation statistics of a model (or two models on the same inputs), saved as a checkpoint file.",
    discussion: """
      Runs the model over the data in batches and accumulates, in float64, for every activation \
      point whose name matches --at: the row count, the sum of rows and the sum of outer \
      products (tensors <point>.count, <point>.sum, <point>.products). With a second model, \
      each point's rows are the two models' features side by side (width 2n), so the \
      off-diagonal block is the cross-covariance ZipIt matches with. Padding tokens are left \
      out. `mergekit stats MODEL --data D --at . --list` lists the point names.
      """)

  @Argument(help: "The model, and optionally a second model of the same architecture.") var models: [String]
  @OptionGroup var data: DataOptions
  @Option(help: "Regular expression selecting activation points (e.g. 'hidden$' or 'self_attn\\.keys').") var at: String
  @Option(help: "Rows (or sequences) per batch.") var batchSize = 256
  @Flag(help: "List the matching point names and widths, write nothing.") var list = false
  @Option(name: .shortAndLong, help: "Output .safetensors file.") var output: String?
  @Flag(help: "Replace an existing output.") var overwrite = false
  @Flag(name: .shortAndLong, help: "No progress output.") var quiet = false

  func validate() throws {
    guard (1...2).contains(models.count) else { throw ValidationError("give one model, or two of the same architecture") }
    for m in models { try requireExisting(m, "model") }
    guard (try? Regex(at)) != nil else { throw ValidationError("--at '\(at)' is not a valid regular expression") }
    guard list || output != nil else { throw ValidationError("pass -o OUTPUT.safetensors (or --list)") }
    if let output { try requireNewOutput(output, overwrite: overwrite) }
  }

  func run() throws {
    let networks = try models.map { try NetworkFiles.load($0) }
    if networks.count == 2, networks[0].config != networks[1].config {
      throw ValidationError("'\(models[0])' and '\(models[1])' have different architectures")
    }
    let inputs = try batches(networks[0].config)
    var statistics: [(name: String, stats: FeatureStatistics)] = []
    let progress = Progress("stats", quiet: quiet, unit: .items("batches"))
    for (b, (input, keep)) in inputs.enumerated() {
      var perModel: [[(name: String, value: Matrix<Float>)]] = []
      for network in networks {
        let tape = Tape<Float>()
        let points = try network.forward(tape, input).points(matching: at)
        perModel.append(points.map { ($0.name, rows(tape.value($0.value), keep)) })
      }
      if statistics.isEmpty {
        guard !perModel[0].isEmpty else { throw ValidationError("no activation point matches --at '\(at)'; try --at . --list") }
        statistics = perModel[0].map { ($0.name, FeatureStatistics(width: $0.value.columns * networks.count)) }
        if list {
          for (name, value) in perModel[0] { print("\(name)  width \(value.columns)") }
          return
        }
      }
      for (p, point) in perModel[0].enumerated() {
        statistics[p].stats.add(networks.count == 1 ? point.value : Matrix.concatenated(point.value, perModel[1][p].value))
      }
      progress.update(b + 1, inputs.count)
    }
    progress.finish()
    try write(statistics)
    print("\(output!): statistics of \(statistics.count) point\(statistics.count == 1 ? "" : "s") over \(statistics.first?.stats.count ?? 0) rows")
  }

  /// The data as model inputs in batches, with which rows count (padding does not).
  func batches(_ config: NetworkConfig) throws -> [(NetworkInput<Float>, [Bool]?)] {
    if case .mlp = config {
      let labeled = try NetworkFiles.labeled(data.data, labels: data.labels, tasks: try data.taskList())
      return miniBatches(count: labeled.count, size: batchSize, shuffleSeed: nil).map { (.features(labeled.rows($0).features), nil) }
    }
    let sequences = try DataFiles.readTokens(data.data)
    return stride(from: 0, to: sequences.count, by: batchSize).map {
      let batch = TokenBatch(Array(sequences[$0..<min(sequences.count, $0 + batchSize)]))
      return (.tokens(batch), batch.mask)
    }
  }

  func rows(_ m: Matrix<Float>, _ keep: [Bool]?) -> Matrix<Float> {
    guard let keep, keep.count == m.rows else { return m }
    let kept = keep.indices.filter { keep[$0] }
    return Matrix(rows: kept.count, columns: m.columns, values: kept.flatMap { m.values[($0 * m.columns)..<(($0 + 1) * m.columns)] })
  }

  func write(_ statistics: [(name: String, stats: FeatureStatistics)]) throws {
    var entries: [(TensorInfo, TensorData)] = []
    for (name, s) in statistics {
      entries.append((TensorInfo(name: name + ".count", dtype: .i64, shape: [1]), TensorData(dtype: .i64, shape: [1], bytes: [Int64(s.count).littleEndian].withUnsafeBytes { Array($0) })))
      entries.append((TensorInfo(name: name + ".sum", dtype: .f64, shape: [s.width]), TensorData(doubles: s.sum, shape: [s.width])))
      entries.append((TensorInfo(name: name + ".products", dtype: .f64, shape: [s.width, s.width]), TensorData(doubles: s.products, shape: [s.width, s.width])))
    }
    let metadata = ["mergekit.kind": "activation-statistics", "mergekit.models": models.joined(separator: ","), "mergekit.data": data.data, "mergekit.points": at]
    let writer = try CheckpointWriter(destination: output!, tensors: entries.map(\.0), options: WriteOptions(format: .safetensors, metadata: metadata, overwrite: overwrite))
    for (info, bytes) in entries { try writer.write(info.name, bytes) }
    try writer.finish()
  }
}
