import Nets
import Tensor

/// ZipIt! for BERT encoders. Merge points:
/// - the residual stream (width `hidden`), one for the whole model: its statistics pool the
///   embeddings' output and every block's two post-LayerNorm states (after attention, after
///   the MLP). Embedding tables are merged on their feature side (`E* = sum E_i M_i^T`); every
///   LayerNorm gain and bias is merged like a bias (exact for permutations, approximate
///   otherwise, as the paper treats normalisation);
/// - each layer's MLP hidden units (`act(intermediate)`): intermediate merges them, output.dense
///   unmerges them;
/// - each attention head's query/key features: without rotary, a head's score `q . k` is
///   unchanged when its query and key features are permuted together, so they are matched on
///   the keys (query and key rows take the same merge);
/// - each attention head's value features: value merges them, attention.output.dense unmerges.
/// Heads are aligned across the models first (`alignBERTHeads`): features never move between
/// heads (each head has its own attention weights).
extension ZipIt {
  /// The common BERT config of the models (dense), checked.
  static func commonBERTConfig(_ models: [Network<Float>]) throws -> BERTConfig {
    try commonTransformerConfig(models, kind: "a BERT encoder") { model in
      guard case .bert(let c) = model.config else { return nil }
      return c
    }
  }

  /// Merge point indices of a BERT encoder: the residual stream, every layer's MLP hidden
  /// units, then per layer and head the query/key features, then the value features.
  static func bertPoint(mlp layer: Int) -> Int { 1 + layer }
  static func bertPoint(keys layer: Int, head: Int, _ c: BERTConfig) -> Int {
    1 + c.layerCount + layer * c.headCount + head
  }
  static func bertPoint(values layer: Int, head: Int, _ c: BERTConfig) -> Int {
    1 + c.layerCount * (1 + c.headCount) + layer * c.headCount + head
  }

  /// Joint statistics of the models' features at every BERT merge point over the non-padding
  /// tokens of `sequences`.
  public static func bertStatistics(_ models: [Network<Float>], sequences: [[Int]], batchSize: Int = 8) throws
    -> [FeatureStatistics]
  {
    let c = try commonBERTConfig(models)
    let d = c.hiddenSize / c.headCount
    let layer = { (i: Int) in models[0].tensorPrefix + "encoder.layer.\(i)." }
    var sources = [
      PointSource(
        points: ["embeddings.output"]
          + (0..<c.layerCount).flatMap { [layer($0) + "intermediate.dense.input", layer($0) + "output"] }, columns: nil)
    ]
    sources += (0..<c.layerCount).map { PointSource(points: [layer($0) + "intermediate.hidden"], columns: nil) }
    for kind in ["keys", "values"] {
      sources += (0..<c.layerCount).flatMap { i in
        (0..<c.headCount).map { h in
          PointSource(points: [layer(i) + "attention.self.\(kind)"], columns: (h * d)..<((h + 1) * d))
        }
      }
    }
    let widths =
      [c.hiddenSize] + Array(repeating: c.intermediateSize, count: c.layerCount)
      + Array(repeating: d, count: 2 * c.layerCount * c.headCount)
    return try tokenStatistics(models, sequences: sequences, sources: sources, widths: widths, batchSize: batchSize)
  }

  /// Aligns every model's attention heads with the first model's, layer by layer. Key features
  /// may sit in any order within a head (nothing fixes them, unlike rotary), so head `b` of
  /// model m is scored against head `a` of model 0 by the best one-to-one matching of their
  /// key features (Hungarian on the correlation), and the heads are then matched by the
  /// Hungarian method on those scores. Returns the models with their heads reordered.
  public static func alignBERTHeads(_ models: [Network<Float>], sequences: [[Int]], batchSize: Int = 8) throws
    -> [Network<Float>]
  {
    let c = try commonBERTConfig(models)
    let (heads, d, n) = (c.headCount, c.hiddenSize / c.headCount, models.count)
    guard heads > 1 else { return models }
    let prefix = models[0].tensorPrefix
    let sources = (0..<c.layerCount).map {
      PointSource(points: [prefix + "encoder.layer.\($0).attention.self.keys"], columns: nil)
    }
    let stats = try tokenStatistics(
      models, sequences: sequences, sources: sources, widths: Array(repeating: c.hiddenSize, count: c.layerCount),
      batchSize: batchSize)
    var aligned = [models[0]]
    for m in 1..<n {
      var order: [[Int]] = []
      for layer in 0..<c.layerCount {
        let width = stats[layer].width
        let correlation = zipCorrelation(covariance: stats[layer].covariance, width: width)
        var score = [Double](repeating: 0, count: heads * heads)
        for a in 0..<heads {
          for b in 0..<heads {
            let pair = (0..<(d * d)).map { correlation[(a * d + $0 / d) * width + m * c.hiddenSize + b * d + $0 % d] }
            let best = LinearAssignment.maximumScore(pair, n: d)
            score[a * heads + b] = best.enumerated().reduce(0) { $0 + pair[$1.0 * d + $1.1] }
          }
        }
        order.append(LinearAssignment.maximumScore(score, n: heads))
      }
      aligned.append(try reorderedBERTHeads(models[m], order: order))
    }
    return aligned
  }

