import Foundation
import Tensor

/// A checkpoint held in memory: a recipe step's result that is small enough not to be spilled to
/// a temporary file. It reads like any other checkpoint, so the steps that use it cannot tell.
public final class MemoryCheckpoint: Checkpoint, @unchecked Sendable {
  /// A name for messages (there is no file).
  public let path: String
  public let tensors: [TensorInfo]
  public let metadata: [String: String]
  public let files: [StoredFile]
  /// The model folder whose non-tensor files (config.json, tokenizer files) a written copy of
  /// this checkpoint takes.
  public let modelFolder: String?
  private let bytes: [ExactName: [UInt8]]
  private let index: [ExactName: Int]

  init(
    path: String, tensors: [TensorInfo], metadata: [String: String], files: [StoredFile], modelFolder: String?,
    bytes: [ExactName: [UInt8]]
  ) {
    self.path = path
    self.tensors = tensors
    self.metadata = metadata
    self.files = files
    self.modelFolder = modelFolder
    self.bytes = bytes
    index = Dictionary(tensors.enumerated().map { (ExactName($1.name), $0) }, uniquingKeysWith: { first, _ in first })
  }

  /// Stored bytes held.
  public var byteCount: Int { totalByteCount }

  public func lookup(_ name: String) -> TensorInfo? { index[ExactName(name)].map { tensors[$0] } }

  public func file(of name: String) -> String? { nil }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  {
    guard let stored = bytes[ExactName(name)] else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    let range = range ?? 0..<stored.count
    precondition(
      range.lowerBound >= 0 && range.upperBound <= stored.count, "byte range \(range) outside tensor '\(name)'")
    return try stored.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[range])) }
  }

  /// Nothing to release: the bytes are the process's own.
  public func release(_ name: String, range: Range<Int>?) {}

  /// Nothing to check: the bytes never left memory.
  public func verify(progress: ((Int, Int) -> Void)?) throws {}
}

/// Builds a `MemoryCheckpoint` the way `CheckpointWriter` writes a file: the tensor list is
/// declared up front, then bytes arrive in declared order.
public final class MemoryCheckpointWriter: TensorSink {
  public let name: String
  private let declared: [TensorInfo]
  private let metadata: [String: String]
  private let layout: [StoredFile]?
  private let modelFolder: String?
  private var next = 0
  private var current: (info: TensorInfo, bytes: [UInt8])?
  private var finished: [ExactName: [UInt8]] = [:]
  private var result: MemoryCheckpoint?

  /// - `name`: how messages name the checkpoint; `layout`: the files a later written copy is
  ///   sharded like (default: one file); `modelFolder`: where its non-tensor files come from.
  public init(
    name: String, tensors: [TensorInfo], metadata: [String: String] = [:], layout: [StoredFile]? = nil,
    modelFolder: String? = nil
  ) {
    self.name = name
    declared = tensors
    self.metadata = metadata
    self.layout = layout
    self.modelFolder = modelFolder
  }

  public func beginTensor(_ tensorName: String) throws {
    try completeCurrent()
    guard next < declared.count, declared[next].name == tensorName else {
      throw CheckpointError.writeOrder(file: name, reason: "tensor '\(tensorName)' is not the next declared one")
    }
    var bytes: [UInt8] = []
    bytes.reserveCapacity(declared[next].byteCount)
    current = (declared[next], bytes)
    next += 1
  }

  public func append(_ piece: UnsafeRawBufferPointer) throws {
    // Only the count is read: a second reference to the bytes would make the append copy them.
    guard let info = current?.info, let held = current?.bytes.count else {
      throw CheckpointError.writeOrder(file: name, reason: "bytes written before any tensor")
    }
    guard held + piece.count <= info.byteCount else {
      throw CheckpointError.writeOrder(file: name, reason: "more bytes than tensor '\(info.name)' holds")
    }
    current?.bytes.append(contentsOf: piece)
  }

  private func completeCurrent() throws {
    guard let (info, bytes) = current else { return }
    guard bytes.count == info.byteCount else {
      throw CheckpointError.writeOrder(
        file: name, reason: "tensor '\(info.name)' got \(bytes.count) of its \(info.byteCount) bytes")
    }
    finished[ExactName(info.name)] = bytes
    current = nil
  }

  public func finish() throws {
    try completeCurrent()
    guard next == declared.count else {
      throw CheckpointError.writeOrder(file: name, reason: "tensor '\(declared[next].name)' was never written")
    }
    let names = declared.map(\.name)
    let infos = Dictionary(declared.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
    // A layout file keeps its safetensors header exactly when a written file would (same
    // tensors and metadata), so a copy written later is the same bytes as a spilled one.
    let files = layout.flatMap { layout in
      layout.flatMap(\.tensors) == names
        ? layout.map { file in
          let header = file.safetensorsHeader.flatMap {
            SafetensorsHeader.matches($0, tensors: file.tensors.compactMap { infos[$0] }, metadata: metadata) ? $0 : nil
          }
          return StoredFile(name: file.name, tensors: file.tensors, safetensorsHeader: header)
        } : nil
    }
    result = MemoryCheckpoint(
      path: name, tensors: declared, metadata: metadata,
      files: files ?? [StoredFile(name: "model.safetensors", tensors: names)], modelFolder: modelFolder,
      bytes: finished)
    finished = [:]
  }

  /// The finished checkpoint (after `finish()`).
  public var checkpoint: MemoryCheckpoint {
    guard let result else { preconditionFailure("MemoryCheckpointWriter.checkpoint read before finish()") }
    return result
  }
}
