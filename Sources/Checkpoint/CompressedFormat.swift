import Tensor

// MKZ: the mergekit compressed checkpoint format, version 2 (version 1, without `files`, is still
// read). File extension `.mkz`.
//
// A lossless container for the same tensors a safetensors file holds, compressed with zstd after a
// dtype-aware byte transform, in independently decodable chunks with checksums. All integers are
// little-endian.
//
//   offset 0     magic     8 bytes  89 4D 4B 5A 0D 0A 1A 0A  ("\x89MKZ\r\n\x1a\n")
//          8     version   u32      1
//          12    reserved  u32      0
//          16    chunks    zstd frames (or raw payloads), back to back, in tensor order
//          I     index     chunk_count records of 32 bytes:
//                            u64 offset      absolute file offset of the stored chunk
//                            u32 stored      stored size in bytes
//                            u32 raw         decoded size in bytes (= chunk_size except a tensor's last)
//                            u64 checksum    XXH64 (seed 0) of the decoded payload, before the inverse transform
//                            u32 flags       bit 0: payload stored raw (zstd saved < 1%)
//                            u32 reserved    0
//          T     table     UTF-8 JSON, see below
//          end-48 footer   48 bytes:
//                            u64 index offset I, u64 chunk_count, u64 table offset T, u64 table length,
//                            u64 XXH64 of index + table bytes, u32 version (1), 4 bytes "MKZF"
//
// The table: {"chunk_size": 1048576, "metadata": {string: string}, "safetensors_header"?: string,
//   "tensors": [{"name", "dtype", "shape", "transform": "planes" | "float-planes" | "delta",
//                "first_chunk", "chunk_count", "digest", "base_digest"?}]}
// Tensors list their chunks in order; their chunk ranges tile 0..<chunk_count. A tensor of B bytes
// has ceil(B / chunk_size) chunks; chunks never span two tensors and hold whole elements.
// Version 2: an optional "files": [{"name", "size", "first_chunk", "chunk_count", "digest"}] after
// the tensors holds a model folder's small files (config.json, tokenizer files, card), each a
// byte vector stored like a U8 tensor ("planes" of 1-byte elements: the bytes themselves), its
// chunks following the tensors' so that tensors and files together tile the index. Names are
// plain file names (letters, digits, `._-`, not starting with a dot), at most 256 MiB each.
// `safetensors_header` is the header text of the safetensors file this one was made from; a
// writer converting back uses it verbatim when the tensors are unchanged (bit-identical round trip).
// `digest` is the tensor's XXH64 digest in 16 hex digits: XXH64 of the concatenated little-endian
// u64 XXH64s of its stored bytes in 1 MiB pieces (so it is computed in parallel).
//
// Payload transforms (see ByteTransform): "planes" splits elements into byte planes (lowest bytes
// first); "float-planes" first rotates each element left by one bit (exponent into the top byte);
// "delta" stores zigzag(bits - base bits) per element (wrapping, at the element's width) in byte
// planes, against the base tensor whose digest is `base_digest`; a reader refuses any other base.
//
// The index and table sit at the end so a writer streams with bounded memory; the fixed footer
// locates them. Every size read from the file is validated before it is used to allocate.
enum MKZ {
  static let fileExtension = "mkz"
  static let magic: [UInt8] = [0x89, 0x4D, 0x4B, 0x5A, 0x0D, 0x0A, 0x1A, 0x0A]
  static let footerMagic: [UInt8] = Array("MKZF".utf8)
  /// The version written: 2 adds the `files` list (a model folder's small files). Version 1
  /// files (without it) are still read.
  static let version: UInt32 = 2
  static let readableVersions: ClosedRange<UInt32> = 1...2
  /// The largest embedded file (a tokenizer.json is a few MiB).
  static let maxEmbeddedFileSize = 256 << 20
  static let preambleSize = 16
  static let footerSize = 48
  static let chunkRecordSize = 32
  /// Raw bytes per chunk written by this version.
  static let chunkSize = 1 << 20
  /// Largest chunk size a reader accepts (bounds every allocation made from the file).
  static let maxChunkSize = 64 << 20
  /// The most raw bytes one stored byte can stand for. zstd's densest encoding (run-length
  /// blocks of 128 KiB) reaches about 32,000:1 (64 MiB of zeros take 2,077 bytes); a chunk
  /// table claiming more is refused, so a small file can never make a reader allocate
  /// gigabytes for tensors its bytes cannot hold.
  static let maxCompressionRatio = 1 << 16
  /// A chunk is stored raw unless zstd saves at least 1%.
  static let minimumSaving = 0.01
  /// Piece size of the tensor digest.
  static let digestPieceSize = 1 << 20

  struct ChunkRecord: Equatable {
    var offset: Int
    var storedSize: Int
    var rawSize: Int
    var checksum: UInt64
    var isRaw: Bool
  }

  struct TensorRecord {
    var info: TensorInfo
    var transform: ByteTransform
    var chunks: Range<Int>
    var digest: UInt64
    var baseDigest: UInt64?
    /// An embedded file (listed under `files`, its bytes as a U8 vector), not a tensor.
    var isFile = false
  }

