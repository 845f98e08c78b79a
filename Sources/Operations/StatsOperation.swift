import Checkpoint
import Foundation
import Merge
import Nets

/// `stats`: activation statistics of one model, or of two side by side, saved as a file.
public struct StatsOperation: MergekitOperation {
  public init() {}
  public let name = "stats"
  public let summary =
    "Activation statistics of a model (or two models on the same inputs), saved as a checkpoint file."
  public let discussion = """
    Runs the model over the data in batches and accumulates, in float64, for every activation \
    point whose name matches at: the row count, the sum of rows and the sum of outer \
    products (tensors <point>.count, <point>.sum, <point>.products). With a second model, \
    each point's rows are the two models' features side by side (width 2n), so the \
    off-diagonal block is the cross-covariance ZipIt matches with. Padding tokens are left \
    out. `mergekit stats MODEL --data D --at . --list` lists the point names.
    """
  public let inputs = OperationInputs(
    models: 1...2, modelHelp: "a model, and optionally a second of the same architecture", data: .required,
    dataHelp: OperationInputs.dataHelp)
  public let output = OutputKind.file(extension: "safetensors")
  public let parameters: [ParameterSpec] =
    ParameterSpec.labelledDataSpecs + [
      ParameterSpec(
        "at", .global, .pattern, default: nil,
        help: "regular expression selecting activation points (e.g. 'hidden$' or 'self_attn\\.keys')"),
      .integer("batch_size", in: 1...1 << 24, default: 256, help: "rows (or sequences) per batch"),
      .flag("list", default: false, help: "list the matching point names and widths, write nothing"),
    ]

  /// With `list`, nothing is written and no output is needed.
  public func needsOutput(_ request: OperationRequest) -> Bool { !request.parameters.flag("list") }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    let at = p.text("at")
    let networks = try request.models.map { try NetworkFiles.load($0) }
    if networks.count == 2, networks[0].config.architecture != networks[1].config.architecture {
      throw OperationError.inputs(
        operation: name, reason: "'\(request.models[0])' and '\(request.models[1])' have different architectures")
    }
    let batches = try inputBatches(networks[0].config, request)
    var statistics: [(name: String, stats: FeatureStatistics)] = []
    let meter = context.meter("stats", .items("batches"))
    for (b, (input, keep)) in batches.enumerated() {
      var perModel: [[(name: String, value: Matrix<Float>)]] = []
      for network in networks {
        let tape = Tape<Float>()
        let points = try network.forward(tape, input).points(matching: at)
        perModel.append(
          points.map { point in
            let value = tape.value(point.value)
            guard let keep, keep.count == value.rows else { return (point.name, value) }
            return (point.name, value.rows(keep.indices.filter { keep[$0] }))
          })
      }
      if statistics.isEmpty {
        guard !perModel[0].isEmpty else {
          throw OperationError.invalidParameter(
            operation: name, name: "at", value: at,
            reason: "matches no activation point; list them with at '.' and list")
        }
        if p.flag("list") { return OperationResult(lines: perModel[0].map { "\($0.name)  width \($0.value.columns)" }) }
        statistics = perModel[0].map { ($0.name, FeatureStatistics(width: $0.value.columns * networks.count)) }
      }
      for (i, point) in perModel[0].enumerated() {
        statistics[i].stats.add(
          networks.count == 1 ? point.value : Matrix.concatenated(point.value, perModel[1][i].value))
      }
      meter.update(b + 1, batches.count, note: nil)
    }
    meter.finish()
    let output = try request.requireOutput()
    let metadata = [
      "mergekit.models": request.models.joined(separator: ","), "mergekit.data": try request.requireData(),
      "mergekit.points": at,
    ]
    try StatsFiles.write(statistics, to: output, metadata: metadata, overwrite: context.overwrite)
    return OperationResult(lines: [
      "\(output): statistics of \(statistics.count) point\(statistics.count == 1 ? "" : "s") over \(statistics.first?.stats.count ?? 0) rows"
    ])
  }

  /// The data as model inputs in batches, with which rows count (padding does not).
  private func inputBatches(_ config: NetworkConfig, _ request: OperationRequest) throws -> [(
    NetworkInput<Float>, [Bool]?
  )] {
    let size = request.parameters.int("batch_size")
    if case .mlp = config {
      let labeled = try request.labelledData()
      return miniBatches(count: labeled.count, size: size, shuffleSeed: nil).map {
        (.features(labeled.rows($0).features), nil)
      }
    }
    let sequences = try DataFiles.readTokens(try request.requireData())
    return stride(from: 0, to: sequences.count, by: size).map {
      let batch = TokenBatch(Array(sequences[$0..<min(sequences.count, $0 + size)]))
      return (.tokens(batch), batch.mask)
    }
  }
}
