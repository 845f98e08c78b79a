import Foundation
import Tensor

/// Streams tensors into a `.mkz` file: bytes arrive in any piece sizes, are cut into 1 MiB
/// chunks per tensor, and a batch of chunks is transformed, checksummed and compressed in
/// parallel, then written in order. Memory: one batch (a few chunks per core), whatever the model
/// size. With a base checkpoint, each tensor the base holds with the same dtype and shape is
/// stored as a delta against it. Output is bit-identical for any thread count or piece size.
final class CompressedWriter: TensorFileWriter {
  private let output: OutputFile
  private let plan: [TensorInfo]
  private let metadata: [String: String]
  private let base: (any Checkpoint)?
  private let chunkSize = MKZ.chunkSize
  private let batchChunks = max(4, 2 * Parallel.threadCount)
  private let codecs: [ChunkCodec]
  private var batch: UnsafeMutableRawBufferPointer
  private var frames: UnsafeMutableRawBufferPointer
  private let frameCapacity: Int
  private var filled = 0

  private var chunks: [MKZ.ChunkRecord] = []
  private var finished: [MKZ.TensorRecord] = []
  private var planIndex = 0
  private var current: MKZ.TensorRecord?
  private var currentOffset = 0
  private var pieceHashes: [UInt64] = []

  private let safetensorsHeader: [UInt8]?
  /// Model-folder files stored after the tensors (version 2's `files`), by name.
  private let embeddedFiles: [String: Data]

  init(
    destination: String, tensors: [TensorInfo], metadata: [String: String], base: (any Checkpoint)?,
    safetensorsHeader: [UInt8]? = nil, files: [String: Data] = [:]
  ) throws {
    output = try OutputFile(destination: destination)
    self.safetensorsHeader = safetensorsHeader
    embeddedFiles = files
    plan = tensors
    self.metadata = metadata
    self.base = base
    codecs = (0..<Parallel.threadCount).map { _ in ChunkCodec() }
    frameCapacity = ChunkCodec.maxStoredSize(chunkSize)
    batch = .allocate(byteCount: batchChunks * chunkSize, alignment: 64)
    frames = .allocate(byteCount: batchChunks * frameCapacity, alignment: 64)
    try output.write(MKZ.preamble)
  }

  deinit {
    batch.deallocate()
    frames.deallocate()
  }

  func beginTensor(_ name: String) throws {
    try endTensor()
    guard planIndex < plan.count, plan[planIndex].name == name else {
      throw CheckpointError.writeOrder(
        file: output.destination, reason: "tensor '\(name)' written out of the declared order")
    }
    let info = plan[planIndex]
    planIndex += 1
    var transform = ByteTransform.forDType(info.dtype.size, isFloatingPoint: info.dtype.isFloatingPoint)
    var baseDigest: UInt64?
    if let base, let baseInfo = base.lookup(name), baseInfo.dtype == info.dtype, baseInfo.shape == info.shape {
      transform = .delta
      baseDigest = try MKZ.digest(of: base, tensor: name)
    }
    current = MKZ.TensorRecord(
      info: info, transform: transform, chunks: chunks.count..<chunks.count, digest: 0, baseDigest: baseDigest)
    currentOffset = 0
    pieceHashes = []
    if info.byteCount == 0 { try endTensor() }
  }

  func append(_ piece: UnsafeRawBufferPointer) throws {
    guard let record = current else {
      if piece.isEmpty { return }
      throw CheckpointError.writeOrder(file: output.destination, reason: "bytes written with no tensor begun")
    }
    guard currentOffset + filled + piece.count <= record.info.byteCount else {
      throw CheckpointError.writeOrder(
        file: output.destination, reason: "more bytes written for '\(record.info.name)' than its shape holds")
    }
    var remaining = piece
    while !remaining.isEmpty {
      if filled == 0 && remaining.count >= chunkSize {
        // Whole chunks are compressed straight from the caller's memory (usually the input's
        // mapping): no copy, and the page faults happen on the worker threads.
        let direct = min(remaining.count / chunkSize, batchChunks) * chunkSize
        try compress(UnsafeRawBufferPointer(rebasing: remaining[0..<direct]))
        remaining = UnsafeRawBufferPointer(rebasing: remaining[direct...])
        continue
      }
      let n = min(batch.count - filled, remaining.count)
      UnsafeMutableRawBufferPointer(rebasing: batch[filled..<(filled + n)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: remaining[0..<n]))
      filled += n
      remaining = UnsafeRawBufferPointer(rebasing: remaining[n...])
      if filled == batch.count { try flushBatch() }
    }
    if currentOffset + filled == record.info.byteCount { try endTensor() }
  }

