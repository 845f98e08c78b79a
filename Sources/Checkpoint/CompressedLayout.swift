import Tensor

/// The validated structure of a `.mkz` file: footer, chunk index and tensor table. Every number
/// read from the file is checked against the file's size before anything is sized by it.
struct CompressedLayout {
  var chunkSize: Int
  var chunks: [MKZ.ChunkRecord]
  var tensors: [MKZ.TensorRecord]
  /// Embedded files (version 2), their chunks after the tensors'.
  var files: [MKZ.TensorRecord] = []
  var metadata: [String: String]
  /// The header of the safetensors file this one was converted from, if recorded.
  var safetensorsHeader: [UInt8]?

  static func parse(_ file: UnsafeRawBufferPointer, path: String) throws -> CompressedLayout {
    var reader = ByteReader(file)
    guard let magic = reader.readBytes(8), magic == MKZ.magic else { throw CheckpointError.badMagic(file: path) }
    guard let version = reader.read(UInt32.self) else { throw CheckpointError.truncatedFooter(file: path) }
    guard MKZ.readableVersions.contains(version) else {
      throw CheckpointError.unsupportedVersion(file: path, version: version)
    }
    guard file.count >= MKZ.preambleSize + MKZ.footerSize else { throw CheckpointError.truncatedFooter(file: path) }

    let footerStart = file.count - MKZ.footerSize
    var footer = ByteReader(file, at: footerStart)
    let fields = (footer.readSize(), footer.readSize(), footer.readSize(), footer.readSize(), footer.read(UInt64.self))
    let footerVersion = footer.read(UInt32.self)
    guard footer.readBytes(4) == MKZ.footerMagic else { throw CheckpointError.truncatedFooter(file: path) }
    guard footerVersion == version else {
      throw CheckpointError.unsupportedVersion(file: path, version: footerVersion ?? 0)
    }
    guard let indexOffset = fields.0, let chunkCount = fields.1, let tableOffset = fields.2, let tableLength = fields.3,
      let checksum = fields.4
    else { throw CheckpointError.corruptChunkIndex(file: path, reason: "footer fields out of range") }
    let (indexBytes, overflow) = chunkCount.multipliedReportingOverflow(by: MKZ.chunkRecordSize)
    guard !overflow, indexOffset >= MKZ.preambleSize, indexOffset <= footerStart,
      indexBytes <= footerStart - indexOffset,
      indexOffset + indexBytes == tableOffset, tableLength <= footerStart - tableOffset,
      tableOffset + tableLength == footerStart
    else {
      throw CheckpointError.corruptChunkIndex(file: path, reason: "footer offsets do not describe this file's layout")
    }
    guard XXHash64.hash(UnsafeRawBufferPointer(rebasing: file[indexOffset..<footerStart])) == checksum else {
      throw CheckpointError.corruptChunkIndex(file: path, reason: "index checksum mismatch")
    }

    let table: JSON
    do {
      table = try JSON.parse(UnsafeRawBufferPointer(rebasing: file[tableOffset..<footerStart]))
    } catch {
      throw CheckpointError.corruptChunkIndex(file: path, reason: "tensor table is not valid JSON")
    }
    guard let chunkSize = table["chunk_size"]?.intValue, chunkSize > 0, chunkSize <= MKZ.maxChunkSize,
      chunkSize % 8 == 0
    else {
      throw CheckpointError.corruptChunkIndex(file: path, reason: "chunk_size missing or outside 8 bytes..64 MiB")
    }
    let chunks = try parseChunks(
      file, at: indexOffset, count: chunkCount, end: indexOffset, chunkSize: chunkSize, path: path)
    var metadata: [String: String] = [:]
    if let value = table["metadata"] { metadata = try SafetensorsHeader.parseMetadata(value, path: path) }
    guard let entries = table["tensors"]?.arrayValue else {
      throw CheckpointError.corruptChunkIndex(file: path, reason: "tensor table has no 'tensors' list")
    }
    let (tensors, tensorChunks) = try parseTensors(entries, chunks: chunks, chunkSize: chunkSize, path: path)
    var files: [MKZ.TensorRecord] = []
    var end = tensorChunks
    if let fileEntries = table["files"]?.arrayValue {
      (files, end) = try parseFiles(fileEntries, chunks: chunks, from: tensorChunks, chunkSize: chunkSize, path: path)
    }
    guard end == chunks.count else {
      throw CheckpointError.corruptChunkIndex(file: path, reason: "\(chunks.count - end) chunks belong to no tensor")
    }
    let header = table["safetensors_header"]?.stringValue.map { Array($0.utf8) }
    return CompressedLayout(
      chunkSize: chunkSize, chunks: chunks, tensors: tensors, files: files, metadata: metadata,
      safetensorsHeader: header)
  }

