import Foundation
import Tensor
import Testing

@testable import Nets

func config(_ json: String) throws -> NetworkConfig { try NetworkConfig(json: Data(json.utf8)) }

/// Largest |a - b| relative to the largest |b|.
func relativeError(_ a: [Double], _ b: [Double]) -> Double {
  let scale = b.map(abs).max() ?? 1
  return zip(a, b).map { abs($0 - $1) }.max()! / max(scale, 1e-30)
}

@Suite struct NetworkTests {
  let llama = """
    {"architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500.0, "hidden_act": "silu"}
    """
  let bertJSON = """
    {"architectures": ["BertModel"], "vocab_size": 40, "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
     "num_attention_heads": 3, "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    """

  @Test(arguments: [false, true])
  func decoderMatchesTheFloat64Reference(_ variant: Bool) throws {
    // variant: Qwen2 (q/k/v biases) with tied embeddings.
    let json =
      variant
      ? llama.replacingOccurrences(of: "LlamaForCausalLM", with: "Qwen2ForCausalLM").replacingOccurrences(
        of: "\"hidden_act\"", with: "\"tie_word_embeddings\": true, \"hidden_act\"") : llama
    let c = try config(json)
    guard case .decoder(let d) = c else { Issue.record("not a decoder"); return }
    #expect(d.attentionBias == variant && d.tiedEmbeddings == variant)
    let weights = randomWeights(c)
    let network = try Network<Float>(config: c, tensors: weights)
    let sequences = [[3, 17, 42, 8, 0, 49], [5, 9, 33]]
    let tape = Tape<Float>()
    let logits = tape.value(try network.forward(tape, .tokens(TokenBatch(sequences))).output)
    let reference = Reference(weights: weights)
    for (b, ids) in sequences.enumerated() {
      let expected = reference.decoder(d, ids).flatMap { $0 }
      let rows = (0..<ids.count).flatMap { s in (0..<50).map { Double(logits[b * 6 + s, $0]) } }
      #expect(relativeError(rows, expected) < 1e-5)
    }
  }

  /// Also as a decoder (`is_decoder`: causal attention).
  @Test(arguments: [false, true])
  func bertMatchesTheFloat64Reference(_ causal: Bool) throws {
    let c = try config(
      bertJSON.replacingOccurrences(of: "\"hidden_act\"", with: "\"is_decoder\": \(causal), \"hidden_act\""))
    guard case .bert(let bc) = c else { Issue.record("not BERT"); return }
    #expect(bc.causal == causal)
    let weights = randomWeights(c)
    let network = try Network<Float>(config: c, tensors: weights)
    let sequences = [[1, 7, 22, 39, 2], [1, 4, 2]]
    let tape = Tape<Float>()
    let embeddings = tape.value(try network.forward(tape, .tokens(TokenBatch(sequences))).output)
    let reference = Reference(weights: weights)
    for (b, ids) in sequences.enumerated() {
      let expected = reference.bert(bc, ids)
      #expect(relativeError((0..<12).map { Double(embeddings[b, $0]) }, expected) < 1e-5)
    }
  }

  /// `BertForSequenceClassification`: the pooler (tanh of a dense layer on the first token) and
  /// the classifier, against the float64 reference; `num_labels`, else `id2label`, sets the
  /// head's size.
  @Test func bertClassifierMatchesTheFloat64Reference() throws {
    let json = bertJSON.replacingOccurrences(of: "\"BertModel\"", with: "\"BertForSequenceClassification\"")
      .replacingOccurrences(of: "\"hidden_act\"", with: "\"num_labels\": 3, \"hidden_act\"")
    let c = try config(json)
    guard case .bert(let bc) = c else { Issue.record("not BERT"); return }
    #expect(bc.classifierLabels == 3)
    let weights = randomWeights(c)
    let network = try Network<Float>(config: c, tensors: weights)
    let sequences = [[1, 7, 22, 39, 2], [1, 4, 2]]
    let tape = Tape<Float>()
    let logits = tape.value(try network.forward(tape, .tokens(TokenBatch(sequences))).output)
    #expect(logits.rows == 2 && logits.columns == 3)
    let reference = Reference(weights: weights)
    for (b, ids) in sequences.enumerated() {
      #expect(relativeError((0..<3).map { Double(logits[b, $0]) }, reference.bertClassifier(bc, ids)) < 1e-5)
    }
    let labelled = try config(
      bertJSON.replacingOccurrences(of: "\"BertModel\"", with: "\"BertForSequenceClassification\"")
        .replacingOccurrences(
          of: "\"hidden_act\"", with: "\"id2label\": {\"0\": \"no\", \"1\": \"yes\"}, \"hidden_act\""))
    guard case .bert(let two) = labelled else { Issue.record("not BERT"); return }
    #expect(two.classifierLabels == 2)
  }

