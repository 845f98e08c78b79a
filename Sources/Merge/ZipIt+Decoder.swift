import Nets
import Tensor

/// ZipIt! for Llama-style decoders. Merge points:
/// - the residual stream (width `hidden`), one for the whole model, since every block adds into
///   it (the paper's rule for residual connections): its statistics pool the embeddings' output
///   and every block's output;
/// - each layer's MLP hidden features (`act(gate) * up`, width `intermediate`): gate and up
///   share the merge, down_proj unmerges it;
/// - each layer's value features per KV head (width `head_dim`), matched within the head
///   (attention weights differ between heads); o_proj unmerges them for every query head of
///   the group.
/// Queries and keys are not zipped feature by feature (rotary fixes each feature's frequency):
/// whole heads are aligned first (`alignHeads`), then q_proj and k_proj average their output
/// rows over the models after unmerging the residual input, as does the head. RMSNorm gains are merged like biases (exact for permutations, approximate otherwise).
extension ZipIt {
  /// The common decoder config of the models (dense, no K/V projections), checked.
  static func commonDecoderConfig(_ models: [Network<Float>]) throws -> DecoderConfig {
    try commonTransformerConfig(models, kind: "a decoder") { model in
      guard case .decoder(let c) = model.config else { return nil }
      return c
    }
  }

  /// Merge point indices of a decoder's statistics and matchings: the residual stream, then
  /// every layer's MLP hidden features, then every layer's value features per KV head.
  static func decoderPoint(mlp layer: Int) -> Int { 1 + layer }
  static func decoderPoint(values layer: Int, head: Int, _ c: DecoderConfig) -> Int {
    1 + c.layerCount + layer * c.keyValueHeadCount + head
  }

  /// Joint statistics of the models' features at every merge point over the non-padding tokens
  /// of `sequences`.
  public static func decoderStatistics(_ models: [Network<Float>], sequences: [[Int]], batchSize: Int = 8) throws
    -> [FeatureStatistics]
  {
    let c = try commonDecoderConfig(models)
    let d = c.headDimension
    var sources = [
      PointSource(
        points: ["model.embed_tokens.output"] + (0..<c.layerCount).map { "model.layers.\($0).output" }, columns: nil)
    ]
    sources += (0..<c.layerCount).map { PointSource(points: ["model.layers.\($0).mlp.hidden"], columns: nil) }
    sources += (0..<c.layerCount).flatMap { layer in
      (0..<c.keyValueHeadCount).map { head in
        PointSource(points: ["model.layers.\(layer).self_attn.values"], columns: (head * d)..<((head + 1) * d))
      }
    }
    let widths =
      [c.hiddenSize] + Array(repeating: c.intermediateSize, count: c.layerCount)
      + Array(repeating: d, count: c.layerCount * c.keyValueHeadCount)
    return try tokenStatistics(models, sequences: sequences, sources: sources, widths: widths, batchSize: batchSize)
  }

