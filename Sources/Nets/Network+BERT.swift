/// BERT encoders: word + position + token-type embeddings and LayerNorm, post-LayerNorm blocks
/// with bidirectional attention over the unpadded tokens, then mean pooling over the tokens
/// (sentence embeddings, as sentence-transformers does), or with a classification head
/// (`BertForSequenceClassification`) `classifier(tanh(pooler.dense(h_first)))`, the logits
/// from the first token's last hidden state. Points per layer `encoder.layer.{i}.`: every dense
/// layer's `.input`/`.output`, `attention.self.keys`, `attention.self.values`,
/// `intermediate.hidden`, `output`; and `last_hidden_state` (and `pooler.dense.output`,
/// `classifier.output` with a head).
extension Network {
  static func bertShapes(_ c: BERTConfig, prefix: String) -> [(name: String, shape: [Int])] {
    let (h, p) = (c.hiddenSize, prefix)
    var shapes: [(String, [Int])] = [
      (p + "embeddings.word_embeddings.weight", [c.vocabularySize, h]),
      (p + "embeddings.position_embeddings.weight", [c.maxPositions, h]),
      (p + "embeddings.token_type_embeddings.weight", [c.typeVocabularySize, h]),
      (p + "embeddings.LayerNorm.weight", [h]),
      (p + "embeddings.LayerNorm.bias", [h]),
    ]
    for i in 0..<c.layerCount {
      let l = p + "encoder.layer.\(i)."
      for (name, out, input) in [
        ("attention.self.query", h, h), ("attention.self.key", h, h), ("attention.self.value", h, h),
        ("attention.output.dense", h, h),
        ("intermediate.dense", c.intermediateSize, h), ("output.dense", h, c.intermediateSize),
      ] {
        shapes += [(l + name + ".weight", [out, input]), (l + name + ".bias", [out])]
      }
      for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
        shapes += [(l + norm + ".weight", [h]), (l + norm + ".bias", [h])]
      }
    }
    if let labels = c.classifierLabels {
      shapes += [
        (p + "pooler.dense.weight", [h, h]), (p + "pooler.dense.bias", [h]), ("classifier.weight", [labels, h]),
        ("classifier.bias", [labels]),
      ]
    }
    return shapes
  }

  @_specialize(where T == Float)
  func bertForward(
    _ c: BERTConfig, _ tape: Tape<T>, _ batch: TokenBatch, _ weight: WeightBinder, _ recorder: inout PointRecorder
  ) -> Var {
    let p = prefix
    let words = tape.embedding(batch.ids, table: weight(p + "embeddings.word_embeddings.weight"))
    let positions = tape.embedding(batch.positions, table: weight(p + "embeddings.position_embeddings.weight"))
    let types = tape.embedding(
      [Int](repeating: 0, count: batch.ids.count), table: weight(p + "embeddings.token_type_embeddings.weight"))
    var x = tape.layerNorm(
      tape.add(tape.add(words, positions), types), gamma: weight(p + "embeddings.LayerNorm.weight"),
      beta: weight(p + "embeddings.LayerNorm.bias"),
      epsilon: c.epsilon)
    recorder.record("embeddings.output", x)
    for i in 0..<c.layerCount {
      let l = p + "encoder.layer.\(i)."
      let q = tape.dense(x, l + "attention.self.query", bias: true, weight, &recorder)
      let k = tape.dense(x, l + "attention.self.key", bias: true, weight, &recorder)
      let v = tape.dense(x, l + "attention.self.value", bias: true, weight, &recorder)
      recorder.record(l + "attention.self.keys", k)
      recorder.record(l + "attention.self.values", v)
      let a = tape.attention(
        query: q, key: k, value: v, sequence: batch.sequence, heads: c.headCount, kvHeads: c.headCount,
        causal: c.causal,
        keyMask: batch.mask)
      let attended = tape.add(tape.dense(a, l + "attention.output.dense", bias: true, weight, &recorder), x)
      x = tape.layerNorm(
        attended, gamma: weight(l + "attention.output.LayerNorm.weight"),
        beta: weight(l + "attention.output.LayerNorm.bias"), epsilon: c.epsilon)
      let hidden = tape.activation(c.activation, tape.dense(x, l + "intermediate.dense", bias: true, weight, &recorder))
      recorder.record(l + "intermediate.hidden", hidden)
      let out = tape.add(tape.dense(hidden, l + "output.dense", bias: true, weight, &recorder), x)
      x = tape.layerNorm(
        out, gamma: weight(l + "output.LayerNorm.weight"), beta: weight(l + "output.LayerNorm.bias"), epsilon: c.epsilon
      )
      recorder.record(l + "output", x)
    }
    recorder.record("last_hidden_state", x)
    guard c.classifierLabels != nil else { return tape.meanPool(x, sequence: batch.sequence, mask: batch.mask) }
    let first = tape.rows(x, Array(stride(from: 0, to: batch.ids.count, by: batch.sequence)))
    let pooled = tape.tanh(tape.dense(first, p + "pooler.dense", bias: true, weight, &recorder))
    return tape.dense(pooled, "classifier", bias: true, weight, &recorder)
  }
}
