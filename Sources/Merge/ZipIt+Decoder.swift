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
  /// The common decoder config of the models (dense, no K/V projections, not partially
  /// zipped), checked.
  static func commonDecoderConfig(_ models: [Network<Float>]) throws -> DecoderConfig {
    let c: DecoderConfig = try commonTransformerConfig(models, kind: "a decoder") { model in
      guard case .decoder(let c) = model.config else { return nil }
      return c
    }
    guard c.tails == 1 else {
      throw MergeError.notZippable(model: 0, reason: "it is already partially zipped (\(c.tails) tails)")
    }
    return c
  }

  /// Merge point indices of a decoder's statistics and matchings when its first `layers`
  /// layers are zipped: the residual stream, then those layers' MLP hidden features, then
  /// their value features per KV head.
  static func decoderPoint(mlp layer: Int) -> Int { 1 + layer }
  static func decoderPoint(values layer: Int, head: Int, layers: Int, _ c: DecoderConfig) -> Int {
    1 + layers + layer * c.keyValueHeadCount + head
  }

  /// The number of merge points when the first `layers` layers are zipped.
  static func decoderPointCount(layers: Int, _ c: DecoderConfig) -> Int { 1 + layers * (1 + c.keyValueHeadCount) }

  /// Joint statistics of the models' features at every merge point of the first `layers`
  /// layers (nil: all) over the non-padding tokens of `sequences`. The residual stream's pool
  /// the embeddings' output and those layers' outputs.
  public static func decoderStatistics(
    _ models: [Network<Float>], sequences: [[Int]], layers: Int? = nil, batchSize: Int = 8
  ) throws -> [FeatureStatistics] {
    let c = try commonDecoderConfig(models)
    let layers = try zippedLayers(layers, c)
    let d = c.headDimension
    var sources = [
      PointSource(
        points: ["model.embed_tokens.output"] + (0..<layers).map { "model.layers.\($0).output" }, columns: nil)
    ]
    sources += (0..<layers).map { PointSource(points: ["model.layers.\($0).mlp.hidden"], columns: nil) }
    sources += (0..<layers).flatMap { layer in
      (0..<c.keyValueHeadCount).map { head in
        PointSource(points: ["model.layers.\(layer).self_attn.values"], columns: (head * d)..<((head + 1) * d))
      }
    }
    let widths =
      [c.hiddenSize] + Array(repeating: c.intermediateSize, count: layers)
      + Array(repeating: d, count: layers * c.keyValueHeadCount)
    return try tokenStatistics(models, sequences: sequences, sources: sources, widths: widths, batchSize: batchSize)
  }

  /// `layers` (nil: all of them) checked against the decoder's layer count.
  static func zippedLayers(_ layers: Int?, _ c: DecoderConfig) throws -> Int {
    let layers = layers ?? c.layerCount
    guard (1...c.layerCount).contains(layers) else {
      throw MergeError.stopLayerOutOfRange(stop: layers, points: c.layerCount)
    }
    return layers
  }

  /// The zipped decoder from one matching per merge point (`decoderStatistics`' order). With
  /// matchings for fewer layers than the model has, or `keepTails`, it is partially zipped: the
  /// zipped layers form a shared trunk and every model keeps its remaining layers, final norm
  /// and head as a tail, which first maps the residual stream back to its own features with its
  /// unmerge `U_i` (`tails.{i}.unmerge.weight`); the output is the tails' mean probability.
  public static func applyDecoder(_ models: [Network<Float>], matchings: [FeatureMatching], keepTails: Bool = false)
    throws -> Network<Float>
  {
    let c = try commonDecoderConfig(models)
    let (kv, heads) = (c.keyValueHeadCount, c.headCount)
    guard
      let layers = (1...c.layerCount).first(where: { decoderPointCount(layers: $0, c) == matchings.count })
    else {
      throw MergeError.stopLayerOutOfRange(stop: matchings.count, points: decoderPointCount(layers: c.layerCount, c))
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
    for layer in 0..<layers {
      let p = "model.layers.\(layer)."
      let valueMerge = { (m: Int) in
        blocks((0..<kv).map { merge(decoderPoint(values: layer, head: $0, layers: layers, c), m) })
      }
      let valueUnmerge = { (m: Int) in
        blocks((0..<heads).map { unmerge(decoderPoint(values: layer, head: $0 / (heads / kv), layers: layers, c), m) })
      }
      out[p + "input_layernorm.weight"] = z.zippedVector(p + "input_layernorm.weight", left: residualMerge)
      for norm in ["post_attention_layernorm"]
        + (c.gemma != nil ? ["pre_feedforward_layernorm", "post_feedforward_layernorm"] : [])
      {
        out[p + norm + ".weight"] = z.zippedVector(p + norm + ".weight", left: residualMerge)
      }
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
      if c.outputBias {
        out[p + "self_attn.o_proj.bias"] = z.zippedVector(p + "self_attn.o_proj.bias", left: residualMerge)
      }
      if c.queryKeyNorm {
        // One gain per head feature, shared by every head: features do not move within a head.
        for name in ["q_norm.weight", "k_norm.weight"] {
          out[p + "self_attn." + name] = z.zipped(p + "self_attn." + name, left: nil, right: nil)
        }
      }
      let mlpMerge = { (m: Int) in merge(decoderPoint(mlp: layer), m) }
      out[p + "mlp.gate_proj.weight"] = z.zipped(p + "mlp.gate_proj.weight", left: mlpMerge, right: residualUnmerge)
      out[p + "mlp.up_proj.weight"] = z.zipped(p + "mlp.up_proj.weight", left: mlpMerge, right: residualUnmerge)
      out[p + "mlp.down_proj.weight"] = z.zipped(
        p + "mlp.down_proj.weight", left: residualMerge, right: { unmerge(decoderPoint(mlp: layer), $0) })
      if c.mlpBias {
        out[p + "mlp.gate_proj.bias"] = z.zippedVector(p + "mlp.gate_proj.bias", left: mlpMerge)
        out[p + "mlp.up_proj.bias"] = z.zippedVector(p + "mlp.up_proj.bias", left: mlpMerge)
        out[p + "mlp.down_proj.bias"] = z.zippedVector(p + "mlp.down_proj.bias", left: residualMerge)
      }
    }
    var zipped = c
    if layers == c.layerCount && !keepTails {
      out["model.norm.weight"] = z.zippedVector("model.norm.weight", left: residualMerge)
      if !c.tiedEmbeddings { out["lm_head.weight"] = z.zipped("lm_head.weight", left: nil, right: residualUnmerge) }
    } else {
      (zipped.tails, zipped.sharedLayers) = (models.count, layers)
      for (m, model) in models.enumerated() {
        let tail = DecoderConfig.tailPrefix(m)
        let u = residualUnmerge(m)
        out[tail + "unmerge.weight"] = Matrix(rows: u.rows, columns: u.columns, values: u.values.map(Float.init))
        for i in layers..<c.layerCount {
          for (name, weight) in model.weights where name.hasPrefix("model.layers.\(i).") { out[tail + name] = weight }
        }
        out[tail + "model.norm.weight"] = model.checkedWeight("model.norm.weight")
        out[tail + "lm_head.weight"] = model.checkedWeight(
          c.tiedEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight")
      }
    }
    return try Network(
      config: .decoder(zipped),
      tensors: Network<Float>.expectedShapes(.decoder(zipped)).reduce(into: [:]) { tensors, entry in
        tensors[entry.name] = out[entry.name]?.tensor(shape: entry.shape)
      })
  }

  /// Aligns every model's attention heads with the first model's, layer by layer: rotary fixes
  /// the frequency of each query/key feature, so features cannot move within a head, but whole
  /// heads can. KV head `b` of model m is matched to head `a` of model 0 by the Hungarian method
  /// on `sum_i corr(k_{0,a,i}, k_{m,b,i})` (same-index key features, after rotary, over the
  /// tokens); its query heads follow it. Returns the models with their heads reordered (each
  /// computes what it computed before).
  /// Only the first `layers` layers (nil: all) are aligned.
  public static func alignHeads(
    _ models: [Network<Float>], sequences: [[Int]], layers: Int? = nil, batchSize: Int = 8
  ) throws -> [Network<Float>] {
    let c = try commonDecoderConfig(models)
    let layers = try zippedLayers(layers, c)
    let (kv, d, n) = (c.keyValueHeadCount, c.headDimension, models.count)
    guard kv > 1 else { return models }
    var stats = (0..<layers).map { _ in FeatureStatistics(width: kv * d * n) }
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
      for layer in 0..<layers {
        let parts = try keys.map { try $0.required("model.layers.\(layer).self_attn.keys").rows(rows) }
        stats[layer].add(parts.dropFirst().reduce(parts[0]) { Matrix.concatenated($0, $1) })
      }
    }
    var aligned = [models[0]]
    for m in 1..<n {
      var order: [[Int]] = []  // per layer: model m's head placed at each position
      for layer in 0..<layers {
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
  /// `average`, which keeps every index as it is). `options.stop` zips only the first layers and
  /// `options.keepHeads` keeps every model's norm and head as a tail (partial zipping).
  public static func zipDecoders(_ models: [Network<Float>], sequences: [[Int]], options: Options = Options()) throws
    -> Network<Float>
  {
    let layers = try zippedLayers(options.stop, try commonDecoderConfig(models))
    let models = options.method == .average ? models : try alignHeads(models, sequences: sequences, layers: layers)
    let stats = try decoderStatistics(models, sequences: sequences, layers: layers)
    var all = options
    all.stop = nil
    return try applyDecoder(
      models, matchings: try matchings(stats, models: models.count, options: all), keepTails: options.keepHeads)
  }
}