  /// The zipped decoder from one matching per merge point (`decoderStatistics`' order).
  public static func applyDecoder(_ models: [Network<Float>], matchings: [FeatureMatching]) throws -> Network<Float> {
    let c = try commonDecoderConfig(models)
    let count = models.count
    let (kv, heads) = (c.keyValueHeadCount, c.headCount)
    guard matchings.count == 1 + c.layerCount * (1 + kv) else {
      throw MergeError.stopLayerOutOfRange(stop: matchings.count, points: 1 + c.layerCount * (1 + kv))
    }
    let z = try Zipper(models, matchings)
    let (merge, unmerge, blocks) = (z.merge, z.unmerge, Zipper.blocks)
    let residualMerge = { (m: Int) in merge(0, m) }
    let residualUnmerge = { (m: Int) in unmerge(0, m) }
    var out: [String: Matrix<Float>] = [:]
    // The embedding table maps tokens to residual features: its rows are tokens, so it is
    // merged on the right with M^T (`E* = sum E_i M_i^T`).
    out["model.embed_tokens.weight"] = z.zipped(
      "model.embed_tokens.weight", left: nil, right: { residualMerge($0).transposed }, sumRows: true)
    for layer in 0..<c.layerCount {
      let p = "model.layers.\(layer)."
      let valueMerge = { (m: Int) in blocks((0..<kv).map { merge(decoderPoint(values: layer, head: $0, c), m) }) }
      let valueUnmerge = { (m: Int) in
        blocks((0..<heads).map { unmerge(decoderPoint(values: layer, head: $0 / (heads / kv), c), m) })
      }
      out[p + "input_layernorm.weight"] = z.zippedVector(p + "input_layernorm.weight", left: residualMerge)
      out[p + "post_attention_layernorm.weight"] = z.zippedVector(
        p + "post_attention_layernorm.weight", left: residualMerge)
      out[p + "self_attn.q_proj.weight"] = z.zipped(p + "self_attn.q_proj.weight", left: nil, right: residualUnmerge)
      out[p + "self_attn.k_proj.weight"] = z.zipped(p + "self_attn.k_proj.weight", left: nil, right: residualUnmerge)
      out[p + "self_attn.v_proj.weight"] = z.zipped(
        p + "self_attn.v_proj.weight", left: valueMerge, right: residualUnmerge)
      if c.attentionBias {
        for name in ["q_proj", "k_proj"] {
          let b = z.zipped(p + "self_attn.\(name).bias", left: nil, right: nil)
          out[p + "self_attn.\(name).bias"] = b
        }
        out[p + "self_attn.v_proj.bias"] = z.zippedVector(p + "self_attn.v_proj.bias", left: valueMerge)
      }
      out[p + "self_attn.o_proj.weight"] = z.zipped(
        p + "self_attn.o_proj.weight", left: residualMerge, right: valueUnmerge)
      let mlpMerge = { (m: Int) in merge(decoderPoint(mlp: layer), m) }
      out[p + "mlp.gate_proj.weight"] = z.zipped(p + "mlp.gate_proj.weight", left: mlpMerge, right: residualUnmerge)
      out[p + "mlp.up_proj.weight"] = z.zipped(p + "mlp.up_proj.weight", left: mlpMerge, right: residualUnmerge)
      out[p + "mlp.down_proj.weight"] = z.zipped(
        p + "mlp.down_proj.weight", left: residualMerge, right: { unmerge(decoderPoint(mlp: layer), $0) })
    }
    out["model.norm.weight"] = z.zippedVector("model.norm.weight", left: residualMerge)
    if !c.tiedEmbeddings { out["lm_head.weight"] = z.zipped("lm_head.weight", left: nil, right: residualUnmerge) }
    return try Network(
      config: .decoder(c),
      tensors: Network<Float>.expectedShapes(.decoder(c)).reduce(into: [:]) { tensors, entry in
        tensors[entry.name] = out[entry.name]?.tensor(shape: entry.shape)
      })
  }