  /// Compresses the filled part of the batch and writes it.
  private func flushBatch() throws {
    guard filled > 0 else { return }
    try compress(UnsafeRawBufferPointer(rebasing: batch[0..<filled]))
    filled = 0
  }

  /// Compresses `source`, the current tensor's next bytes (whole chunks, plus a partial last
  /// chunk only at the end of the tensor; at most `batchChunks` chunks), and writes it.
  private func compress(_ source: UnsafeRawBufferPointer) throws {
    guard let record = current, !source.isEmpty else { return }
    let length = source.count
    let count = (length + chunkSize - 1) / chunkSize
    precondition(count <= batchChunks)
    var results = [MKZ.ChunkRecord](
      repeating: MKZ.ChunkRecord(offset: 0, storedSize: 0, rawSize: 0, checksum: 0, isRaw: false), count: count)
    var hashes = [UInt64](repeating: 0, count: count)
    let size = record.info.dtype.size
    let tensorOffset = currentOffset
    try results.withUnsafeMutableBufferPointer { results in
      try hashes.withUnsafeMutableBufferPointer { hashes in
        try Parallel.forEach(count) { worker, i in
          let range = (i * chunkSize)..<min(length, (i + 1) * chunkSize)
          let raw = UnsafeRawBufferPointer(rebasing: source[range])
          let frame = UnsafeMutableRawBufferPointer(rebasing: frames[(i * frameCapacity)..<((i + 1) * frameCapacity)])
          hashes[i] = XXHash64.hash(raw)
          let encode = { (base: UnsafeRawBufferPointer?) in
            self.codecs[worker].encode(raw, base: base, transform: record.transform, elementSize: size, into: frame)
          }
          let encoded: ChunkCodec.Encoded
          if record.transform == .delta, let base {
            let baseRange = (tensorOffset + range.lowerBound)..<(tensorOffset + range.upperBound)
            encoded = try base.withBytes(of: record.info.name, range: baseRange, encode)
          } else {
            encoded = encode(nil)
          }
          results[i] = MKZ.ChunkRecord(
            offset: 0, storedSize: encoded.size, rawSize: range.count, checksum: encoded.checksum, isRaw: encoded.isRaw)
        }
      }
    }
    for i in 0..<count {
      var chunk = results[i]
      chunk.offset = output.bytesWritten
      try output.write(
        UnsafeRawBufferPointer(rebasing: frames[(i * frameCapacity)..<(i * frameCapacity + chunk.storedSize)]))
      chunks.append(chunk)
    }
    pieceHashes.append(contentsOf: hashes)
    currentOffset += length
  }

  private func endTensor() throws {
    guard var record = current else { return }
    try flushBatch()
    guard currentOffset == record.info.byteCount else {
      throw CheckpointError.writeOrder(
        file: output.destination,
        reason: "tensor '\(record.info.name)' got \(currentOffset) of \(record.info.byteCount) bytes")
    }
    record.chunks = record.chunks.lowerBound..<chunks.count
    record.digest = MKZ.digest(ofPieceHashes: pieceHashes)
    finished.append(record)
    current = nil
  }

  func finish() throws {
    try endTensor()
    guard planIndex == plan.count else {
      throw CheckpointError.writeOrder(
        file: output.destination, reason: "tensor '\(plan[planIndex].name)' was never written")
    }
    for (name, contents) in embeddedFiles.sorted(by: { $0.key < $1.key }) {
      guard MKZ.isFileName(name), contents.count <= MKZ.maxEmbeddedFileSize else {
        throw CheckpointError.cannotWrite(
          file: output.destination, reason: "'\(name)' cannot be embedded (not a plain file name, or over 256 MiB)")
      }
      current = MKZ.TensorRecord(
        info: TensorInfo(name: name, dtype: .u8, shape: [contents.count]), transform: .planes,
        chunks: chunks.count..<chunks.count, digest: 0, isFile: true)
      currentOffset = 0
      pieceHashes = []
      if contents.isEmpty { try endTensor() } else { try contents.withUnsafeBytes { try append($0) } }
    }
    let indexOffset = output.bytesWritten
    let index = MKZ.encodeChunkRecords(chunks)
    let header = safetensorsHeader.flatMap {
      SafetensorsHeader.matches($0, tensors: plan, metadata: metadata) ? $0 : nil
    }
    let table = MKZ.encodeTable(finished, metadata: metadata, chunkSize: chunkSize, safetensorsHeader: header)
    try output.write(index)
    try output.write(table)
    let checksum = XXHash64.hash(index + table)
    try output.write(
      MKZ.encodeFooter(
        indexOffset: indexOffset, chunkCount: chunks.count, tableOffset: indexOffset + index.count,
        tableLength: table.count, checksum: checksum))
    try output.publish()
  }

  func discard() { output.discard() }
}
