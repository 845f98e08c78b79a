import Checkpoint
import Foundation
import Merge
import Operations
import Tensor

/// Reads mergekit's own YAML configuration (`mergekit-yaml config.yml OUT`) as a one-step recipe,
/// for the methods both tools have, so existing configs run unchanged:
/// `merge_method`, `base_model`, `models` (each `model` with `parameters`), `parameters`,
/// `dtype`, `tokenizer_source: base` (the base's tokenizer files are copied; other tokenizer
/// sources are refused with a clear message), `chat_template` (`auto`, `chatml` or an inline
/// Jinja template, written with the output's tokenizer files) and `slices` (layer ranges merged
/// slice by slice, `SlicedMerge`).
enum MergekitConfig {
  /// mergekit's dtype names.
  static let dtypes = [
    "bfloat16": "bf16", "float16": "f16", "half": "f16", "float32": "f32", "float": "f32", "float64": "f64",
  ]
  /// mergekit parameters that change nothing in our computation (memory or speed hints).
  static let ignoredParameters: Set<String> = ["int8_mask"]

  /// `values` without the parameters `method` does not declare: mergekit reads only those its
  /// method declares and ignores the rest (an `epsilon` left on a ties config), so they are
  /// dropped here too, each with a warning naming its YAML path (`--strict` makes them errors).
  static func declared(
    _ values: [String: ParameterValue], method: any MergeMethod, at path: String, warnings: inout [String]
  ) -> [String: ParameterValue] {
    let known = Set(method.parameters.map(\.name))
    var kept: [String: ParameterValue] = [:]
    for (name, value) in values.sorted(by: { $0.key < $1.key }) {
      if known.contains(name) {
        kept[name] = value
      } else if !ignoredParameters.contains(name) {
        warnings.append(
          "\(path).\(name): \(method.name) has no parameter '\(name)' (its parameters: "
            + "\(method.parameters.map(\.name).joined(separator: ", "))); mergekit ignores it")
      }
    }
    return kept
  }

  /// Our dtype for the config's `out_dtype` (or `dtype`), if any.
  static func outputDType(_ f: [String: YAMLValue]) throws -> String? {
    guard let node = f["out_dtype"] ?? f["dtype"] else { return nil }
    let name = try node.string()
    guard let ours = dtypes[name] else {
      throw node.fail("unknown dtype '\(name)'; use \(dtypes.keys.sorted().joined(separator: ", "))")
    }
    return ours
  }

  /// A `slices:` configuration: each slice's `sources` (`model`, `layer_range: [start, end]`,
  /// `parameters`) and optional slice `parameters`, merged with the config's method.
  static func slicedRecipe(
    _ slicesNode: YAMLValue, root: YAMLValue, method: any MergeMethod, fields f: [String: YAMLValue], output: String
  ) throws -> Recipe {
    var slices: [SlicedMerge.Slice] = []
    var models: [String] = []
    var warnings: [String] = []
    for sliceNode in try slicesNode.list() {
      let s = try sliceNode.fields(["sources", "parameters", "base_model", "residual_weight"])
      guard let sourcesNode = s["sources"] else { throw sliceNode.fail("a slice needs 'sources'") }
      var sources: [SlicedMerge.Source] = []
      for sourceNode in try sourcesNode.list() {
        let e = try sourceNode.fields(["model", "layer_range", "parameters"])
        guard let model = try e["model"]?.string() else { throw sourceNode.fail("a source needs 'model'") }
        guard let rangeNode = e["layer_range"] else {
          throw sourceNode.fail("a source needs 'layer_range: [start, end]'")
        }
        let bounds = try rangeNode.list().map { item -> Int in
          guard let n = Int(try item.string()), n >= 0, n <= 1 << 20 else {
            throw item.fail("a layer index is a non-negative integer")
          }
          return n
        }
        guard bounds.count == 2, bounds[0] < bounds[1] else {
          throw rangeNode.fail("layer_range is [start, end] with start < end (end excluded)")
        }
        sources.append(
          SlicedMerge.Source(
            model: model, layers: bounds[0]..<bounds[1],
            parameters: declared(
              try e["parameters"]?.parameters() ?? [:], method: method, at: "\(sourceNode.path).parameters",
              warnings: &warnings)))
        if !models.contains(model) { models.append(model) }
      }
      slices.append(
        SlicedMerge.Slice(
          sources: sources,
          parameters: declared(
            try s["parameters"]?.parameters() ?? [:], method: method, at: "\(sliceNode.path).parameters",
            warnings: &warnings)))
    }
    let global = declared(
      try f["parameters"]?.parameters() ?? [:], method: method, at: "parameters", warnings: &warnings)
    let basePath = try f["base_model"]?.string()
    let sliced = SlicedMerge(method: method, base: basePath, slices: slices, global: global)
    let dtype = try outputDType(f)
    let inputs = ((basePath.map { [$0] } ?? []) + models.filter { $0 != basePath }).map { (label: $0, path: $0) }
    var recipe = Recipe(
      inputs: inputs, steps: [],
      outputs: [
        Recipe.Output(label: "merged", path: output, format: nil, dtype: dtype, shardSize: nil, location: "output")
      ], source: root.file, slicedMerge: sliced)
    recipe.warnings = warnings
    recipe.isMergekitConfiguration = true
    return recipe
  }