  static func parseChunks(
    _ file: UnsafeRawBufferPointer, at start: Int, count: Int, end dataEnd: Int, chunkSize: Int, path: String
  ) throws -> [MKZ.ChunkRecord] {
    var reader = ByteReader(file, at: start)
    var chunks: [MKZ.ChunkRecord] = []
    chunks.reserveCapacity(count)
    var previousEnd = MKZ.preambleSize
    for index in 0..<count {
      guard let offset = reader.readSize(), let stored = reader.read(UInt32.self), let raw = reader.read(UInt32.self),
        let checksum = reader.read(UInt64.self), let flags = reader.read(UInt32.self), reader.read(UInt32.self) != nil
      else { throw CheckpointError.corruptChunkIndex(file: path, reason: "chunk record \(index) is truncated") }
      let record = MKZ.ChunkRecord(
        offset: offset, storedSize: Int(stored), rawSize: Int(raw), checksum: checksum, isRaw: flags & 1 != 0)
      guard record.offset >= previousEnd, record.storedSize <= dataEnd - record.offset, record.rawSize <= chunkSize,
        record.storedSize <= max(record.rawSize, Zstd.compressBound(record.rawSize)),
        record.rawSize <= record.storedSize * MKZ.maxCompressionRatio,
        !record.isRaw || record.storedSize == record.rawSize,
        flags & ~1 == 0
      else {
        throw CheckpointError.corruptChunkIndex(
          file: path, reason: "chunk record \(index) points outside the data or has impossible sizes")
      }
      previousEnd = record.offset + record.storedSize
      chunks.append(record)
    }
    return chunks
  }

  /// The embedded files (version 2): plain names, at most `MKZ.maxEmbeddedFileSize` bytes, their
  /// chunks continuing the tiling from `first`. Returns them and the chunk after the last.
  static func parseFiles(
    _ entries: [JSON], chunks: [MKZ.ChunkRecord], from first: Int, chunkSize: Int, path: String
  ) throws -> ([MKZ.TensorRecord], Int) {
    var files: [MKZ.TensorRecord] = []
    var next = first
    var seen = Set<String>()
    for entry in entries {
      guard let name = entry["name"]?.stringValue, MKZ.isFileName(name), seen.insert(name).inserted,
        let size = entry["size"]?.intValue, size >= 0, size <= MKZ.maxEmbeddedFileSize,
        let start = entry["first_chunk"]?.intValue, let count = entry["chunk_count"]?.intValue,
        let digestText = entry["digest"]?.stringValue, let digest = UInt64(digestText, radix: 16)
      else {
        throw CheckpointError.corruptChunkIndex(
          file: path, reason: "an embedded file entry lacks a plain name, a size, its chunks or a digest")
      }
      let expected = (size + chunkSize - 1) / chunkSize
      guard start == next, count == expected, count <= chunks.count - start else {
        throw CheckpointError.corruptChunkIndex(file: path, reason: "embedded file '\(name)' lists the wrong chunks")
      }
      for local in 0..<count where chunks[start + local].rawSize != min(chunkSize, size - local * chunkSize) {
        throw CheckpointError.corruptChunkIndex(file: path, reason: "embedded file '\(name)' has a chunk of wrong size")
      }
      next += count
      files.append(
        MKZ.TensorRecord(
          info: TensorInfo(name: name, dtype: .u8, shape: [size]), transform: .planes,
          chunks: start..<(start + count), digest: digest, isFile: true))
    }
    return (files, next)
  }

