import Nets
import Tensor

/// ZipIt! (Stoica, Bolya et al., ICLR 2024): merges models of one architecture trained on
/// different tasks, from different initialisations, by matching features rather than weights.
/// At every merge point (the post-activation features of each hidden layer) the models'
/// features are matched from their correlation on data (`Matching`), then each layer's output
/// side is merged with `M_i` and its input side unmerged with `U_i` of the previous point:
/// `W* = sum_i M_i W_i U_i`, `b* = sum_i M_i b_i` (LayerNorm parameters like biases). The
/// output layer is averaged over `W_i U_i`, or with partial zipping (`stop` before the last
/// point, or `keepHeads`) every model keeps its own later layers as a head, whose first layer
/// takes `W_i U_i` (the unmerge at the split).
public enum ZipIt {
  public enum Method: String, Sendable, CaseIterable {
    /// Greedy zip across and within models (the paper's method).
    case zipit
    /// One-to-one matching to the first model by the Hungarian method (weight matching).
    case permute
    /// Plain averaging of same-index features.
    case average
  }

  public struct Options: Sendable {
    public var method: Method = .zipit
    /// How strongly an already merged feature competes again (the paper's default 0.3).
    public var alpha = 0.3
    /// Share of each model's merges allowed within itself (default 0.125).
    public var beta = 0.125
    /// Number of merge points (hidden layers) zipped, from the input; nil: all.
    public var stop: Int?
    /// Keep each model's output layer as a head even when every hidden layer is zipped.
    public var keepHeads = false
    public init() {}
  }

  /// The models' common MLP config, checked.
  public static func commonConfig(_ models: [Network<Float>]) throws -> MLPConfig {
    guard models.count >= 2 else { throw MergeError.tooFewModels }
    var first: MLPConfig?
    for (m, model) in models.enumerated() {
      guard case .mlp(let c) = model.config, c.heads == 1, model.lowRank.isEmpty else {
        throw MergeError.notAnMLP(model: m)
      }
      if let first, first != c { throw MergeError.differentArchitectures(model: m, detail: difference(first, c)) }
      first = first ?? c
    }
    guard let first else { throw MergeError.tooFewModels }
    return first
  }

  /// How MLP config `other` differs from `first`, for the message; a different output width is
  /// usually two classifiers trained on different label sets.
  static func difference(_ first: MLPConfig, _ other: MLPConfig) -> String {
    if first.layerSizes.count == other.layerSizes.count, first.layerSizes.dropLast() == other.layerSizes.dropLast(),
      let a = first.layerSizes.last, let b = other.layerSizes.last, a != b
    {
      return "its output layer has \(b) classes where the first has \(a): zipped models share one output layer, "
        + "so train each with every class (train --tasks selects rows, not classes: both outputs keep the data's "
        + "class count when trained on the same data file)"
    }
    if first.layerSizes != other.layerSizes {
      return "layer sizes \(other.layerSizes) against \(first.layerSizes)"
    }
    return "activation or normalisation"
  }

  /// Joint statistics of the models' features at every merge point over `inputs`, batch by batch.
  public static func statistics(_ models: [Network<Float>], inputs: Matrix<Float>, batchSize: Int = 512) throws
    -> [FeatureStatistics]
  {
    let c = try commonConfig(models)
    let points = c.layerCount - 1
    var stats = (0..<points).map { FeatureStatistics(width: c.layerSizes[$0 + 1] * models.count) }
    for rows in miniBatches(count: inputs.rows, size: batchSize, shuffleSeed: nil) {
      let batch = inputs.rows(rows)
      var features = [[Matrix<Float>]](repeating: [], count: points)
      for model in models {
        let tape = Tape<Float>()
        let out = try model.forward(tape, .features(batch))
        for p in 0..<points { features[p].append(tape.value(try out.point("layers.\(p).hidden"))) }
      }
      for p in 0..<points {
        stats[p].add(features[p].dropFirst().reduce(features[p][0]) { Matrix.concatenated($0, $1) })
      }
    }
    return stats
  }

  /// The matching at each of the first `stop` merge points.
  public static func matchings(_ statistics: [FeatureStatistics], models: Int, options: Options) throws
    -> [FeatureMatching]
  {
    let stop = options.stop ?? statistics.count
    guard (1...max(statistics.count, 1)).contains(stop), !statistics.isEmpty else {
      throw MergeError.stopLayerOutOfRange(stop: stop, points: statistics.count)
    }
    return statistics.prefix(stop).map { s in
      let n = s.width / models
      switch options.method {
      case .zipit:
        return Matching.zip(
          correlation: zipCorrelation(covariance: s.covariance, width: s.width), features: n, models: models,
          alpha: options.alpha, beta: options.beta)
      case .permute:
        return Matching.permute(
          correlation: zipCorrelation(covariance: s.covariance, width: s.width), features: n, models: models)
      case .average: return Matching.identity(features: n, models: models)
      }
    }
  }