  static func recipe(from root: YAMLValue, output: String?) throws -> Recipe {
    let f = try root.fields([
      "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
      "slices", "chat_template", "name",
    ])
    let chatTemplate = try f["chat_template"].map { node -> String in
      let text = try node.string()
      guard ChatTemplates.isValid(text) else {
        throw node.fail(
          "'\(text)' is neither auto, a known template (\(ChatTemplates.named.keys.sorted().joined(separator: ", "))) nor a Jinja template"
        )
      }
      return text
    }
    var tokenizerSource = try f["tokenizer_source"]?.string()
    if let tokenizer = f["tokenizer"] {
      let t = try tokenizer.fields(["source", "tokens", "pad_to_multiple_of"])
      if let tokens = t["tokens"] ?? t["pad_to_multiple_of"] {
        throw tokens.fail("added or padded tokens change the vocabulary, which this version cannot merge yet")
      }
      tokenizerSource = try t["source"]?.string() ?? tokenizerSource
    }
    guard let methodNode = f["merge_method"] else { throw root.fail("missing merge_method") }
    let method: any MergeMethod
    do { method = try MergeRegistry.method(named: try methodNode.string()) } catch { throw methodNode.fail("\(error)") }
    if let slicesNode = f["slices"], try slicesNode.list().isEmpty {
      throw slicesNode.fail("lists no slice; give each slice its sources and layer_range")
    }
    guard let output else { throw root.fail("a mergekit configuration names no output; pass one with -o") }
    if let slicesNode = f["slices"] {
      guard f["models"] == nil else { throw slicesNode.fail("give either 'models' or 'slices', not both") }
      var recipe = try slicedRecipe(slicesNode, root: root, method: method, fields: f, output: output)
      recipe.chatTemplate = chatTemplate
      recipe.tokenizerSource = tokenizerSource
      return recipe
    }

    let basePath = try f["base_model"]?.string()
    var models: [String] = []
    var perModel: [[String: ParameterValue]] = []
    var lines = try f["parameters"]?.keyLines() ?? [:]
    var warnings: [String] = []
    for entry in try f["models"]?.list() ?? [] {
      let e = try entry.fields(["model", "parameters"])
      guard let model = e["model"] else { throw entry.fail("a model entry needs 'model'") }
      let path = try model.string()
      // mergekit lists the base among the models for some methods and skips it in the merge.
      if path == basePath && method.base != .unused { continue }
      lines.merge(try e["parameters"]?.keyLines(suffix: "@\(models.count)") ?? [:]) { a, _ in a }
      models.append(path)
      perModel.append(
        declared(
          try e["parameters"]?.parameters() ?? [:], method: method, at: "\(entry.path).parameters",
          warnings: &warnings))
    }
    let global = declared(
      try f["parameters"]?.parameters() ?? [:], method: method, at: "parameters", warnings: &warnings)
    let dtype = try outputDType(f)
    var inputs: [(label: String, path: String)] = models.map { ($0, $0) }
    if let basePath, method.base != .unused { inputs.insert((basePath, basePath), at: 0) }
    var step = Recipe.Step(
      label: "merged", operation: method.name, base: method.base == .unused ? nil : basePath, models: models,
      global: global, perModel: perModel,
      dtype: dtype, select: nil, drop: nil, renames: [], data: nil, location: "merge_method",
      parametersLocation: "parameters", modelsLocation: "models")
    step.parameterLines = lines
    var recipe = Recipe(
      inputs: inputs, steps: [step],
      outputs: [
        Recipe.Output(label: "merged", path: output, format: nil, dtype: dtype, shardSize: nil, location: "output")
      ], source: root.file)
    recipe.warnings = warnings
    recipe.isMergekitConfiguration = true
    recipe.chatTemplate = chatTemplate
    recipe.tokenizerSource = tokenizerSource
    return recipe
  }
}

/// Chat templates for mergekit's `chat_template:` key: `auto` (the template most of the input
/// models share), a name, or an inline Jinja template.
public enum ChatTemplates {
  /// Templates by name (our own text of each format).
  public static let named: [String: String] = [
    "chatml": """
    {%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}
    {%- endfor -%}
    {%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- endif -%}
    """
  ]

  /// Whether `text` can be a template: `auto`, a name, or Jinja (it has `{`) of 20 characters or more.
  public static func isValid(_ text: String) -> Bool {
    text == "auto" || named[text] != nil || (text.contains("{") && text.count >= 20)
  }

