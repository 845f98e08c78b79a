import Tensor

/// The tensors of one name across the inputs, decoded to `Float`: the base (when the method
/// uses one) and the models in input order. All have the same shape.
public struct MergeInputs: Sendable {
  public let name: String
  public let base: Tensor?
  public let models: [Tensor]

  public init(name: String, base: Tensor?, models: [Tensor]) {
    self.name = name
    self.base = base
    self.models = models
  }
}

/// Whether a method needs a base model.
public enum BaseRequirement: Sendable, Equatable {
  case required
  case optional
  case unused
}

/// A merge method: how one tensor name is merged across models. Methods do maths on in-memory
/// tensors and never open files; the runner streams checkpoints through them tensor by tensor.
/// Register a new method by adding one line to `MergeRegistry.methods`.
public protocol MergeMethod: Sendable {
  /// The registry key, CLI and recipe name (`ties`); mergekit's spelling with `_` is accepted too.
  var name: String { get }
  /// One line for `--help` and the docs.
  var summary: String { get }
  /// The paper or source it follows.
  var reference: String { get }
  var base: BaseRequirement { get }
  /// How many models (not counting the base) it merges.
  var modelCount: ClosedRange<Int> { get }
  var parameters: [ParameterSpec] { get }
  /// Merges one tensor. Inputs are validated (same shape, base present when required).
  func merge(_ inputs: MergeInputs, _ parameters: ResolvedParameters) throws -> Tensor
}

extension MergeMethod {
  /// Checks that the inputs suit the method: a base when it needs one, none when it ignores
  /// one, and a number of models it can merge.
  public func checkInputs(hasBase: Bool, modelCount count: Int) throws {
    try MergeError.checkInputs(method: name, base: base, modelCount: modelCount, hasBase: hasBase, count: count)
  }
}

extension MergeError {
  /// Refuses inputs that do not suit a method declaring `base` and `modelCount`.
  public static func checkInputs(method: String, base: BaseRequirement, modelCount: ClosedRange<Int>, hasBase: Bool, count: Int) throws {
    if base == .required && !hasBase { throw MergeError.baseRequired(method: method) }
    if base == .unused && hasBase { throw MergeError.baseUnused(method: method) }
    guard modelCount.contains(count) else { throw MergeError.modelCount(method: method, expected: modelCount, got: count) }
  }
}

/// Errors of merge configuration and maths; each names the method, parameter or tensor.
public enum MergeError: Error, CustomStringConvertible, Equatable {
  case unknownMethod(String, known: [String])
  case unknownParameter(method: String, name: String, known: [String])
  case missingParameter(method: String, name: String, help: String)
  case invalidParameter(method: String, name: String, tensor: String?, reason: String)
  case baseRequired(method: String)
  case baseUnused(method: String)
  case modelCount(method: String, expected: ClosedRange<Int>, got: Int)
  case zeroWeightSum(method: String, tensor: String)
  /// A method that promised to merge range by range did not (a bug in the method).
  case notStreamable(method: String, tensor: String)

  public var description: String {
    switch self {
    case .unknownMethod(let name, let known):
      return "unknown merge method '\(name)'; available: \(known.joined(separator: ", "))"
    case .unknownParameter(let method, let name, let known):
      return "\(method): unknown parameter '\(name)'; it takes \(known.isEmpty ? "none" : known.joined(separator: ", "))"
    case .missingParameter(let method, let name, let help):
      return "\(method): parameter '\(name)' is required (\(help))"
    case .invalidParameter(let method, let name, let tensor, let reason):
      return "\(method): parameter '\(name)'\(tensor.map { " for tensor '\($0)'" } ?? "") \(reason)"
    case .baseRequired(let method):
      return "\(method) needs a base model (--base)"
    case .baseUnused(let method):
      return "\(method) does not use a base model; drop --base (or list it as a model)"
    case .modelCount(let method, let expected, let got):
      let wanted =
        expected.lowerBound == expected.upperBound
        ? "\(expected.lowerBound)" : expected.upperBound == Int.max ? "at least \(expected.lowerBound)" : "\(expected.lowerBound) to \(expected.upperBound)"
      return "\(method) takes \(wanted) model\(expected.upperBound == 1 ? "" : "s") besides the base; got \(got)"
    case .notStreamable(let method, let tensor):
      return "\(method): tensor '\(tensor)' could not be merged range by range; this is a bug, please report it"
    case .zeroWeightSum(let method, let tensor):
      return "\(method): the weights of tensor '\(tensor)' sum to zero, so they cannot be normalised; set normalize to false or change the weights"
    }
  }
}
