import Foundation

/// Llama-style decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 2), read the way transformers reads
/// their config.json: sizes, RMSNorm epsilon, rotary embedding (`Rotary`), grouped heads, biases,
/// Qwen3's per-head query/key norms, sliding-window attention per layer, tied head, and Gemma 2's
/// differences (`Gemma`). Every key
/// transformers reads for the forward is either applied here or refused with its name and value
/// (the table in docs/nets.md).
public struct DecoderConfig: Equatable, Sendable {
  /// The architecture, which decides the defaults and which keys count.
  public enum Family: String, Sendable, CaseIterable {
    case llama, mistral, qwen2, qwen3, gemma2

    /// The family of an `architectures[0]` or `model_type` value (any case), nil for others.
    public init?(architecture: String) {
      switch architecture.lowercased() {
      case "llamaforcausallm", "llama": self = .llama
      case "mistralforcausallm", "mistral": self = .mistral
      case "qwen2forcausallm", "qwen2": self = .qwen2
      case "qwen3forcausallm", "qwen3": self = .qwen3
      case "gemma2forcausallm", "gemma2": self = .gemma2
      default: return nil
      }
    }
  }

  public var family: Family
  public var vocabularySize, hiddenSize, intermediateSize, layerCount, headCount, keyValueHeadCount, headDimension: Int
  public var epsilon: Double
  public var rotary: Rotary
  public var tiedEmbeddings: Bool
  /// Biases on q_proj, k_proj and v_proj (always for Qwen2; `attention_bias` for Llama and Qwen3).
  public var attentionBias: Bool
  /// A bias on o_proj (`attention_bias` for Llama and Qwen3).
  public var outputBias: Bool
  /// Biases on gate_proj, up_proj and down_proj (`mlp_bias`, Llama).
  public var mlpBias: Bool
  /// RMSNorm of every query and key head before rotary (`q_norm`, `k_norm`: Qwen3).
  public var queryKeyNorm: Bool
  /// Per layer, how many keys a query sees (itself and the ones before it) under sliding-window
  /// attention; nil: all earlier keys.
  public var windows: [Int?]
  public var activation: Activation
  /// Gemma 2's differences from Llama; nil for the other families.
  public var gemma: Gemma?
  /// Tails of a partially zipped decoder (config key `tails`, written by `zip --stop-at`): each
  /// runs its own copy of the layers after the shared trunk, with its own norm and head. 1 for
  /// a plain decoder.
  public var tails: Int
  /// Layers of the shared trunk (`shared_layers`, 1...layers); all of them with one tail.
  public var sharedLayers: Int

  /// Where tail `t`'s tensor names start.
  public static func tailPrefix(_ t: Int) -> String { "tails.\(t)." }

  /// The rotary base, kept for callers that only need the default rotary embedding.
  public var ropeTheta: Double { rotary.theta }

  /// What Gemma 2 does differently: every RMSNorm multiplies by `1 + weight`; the attention and
  /// MLP outputs are normalised again before they join the residual stream
  /// (`post_attention_layernorm`, `post_feedforward_layernorm`; the MLP's input norm is
  /// `pre_feedforward_layernorm`); the embeddings are scaled by `sqrt(hidden_size)`; scores use
  /// `query_pre_attn_scalar^-0.5`; scores and logits may be soft-capped (`c tanh(x / c)`).
  public struct Gemma: Equatable, Sendable {
    public var embeddingScale: Double
    public var attentionScale: Double
    public var attentionSoftcap: Double?
    public var logitSoftcap: Double?
  }

