import Foundation
import Nets
import Tensor
import Testing

@testable import Merge

/// A small Llama-style decoder (4 heads of 4, 2 KV heads) with random weights.
/// `extra` adds config keys (biases).
func randomDecoder(
  seed: UInt64, tied: Bool = false, architecture: String = "LlamaForCausalLM", extra: String = ""
) throws -> Network<Float> {
  let json = """
    {"architectures": ["\(architecture)"], "vocab_size": 30, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
     \(extra) "tie_word_embeddings": \(tied)}
    """
  let config = try NetworkConfig(json: Data(json.utf8))
  var tensors: [String: Tensor] = [:]
  for (name, shape) in Network<Float>.expectedShapes(config) {
    let rng = CounterRNG(seed: seed, stream: name)
    let gain: Float = name.hasSuffix("norm.weight") ? 1 : 0
    tensors[name] = Tensor(shape: shape, scalars: (0..<shape.reduce(1, *)).map { gain + 0.4 * rng.normal(UInt64($0)) })
  }
  return try Network(config: config, tensors: tensors)
}

/// The same function with its attention heads reordered, and its residual features, each
/// layer's MLP hidden units and each KV head's value features permuted (every weight adjusted
/// to match).
func permutedDecoder(_ network: Network<Float>, seed: UInt64) throws -> Network<Float> {
  guard case .decoder(let c) = network.config else { throw MergeError.tooFewModels }
  func permutation(_ n: Int, _ stream: String) -> [Int] {
    let rng = CounterRNG(seed: seed, stream: stream)
    return (0..<n).sorted { rng.bits(UInt64($0)) < rng.bits(UInt64($1)) }
  }
  var w = network.weights
  // Output features: a weight's rows, a bias's entries (a bias is one row); absent biases are skipped.
  func rows(_ name: String, _ p: [Int]) {
    guard let m = w[name] else { return }
    if name.hasSuffix(".bias") {
      w[name] = Matrix(rows: 1, columns: m.columns, values: p.map { m.values[$0] })
      return
    }
    w[name] = Matrix(rows: m.rows, columns: m.columns, values: p.flatMap { r in (0..<m.columns).map { m[r, $0] } })
  }
  func columns(_ name: String, _ p: [Int]) {
    guard let m = w[name] else { return }
    w[name] = Matrix(rows: m.rows, columns: m.columns, values: (0..<m.rows).flatMap { r in p.map { m[r, $0] } })
  }
  // Whole heads first: KV heads (with their query heads) reversed in every layer.
  let (d, group) = (c.headDimension, c.headCount / c.keyValueHeadCount)
  for l in 0..<c.layerCount {
    let p = "model.layers.\(l).self_attn."
    let heads = Array((0..<c.keyValueHeadCount).reversed())
    for name in ["k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"] {
      rows(p + name, heads.flatMap { b in (0..<d).map { b * d + $0 } })
    }
    let queries = heads.flatMap { b in (0..<(group * d)).map { b * group * d + $0 } }
    rows(p + "q_proj.weight", queries)
    rows(p + "q_proj.bias", queries)
    columns(p + "o_proj.weight", queries)
  }
  let residual = permutation(c.hiddenSize, "residual")
  columns("model.embed_tokens.weight", residual)
  columns("model.norm.weight", residual)
  if !c.tiedEmbeddings { columns("lm_head.weight", residual) }
  for l in 0..<c.layerCount {
    let p = "model.layers.\(l)."
    for name in [
      "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
      "post_feedforward_layernorm.weight",
    ] { columns(p + name, residual) }
    for name in [
      "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight",
      "mlp.up_proj.weight",
    ] { columns(p + name, residual) }
    for name in ["self_attn.o_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.bias"] {
      rows(p + name, residual)
    }
    let hidden = permutation(c.intermediateSize, "mlp\(l)")
    for name in ["gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias"] {
      rows(p + "mlp." + name, hidden)
    }
    columns(p + "mlp.down_proj.weight", hidden)
    let values = (0..<c.keyValueHeadCount).map { permutation(d, "v\(l).\($0)") }
    for name in ["self_attn.v_proj.weight", "self_attn.v_proj.bias"] {
      rows(p + name, (0..<c.keyValueHeadCount).flatMap { h in values[h].map { h * d + $0 } })
    }
    columns(p + "self_attn.o_proj.weight", (0..<c.headCount).flatMap { q in values[q / group].map { q * d + $0 } })
  }
  return try Network(
    config: network.config,
    tensors: network.tensors.reduce(into: [:]) { out, entry in
      out[entry.name] = w[entry.name]!.tensor(shape: entry.tensor.shape)
    })
}

