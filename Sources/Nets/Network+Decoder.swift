/// Llama-style decoders: pre-RMSNorm blocks with rotary grouped-query causal attention and a
/// gated MLP (`act(gate) * up -> down`), a final RMSNorm and the (possibly tied) head.
/// Points per layer `model.layers.{i}.`: every projection's `.input`/`.output`,
/// `self_attn.queries`/`self_attn.keys` (after rotary), `self_attn.values`, `mlp.hidden`,
/// and `output` (the residual stream after the block).
extension Network {
  static func decoderShapes(_ c: DecoderConfig) -> [(name: String, shape: [Int])] {
    let (h, q, kv) = (c.hiddenSize, c.headCount * c.headDimension, c.keyValueHeadCount * c.headDimension)
    var shapes: [(String, [Int])] = [("model.embed_tokens.weight", [c.vocabularySize, h])]
    for i in 0..<c.layerCount {
      let p = "model.layers.\(i)."
      shapes += [
        (p + "input_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [q, h]),
        (p + "self_attn.k_proj.weight", [kv, h]),
        (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, q]),
        (p + "post_attention_layernorm.weight", [h]),
        (p + "mlp.gate_proj.weight", [c.intermediateSize, h]), (p + "mlp.up_proj.weight", [c.intermediateSize, h]),
        (p + "mlp.down_proj.weight", [h, c.intermediateSize]),
      ]
      if c.attentionBias {
        shapes += [
          (p + "self_attn.q_proj.bias", [q]), (p + "self_attn.k_proj.bias", [kv]), (p + "self_attn.v_proj.bias", [kv]),
        ]
      }
    }
    shapes.append(("model.norm.weight", [h]))
    if !c.tiedEmbeddings { shapes.append(("lm_head.weight", [c.vocabularySize, h])) }
    return shapes
  }

  /// The logits of `batch`; from `start` (a layer and the residual stream entering it), the
  /// residual stream after the last block instead.
  func decoderForward(
    _ c: DecoderConfig, _ tape: Tape<T>, _ batch: TokenBatch, _ weight: WeightBinder, _ recorder: inout PointRecorder,
    from start: (layer: Int, hidden: Var)? = nil
  ) -> Var {
    var x: Var
    if let start {
      x = start.hidden
    } else {
      x = tape.embedding(batch.ids, table: weight("model.embed_tokens.weight"))
      recorder.record("model.embed_tokens.output", x)
    }
    let positions = batch.positions
    for i in (start?.layer ?? 0)..<c.layerCount {
      let p = "model.layers.\(i)."
      let h = tape.rmsNorm(x, weight: weight(p + "input_layernorm.weight"), epsilon: c.epsilon)
      let q = tape.rotary(
        tape.dense(h, p + "self_attn.q_proj", bias: c.attentionBias, weight, &recorder), positions: positions,
        heads: c.headCount, theta: c.ropeTheta)
      var k = tape.rotary(
        tape.dense(h, p + "self_attn.k_proj", bias: c.attentionBias, weight, &recorder), positions: positions,
        heads: c.keyValueHeadCount,
        theta: c.ropeTheta)
      var v = tape.dense(h, p + "self_attn.v_proj", bias: c.attentionBias, weight, &recorder)
      recorder.record(p + "self_attn.queries", q)
      recorder.record(p + "self_attn.keys", k)
      recorder.record(p + "self_attn.values", v)
      if let projection = weight.kvProjection {
        k = tape.projectHeads(k, layer: i, .keys, ranks: projection.keyRanks[i], dimension: c.headDimension, weight)
        v = tape.projectHeads(v, layer: i, .values, ranks: projection.valueRanks[i], dimension: c.headDimension, weight)
      }
      let a = tape.attention(
        query: q, key: k, value: v, sequence: batch.sequence, heads: c.headCount, kvHeads: c.keyValueHeadCount,
        causal: true, keyMask: batch.mask)
      x = tape.add(x, tape.dense(a, p + "self_attn.o_proj", bias: false, weight, &recorder))
      let m = tape.rmsNorm(x, weight: weight(p + "post_attention_layernorm.weight"), epsilon: c.epsilon)
      let gate = tape.activation(c.activation, tape.dense(m, p + "mlp.gate_proj", bias: false, weight, &recorder))
      let hidden = tape.multiply(gate, tape.dense(m, p + "mlp.up_proj", bias: false, weight, &recorder))
      recorder.record(p + "mlp.hidden", hidden)
      x = tape.add(x, tape.dense(hidden, p + "mlp.down_proj", bias: false, weight, &recorder))
      recorder.record(p + "output", x)
    }
    if start != nil { return x }
    let normalized = tape.rmsNorm(x, weight: weight("model.norm.weight"), epsilon: c.epsilon)
    recorder.record("model.norm.output", normalized)
    let logits = tape.linear(
      normalized, weight: weight(c.tiedEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight"))
    recorder.record("lm_head.output", logits)
    return logits
  }
}
