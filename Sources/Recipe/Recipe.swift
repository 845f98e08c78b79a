import Checkpoint
import Foundation
import Merge
import Operations
import Yams

/// A recipe: named inputs, steps that each run one operation (a merge method, `task-vector`,
/// `apply`, `convert`, or a data-driven step: `synthetic-data`, `synthetic-tokens`, `train`, `zip`, `atlas`, `pela`, `extract-lora`, `mkv`, `eval`) on
/// earlier inputs or step results, and outputs written from any of them.
///
/// ```yaml
/// inputs:
///   base: demo/base
///   a: demo/finetune-a
///   b: demo/finetune-b
/// steps:
///   - name: merged
///     method: ties
///     base: base
///     models:
///       - a
///       - {model: b, parameters: {weight: 0.7}}
///     parameters: {density: 0.5}
/// outputs:
///   merged: {path: demo/merged, dtype: bf16}
/// ```
/// Paths are relative to the current directory. A reference that is not a label is a path.
public struct Recipe: Sendable {
  public struct Step: Sendable {
    public var label: String
    /// A registered merge method, or `task-vector`, `apply`, `convert`.
    public var operation: String
    public var base: String?
    public var models: [String]
    public var global: [String: ParameterValue]
    public var perModel: [[String: ParameterValue]]
    public var dtype: String?
    /// `convert` only.
    public var select: String?
    public var drop: String?
    public var renames: [String]
    /// `convert` only: layer ranges to stack (`0-8,4-12`).
    public var layers: String?
    /// Data set of a data-driven step (`train`, `zip`, `eval`): a label or a path.
    public var data: String?
    /// A merge step copies tensors some models lack from the base and ignores tensors only some
    /// have (`allow_missing: true`, as `--allow-missing`).
    public var allowMissing = false
    /// A merge step chooses its `alpha` on `data` among `start:end:step` (`alpha_search`, as
    /// `--alpha-search`).
    public var alphaSearch: String?
    /// Where the step sits in the file, for errors (`steps[1]`).
    public var location: String
    /// The YAML path of its parameters (`steps[1].parameters`; `parameters` in a mergekit
    /// configuration) and of its model list, for errors naming one parameter.
    public var parametersLocation: String
    public var modelsLocation: String
    /// The line of each parameter given in the file (global ones by name, per-model ones as
    /// `name@i`).
    public var parameterLines: [String: Int] = [:]

    public init(
      label: String, operation: String, base: String?, models: [String], global: [String: ParameterValue],
      perModel: [[String: ParameterValue]], dtype: String?,
      select: String?, drop: String?, renames: [String], data: String?, location: String,
      parametersLocation: String? = nil, modelsLocation: String? = nil
    ) {
      (self.label, self.operation, self.base, self.models, self.global, self.perModel) = (
        label, operation, base, models, global, perModel
      )
      (self.dtype, self.select, self.drop, self.renames, self.data, self.location) = (
        dtype, select, drop, renames, data, location
      )
      self.parametersLocation = parametersLocation ?? "\(location).parameters"
      self.modelsLocation = modelsLocation ?? "\(location).models"
    }

    /// The YAML path of parameter `name` (of model `model`, 0-based, for per-model ones).
    public func parameterPath(_ name: String, model: Int? = nil) -> String {
      guard let model else { return "\(parametersLocation).\(name)" }
      return "\(modelsLocation)[\(model)].parameters.\(name)"
    }

    /// The line of parameter `name`, when the file gave it.
    public func parameterLine(_ name: String, model: Int? = nil) -> Int? {
      parameterLines[model.map { "\(name)@\($0)" } ?? name]
    }

    /// Everything the step reads (labels or paths): base, data set, models.
    public var references: [String] { (base.map { [$0] } ?? []) + (data.map { [$0] } ?? []) + models }
  }

  public struct Output: Sendable {
    public var label: String
    public var path: String
    public var format: String?
    public var dtype: String?
    public var shardSize: String?
    public var location: String
  }

