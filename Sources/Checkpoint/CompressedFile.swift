import Foundation
import Tensor

/// A `.mkz` compressed checkpoint opened for reading (format: `CompressedFormat.swift`).
///
/// The footer, chunk index and tensor table are validated on open; tensor bytes are decoded on
/// demand, only the chunks a request touches, in parallel, each chunk's checksum verified.
/// Delta-stored tensors need the base checkpoint they were written against.
///
/// ```swift
/// let tuned = try CompressedFile(path: "tuned.mkz", base: try openCheckpoint("base"))
/// let rows = try tuned.readRows("lm_head.weight", 0..<16)
/// ```
public final class CompressedFile: Checkpoint, @unchecked Sendable {
  public let path: String
  public let tensors: [TensorInfo]
  public let metadata: [String: String]
  public let files: [StoredFile]
  /// The checkpoint delta tensors are decoded against, if any.
  public let base: (any Checkpoint)?
  let chunkSize: Int
  let chunks: [MKZ.ChunkRecord]
  let records: [ExactName: MKZ.TensorRecord]
  /// The embedded model-folder files (version 2), by name.
  let fileRecords: [String: MKZ.TensorRecord]
  private let map: MappedFile
  private let verifiedBases = VerifiedSet()

  public init(path: String, base: (any Checkpoint)? = nil) throws {
    self.path = path
    self.base = base
    map = try MappedFile(path: path)
    let layout = try CompressedLayout.parse(map.bytes(0..<map.size), path: path)
    chunkSize = layout.chunkSize
    chunks = layout.chunks
    metadata = layout.metadata
    tensors = layout.tensors.map(\.info)
    files = [
      StoredFile(
        name: URL(fileURLWithPath: path).lastPathComponent, tensors: tensors.map(\.name),
        safetensorsHeader: layout.safetensorsHeader)
    ]
    records = Dictionary(layout.tensors.map { (ExactName($0.info.name), $0) }, uniquingKeysWith: { a, _ in a })
    fileRecords = Dictionary(layout.files.map { ($0.info.name, $0) }, uniquingKeysWith: { a, _ in a })
  }

  /// The names of the model folder's files this `.mkz` carries (config.json, tokenizer files ...).
  public var embeddedFileNames: [String] { fileRecords.keys.sorted() }

  /// Embedded file `name`, decoded, its chunk checksums and digest checked. Throws
  /// `missingTensor` naming it when there is no such file, or the chunk's or digest's error.
  public func embeddedFile(_ name: String) throws -> Data {
    guard let record = fileRecords[name] else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    var bytes = [UInt8](repeating: 0, count: record.info.byteCount)
    let codec = ChunkCodec()
    try bytes.withUnsafeMutableBytes { out in
      for local in 0..<record.chunks.count {
        let range = (local * chunkSize)..<min(out.count, (local + 1) * chunkSize)
        try decodeChunk(
          record, local: local, base: nil, codec: codec, into: UnsafeMutableRawBufferPointer(rebasing: out[range]))
      }
    }
    let pieces = bytes.withUnsafeBytes { raw in
      stride(from: 0, to: raw.count, by: MKZ.digestPieceSize).map { start in
        XXHash64.hash(UnsafeRawBufferPointer(rebasing: raw[start..<min(raw.count, start + MKZ.digestPieceSize)]))
      }
    }
    guard MKZ.digest(ofPieceHashes: pieces) == record.digest else {
      throw CheckpointError.tensorDigestMismatch(file: path, tensor: name)
    }
    return Data(bytes)
  }

  public func lookup(_ name: String) -> TensorInfo? { records[ExactName(name)]?.info }

  public func file(of name: String) -> String? { records[ExactName(name)] == nil ? nil : path }

  /// Bytes tensor `name` occupies in the file (its chunks as stored).
  public func storedByteCount(of name: String) -> Int? {
    records[ExactName(name)].map { record in record.chunks.reduce(0) { $0 + chunks[$1].storedSize } }
  }

  /// The transform a tensor is stored with (`delta` ones need the base).
  public func isDelta(_ name: String) -> Bool { records[ExactName(name)]?.transform == .delta }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  {
    guard let record = records[ExactName(name)] else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    let total = record.info.byteCount
    let wanted = range ?? 0..<total
    precondition(wanted.lowerBound >= 0 && wanted.upperBound <= total, "byte range \(wanted) outside tensor \(name)")
    if wanted.isEmpty { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
    try checkBase(record)
    let first = wanted.lowerBound / chunkSize
    let last = (wanted.upperBound - 1) / chunkSize
    let start = first * chunkSize
    let span = min(total, (last + 1) * chunkSize) - start
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: span, alignment: 64)
    defer { buffer.deallocate() }
    let count = last - first + 1
    let codecs = (0..<min(Parallel.threadCount, count)).map { _ in ChunkCodec() }
    try Parallel.forEach(count) { worker, i in
      let out = UnsafeMutableRawBufferPointer(rebasing: buffer[(i * chunkSize)..<min(span, (i + 1) * chunkSize)])
      try decodeChunk(record, local: first + i, codec: codecs[worker], into: out)
    }
    let offset = wanted.lowerBound - start
    return try body(UnsafeRawBufferPointer(rebasing: buffer[offset..<(offset + wanted.count)]))
  }