  /// Whether `name` may be an embedded file's: a plain file name of at most 200 bytes.
  static func isFileName(_ name: String) -> Bool {
    !name.isEmpty && name.utf8.count <= 200 && !name.hasPrefix(".")
      && name.utf8.allSatisfy { $0.isASCIIAlphanumeric || $0 == 0x2E || $0 == 0x5F || $0 == 0x2D }
  }

  static func hex(_ value: UInt64) -> String {
    let digits = String(value, radix: 16)
    return String(repeating: "0", count: 16 - digits.count) + digits
  }

  /// The digest of a tensor's bytes as defined above (hashes of 1 MiB pieces, then their hash).
  static func digest(ofPieceHashes hashes: [UInt64]) -> UInt64 {
    var bytes: [UInt8] = []
    bytes.reserveCapacity(hashes.count * 8)
    for h in hashes { withUnsafeBytes(of: h.littleEndian) { bytes.append(contentsOf: $0) } }
    return XXHash64.hash(bytes)
  }

  /// The digest of tensor `name` of any checkpoint, computed in parallel over 1 MiB pieces.
  static func digest(of checkpoint: any Checkpoint, tensor name: String) throws -> UInt64 {
    let total = try checkpoint.info(name).byteCount
    let pieces = (total + digestPieceSize - 1) / digestPieceSize
    var hashes = [UInt64](repeating: 0, count: pieces)
    try hashes.withUnsafeMutableBufferPointer { slots in
      try Parallel.forEach(pieces) { _, piece in
        let range = (piece * digestPieceSize)..<min(total, (piece + 1) * digestPieceSize)
        slots[piece] = try checkpoint.withBytes(of: name, range: range) { XXHash64.hash($0) }
        checkpoint.release(name, range: range)  // keep resident memory at a few pieces
      }
    }
    return digest(ofPieceHashes: hashes)
  }

  static func encodeTable(
    _ tensors: [TensorRecord], metadata: [String: String], chunkSize: Int, safetensorsHeader: [UInt8]?
  ) -> [UInt8] {
    func entry(_ t: TensorRecord) -> JSON {
      if t.isFile {
        return .object([
          ("name", .string(t.info.name)), ("size", .number(String(t.info.byteCount))),
          ("first_chunk", .number(String(t.chunks.lowerBound))), ("chunk_count", .number(String(t.chunks.count))),
          ("digest", .string(hex(t.digest))),
        ])
      }
      var pairs: [(key: String, value: JSON)] = [
        ("name", .string(t.info.name)),
        ("dtype", .string(t.info.dtype.rawValue)),
        ("shape", .array(t.info.shape.map { .number(String($0)) })),
        ("transform", .string(t.transform.rawValue)),
        ("first_chunk", .number(String(t.chunks.lowerBound))),
        ("chunk_count", .number(String(t.chunks.count))),
        ("digest", .string(hex(t.digest))),
      ]
      if let base = t.baseDigest { pairs.append(("base_digest", .string(hex(base)))) }
      return .object(pairs)
    }
    var table: [(key: String, value: JSON)] = [
      ("chunk_size", .number(String(chunkSize))),
      ("metadata", .object(metadata.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) })),
      ("tensors", .array(tensors.filter { !$0.isFile }.map(entry))),
    ]
    let files = tensors.filter(\.isFile)
    if !files.isEmpty { table.append(("files", .array(files.map(entry)))) }
    if let header = safetensorsHeader, let text = String(validating: header, as: UTF8.self) {
      table.append(("safetensors_header", .string(text)))
    }
    return Array(JSON.object(table).serialized.utf8)
  }

  static func encodeChunkRecords(_ records: [ChunkRecord]) -> [UInt8] {
    var bytes: [UInt8] = []
    bytes.reserveCapacity(records.count * chunkRecordSize)
    func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    for r in records {
      put(UInt64(r.offset))
      put(UInt32(r.storedSize))
      put(UInt32(r.rawSize))
      put(r.checksum)
      put(UInt32(r.isRaw ? 1 : 0))
      put(UInt32(0))
    }
    return bytes
  }

  static func encodeFooter(indexOffset: Int, chunkCount: Int, tableOffset: Int, tableLength: Int, checksum: UInt64)
    -> [UInt8]
  {
    var bytes: [UInt8] = []
    func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    put(UInt64(indexOffset))
    put(UInt64(chunkCount))
    put(UInt64(tableOffset))
    put(UInt64(tableLength))
    put(checksum)
    put(version)
    bytes.append(contentsOf: footerMagic)
    return bytes
  }

  static var preamble: [UInt8] {
    var bytes = magic
    withUnsafeBytes(of: version.littleEndian) { bytes.append(contentsOf: $0) }
    bytes.append(contentsOf: [0, 0, 0, 0])
    return bytes
  }
}

extension UInt8 {
  var isASCIIAlphanumeric: Bool {
    (0x30...0x39).contains(self) || (0x41...0x5A).contains(self) || (0x61...0x7A).contains(self)
  }
}
