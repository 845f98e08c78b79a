import Foundation
import Testing

@testable import Checkpoint
@testable import Tensor
@testable import TestSupport

/// A single `.mkz` carries its model folder's small files (format version 2), so that
/// folder -> .mkz -> folder gives back a loadable model, byte for byte.
@Suite struct CompressedFolderFilesTests {
  @Test func folderFilesRoundTripThroughASingleFile() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let weights = [("w", randomTensorData(.bf16, shape: [64, 32], seed: 1))]
    let model = folder.file("model")
    try FileManager.default.createDirectory(atPath: model, withIntermediateDirectories: true)
    _ = try writeCheckpoint(weights, to: model + "/model.safetensors")
    let texts = [
      "config.json": #"{"model_type": "llama", "torch_dtype": "bfloat16", "dtype": "bfloat16"}"#,
      "tokenizer.json": String(repeating: #"{"a": 1}"#, count: 200_000),  // several chunks
      "generation_config.json": "{}", "empty.txt": "",
    ]
    for (name, text) in texts { try text.write(toFile: model + "/" + name, atomically: true, encoding: .utf8) }
    try FileManager.default.createDirectory(atPath: model + "/1_Pooling", withIntermediateDirectories: true)
    try "{}".write(toFile: model + "/1_Pooling/config.json", atomically: true, encoding: .utf8)

    let packed = folder.file("model.mkz")
    try copyCheckpoint(
      from: try openCheckpoint(model), to: packed, options: WriteOptions(format: .mkz, copyFilesFrom: model))
    let file = try CompressedFile(path: packed)
    #expect(file.embeddedFileNames == ["config.json", "empty.txt", "generation_config.json", "tokenizer.json"])
    for (name, text) in texts { #expect(try file.embeddedFile(name) == Data(text.utf8), "\(name)") }
    try file.verify(progress: nil)

    let restored = folder.file("restored")
    try copyCheckpoint(from: file, to: restored, options: WriteOptions())
    for (name, text) in texts {
      #expect(try Data(contentsOf: URL(fileURLWithPath: restored + "/" + name)) == Data(text.utf8), "\(name)")
    }
    #expect(try openCheckpoint(restored).read("w") == weights[0].1)
    #expect(!FileManager.default.fileExists(atPath: restored + "/1_Pooling"))  // folders are not carried
  }

  /// A damaged embedded file is caught by its chunk checksum when read (and by verify).
  @Test func aDamagedEmbeddedFileIsCaught() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let packed = folder.file("m.mkz")
    var options = WriteOptions(format: .mkz)
    options.files = ["config.json": Data((0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 7) })]
    let writer = try CheckpointWriter(
      destination: packed, tensors: [TensorInfo(name: "w", dtype: .f32, shape: [4])], options: options)
    try writer.write("w", Tensor(shape: [4], scalars: [1, 2, 3, 4]), as: .f32)
    try writer.finish()
    let file = try CompressedFile(path: packed)
    let record = try #require(file.fileRecords["config.json"])
    var bytes = readBytes(packed)
    bytes[file.chunks[record.chunks.lowerBound].offset + 5] ^= 0x10
    writeBytes(bytes, to: folder.file("bad.mkz"))
    let damaged = try CompressedFile(path: folder.file("bad.mkz"))
    #expect(throws: CheckpointError.self) { try damaged.embeddedFile("config.json") }
    #expect(throws: CheckpointError.self) { try damaged.verify(progress: nil) }
  }
}