func logits(_ network: Network<Float>, _ sequences: [[Int]]) throws -> [Float] {
  let tape = Tape<Float>()
  return tape.value(try network.forward(tape, .tokens(TokenBatch(sequences))).output).values
}

/// Row-wise log-softmax in float64 of `values` (rows of `width`), as floats.
func logSoftmaxRows(_ values: [Float], width: Int) -> [Float] {
  stride(from: 0, to: values.count, by: width).flatMap { start -> [Float] in
    let row = values[start..<(start + width)].map(Double.init)
    let top = row.max()!
    let total = log(row.map { exp($0 - top) }.reduce(0, +)) + top
    return row.map { Float($0 - total) }
  }
}

func tokenData(_ count: Int, seed: UInt64) -> [[Int]] {
  let rng = CounterRNG(seed: seed, stream: "zip-tokens")
  return (0..<count).map { s in (0..<12).map { Int(rng.bits(UInt64(s * 100 + $0)) % 30) } }
}

@Suite struct ZipItDecoderTests {
  /// Zipping a decoder with a permuted copy of itself recovers it (heads aligned; residual
  /// stream, MLP hidden units and value features matched), with untied and tied embeddings.
  @Test(arguments: [(ZipIt.Method.zipit, false), (.permute, false), (.zipit, true)])
  func zippingADecoderWithAPermutedCopyRecoversIt(_ setting: (ZipIt.Method, Bool)) throws {
    let a = try randomDecoder(seed: 1, tied: setting.1)
    let b = try permutedDecoder(a, seed: 2)
    let probe = tokenData(4, seed: 9)
    #expect(zip(try logits(b, probe), try logits(a, probe)).allSatisfy { abs($0 - $1) < 1e-4 })
    var options = ZipIt.Options()
    options.method = setting.0
    let zipped = try ZipIt.zipDecoders([a, b], sequences: tokenData(24, seed: 3), options: options)
    let (got, want) = (try logits(zipped, probe), try logits(a, probe))
    let worst = zip(got, want).map { abs($0 - $1) }.max()!
    #expect(worst < 1e-4, "max difference \(worst)")
    // Averaging same-index features of the two does not.
    options.method = .average
    let averaged = try ZipIt.zipDecoders([a, b], sequences: tokenData(24, seed: 3), options: options)
    #expect(zip(try logits(averaged, probe), want).map { abs($0 - $1) }.max()! > 1e-2)
  }

