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

  /// Writes a model folder: safetensors weights in `dtype`, config.json and generation_config.json.
  public static func writeModel(
    _ weights: [(name: String, tensor: Tensor)], architecture: Architecture, dtype: DType = .bf16, to folder: String,
    overwrite: Bool = false
  ) throws {
    let files = [
      "config.json": architecture.configJSON,
      "generation_config.json": "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n",
    ]
    try ModelFolder.write(weights, files: files, dtype: dtype, to: folder, overwrite: overwrite)
  }

  /// Writes `base`, `finetune-a` and `finetune-b` under `folder`; returns their paths.
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
    return try models.map { name, weights in
      let path = "\(folder)/\(name)"
      try writeModel(weights, architecture: architecture, to: path, overwrite: overwrite)
      return path
    }
  }
}
