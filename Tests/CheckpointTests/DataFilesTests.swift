import Foundation
import Tensor
import Testing

@testable import Checkpoint
@testable import TestSupport

/// A version-1.0 .npy file: magic, header padded to a multiple of 64 bytes, raw little-endian data.
func npyBytes(descr: String, shape: String, data: [UInt8]) -> [UInt8] {
  var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shape), }"
  while (10 + header.utf8.count + 1) % 64 != 0 { header += " " }
  header += "\n"
  let length = UInt16(header.utf8.count)
  return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(length & 0xFF), UInt8(length >> 8)] + Array(header.utf8) + data
}

@Suite struct DataFilesTests {
  @Test func csvWithAndWithoutAHeader() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try "task,x,label,y\n0,1.5,2,-1\n1,0.25,0,3\n".write(
      toFile: folder.file("a.csv"), atomically: true, encoding: .utf8)
    let named = try DataFiles.readLabeled(folder.file("a.csv"))
    #expect(named == FeatureTable(features: [1.5, -1, 0.25, 3], columns: 2, labels: [2, 0], tasks: [0, 1]))
    try "1,2,7\n3,4,1\n".write(toFile: folder.file("b.csv"), atomically: true, encoding: .utf8)
    #expect(
      try DataFiles.readLabeled(folder.file("b.csv"))
        == FeatureTable(features: [1, 2, 3, 4], columns: 2, labels: [7, 1]))
    try "1,2,0.5\n".write(toFile: folder.file("c.csv"), atomically: true, encoding: .utf8)
    #expect(
      throws: CheckpointError.badDataFile(
        file: folder.file("c.csv"), reason: "label on line 1 = 0.5 is not an integer between 0 and 1048576")
    ) { try DataFiles.readLabeled(folder.file("c.csv")) }
  }

  @Test func npyFeaturesWithNpyLabels() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let features: [Float] = [1, 2, 3, 4, 5, 6]
    writeBytes(
      npyBytes(
        descr: "<f4", shape: "(3, 2)",
        data: features.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian) { Array($0) } }),
      to: folder.file("x.npy"))
    writeBytes(
      npyBytes(
        descr: "<i8", shape: "(3,)",
        data: [Int64(2), 0, 1].flatMap { withUnsafeBytes(of: $0.littleEndian) { Array($0) } }), to: folder.file("y.npy")
    )
    #expect(
      try DataFiles.readLabeled(folder.file("x.npy"), labels: folder.file("y.npy"))
        == FeatureTable(features: features, columns: 2, labels: [2, 0, 1]))
    #expect(throws: CheckpointError.self) { try DataFiles.readLabeled(folder.file("x.npy")) }
    writeBytes(npyBytes(descr: "<f4", shape: "(3, 2)", data: [0, 0, 0]), to: folder.file("short.npy"))
    #expect(
      throws: CheckpointError.badDataFile(
        file: folder.file("short.npy"), reason: "data holds 3 bytes, the shape [3, 2] of '<f4' needs 24")
    ) {
      try DataFiles.readLabeled(folder.file("short.npy"), labels: folder.file("y.npy"))
    }
  }

  @Test func tokensFromJSONLinesAndSafetensors() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try "[1, 2, 3]\n\n{\"input_ids\": [4, 5]}\n".write(
      toFile: folder.file("t.jsonl"), atomically: true, encoding: .utf8)
    #expect(try DataFiles.readTokens(folder.file("t.jsonl")) == [[1, 2, 3], [4, 5]])
    try "[1, \"a\"]\n".write(toFile: folder.file("bad.jsonl"), atomically: true, encoding: .utf8)
    #expect(throws: CheckpointError.self) { try DataFiles.readTokens(folder.file("bad.jsonl")) }
    let ids = TensorData(
      dtype: .i32, shape: [2, 3],
      bytes: [Int32(7), 8, 9, 10, 11, 0].flatMap { withUnsafeBytes(of: $0.littleEndian) { Array($0) } })
    let mask = TensorData(
      dtype: .i64, shape: [2, 3],
      bytes: [Int64(1), 1, 1, 1, 1, 0].flatMap { withUnsafeBytes(of: $0.littleEndian) { Array($0) } })
    let writer = try CheckpointWriter(
      destination: folder.file("t.safetensors"),
      tensors: [
        TensorInfo(name: "input_ids", dtype: .i32, shape: [2, 3]),
        TensorInfo(name: "attention_mask", dtype: .i64, shape: [2, 3]),
      ], options: WriteOptions(format: .safetensors))
    try writer.write("input_ids", ids)
    try writer.write("attention_mask", mask)
    try writer.finish()
    #expect(try DataFiles.readTokens(folder.file("t.safetensors")) == [[7, 8, 9], [10, 11]])
  }

  @Test func labelledSafetensorsRoundTrip() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let table = FeatureTable(features: [0.5, -1, 2, 3], columns: 2, labels: [1, 0], tasks: [3, 3])
    try DataFiles.writeLabeled(table, to: folder.file("d.safetensors"), overwrite: false)
    #expect(try DataFiles.readLabeled(folder.file("d.safetensors")) == table)
  }
}
