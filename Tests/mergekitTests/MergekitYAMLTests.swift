import Checkpoint
import Foundation
import Tensor
import Testing

@testable import TestSupport

/// mergekit-yaml command lines run as `mergekit run CONFIG OUT [flags]`.
@Suite struct MergekitYAMLTests {
  static let examples: TemporaryFolder = {
    let folder = TemporaryFolder.removedAtExit()
    _ = try? CLI.run("example", folder.file("ex"))
    return folder
  }()

  static func model(_ name: String) -> String { examples.file("ex/\(name)") }

  static func ties(extra: String = "") -> String {
    """
    models:
      - model: \(model("finetune-a"))
        parameters: {density: 0.5, weight: 0.5\(extra)}
      - model: \(model("finetune-b"))
        parameters: {density: 0.5, weight: 0.5}
    merge_method: dare_ties
    base_model: \(model("base"))
    parameters: {int8_mask: true}
    dtype: bfloat16
    """
  }

  @Test func mergekitYAMLCommandLinesRun() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try Self.ties().write(toFile: folder.file("c.yml"), atomically: true, encoding: .utf8)
    let result = try CLI.run(
      "run", folder.file("c.yml"), folder.file("out"), "--copy-tokenizer", "--allow-crimes", "--out-shard-size", "2M",
      "--lazy-unpickle", "--low-cpu-memory", "--random-seed", "7", "--write-model-card", "--trust-remote-code", "-v",
      "--cuda", "--gpu-rich", "--read-to-gpu", "-q")
    #expect(result.status == 0, "\(result.stderr)")
    #expect(result.stderr.contains("the merge runs on the CPU"))
    // 2M: shards of at most 2,000,000 bytes (the 1 MiB tensors go two to a shard at most).
    let index = try openCheckpoint(folder.file("out"))
    #expect(index.files.count > 1)
    for file in index.files {
      let size = file.tensors.reduce(0) { $0 + (index.lookup($1)?.byteCount ?? 0) }
      #expect(size <= 2_000_000 || file.tensors.count == 1)
    }
    // --random-seed 7 is the config's seed: 7.
    try Self.ties().replacingOccurrences(of: "int8_mask: true", with: "int8_mask: true, seed: 7").write(
      toFile: folder.file("seeded.yml"), atomically: true, encoding: .utf8)
    #expect(
      try CLI.run("run", folder.file("seeded.yml"), "-o", folder.file("seeded"), "--out-shard-size", "2M", "-q").status
        == 0)
    for file in index.files {
      #expect(
        readBytes(folder.file("out/\(file.name)")) == readBytes(folder.file("seeded/\(file.name)")), "\(file.name)")
    }
    let twice = try CLI.run("run", folder.file("c.yml"), folder.file("a"), "-o", folder.file("b"))
    #expect(twice.status == 64 && twice.stderr.contains("given twice"))
    // The rest of mergekit-yaml's flags; the output does not depend on the thread count.
    let more = try CLI.run(
      "run", folder.file("seeded.yml"), folder.file("more"), "--out-shard-size", "2M", "-vv", "-j", "1",
      "--no-lazy-unpickle", "--clone-tensors", "--async-write", "--write-threads", "2", "--device", "cpu",
      "--no-allow-crimes", "--safe-serialization", "--lora-merge-cache", folder.file("cache"), "--no-quiet", "-q")
    #expect(more.status == 0, "\(more.stderr)")
    for file in index.files {
      #expect(readBytes(folder.file("more/\(file.name)")) == readBytes(folder.file("seeded/\(file.name)")))
    }
    let pickles = try CLI.run("run", folder.file("c.yml"), folder.file("pickles"), "--no-safe-serialization")
    #expect(pickles.status == 64 && pickles.stderr.contains("safetensors"), "\(pickles.stderr)")
  }

  /// --unsafe-truncate-embeddings cuts every vocabulary tensor to the smallest vocabulary's rows
  /// (token ids assumed equal), as mergekit's flag does; without it the shapes are refused.
  @Test func unsafeTruncationCutsEmbeddingsToTheSmallestVocabulary() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let yaml =
      "models:\n  - model: \(Self.model("finetune-a"))\n  - model: \(Self.model("finetune-chat"))\nmerge_method: linear\n"
    try yaml.write(toFile: folder.file("c.yml"), atomically: true, encoding: .utf8)
    let refused = try CLI.run("run", folder.file("c.yml"), folder.file("refused"), "-q")
    #expect(refused.status != 0 && refused.stderr.contains("tokenizer_source"), "\(refused.stderr)")
    let cut = try CLI.run("run", folder.file("c.yml"), folder.file("cut"), "-q", "--unsafe-truncate-embeddings")
    #expect(cut.status == 0, "\(cut.stderr)")
    let output = try openCheckpoint(folder.file("cut"))
    let (a, chat) = (try openCheckpoint(Self.model("finetune-a")), try openCheckpoint(Self.model("finetune-chat")))
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
      #expect(try output.info(name).shape == [2048, 256])
      let mean = zip(try a.readRows(name, 9..<10).decoded().scalars, try chat.readRows(name, 9..<10).decoded().scalars)
        .map { ($0 + $1) / 2 }
      #expect(try output.readRows(name, 9..<10) == Tensor(shape: [1, 256], scalars: mean).encoded(as: .bf16))
    }
    let config =
      try JSONSerialization.jsonObject(
        with: Data(contentsOf: URL(fileURLWithPath: folder.file("cut/config.json")))) as? [String: Any]
    #expect(config?["vocab_size"] as? Int == 2048)
  }

  /// A parameter the method does not declare is ignored with a warning (mergekit ignores it),
  /// or refused with --strict.
  @Test func undeclaredParametersWarnOrFailWithStrict() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try Self.ties(extra: ", epsilon: 0.1").write(toFile: folder.file("c.yml"), atomically: true, encoding: .utf8)
    let lenient = try CLI.run("run", folder.file("c.yml"), folder.file("out"), "-q")
    #expect(lenient.status == 0, "\(lenient.stderr)")
    #expect(lenient.stderr.contains("warning:") && lenient.stderr.contains("models[0].parameters.epsilon"))
    let strict = try CLI.run("run", folder.file("c.yml"), folder.file("strict"), "--strict")
    #expect(strict.status == 64 && strict.stderr.contains("refused: --strict"), "\(strict.stderr)")
    #expect(!FileManager.default.fileExists(atPath: folder.file("strict")))
  }

  /// Models of different architectures need --allow-crimes; --no-copy-tokenizer leaves the
  /// tokenizer files out.
  @Test func crimesAndTokenizerCopies() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let mistral = folder.file("mistral")
    try FileManager.default.copyItem(atPath: Self.model("finetune-b"), toPath: mistral)
    let config = try String(contentsOfFile: mistral + "/config.json", encoding: .utf8)
    try config.replacingOccurrences(of: "LlamaForCausalLM", with: "MistralForCausalLM").write(
      toFile: mistral + "/config.json", atomically: true, encoding: .utf8)
    try #"{"version": "1.0"}"#.write(toFile: mistral + "/tokenizer.json", atomically: true, encoding: .utf8)
    let yaml = "models:\n  - model: \(mistral)\n  - model: \(Self.model("finetune-a"))\nmerge_method: linear\n"
    try yaml.write(toFile: folder.file("c.yml"), atomically: true, encoding: .utf8)
    let refused = try CLI.run("run", folder.file("c.yml"), folder.file("out"))
    #expect(refused.status == 64 && refused.stderr.contains("--allow-crimes"), "\(refused.stderr)")
    let allowed = try CLI.run("run", folder.file("c.yml"), folder.file("out"), "--allow-crimes", "-q")
    #expect(allowed.status == 0, "\(allowed.stderr)")
    #expect(FileManager.default.fileExists(atPath: folder.file("out/tokenizer.json")))
    let bare = try CLI.run(
      "run", folder.file("c.yml"), folder.file("bare"), "--allow-crimes", "--no-copy-tokenizer", "-q")
    #expect(bare.status == 0, "\(bare.stderr)")
    #expect(!FileManager.default.fileExists(atPath: folder.file("bare/tokenizer.json")))
    #expect(FileManager.default.fileExists(atPath: folder.file("bare/config.json")))
  }

  /// `chat_template`: auto takes the template most inputs share; a name or inline Jinja is
  /// written as given; it lands in chat_template.jinja and tokenizer_config.json.
  @Test func chatTemplatesAreWrittenWithTheTokenizer() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    var models: [String] = []
    for (name, template) in [("a", "{{ 'A' }} {# one #}"), ("b", "{{ 'B' }} {# two #}"), ("c", "{{ 'B' }} {# two #}")] {
      let path = folder.file(name)
      try FileManager.default.copyItem(atPath: Self.model("finetune-a"), toPath: path)
      let config = ["chat_template": template, "model_max_length": 512] as [String: Any]
      try JSONSerialization.data(withJSONObject: config).write(
        to: URL(fileURLWithPath: path + "/tokenizer_config.json"))
      models.append(path)
    }
    func merge(_ setting: String, _ name: String) throws -> CLI.Result {
      let yaml =
        "models:\n" + models.map { "  - model: \($0)\n" }.joined() + "merge_method: linear\nchat_template: \(setting)\n"
      try yaml.write(toFile: folder.file("\(name).yml"), atomically: true, encoding: .utf8)
      return try CLI.run("run", folder.file("\(name).yml"), folder.file(name), "-q")
    }
    func template(_ name: String) throws -> (jinja: String, config: String?) {
      let jinja = try String(contentsOfFile: folder.file("\(name)/chat_template.jinja"), encoding: .utf8)
      let config =
        try JSONSerialization.jsonObject(
          with: Data(contentsOf: URL(fileURLWithPath: folder.file("\(name)/tokenizer_config.json")))) as? [String: Any]
      #expect(config?["model_max_length"] as? Int == 512)
      return (jinja.trimmingCharacters(in: .newlines), config?["chat_template"] as? String)
    }
    #expect(try merge("auto", "auto").status == 0)
    #expect(try template("auto") == ("{{ 'B' }} {# two #}", "{{ 'B' }} {# two #}"))
    #expect(try merge("chatml", "chatml").status == 0)
    #expect(try template("chatml").jinja.contains("<|im_start|>"))
    for (name, marker) in [("llama3", "<|start_header_id|>"), ("mistral", "[INST]"), ("alpaca", "### Instruction:")] {
      #expect(try merge(name, name).status == 0)
      #expect(try template(name).jinja.contains(marker))
    }
    #expect(try merge("exaone", "exaone").status == 0)
    #expect(try template("exaone").config?.contains("[|endofturn|]") == true)
    #expect(try merge("\"{{ messages[0]['content'] }} inline\"", "inline").status == 0)
    #expect(try template("inline").config == "{{ messages[0]['content'] }} inline")
    let unknown = try merge("vicuna", "unknown")
    #expect(unknown.status == 64 && unknown.stderr.contains("chat_template"), "\(unknown.stderr)")
  }

  /// tokenizer_source: the output takes the chosen tokenizer, and the inputs' embedding and
  /// LM-head rows are aligned to it by token: with `union`, a token only one model has keeps
  /// that model's row in the merge, and config.json's vocab_size counts the new rows.
  @Test func tokenizerSourcesAlignVocabularies() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    func model(_ name: String, from source: String, renaming: [Int: String] = [:], marker: String) throws -> String {
      let path = folder.file(name)
      try FileManager.default.copyItem(atPath: Self.model(source), toPath: path)
      var vocabulary: [String: Int] = [:]
      for id in 0..<2048 { vocabulary[renaming[id] ?? "t\(id)"] = id }
      let tokenizer: [String: Any] = [
        "model": ["type": "BPE", "vocab": vocabulary, "merges": [] as [String]], "added_tokens": [], "marker": marker,
      ]
      try JSONSerialization.data(withJSONObject: tokenizer).write(to: URL(fileURLWithPath: path + "/tokenizer.json"))
      return path
    }
    let a = try model("a", from: "finetune-a", marker: "from a")
    let b = try model("b", from: "finetune-b", marker: "from b")
    let c = try model("c", from: "finetune-b", renaming: [5: "z5"], marker: "from c")
    func merge(_ models: [String], _ source: String, _ name: String) throws -> CLI.Result {
      let yaml =
        "models:\n" + models.map { "  - model: \($0)\n" }.joined()
        + "merge_method: linear\ntokenizer_source: \(source)\n"
      try yaml.write(toFile: folder.file("\(name).yml"), atomically: true, encoding: .utf8)
      return try CLI.run("run", folder.file("\(name).yml"), folder.file(name), "-q")
    }
    func json(_ path: String) throws -> [String: Any]? {
      try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any]
    }
    #expect(try merge([a, b], "union", "same").status == 0)
    #expect(try json(folder.file("same/tokenizer.json"))?["marker"] as? String == "from a")
    #expect(try merge([a, b], b, "fromb").status == 0)
    #expect(try json(folder.file("fromb/tokenizer.json"))?["marker"] as? String == "from b")

    let union = try merge([a, c], "union", "union")
    #expect(union.status == 0, "\(union.stderr)")
    #expect(try json(folder.file("union/config.json"))?["vocab_size"] as? Int == 2049)
    let added = try json(folder.file("union/tokenizer.json"))?["added_tokens"] as? [[String: Any]]
    #expect(added?.first?["content"] as? String == "z5" && added?.first?["id"] as? Int == 2048)
    let output = try openCheckpoint(folder.file("union"))
    let (inputA, inputC) = (try openCheckpoint(a), try openCheckpoint(c))
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
      #expect(try output.info(name).shape == [2049, 256])
      // t5 is only a's, z5 only c's: their rows pass through the mean unchanged.
      #expect(try output.readRows(name, 5..<6) == inputA.readRows(name, 5..<6))
      #expect(try output.readRows(name, 2048..<2049).bytes == inputC.readRows(name, 5..<6).bytes)
      let mean = zip(
        try inputA.readRows(name, 7..<8).decoded().scalars, try inputC.readRows(name, 7..<8).decoded().scalars
      )
      .map { ($0 + $1) / 2 }
      #expect(try output.readRows(name, 7..<8) == Tensor(shape: [1, 256], scalars: mean).encoded(as: .bf16))
    }

    // A model without a tokenizer is taken to share the first model's vocabulary (as mergekit
    // assumes); the first model (or base) must have one.
    try FileManager.default.removeItem(atPath: c + "/tokenizer.json")
    let assumed = try merge([a, c], "union", "assumed")
    #expect(assumed.status == 0 && assumed.stderr.contains("taken to be the base's"), "\(assumed.stderr)")
    #expect(try openCheckpoint(folder.file("assumed")).info("lm_head.weight").shape == [2048, 256])
    let unreadable = try merge([c, a], "union", "unreadable")
    #expect(unreadable.status != 0 && unreadable.stderr.contains("tokenizer.json"), "\(unreadable.stderr)")
    #expect(!FileManager.default.fileExists(atPath: folder.file("unreadable")))
  }

  /// `--compute mergekit` (or `compute: mergekit`) rounds every operation to the config's dtype:
  /// task arithmetic gives r(b + r(r(r(m - b) * r(w)) * lambda)) element by element.
  @Test func mergekitComputeModeRoundsEachOperation() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let yaml = """
      merge_method: task_arithmetic
      base_model: \(Self.model("base"))
      models:
        - model: \(Self.model("finetune-a"))
          parameters: {weight: 0.3}
      parameters: {lambda: 3}
      dtype: bfloat16

      """
    try yaml.write(toFile: folder.file("c.yml"), atomically: true, encoding: .utf8)
    let rounded = try CLI.run("run", folder.file("c.yml"), folder.file("rounded"), "-q", "--compute", "mergekit")
    #expect(rounded.status == 0, "\(rounded.stderr)")
    let name = "model.layers.1.mlp.up_proj.weight"
    let base = try openCheckpoint(Self.model("base")).tensor(named: name).scalars
    let model = try openCheckpoint(Self.model("finetune-a")).tensor(named: name).scalars
    let r = { (x: Float) in Tensor(shape: [1], scalars: [x]).encoded(as: .bf16).decoded().scalars[0] }
    let expected = zip(base, model).map { b, m in r(b + r(r(r(m - b) * r(0.3)) * 3)) }
    let output = try openCheckpoint(folder.file("rounded")).tensor(named: name).scalars
    #expect(output == expected)
    try (yaml + "compute: mergekit\n").write(toFile: folder.file("k.yml"), atomically: true, encoding: .utf8)
    #expect(try CLI.run("run", folder.file("k.yml"), folder.file("keyed"), "-q").status == 0)
    #expect(try openCheckpoint(folder.file("keyed")).tensor(named: name).scalars == expected)
    #expect(try CLI.run("run", folder.file("c.yml"), folder.file("exact"), "-q").status == 0)
    #expect(try openCheckpoint(folder.file("exact")).tensor(named: name).scalars != expected)
    try (yaml + "compute: torch\n").write(toFile: folder.file("bad.yml"), atomically: true, encoding: .utf8)
    let bad = try CLI.run("run", folder.file("bad.yml"), folder.file("bad"), "-q")
    #expect(bad.status == 64 && bad.stderr.contains("compute"), "\(bad.stderr)")
  }

  /// Outputs say what they hold: config.json's torch_dtype and dtype follow the written dtype,
  /// and merged safetensors carry `format: pt`.
  @Test func outputsRecordTheirDTypeAndFormat() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    func config(_ path: String) throws -> [String: Any]? {
      try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path + "/config.json")))
        as? [String: Any]
    }
    #expect(try config(Self.model("base"))?["torch_dtype"] as? String == "bfloat16")
    let converted = try CLI.run("convert", Self.model("base"), folder.file("f32"), "--dtype", "f32", "-q")
    #expect(converted.status == 0, "\(converted.stderr)")
    #expect(try config(folder.file("f32"))?["torch_dtype"] as? String == "float32")
    #expect(try config(folder.file("f32"))?["dtype"] as? String == "float32")
    #expect(try config(folder.file("f32"))?["num_hidden_layers"] as? Int == 4)
    let merged = try CLI.run(
      "merge", folder.file("f32"), Self.model("finetune-a"), "--method", "linear", "--dtype", "f16", "-o",
      folder.file("f16"), "-q")
    #expect(merged.status == 0, "\(merged.stderr)")
    #expect(try config(folder.file("f16"))?["torch_dtype"] as? String == "float16")
    #expect(try openCheckpoint(folder.file("f16")).metadata["format"] == "pt")
  }

  /// Models named by Hub id resolve through the local cache layout (no network); an id the cache
  /// lacks gets a message saying how to download it.
  @Test func hubIdsResolveFromTheLocalCache() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let repo = folder.file("hub/models--org--tiny")
    let commit = String(repeating: "ab", count: 20)
    let snapshot = repo + "/snapshots/" + commit
    for path in [repo + "/blobs", repo + "/refs", snapshot] {
      try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    try commit.write(toFile: repo + "/refs/main", atomically: true, encoding: .utf8)
    for (name, blob) in [("config.json", "c1"), ("model.safetensors", "w1")] {
      try FileManager.default.copyItem(atPath: Self.model("finetune-a") + "/" + name, toPath: repo + "/blobs/" + blob)
      try FileManager.default.createSymbolicLink(
        atPath: snapshot + "/" + name, withDestinationPath: "../../blobs/" + blob)
    }
    let environment = ["HF_HUB_CACHE": folder.file("hub")]
    let inspect = try CLI.run(["inspect", "org/tiny"], environment: environment)
    #expect(inspect.status == 0 && inspect.stdout.contains("39 tensors"), "\(inspect.stderr)")
    let yaml = "models:\n  - model: org/tiny\n  - model: \(Self.model("finetune-b"))\nmerge_method: linear\n"
    try yaml.write(toFile: folder.file("c.yml"), atomically: true, encoding: .utf8)
    let merged = try CLI.run(["run", folder.file("c.yml"), folder.file("out"), "-q"], environment: environment)
    #expect(merged.status == 0, "\(merged.stderr)")
    #expect(FileManager.default.fileExists(atPath: folder.file("out/config.json")))
    let missing = try CLI.run(["inspect", "org/absent"], environment: environment)
    #expect(missing.status == 64 && missing.stderr.contains("hf download org/absent"), "\(missing.stderr)")
  }

  /// A merge's output gets its own model card and mergekit_config.yml, never the base's card.
  @Test func mergesGetTheirOwnModelCard() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let base = folder.file("base")
    try FileManager.default.copyItem(atPath: Self.model("base"), toPath: base)
    try "# This is the BASE model\n".write(toFile: base + "/README.md", atomically: true, encoding: .utf8)
    let yaml = Self.ties().replacingOccurrences(of: Self.model("base"), with: base)
    try yaml.write(toFile: folder.file("c.yml"), atomically: true, encoding: .utf8)
    #expect(try CLI.run("run", folder.file("c.yml"), folder.file("out"), "-q").status == 0)
    let card = try String(contentsOfFile: folder.file("out/README.md"), encoding: .utf8)
    #expect(!card.contains("BASE model"))
    #expect(card.hasPrefix("---\nbase_model:\n- \(base)\n- \(Self.model("finetune-a"))\n"))
    #expect(card.contains("library_name: transformers\ntags:\n- mergekit\n- merge\n- dare-ties\n---"))
    #expect(try String(contentsOfFile: folder.file("out/mergekit_config.yml"), encoding: .utf8) == yaml + "\n")
    let cli = try CLI.run(
      "merge", Self.model("finetune-a"), Self.model("finetune-b"), "--base", base, "--method", "ties", "-o",
      folder.file("cli"), "-q")
    #expect(cli.status == 0, "\(cli.stderr)")
    let cliCard = try String(contentsOfFile: folder.file("cli/README.md"), encoding: .utf8)
    #expect(!cliCard.contains("BASE model") && cliCard.contains("mergekit merge "))
    #expect(!FileManager.default.fileExists(atPath: folder.file("cli/mergekit_config.yml")))
    #expect(try CLI.run("run", folder.file("c.yml"), folder.file("bare"), "--no-write-model-card", "-q").status == 0)
    #expect(!FileManager.default.fileExists(atPath: folder.file("bare/README.md")))
    // task-vector and apply outputs get their own card too: a task vector is said not to be a model.
    let tuned = folder.file("tuned")
    try FileManager.default.copyItem(atPath: Self.model("finetune-a"), toPath: tuned)
    try "# This is the BASE model\n".write(toFile: tuned + "/README.md", atomically: true, encoding: .utf8)
    #expect(try CLI.run("task-vector", tuned, "--base", base, "-o", folder.file("tv"), "-q").status == 0)
    let vectorCard = try String(contentsOfFile: folder.file("tv/README.md"), encoding: .utf8)
    #expect(!vectorCard.contains("BASE model") && vectorCard.contains("not a model"), "\(vectorCard)")
    #expect(try CLI.run("apply", base, folder.file("tv"), "-o", folder.file("applied"), "-q").status == 0)
    let appliedCard = try String(contentsOfFile: folder.file("applied/README.md"), encoding: .utf8)
    #expect(!appliedCard.contains("BASE model") && appliedCard.contains("library_name: transformers"), "\(appliedCard)")
  }
}
