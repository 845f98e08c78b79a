import Foundation
import Tensor

/// A task vector read as the model it stands for, `base + tau`, so that merges take task
/// vectors (dense or low-rank, from `mergekit task-vector`) among their models. Floating-point
/// tensors are presented in f32 (base decoded plus the task vector, rounded once to f32, so that
/// `model - base` gives the task vector back to f32 rounding); other tensors (integer ones) as
/// the task vector stores them, which are copies of the base's.
/// `factors(of:)` passes on a low-rank task vector's triplets.
public final class TaskVectorModel: Checkpoint, @unchecked Sendable {
  let taskVector: any Checkpoint
  let base: any Checkpoint
  public let tensors: [TensorInfo]
  private let byName: [ExactName: TensorInfo]

  public var path: String { taskVector.path }
  public var files: [StoredFile] { taskVector.files }
  public var metadata: [String: String] { base.metadata }

  /// Whether `checkpoint` says it is a task vector (`mergekit.kind: task-vector`).
  public static func isTaskVector(_ checkpoint: any Checkpoint) -> Bool {
    checkpoint.metadata["mergekit.kind"] == "task-vector"
  }

  /// A merge's models as models: over a base that is a model, each task vector becomes
  /// base + tau. Without a base, or over a base that is itself a task vector, the inputs are
  /// merged as they are (task vectors with task vectors). Throws `cannotOpen` naming the first
  /// task vector when, without a base, task vectors and models are mixed: a task vector cannot
  /// stand for a model without the base it was taken from.
  public static func models(_ models: [any Checkpoint], base: (any Checkpoint)?) throws -> [any Checkpoint] {
    guard let base, !isTaskVector(base) else {
      if base == nil, let vector = models.first(where: isTaskVector), models.contains(where: { !isTaskVector($0) }) {
        throw CheckpointError.cannotOpen(
          file: vector.path,
          reason: "it is a task vector among models; a merge takes it as base + task vector, so give --base")
      }
      return models
    }
    return models.map { isTaskVector($0) ? TaskVectorModel($0, base: base) : $0 }
  }

  init(_ taskVector: any Checkpoint, base: any Checkpoint) {
    self.taskVector = taskVector
    self.base = base
    tensors = taskVector.tensors.map { info in
      info.dtype.isFloatingPoint ? TensorInfo(name: info.name, dtype: .f32, shape: info.shape) : info
    }
    byName = Dictionary(tensors.map { (ExactName($0.name), $0) }) { a, _ in a }
  }

  public func lookup(_ name: String) -> TensorInfo? { byName[ExactName(name)] }
  public func file(of name: String) -> String? { taskVector.file(of: name) }

  /// The task vector's own triplets of matrix `name`, when it is stored low-rank.
  public func factors(of name: String) throws -> SingularFactors? {
    try (taskVector as? FactoredCheckpoint)?.factors(of: name)
  }

  /// The task vector's own values of tensor `name` (densified where low-rank).
  public func storedTensor(named name: String) throws -> Tensor { try taskVector.tensor(named: name) }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  {
    guard let info = lookup(name), info.dtype == .f32, let stored = taskVector.lookup(name),
      stored.dtype.isFloatingPoint
    else { return try taskVector.withBytes(of: name, range: range, body) }
    let baseInfo = try base.info(name)
    guard baseInfo.shape == info.shape, baseInfo.dtype.isFloatingPoint else {
      throw CheckpointError.invalidEntry(
        file: path, tensor: name,
        reason: "is \(info.shape) in the task vector but \(baseInfo.dtype) \(baseInfo.shape) in the base \(base.path)")
    }
    let bytes = range ?? 0..<(info.count * 4)
    guard !bytes.isEmpty else { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
    let elements = (bytes.lowerBound / 4)..<((bytes.upperBound + 3) / 4)
    func decoded(_ checkpoint: any Checkpoint, _ dtype: DType) throws -> [Float] {
      let range = (elements.lowerBound * dtype.size)..<(elements.upperBound * dtype.size)
      return try checkpoint.withBytes(of: name, range: range) {
        Tensor(decoding: $0, dtype: dtype, shape: [elements.count]).scalars
      }
    }
    let tau = try decoded(taskVector, stored.dtype)
    let original = try decoded(base, baseInfo.dtype)
    let values = zip(original, tau).map { $0 + $1 }
    return try values.withUnsafeBytes { raw in
      let start = bytes.lowerBound - elements.lowerBound * 4
      return try body(UnsafeRawBufferPointer(rebasing: raw[start..<(start + bytes.count)]))
    }
  }

  public func release(_ name: String, range: Range<Int>?) {
    taskVector.release(name, range: nil)
    base.release(name, range: nil)
  }

  public func verify(progress: ((Int, Int) -> Void)?) throws { try taskVector.verify(progress: progress) }
}
