import Checkpoint
import Foundation
import Nets
import Tensor
import Testing

@testable import TestSupport

@Suite(.serialized) struct MKVCommandTests {
  /// A tiny Llama-style model folder (2 layers, 4 heads of 8, 2 KV heads) with random weights.
  func tinyDecoder(_ folder: TemporaryFolder) throws -> String {
    let json = """
      {"architectures": ["LlamaForCausalLM"], "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}
      """
    let config = try NetworkConfig(json: Data(json.utf8))
    let tensors = Network<Float>.expectedShapes(config).map { name, shape -> (name: String, tensor: Tensor) in
      let rng = CounterRNG(seed: 1, stream: name)
      let gain: Float = name.hasSuffix("norm.weight") ? 1 : 0
      return (name, Tensor(shape: shape, scalars: (0..<shape.reduce(1, *)).map { gain + 0.3 * rng.normal(UInt64($0)) }))
    }
    try ModelFolder.write(tensors, files: ["config.json": json], dtype: .f32, to: folder.file("tiny"), overwrite: false)
    return folder.file("tiny")
  }

  func tokens(_ folder: TemporaryFolder, _ name: String, split: String) throws -> String {
    let path = folder.file(name)
    let result = try CLI.run(
      "synthetic-tokens", "-o", path, "--sequences", "6", "--length", "12", "--vocabulary", "40", "--split", split)
    #expect(result.status == 0, "\(result.stderr)")
    return path
  }

