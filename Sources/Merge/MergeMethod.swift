import Tensor

/// The tensors of one name across the inputs, decoded to `Float`: the base (when the method
/// uses one) and the models in input order. All have the same shape.
public struct MergeInputs: Sendable {
  public let name: String
  public let base: Tensor?
  public let models: [Tensor]
  /// The models' task vectors as stored, when the models are task vectors (`mergekit
  /// task-vector`) and the method reads them (`usesStoredTaskVectors`): exact where `models`
  /// (base + tau, rounded to f32) are not, and low-rank ones as their triplets. Then `models`
  /// may be empty.
  public let taskVectors: [StoredTaskVector]?

  public init(name: String, base: Tensor?, models: [Tensor], taskVectors: [StoredTaskVector]? = nil) {
    self.name = name
    self.base = base
    self.models = models
    self.taskVectors = taskVectors
  }

  /// Each model minus the base, element by element, each difference rounded as `arithmetic`
  /// rounds (torch's `model - base` in the compute dtype); the models themselves without a base.
  public func relativeToBase(_ arithmetic: MergeArithmetic) -> [[Float]] {
    guard let base = base?.scalars else { return models.map(\.scalars) }
    return models.map { arithmetic.withRule(RoundedDifference(model: $0.scalars, base: base)) }
  }
}

/// `model - base`, each difference rounded, over the blocks on all cores.
struct RoundedDifference: RoundedComputation {
  let model: [Float]
  let base: [Float]

  func callAsFunction<R: RoundingRule>(_: R.Type) -> [Float] {
    let count = min(model.count, base.count)
    return [Float](unsafeUninitializedCapacity: count) { out, initialized in
      model.withUnsafeBufferPointer { m in
        base.withUnsafeBufferPointer { b in
          guard let o = out.baseAddress, let mp = m.baseAddress, let bp = b.baseAddress else { return }
          Elementwise.forEachBlock(count) { r in for i in r { o[i] = R.round(mp[i] - bp[i]) } }
        }
      }
      initialized = count
    }
  }
}

/// One model's task vector for one tensor, as its file stores it.
public enum StoredTaskVector: Sendable {
  case dense(Tensor)
  case factored(SingularFactors)

  /// The values, densified where factored.
  public var dense: Tensor {
    switch self {
    case .dense(let t): return t
    case .factored(let f): return f.dense
    }
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
  /// Bytes one tensor's merge holds besides its inputs decoded to `Float` and its result, which
  /// the runner counts itself: copies, factorisations, workspaces. The runner merges tensors side
  /// by side as long as their sum fits its memory budget, so a method that works in place
  /// declares 0 (the default) and one that factorises declares its peak.
  func scratchBytes(name: String, shape: [Int], models: Int, _ parameters: ResolvedParameters) -> Int
  /// Whether the models are task vectors to add (`apply`, aTLAS). Otherwise a task vector given
  /// as a model (`mergekit.kind: task-vector`) is read as the model it stands for, base + tau.
  var takesTaskVectors: Bool { get }
  /// Whether the method reads task vectors given as models as they are stored
  /// (`MergeInputs.taskVectors`): the SVD-based merges, which take low-rank ones as triplets.
  var usesStoredTaskVectors: Bool { get }
}

extension MergeMethod {
  public func scratchBytes(name: String, shape: [Int], models: Int, _ parameters: ResolvedParameters) -> Int { 0 }
  public var takesTaskVectors: Bool { false }
  public var usesStoredTaskVectors: Bool { false }
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
  public static func checkInputs(
    method: String, base: BaseRequirement, modelCount: ClosedRange<Int>, hasBase: Bool, count: Int
  ) throws {
    if base == .required && !hasBase { throw MergeError.baseRequired(method: method) }
    if base == .unused && hasBase { throw MergeError.baseUnused(method: method) }
    guard modelCount.contains(count) else {
      throw MergeError.modelCount(method: method, expected: modelCount, got: count)
    }
  }
}

/// Errors of the Merge target: merge configuration and maths, ZipIt! and aTLAS. Each names the
/// method, parameter, model or tensor.
public enum MergeError: Error, CustomStringConvertible, Equatable {
  /// No merge method has this name.
  case unknownMethod(String, known: [String])
  /// The method declares no parameter of this name.
  case unknownParameter(method: String, name: String, known: [String])
  /// A required parameter was not given.
  case missingParameter(method: String, name: String, help: String)
  /// A parameter's value is of the wrong kind or out of range (the reason gives the value).
  case invalidParameter(method: String, name: String, tensor: String?, reason: String)
  /// The method needs a base model and none was given.
  case baseRequired(method: String)
  /// The method ignores a base model and one was given.
  case baseUnused(method: String)
  /// The method merges a number of models in `expected`.
  case modelCount(method: String, expected: ClosedRange<Int>, got: Int)
  /// Normalising weights that sum to zero.
  case zeroWeightSum(method: String, tensor: String)
  /// Inputs whose weighted directions cancel (more than two exactly opposed tensors).
  case opposedInputs(method: String, tensor: String)
  /// ZipIt!: model `model` (0-based) is not a dense single-head MLP.
  case notAnMLP(model: Int)
  /// ZipIt!: model `model` cannot be zipped, and why.
  case notZippable(model: Int, reason: String)
  /// ZipIt!: model `model` differs from the first in architecture or width.
  case differentArchitectures(model: Int, detail: String)
  /// ZipIt!: partial zipping stops at a layer that does not exist.
  case stopLayerOutOfRange(stop: Int, points: Int)
  /// ZipIt!: fewer than two models.
  case tooFewModels
  /// aTLAS: a coefficient file that cannot be read as one.
  case malformedCoefficients(String)
  /// aTLAS: the coefficients are for `file` task vectors, `given` were given.
  case taskCount(file: Int, given: Int)
  /// aTLAS: the coefficients name blocks the base lacks.
  case unknownBlocks([String])
  /// aTLAS: a task vector does not fit the base.
  case taskVectorMismatch(taskVector: Int, tensor: String, reason: String)
  /// aTLAS: every tensor was excluded from the blocks.
  case noBlocks
  /// aTLAS: the base has factored (low-rank) layers.
  case factoredBase
  /// A method that promised to merge range by range did not (a bug in the method).
  case notStreamable(method: String, tensor: String)

