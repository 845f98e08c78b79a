import Foundation
import Testing

@testable import Nets

/// config.json comes from strangers: every size is bounded, every number in range, and the
/// layers it declares are checked against the checkpoint before anything is built from it.
@Suite struct NetworkConfigTests {
  static let llama: [String: Any] = [
    "architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
  ]

  static func config(_ changes: [String: Any]) throws -> NetworkConfig {
    try NetworkConfig(json: JSONSerialization.data(withJSONObject: llama.merging(changes) { $1 }))
  }

  @Test(arguments: [
    ("num_hidden_layers", 1e9 as Double), ("hidden_size", -8), ("vocab_size", 0.5), ("intermediate_size", 1e300),
    ("rms_norm_eps", -1), ("rope_theta", 0),
  ])
  func outOfRangeValuesNameTheirKey(_ key: String, _ value: Double) {
    #expect {
      try Self.config([key: value])
    } throws: { error in
      guard case NetsError.invalidConfig(let named, _) = error else { return false }
      return named == key
    }
  }

  @Test func declaredLayersMustExistInTheCheckpoint() throws {
    let config = try Self.config([:])
    let names = Network<Float>.expectedShapes(config).map(\.name)
    try config.checkLayers(against: names)
    let oneLayer = names.filter { !$0.hasPrefix("model.layers.1.") }
    #expect(throws: NetsError.self) { try config.checkLayers(against: oneLayer) }
    let huge = try Self.config(["num_hidden_layers": 60_000_000])
    #expect {
      try huge.checkLayers(against: names)
    } throws: { error in
      "\(error)".contains("declares 60000000 layers but the checkpoint holds tensors for 2 of them (none for number 2)")
    }
    let heads = try NetworkConfig(
      json: Data(#"{"architectures": ["MLP"], "layer_sizes": [4, 8, 3], "heads": 1000000, "shared_layers": 1}"#.utf8))
    #expect(throws: NetsError.self) { try heads.checkLayers(against: ["layers.0.weight", "heads.0.layers.1.weight"]) }
  }

  /// A partially zipped decoder (a trunk of `shared_layers`, `tails` tails) is checked the same
  /// way: its trunk, its tails and the layers of a tail; more shared layers than layers is refused.
  @Test func tailsOfAPartiallyZippedDecoderMustExist() throws {
    let config = try Self.config(["tails": 2, "shared_layers": 1])
    let names = Network<Float>.expectedShapes(config).map(\.name)
    #expect(
      names.contains("tails.1.model.layers.1.self_attn.o_proj.weight") && names.contains("tails.0.lm_head.weight"))
    #expect(!names.contains("model.layers.1.self_attn.o_proj.weight") && !names.contains("lm_head.weight"))
    try config.checkLayers(against: names)
    for (claim, message) in [
      (["tails": 3_000_000], "declares 3000000 tails but the checkpoint holds tensors for 2 of them"),
      (["num_hidden_layers": 50_000_000], "declares 49999999 layers of tail 0 but the checkpoint holds tensors for 1"),
    ] as [([String: Any], String)] {
      let wrong = try Self.config(["tails": 2, "shared_layers": 1].merging(claim) { $1 })
      #expect { try wrong.checkLayers(against: names) } throws: { "\($0)".contains(message) }
    }
    #expect { try Self.config(["tails": 2, "shared_layers": 3]) } throws: { error in
      guard case NetsError.invalidConfig(let key, _) = error else { return false }
      return key == "shared_layers"
    }
  }

  /// Rotary and attention keys transformers reads but this runtime does not implement are
  /// refused, naming the key (with the object it sits in) and the value.
  @Test(
    arguments: [
      (["rope_parameters": ["rope_type": "longrope", "factor": 2.0]], "rope_parameters.rope_type", "longrope"),
      (["rope_scaling": ["type": "su", "factor": 2.0]], "rope_scaling.type", "su"),
      (["rope_parameters": ["rope_type": "linear"]], "rope_parameters.factor", ""),
      (
        ["rope_parameters": ["rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0]],
        "rope_parameters.high_freq_factor", ""
      ),
      (
        ["rope_parameters": ["full_attention": ["rope_type": "default"]]], "rope_parameters.full_attention",
        "layer type"
      ),
      (
        ["rope_parameters": ["rope_type": "linear", "factor": 2.0], "partial_rotary_factor": 0.5],
        "partial_rotary_factor", "0.5"
      ),
      (["attention_bias": "yes"], "attention_bias", "yes"),
      (["tie_word_embeddings": 1], "tie_word_embeddings", "1"),
    ] as [([String: Any], String, String)])
  func unsupportedKeysAreRefusedByName(_ changes: [String: Any], _ key: String, _ detail: String) {
    #expect {
      try Self.config(changes)
    } throws: { error in
      switch error as? NetsError {
      case .invalidConfig(let named, let reason): return named == key && reason.contains(detail)
      case .missingConfigKey(let named): return named == key
      default: return false
      }
    }
  }

  /// Which biases, norms and windows each family has, as transformers builds it: Mistral
  /// ignores `attention_bias`; Qwen2 always has q/k/v biases and never an o bias; Qwen3 has
  /// query/key norms and a 128 head size by default; Qwen's windows need `use_sliding_window`.
  @Test func familiesReadTheirOwnKeys() throws {
    func decoder(_ architecture: String, _ changes: [String: Any]) throws -> DecoderConfig {
      guard case .decoder(let c) = try Self.config(changes.merging(["architectures": [architecture]]) { $1 }) else {
        throw NetsError.missingConfigKey("architectures")
      }
      return c
    }
    let mistral = try decoder("MistralForCausalLM", ["attention_bias": true, "mlp_bias": true, "sliding_window": 5])
    #expect(!mistral.attentionBias && !mistral.outputBias && !mistral.mlpBias && mistral.windows == [5, 5])
    #expect(try decoder("MistralForCausalLM", ["sliding_window": NSNull()]).windows == [nil, nil])
    let qwen2 = try decoder("Qwen2ForCausalLM", ["attention_bias": false, "sliding_window": 5, "max_window_layers": 1])
    #expect(qwen2.attentionBias && !qwen2.outputBias && qwen2.windows == [nil, nil])
    let windowed = try decoder(
      "Qwen2ForCausalLM", ["use_sliding_window": true, "sliding_window": 5, "max_window_layers": 1])
    #expect(windowed.windows == [nil, 5])
    let qwen3 = try decoder("Qwen3ForCausalLM", [:])
    #expect(qwen3.queryKeyNorm && qwen3.headDimension == 128 && !qwen3.attentionBias)
    #expect(
      Network<Float>.expectedShapes(.decoder(qwen3)).contains { $0.name == "model.layers.1.self_attn.k_norm.weight" })
    let llama = try decoder("LlamaForCausalLM", ["attention_bias": true, "mlp_bias": true, "sliding_window": 5])
    #expect(llama.outputBias && llama.mlpBias && llama.windows == [nil, nil])
    #expect(throws: NetsError.self) {
      try decoder("Qwen2ForCausalLM", ["use_sliding_window": true, "layer_types": ["full_attention"]])
    }
    let gemma = try decoder("Gemma2ForCausalLM", ["final_logit_softcapping": NSNull()])
    #expect(gemma.tiedEmbeddings && gemma.headDimension == 256 && gemma.windows == [4096, nil])
    #expect(gemma.gemma?.logitSoftcap == nil && gemma.gemma?.attentionSoftcap == 50 && gemma.activation == .geluTanh)
    #expect(throws: NetsError.self) { try decoder("Gemma2ForCausalLM", ["use_bidirectional_attention": true]) }
    #expect(throws: NetsError.unknownArchitecture("Gemma3ForCausalLM")) { try decoder("Gemma3ForCausalLM", [:]) }
    // BERT: relative position scores (transformers 4) are refused.
    #expect {
      try NetworkConfig(
        json: JSONSerialization.data(withJSONObject: [
          "architectures": ["BertModel"], "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "position_embedding_type": "relative_key",
        ]))
    } throws: { "\($0)".contains("position_embedding_type") }
    // transformers 5 keeps the base in rope_parameters; 4 at the top level; rope_scaling wins.
    #expect(try decoder("LlamaForCausalLM", ["rope_parameters": ["rope_theta": 7.0e5]]).rotary.theta == 7.0e5)
    #expect(try decoder("LlamaForCausalLM", ["rope_theta": 300.0]).rotary.theta == 300)
    let both = try decoder(
      "LlamaForCausalLM",
      [
        "rope_scaling": ["type": "linear", "factor": 4.0], "rope_parameters": ["rope_type": "default"],
        "rope_theta": 9.0,
      ])
    #expect(both.rotary.kind == .linear && both.rotary.factor == 4 && both.rotary.theta == 9)
  }
}
