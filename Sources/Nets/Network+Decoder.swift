/// Llama-style decoders: pre-RMSNorm blocks with rotary grouped-query causal attention and a
/// gated MLP (`act(gate) * up -> down`), a final RMSNorm and the (possibly tied) head.
/// Points per layer `model.layers.{i}.`: every projection's `.input`/`.output`,
/// `self_attn.queries`/`self_attn.keys` (after rotary), `self_attn.values`, `mlp.hidden`,
/// and `output` (the residual stream after the block).
///
/// A partially zipped decoder (ZipIt!, `DecoderConfig.tails` > 1) runs its first
/// `sharedLayers` layers once, then every tail `t` maps the residual stream back to its model's
/// features (`tails.{t}.unmerge.weight`) and runs its own remaining layers, final norm and head
/// under the prefix `tails.{t}.` (points likewise). The output is the log of the tails' mean
/// next-token probability: an ensemble of the tails, a normalised distribution (its
/// log-softmax is itself), so perplexity and cross-entropy read it like logits.
extension Network {
  static func decoderShapes(_ c: DecoderConfig) -> [(name: String, shape: [Int])] {
    var shapes: [(String, [Int])] = [("model.embed_tokens.weight", [c.vocabularySize, c.hiddenSize])]
    for i in 0..<c.sharedLayers { shapes += decoderLayerShapes(c, prefix: "model.layers.\(i).") }
    guard c.tails > 1 else {
      shapes.append(("model.norm.weight", [c.hiddenSize]))
      if !c.tiedEmbeddings { shapes.append(("lm_head.weight", [c.vocabularySize, c.hiddenSize])) }
      return shapes
    }
    for t in 0..<c.tails {
      let tail = DecoderConfig.tailPrefix(t)
      shapes.append((tail + "unmerge.weight", [c.hiddenSize, c.hiddenSize]))
      for i in c.sharedLayers..<c.layerCount { shapes += decoderLayerShapes(c, prefix: tail + "model.layers.\(i).") }
      shapes += [
        (tail + "model.norm.weight", [c.hiddenSize]), (tail + "lm_head.weight", [c.vocabularySize, c.hiddenSize]),
      ]
    }
    return shapes
  }