  /// The template of a model folder: `chat_template.jinja`, else tokenizer_config.json's
  /// `chat_template` (a string, or the `default` of a list of named templates).
  public static func template(ofModel folder: String) -> String? {
    if InputFile.isRegularFile(folder + "/chat_template.jinja"),
      let text = try? InputFile.readText(folder + "/chat_template.jinja")
    {
      return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }
    guard let config = try? InputFile.jsonObject(folder + "/tokenizer_config.json") else { return nil }
    if let text = config["chat_template"] as? String { return text.trimmingCharacters(in: .whitespacesAndNewlines) }
    let list = config["chat_template"] as? [[String: Any]]
    return (list?.first { $0["name"] as? String == "default" }?["template"] as? String)?
      .trimmingCharacters(in: .whitespacesAndNewlines)
  }

  /// The text `setting` stands for with `models` as the inputs: for `auto`, the template most
  /// of them have (the first such in input order on a tie), or nil when none has one.
  public static func resolve(_ setting: String, models: [String]) -> String? {
    guard setting == "auto" else { return named[setting] ?? setting }
    let templates = models.compactMap { ModelFolder.modelFolder(of: $0).flatMap(template(ofModel:)) }
    var counts: [String: Int] = [:]
    for template in templates { counts[template, default: 0] += 1 }
    return templates.max { counts[$0, default: 0] < counts[$1, default: 0] }
  }

  /// The files that carry `template` in an output whose tokenizer files come from `folder`:
  /// `chat_template.jinja`, and tokenizer_config.json with its `chat_template` replaced.
  public static func files(_ template: String, tokenizerFrom folder: String?) -> [String: Data] {
    var files = ["chat_template.jinja": Data((template + "\n").utf8)]
    if let folder, var config = try? InputFile.jsonObject(folder + "/tokenizer_config.json") {
      config["chat_template"] = template
      if let data = try? JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys]) {
        files["tokenizer_config.json"] = data
      }
    }
    return files
  }
}

/// Which tokenizer an output gets (mergekit's `tokenizer_source`): `base` (the base's, or the
/// first model's), `union`, or a model's. Merging is per tensor, so the embedding rows must
/// mean the same tokens in every model: all vocabularies must be the same, which is checked, and
/// the files then come from the chosen model. Differing vocabularies (which mergekit aligns by
/// token) are refused with a message.
public enum TokenizerSources {
  /// The vocabulary a model folder's tokenizer defines, comparable across models: the token to
  /// id map and the added tokens of tokenizer.json, else the bytes of its vocabulary files. Nil
  /// when the folder has no tokenizer.
  static func vocabulary(of folder: String) -> String? {
    if let tokenizer = try? InputFile.jsonObject(folder + "/tokenizer.json") {
      let model = tokenizer["model"] as? [String: Any]
      let parts: [Any] = [model?["vocab"] ?? NSNull(), tokenizer["added_tokens"] ?? NSNull()]
      if let data = try? JSONSerialization.data(withJSONObject: parts, options: [.sortedKeys]) {
        return String(decoding: data, as: UTF8.self)
      }
    }
    for name in ["tokenizer.model", "spiece.model", "vocab.json", "vocab.txt"]
    where InputFile.isRegularFile(folder + "/" + name) {
      if let bytes = try? InputFile.read(folder + "/" + name, limit: Int.max) {
        return name + ":" + String(XXHash64.hash(bytes))
      }
    }
    return nil
  }

  /// The model folder whose tokenizer files the output takes for `setting`, after checking that
  /// every input with a tokenizer has the same vocabulary. Throws `RecipeError.invalid` naming
  /// `tokenizer_source`.
  public static func folder(for setting: String, base: String?, models: [String], file: String) throws -> String? {
    let folders = ([base].compactMap { $0 } + models).compactMap(ModelFolder.modelFolder(of:))
    let vocabularies = folders.map { ($0, vocabulary(of: $0)) }.filter { $0.1 != nil }
    if let first = vocabularies.first, let other = vocabularies.first(where: { $0.1 != first.1 }) {
      throw RecipeError.invalid(
        file: file, path: "tokenizer_source", line: nil,
        reason:
          "the vocabularies of \(first.0) and \(other.0) differ; aligning embeddings by token (tokenizer_source "
          + "union or a model with another vocabulary) is not supported yet: merge models that share a vocabulary")
    }
    switch setting {
    case "base", "union": return base.flatMap(ModelFolder.modelFolder(of:)) ?? folders.first
    default:
      guard let folder = ModelFolder.modelFolder(of: setting), vocabulary(of: folder) != nil else {
        throw RecipeError.invalid(
          file: file, path: "tokenizer_source", line: nil,
          reason: "'\(setting)' is not base, union or a model folder with a tokenizer")
      }
      if let first = vocabularies.first, vocabulary(of: folder) != first.1 {
        throw RecipeError.invalid(
          file: file, path: "tokenizer_source", line: nil,
          reason:
            "the vocabulary of \(setting) differs from the merged models'; aligning embeddings is not supported yet")
      }
      return folder
    }
  }

  /// The tokenizer files of `folder`, read (regular files only) for writing into an output.
  static func files(in folder: String) throws -> [String: Data] {
    var files: [String: Data] = [:]
    for name in ModelFolder.tokenizerFiles where InputFile.isRegularFile(folder + "/" + name) {
      files[name] = Data(try InputFile.read(folder + "/" + name, limit: Int.max))
    }
    return files
  }
}