  /// The zipped model: shared layers up to the last matched point, then the averaged output
  /// layer or one head per model.
  public static func apply(_ models: [Network<Float>], matchings: [FeatureMatching], keepHeads: Bool = false) throws
    -> Network<Float>
  {
    let c = try commonConfig(models)
    let stop = matchings.count
    guard (1...(c.layerCount - 1)).contains(stop) else {
      throw MergeError.stopLayerOutOfRange(stop: stop, points: c.layerCount - 1)
    }
    let count = models.count
    let full = stop == c.layerCount - 1 && !keepHeads
    let merged = MLPConfig(
      layerSizes: c.layerSizes, activation: c.activation, layerNorm: c.layerNorm, heads: full ? 1 : count,
      sharedLayers: full ? c.layerCount : stop)
    var weights: [String: Matrix<Float>] = [:]
    for model in models { try model.checkWeights() }
    func weight(_ m: Int, _ name: String) -> Matrix<Double> {
      let w = models[m].checkedWeight(name)
      return Matrix(rows: w.rows, columns: w.columns, values: w.values.map(Double.init))
    }
    func square(_ values: [Double], _ n: Int) -> Matrix<Double> { Matrix(rows: n, columns: n, values: values) }
    func sum(_ terms: [Matrix<Double>]) -> Matrix<Float> {
      var total = terms[0]
      for t in terms.dropFirst() { total.add(t) }
      return Matrix(rows: total.rows, columns: total.columns, values: total.values.map { Float($0) })
    }
    // Input side: W U_i of the previous point (layer 0 reads the raw input).
    func unmerged(_ w: Matrix<Double>, _ m: Int, layer i: Int) -> Matrix<Double> {
      guard i >= 1, i - 1 < stop else { return w }
      return w.matmul(square(matchings[i - 1].unmerge(model: m), matchings[i - 1].features))
    }
    for i in 0..<stop {
      let p = "layers.\(i)"
      let mergers = (0..<count).map { square(matchings[i].merge(model: $0), matchings[i].features) }
      weights[p + ".weight"] = sum(
        (0..<count).map { mergers[$0].matmul(unmerged(weight($0, p + ".weight"), $0, layer: i)) })
      var rows = [".bias"]
      if c.layerNorm { rows += [".norm.weight", ".norm.bias"] }
      for suffix in rows {
        let merged = sum((0..<count).map { m in mergers[m].matmul(weight(m, p + suffix), transposeB: true) })  // n x 1
        weights[p + suffix] = Matrix(rows: 1, columns: merged.rows, values: merged.values)
      }
    }
    for i in stop..<c.layerCount {
      for m in 0..<(full ? 1 : count) {
        let target = merged.prefix(layer: i, head: m)
        let names = [".weight", ".bias"] + (c.layerNorm && i < c.layerCount - 1 ? [".norm.weight", ".norm.bias"] : [])
        for suffix in names {
          if full {  // the output layer, averaged over the models' unmerged weights
            let terms = (0..<count).map { k in
              suffix == ".weight"
                ? unmerged(weight(k, "layers.\(i)" + suffix), k, layer: i) : weight(k, "layers.\(i)" + suffix)
            }
            let average = sum(terms)
            weights[target + suffix] = Matrix(
              rows: average.rows, columns: average.columns, values: average.values.map { $0 / Float(count) })
          } else {
            let w =
              suffix == ".weight"
              ? unmerged(weight(m, "layers.\(i)" + suffix), m, layer: i) : weight(m, "layers.\(i)" + suffix)
            weights[target + suffix] = Matrix(rows: w.rows, columns: w.columns, values: w.values.map { Float($0) })
          }
        }
      }
    }
    return try Network(
      config: .mlp(merged),
      tensors: Network<Float>.expectedShapes(.mlp(merged)).reduce(into: [:]) { out, entry in
        out[entry.name] = weights[entry.name]?.tensor(shape: entry.shape)
      })
  }

  /// Statistics, matchings and the zipped model in one call.
  public static func zip(_ models: [Network<Float>], inputs: Matrix<Float>, options: Options = Options()) throws
    -> Network<Float>
  {
    let stats = try statistics(models, inputs: inputs)
    return try apply(
      models, matchings: try matchings(stats, models: models.count, options: options), keepHeads: options.keepHeads)
  }
}