  /// The tensors of one block whose names start with `p` (`model.layers.{i}.`).
  static func decoderLayerShapes(_ c: DecoderConfig, prefix p: String) -> [(name: String, shape: [Int])] {
    let (h, q, kv) = (c.hiddenSize, c.headCount * c.headDimension, c.keyValueHeadCount * c.headDimension)
    var shapes: [(String, [Int])] = [
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
    if c.outputBias { shapes.append((p + "self_attn.o_proj.bias", [h])) }
    if c.gemma != nil {
      shapes += [(p + "pre_feedforward_layernorm.weight", [h]), (p + "post_feedforward_layernorm.weight", [h])]
    }
    if c.mlpBias {
      shapes += [
        (p + "mlp.gate_proj.bias", [c.intermediateSize]), (p + "mlp.up_proj.bias", [c.intermediateSize]),
        (p + "mlp.down_proj.bias", [h]),
      ]
    }
    if c.queryKeyNorm {
      shapes += [
        (p + "self_attn.q_norm.weight", [c.headDimension]), (p + "self_attn.k_norm.weight", [c.headDimension]),
      ]
    }
    return shapes
  }

  /// The logits of `batch`; from `start` (a layer and the residual stream entering it), the
  /// residual stream after the last block instead (one tail only).
  ///
  /// Debug builds compile each file on its own, so a call from another file (`run`) would run
  /// the generic body, element by element through witness tables, for every layer: the `Float`
  /// specialization is asked for there (MatryoshkaKV's tests took 36 CPU-s without it, 8 with
  /// it). Release builds optimise the whole module, which specialises it anyway; the attribute
  /// is left out there, since with it the Swift 6.3 whole-module build referenced
  /// prespecialized `Tape` functions it never emitted and failed to link.
  #if DEBUG
    @_specialize(exported:true,where T == Float)
  #endif
  func decoderForward(
    _ c: DecoderConfig, _ tape: Tape<T>, _ batch: TokenBatch, _ weight: WeightBinder, _ recorder: inout PointRecorder,
    from start: (layer: Int, hidden: Var)? = nil
  ) -> Var {
    let rotation = rotaryTables(c, batch)
    var x: Var
    if let start {
      x = start.hidden
    } else {
      x = tape.embedding(batch.ids, table: weight("model.embed_tokens.weight"))
      if let gemma = c.gemma { x = tape.scale(x, T(gemma.embeddingScale)) }
      recorder.record("model.embed_tokens.output", x)
    }
    for i in (start?.layer ?? 0)..<c.sharedLayers {
      x = decoderBlock(c, tape, x, batch, rotation, layer: i, prefix: "model.layers.\(i).", weight, &recorder)
    }
    if start != nil { return x }
    guard c.tails > 1 else {
      return decoderHead(c, tape, x, prefix: "", tied: c.tiedEmbeddings, weight, &recorder)
    }
    let tails = (0..<c.tails).map { t in
      let tail = DecoderConfig.tailPrefix(t)
      var y = tape.dense(x, tail + "unmerge", bias: false, weight, &recorder)
      for i in c.sharedLayers..<c.layerCount {
        y = decoderBlock(c, tape, y, batch, rotation, layer: i, prefix: tail + "model.layers.\(i).", weight, &recorder)
      }
      return decoderHead(c, tape, y, prefix: tail, tied: false, weight, &recorder)
    }
    return tape.meanProbabilityScores(tails)
  }

  /// The rotary angles of `batch`'s rows, shared by every layer. Dynamic scaling depends on the
  /// length: each sequence's own (as transformers runs it alone).
  private func rotaryTables(_ c: DecoderConfig, _ batch: TokenBatch) -> RotaryTables<T> {
    let perSequence =
      c.rotary.kind == .dynamic
      ? (0..<batch.batch).map { b in
        c.rotary.inverseFrequencies(
          dimension: c.headDimension,
          length: batch.mask[(b * batch.sequence)..<((b + 1) * batch.sequence)].filter { $0 }.count)
      } : [c.rotary.inverseFrequencies(dimension: c.headDimension, length: batch.sequence)]
    return RotaryTables(
      positions: batch.positions, pairs: c.headDimension / 2,
      rowFrequencies: { perSequence.count == 1 ? perSequence[0] : perSequence[$0 / batch.sequence] },
      scale: c.rotary.attentionFactor)
  }

  /// One block (attention, then the gated MLP, each added to the residual stream `x`), its
  /// weights and points named `prefix...`.
  private func decoderBlock(
    _ c: DecoderConfig, _ tape: Tape<T>, _ x: Var, _ batch: TokenBatch, _ rotation: RotaryTables<T>, layer i: Int,
    prefix p: String, _ weight: WeightBinder, _ recorder: inout PointRecorder
  ) -> Var {
    let h = decoderNorm(c, tape, x, p + "input_layernorm.weight", weight)
    /// A projection split in heads: Qwen3 normalises each head (RMSNorm over its features), then rotary.
    func rotated(_ name: String, heads: Int, norm: String) -> Var {
      var y = tape.dense(h, p + "self_attn." + name, bias: c.attentionBias, weight, &recorder)
      if c.queryKeyNorm {
        let rows = tape.value(y).rows
        y = tape.reshaped(
          tape.rmsNorm(
            tape.reshaped(y, rows: rows * heads, columns: c.headDimension), weight: weight(p + "self_attn." + norm),
            epsilon: c.epsilon), rows: rows, columns: heads * c.headDimension)
      }
      return tape.rotary(y, heads: heads, tables: rotation)
    }
    let q = rotated("q_proj", heads: c.headCount, norm: "q_norm.weight")
    var k = rotated("k_proj", heads: c.keyValueHeadCount, norm: "k_norm.weight")
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
      causal: true, keyMask: batch.mask, window: c.windows[i], scale: c.gemma?.attentionScale,
      softcap: c.gemma?.attentionSoftcap)
    var attended = tape.dense(a, p + "self_attn.o_proj", bias: c.outputBias, weight, &recorder)
    // Gemma 2 normalises each sublayer's output too; its MLP input norm is pre_feedforward_layernorm.
    if c.gemma != nil { attended = decoderNorm(c, tape, attended, p + "post_attention_layernorm.weight", weight) }
    var out = tape.add(x, attended)
    let m = decoderNorm(
      c, tape, out, p + (c.gemma != nil ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight"),
      weight)
    let gate = tape.activation(c.activation, tape.dense(m, p + "mlp.gate_proj", bias: c.mlpBias, weight, &recorder))
    let hidden = tape.multiply(gate, tape.dense(m, p + "mlp.up_proj", bias: c.mlpBias, weight, &recorder))
    recorder.record(p + "mlp.hidden", hidden)
    var down = tape.dense(hidden, p + "mlp.down_proj", bias: c.mlpBias, weight, &recorder)
    if c.gemma != nil { down = decoderNorm(c, tape, down, p + "post_feedforward_layernorm.weight", weight) }
    out = tape.add(out, down)
    recorder.record(p + "output", out)
    return out
  }

  /// The final RMSNorm and the head (the embedding table when `tied`), points `prefix...`.
  private func decoderHead(
    _ c: DecoderConfig, _ tape: Tape<T>, _ x: Var, prefix: String, tied: Bool, _ weight: WeightBinder,
    _ recorder: inout PointRecorder
  ) -> Var {
    let normalized = decoderNorm(c, tape, x, prefix + "model.norm.weight", weight)
    recorder.record(prefix + "model.norm.output", normalized)
    var logits = tape.linear(normalized, weight: weight(tied ? "model.embed_tokens.weight" : prefix + "lm_head.weight"))
    if let cap = c.gemma?.logitSoftcap { logits = tape.scale(tape.tanh(tape.scale(logits, T(1 / cap))), T(cap)) }
    recorder.record(prefix + "lm_head.output", logits)
    return logits
  }

  /// RMSNorm with weight `name`: times `1 + weight` for Gemma 2, times `weight` for the others.
  private func decoderNorm(_ c: DecoderConfig, _ tape: Tape<T>, _ x: Var, _ name: String, _ weight: WeightBinder)
    -> Var
  {
    guard c.gemma != nil else { return tape.rmsNorm(x, weight: weight(name), epsilon: c.epsilon) }
    let gain = tape.add(
      weight(name),
      tape.constant(Matrix(rows: 1, columns: c.hiddenSize, values: [T](repeating: 1, count: c.hiddenSize))))
    return tape.rmsNorm(x, weight: gain, epsilon: c.epsilon)
  }
}
