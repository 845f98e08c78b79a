/// Errors of the Operations target. Most are requests refused before running (`isUsage`: the
/// CLI exits 64, a recipe names the YAML path); the merge-plan cases are inputs that do not
/// line up (exit 1). Messages speak of parameters by their recipe names; the shells render them
/// as flags (`--batch-size`) or YAML paths (`steps[1].parameters.batch_size`) through
/// `parameter` and `reason`.
public enum OperationError: Error, CustomStringConvertible, Equatable {
  /// No operation or merge method has this name.
  case unknownOperation(String, known: [String])
  /// The operation declares no parameter of this name.
  case unknownParameter(operation: String, name: String, known: [String])
  /// A parameter's value has the wrong kind or is out of its range.
  case invalidParameter(operation: String, name: String, value: String, reason: String)
  /// A required parameter was not given.
  case missingParameter(operation: String, name: String, help: String)
  /// Parameters that cannot go together, or one that needs another (`distill` needs data).
  case conflict(operation: String, name: String, reason: String)
  /// The models, base or data given do not suit the operation.
  case inputs(operation: String, reason: String)
  /// An input path (model, base, data or a path parameter) does not exist.
  case missingInput(operation: String, role: String, path: String)
  /// The output exists and replacing it was not asked for.
  case outputExists(path: String)
  /// The output path is missing or of the wrong kind.
  case badOutput(operation: String, reason: String)
  /// The same path is written twice, or written while being read.
  case outputClash(path: String, reason: String)
  /// A merge input lacks tensors the reference has.
  case missingTensors(file: String, names: [String])
  /// A merge input has tensors the reference lacks.
  case extraTensors(file: String, names: [String])
  /// One tensor name with different shapes across the inputs.
  case shapeMismatch(tensor: String, shapes: [String])
  /// An integer tensor that differs between inputs (integers are copied, never merged).
  case integerMismatch(tensor: String, file: String)
  /// No floating-point tensor to merge.
  case noFloatingTensors
  /// A mergekit `slices:` configuration that cannot be built (empty, uneven or missing layers).
  case slices(reason: String)
  /// A tokenizer that cannot be read or vocabularies that cannot be aligned (`file` is the
  /// model folder or tokenizer file).
  case vocabulary(file: String, reason: String)

  /// Whether the error is in what the user asked (exit 64) rather than in the inputs' contents.
  public var isUsage: Bool {
    switch self {
    case .missingTensors, .extraTensors, .shapeMismatch, .integerMismatch, .noFloatingTensors, .vocabulary:
      return false
    default: return true
    }
  }

  /// The parameter the error is about, if any.
  public var parameter: String? {
    switch self {
    case .unknownParameter(_, let name, _), .invalidParameter(_, let name, _, _), .missingParameter(_, let name, _),
      .conflict(_, let name, _):
      return name
    default: return nil
    }
  }

  /// The message without the operation and parameter names, for shells that name them their way.
  public var reason: String {
    switch self {
    case .unknownOperation(let name, let known):
      return "unknown operation '\(name)'; available: \(known.joined(separator: ", "))"
    case .unknownParameter(_, _, let known):
      return "unknown parameter; it takes \(known.isEmpty ? "none" : known.joined(separator: ", "))"
    case .invalidParameter(_, _, let value, let reason): return "'\(value)' \(reason)"
    case .missingParameter(_, _, let help): return "is required (\(help))"
    case .conflict(_, _, let reason), .inputs(_, let reason), .badOutput(_, let reason): return reason
    case .missingInput(_, let role, let path): return "\(role) '\(path)' does not exist"
    case .outputExists(let path): return "'\(path)' already exists; allow replacing it (overwrite)"
    case .outputClash(let path, let reason): return "'\(path)' \(reason)"
    case .missingTensors(let file, let names):
      return
        "\(file) lacks \(names.count) tensor\(names.count == 1 ? "" : "s") the others have: \(Self.list(names)) (allow_missing: true in a recipe step, --allow-missing on the command line, takes them from the base)"
    case .extraTensors(let file, let names):
      return
        "\(file) has \(names.count) tensor\(names.count == 1 ? "" : "s") the reference lacks: \(Self.list(names)) (allow_missing: true in a recipe step, --allow-missing on the command line, ignores them)"
    case .shapeMismatch(let tensor, let shapes):
      let vocabulary = ["embed", "lm_head", "wte", "word_embeddings"].contains { tensor.contains($0) }
      return "tensor '\(tensor)' has different shapes: \(shapes.joined(separator: ", "))"
        + (vocabulary
          ? "; the models' vocabularies differ: align them by token with tokenizer_source (base, union or a model)"
          : "")
    case .integerMismatch(let tensor, let file):
      return
        "integer tensor '\(tensor)' of \(file) differs from the reference; integer tensors cannot be merged, only copied"
    case .noFloatingTensors: return "the inputs hold no floating-point tensors to merge"
    case .slices(let reason): return reason
    case .vocabulary(let file, let reason): return file.isEmpty ? reason : "\(file) \(reason)"
    }
  }

  private static func list(_ names: [String]) -> String {
    names.prefix(8).joined(separator: ", ") + (names.count > 8 ? " and \(names.count - 8) more" : "")
  }

  /// The message with parameters named by `render` (a flag or a YAML path).
  public func message(naming render: (String) -> String) -> String {
    switch self {
    case .unknownParameter(let operation, let name, _), .invalidParameter(let operation, let name, _, _),
      .missingParameter(let operation, let name, _),
      .conflict(let operation, let name, _):
      return "\(operation): \(render(name)): \(reason)"
    case .inputs(let operation, _), .missingInput(let operation, _, _), .badOutput(let operation, _):
      return "\(operation): \(reason)"
    default: return reason
    }
  }

  public var description: String { message { "parameter '\($0)'" } }
}
