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
}
