import Foundation
import Tensor

/// Small but real-shaped example models, so that every command can be tried with nothing
/// downloaded: a Llama-style base (Hugging Face tensor names and config.json) and fine-tunes
/// derived from it by a low-rank change plus a sparse change to every weight matrix.
public enum ExampleModels {
  /// The architecture of the examples (a tiny `LlamaForCausalLM` with grouped-query attention).
  public struct Architecture: Sendable {
    public var vocabularySize = 2048
    public var hiddenSize = 256
    public var intermediateSize = 688
    public var layerCount = 4
    public var headCount = 8
    public var keyValueHeadCount = 4
    public init() {}

    var headDimension: Int { hiddenSize / headCount }

    /// Tensor names and shapes in the order Hugging Face writes them.
    public var tensors: [(name: String, shape: [Int])] {
      let h = hiddenSize
      let kv = keyValueHeadCount * headDimension
      var list: [(String, [Int])] = [("model.embed_tokens.weight", [vocabularySize, h])]
      for i in 0..<layerCount {
        let p = "model.layers.\(i)."
        list += [
          (p + "input_layernorm.weight", [h]),
          (p + "self_attn.q_proj.weight", [h, h]),
          (p + "self_attn.k_proj.weight", [kv, h]),
          (p + "self_attn.v_proj.weight", [kv, h]),
          (p + "self_attn.o_proj.weight", [h, h]),
          (p + "post_attention_layernorm.weight", [h]),
          (p + "mlp.gate_proj.weight", [intermediateSize, h]),
          (p + "mlp.up_proj.weight", [intermediateSize, h]),
          (p + "mlp.down_proj.weight", [h, intermediateSize]),
        ]
      }
      list += [("model.norm.weight", [h]), ("lm_head.weight", [vocabularySize, h])]
      return list
    }

    /// A Hugging Face `config.json` for this architecture.
    public var configJSON: String {
      """
      {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": \(vocabularySize),
        "hidden_size": \(hiddenSize),
        "intermediate_size": \(intermediateSize),
        "num_hidden_layers": \(layerCount),
        "num_attention_heads": \(headCount),
        "num_key_value_heads": \(keyValueHeadCount),
        "head_dim": \(headDimension),
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2
      }

      """
    }
  }

  /// Base weights: matrices ~ N(0, 0.02^2) (Llama's initialiser), norms 1. Deterministic in `seed`.
  public static func baseWeights(_ arch: Architecture, seed: UInt64 = 0) -> [(name: String, tensor: Tensor)] {
    arch.tensors.map { name, shape in
      if shape.count == 1 { return (name, Tensor(shape: shape, scalars: [Float](repeating: 1, count: shape[0]))) }
      return (name, CounterRNG(seed: seed, stream: name).normalTensor(shape, scale: 0.02))
    }
  }

  /// A fine-tune of `base`: every matrix moves by a rank-`rank` product with entries of about
  /// `lowRankScale` plus a change of `±sparseScale` at a `sparseFraction` of its entries; norms
  /// move slightly. Different `seed`s give different tasks.
  public static func fineTune(
    _ base: [(name: String, tensor: Tensor)], seed: UInt64, rank: Int = 4, lowRankScale: Float = 0.001,
    sparseFraction: Float = 0.01, sparseScale: Float = 0.005
  ) -> [(name: String, tensor: Tensor)] {
    base.map { name, tensor in
      var out = tensor
      if tensor.shape.count == 1 {
        let rng = CounterRNG(seed: seed, stream: name + "#norm")
        for i in 0..<out.count { out.scalars[i] += 0.01 * rng.normal(UInt64(i)) }
        return (name, out)
      }
      let (rows, columns) = (tensor.shape[0], tensor.shape[1])
      let left = CounterRNG(seed: seed, stream: name + "#left").normalTensor([rows, rank])
      let right = CounterRNG(seed: seed, stream: name + "#right").normalTensor(
        [rank, columns], scale: lowRankScale / Float(rank).squareRoot())
      let lowRank = BLAS.matmul(left, right)
      let sparse = CounterRNG(seed: seed, stream: name + "#sparse")
      for i in 0..<out.count {
        out.scalars[i] += lowRank.scalars[i]
        if sparse.uniform(UInt64(2 * i)) < sparseFraction {
          out.scalars[i] += sparse.uniform(UInt64(2 * i + 1)) < 0.5 ? -sparseScale : sparseScale
        }
      }
      return (name, out)
    }
  }

