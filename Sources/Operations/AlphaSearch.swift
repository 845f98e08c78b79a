import Checkpoint
import Foundation
import Merge
import Nets
import Tensor

/// Choosing a merge's `alpha` with data, as the SVD-merging papers do on validation sets: the
/// merge is run in memory at every candidate value, each result is scored with the Nets runtime
/// (`EvalOperation.score`: a classifier's mean task accuracy, a decoder's perplexity), and the
/// best value (the smallest of ties) is returned with the whole curve.
public enum AlphaSearch {
  /// One candidate and its score.
  public struct Point: Sendable {
    public let alpha: Double
    public let score: ModelScore
  }

  /// Parses `start:end:step` (inclusive, `start <= end`, `step > 0`, at most 1000 values).
  /// Throws `OperationError.inputs` naming the text.
  public static func grid(_ text: String) throws -> [Double] {
    let parts = text.split(separator: ":", omittingEmptySubsequences: false).map {
      Double($0.trimmingCharacters(in: .whitespaces))
    }
    guard parts.count == 3, let start = parts[0], let end = parts[1], let step = parts[2], start.isFinite,
      end.isFinite, step.isFinite, step > 0, start <= end
    else {
      throw OperationError.inputs(
        operation: "alpha search", reason: "'\(text)' is not start:end:step with start <= end and step > 0 (0.5:2:0.1)")
    }
    let count = Int(((end - start) / step + 1e-9).rounded(.down)) + 1
    guard count <= 1000 else {
      throw OperationError.inputs(operation: "alpha search", reason: "'\(text)' gives \(count) values; at most 1000")
    }
    // Each value from its index, rounded to 12 decimals, so 0.1 steps print as 0.3, not 0.30000000000000004.
    return (0..<count).map { ((start + Double($0) * step) * 1e12).rounded() / 1e12 }
  }

  /// Runs `method` at every alpha of `grid` and scores each merge on `data`, with the network
  /// config at `config`. The method must take `alpha`. `progress` sees each point as it is done.
  public static func run(
    method: any MergeMethod, base: (any Checkpoint)?, models: [any Checkpoint], global: [String: ParameterValue],
    perModel: [[String: ParameterValue]], grid: [Double], data: String, config: String,
    progress: ((Point) -> Void)? = nil
  ) throws -> (points: [Point], best: Point) {
    guard method.parameters.contains(where: { $0.name == "alpha" }) else {
      throw OperationError.inputs(
        operation: "alpha search", reason: "\(method.name) has no alpha parameter to search (tsv, iso-c and iso-cts do)"
      )
    }
    var points: [Point] = []
    for alpha in grid {
      var parameters = global
      parameters["alpha"] = .number(alpha)
      let plan = try MergePlan(method: method, base: base, models: models, global: parameters, perModel: perModel)
      let writer = MemoryCheckpointWriter(
        name: "\(method.name) at alpha \(alpha)", tensors: MergeRunner.outputTensors(plan))
      try MergeRunner.run(plan, into: writer)
      let network = try NetworkFiles.load(config: config, checkpoint: writer.checkpoint)
      let point = Point(alpha: alpha, score: try EvalOperation.score(network, data: data))
      points.append(point)
      progress?(point)
    }
    guard var best = points.first else {
      throw OperationError.inputs(operation: "alpha search", reason: "no alpha to try")
    }
    for point in points.dropFirst() where point.score.beats(best.score) { best = point }
    return (points, best)
  }
}
