import Merge

/// Reads mergekit's own YAML configuration (`mergekit-yaml config.yml OUT`) as a one-step recipe,
/// for the methods both tools have, so existing configs run unchanged:
/// `merge_method`, `base_model`, `models` (each `model` with `parameters`), `parameters`,
/// `dtype`, and `tokenizer_source: base` (the base's tokenizer files are copied; other
/// tokenizer sources, `slices` and `chat_template` are refused with a clear message).
enum MergekitConfig {
  /// mergekit's dtype names.
  static let dtypes = [
    "bfloat16": "bf16", "float16": "f16", "half": "f16", "float32": "f32", "float": "f32", "float64": "f64",
  ]
  /// mergekit parameters that change nothing in our computation (memory or speed hints).
  static let ignoredParameters: Set<String> = ["int8_mask"]

  static func recipe(from root: YAMLValue, output: String?) throws -> Recipe {
    let f = try root.fields([
      "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
      "slices", "chat_template", "name",
    ])
    if let slices = f["slices"] {
      throw slices.fail("mergekit 'slices' (layer-range merges) are not supported yet; merge whole models")
    }
    if let template = f["chat_template"] {
      throw template.fail("'chat_template' is not supported; copy the template into the output's tokenizer_config.json")
    }
    if let tokenizer = f["tokenizer"] {
      throw tokenizer.fail("'tokenizer' settings are not supported; the base model's tokenizer files are copied")
    }
    if let source = f["tokenizer_source"], try source.string() != "base" {
      throw source.fail(
        "tokenizer_source '\(try source.string())' is not supported; only 'base' (the base model's tokenizer files are copied)"
      )
    }
    guard let methodNode = f["merge_method"] else { throw root.fail("missing merge_method") }
    let method: any MergeMethod
    do { method = try MergeRegistry.method(named: try methodNode.string()) } catch { throw methodNode.fail("\(error)") }
    guard let output else { throw root.fail("a mergekit configuration names no output; pass one with -o") }

    let basePath = try f["base_model"]?.string()
    var models: [String] = []
    var perModel: [[String: ParameterValue]] = []
    var lines = try f["parameters"]?.keyLines() ?? [:]
    for entry in try f["models"]?.list() ?? [] {
      let e = try entry.fields(["model", "parameters"])
      guard let model = e["model"] else { throw entry.fail("a model entry needs 'model'") }
      let path = try model.string()
      // mergekit lists the base among the models for some methods and skips it in the merge.
      if path == basePath && method.base != .unused { continue }
      lines.merge(try e["parameters"]?.keyLines(suffix: "@\(models.count)") ?? [:]) { a, _ in a }
      models.append(path)
      perModel.append(try e["parameters"]?.parameters().filter { !ignoredParameters.contains($0.key) } ?? [:])
    }
    var global = try f["parameters"]?.parameters() ?? [:]
    for name in ignoredParameters { global[name] = nil }
    var dtype: String?
    if let node = f["out_dtype"] ?? f["dtype"] {
      let name = try node.string()
      guard let ours = dtypes[name] else {
        throw node.fail("unknown dtype '\(name)'; use \(dtypes.keys.sorted().joined(separator: ", "))")
      }
      dtype = ours
    }
    var inputs: [(label: String, path: String)] = models.map { ($0, $0) }
    if let basePath, method.base != .unused { inputs.insert((basePath, basePath), at: 0) }
    var step = Recipe.Step(
      label: "merged", operation: method.name, base: method.base == .unused ? nil : basePath, models: models,
      global: global, perModel: perModel,
      dtype: dtype, select: nil, drop: nil, renames: [], data: nil, location: "merge_method",
      parametersLocation: "parameters", modelsLocation: "models")
    step.parameterLines = lines
    return Recipe(
      inputs: inputs, steps: [step],
      outputs: [
        Recipe.Output(label: "merged", path: output, format: nil, dtype: dtype, shardSize: nil, location: "output")
      ], source: root.file)
  }
}