  public func release(_ name: String, range: Range<Int>?) {
    guard let record = records[ExactName(name)], !record.chunks.isEmpty else { return }
    let part = range ?? 0..<record.info.byteCount
    guard !part.isEmpty else { return }
    let first = chunks[record.chunks.lowerBound + part.lowerBound / chunkSize]
    let last = chunks[record.chunks.lowerBound + (part.upperBound - 1) / chunkSize]
    map.release(first.offset..<(last.offset + last.storedSize))
  }

  /// Decodes chunk `local` (0-based within the tensor) into `out`, checking size and checksum;
  /// `base` is the base tensor's bytes at the same offsets (delta tensors only).
  func decodeChunk(
    _ record: MKZ.TensorRecord, local: Int, base: UnsafeRawBufferPointer?, codec: ChunkCodec,
    into out: UnsafeMutableRawBufferPointer
  ) throws {
    let chunk = chunks[record.chunks.lowerBound + local]
    let stored = map.bytes(chunk.offset..<(chunk.offset + chunk.storedSize))
    let encoded = ChunkCodec.Encoded(size: chunk.storedSize, isRaw: chunk.isRaw, checksum: chunk.checksum)
    let name = record.info.name
    do {
      try codec.decode(
        stored, encoded, base: base, transform: base == nil && record.transform == .delta ? .planes : record.transform,
        elementSize: record.info.dtype.size, into: out)
    } catch ChunkCodec.Failure.corruptFrame(let reason) {
      throw CheckpointError.corruptFrame(file: path, tensor: name, chunk: local, reason: reason)
    } catch ChunkCodec.Failure.rawSize(let actual) {
      throw CheckpointError.rawSizeMismatch(
        file: path, tensor: name, chunk: local, expected: chunk.rawSize, actual: actual)
    } catch {
      throw CheckpointError.chunkChecksumMismatch(file: path, tensor: name, chunk: local)
    }
  }

  private func decodeChunk(
    _ record: MKZ.TensorRecord, local: Int, codec: ChunkCodec, into out: UnsafeMutableRawBufferPointer
  ) throws {
    if record.transform == .delta, let base {
      let range = (local * chunkSize)..<(local * chunkSize + out.count)
      try base.withBytes(of: record.info.name, range: range) {
        try decodeChunk(record, local: local, base: $0, codec: codec, into: out)
      }
    } else {
      try decodeChunk(record, local: local, base: nil, codec: codec, into: out)
    }
  }

  /// For a delta tensor: the base must be present, hold the same tensor, and have the recorded digest.
  private func checkBase(_ record: MKZ.TensorRecord) throws {
    guard record.transform == .delta, let expected = record.baseDigest else { return }
    let name = record.info.name
    guard let base else { throw CheckpointError.deltaBaseMissing(file: path, tensor: name) }
    if verifiedBases.contains(name) { return }
    guard let info = base.lookup(name), info.dtype == record.info.dtype, info.shape == record.info.shape else {
      throw CheckpointError.deltaBaseMismatch(
        file: path, tensor: name, expected: MKZ.hex(expected), actual: "no matching tensor")
    }
    let actual = try MKZ.digest(of: base, tensor: name)
    guard actual == expected else {
      throw CheckpointError.deltaBaseMismatch(
        file: path, tensor: name, expected: MKZ.hex(expected), actual: MKZ.hex(actual))
    }
    verifiedBases.insert(name)
  }

  /// Checks every chunk (decompression, size, checksum) and, where the bytes can be rebuilt
  /// (always, or with the base for delta tensors), every tensor digest. Throws the first problem.
  public func verify(progress: ((Int, Int) -> Void)?) throws {
    let total = totalByteCount
    var done = 0
    for info in tensors {
      guard let record = records[ExactName(info.name)] else { continue }
      if record.transform == .delta && base == nil {
        // Without the base only the stored payloads can be checked (decoded as plain planes).
        try Parallel.forEach(record.chunks.count) { _, local in
          let size = chunks[record.chunks.lowerBound + local].rawSize
          let payload = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
          defer { payload.deallocate() }
          try decodeChunk(record, local: local, base: nil, codec: ChunkCodec(), into: payload)
          let start = local * chunkSize
          release(info.name, range: start..<(start + size))
        }
      } else {
        guard try MKZ.digest(of: self, tensor: info.name) == record.digest else {
          throw CheckpointError.tensorDigestMismatch(file: path, tensor: info.name)
        }
      }
      done += info.byteCount
      progress?(done, total)
    }
    for name in embeddedFileNames { _ = try embeddedFile(name) }
  }
}

/// A thread-safe set of names.
final class VerifiedSet: @unchecked Sendable {
  private var names = Set<ExactName>()
  private let lock = NSLock()
  func contains(_ name: String) -> Bool { lock.withLock { names.contains(ExactName(name)) } }
  func insert(_ name: String) { _ = lock.withLock { names.insert(ExactName(name)) } }
}