  init(_ keys: ConfigKeys, family: Family) throws {
    self.family = family
    vocabularySize = try keys.int("vocab_size")
    hiddenSize = try keys.int("hidden_size")
    intermediateSize = try keys.int("intermediate_size")
    layerCount = try keys.int("num_hidden_layers")
    headCount = try keys.int("num_attention_heads")
    // transformers' defaults when the key is absent (null means "as many as the query heads").
    let kvDefault = [.mistral: 8, .qwen2: 32, .qwen3: 32, .gemma2: 4][family] ?? headCount
    keyValueHeadCount =
      keys.values["num_key_value_heads"] is NSNull
      ? headCount
      : try keys.int(
        "num_key_value_heads", default: kvDefault)
    let derivedHeadDimension = hiddenSize / headCount
    headDimension =
      try keys.optionalInt("head_dim")
      ?? (keys.values["head_dim"] == nil
        ? [.qwen3: 128, .gemma2: 256][family] ?? derivedHeadDimension : derivedHeadDimension)
    epsilon = try keys.double("rms_norm_eps", default: 1e-6)
    tiedEmbeddings = try keys.flag("tie_word_embeddings", default: family == .gemma2)
    let attentionBiasKey = try keys.flag("attention_bias", default: false)
    switch family {
    case .llama:
      (attentionBias, outputBias, mlpBias) = (
        attentionBiasKey, attentionBiasKey, try keys.flag("mlp_bias", default: false)
      )
    case .mistral: (attentionBias, outputBias, mlpBias) = (false, false, false)
    case .qwen2: (attentionBias, outputBias, mlpBias) = (true, false, false)
    case .qwen3, .gemma2: (attentionBias, outputBias, mlpBias) = (attentionBiasKey, attentionBiasKey, false)
    }
    queryKeyNorm = family == .qwen3
    // Gemma 2 reads `hidden_activation`; its configs also carry an unused `hidden_act`.
    activation =
      family == .gemma2
      ? try keys.activation("hidden_activation", default: "gelu_pytorch_tanh")
      : try keys.activation("hidden_act", default: "silu")
    let maxPositions = try keys.int(
      "max_position_embeddings", default: [.llama: 2048, .mistral: 131_072, .gemma2: 8192][family] ?? 32768)
    rotary = try Rotary(keys, maxPositions: maxPositions)
    windows = try Self.windows(keys, family: family, layers: layerCount)
    if family == .gemma2 {
      if try keys.flag("use_bidirectional_attention", default: false) {
        throw NetsError.invalidConfig(
          key: "use_bidirectional_attention", reason: "true (an encoder-style Gemma) is not supported")
      }
      let softcap = { (key: String, value: Double) throws -> Double? in
        keys.values[key] == nil ? value : try keys.optionalDouble(key, exclusive: true)
      }
      gemma = Gemma(
        embeddingScale: Double(hiddenSize).squareRoot(),
        attentionScale: 1 / Double(try keys.int("query_pre_attn_scalar", default: 256)).squareRoot(),
        attentionSoftcap: try softcap("attn_logit_softcapping", 50),
        logitSoftcap: try softcap("final_logit_softcapping", 30))
    }
    tails = try keys.int("tails", default: 1)
    sharedLayers = tails == 1 ? layerCount : try keys.int("shared_layers")
    guard sharedLayers <= layerCount else {
      throw NetsError.invalidConfig(
        key: "shared_layers", reason: "\(sharedLayers) is more than num_hidden_layers \(layerCount)")
    }
    guard headCount % keyValueHeadCount == 0 else {
      throw NetsError.invalidConfig(
        key: "num_key_value_heads", reason: "\(keyValueHeadCount) does not divide num_attention_heads \(headCount)")
    }
    guard headDimension % 2 == 0 else {
      throw NetsError.invalidConfig(key: "head_dim", reason: "rotary embeddings need an even head size")
    }
    try Self.refuseUnsupported(keys, family: family)
  }

  /// The window of every layer, as transformers decides it: Mistral applies `sliding_window`
  /// (when not null) to every layer; Qwen2 and Qwen3 only with `use_sliding_window`, to the
  /// layers `layer_types` marks `sliding_attention` (by default those from `max_window_layers`
  /// on); Llama has none.
  static func windows(_ keys: ConfigKeys, family: Family, layers: Int) throws -> [Int?] {
    switch family {
    case .llama:
      return Array(repeating: nil, count: layers)
    case .mistral:
      let window = keys.values["sliding_window"] == nil ? 4096 : try keys.optionalInt("sliding_window")
      return Array(repeating: window, count: layers)
    case .gemma2:
      // Every other layer slides, from the first, unless `layer_types` says otherwise.
      let window = keys.values["sliding_window"] == nil ? 4096 : try keys.optionalInt("sliding_window")
      guard keys.present("layer_types") != nil else { return (0..<layers).map { $0 % 2 == 0 ? window : nil } }
      return try layerTypes(keys, layers: layers, window: window)
    case .qwen2, .qwen3:
      let window =
        try keys.flag("use_sliding_window", default: false)
        ? (keys.values["sliding_window"] == nil ? 4096 : try keys.optionalInt("sliding_window")) : nil
      guard keys.present("layer_types") != nil else {
        let first = try keys.optionalInt("max_window_layers") ?? 28
        return (0..<layers).map { window != nil && $0 >= first ? window : nil }
      }
      return try layerTypes(keys, layers: layers, window: window)
    }
  }

  /// `layer_types`: one `full_attention` or `sliding_attention` per layer.
  static func layerTypes(_ keys: ConfigKeys, layers: Int, window: Int?) throws -> [Int?] {
    let types = keys.present("layer_types") ?? []
    guard let names = types as? [String], names.count == layers,
      names.allSatisfy({ $0 == "full_attention" || $0 == "sliding_attention" })
    else {
      throw NetsError.invalidConfig(
        key: "layer_types",
        reason: "expected \(layers) entries of \"full_attention\" or \"sliding_attention\", found \(types)")
    }
    return names.map { $0 == "sliding_attention" ? window : nil }
  }

  /// Keys that transformers reads for these architectures and that this runtime does not
  /// implement, when set to a value that changes the outputs.
  static func refuseUnsupported(_ keys: ConfigKeys, family: Family) throws {
    if let value = keys.present("quantization_config") {
      throw NetsError.invalidConfig(
        key: "quantization_config", reason: "quantized checkpoints are not supported (found \(value))")
    }
  }
}
