import Checkpoint
import Foundation
import Nets
import Tensor
import Testing

@testable import TestSupport

@Suite(.serialized) struct NetworkCommandTests {
  func json(_ result: CLI.Result) throws -> [String: Any] {
    try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
  }

  @Test func syntheticDataTrainEvalFineTuneAndStatistics() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let (train, test) = (folder.file("train.safetensors"), folder.file("test.safetensors"))
    #expect(try CLI.run("synthetic-data", "-o", train, "--noise", "0.6").status == 0)
    #expect(try CLI.run("synthetic-data", "-o", test, "--noise", "0.6", "--split", "test").status == 0)
    let trained = try CLI.run("train", "--data", train, "--epochs", "12", "-o", folder.file("mlp"), "-q")
    #expect(trained.status == 0, "\(trained.stderr)")
    let evaluation = try json(try CLI.run("eval", folder.file("mlp"), "--data", test, "--json"))
    #expect((evaluation["accuracy"] as! Double) > 0.9)
    #expect((evaluation["tasks"] as! [[String: Any]]).count == 2)

    // Fine-tune on task 1 only with the first layer frozen: its weights stay bit-identical.
    let tuned = try CLI.run(
      "train", folder.file("mlp"), "--data", train, "--tasks", "1", "--freeze", #"^layers\.0\."#, "--epochs", "2", "-o",
      folder.file("tuned"), "-q")
    #expect(tuned.status == 0, "\(tuned.stderr)")
    let (before, after) = (try openCheckpoint(folder.file("mlp")), try openCheckpoint(folder.file("tuned")))
    #expect(try before.read("layers.0.weight") == after.read("layers.0.weight"))
    #expect(try before.read("layers.1.weight") != after.read("layers.1.weight"))

    // Joint statistics of both models' hidden features: the count and the sums match a direct run.
    let stats = try CLI.run(
      "stats", folder.file("mlp"), folder.file("tuned"), "--data", test, "--at", #"layers\.1\.hidden$"#, "-o",
      folder.file("stats.safetensors"), "-q")
    #expect(stats.status == 0, "\(stats.stderr)")
    let saved = try openCheckpoint(folder.file("stats.safetensors"))
    #expect(try saved.info("layers.1.hidden.products").shape == [128, 128])
    let table = try DataFiles.readLabeled(test)
    var direct = [Double](repeating: 0, count: 128)
    for (k, path) in ["mlp", "tuned"].enumerated() {
      let network = try Network<Float>(
        config: try NetworkConfig(json: Data(contentsOf: URL(fileURLWithPath: folder.file(path + "/config.json")))),
        tensors: Dictionary(
          uniqueKeysWithValues: try openCheckpoint(folder.file(path)).tensors.map {
            ($0.name, try openCheckpoint(folder.file(path)).tensor(named: $0.name))
          }))
      let tape = Tape<Float>()
      let hidden = tape.value(
        try network.forward(tape, .features(Matrix(rows: table.rows, columns: table.columns, values: table.features)))
          .points(matching: #"layers\.1\.hidden$"#)[0].value)
      for r in 0..<hidden.rows { for c in 0..<64 { direct[k * 64 + c] += Double(hidden[r, c]) } }
    }
    let sums = try saved.tensor(named: "layers.1.hidden.sum").scalars
    #expect(try saved.tensor(named: "layers.1.hidden.count").scalars == [Float(table.rows)])
    #expect(zip(sums, direct).allSatisfy { abs(Double($0) - $1) <= 1e-4 * max(1, abs($1)) })
  }

  @Test func aRandomLanguageModelHasAPerplexityNearItsVocabulary() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    #expect(try CLI.run("example", folder.file("ex")).status == 0)
    let lines = (0..<4).map { s in
      "[" + (0..<12).map { String(($0 * 37 + s * 101) % 2048) }.joined(separator: ", ") + "]"
    }
    try lines.joined(separator: "\n").write(toFile: folder.file("tokens.jsonl"), atomically: true, encoding: .utf8)
    let result = try CLI.run("eval", folder.file("ex/base"), "--data", folder.file("tokens.jsonl"), "--json")
    #expect(result.status == 0, "\(result.stderr)")
    let figures = try json(result)
    // The final RMSNorm gives unit-RMS features and the head has weights of scale 0.02 over 256
    // of them, so logits are about N(0, 0.32^2): the expected loss is log(2048) + 0.32^2 / 2.
    // Over 44 tokens the label logits' mean has a standard deviation of 0.32 / sqrt(44) = 0.05.
    #expect(figures["tokens"] as! Int == 44)
    let loss = figures["loss"] as! Double
    #expect(abs(loss - (log(2048) + 0.32 * 0.32 / 2)) < 0.15)
    #expect(abs((figures["perplexity"] as! Double) - exp(loss)) < 1e-6 * exp(loss))
  }