  @Test func bertCheckpointsWithATaskPrefixLoad() throws {
    let c = try config(bertJSON)
    let prefixed = Dictionary(uniqueKeysWithValues: randomWeights(c).map { ("bert." + $0.key, $0.value) })
    let network = try Network<Float>(config: c, tensors: prefixed)
    let tape = Tape<Float>()
    #expect(tape.value(try network.forward(tape, .tokens(TokenBatch([[1, 2, 3]]))).output).columns == 12)
  }

  @Test func pointsCoverProjectionsKeysAndBlockOutputs() throws {
    let c = try config(llama)
    let network = try Network<Float>(config: c, tensors: randomWeights(c))
    let tape = Tape<Float>()
    let out = try network.forward(tape, .tokens(TokenBatch([[1, 2, 3]])))
    let names = Set(out.points.map(\.name))
    for name in [
      "model.layers.1.self_attn.keys", "model.layers.0.mlp.down_proj.input", "model.layers.1.output",
      "model.layers.0.self_attn.q_proj.output",
    ] {
      #expect(names.contains(name))
    }
    let keys = try out.points(matching: #"self_attn\.keys$"#)
    #expect(keys.count == 2 && tape.value(keys[0].value).columns == 8)  // 2 KV heads x 4
  }

  @Test func badModelsAndInputsAreNamed() throws {
    #expect(throws: NetsError.unknownArchitecture("GPT2LMHeadModel")) {
      try config(#"{"architectures": ["GPT2LMHeadModel"]}"#)
    }
    #expect(throws: NetsError.missingConfigKey("hidden_size")) {
      try config(#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 4}"#)
    }
    let c = try config(llama)
    var weights = randomWeights(c)
    weights["model.layers.1.mlp.up_proj.weight"] = nil
    #expect(throws: NetsError.missingTensors(["model.layers.1.mlp.up_proj.weight"])) {
      try Network<Float>(config: c, tensors: weights)
    }
    weights = randomWeights(c)
    weights["model.norm.weight"] = Tensor(zeros: [15])
    #expect(throws: NetsError.shapeMismatch(tensor: "model.norm.weight", expected: [16], found: [15])) {
      try Network<Float>(config: c, tensors: weights)
    }
    let network = try Network<Float>(config: c, tensors: randomWeights(c))
    #expect(throws: NetsError.self) { try network.forward(Tape<Float>(), .tokens(TokenBatch([[1, 50]]))) }
    #expect(throws: NetsError.self) { try network.forward(Tape<Float>(), .features(Matrix(zeros: 2, 16))) }
  }

  @Test func closedFormValues() {
    let tape = Tape<Double>()
    let x = tape.constant(Matrix(rows: 1, columns: 3, values: [1, -1, 0]))
    let gelu = tape.value(tape.gelu(x)).values
    #expect(
      abs(gelu[0] - 0.841_344_746_068_543) < 1e-12 && abs(gelu[1] + 0.158_655_253_931_457) < 1e-12 && gelu[2] == 0)
    #expect(abs(tape.value(tape.silu(x)).values[0] - 0.731_058_578_630_005) < 1e-12)
    let uniform = tape.constant(Matrix(zeros: 2, 5))
    #expect(abs(tape.value(tape.crossEntropy(uniform, labels: [1, 4])).values[0] - log(5)) < 1e-12)
    #expect(abs(tape.value(tape.entropy(uniform)).values[0] - log(5)) < 1e-12)
    // Rotary at position 0 is the identity and keeps norms at any position.
    let r = randomMatrix(3, 8, "rot")
    let rotated = tape.value(tape.rotary(tape.constant(r), positions: [0, 5, 11], heads: 2, theta: 10_000))
    #expect(rotated.values[0..<8] == r.values[0..<8])
    for row in 1..<3 {
      let norm = { (m: Matrix<Double>) in (0..<8).reduce(0.0) { $0 + m[row, $1] * m[row, $1] } }
      #expect(abs(norm(rotated) - norm(r)) < 1e-12)
    }
  }
}