  public var inputs: [(label: String, path: String)]
  public var steps: [Step]
  public var outputs: [Output]
  /// The file it came from (for messages).
  public var source: String
  /// A mergekit `slices:` configuration: the one merge the recipe makes (no steps), written to
  /// its one output.
  public var slicedMerge: SlicedMerge?
  /// The YAML text the recipe was read from (written into outputs as `mergekit_config.yml`).
  public var text: String?
  /// mergekit's `tokenizer_source` or `tokenizer:` block: the output's tokenizer, tokens to
  /// add and padding; the inputs' vocabulary tensors are aligned to it.
  public var tokenizer: TokenizerSettings?
  /// mergekit's `chat_template`: `auto`, a name or a Jinja template, written into the outputs.
  public var chatTemplate: String?
  /// mergekit's `--unsafe-truncate-embeddings`: without tokenizer settings, vocabulary tensors
  /// are cut to the smallest vocabulary's rows, token ids assumed equal.
  public var truncatesEmbeddings = false
  /// How merges compute (`compute: exact | mergekit`; exact by default).
  public var compute = "exact"
  /// mergekit's compute dtype (a mergekit configuration's `dtype`, in our spelling); without
  /// it, mergekit's arithmetic rounds to a step's dtype, else each tensor's own.
  public var computeDType: String?
  /// Whether the file is a mergekit configuration (`merge_method` at the top).
  public var isMergekitConfiguration = false
  /// What was accepted but ignored, as mergekit ignores it (parameters the method does not
  /// declare), each naming its YAML path.
  public var warnings: [String] = []

  public init(
    inputs: [(label: String, path: String)], steps: [Step], outputs: [Output], source: String,
    slicedMerge: SlicedMerge? = nil
  ) {
    self.inputs = inputs
    self.steps = steps
    self.outputs = outputs
    self.source = source
    self.slicedMerge = slicedMerge
  }
}

/// A recipe that cannot run: each case names the file and the YAML path.
public enum RecipeError: Error, CustomStringConvertible, Equatable {
  /// The file cannot be read, or is not YAML.
  case unreadable(file: String, reason: String)
  /// A value at a YAML path (and line, when known) that the recipe cannot use: a usage error.
  case invalid(file: String, path: String, line: Int?, reason: String)
  /// Steps that read each other in a cycle.
  case cycle(file: String, steps: [String])
  /// A step that failed while planning or running (the inputs' contents): not a usage error.
  case stepFailed(file: String, path: String, step: String, reason: String)

  public var description: String {
    switch self {
    case .unreadable(let file, let reason): return "\(file): \(reason)"
    case .invalid(let file, let path, let line, let reason):
      return "\(file)\(line.map { ":\($0)" } ?? ""): \(path): \(reason)"
    case .cycle(let file, let steps):
      return "\(file): steps depend on each other in a cycle: \(steps.joined(separator: " -> "))"
    case .stepFailed(let file, let path, let step, let reason): return "\(file): \(path) (\(step)): \(reason)"
    }
  }
}

/// A YAML node with its path in the document, for precise errors.
struct YAMLValue {
  let node: Node
  let path: String
  let file: String

  func fail(_ reason: String) -> RecipeError { .invalid(file: file, path: path, line: node.mark?.line, reason: reason) }

  var isScalar: Bool { if case .scalar = node { return true } else { return false } }

  func string() throws -> String {
    guard case .scalar(let scalar) = node else { throw fail("expected a single value") }
    return scalar.string
  }

  func map() throws -> [(key: String, value: YAMLValue)] {
    guard case .mapping(let mapping) = node else { throw fail("expected a mapping (key: value lines)") }
    return try mapping.map { key, value in
      guard let name = key.string else { throw fail("keys must be plain words") }
      return (name, YAMLValue(node: value, path: path.isEmpty ? name : "\(path).\(name)", file: file))
    }
  }

  func list() throws -> [YAMLValue] {
    guard case .sequence(let sequence) = node else { throw fail("expected a list") }
    return sequence.enumerated().map { YAMLValue(node: $1, path: "\(path)[\($0)]", file: file) }
  }

  /// Checks that a mapping has only `allowed` keys and returns it as a dictionary.
  func fields(_ allowed: [String]) throws -> [String: YAMLValue] {
    var result: [String: YAMLValue] = [:]
    for (key, value) in try map() {
      guard allowed.contains(key) else {
        throw value.fail("unknown key '\(key)'; expected one of \(allowed.joined(separator: ", "))")
      }
      result[key] = value
    }
    return result
  }

