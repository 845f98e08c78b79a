import Foundation
import Tensor

@testable import Nets

/// Naive float64 implementations of the architectures, written from the papers' and Hugging
/// Face's definitions with plain loops (no tape, no BLAS): the independent reference for the
/// forward tests. Rows are vectors; weights are looked up by name.
struct Reference {
  let weights: [String: Tensor]

  func matrix(_ name: String) -> [[Double]] {
    let t = weights[name]!
    let columns = t.shape.last!
    return (0..<(t.count / columns)).map { r in (0..<columns).map { Double(t.scalars[r * columns + $0]) } }
  }

  func vector(_ name: String) -> [Double] { weights[name]!.scalars.map(Double.init) }

  /// `W x + b` for a weight stored out x in.
  func linear(_ x: [Double], _ name: String, bias: Bool) -> [Double] {
    let w = matrix(name + ".weight")
    let b = bias ? vector(name + ".bias") : [Double](repeating: 0, count: w.count)
    return w.indices.map { o in zip(w[o], x).reduce(b[o]) { $0 + $1.0 * $1.1 } }
  }

  func rmsNorm(_ x: [Double], _ name: String, _ eps: Double) -> [Double] {
    let r = 1 / (x.reduce(0) { $0 + $1 * $1 } / Double(x.count) + eps).squareRoot()
    return zip(x, vector(name)).map { $0 * r * $1 }
  }

  func layerNorm(_ x: [Double], _ name: String, _ eps: Double) -> [Double] {
    let mean = x.reduce(0, +) / Double(x.count)
    let variance = x.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(x.count)
    let (g, b) = (vector(name + ".weight"), vector(name + ".bias"))
    return x.indices.map { (x[$0] - mean) / (variance + eps).squareRoot() * g[$0] + b[$0] }
  }

  /// Rotates pairs (i, i + d/2) of each head by position * theta^(-2i/d).
  func rotary(_ x: [Double], position: Int, heads: Int, theta: Double) -> [Double] {
    let d = x.count / heads
    var out = x
    for h in 0..<heads {
      for i in 0..<(d / 2) {
        let angle = Double(position) * pow(theta, -Double(2 * i) / Double(d))
        let (a, b) = (x[h * d + i], x[h * d + i + d / 2])
        out[h * d + i] = a * cos(angle) - b * sin(angle)
        out[h * d + i + d / 2] = b * cos(angle) + a * sin(angle)
      }
    }
    return out
  }

  /// Attention of one sequence: `visible(i, j)` says whether query i sees key j.
  func attention(
    _ q: [[Double]], _ k: [[Double]], _ v: [[Double]], heads: Int, kvHeads: Int, visible: (Int, Int) -> Bool
  ) -> [[Double]] {
    let d = q[0].count / heads
    var out = q.map { _ in [Double](repeating: 0, count: heads * d) }
    for h in 0..<heads {
      let g = h / (heads / kvHeads)
      for i in q.indices {
        let keys = k.indices.filter { visible(i, $0) }
        let scores = keys.map { j in
          (0..<d).reduce(0.0) { $0 + q[i][h * d + $1] * k[j][g * d + $1] } / Double(d).squareRoot()
        }
        let top = scores.max() ?? 0
        let e = scores.map { exp($0 - top) }
        let total = e.reduce(0, +)
        for (n, j) in keys.enumerated() { for c in 0..<d { out[i][h * d + c] += e[n] / total * v[j][g * d + c] } }
      }
    }
    return out
  }

  func silu(_ x: Double) -> Double { x / (1 + exp(-x)) }
  func gelu(_ x: Double) -> Double { 0.5 * x * (1 + erf(x / 2.0.squareRoot())) }