  /// The same with every bias transformers allows (q/k/v/o and MLP biases, Llama), with
  /// Qwen3's per-head query/key norms and o bias, and with Gemma 2's extra norms, soft-capping
  /// and windows: biases and residual norms are merged with their output side, the per-head
  /// norms averaged.
  @Test(arguments: [
    ("LlamaForCausalLM", #""mlp_bias": true,"#), ("Qwen3ForCausalLM", ""),
    ("Gemma2ForCausalLM", #""sliding_window": 5, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 3.0,"#),
  ])
  func zippingADecoderWithBiasesAndNormsRecoversIt(_ setting: (String, String)) throws {
    let a = try randomDecoder(seed: 1, architecture: setting.0, extra: #""attention_bias": true, "# + setting.1)
    guard case .decoder(let c) = a.config else { throw MergeError.tooFewModels }
    #expect(c.outputBias && (c.mlpBias || c.queryKeyNorm || c.gemma != nil))
    let b = try permutedDecoder(a, seed: 2)
    let probe = tokenData(4, seed: 9)
    let zipped = try ZipIt.zipDecoders([a, b], sequences: tokenData(24, seed: 3))
    let worst = zip(try logits(zipped, probe), try logits(a, probe)).map { abs($0 - $1) }.max()!
    #expect(worst < 1e-4, "max difference \(worst)")
  }

  /// Partial zipping (a trunk of the first `stop` layers, a tail per model): with a permuted
  /// copy every tail computes the model again, so the output is the model's log-softmax.
  @Test(arguments: [(1, false, false), (2, true, false), (1, false, true)])
  func partiallyZippingADecoderWithAPermutedCopyGivesItsDistribution(_ setting: (Int, Bool, Bool)) throws {
    let a = try randomDecoder(seed: 1, tied: setting.2)
    let b = try permutedDecoder(a, seed: 2)
    var options = ZipIt.Options()
    (options.stop, options.keepHeads) = (setting.0, setting.1)
    let zipped = try ZipIt.zipDecoders([a, b], sequences: tokenData(24, seed: 3), options: options)
    guard case .decoder(let c) = zipped.config else { throw MergeError.tooFewModels }
    #expect(c.tails == 2 && c.sharedLayers == setting.0)
    let probe = tokenData(4, seed: 9)
    let worst = zip(try logits(zipped, probe), logSoftmaxRows(try logits(a, probe), width: 30)).map { abs($0 - $1) }
      .max()!
    #expect(worst < 1e-4, "max difference \(worst)")
  }

  /// Two decoders that share their first layer and differ after it: zipped up to that layer,
  /// the trunk is the shared layer and the tails are the two models, so the output is their
  /// ensemble, `log((p_A + p_B) / 2)`, computed here from each model's own logits.
  @Test func partiallyZippedDecodersWithACommonTrunkAreTheirEnsemble() throws {
    let a = try randomDecoder(seed: 1)
    let other = try randomDecoder(seed: 7)
    var tensors: [String: Tensor] = [:]
    for (name, tensor) in a.tensors {
      tensors[name] =
        name.hasPrefix("model.layers.0.") || name.hasPrefix("model.embed_tokens")
        ? tensor : other.tensors.first { $0.name == name }!.tensor
    }
    let b = try Network<Float>(config: a.config, tensors: tensors)
    var options = ZipIt.Options()
    options.stop = 1
    let zipped = try ZipIt.zipDecoders([a, b], sequences: tokenData(24, seed: 3), options: options)
    let probe = tokenData(4, seed: 9)
    let (pa, pb) = (logSoftmaxRows(try logits(a, probe), width: 30), logSoftmaxRows(try logits(b, probe), width: 30))
    let ensemble = zip(pa, pb).map { Float(log((exp(Double($0)) + exp(Double($1))) / 2)) }
    let worst = zip(try logits(zipped, probe), ensemble).map { abs($0 - $1) }.max()!
    #expect(worst < 1e-4, "max difference \(worst)")
    // Neither model alone.
    #expect(zip(ensemble, pa).map { abs($0 - $1) }.max()! > 1e-2)
    // A partially zipped decoder is not zipped again; stops beyond the layers are refused.
    #expect(throws: MergeError.self) { try ZipIt.zipDecoders([zipped, zipped], sequences: tokenData(2, seed: 1)) }
    options.stop = 3
    #expect(throws: MergeError.stopLayerOutOfRange(stop: 3, points: 2)) {
      try ZipIt.zipDecoders([a, b], sequences: tokenData(2, seed: 1), options: options)
    }
  }

  @Test func averagingADecoderWithItselfGivesItBack() throws {
    let a = try randomDecoder(seed: 5)
    var options = ZipIt.Options()
    options.method = .average
    let same = try ZipIt.zipDecoders([a, a], sequences: tokenData(8, seed: 1), options: options)
    let probe = tokenData(3, seed: 4)
    #expect(zip(try logits(same, probe), try logits(a, probe)).allSatisfy { abs($0 - $1) < 1e-4 })
  }

  @Test func mismatchedDecodersAreRefused() throws {
    let a = try randomDecoder(seed: 1)
    let tied = try randomDecoder(seed: 1, tied: true)
    #expect(
      throws: MergeError.differentArchitectures(model: 1, detail: "its config.json sizes differ from the first's")
    ) {
      try ZipIt.zipDecoders([a, tied], sequences: tokenData(2, seed: 1))
    }
    #expect(throws: MergeError.tooFewModels) { try ZipIt.zipDecoders([a], sequences: tokenData(2, seed: 1)) }
  }
}
