import Checkpoint
import Foundation
import Merge
import Tensor

/// An operation that streams checkpoints tensor by tensor through `MergeRunner`: every merge
/// method of `MergeRegistry` (one adapter, `merge(_:)`), and task-vector, apply and
/// atlas-apply. Registered once in `OperationRegistry.streamed`; `mergekit merge`,
/// `task-vector`, `apply`, `atlas apply` and recipe steps (`method: ties`) all find it there.
/// Its parameters may vary per tensor (gradients, filters) and per model, so they are checked
/// by `checkParameters` and resolved tensor by tensor by the runner.
public struct StreamedOperation: Sendable {
  public let name: String
  public let summary: String
  public let base: BaseRequirement
  public let modelCount: ClosedRange<Int>
  /// The method's parameters (per tensor, possibly per model).
  public let parameters: [ParameterSpec]
  /// Files the operation reads besides its models (aTLAS coefficients), by parameter name.
  public let files: [ParameterSpec]
  /// The output dtype when none is asked for (task vectors: f32); nil keeps the inputs'.
  public let defaultDType: DType?
  /// The format of an output whose path has no extension.
  public let defaultFormat: CheckpointFormat
  /// `mergekit.kind` in the output's metadata, when the output is not a plain model.
  public let kind: String?
  private let make:
    @Sendable (_ files: [String: String], _ base: (any Checkpoint)?, _ models: Int) throws -> any MergeMethod

  /// The merge method for `files` (resolved paths by parameter name), checked against the base
  /// and the number of models where the method depends on them.
  public func method(files: [String: String] = [:], base: (any Checkpoint)? = nil, models: Int = 0) throws
    -> any MergeMethod
  {
    try make(files, base, models)
  }

  /// Checks the inputs' count and roles and every parameter value before anything is opened.
  /// Throws `MergeError` naming the parameter, or `OperationError.missingParameter` for a file.
  public func checkParameters(
    hasBase: Bool, modelCount count: Int, global: [String: ParameterValue], perModel: [[String: ParameterValue]]
  ) throws {
    for spec in files where global[spec.name] == nil {
      throw OperationError.missingParameter(operation: name, name: spec.name, help: spec.help)
    }
    try MergeError.checkInputs(method: name, base: base, modelCount: modelCount, hasBase: hasBase, count: count)
    try ParameterResolver(
      method: name, specs: parameters, global: methodParameters(global), models: perModel,
      positions: LayerPositions(layerCount: 0)
    ).checkValues()
  }

  /// The file paths given among `global`, by parameter name.
  public func filePaths(_ global: [String: ParameterValue]) -> [String: String] {
    var paths: [String: String] = [:]
    for spec in files { if case .text(let path)? = global[spec.name] { paths[spec.name] = path } }
    return paths
  }

  /// The parameters of the method alone (file parameters removed).
  public func methodParameters(_ global: [String: ParameterValue]) -> [String: ParameterValue] {
    global.filter { key, _ in !files.contains { $0.name == key } }
  }

  /// A registered merge method as an operation.
  public static func merge(_ method: any MergeMethod) -> StreamedOperation {
    StreamedOperation(
      name: method.name, summary: method.summary, base: method.base, modelCount: method.modelCount,
      parameters: method.parameters, files: [],
      defaultDType: nil, defaultFormat: .safetensors, kind: nil, make: { _, _, _ in method })
  }

  /// `task-vector`: fine-tuned minus base, f32, compressed by default.
  public static let taskVector = StreamedOperation(
    name: "task-vector", summary: "the task vector of a fine-tune: fine-tuned minus base, tensor by tensor",
    base: .required, modelCount: 1...1, parameters: TaskVectors.Difference().parameters,
    files: [], defaultDType: .f32, defaultFormat: .mkz, kind: "task-vector",
    make: { _, _, _ in TaskVectors.Difference() })

  /// `apply`: base plus scaled task vectors.
  public static let apply = StreamedOperation(
    name: "apply", summary: "add scaled task vectors to a base model: base + sum of scale_i * tau_i", base: .required,
    modelCount: 1...Int.max,
    parameters: TaskVectors.Sum().parameters, files: [], defaultDType: nil, defaultFormat: .safetensors, kind: nil,
    make: { _, _, _ in TaskVectors.Sum() })

  /// `atlas-apply`: base plus task vectors scaled block by block from a coefficient file.
  public static let atlasApply = StreamedOperation(
    name: "atlas-apply",
    summary: "theta = base + sum over tasks and blocks of lambda * tau, from a coefficient file (aTLAS)",
    base: .required,
    modelCount: 1...Int.max, parameters: [],
    files: [.path("coefficients", help: "coefficient file (from atlas learn, or written by hand)")],
    defaultDType: nil, defaultFormat: .safetensors, kind: "atlas",
    make: { files, base, models in
      guard let path = files["coefficients"] else {
        throw OperationError.missingParameter(
          operation: "atlas-apply", name: "coefficients", help: "a coefficient file")
      }
      let data = Data(try InputFile.read(path))
      let coefficients = try ATLASCoefficients(json: data)
      if let base {
        try coefficients.check(
          baseShapes: Dictionary(base.tensors.map { ($0.name, $0.shape) }) { a, _ in a }, taskVectors: models)
      }
      return ATLASApply(coefficients)
    })
}