  func perplexity(_ model: String, _ data: String) throws -> Double {
    let result = try CLI.run("eval", model, "--data", data, "--json")
    #expect(result.status == 0, "\(result.stderr)")
    return (try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any])["perplexity"] as! Double
  }

  /// The output folder holds the model, its projections and ranks; eval runs it with the
  /// projected cache; at a budget of 1 nothing changes.
  @Test func projectionsAreWrittenNextToTheModelAndRun() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let model = try tinyDecoder(folder)
    let (calibration, held) = (
      try tokens(folder, "cal.jsonl", split: "train"), try tokens(folder, "held.jsonl", split: "test")
    )
    let half = try CLI.run(
      "mkv", model, "--data", calibration, "--budget", "0.5", "--step", "2", "--validation", held, "-o",
      folder.file("half"), "-q")
    #expect(
      half.status == 0 && half.stdout.contains("KV cache 50.0% of the original")
        && half.stdout.contains("next-token KL"), "\(half.stdout)\(half.stderr)")
    let projections = try openCheckpoint(folder.file("half/kv_projections.safetensors"))
    #expect(
      try projections.info("model.layers.1.self_attn.v_basis.1").shape == [8, 8]
        && projections.info("model.layers.0.self_attn.k_ranks").dtype == .i64)
    let config =
      try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: folder.file("half/config.json"))))
      as! [String: Any]
    let section = config["kv_projection"] as! [String: Any]
    #expect((section["key_ranks"] as! [[Int]]).count == 2 && section["bases"] as? String == "pca")
    #expect(
      try openCheckpoint(folder.file("half")).read("model.embed_tokens.weight")
        == openCheckpoint(model).read("model.embed_tokens.weight"))
    let (original, projected) = (try perplexity(model, held), try perplexity(folder.file("half"), held))
    #expect(projected != original && projected.isFinite)
    #expect(
      try CLI.run(
        "mkv", model, "--data", calibration, "--budget", "1", "--ranks", "uniform", "-o", folder.file("full"), "-q"
      ).status == 0)
    #expect(abs(try perplexity(folder.file("full"), held) - original) <= 1e-4 * original)
    // Training keeps every basis orthonormal.
    #expect(
      try CLI.run(
        "mkv", model, "--data", calibration, "--budget", "0.5", "--step", "2", "--train", "--epochs", "2", "-o",
        folder.file("trained"), "-q"
      ).status == 0)
    let u = try openCheckpoint(folder.file("trained/kv_projections.safetensors")).tensor(
      named: "model.layers.0.self_attn.k_basis.0")
    let gram = BLAS.matmul(u, u, transposeA: true)
    for i in 0..<8 { for j in 0..<8 { #expect(abs(gram.scalars[i * 8 + j] - (i == j ? 1 : 0)) < 1e-5) } }
  }

  /// `mergekit zip` takes decoders with token data: a decoder averaged with itself is itself;
  /// partially zipped with itself (`--stop-at 1`: a trunk of one layer, a tail per model), it
  /// gives the same perplexity, in a folder marked as mergekit's that `eval` runs and `mkv`
  /// refuses; MLP-only options are refused.
  @Test func zipTakesDecodersWithTokens() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let model = try tinyDecoder(folder)
    let held = try tokens(folder, "held.jsonl", split: "test")
    let zipped = try CLI.run("zip", model, model, "--data", held, "--method", "average", "-o", folder.file("zipped"))
    #expect(zipped.status == 0, "\(zipped.stderr)")
    let original = try perplexity(model, held)
    #expect(abs(try perplexity(folder.file("zipped"), held) - original) <= 1e-4 * original)
    let partial = try CLI.run("zip", model, model, "--data", held, "--stop-at", "1", "-o", folder.file("partial"))
    #expect(
      partial.status == 0 && partial.stdout.contains("the first 1 of 2 layers zipped into a shared trunk"),
      "\(partial.stderr)")
    #expect(abs(try perplexity(folder.file("partial"), held) - original) <= 1e-4 * original)
    let tails = try CLI.run("eval", folder.file("partial"), "--data", held)
    #expect(tails.stdout.contains("tail 0: loss") && tails.stdout.contains("tail 1: loss"), "\(tails.stdout)")
    let config =
      try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: folder.file("partial/config.json"))))
      as! [String: Any]
    #expect(config["model_type"] as? String == "mergekit-zipit-partial")
    #expect(config["tails"] as? Int == 2 && config["shared_layers"] as? Int == 1)
    let names = Set(try openCheckpoint(folder.file("partial")).tensors.map(\.name))
    #expect(names.contains("tails.1.model.layers.1.mlp.down_proj.weight") && names.contains("tails.0.unmerge.weight"))
    #expect(!names.contains("model.layers.1.mlp.down_proj.weight") && !names.contains("model.norm.weight"))
    let projected = try CLI.run("mkv", folder.file("partial"), "--data", held, "-o", folder.file("y"))
    #expect(projected.status != 0 && projected.stderr.contains("tails"), "\(projected.stderr)")
    let stacked = try CLI.run(
      "zip", model, model, "--data", held, "--label-space", "stacked", "-o", folder.file("x"))
    #expect(stacked.status == 64 && stacked.stderr.contains("label_space are for MLPs"), "\(stacked.stderr)")
  }

  /// `atlas learn` on a decoder: task vectors of two fine-tunes (written by `train` and
  /// `task-vector`), coefficients learned on token sequences with next-token cross-entropy; the
  /// output is a decoder folder with the coefficient file, and its validation loss is no worse
  /// than the base's (Lambda = 0 is where training starts). Objectives that need labelled rows
  /// are refused.
  @Test func atlasLearnsOnADecoder() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let model = try tinyDecoder(folder)
    let data = try tokens(folder, "train.jsonl", split: "train")
    for task in ["a", "b"] {
      let tuned = try CLI.run(
        "train", model, "--data", data, "--epochs", "1", "--lr", task == "a" ? "0.01" : "0.003", "--seed",
        task == "a" ? "1" : "2", "-o", folder.file("ft-" + task), "-q")
      #expect(tuned.status == 0, "\(tuned.stderr)")
      #expect(
        try CLI.run("task-vector", folder.file("ft-" + task), "--base", model, "-o", folder.file(task + ".safetensors"))
          .status == 0)
    }
    let learned = try CLI.run(
      "atlas", "learn", model, folder.file("a.safetensors"), folder.file("b.safetensors"), "--data", data, "--epochs",
      "3", "--lr", "0.01", "-o", folder.file("atlas"), "-q")
    #expect(learned.status == 0 && learned.stdout.contains("after 3 epochs"), "\(learned.stderr)")
    #expect(FileManager.default.fileExists(atPath: folder.file("atlas/atlas-coefficients.json")))
    #expect(try perplexity(folder.file("atlas"), data) <= perplexity(model, data) * 1.0001)
    let negate = try CLI.run(
      "atlas", "learn", model, folder.file("a.safetensors"), "--data", data, "--objective", "negate", "--negate-tasks",
      "0", "-o", folder.file("x"))
    #expect(negate.status == 64 && negate.stderr.contains("a decoder learns with ce"), "\(negate.stderr)")
  }

  @Test func dataFreeBasesAndBadRequests() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let model = try tinyDecoder(folder)
    let free = try CLI.run(
      "mkv", model, "--data-free", "--ranks", "uniform", "--budget", "0.5", "-o", folder.file("free"), "-q")
    #expect(free.status == 0 && free.stdout.contains("data-free"), "\(free.stderr)")
    let calibration = try tokens(folder, "cal.jsonl", split: "train")
    #expect(try CLI.run("mkv", model, "--budget", "0.5", "-o", folder.file("x")).status == 64)  // no data
    #expect(try CLI.run("mkv", model, "--data", calibration, "--budget", "0", "-o", folder.file("x")).status == 64)
    let small = try CLI.run("mkv", model, "--data", calibration, "--budget", "0.05", "-o", folder.file("x"))
    #expect(small.status == 1 && small.stderr.contains("lower the rank step"), "\(small.stderr)")
    let step = try CLI.run("mkv", model, "--data", calibration, "--step", "3", "-o", folder.file("x"))
    #expect(step.status == 1 && step.stderr.contains("must divide the head dimension 8"), "\(step.stderr)")
    let data = folder.file("d.safetensors")
    #expect(try CLI.run("synthetic-data", "-o", data).status == 0)
    #expect(try CLI.run("train", "--data", data, "--epochs", "1", "-o", folder.file("mlp"), "-q").status == 0)
    let mlp = try CLI.run("mkv", folder.file("mlp"), "--data", calibration, "-o", folder.file("x"))
    #expect(mlp.status == 1 && mlp.stderr.contains("decoders"), "\(mlp.stderr)")
    // Token ids outside the vocabulary are named.
    try "[1, 2, 99]\n".write(toFile: folder.file("bad.jsonl"), atomically: true, encoding: .utf8)
    let bad = try CLI.run("mkv", model, "--data", folder.file("bad.jsonl"), "-o", folder.file("x"))
    #expect(bad.status == 1 && bad.stderr.contains("token id 99"), "\(bad.stderr)")
    #expect(!FileManager.default.fileExists(atPath: folder.file("x")))
  }
}
