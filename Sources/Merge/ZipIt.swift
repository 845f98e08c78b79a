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

  /// How the models' output classes relate to one another.
  public enum LabelSpace: Sendable, Equatable {
    /// Output class c of every model is the same class: the output layers are averaged
    /// (`(1/N) sum_i W_i U_i`), the official code's choice.
    case shared
    /// Each model has its own classes (task-local labels): the output layers are stacked, model
    /// i's class c becomes class `i C + c` (the union of the label sets).
    case stacked
    /// One label space in which model i was trained on the classes `classes[i]`: class c's row
    /// averages `W_i U_i` over the models trained on c (over all models when none was).
    case trainedClasses([[Int]])
  }

  public struct Options: Sendable {
    public var method: Method = .zipit
    /// How the output classes are merged (with `keepHeads` or partial zipping: whether the
    /// heads' outputs are stacked or share one label space).
    public var labels: LabelSpace = .stacked
    /// How strongly an already merged feature competes again (the paper's default 0.3).
    public var alpha = 0.3
    /// Share of each model's merges allowed within itself (default 0.125).
    public var beta = 0.125
    /// Number of hidden layers (MLPs) or layers (decoders) zipped, from the input; nil: all.
    public var stop: Int?
    /// Keep each model's output layer (a decoder's final norm and head) as a head even when
    /// every layer is zipped.
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
      if let first, first.architecture != c.architecture {
        throw MergeError.differentArchitectures(model: m, detail: difference(first, c))
      }
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
      return "its output layer has \(b) classes where the first has \(a): zipped models need output layers of one "
        + "width (train --tasks keeps the data's class count, so models trained on one data file have it)"
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

  /// The matching at each of the first `stop` merge points, from the statistics alone (dead
  /// units, constant on the data, correlate 0 with everything and are paired arbitrarily).
  public static func matchings(_ statistics: [FeatureStatistics], models: Int, options: Options) throws
    -> [FeatureMatching]
  {
    try checkedStop(statistics, options).map { match($0, models: models, options: options, constantRows: nil) }
  }

  /// The MLP matchings, merge point after merge point: features that are constant on the data
  /// (dead units) are matched by their incoming weights instead, the cosine similarity of each
  /// unit's weight row (read through the previous point's unmerge, with its bias and LayerNorm
  /// parameters), so a dead unit pairs with its copy in a permuted model.
  public static func matchings(_ statistics: [FeatureStatistics], networks: [Network<Float>], options: Options) throws
    -> [FeatureMatching]
  {
    let c = try commonConfig(networks)
    var result: [FeatureMatching] = []
    for (point, s) in try checkedStop(statistics, options).enumerated() {
      guard s.width == c.layerSizes[point + 1] * networks.count else {
        throw MergeError.stopLayerOutOfRange(stop: point + 1, points: statistics.count)
      }
      let rows = networks.indices.flatMap { m in incomingRows(networks[m], m, point: point, previous: result.last) }
      result.append(match(s, models: networks.count, options: options, constantRows: rows))
    }
    return result
  }

  static func checkedStop(_ statistics: [FeatureStatistics], _ options: Options) throws -> ArraySlice<FeatureStatistics>
  {
    let stop = options.stop ?? statistics.count
    guard (1...max(statistics.count, 1)).contains(stop), !statistics.isEmpty else {
      throw MergeError.stopLayerOutOfRange(stop: stop, points: statistics.count)
    }
    return statistics.prefix(stop)
  }

  /// Each hidden unit's incoming weights at MLP merge point `point` of model `m`, in the
  /// merged space of the previous point: row j of `W U_m`, then the bias (and LayerNorm gain
  /// and bias).
  static func incomingRows(_ network: Network<Float>, _ m: Int, point: Int, previous: FeatureMatching?) -> [[Double]] {
    let p = "layers.\(point)"
    let stored = network.checkedWeight(p + ".weight")
    var w = Matrix(rows: stored.rows, columns: stored.columns, values: stored.values.map(Double.init))
    if let previous {
      let u = Matrix(rows: previous.features, columns: previous.features, values: previous.unmerge(model: m))
      w = w.matmul(u)
    }
    var extras = [network.checkedWeight(p + ".bias")]
    if let gain = network.weights[p + ".norm.weight"], let bias = network.weights[p + ".norm.bias"] {
      extras += [gain, bias]
    }
    return (0..<w.rows).map { j in
      (0..<w.columns).map { w[j, $0] } + extras.map { Double($0.values[j]) }
    }
  }

  /// One point's matching; with `constantRows`, pairs of features that are constant on the data
  /// take the cosine similarity of their rows as their correlation.
  static func match(_ s: FeatureStatistics, models: Int, options: Options, constantRows: [[Double]]?)
    -> FeatureMatching
  {
    let n = s.width / models
    var correlation: [Double] { zipCorrelation(covariance: s.covariance, width: s.width) }
    switch options.method {
    case .zipit:
      return Matching.zip(
        correlation: withConstantFeatures(correlation, s, constantRows), features: n, models: models,
        alpha: options.alpha, beta: options.beta)
    case .permute:
      return Matching.permute(
        correlation: withConstantFeatures(correlation, s, constantRows), features: n, models: models)
    case .average: return Matching.identity(features: n, models: models)
    }
  }

  /// `correlation` with the entries between two constant features (variance at most 1e-12 of
  /// the largest) replaced by the cosine similarity of their rows.
  static func withConstantFeatures(_ correlation: [Double], _ s: FeatureStatistics, _ rows: [[Double]]?) -> [Double] {
    guard let rows, rows.count == s.width else { return correlation }
    // The covariance's diagonal, as `FeatureStatistics.covariance` computes it.
    let (mean, n) = (s.mean, Double(max(s.count, 1)))
    let variance = (0..<s.width).map { s.products[$0 * s.width + $0] / n - mean[$0] * mean[$0] }
    let threshold = 1e-12 * (variance.max() ?? 0)
    let constant = (0..<s.width).filter { variance[$0] <= threshold }
    guard constant.count > 1 else { return correlation }
    let norms = rows.map { row in row.reduce(0) { $0 + $1 * $1 }.squareRoot() }
    var out = correlation
    for i in constant {
      for j in constant where j != i {
        let dot = rows[i].indices.reduce(0.0) { $0 + rows[i][$1] * rows[j][$1] }
        let denominator = norms[i] * norms[j]
        out[i * s.width + j] = denominator > 0 ? dot / denominator : 0
      }
    }
    return out
  }

  /// The zipped model: shared layers up to the last matched point, then the merged output
  /// layer (`labels` says how the models' classes combine) or one head per model (stacked
  /// outputs with `.stacked`, else one label space scored by the best head).
  public static func apply(
    _ models: [Network<Float>], matchings: [FeatureMatching], keepHeads: Bool = false, labels: LabelSpace
  ) throws -> Network<Float> {
    let c = try commonConfig(models)
    let stop = matchings.count
    guard (1...(c.layerCount - 1)).contains(stop) else {
      throw MergeError.stopLayerOutOfRange(stop: stop, points: c.layerCount - 1)
    }
    let count = models.count
    let classes = c.layerSizes[c.layerCount]
    if case .trainedClasses(let trained) = labels, trained.count != count {
      throw MergeError.invalidParameter(
        method: "zipit", name: "label_space", tensor: nil,
        reason: "gives trained classes for \(trained.count) models, not \(count)")
    }
    let full = stop == c.layerCount - 1 && !keepHeads
    var sizes = c.layerSizes
    if full, labels == .stacked { sizes[c.layerCount] = classes * count }
    let merged = MLPConfig(
      layerSizes: sizes, activation: c.activation, layerNorm: c.layerNorm, heads: full ? 1 : count,
      sharedLayers: full ? c.layerCount : stop, stackedHeads: labels == .stacked,
      trainedClasses: mergedTrainedClasses(models, labels: labels))
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
      let names = [".weight", ".bias"] + (c.layerNorm && i < c.layerCount - 1 ? [".norm.weight", ".norm.bias"] : [])
      func modelTensor(_ m: Int, _ suffix: String) -> Matrix<Double> {
        let w = weight(m, "layers.\(i)" + suffix)
        return suffix == ".weight" ? unmerged(w, m, layer: i) : w
      }
      guard full else {  // every model keeps the rest of its layers as its head
        for m in 0..<count {
          for suffix in names {
            let w = modelTensor(m, suffix)
            weights[merged.prefix(layer: i, head: m) + suffix] = Matrix(
              rows: w.rows, columns: w.columns, values: w.values.map { Float($0) })
          }
        }
        continue
      }
      // The output layer: each merged class row averages the rows of the models it comes from.
      let sources = outputRowSources(labels, models: count, classes: classes)
      for suffix in names {
        let tensors = (0..<count).map { modelTensor($0, suffix) }
        let width = suffix == ".weight" ? tensors[0].columns : 1
        var values: [Float] = []
        for rowSources in sources {
          for j in 0..<width {
            let total = rowSources.reduce(0.0) { $0 + tensors[$1.model].values[$1.row * width + j] }
            values.append(Float(total / Double(rowSources.count)))
          }
        }
        weights[merged.prefix(layer: i, head: 0) + suffix] =
          suffix == ".weight"
          ? Matrix(rows: sources.count, columns: width, values: values)
          : Matrix(rows: 1, columns: sources.count, values: values)
      }
    }
    return try Network(
      config: .mlp(merged),
      tensors: Network<Float>.expectedShapes(.mlp(merged)).reduce(into: [:]) { out, entry in
        out[entry.name] = weights[entry.name]?.tensor(shape: entry.shape)
      })
  }

  /// The (model, output row) pairs averaged into each class of a merged output layer.
  static func outputRowSources(_ labels: LabelSpace, models count: Int, classes: Int) -> [[(model: Int, row: Int)]] {
    switch labels {
    case .shared:
      return (0..<classes).map { c in (0..<count).map { ($0, c) } }
    case .stacked:
      return (0..<count).flatMap { m in (0..<classes).map { [(m, $0)] } }
    case .trainedClasses(let trained):
      return (0..<classes).map { c in
        let taught = (0..<count).filter { trained[$0].contains(c) }
        return (taught.isEmpty ? Array(0..<count) : taught).map { ($0, c) }
      }
    }
  }

  /// What the zipped model records as trained on: the union of the models' trained classes in
  /// one label space; nothing for stacked outputs or when a model does not record them.
  static func mergedTrainedClasses(_ models: [Network<Float>], labels: LabelSpace) -> [Int]? {
    switch labels {
    case .stacked: return nil
    case .trainedClasses(let trained): return Array(Set(trained.joined())).sorted()
    case .shared:
      let recorded = models.compactMap { model -> [Int]? in
        guard case .mlp(let c) = model.config else { return nil }
        return c.trainedClasses
      }
      return recorded.count == models.count ? Array(Set(recorded.joined())).sorted() : nil
    }
  }

  /// The label space the models' configs imply: models that record their trained classes
  /// (`train` writes them) share one label space, merged class by class; without that record
  /// the outputs are taken as each model's own classes and stacked.
  public static func inferredLabelSpace(_ models: [Network<Float>]) -> LabelSpace {
    let recorded = models.compactMap { model -> [Int]? in
      guard case .mlp(let c) = model.config else { return nil }
      return c.trainedClasses
    }
    return recorded.count == models.count ? .trainedClasses(recorded) : .stacked
  }

  /// Statistics, matchings and the zipped model in one call.
  public static func zip(_ models: [Network<Float>], inputs: Matrix<Float>, options: Options = Options()) throws
    -> Network<Float>
  {
    let stats = try statistics(models, inputs: inputs)
    return try apply(
      models, matchings: try matchings(stats, networks: models, options: options), keepHeads: options.keepHeads,
      labels: options.labels)
  }
}