  /// Aligns every model's attention heads with the first model's, layer by layer: rotary fixes
  /// the frequency of each query/key feature, so features cannot move within a head, but whole
  /// heads can. KV head `b` of model m is matched to head `a` of model 0 by the Hungarian method
  /// on `sum_i corr(k_{0,a,i}, k_{m,b,i})` (same-index key features, after rotary, over the
  /// tokens); its query heads follow it. Returns the models with their heads reordered (each
  /// computes what it computed before).
  public static func alignHeads(_ models: [Network<Float>], sequences: [[Int]], batchSize: Int = 8) throws -> [Network<
    Float
  >] {
    let c = try commonDecoderConfig(models)
    let (kv, d, n) = (c.keyValueHeadCount, c.headDimension, models.count)
    guard kv > 1 else { return models }
    var stats = (0..<c.layerCount).map { _ in FeatureStatistics(width: kv * d * n) }
    for start in stride(from: 0, to: sequences.count, by: batchSize) {
      let batch = TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)]))
      let rows = batch.mask.indices.filter { batch.mask[$0] }
      let keys = try models.map { model -> [String: Matrix<Float>] in
        let tape = Tape<Float>()
        return Dictionary(
          try model.forward(tape, .tokens(batch)).points.filter { $0.name.hasSuffix("self_attn.keys") }.map {
            ($0.name, tape.value($0.value))
          }
        ) { a, _ in a }
      }
      for layer in 0..<c.layerCount {
        let parts = try keys.map { try $0.required("model.layers.\(layer).self_attn.keys").rows(rows) }
        stats[layer].add(parts.dropFirst().reduce(parts[0]) { Matrix.concatenated($0, $1) })
      }
    }
    var aligned = [models[0]]
    for m in 1..<n {
      var order: [[Int]] = []  // per layer: model m's head placed at each position
      for layer in 0..<c.layerCount {
        let correlation = zipCorrelation(covariance: stats[layer].covariance, width: stats[layer].width)
        let width = stats[layer].width
        var score = [Double](repeating: 0, count: kv * kv)
        for a in 0..<kv {
          for b in 0..<kv {
            for i in 0..<d { score[a * kv + b] += correlation[(a * d + i) * width + m * kv * d + b * d + i] }
          }
        }
        order.append(LinearAssignment.maximumScore(score, n: kv))
      }
      aligned.append(try reorderedHeads(models[m], order: order))
    }
    return aligned
  }

  /// The network with its KV heads (and their query heads) reordered per layer: position `a`
  /// takes head `order[layer][a]`.
  static func reorderedHeads(_ network: Network<Float>, order: [[Int]]) throws -> Network<Float> {
    guard case .decoder(let c) = network.config else { return network }
    let (d, group) = (c.headDimension, c.headCount / c.keyValueHeadCount)
    var w = network.weights
    func rows(_ name: String, _ p: [Int]) {
      guard let m = w[name] else { return }
      if m.rows == 1 {
        w[name] = Matrix(rows: 1, columns: m.columns, values: p.map { m.values[$0] })
      } else {
        w[name] = Matrix(rows: m.rows, columns: m.columns, values: p.flatMap { r in (0..<m.columns).map { m[r, $0] } })
      }
    }
    func columns(_ name: String, _ p: [Int]) {
      guard let m = w[name] else { return }
      w[name] = Matrix(rows: m.rows, columns: m.columns, values: (0..<m.rows).flatMap { r in p.map { m[r, $0] } })
    }
    for (layer, heads) in order.enumerated() {
      let p = "model.layers.\(layer).self_attn."
      let kvFeatures = heads.flatMap { b in (0..<d).map { b * d + $0 } }
      let queryFeatures = heads.flatMap { b in (0..<group).flatMap { g in (0..<d).map { ((b * group + g) * d) + $0 } } }
      for name in ["k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"] { rows(p + name, kvFeatures) }
      for name in ["q_proj.weight", "q_proj.bias"] { rows(p + name, queryFeatures) }
      columns(p + "o_proj.weight", queryFeatures)
    }
    return try Network(
      config: network.config,
      tensors: network.tensors.reduce(into: [:]) { out, entry in
        out[entry.name] = w[entry.name]?.tensor(shape: entry.tensor.shape)
      })
  }

  /// Statistics, matchings and the zipped decoder in one call (heads aligned first, except for
  /// `average`, which keeps every index as it is).
  public static func zipDecoders(_ models: [Network<Float>], sequences: [[Int]], options: Options = Options()) throws
    -> Network<Float>
  {
    let models = options.method == .average ? models : try alignHeads(models, sequences: sequences)
    let stats = try decoderStatistics(models, sequences: sequences)
    var all = options
    all.stop = nil
    return try applyDecoder(models, matchings: try matchings(stats, models: models.count, options: all))
  }
}