  /// Writes a model folder: safetensors weights in `dtype`, config.json, generation_config.json
  /// and a tokenizer (`tokenizer.json`, `tokenizer_config.json`) for the architecture's vocabulary:
  /// `<unk>`, `<s>`, `</s>`, words `w3` ..., then `addedTokens` as special tokens.
  public static func writeModel(
    _ weights: [(name: String, tensor: Tensor)], architecture: Architecture, dtype: DType = .bf16, to folder: String,
    overwrite: Bool = false, addedTokens: [String] = [], chatTemplate: String? = nil
  ) throws {
    var files = [
      "config.json": architecture.configJSON,
      "generation_config.json": "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n",
    ]
    files.merge(
      tokenizerFiles(vocabularySize: architecture.vocabularySize, addedTokens: addedTokens, chatTemplate: chatTemplate)
    ) { $1 }
    try ModelFolder.write(weights, files: files, dtype: dtype, to: folder, overwrite: overwrite)
  }

  /// A word-level Hugging Face tokenizer of `vocabularySize` tokens, the last `addedTokens` of
  /// them special added tokens (split on whitespace; unknown words map to `<unk>`).
  public static func tokenizerFiles(vocabularySize: Int, addedTokens: [String], chatTemplate: String?)
    -> [String: String]
  {
    let special = ["<unk>", "<s>", "</s>"]
    let plainCount = vocabularySize - addedTokens.count
    let words = (0..<plainCount).map { $0 < special.count ? special[$0] : "w\($0)" }
    let vocabulary = words.enumerated().map { "\"\($1)\": \($0)" }.joined(separator: ", ")
    let added = (special + addedTokens).enumerated().map { i, token in
      let id = i < special.count ? i : plainCount + i - special.count
      return
        "{\"id\": \(id), \"content\": \"\(token)\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, "
        + "\"normalized\": false, \"special\": true}"
    }
    let tokenizer = """
      {
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [\(added.joined(separator: ", "))],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {\(vocabulary)}, "unk_token": "<unk>"}
      }

      """
    var config = """
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512
      """
    if let chatTemplate {
      let quoted = chatTemplate.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(
        of: "\"", with: "\\\""
      )
      .replacingOccurrences(of: "\n", with: "\\n")
      config += ",\n  \"chat_template\": \"\(quoted)\""
    }
    if !addedTokens.isEmpty {
      config += ",\n  \"extra_special_tokens\": [\(addedTokens.map { "\"\($0)\"" }.joined(separator: ", "))]"
    }
    return ["tokenizer.json": tokenizer, "tokenizer_config.json": config + "\n}\n"]
  }

  /// The ChatML template of the chat fine-tune.
  static let chatMLTemplate =
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    + "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

  /// A chat fine-tune of `base` whose vocabulary gained `<|im_start|>` and `<|im_end|>`: two
  /// more embedding and LM-head rows (new rows ~ N(0, 0.02^2)), as `resize_token_embeddings`
  /// leaves them before training.
  static func chatFineTune(_ base: [(name: String, tensor: Tensor)], architecture: Architecture, seed: UInt64)
    -> [(name: String, tensor: Tensor)]
  {
    fineTune(base, seed: seed).map { name, tensor in
      guard name == "model.embed_tokens.weight" || name == "lm_head.weight" else { return (name, tensor) }
      let rows = CounterRNG(seed: seed, stream: name + "#new-rows").normalTensor(
        [2, architecture.hiddenSize], scale: 0.02)
      return (
        name, Tensor(shape: [tensor.shape[0] + 2, architecture.hiddenSize], scalars: tensor.scalars + rows.scalars)
      )
    }
  }

  /// Writes `base`, `finetune-a`, `finetune-b` and `finetune-chat` (whose vocabulary gained two
  /// chat tokens) under `folder`; returns their paths.
  @discardableResult
  public static func writeExamples(
    to folder: String, architecture: Architecture = Architecture(), overwrite: Bool = false
  ) throws -> [String] {
    do {
      try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    } catch {
      throw CheckpointError.cannotWrite(file: folder, reason: error.localizedDescription)
    }
    let base = baseWeights(architecture)
    let models = [("base", base), ("finetune-a", fineTune(base, seed: 1)), ("finetune-b", fineTune(base, seed: 2))]
    var paths = try models.map { name, weights in
      let path = "\(folder)/\(name)"
      try writeModel(weights, architecture: architecture, to: path, overwrite: overwrite)
      return path
    }
    var chat = architecture
    chat.vocabularySize += 2
    paths.append("\(folder)/finetune-chat")
    try writeModel(
      chatFineTune(base, architecture: architecture, seed: 3), architecture: chat, to: paths[3], overwrite: overwrite,
      addedTokens: ["<|im_start|>", "<|im_end|>"], chatTemplate: chatMLTemplate)
    return paths
  }
}