  /// A parameter value: a number, true/false, a word, a list of numbers (a gradient across
  /// layers), or a list of `{filter, value}` entries.
  func parameter() throws -> ParameterValue {
    switch node {
    case .scalar:
      if let bool = node.bool, ["true", "false", "yes", "no"].contains(node.string?.lowercased() ?? "") {
        return .flag(bool)
      }
      if let number = node.float ?? node.int.map(Double.init) { return .number(number) }
      return .text(try string())
    case .sequence:
      let items = try list()
      if items.allSatisfy(\.isScalar) {
        return .gradient(
          try items.map { item in
            guard let x = item.node.float ?? item.node.int.map(Double.init) else {
              throw item.fail("a gradient lists numbers")
            }
            return x
          })
      }
      return .filtered(
        try items.map { item in
          let f = try item.fields(["filter", "value"])
          guard let value = f["value"] else { throw item.fail("a filtered entry needs 'value'") }
          return .init(filter: try f["filter"]?.string(), value: try value.parameter())
        })
    default:
      throw fail("expected a number, true/false, a word or a list")
    }
  }

  func parameters() throws -> [String: ParameterValue] {
    var result: [String: ParameterValue] = [:]
    for (key, value) in try map() { result[key] = try value.parameter() }
    return result
  }

  /// The line (1-based) of each key of a mapping.
  func keyLines(suffix: String = "") throws -> [String: Int] {
    var result: [String: Int] = [:]
    for (key, value) in try map() { result[key + suffix] = value.node.mark?.line }
    return result
  }
}

extension Recipe {
  /// Reads a recipe file: ours, or a mergekit configuration (recognised by `merge_method`).
  /// `output` is where a mergekit configuration's result goes (mergekit takes it on the command line).
  public static func load(_ file: String, output: String? = nil) throws -> Recipe {
    let text: String
    do { text = try InputFile.readText(file, limit: Recipe.maxFileSize) } catch let error as CheckpointError {
      let message = error.description
      let prefix = file + ": "
      throw RecipeError.unreadable(
        file: file, reason: message.hasPrefix(prefix) ? String(message.dropFirst(prefix.count)) : message)
    }
    return try parse(text, file: file, output: output)
  }