  /// The encoder with its heads reordered per layer: position `a` takes head `order[layer][a]`.
  static func reorderedBERTHeads(_ network: Network<Float>, order: [[Int]]) throws -> Network<Float> {
    guard case .bert(let c) = network.config else { return network }
    let d = c.hiddenSize / c.headCount
    var w = network.weights
    for (layer, heads) in order.enumerated() {
      let p = network.tensorPrefix + "encoder.layer.\(layer).attention."
      let features = heads.flatMap { h in (0..<d).map { h * d + $0 } }
      for name in ["query", "key", "value"] {
        for suffix in [".weight", ".bias"] {
          guard let matrix = w[p + "self." + name + suffix] else { continue }
          w[p + "self." + name + suffix] =
            matrix.rows == 1
            ? Matrix(rows: 1, columns: matrix.columns, values: features.map { matrix.values[$0] })
            : Matrix(
              rows: matrix.rows, columns: matrix.columns,
              values: features.flatMap { r in (0..<matrix.columns).map { matrix[r, $0] } })
        }
      }
      if let o = w[p + "output.dense.weight"] {
        w[p + "output.dense.weight"] = Matrix(
          rows: o.rows, columns: o.columns, values: (0..<o.rows).flatMap { r in features.map { o[r, $0] } })
      }
    }
    var copy = network
    copy.weights = w
    return copy
  }

  /// The zipped encoder from one matching per merge point (`bertStatistics`' order).
  public static func applyBERT(_ models: [Network<Float>], matchings: [FeatureMatching]) throws -> Network<Float> {
    let c = try commonBERTConfig(models)
    let heads = c.headCount
    guard matchings.count == 1 + c.layerCount * (1 + 2 * heads) else {
      throw MergeError.stopLayerOutOfRange(stop: matchings.count, points: 1 + c.layerCount * (1 + 2 * heads))
    }
    let z = try Zipper(models, matchings)
    let prefix = models[0].tensorPrefix
    let residualMerge = { (m: Int) in z.merge(0, m) }
    let residualUnmerge = { (m: Int) in z.unmerge(0, m) }
    var out: [String: Matrix<Float>] = [:]
    for table in ["word_embeddings", "position_embeddings", "token_type_embeddings"] {
      let name = prefix + "embeddings.\(table).weight"
      out[name] = z.zipped(name, left: nil, right: { residualMerge($0).transposed }, sumRows: true)
    }
    for suffix in ["weight", "bias"] {
      out[prefix + "embeddings.LayerNorm." + suffix] = z.zippedVector(
        prefix + "embeddings.LayerNorm." + suffix, left: residualMerge)
    }
    for layer in 0..<c.layerCount {
      let l = prefix + "encoder.layer.\(layer)."
      let keyMerge = { (m: Int) in Zipper.blocks((0..<heads).map { z.merge(bertPoint(keys: layer, head: $0, c), m) }) }
      let valueMerge = { (m: Int) in
        Zipper.blocks((0..<heads).map { z.merge(bertPoint(values: layer, head: $0, c), m) })
      }
      let valueUnmerge = { (m: Int) in
        Zipper.blocks((0..<heads).map { z.unmerge(bertPoint(values: layer, head: $0, c), m) })
      }
      let mlpMerge = { (m: Int) in z.merge(bertPoint(mlp: layer), m) }
      let mlpUnmerge = { (m: Int) in z.unmerge(bertPoint(mlp: layer), m) }
      let layers: [(String, (Int) -> Matrix<Double>, (Int) -> Matrix<Double>)] = [
        ("attention.self.query", keyMerge, residualUnmerge), ("attention.self.key", keyMerge, residualUnmerge),
        ("attention.self.value", valueMerge, residualUnmerge), ("attention.output.dense", residualMerge, valueUnmerge),
        ("intermediate.dense", mlpMerge, residualUnmerge), ("output.dense", residualMerge, mlpUnmerge),
      ]
      for (name, left, right) in layers {
        out[l + name + ".weight"] = z.zipped(l + name + ".weight", left: left, right: right)
        out[l + name + ".bias"] = z.zippedVector(l + name + ".bias", left: left)
      }
      for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
        for suffix in [".weight", ".bias"] {
          out[l + norm + suffix] = z.zippedVector(l + norm + suffix, left: residualMerge)
        }
      }
    }
    var zipped = models[0]
    for (name, matrix) in out { zipped.weights[name] = matrix }
    try zipped.checkWeights()
    return zipped
  }

  /// Heads aligned (except for `average`), statistics, matchings and the zipped encoder.
  public static func zipBERT(_ models: [Network<Float>], sequences: [[Int]], options: Options = Options()) throws
    -> Network<Float>
  {
    let models = options.method == .average ? models : try alignBERTHeads(models, sequences: sequences)
    let stats = try bertStatistics(models, sequences: sequences)
    var all = options
    all.stop = nil
    return try applyBERT(models, matchings: try matchings(stats, models: models.count, options: all))
  }
}
