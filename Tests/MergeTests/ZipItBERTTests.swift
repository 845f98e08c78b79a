import Foundation
import Nets
import Tensor
import Testing

@testable import Merge

/// A small BERT encoder (3 heads of 4) with random weights, optionally saved as a task model's
/// encoder (`bert.` prefix).
func randomBERT(seed: UInt64, prefix: String = "") throws -> Network<Float> {
  let json = """
    {"architectures": ["BertModel"], "vocab_size": 30, "hidden_size": 12, "intermediate_size": 20,
     "num_hidden_layers": 2, "num_attention_heads": 3, "max_position_embeddings": 16, "type_vocab_size": 2,
     "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    """
  let config = try NetworkConfig(json: Data(json.utf8))
  var tensors: [String: Tensor] = [:]
  for (name, shape) in Network<Float>.expectedShapes(config) {
    let rng = CounterRNG(seed: seed, stream: name)
    let gain: Float = name.hasSuffix("LayerNorm.weight") ? 1 : 0
    tensors[prefix + name] = Tensor(
      shape: shape, scalars: (0..<shape.reduce(1, *)).map { gain + 0.4 * rng.normal(UInt64($0)) })
  }
  return try Network(config: config, tensors: tensors)
}

/// The same encoder with its heads reordered, and its residual features, MLP units, and each
/// head's query/key features (jointly) and value features permuted.
func permutedBERT(_ network: Network<Float>, seed: UInt64) throws -> Network<Float> {
  guard case .bert(let c) = network.config else { throw MergeError.tooFewModels }
  let pre = network.tensorPrefix
  func permutation(_ n: Int, _ stream: String) -> [Int] {
    let rng = CounterRNG(seed: seed, stream: stream)
    return (0..<n).sorted { rng.bits(UInt64($0)) < rng.bits(UInt64($1)) }
  }
  var w = network.weights
  func rows(_ name: String, _ p: [Int]) {
    let m = w[pre + name]!
    w[pre + name] =
      m.rows == 1
      ? Matrix(rows: 1, columns: m.columns, values: p.map { m.values[$0] })
      : Matrix(rows: m.rows, columns: m.columns, values: p.flatMap { r in (0..<m.columns).map { m[r, $0] } })
  }
  func columns(_ name: String, _ p: [Int]) {
    let m = w[pre + name]!
    w[pre + name] = Matrix(rows: m.rows, columns: m.columns, values: (0..<m.rows).flatMap { r in p.map { m[r, $0] } })
  }
  let d = c.hiddenSize / c.headCount
  let residual = permutation(c.hiddenSize, "residual")
  for table in ["word_embeddings", "position_embeddings", "token_type_embeddings"] {
    columns("embeddings.\(table).weight", residual)
  }
  for suffix in ["weight", "bias"] { rows("embeddings.LayerNorm." + suffix, residual) }
  for l in 0..<c.layerCount {
    let p = "encoder.layer.\(l)."
    // Heads reversed, and within each head its query/key and its value features permuted.
    let heads = Array((0..<c.headCount).reversed())
    let keys = heads.enumerated().flatMap { position, h in
      permutation(d, "qk\(l).\(position)").map { h * d + $0 }
    }
    let values = heads.enumerated().flatMap { position, h in permutation(d, "v\(l).\(position)").map { h * d + $0 } }
    for name in ["query", "key"] { for s in [".weight", ".bias"] { rows(p + "attention.self." + name + s, keys) } }
    for s in [".weight", ".bias"] { rows(p + "attention.self.value" + s, values) }
    columns(p + "attention.output.dense.weight", values)
    for name in ["attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"] {
      columns(p + name + ".weight", residual)
    }
    for name in ["attention.output.dense", "output.dense"] {
      rows(p + name + ".weight", residual)
      rows(p + name + ".bias", residual)
    }
    for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
      for s in [".weight", ".bias"] { rows(p + norm + s, residual) }
    }
    let units = permutation(c.intermediateSize, "mlp\(l)")
    rows(p + "intermediate.dense.weight", units)
    rows(p + "intermediate.dense.bias", units)
    columns(p + "output.dense.weight", units)
  }
  var copy = network
  copy.weights = w
  return copy
}

func lastHidden(_ network: Network<Float>, _ sequences: [[Int]]) throws -> [Float] {
  let tape = Tape<Float>()
  return tape.value(try network.forward(tape, .tokens(TokenBatch(sequences))).point("last_hidden_state")).values
}

func bertTokens(_ count: Int, seed: UInt64) -> [[Int]] {
  let rng = CounterRNG(seed: seed, stream: "bert-tokens")
  return (0..<count).map { s in (0..<(6 + s % 5)).map { Int(rng.bits(UInt64(s * 16 + $0)) % 30) } }
}

@Suite struct ZipItBERTTests {
  /// An encoder zipped with a copy whose heads are reordered and whose residual features, MLP
  /// units and per-head query/key and value features are permuted comes back (its last hidden
  /// states, in the first model's feature order), with and without the task-model prefix.
  @Test(arguments: [(ZipIt.Method.zipit, ""), (.permute, ""), (.zipit, "bert.")])
  func zippingAnEncoderWithAPermutedCopyRecoversIt(_ setting: (ZipIt.Method, String)) throws {
    let a = try randomBERT(seed: 1, prefix: setting.1)
    let b = try permutedBERT(a, seed: 2)
    let data = bertTokens(24, seed: 3)
    let probe = bertTokens(4, seed: 4)
    let want = try lastHidden(a, probe)
    #expect(
      zip(try lastHidden(b, probe), want).contains { abs($0 - $1) > 1e-2 }, "the copy's features are in another order")
    var options = ZipIt.Options()
    options.method = setting.0
    let zipped = try ZipIt.zipBERT([a, b], sequences: data, options: options)
    let error = zip(try lastHidden(zipped, probe), want).map { abs($0 - $1) }.max() ?? .infinity
    #expect(error < 1e-4, "max difference \(error)")
    // Averaging same-index features of the two does not recover it.
    options.method = .average
    let averaged = try ZipIt.zipBERT([a, b], sequences: data, options: options)
    #expect((zip(try lastHidden(averaged, probe), want).map { abs($0 - $1) }.max() ?? 0) > 1e-2)
  }

  @Test func mismatchedEncodersAreRefused() throws {
    let a = try randomBERT(seed: 1)
    #expect(throws: MergeError.tooFewModels) { try ZipIt.zipBERT([a], sequences: bertTokens(2, seed: 1)) }
    #expect(throws: MergeError.self) { try ZipIt.zipBERT([a, try randomDecoder(seed: 1)], sequences: [[1, 2]]) }
  }
}
