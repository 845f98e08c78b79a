import Foundation
import Tensor
import Testing

@testable import Checkpoint
@testable import TestSupport

/// Hand-damaged `.mkz` files: each must give its own error naming the file (and tensor/chunk).
@Suite struct CompressedBadFileTests {
  /// A valid file: `zeros` (compressible, 2 chunks) then `noise` (random bytes, stored raw).
  static func validFile(in folder: TemporaryFolder) throws -> (path: String, bytes: [UInt8], file: CompressedFile) {
    let zeros = TensorData(dtype: .f32, shape: [300_000], bytes: [UInt8](repeating: 0, count: 1_200_000))
    let noise = randomTensorData(.u8, shape: [5000], seed: 3)
    let path = try writeCheckpoint(
      [("zeros", zeros), ("noise", noise)], to: folder.file("good.mkz"), options: WriteOptions(format: .mkz))
    return (path, readBytes(path), try CompressedFile(path: path))
  }

  static func expectError(
    _ bytes: [UInt8], in folder: TemporaryFolder, read tensor: String? = nil, _ check: (CheckpointError, String) -> Bool
  ) {
    let path = folder.file("bad-\(UUID().uuidString).mkz")
    writeBytes(bytes, to: path)
    do {
      let file = try CompressedFile(path: path)
      if let tensor { _ = try file.read(tensor) } else { try file.verify(progress: nil) }
      Issue.record("no error")
    } catch let error as CheckpointError {
      #expect(check(error, path), "unexpected: \(error)")
      #expect(error.description.contains(path))
    } catch {
      Issue.record("unexpected error type \(error)")
    }
  }

  @Test func headerAndFooterDamage() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let good = try Self.validFile(in: folder)
    var magic = good.bytes
    magic[1] = 0x4E
    Self.expectError(magic, in: folder) { e, p in e == .badMagic(file: p) }
    var version = good.bytes
    version[8] = 3
    Self.expectError(version, in: folder) { e, p in e == .unsupportedVersion(file: p, version: 3) }
    // Version 1 (no embedded files) is still read: the same file with both version fields at 1.
    var first = good.bytes
    first[8] = 1
    first[first.count - 8] = 1
    let older = folder.file("v1.mkz")
    writeBytes(first, to: older)
    #expect(try CompressedFile(path: older).read("noise") == good.file.read("noise"))
    var mixed = good.bytes
    mixed[8] = 1
    Self.expectError(mixed, in: folder) { e, p in e == .unsupportedVersion(file: p, version: 2) }
    Self.expectError(Array(good.bytes.dropLast(10)), in: folder) { e, p in e == .truncatedFooter(file: p) }
    Self.expectError(Array(good.bytes.prefix(20)), in: folder) { e, p in e == .truncatedFooter(file: p) }
    var index = good.bytes
    let indexOffset = good.file.chunks.last!.offset + good.file.chunks.last!.storedSize
    index[indexOffset + 3] ^= 0x40
    Self.expectError(index, in: folder) { e, p in
      if case .corruptChunkIndex(let f, _) = e { return f == p } else { return false }
    }
    var footer = good.bytes
    footer[footer.count - 48] ^= 0x01  // index offset
    Self.expectError(footer, in: folder) { e, p in
      if case .corruptChunkIndex(let f, _) = e { return f == p } else { return false }
    }
  }

  @Test func chunkDamage() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let good = try Self.validFile(in: folder)
    let rawChunk = good.file.chunks[2]
    #expect(rawChunk.isRaw)
    var flipped = good.bytes
    flipped[rawChunk.offset + 100] ^= 0x10
    Self.expectError(flipped, in: folder, read: "noise") { e, p in
      e == .chunkChecksumMismatch(file: p, tensor: "noise", chunk: 0)
    }
    let frame = good.file.chunks[1]
    #expect(!frame.isRaw)
    var broken = good.bytes
    broken[frame.offset] ^= 0xFF  // zstd frame magic
    Self.expectError(broken, in: folder, read: "zeros") { e, p in
      if case .corruptFrame(let f, let t, let c, _) = e {
        return f == p && t == "zeros" && c == 1
      } else {
        return false
      }
    }
  }

  /// A frame that decodes to fewer bytes than its record says, with every checksum consistent.
  @Test func rawSizeMismatch() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let short = [UInt8](repeating: 7, count: 512)
    var frame = [UInt8](repeating: 0, count: Zstd.compressBound(512))
    let size = short.withUnsafeBytes { s in frame.withUnsafeMutableBytes { Zstd.Compressor().compress(s, into: $0) } }
    frame = Array(frame.prefix(size))
    let record = MKZ.ChunkRecord(offset: MKZ.preambleSize, storedSize: size, rawSize: 1024, checksum: 0, isRaw: false)
    let tensor = MKZ.TensorRecord(
      info: TensorInfo(name: "t", dtype: .u8, shape: [1024]), transform: .planes, chunks: 0..<1, digest: 0,
      baseDigest: nil)
    let index = MKZ.encodeChunkRecords([record])
    let table = MKZ.encodeTable([tensor], metadata: [:], chunkSize: MKZ.chunkSize, safetensorsHeader: nil)
    let indexOffset = MKZ.preambleSize + size
    let footer = MKZ.encodeFooter(
      indexOffset: indexOffset, chunkCount: 1, tableOffset: indexOffset + index.count, tableLength: table.count,
      checksum: XXHash64.hash(index + table))
    Self.expectError(MKZ.preamble + frame + index + table + footer, in: folder, read: "t") { e, p in
      e == .rawSizeMismatch(file: p, tensor: "t", chunk: 0, expected: 1024, actual: 512)
    }
  }

  /// `verify` catches one flipped byte anywhere in any chunk and names tensor and chunk.
  @Test func verifyCatchesAFlippedByteInEveryChunk() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let tensors = [
      ("a", randomTensorData(.bf16, shape: [800_000], seed: 1)),
      ("b", randomTensorData(.f32, shape: [100, 100], seed: 2)),
    ]
    let path = try writeCheckpoint(tensors, to: folder.file("v.mkz"), options: WriteOptions(format: .mkz))
    let file = try CompressedFile(path: path)
    let bytes = readBytes(path)
    let owners = file.tensors.flatMap { info in
      (0..<file.records[ExactName(info.name)]!.chunks.count).map { (info.name, $0) }
    }
    let rng = CounterRNG(seed: 4, stream: "flip")
    for (index, chunk) in file.chunks.enumerated() {
      for trial in 0..<3 {
        var damaged = bytes
        let position = chunk.offset + Int(rng.bits(UInt64(index * 3 + trial)) % UInt64(chunk.storedSize))
        damaged[position] ^= UInt8(1 << (trial + 2))
        Self.expectError(damaged, in: folder) { e, p in
          let (tensor, local) = owners[index]
          switch e {
          case .chunkChecksumMismatch(let f, let t, let c), .corruptFrame(let f, let t, let c, _),
            .rawSizeMismatch(let f, let t, let c, _, _):
            return f == p && t == tensor && c == local
          default: return false
          }
        }
      }
    }
  }
}