  public var description: String {
    switch self {
    case .unknownMethod(let name, let known):
      return "unknown merge method '\(name)'; available: \(known.joined(separator: ", "))"
    case .unknownParameter(let method, let name, let known):
      return
        "\(method): unknown parameter '\(name)'; it takes \(known.isEmpty ? "none" : known.joined(separator: ", "))"
    case .missingParameter(let method, let name, let help):
      return "\(method): parameter '\(name)' is required (\(help))"
    case .invalidParameter(let method, let name, let tensor, let reason):
      return "\(method): parameter '\(name)'\(tensor.map { " for tensor '\($0)'" } ?? "") \(reason)"
    case .baseRequired(let method):
      return "\(method) needs a base model"
    case .baseUnused(let method):
      return "\(method) does not use a base model; drop the base (or list it as a model)"
    case .modelCount(let method, let expected, let got):
      let wanted =
        expected.lowerBound == expected.upperBound
        ? "\(expected.lowerBound)"
        : expected.upperBound == Int.max
          ? "at least \(expected.lowerBound)" : "\(expected.lowerBound) to \(expected.upperBound)"
      return "\(method) takes \(wanted) model\(expected.upperBound == 1 ? "" : "s") besides the base; got \(got)"
    case .notStreamable(let method, let tensor):
      return "\(method): tensor '\(tensor)' could not be merged range by range; this is a bug, please report it"
    case .notAnMLP(let m):
      return "model \(m + 1) is not a dense single-head MLP; zipping supports dense MLPs and Llama-style decoders"
    case .notZippable(let m, let reason): return "model \(m + 1) cannot be zipped: \(reason)"
    case .differentArchitectures(let m, let detail):
      return
        "model \(m + 1) differs from the first (\(detail)); ZipIt needs one architecture and width"
    case .stopLayerOutOfRange(let s, let p):
      return
        "stop layer \(s) does not exist: the models have \(p) merge point\(p == 1 ? "" : "s") (hidden layers), so stop at 1...\(p)"
    case .tooFewModels: return "zipping needs at least two models"
    case .malformedCoefficients(let reason): return "coefficient file: \(reason)"
    case .taskCount(let file, let given):
      return "the coefficients are for \(file) task vector\(file == 1 ? "" : "s"), \(given) were given"
    case .unknownBlocks(let names):
      return
        "the coefficients name blocks the base lacks: \(names.prefix(6).joined(separator: ", "))\(names.count > 6 ? " and \(names.count - 6) more" : "")"
    case .taskVectorMismatch(let i, let tensor, let reason):
      return "task vector \(i + 1), tensor '\(tensor)': \(reason); task vectors must come from this base"
    case .noBlocks: return "no tensor is a block: every tensor was excluded"
    case .factoredBase: return "the base has factored (low-rank) layers; aTLAS learns on dense models"
    case .opposedInputs(let method, let tensor):
      return
        "\(method): the models' weighted directions cancel for tensor '\(tensor)' (opposed tensors); change the weights"
    case .zeroWeightSum(let method, let tensor):
      return
        "\(method): the weights of tensor '\(tensor)' sum to zero, so they cannot be normalised; set normalize to false or change the weights"
    }
  }
}
