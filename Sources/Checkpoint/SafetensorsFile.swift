import Foundation
import Tensor

/// A memory-mapped safetensors file, validated on open (see `SafetensorsHeader`).
///
/// ```swift
/// let file = try SafetensorsFile(path: "model.safetensors")
/// let bias = try file.read("encoder.layer.0.output.dense.bias")
/// ```
public final class SafetensorsFile: Checkpoint, @unchecked Sendable {
  public let path: String
  public let tensors: [TensorInfo]
  public let metadata: [String: String]
  public let files: [StoredFile]
  private let stored: MappedTensors

  /// Opens and validates `path`; throws the first rule the file breaks.
  public init(path: String) throws {
    self.path = path
    let map = try MappedFile(path: path)
    let header = try SafetensorsHeader.parse(map.bytes(0..<map.size), path: path)
    let ordered = header.entries.sorted { $0.offsets.lowerBound < $1.offsets.lowerBound }
    tensors = ordered.map(\.info)
    metadata = header.metadata
    files = [
      StoredFile(
        name: URL(fileURLWithPath: path).lastPathComponent, tensors: ordered.map(\.info.name),
        safetensorsHeader: header.headerBytes)
    ]
    var ranges: [ExactName: Range<Int>] = [:]
    var infos: [ExactName: TensorInfo] = [:]
    ranges.reserveCapacity(ordered.count)
    infos.reserveCapacity(ordered.count)
    for entry in ordered {
      ranges[ExactName(entry.info.name)] =
        (header.dataStart + entry.offsets.lowerBound)..<(header.dataStart + entry.offsets.upperBound)
      infos[ExactName(entry.info.name)] = entry.info
    }
    stored = MappedTensors(path: path, map: map, ranges: ranges, infos: infos)
  }

  public func lookup(_ name: String) -> TensorInfo? { stored.lookup(name) }

  public func file(of name: String) -> String? { stored.lookup(name) == nil ? nil : path }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  { try stored.withBytes(of: name, range: range, body) }

  public func copyBytes(of name: String, parts: [Range<Int>], into destination: UnsafeMutableRawBufferPointer) throws {
    try stored.copyBytes(of: name, parts: parts, into: destination)
  }

  public func release(_ name: String, range: Range<Int>?) { stored.release(name, range: range) }

  /// A safetensors file has no checksums: its structure was validated on open; this also reads
  /// every byte once so that I/O errors surface.
  public func verify(progress: ((Int, Int) -> Void)?) throws {
    let total = totalByteCount
    var done = 0
    for info in tensors {
      try stream(info.name) { piece in
        var sink: UInt8 = 0
        for i in Swift.stride(from: 0, to: piece.count, by: 4096) { sink |= piece[i] }
        _ = sink
        done += piece.count
        progress?(done, total)
      }
    }
  }
}

/// Streams one safetensors file: the header (known from the tensor list, padded with spaces to a
/// multiple of 8 bytes) first, then each tensor's bytes in list order, in as many pieces as the
/// caller likes. The file appears at its destination only on `finish()`.
final class SafetensorsWriter: TensorFileWriter {
  private let output: OutputFile
  private let plan: [TensorInfo]
  private var next = 0
  private var current: Int?
  private var writtenInTensor = 0

  /// `preservedHeader`, the header text of the file these tensors came from, is written verbatim
  /// when it describes exactly this tensor list and metadata; otherwise a header is generated.
  init(destination: String, tensors: [TensorInfo], metadata: [String: String], preservedHeader: [UInt8]? = nil) throws {
    output = try OutputFile(destination: destination)
    plan = tensors
    let header =
      if let preservedHeader, SafetensorsHeader.matches(preservedHeader, tensors: tensors, metadata: metadata) {
        withUnsafeBytes(of: UInt64(preservedHeader.count).littleEndian) { Array($0) } + preservedHeader
      } else {
        Self.header(tensors: tensors, metadata: metadata)
      }
    try output.reserve(tensors.reduce(header.count) { $0 + $1.byteCount })
    try output.write(header)
  }

  /// The length prefix and JSON header bytes for `tensors` laid out contiguously in order.
  static func header(tensors: [TensorInfo], metadata: [String: String]) -> [UInt8] {
    var pairs: [(key: String, value: JSON)] = []
    if !metadata.isEmpty {
      pairs.append(
        ("__metadata__", .object(metadata.sorted { $0.key < $1.key }.map { ($0.key, JSON.string($0.value)) })))
    }
    var offset = 0
    for info in tensors {
      let end = offset + info.byteCount
      pairs.append(
        (
          info.name,
          .object([
            ("dtype", .string(info.dtype.rawValue)),
            ("shape", .array(info.shape.map { .number(String($0)) })),
            ("data_offsets", .array([.number(String(offset)), .number(String(end))])),
          ])
        ))
      offset = end
    }
    var json = Array(JSON.object(pairs).serialized.utf8)
    while json.count % 8 != 0 { json.append(0x20) }
    var bytes = withUnsafeBytes(of: UInt64(json.count).littleEndian) { Array($0) }
    bytes.append(contentsOf: json)
    return bytes
  }

  func beginTensor(_ name: String) throws {
    try requireCurrentComplete()
    guard next < plan.count, plan[next].name == name else {
      throw CheckpointError.writeOrder(
        file: output.destination, reason: "tensor '\(name)' written out of the declared order")
    }
    current = next
    next += 1
    writtenInTensor = 0
  }

  func append(_ piece: UnsafeRawBufferPointer) throws {
    try checkAppend(piece.count)
    try output.write(piece)
    writtenInTensor += piece.count
  }

  func append(owned bytes: [UInt8]) throws {
    try checkAppend(bytes.count)
    try output.write(owned: bytes)
    writtenInTensor += bytes.count
  }

  /// Throws unless `count` more bytes fit the current tensor.
  private func checkAppend(_ count: Int) throws {
    guard let current else {
      throw CheckpointError.writeOrder(file: output.destination, reason: "bytes written with no tensor begun")
    }
    guard writtenInTensor + count <= plan[current].byteCount else {
      throw CheckpointError.writeOrder(
        file: output.destination, reason: "more bytes written for '\(plan[current].name)' than its shape holds")
    }
  }

  private func requireCurrentComplete() throws {
    if let current, writtenInTensor != plan[current].byteCount {
      throw CheckpointError.writeOrder(
        file: output.destination,
        reason: "tensor '\(plan[current].name)' got \(writtenInTensor) of \(plan[current].byteCount) bytes")
    }
  }

  func finish() throws {
    try requireCurrentComplete()
    guard next == plan.count else {
      throw CheckpointError.writeOrder(
        file: output.destination, reason: "tensor '\(plan[next].name)' was never written")
    }
    try output.publish()
  }

  func discard() { output.discard() }
}
