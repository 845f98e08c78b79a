/// Errors of the Nets runtime: a model that cannot be built from its config and tensors, or data
/// that does not fit it. Each names the config key, tensor or file involved.
public enum NetsError: Error, CustomStringConvertible, Equatable {
  /// config.json names an architecture the runtime does not build.
  case unknownArchitecture(String)
  /// config.json lacks a key the architecture needs.
  case missingConfigKey(String)
  /// A config.json value the runtime cannot use, and why.
  case invalidConfig(key: String, reason: String)
  /// Tensors the architecture reads that the checkpoint lacks.
  case missingTensors([String])
  /// A tensor whose shape is not the one the config implies.
  case shapeMismatch(tensor: String, expected: [Int], found: [Int])
  /// An operation given a model of another kind (`classification training` needs `an MLP`).
  case wrongModel(operation: String, needs: String)
  /// Input of the wrong kind for the model (token sequences for an MLP, feature rows for a transformer).
  case wrongInput(model: String, takes: String)
  /// Feature rows whose width is not the MLP's input width.
  case featureCount(model: Int, data: Int)
  /// Labels beyond the model's outputs.
  case classCount(labels: Int, outputs: Int)
  /// A token id outside the vocabulary.
  case tokenOutOfVocabulary(token: Int, vocabulary: Int)
  /// Sequences longer than the model's positions.
  case sequenceTooLong(tokens: Int, positions: Int)
  /// A data file or set that cannot be used, and why.
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
    case .wrongModel(let operation, let needs): return "\(operation) takes \(needs)"
    case .wrongInput(let model, let takes): return "\(model) takes \(takes)"
    case .featureCount(let model, let data):
      return "the input does not fit the model: the MLP takes \(model) features, the data has \(data)"
    case .classCount(let labels, let outputs):
      return
        "the input does not fit the model: the data has labels up to \(labels - 1), the model has \(outputs) outputs"
    case .tokenOutOfVocabulary(let token, let vocabulary):
      return "the input does not fit the model: token id \(token) is outside the vocabulary of \(vocabulary)"
    case .sequenceTooLong(let tokens, let positions):
      return
        "the input does not fit the model: sequences of \(tokens) tokens exceed max_position_embeddings \(positions)"
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
