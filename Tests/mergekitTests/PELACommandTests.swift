import Checkpoint
import Foundation
import Nets
import Tensor
import Testing

@testable import TestSupport

/// A random BERT encoder folder (2 layers, hidden 32, 4 heads, vocabulary 40, f32).
func writeRandomBERT(to path: String) throws {
  let json = """
    {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 40, "hidden_size": 32,
     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
     "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    """
  let config = try NetworkConfig(json: Data(json.utf8))
  let weights = Network<Float>.expectedShapes(config).map { name, shape -> (name: String, tensor: Tensor) in
    let rng = CounterRNG(seed: 5, stream: name)
    let gain: Float = name.hasSuffix("LayerNorm.weight") ? 1 : 0
    return (name, Tensor(shape: shape, scalars: (0..<shape.reduce(1, *)).map { gain + 0.15 * rng.normal(UInt64($0)) }))
  }
  try ModelFolder.write(weights, files: ["config.json": json], dtype: .f32, to: path, overwrite: false)
}

@Suite(.serialized) struct PELACommandTests {
  func evaluation(_ model: String, _ data: String) throws -> [String: Any] {
    let result = try CLI.run("eval", model, "--data", data, "--json")
    #expect(result.status == 0, "\(result.stderr)")
    return try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
  }

  /// An MLP factored two ways: the factored model (run by eval at low rank) and the dense
  /// `W = B A` model give the same results; distillation writes a runnable factored model.
  @Test func factoredAndDenseOutputsAgreeAndDistillationRuns() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = folder.file("d.safetensors")
    #expect(try CLI.run("synthetic-data", "-o", data, "--features", "32", "--samples-per-class", "40").status == 0)
    #expect(
      try CLI.run("train", "--data", data, "--hidden", "48,48", "--epochs", "5", "-o", folder.file("mlp"), "-q").status
        == 0)
    let factored = try CLI.run("pela", folder.file("mlp"), "--keep", "0.5", "-o", folder.file("f"), "-q")
    #expect(factored.status == 0, "\(factored.stderr)")
    #expect(
      factored.stdout.contains("layers.0  48x32 -> rank 9") && factored.stdout.contains("layers.1  48x48 -> rank 12"),
      "\(factored.stdout)")
    #expect(
      try CLI.run("pela", folder.file("mlp"), "--keep", "0.5", "--format", "dense", "-o", folder.file("d"), "-q").status
        == 0)
    let f = try openCheckpoint(folder.file("f"))
    #expect(
      Set(f.tensors.map(\.name)) == [
        "layers.0.0.weight", "layers.0.1.weight", "layers.0.1.bias", "layers.1.0.weight", "layers.1.1.weight",
        "layers.1.1.bias", "layers.2.weight", "layers.2.bias",
      ])
    let (a, b) = (try evaluation(folder.file("f"), data), try evaluation(folder.file("d"), data))
    #expect(
      abs((a["loss"] as! Double) - (b["loss"] as! Double)) < 1e-5
        && (a["accuracy"] as! Double) == (b["accuracy"] as! Double))

    let distilled = try CLI.run(
      "pela", folder.file("mlp"), "--keep", "0.5", "--distill", "--data", data, "--epochs", "2", "-o", folder.file("s"),
      "-q")
    #expect(
      distilled.status == 0 && distilled.stdout.contains("truncated") && distilled.stdout.contains("distilled"),
      "\(distilled.stderr)")
    #expect(
      try NetworkConfig.lowRankRanks(json: Data(contentsOf: URL(fileURLWithPath: folder.file("s/config.json")))) == [
        "layers.0": 9, "layers.1": 12,
      ])
    #expect(try evaluation(folder.file("s"), data)["accuracy"] as? Double != nil)
  }

  /// A bf16 Llama-shaped model streamed through `pela`: projections factored with their ranks in
  /// config.json, every other tensor copied bit for bit, and the factored model runs.
  /// `pela --distill` on a BERT encoder: feature distillation on token sequences, reported as
  /// the hidden-state error against the original (0 for the original itself).
  @Test func bertEncodersDistilFromTheCLI() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try writeRandomBERT(to: folder.file("bert"))
    let lines = (0..<48).map { s in
      "[" + (0..<12).map { String(($0 * (s % 5 + 1) + s) % 40) }.joined(separator: ", ") + "]"
    }
    try lines.joined(separator: "\n").write(toFile: folder.file("t.jsonl"), atomically: true, encoding: .utf8)
    let result = try CLI.run(
      "pela", folder.file("bert"), "--keep", "0.25", "--distill", "--data", folder.file("t.jsonl"), "--epochs", "4",
      "--lr", "1e-2", "--batch-size", "8", "-o", folder.file("out"), "-q")
    #expect(result.status == 0, "\(result.stderr)")
    let report = try #require(result.stdout.split(separator: "\n").first { $0.hasPrefix("hidden-state error on") })
    let figures = report.split(separator: ":").last!.split(separator: ",").map {
      Double($0.split(separator: " ").first!)!
    }
    #expect(figures.count == 3 && figures[0] == 0 && figures[2] < 0.8 * figures[1], "\(report)")
  }

  @Test func decodersFactorTensorByTensor() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    #expect(try CLI.run("example", folder.file("ex")).status == 0)
    let result = try CLI.run("pela", folder.file("ex/base"), "--keep", "0.5", "-o", folder.file("f"), "-q")
    #expect(result.status == 0, "\(result.stderr)")
    let (original, factored) = (try openCheckpoint(folder.file("ex/base")), try openCheckpoint(folder.file("f")))
    #expect(
      try factored.info("model.layers.0.self_attn.q_proj.0.weight")
        == TensorInfo(name: "model.layers.0.self_attn.q_proj.0.weight", dtype: .bf16, shape: [64, 256]))
    #expect(try factored.info("model.layers.2.mlp.down_proj.1.weight").shape == [256, 93])
    for name in ["model.embed_tokens.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight"] {
      #expect(try original.read(name) == factored.read(name), "\(name)")
    }
    let ranks = try NetworkConfig.lowRankRanks(
      json: Data(contentsOf: URL(fileURLWithPath: folder.file("f/config.json"))))
    #expect(ranks.count == 28 && ranks["model.layers.3.mlp.up_proj"] == 93)
    let lines = (0..<3).map { s in
      "[" + (0..<10).map { String(($0 * 37 + s * 101) % 2048) }.joined(separator: ", ") + "]"
    }
    try lines.joined(separator: "\n").write(toFile: folder.file("tokens.jsonl"), atomically: true, encoding: .utf8)
    let perplexity = try evaluation(folder.file("f"), folder.file("tokens.jsonl"))["perplexity"] as? Double
    #expect(perplexity.map { $0 > 1 && $0.isFinite } == true)
  }

  /// A fine-tune that moved one layer by an exact rank-2 matrix: the adapter holds exactly that
  /// (base + B A = fine-tune), skips unchanged layers and names the bias it cannot hold.
  @Test func extractLoRARecoversALowRankFineTune() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = folder.file("d.safetensors")
    #expect(try CLI.run("synthetic-data", "-o", data, "--features", "24").status == 0)
    #expect(
      try CLI.run("train", "--data", data, "--hidden", "40,40", "--epochs", "1", "-o", folder.file("base"), "-q").status
        == 0)
    let base = try openCheckpoint(folder.file("base"))
    var tensors = try base.tensors.map { ($0.name, try base.tensor(named: $0.name)) }
    let (u, v) = ((0..<40).map { Float(sin(Double($0))) }, (0..<24).map { Float(cos(Double($0) * 0.7)) })
    let (p, q) = ((0..<40).map { Float(($0 % 5) - 2) * 0.1 }, (0..<24).map { Float($0 % 3) * 0.2 })
    for (k, entry) in tensors.enumerated() where entry.0 == "layers.0.weight" {
      for i in 0..<40 { for j in 0..<24 { tensors[k].1.scalars[i * 24 + j] += u[i] * v[j] + p[i] * q[j] } }
    }
    for (k, entry) in tensors.enumerated() where entry.0 == "layers.0.bias" { tensors[k].1.scalars[0] += 1 }
    let config = try String(contentsOfFile: folder.file("base/config.json"), encoding: .utf8)
    try ModelFolder.write(
      tensors, files: ["config.json": config], dtype: .f32, to: folder.file("tuned"), overwrite: false)

    let result = try CLI.run(
      "extract-lora", folder.file("tuned"), "--base", folder.file("base"), "--rank", "2", "--select", #"^layers\.\d$"#,
      "-o", folder.file("lora"), "-q")
    #expect(result.status == 0, "\(result.stderr)")
    #expect(
      result.stdout.contains("layers.1  40x40 dense: unchanged from the base")
        && result.stdout.contains("layers.0.bias"), "\(result.stdout)")
    let adapter = try openCheckpoint(folder.file("lora/adapter_model.safetensors"))
    #expect(
      adapter.tensors.map(\.name) == [
        "base_model.model.layers.0.lora_A.weight", "base_model.model.layers.0.lora_B.weight",
      ])
    let product = BLAS.matmul(
      try adapter.tensor(named: "base_model.model.layers.0.lora_B.weight"),
      try adapter.tensor(named: "base_model.model.layers.0.lora_A.weight"))
    let (w0, w1) = (
      try base.tensor(named: "layers.0.weight").scalars, tensors.first { $0.0 == "layers.0.weight" }!.1.scalars
    )
    #expect(zip(zip(w0, product.scalars).map { $0 + $1 }, w1).allSatisfy { abs($0 - $1) < 1e-5 })
    let config0 =
      try JSONSerialization.jsonObject(
        with: Data(contentsOf: URL(fileURLWithPath: folder.file("lora/adapter_config.json")))) as! [String: Any]
    #expect(
      config0["peft_type"] as? String == "LORA" && config0["r"] as? Int == 2 && config0["lora_alpha"] as? Int == 2)
  }

  /// GPT-2's Conv1D layers store their weight as (in x out): the adapter holds the update in
  /// PEFT's orientation (B A = delta transposed) with fan_in_fan_out; task_type comes from the
  /// architecture; --save-modules keeps the changed final norm whole (modules_to_save); a card
  /// says how to load it.
  @Test func extractLoRAFromConv1DLayersWithSavedModules() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let config = #"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 4}"#
    let (inputs, outputs) = (4, 6)
    let weight = Tensor(shape: [inputs, outputs], scalars: (0..<24).map { Float($0 % 7) * 0.1 })
    let norm = Tensor(shape: [4], scalars: [1, 1, 1, 1])
    try ModelFolder.write(
      [("transformer.h.0.mlp.c_fc.weight", weight), ("transformer.ln_f.weight", norm)],
      files: ["config.json": config], dtype: .f32, to: folder.file("base"), overwrite: false)
    // A rank-1 change u v^T in the stored (in x out) layout, and a moved norm.
    let (u, v) = ([Float]([1, -2, 0.5, 3]), [Float]([0.2, 0, -0.1, 0.4, 0.3, -0.5]))
    var tuned = weight
    for i in 0..<inputs { for j in 0..<outputs { tuned.scalars[i * outputs + j] += u[i] * v[j] } }
    try ModelFolder.write(
      [
        ("transformer.h.0.mlp.c_fc.weight", tuned),
        ("transformer.ln_f.weight", Tensor(shape: [4], scalars: [1, 2, 3, 4])),
      ],
      files: ["config.json": config], dtype: .f32, to: folder.file("tuned"), overwrite: false)
    let result = try CLI.run(
      "extract-lora", folder.file("tuned"), "--base", folder.file("base"), "--rank", "1", "--save-modules", "-o",
      folder.file("lora"), "-q")
    #expect(result.status == 0, "\(result.stderr)")
    let adapter = try openCheckpoint(folder.file("lora/adapter_model.safetensors"))
    let prefix = "base_model.model.transformer."
    let a = try adapter.tensor(named: prefix + "h.0.mlp.c_fc.lora_A.weight")
    let b = try adapter.tensor(named: prefix + "h.0.mlp.c_fc.lora_B.weight")
    #expect(a.shape == [1, inputs] && b.shape == [outputs, 1])
    let product = BLAS.matmul(b, a)  // (out x in): the transpose of the stored change
    for j in 0..<outputs {
      for i in 0..<inputs { #expect(abs(product.scalars[j * inputs + i] - u[i] * v[j]) < 1e-5, "(\(j), \(i))") }
    }
    #expect(try adapter.tensor(named: prefix + "ln_f.weight").scalars == [1, 2, 3, 4])
    let adapterConfig =
      try JSONSerialization.jsonObject(
        with: Data(contentsOf: URL(fileURLWithPath: folder.file("lora/adapter_config.json")))) as? [String: Any]
    #expect(adapterConfig?["fan_in_fan_out"] as? Bool == true)
    #expect(adapterConfig?["task_type"] as? String == "CAUSAL_LM")
    #expect(adapterConfig?["modules_to_save"] as? [String] == ["ln_f"])
    let card = try String(contentsOfFile: folder.file("lora/README.md"), encoding: .utf8)
    #expect(card.contains("AutoPeftModelForCausalLM") && card.contains("library_name: peft"))
    // mergekit's `base+adapter` applies it back: the fine-tune, in the base's layout.
    let applied = try openCheckpoint(folder.file("base") + "+" + folder.file("lora"))
    let restored = try applied.tensor(named: "transformer.h.0.mlp.c_fc.weight")
    #expect(zip(restored.scalars, tuned.scalars).allSatisfy { abs($0 - $1) < 1e-5 })
    #expect(try applied.tensor(named: "transformer.ln_f.weight").scalars == [1, 2, 3, 4])
  }

  /// A hand-written adapter: PEFT's scale is lora_alpha / r (alpha_pattern per module), or
  /// alpha / sqrt(r) with rsLoRA; `base+adapter` works wherever a model is named.
  @Test func loraAdaptersApplyWithTheirScaling() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let weight = Tensor(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6])
    try ModelFolder.write(
      [("m.q.weight", weight), ("m.k.weight", weight)], files: ["config.json": "{}"], dtype: .f32,
      to: folder.file("base"), overwrite: false)
    let a = Tensor(shape: [4, 3], scalars: (0..<12).map { Float($0) * 0.25 })
    let b = Tensor(shape: [2, 4], scalars: (0..<8).map { Float($0) - 3 })
    func adapter(_ name: String, config: String) throws {
      try FileManager.default.createDirectory(atPath: folder.file(name), withIntermediateDirectories: true)
      try writeCheckpoint(
        ["q", "k"].flatMap { m in
          [
            ("base_model.model.m.\(m).lora_A.weight", a.encoded(as: .f32)),
            ("base_model.model.m.\(m).lora_B.weight", b.encoded(as: .f32)),
          ]
        }, to: folder.file(name + "/adapter_model.safetensors"))
      try config.write(toFile: folder.file(name + "/adapter_config.json"), atomically: true, encoding: .utf8)
    }
    try adapter("plain", config: #"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"k": 2}}"#)
    try adapter("rs", config: #"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true}"#)
    let product = BLAS.matmul(b, a).scalars
    for (name, module, scale) in [("plain", "q", 2.0), ("plain", "k", 0.5), ("rs", "q", 4.0)]
      as [(String, String, Float)]
    {
      let applied = try openCheckpoint(folder.file("base") + "+" + folder.file(name)).tensor(
        named: "m.\(module).weight")
      let expected = zip(weight.scalars, product).map { $0 + scale * $1 }
      #expect(zip(applied.scalars, expected).allSatisfy { abs($0 - $1) < 1e-4 }, "\(name) \(module)")
    }
    let diff = try CLI.run("diff", folder.file("base") + "+" + folder.file("plain"), folder.file("base"))
    #expect(diff.status == 0 && diff.stdout.contains("0 identical"), "\(diff.stdout) \(diff.stderr)")
    try #"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true}"#.write(
      toFile: folder.file("rs/adapter_config.json"), atomically: true, encoding: .utf8)
    let dora = try CLI.run("inspect", folder.file("base") + "+" + folder.file("rs"))
    #expect(dora.status != 0 && dora.stderr.contains("DoRA"), "\(dora.stderr)")
  }

  @Test func badRequestsAreRefusedAndWriteNothing() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    #expect(try CLI.run("example", folder.file("ex")).status == 0)
    #expect(try CLI.run("pela", folder.file("ex/base"), "--keep", "1.5", "-o", folder.file("x")).status == 64)
    #expect(
      try CLI.run("pela", folder.file("ex/base"), "--keep", "0.5", "--rank", "3", "-o", folder.file("x")).status == 64)
    #expect(try CLI.run("pela", folder.file("ex/base"), "--distill", "-o", folder.file("x")).status == 64)
    let none = try CLI.run("pela", folder.file("ex/base"), "--select", "no-such-layer", "-o", folder.file("x"))
    #expect(none.status == 1 && none.stderr.contains("no linear layer matches no-such-layer"), "\(none.stderr)")
    // A decoder is distilled on token sequences: feature rows are refused, naming the file.
    try "0,1\n".write(toFile: folder.file("d.csv"), atomically: true, encoding: .utf8)
    let decoder = try CLI.run(
      "pela", folder.file("ex/base"), "--distill", "--data", folder.file("d.csv"), "-o", folder.file("x"))
    #expect(
      decoder.status == 1 && decoder.stderr.contains("d.csv") && decoder.stderr.contains("token ids"),
      "\(decoder.stderr)")
    // A LoRA from a base of another shape: the tensor is named.
    #expect(
      try CLI.run(
        "train", "--data", try syntheticData(folder), "--hidden", "16", "--epochs", "1", "-o", folder.file("mlp"), "-q"
      ).status == 0)
    let mismatch = try CLI.run(
      "extract-lora", folder.file("ex/finetune-a"), "--base", folder.file("mlp"), "--rank", "2", "--select", "q_proj",
      "-o", folder.file("x"))
    #expect(
      mismatch.status == 1 && mismatch.stderr.contains("model.layers.0.self_attn.q_proj.weight"), "\(mismatch.stderr)")
    #expect(
      try CLI.run(
        "extract-lora", folder.file("ex/finetune-a"), "--base", folder.file("ex/base"), "-o", folder.file("x")
      ).status == 64)
    #expect(!FileManager.default.fileExists(atPath: folder.file("x")))
  }

  func syntheticData(_ folder: TemporaryFolder) throws -> String {
    let path = folder.file("s.safetensors")
    _ = try CLI.run("synthetic-data", "-o", path)
    return path
  }
}