  /// Llama-style decoder logits for one sequence.
  func decoder(_ c: DecoderConfig, _ ids: [Int]) -> [[Double]] {
    let embed = matrix("model.embed_tokens.weight")
    var x = ids.map { embed[$0] }
    for l in 0..<c.layerCount {
      let p = "model.layers.\(l)."
      let h = x.map { rmsNorm($0, p + "input_layernorm.weight", c.epsilon) }
      let q = h.enumerated().map {
        rotary(
          linear($1, p + "self_attn.q_proj", bias: c.attentionBias), position: $0, heads: c.headCount,
          theta: c.ropeTheta)
      }
      let k = h.enumerated().map {
        rotary(
          linear($1, p + "self_attn.k_proj", bias: c.attentionBias), position: $0, heads: c.keyValueHeadCount,
          theta: c.ropeTheta)
      }
      let v = h.map { linear($0, p + "self_attn.v_proj", bias: c.attentionBias) }
      let a = attention(q, k, v, heads: c.headCount, kvHeads: c.keyValueHeadCount) { $1 <= $0 }
      x = x.indices.map { i in zip(x[i], linear(a[i], p + "self_attn.o_proj", bias: false)).map(+) }
      x = x.map { row in
        let m = rmsNorm(row, p + "post_attention_layernorm.weight", c.epsilon)
        let hidden = zip(linear(m, p + "mlp.gate_proj", bias: false), linear(m, p + "mlp.up_proj", bias: false)).map {
          silu($0) * $1
        }
        return zip(row, linear(hidden, p + "mlp.down_proj", bias: false)).map(+)
      }
    }
    let head = c.tiedEmbeddings ? "model.embed_tokens" : "lm_head"
    return x.map { linear(rmsNorm($0, "model.norm.weight", c.epsilon), head, bias: false) }
  }

  /// BERT sentence embedding (mean over tokens) for one unpadded sequence.
  /// `BertForSequenceClassification`'s logits: `classifier(tanh(pooler.dense(h_0)))` of the
  /// first token's last hidden state (tensors under `bert.` but the classifier).
  func bertClassifier(_ c: BERTConfig, _ ids: [Int]) -> [Double] {
    let first = bertHidden(c, ids)[0]
    let pooled = linear(first, "pooler.dense", bias: true).map { Foundation.tanh($0) }
    return linear(pooled, "classifier", bias: true)
  }

  func bert(_ c: BERTConfig, _ ids: [Int]) -> [Double] {
    let x = bertHidden(c, ids)
    return x[0].indices.map { c in x.reduce(0) { $0 + $1[c] } / Double(x.count) }
  }

  /// The last hidden state of every token.
  func bertHidden(_ c: BERTConfig, _ ids: [Int]) -> [[Double]] {
    let (words, positions, types) = (
      matrix("embeddings.word_embeddings.weight"), matrix("embeddings.position_embeddings.weight"),
      matrix("embeddings.token_type_embeddings.weight")
    )
    var x = ids.enumerated().map { s, id in
      layerNorm(
        words[id].indices.map { words[id][$0] + positions[s][$0] + types[0][$0] }, "embeddings.LayerNorm", c.epsilon)
    }
    for l in 0..<c.layerCount {
      let p = "encoder.layer.\(l)."
      let q = x.map { linear($0, p + "attention.self.query", bias: true) }
      let k = x.map { linear($0, p + "attention.self.key", bias: true) }
      let v = x.map { linear($0, p + "attention.self.value", bias: true) }
      let a = attention(q, k, v, heads: c.headCount, kvHeads: c.headCount) { i, j in !c.causal || j <= i }
      x = x.indices.map { i in
        layerNorm(
          zip(linear(a[i], p + "attention.output.dense", bias: true), x[i]).map(+), p + "attention.output.LayerNorm",
          c.epsilon)
      }
      x = x.map { row in
        let hidden = linear(row, p + "intermediate.dense", bias: true).map(gelu)
        return layerNorm(
          zip(linear(hidden, p + "output.dense", bias: true), row).map(+), p + "output.LayerNorm", c.epsilon)
      }
    }
    return x
  }
}

/// Random weights for every tensor `config` needs: matrices ~ N(0, scale^2), norm weights near 1.
func randomWeights(_ config: NetworkConfig, seed: UInt64 = 1, scale: Float = 0.3) -> [String: Tensor] {
  var tensors: [String: Tensor] = [:]
  for (name, shape) in Network<Float>.expectedShapes(config) {
    let random = CounterRNG(seed: seed, stream: name).normalTensor(shape, scale: shape.count == 1 ? 0.1 : scale)
    let isNormWeight =
      shape.count == 1 && name.hasSuffix("weight") && (name.contains("norm") || name.contains("LayerNorm"))
    tensors[name] = isNormWeight ? Tensor(shape: shape, scalars: random.scalars.map { $0 + 1 }) : random
  }
  return tensors
}