  /// `train` fine-tunes a decoder on token walks: held-out perplexity falls; `--train-only`
  /// leaves every other weight's bits alone; data with nothing to predict or with ids beyond
  /// the vocabulary is refused by train and eval, naming the file, and nothing is written.
  @Test func aDecoderTrainsOnTokensAndBadTokenDataIsRefused() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    #expect(try CLI.run("example", folder.file("ex")).status == 0)
    let (train, test) = (folder.file("train.jsonl"), folder.file("test.jsonl"))
    for (path, split) in [(train, "train"), (test, "test")] {
      #expect(
        try CLI.run(
          "synthetic-tokens", "-o", path, "--sequences", "16", "--length", "12", "--vocabulary", "32", "--split", split
        ).status == 0)
    }
    func perplexity(_ model: String) throws -> Double {
      try json(try CLI.run("eval", model, "--data", test, "--json"))["perplexity"] as! Double
    }
    let trained = try CLI.run(
      "train", folder.file("ex/base"), "--data", train, "--epochs", "3", "--lr", "3e-3", "--batch-size", "8", "-o",
      folder.file("trained"), "-q")
    #expect(trained.status == 0 && trained.stdout.contains("training perplexity"), "\(trained.stderr)")
    let (before, after) = (try perplexity(folder.file("ex/base")), try perplexity(folder.file("trained")))
    #expect(after < before / 4, "held-out perplexity \(before) -> \(after)")
    #expect(FileManager.default.fileExists(atPath: folder.file("trained/tokenizer.json")))

    let normOnly = try CLI.run(
      "train", folder.file("ex/base"), "--data", train, "--epochs", "1", "--lr", "0.05", "--train-only",
      #"^model\.norm\."#, "-o",
      folder.file("norm-only"), "-q")
    #expect(normOnly.status == 0, "\(normOnly.stderr)")
    let (base, tuned) = (try openCheckpoint(folder.file("ex/base")), try openCheckpoint(folder.file("norm-only")))
    #expect(try base.read("model.layers.0.mlp.up_proj.weight") == tuned.read("model.layers.0.mlp.up_proj.weight"))
    #expect(try base.read("model.norm.weight") != tuned.read("model.norm.weight"))

    try "[5]\n[7]\n".write(toFile: folder.file("short.jsonl"), atomically: true, encoding: .utf8)
    try "[5, 6, 5000]\n".write(toFile: folder.file("wide.jsonl"), atomically: true, encoding: .utf8)
    for command in ["train", "eval"] {
      let output = command == "train" ? ["-o", folder.file("never")] : []
      let short = try CLI.run(
        [command, folder.file("ex/base"), "--data", folder.file("short.jsonl")] + output, environment: [:])
      #expect(
        short.status == 64 && short.stderr.contains("short.jsonl has no sequence of two or more tokens"),
        "\(short.stderr)")
      let wide = try CLI.run(
        [command, folder.file("ex/base"), "--data", folder.file("wide.jsonl")] + output, environment: [:])
      #expect(
        wide.status == 64 && wide.stderr.contains("wide.jsonl: sequence 1 has token id 5000, outside"), "\(wide.stderr)"
      )
    }
    #expect(!FileManager.default.fileExists(atPath: folder.file("never")))
  }

  /// `zip` takes BERT encoders with token data: an encoder zipped with itself comes back.
  @Test func zipTakesBERTEncoders() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try writeRandomBERT(to: folder.file("bert"))
    let lines = (0..<16).map { s in "[" + (0..<10).map { String(($0 * 3 + s * 7) % 40) }.joined(separator: ", ") + "]" }
    try lines.joined(separator: "\n").write(toFile: folder.file("t.jsonl"), atomically: true, encoding: .utf8)
    let zipped = try CLI.run(
      "zip", folder.file("bert"), folder.file("bert"), "--data", folder.file("t.jsonl"), "-o", folder.file("zipped"))
    #expect(zipped.status == 0 && zipped.stdout.contains("BERT encoders"), "\(zipped.stderr)")
    let (original, result) = (try openCheckpoint(folder.file("bert")), try openCheckpoint(folder.file("zipped")))
    for name in ["encoder.layer.1.output.dense.weight", "embeddings.word_embeddings.weight"] {
      let (a, b) = (try original.tensor(named: name).scalars, try result.tensor(named: name).scalars)
      #expect(zip(a, b).allSatisfy { abs($0 - $1) <= 1e-6 }, "\(name)")
    }
    let refused = try CLI.run(
      "zip", folder.file("bert"), folder.file("bert"), "--data", folder.file("t.jsonl"), "--keep-heads", "-o",
      folder.file("x"))
    #expect(
      refused.status == 64 && refused.stderr.contains("stop_at and keep_heads for MLPs and decoders"),
      "\(refused.stderr)")
  }

  /// A BERT encoder gets a classification head (`train --classes`), trains and evaluates on
  /// labelled token sequences, and aTLAS learns coefficients for two fine-tunes of it; the
  /// outputs are `BertForSequenceClassification` folders. Lines without a label are refused.
  @Test func bertClassifiersTrainEvaluateAndLearnATLASCoefficients() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try writeRandomBERT(to: folder.file("bert"))
    let data = folder.file("labelled.jsonl")
    let made = try CLI.run(
      "synthetic-tokens", "--labelled", "-o", data, "--sequences", "64", "--length", "8", "--vocabulary", "16",
      "--offsets", "0,16")
    #expect(made.status == 0, "\(made.stderr)")
    let headed = try CLI.run(
      "train", folder.file("bert"), "--classes", "14", "--data", data, "--epochs", "2", "--lr", "3e-3", "-o",
      folder.file("base"), "-q")
    #expect(headed.status == 0 && headed.stdout.contains("training accuracy"), "\(headed.stderr)")
    let config = try String(contentsOfFile: folder.file("base/config.json"), encoding: .utf8)
    #expect(config.contains("BertForSequenceClassification") && config.contains("\"num_labels\" : 14"))
    let evaluation = try json(try CLI.run("eval", folder.file("base"), "--data", data, "--json"))
    #expect((evaluation["tasks"] as! [[String: Any]]).count == 2 && (evaluation["rows"] as! Int) == 64)
    for task in ["0", "1"] {
      #expect(
        try CLI.run(
          "train", folder.file("base"), "--data", data, "--tasks", task, "--epochs", "1", "-o",
          folder.file("ft" + task),
          "-q"
        ).status == 0)
      #expect(
        try CLI.run(
          "task-vector", folder.file("ft" + task), "--base", folder.file("base"), "-o",
          folder.file("tv\(task).safetensors")
        ).status == 0)
    }
    let learned = try CLI.run(
      "atlas", "learn", folder.file("base"), folder.file("tv0.safetensors"), folder.file("tv1.safetensors"), "--data",
      data, "--epochs", "2", "--lr", "0.01", "-o", folder.file("atlas"), "-q")
    #expect(learned.status == 0 && learned.stdout.contains("2 task vectors"), "\(learned.stderr)")
    #expect(FileManager.default.fileExists(atPath: folder.file("atlas/atlas-coefficients.json")))
    #expect(try CLI.run("eval", folder.file("atlas"), "--data", data).status == 0)
    try "{\"input_ids\": [1, 2]}\n".write(toFile: folder.file("bad.jsonl"), atomically: true, encoding: .utf8)
    let bad = try CLI.run("eval", folder.file("base"), "--data", folder.file("bad.jsonl"))
    #expect(bad.status == 1 && bad.stderr.contains("bad.jsonl: line 1 is not an object"), "\(bad.stderr)")
    let headless = try CLI.run("train", folder.file("bert"), "--data", data, "-o", folder.file("x"))
    #expect(headless.status == 64 && headless.stderr.contains("without a head"), "\(headless.stderr)")
  }

  @Test func badDataIsNamedAndWritesNothing() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = folder.file("d.safetensors")
    #expect(try CLI.run("synthetic-data", "-o", data, "--features", "5", "--samples-per-class", "4").status == 0)
    #expect(try CLI.run("train", "--data", data, "--epochs", "1", "-o", folder.file("m"), "-q").status == 0)
    try "1,2,3,0\n4,5,x,1\n".write(toFile: folder.file("bad.csv"), atomically: true, encoding: .utf8)
    let csv = try CLI.run("train", "--data", folder.file("bad.csv"), "-o", folder.file("m2"), "-q")
    #expect(csv.status == 1 && csv.stderr.contains("bad.csv: line 2, field 3: 'x' is not a number"), "\(csv.stderr)")
    let other = folder.file("other.safetensors")
    #expect(try CLI.run("synthetic-data", "-o", other, "--features", "7", "--samples-per-class", "4").status == 0)
    let mismatch = try CLI.run("eval", folder.file("m"), "--data", other)
    #expect(mismatch.status == 1 && mismatch.stderr.contains("takes 5 features, the data has 7"), "\(mismatch.stderr)")
    #expect(
      try CLI.run(
        "stats", folder.file("m"), "--data", data, "--at", "nothing-matches", "-o", folder.file("s.safetensors")
      ).status == 64)
    #expect(try CLI.run("train", "--data", data, "--optimizer", "lbfgs", "-o", folder.file("m3")).status == 64)
    #expect(
      !FileManager.default.fileExists(atPath: folder.file("m2"))
        && !FileManager.default.fileExists(atPath: folder.file("s.safetensors")))
  }

  @Test func zipWritesARunnableModelAndRefusesMismatches() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = folder.file("d.safetensors")
    #expect(try CLI.run("synthetic-data", "-o", data, "--features", "6", "--samples-per-class", "20").status == 0)
    for (name, hidden, tasks) in [("a", "16,16", "0"), ("b", "16,16", "1"), ("wide", "17,16", "1")] {
      #expect(
        try CLI.run(
          "train", "--data", data, "--tasks", tasks, "--classes", "10", "--hidden", hidden, "--epochs", "3", "-o",
          folder.file(name), "-q"
        ).status == 0)
    }
    // Without --classes, a model trained on task 0 (classes 0-4) still has the data's 10 outputs,
    // so the README's two-task workflow zips.
    #expect(
      try CLI.run(
        "train", "--data", data, "--tasks", "0", "--hidden", "16,16", "--epochs", "1", "-o", folder.file("t0"), "-q"
      ).status == 0)
    #expect(try openCheckpoint(folder.file("t0")).info("layers.2.weight").shape == [10, 16])
    let zipped = try CLI.run(
      "zip", folder.file("a"), folder.file("b"), "--data", data, "--stop-at", "1", "-o", folder.file("z"))
    #expect(zipped.status == 0 && zipped.stdout.contains("1 shared layer, 2 heads"), "\(zipped.stderr)")
    // Labels are unused: features alone zip to the same model.
    let featuresOnly = try openCheckpoint(data).read("features")
    try writeCheckpoint([("features", featuresOnly)], to: folder.file("features.safetensors"))
    #expect(
      try CLI.run(
        "zip", folder.file("a"), folder.file("b"), "--data", folder.file("features.safetensors"), "--stop-at", "1",
        "-o", folder.file("zf"), "-q"
      ).status == 0)
    #expect(
      try openCheckpoint(folder.file("zf")).read("layers.0.weight")
        == openCheckpoint(folder.file("z")).read("layers.0.weight"))
    let evaluation = try json(try CLI.run("eval", folder.file("z"), "--data", data, "--json"))
    #expect((evaluation["tasks"] as! [[String: Any]]).count == 2)
    // From a statistics file (same batches, so the same sums): the same model.
    #expect(
      try CLI.run(
        "stats", folder.file("a"), folder.file("b"), "--data", data, "--at", "hidden$", "--batch-size", "512", "-o",
        folder.file("s.safetensors"), "-q"
      ).status == 0)
    #expect(
      try CLI.run(
        "zip", folder.file("a"), folder.file("b"), "--stats", folder.file("s.safetensors"), "--stop-at", "1", "-o",
        folder.file("zs")
      ).status == 0)
    #expect(
      try openCheckpoint(folder.file("z")).read("layers.0.weight")
        == openCheckpoint(folder.file("zs")).read("layers.0.weight"))
    let wide = try CLI.run("zip", folder.file("a"), folder.file("wide"), "--data", data, "-o", folder.file("z2"))
    #expect(wide.status == 1 && wide.stderr.contains("model 2 differs from the first"), "\(wide.stderr)")
    let stop = try CLI.run(
      "zip", folder.file("a"), folder.file("b"), "--data", data, "--stop-at", "3", "-o", folder.file("z3"))
    #expect(stop.status == 1 && stop.stderr.contains("stop layer 3 does not exist"), "\(stop.stderr)")
    let other = folder.file("other.safetensors")
    #expect(try CLI.run("synthetic-data", "-o", other, "--features", "7", "--samples-per-class", "4").status == 0)
    let features = try CLI.run("zip", folder.file("a"), folder.file("b"), "--data", other, "-o", folder.file("z4"))
    #expect(features.status == 1 && features.stderr.contains("takes 6 features, the data has 7"), "\(features.stderr)")
    #expect(
      try CLI.run(
        "zip", folder.file("a"), folder.file("b"), "--data", data, "--method", "magic", "-o", folder.file("z5")
      ).status == 64)
    #expect(["z2", "z3", "z4", "z5"].allSatisfy { !FileManager.default.fileExists(atPath: folder.file($0)) })
  }

  @Test func atlasLearnsAppliesAndRejectsBadCoefficients() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = folder.file("d.safetensors")
    #expect(try CLI.run("synthetic-data", "-o", data, "--features", "6", "--samples-per-class", "20").status == 0)
    #expect(
      try CLI.run("train", "--data", data, "--hidden", "8", "--epochs", "1", "-o", folder.file("base"), "-q").status
        == 0)
    for t in 0..<2 {
      #expect(
        try CLI.run(
          "train", folder.file("base"), "--data", data, "--tasks", "\(t)", "--epochs", "2", "-o", folder.file("ft\(t)"),
          "-q"
        ).status == 0)
      #expect(
        try CLI.run(
          "task-vector", folder.file("ft\(t)"), "--base", folder.file("base"), "-o", folder.file("tv\(t).mkz"), "-q"
        ).status == 0)
    }
    let tvs = [folder.file("tv0.mkz"), folder.file("tv1.mkz")]
    let learned = try CLI.run(
      ["atlas", "learn", folder.file("base")] + tvs + [
        "--data", data, "--epochs", "2", "-o", folder.file("atlas"), "--coefficients-out", folder.file("c.json"), "-q",
      ], environment: [:])
    #expect(
      learned.status == 0 && learned.stdout.contains("8 coefficients (2 task vectors x 4 blocks x 1)"),
      "\(learned.stderr)")
    // Applying the learned coefficients gives the model learn wrote (to f32 rounding of the sums).
    #expect(
      try CLI.run(
        ["atlas", "apply", folder.file("base")] + tvs + [
          "--coefficients", folder.file("c.json"), "-o", folder.file("applied"), "-q",
        ], environment: [:]
      ).status == 0)
    let (a, b) = (try openCheckpoint(folder.file("atlas")), try openCheckpoint(folder.file("applied")))
    for info in a.tensors {
      #expect(
        try zip(a.tensor(named: info.name).scalars, b.tensor(named: info.name).scalars).allSatisfy {
          abs($0 - $1) <= 1e-6 * max(1, abs($1))
        })
    }
    // learn also keeps the coefficients in its folder; a recipe's atlas-apply step reading them writes what the CLI wrote.
    #expect(
      try String(contentsOfFile: folder.file("atlas/atlas-coefficients.json"), encoding: .utf8)
        == String(contentsOfFile: folder.file("c.json"), encoding: .utf8))
    let recipe = """
      inputs: {base: \(folder.file("base")), tv0: \(tvs[0]), tv1: \(tvs[1])}
      steps:
        - {name: applied, method: atlas-apply, base: base, models: [tv0, tv1], parameters: {coefficients: \(folder.file("atlas/atlas-coefficients.json"))}}
      outputs: {applied: \(folder.file("recipe-applied"))}
      """
    try recipe.write(toFile: folder.file("apply.yaml"), atomically: true, encoding: .utf8)
    #expect(try CLI.run("run", folder.file("apply.yaml"), "-q").status == 0)
    let (cli, fromRecipe) = (
      try openCheckpoint(folder.file("applied")), try openCheckpoint(folder.file("recipe-applied"))
    )
    for info in cli.tensors { #expect(try cli.read(info.name) == fromRecipe.read(info.name), "\(info.name)") }
    let noFile = try CLI.run("run", folder.file("apply.yaml").replacingOccurrences(of: "apply.yaml", with: "none.yaml"))
    #expect(noFile.status == 64)
    try recipe.replacingOccurrences(of: "atlas/atlas-coefficients.json", with: "missing.json").write(
      toFile: folder.file("missing.yaml"), atomically: true, encoding: .utf8)
    let missing = try CLI.run("run", folder.file("missing.yaml"), "--dry-run")
    #expect(
      missing.status == 64 && missing.stderr.contains("steps[0].parameters.coefficients")
        && missing.stderr.contains("does not exist"), "\(missing.stderr)")
    // Coefficients for three task vectors, given two: refused, nothing written.
    let text = try String(contentsOfFile: folder.file("c.json"), encoding: .utf8)
    try text.replacingOccurrences(of: "\"tasks\" : [", with: "\"tasks\" : [\"extra\", ").write(
      toFile: folder.file("bad.json"), atomically: true, encoding: .utf8)
    let bad = try CLI.run(
      ["atlas", "apply", folder.file("base")] + tvs + [
        "--coefficients", folder.file("bad.json"), "-o", folder.file("x"),
      ], environment: [:])
    #expect(bad.status == 1 && bad.stderr.contains("coefficient file"), "\(bad.stderr)")
    #expect(!FileManager.default.fileExists(atPath: folder.file("x")))
    #expect(
      try CLI.run(
        ["atlas", "learn", folder.file("base")] + tvs + [
          "--data", data, "--objective", "negate", "-o", folder.file("y"),
        ], environment: [:]
      ).status == 64)
  }
}