  static func parseTensors(_ entries: [JSON], chunks: [MKZ.ChunkRecord], chunkSize: Int, path: String) throws -> (
    [MKZ.TensorRecord], Int
  ) {
    var tensors: [MKZ.TensorRecord] = []
    var seen = Set<ExactName>()
    var nextChunk = 0
    for entry in entries {
      guard let name = entry["name"]?.stringValue else {
        throw CheckpointError.corruptChunkIndex(file: path, reason: "a tensor entry has no name")
      }
      guard seen.insert(ExactName(name)).inserted else {
        throw CheckpointError.duplicateTensor(file: path, tensor: name)
      }
      guard let dtypeName = entry["dtype"]?.stringValue else {
        throw CheckpointError.invalidEntry(file: path, tensor: name, reason: "missing 'dtype'")
      }
      guard let dtype = DType(rawValue: dtypeName) else {
        throw CheckpointError.unknownDType(file: path, tensor: name, dtype: dtypeName)
      }
      guard let shapeItems = entry["shape"]?.arrayValue else {
        throw CheckpointError.invalidEntry(file: path, tensor: name, reason: "missing 'shape'")
      }
      var shape: [Int] = []
      for item in shapeItems {
        guard let d = try SafetensorsHeader.integer(item, path: path, tensor: name) else {
          throw CheckpointError.invalidShape(file: path, tensor: name, shape: JSON.array(shapeItems).serialized)
        }
        shape.append(d)
      }
      guard let byteCount = SafetensorsHeader.checkedByteCount(shape: shape, dtype: dtype) else {
        throw CheckpointError.sizeOverflow(file: path, tensor: name)
      }
      guard let transformName = entry["transform"]?.stringValue, let transform = ByteTransform(rawValue: transformName),
        let first = entry["first_chunk"]?.intValue, let count = entry["chunk_count"]?.intValue,
        let digestText = entry["digest"]?.stringValue, let digest = UInt64(digestText, radix: 16)
      else {
        throw CheckpointError.invalidEntry(
          file: path, tensor: name, reason: "missing or invalid transform, chunk range or digest")
      }
      var baseDigest: UInt64?
      if transform == .delta {
        guard let text = entry["base_digest"]?.stringValue, let value = UInt64(text, radix: 16) else {
          throw CheckpointError.invalidEntry(file: path, tensor: name, reason: "delta tensor without a base_digest")
        }
        baseDigest = value
      }
      let expectedCount = (byteCount + chunkSize - 1) / chunkSize
      guard first == nextChunk, count == expectedCount, count <= chunks.count - first else {
        throw CheckpointError.corruptChunkIndex(
          file: path,
          reason:
            "tensor '\(name)' lists chunks \(first)..<\(first + count), expected \(nextChunk)..<\(nextChunk + expectedCount)"
        )
      }
      for local in 0..<count where chunks[first + local].rawSize != min(chunkSize, byteCount - local * chunkSize) {
        throw CheckpointError.corruptChunkIndex(
          file: path, reason: "tensor '\(name)' chunk \(local) has raw size \(chunks[first + local].rawSize)")
      }
      nextChunk += count
      let info = TensorInfo(name: name, dtype: dtype, shape: shape)
      tensors.append(
        MKZ.TensorRecord(
          info: info, transform: transform, chunks: first..<(first + count), digest: digest, baseDigest: baseDigest))
    }
    return (tensors, nextChunk)
  }
}