  /// What a step name or input label may be: letters, digits, `.`, `_` and `-`, not starting
  /// with `.` (so `..` and hidden names are out). Names also name temporary files, so they must
  /// never be paths.
  public static func isIdentifier(_ name: String) -> Bool {
    !name.isEmpty && name.utf8.first != UInt8(ascii: ".") && name.utf8.count <= 200
      && name.utf8.allSatisfy { c in
        (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2E || c == 0x5F
          || c == 0x2D
      }
  }
  static let identifierRule = "use letters, digits, '.', '_' and '-' (at most 200), not starting with '.'"

  /// The largest recipe or mergekit configuration file read: 16 MiB.
  public static let maxFileSize = 16 << 20
  /// The most YAML nodes a recipe may expand to, each alias counted at every place it is used,
  /// so that a few lines of nested aliases (a "billion laughs") cannot make a run spin.
  public static let maxNodeCount = 100_000

  /// Spends one unit of `budget` per node of the tree under `node`, aliases expanded; false as
  /// soon as it runs out (so the walk itself never exceeds the budget).
  static func withinBudget(_ node: Node, _ budget: inout Int) -> Bool {
    budget -= 1
    guard budget >= 0 else { return false }
    switch node {
    case .scalar, .alias: return true
    case .sequence(let items): return items.allSatisfy { withinBudget($0, &budget) }
    case .mapping(let pairs):
      return pairs.allSatisfy { withinBudget($0.key, &budget) && withinBudget($0.value, &budget) }
    }
  }

  public static func parse(_ text: String, file: String, output: String? = nil) throws -> Recipe {
    let node: Node
    do {
      guard let parsed = try Yams.compose(yaml: text) else {
        throw RecipeError.unreadable(file: file, reason: "the file is empty")
      }
      node = parsed
      var budget = maxNodeCount
      guard withinBudget(node, &budget) else {
        throw RecipeError.unreadable(
          file: file,
          reason:
            "the YAML expands to more than \(maxNodeCount) nodes (aliases and merge keys counted at each use); "
            + "a recipe is far smaller")
      }
    } catch let error as RecipeError {
      throw error
    } catch {
      // The parser quotes the offending line; a hostile file's line can be megabytes long.
      let message = "\(error)".split(separator: "\n", omittingEmptySubsequences: false).prefix(6).map {
        $0.count > 160 ? $0.prefix(160) + "..." : $0
      }
      throw RecipeError.unreadable(file: file, reason: "not valid YAML: " + message.joined(separator: "\n"))
    }
    let root = YAMLValue(node: node, path: "", file: file)
    let keys = try root.map().map(\.key)
    var recipe =
      keys.contains("merge_method")
      ? try MergekitConfig.recipe(from: root, output: output) : try parseOurs(root, output: output)
    recipe.text = text
    if let node = try root.map().first(where: { $0.key == "compute" })?.value {
      let mode = try node.string()
      guard ["exact", "mergekit"].contains(mode) else {
        throw node.fail("'\(mode)' is not a compute mode; use exact (the default) or mergekit (mergekit's rounding)")
      }
      recipe.compute = mode
    }
    return recipe
  }

  static func parseOurs(_ root: YAMLValue, output: String?) throws -> Recipe {
    let top = try root.fields(["inputs", "steps", "outputs", "compute"])
    var inputs: [(String, String)] = []
    for (label, value) in try top["inputs"]?.map() ?? [] {
      guard isIdentifier(label) else { throw value.fail("'\(label)' is not a name: \(identifierRule)") }
      inputs.append((label, try value.string()))
    }
    var steps: [Step] = []
    for item in try top["steps"]?.list() ?? [] {
      let f = try item.fields([
        "name", "method", "base", "models", "model", "data", "parameters", "dtype", "select", "drop", "rename",
        "layers", "allow_missing", "alpha_search",
      ])
      guard let label = try f["name"]?.string() else { throw item.fail("a step needs a 'name' (its result's label)") }
      guard let operation = try f["method"]?.string() else {
        throw item.fail("a step needs a 'method' (a merge method, task-vector, apply or convert)")
      }
      var models: [String] = []
      var perModel: [[String: ParameterValue]] = []
      var lines = try f["parameters"]?.keyLines() ?? [:]
      if let single = f["model"] {
        models.append(try single.string())
        perModel.append([:])
      }
      for entry in try f["models"]?.list() ?? [] {
        if entry.isScalar {
          models.append(try entry.string())
          perModel.append([:])
        } else {
          let e = try entry.fields(["model", "parameters"])
          guard let model = e["model"] else { throw entry.fail("a model entry needs 'model'") }
          lines.merge(try e["parameters"]?.keyLines(suffix: "@\(models.count)") ?? [:]) { a, _ in a }
          models.append(try model.string())
          perModel.append(try e["parameters"]?.parameters() ?? [:])
        }
      }
      var step =
        Step(
          label: label, operation: operation, base: try f["base"]?.string(), models: models,
          global: try f["parameters"]?.parameters() ?? [:],
          perModel: perModel, dtype: try f["dtype"]?.string(), select: try f["select"]?.string(),
          drop: try f["drop"]?.string(),
          renames: try f["rename"].map { try $0.isScalar ? [$0.string()] : $0.list().map { try $0.string() } } ?? [],
          data: try f["data"]?.string(),
          location: item.path)
      step.parameterLines = lines
      step.layers = try f["layers"]?.string()
      step.alphaSearch = try f["alpha_search"]?.string()
      if let allow = f["allow_missing"] {
        guard let flag = allow.node.bool else { throw allow.fail("allow_missing is true or false") }
        step.allowMissing = flag
      }
      steps.append(step)
    }
    var outputs: [Output] = []
    for (label, value) in try top["outputs"]?.map() ?? [] {
      if value.isScalar {
        outputs.append(Output(label: label, path: try value.string(), location: value.path))
      } else {
        let f = try value.fields(["path", "format", "dtype", "shard_size"])
        guard let path = f["path"] else { throw value.fail("an output needs 'path'") }
        outputs.append(
          Output(
            label: label, path: try path.string(), format: try f["format"]?.string(), dtype: try f["dtype"]?.string(),
            shardSize: try f["shard_size"]?.string(), location: value.path))
      }
    }
    if let output, outputs.count == 1 { outputs[0].path = output }
    guard !outputs.isEmpty else { throw root.fail("the recipe writes nothing: add an 'outputs' section") }
    return Recipe(inputs: inputs, steps: steps, outputs: outputs, source: root.file)
  }
}

extension Recipe.Output {
  init(label: String, path: String, location: String) {
    self.init(label: label, path: path, format: nil, dtype: nil, shardSize: nil, location: location)
  }
}
