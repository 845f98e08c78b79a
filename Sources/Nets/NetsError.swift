/// Errors of the Nets runtime: a model that cannot be built from its config and tensors, or data
/// that does not fit it. Each names the config key, tensor or file involved.
public enum NetsError: Error, CustomStringConvertible, Equatable {
  case unknownArchitecture(String)
  case missingConfigKey(String)
  case invalidConfig(key: String, reason: String)
  case missingTensors([String])
  case shapeMismatch(tensor: String, expected: [Int], found: [Int])
  case inputMismatch(String)
  case invalidData(file: String, reason: String)

  public var description: String {
    switch self {
    case .unknownArchitecture(let name):
      return
        "unknown architecture '\(name)': supported are MLP, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and BertModel"
    case .missingConfigKey(let key):
      return "config.json lacks '\(key)', which this architecture needs"
    case .invalidConfig(let key, let reason):
      return "config.json '\(key)' is invalid: \(reason)"
    case .missingTensors(let names):
      let shown = names.prefix(6).joined(separator: ", ") + (names.count > 6 ? " and \(names.count - 6) more" : "")
      return "the checkpoint lacks \(names.count) tensor\(names.count == 1 ? "" : "s") the architecture needs: \(shown)"
    case .shapeMismatch(let tensor, let expected, let found):
      return "tensor '\(tensor)' has shape \(found), the config implies \(expected)"
    case .inputMismatch(let reason):
      return "the input does not fit the model: \(reason)"
    case .invalidData(let file, let reason):
      return "\(file): \(reason)"
    }
  }
}

extension Dictionary where Key == String {
  /// The value of a tensor name that must be present: a missing one is `NetsError.missingTensors`
  /// naming it (where a network's invariants promise presence, a bug; elsewhere, a bad input).
  public func required(_ name: String) throws -> Value {
    guard let value = self[name] else { throw NetsError.missingTensors([name]) }
    return value
  }
}
