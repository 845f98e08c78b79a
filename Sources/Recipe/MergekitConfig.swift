import Checkpoint
import Foundation
import Merge
import Operations
import Tensor

/// Reads mergekit's own YAML configuration (`mergekit-yaml config.yml OUT`) as a one-step recipe,
/// for the methods both tools have, so existing configs run unchanged:
/// `merge_method`, `base_model`, `models` (each `model` with `parameters`), `parameters`,
/// `dtype`, `tokenizer_source` and the `tokenizer:` block (the output's tokenizer, with the
/// inputs' embedding and LM-head rows aligned to it by token, `VocabularyAlignment`),
/// `chat_template` (`auto`, `chatml` or an inline Jinja template, written with the output's
/// tokenizer files) and `slices` (layer ranges merged slice by slice, `SlicedMerge`).
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
  /// mergekit's compute dtype: `dtype` (not `out_dtype`), in our spelling.
  static func computeDType(_ f: [String: YAMLValue]) throws -> String? {
    guard let node = f["dtype"] else { return nil }
    return dtypes[try node.string()]
  }

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
      // `residual_weight` is part of mergekit's schema but no merge reads it; it is ignored.
      slices.append(
        SlicedMerge.Slice(
          sources: sources,
          parameters: declared(
            try s["parameters"]?.parameters() ?? [:], method: method, at: "\(sliceNode.path).parameters",
            warnings: &warnings),
          base: try s["base_model"]?.string()))
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
      "slices", "chat_template", "name", "compute",
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
    let tokenizer = try tokenizerSettings(f)
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
      recipe.tokenizer = tokenizer
      recipe.computeDType = try computeDType(f)
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
    recipe.tokenizer = tokenizer
    recipe.computeDType = try computeDType(f)
    return recipe
  }
}

extension MergekitConfig {
  /// The tokenizer settings of `tokenizer_source` or the `tokenizer:` block (`source`, default
  /// union; `tokens` with `source` and `force`; `pad_to_multiple_of`), or nil for neither.
  static func tokenizerSettings(_ f: [String: YAMLValue]) throws -> TokenizerSettings? {
    guard let block = f["tokenizer"] else {
      return try f["tokenizer_source"].map { TokenizerSettings(source: .init(try $0.string())) }
    }
    let t = try block.fields(["source", "tokens", "pad_to_multiple_of"])
    var settings = TokenizerSettings(source: .init(try t["source"]?.string() ?? "union"))
    if let node = t["pad_to_multiple_of"] {
      guard let multiple = node.node.int, multiple >= 1, multiple <= 1 << 20 else {
        throw node.fail("expected a whole number from 1 to 1048576")
      }
      settings.padToMultipleOf = multiple
    }
    for (token, entry) in try t["tokens"]?.map() ?? [] {
      let e = try entry.fields(["source", "force"])
      var force = false
      if let node = e["force"] {
        guard let flag = node.node.bool else { throw node.fail("expected true or false") }
        force = flag
      }
      settings.tokens.append(.init(text: token, source: try e["source"].map(rowSource), force: force))
    }
    return settings
  }

  /// A token's row source: a model, `{kind: zero}`, or `{kind: model_token, model, token |
  /// token_id}`.
  static func rowSource(_ node: YAMLValue) throws -> TokenizerSettings.RowSource {
    if node.isScalar { return .model(try node.string()) }
    let f = try node.fields(["kind", "model", "token", "token_id"])
    switch try f["kind"]?.string() {
    case "zero"?: return .zero
    case "model_token"?:
      guard let model = f["model"] else { throw node.fail("a model_token source needs 'model'") }
      let id = try f["token_id"].map { value -> Int in
        guard let id = value.node.int, id >= 0 else { throw value.fail("expected a token id (a whole number)") }
        return id
      }
      let token = try f["token"]?.string()
      guard (id == nil) != (token == nil) else { throw node.fail("give exactly one of 'token' and 'token_id'") }
      return .modelToken(model: try model.string(), token: token, id: id)
    default:
      throw node.fail("a token source is a model, {kind: zero} or {kind: model_token, model, token}")
    }
  }
}

/// Chat templates for mergekit's `chat_template:` key: `auto` (the template most of the input
/// models share), a name, or an inline Jinja template.
public enum ChatTemplates {
  /// Templates by name, as mergekit names them (our own text of each format).
  public static let named: [String: String] = [
    "chatml": """
    {%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}
    {%- endfor -%}
    {%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- endif -%}
    """,
    "llama3": """
    {%- for message in messages -%}
    {%- if loop.first -%}{{- bos_token -}}{%- endif -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
    {%- endfor -%}
    {%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
    {%- endif -%}
    """,
    "mistral": """
    {%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}
    {%- set turns = messages[1:] if system is not none else messages -%}
    {{- bos_token -}}
    {%- for message in turns -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('roles must alternate user and assistant after an optional system message') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
    {{- ' [INST] ' + (system + '\n\n' if loop.first and system is not none else '') + message['content'] + ' [/INST]' -}}
    {%- else -%}
    {{- ' ' + message['content'] + eos_token -}}
    {%- endif -%}
    {%- endfor -%}
    """,
    "alpaca": """
    {%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}
    {{- (systems | last).content | trim if systems else '' -}}
    {{- '\n\n' -}}
    {%- set headings = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} -%}
    {%- for message in messages if message['role'] in headings -%}
    {{- headings[message['role']] + '\n' + message['content'] | trim -}}
    {%- if not loop.last -%}{{- '\n\n' -}}{%- endif -%}
    {%- endfor -%}
    {%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}
    {{- '\n\n### Response:\n' -}}
    {%- endif -%}
    """,
    "exaone": """
    {%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}{{- '[|system|][|endofturn|]\n' -}}{%- endif -%}
    {{- '[|' + message['role'] + '|]' + message['content'] -}}
    {{- '\n' if message['role'] == 'user' else '[|endofturn|]\n' -}}
    {%- endfor -%}
    {%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}
    """,
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

  /// The files that carry `template` in an output whose tokenizer_config.json is `config`:
  /// `chat_template.jinja`, and tokenizer_config.json with its `chat_template` replaced.
  public static func files(_ template: String, tokenizerConfig config: [String: Any]?) -> [String: Data] {
    var files = ["chat_template.jinja": Data((template + "\n").utf8)]
    if var config {
      config["chat_template"] = template
      if let data = try? JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys]) {
        files["tokenizer_config.json"] = data
      }
    }
    return files
  }
}
