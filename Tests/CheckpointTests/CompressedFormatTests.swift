import Foundation
import Tensor
import Testing

@testable import Checkpoint
@testable import TestSupport

@Suite struct CompressedFormatTests {
  /// Tensors of every dtype, some spanning several 1 MiB chunks, with NaN payloads in float types.
  static func fixtures() -> [(String, TensorData)] {
    var tensors = SafetensorsRoundTripTests.allDTypes()
    var big = randomTensorData(.f32, shape: [700, 500], seed: 11)  // 1.4 MB: 2 chunks
    big.bytes.withUnsafeMutableBytes { raw in
      raw.storeBytes(of: UInt32(0x7FC0_1234), toByteOffset: 0, as: UInt32.self)  // quiet NaN with payload
      raw.storeBytes(of: UInt32(0xFF80_0001), toByteOffset: 4, as: UInt32.self)  // signalling NaN
      raw.storeBytes(of: UInt32(0x0000_0001), toByteOffset: 8, as: UInt32.self)  // smallest subnormal
    }
    var half = randomTensorData(.bf16, shape: [1500, 1000], seed: 12)  // 3 MB: 3 chunks
    half.bytes.withUnsafeMutableBytes { $0.storeBytes(of: UInt16(0x7F81), toByteOffset: 2, as: UInt16.self) }
    tensors += [("big.f32", big), ("big.bf16", half), ("big.i64", randomTensorData(.i64, shape: [200_000], seed: 13))]
    return tensors
  }

  @Test func everyDTypeRoundTripsBitExact() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let tensors = Self.fixtures()
    let path = try writeCheckpoint(
      tensors, to: folder.file("all.mkz"), options: WriteOptions(format: .mkz, metadata: ["k": "v"]))
    let file = try CompressedFile(path: path)
    #expect(file.metadata == ["k": "v"])
    #expect(file.tensors.map(\.name) == tensors.map(\.0))
    for (name, data) in tensors { #expect(try file.read(name) == data, "\(name)") }
    try file.verify(progress: nil)
    #expect(try openCheckpoint(path) is CompressedFile)
  }

  @Test func rowRangesDecodeOnlyTheirChunksAndMatchTheWhole() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = randomTensorData(.f32, shape: [1000, 700], seed: 3)  // 2.8 MB, rows of 2800 B
    let file = try openCheckpoint(
      try writeCheckpoint([("w", data)], to: folder.file("w.mkz"), options: WriteOptions(format: .mkz)))
    for rows in [0..<1, 370..<380, 374..<750, 999..<1000, 0..<1000] {
      let part = try file.readRows("w", rows)
      #expect(part.bytes == Array(data.bytes[(rows.lowerBound * 2800)..<(rows.upperBound * 2800)]), "rows \(rows)")
    }
  }

  @Test func outputIsIdenticalWhateverThePieceSizes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = randomTensorData(.bf16, shape: [3000, 700], seed: 5)
    let info = [TensorInfo(name: "w", dtype: .bf16, shape: [3000, 700])]
    var files: [[UInt8]] = []
    for (i, piece) in [data.bytes.count, 1 << 20, 77_777, 4096].enumerated() {
      let path = folder.file("w\(i).mkz")
      let writer = try CheckpointWriter(destination: path, tensors: info, options: WriteOptions(format: .mkz))
      try writer.beginTensor("w")
      try data.bytes.withUnsafeBytes { raw in
        for start in stride(from: 0, to: raw.count, by: piece) {
          try writer.append(UnsafeRawBufferPointer(rebasing: raw[start..<min(raw.count, start + piece)]))
        }
      }
      try writer.finish()
      files.append(readBytes(path))
    }
    #expect(files.allSatisfy { $0 == files[0] })
  }

  @Test func deltaAgainstTheBaseIsLosslessSmallerAndRefusesAnotherBase() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let base = Tensor(
      shape: [1024, 512], scalars: CounterRNG(seed: 1, stream: "base").normalTensor([1024, 512], scale: 0.02).scalars)
    let noise = CounterRNG(seed: 1, stream: "tune").normalTensor([1024, 512], scale: 0.0002)  // 1% of the weights' std
    let tuned = Tensor(shape: base.shape, scalars: zip(base.scalars, noise.scalars).map(+))
    let basePath = try writeCheckpoint(
      [("w", base.encoded(as: .bf16)), ("bias", randomTensorData(.f32, shape: [8], seed: 1))],
      to: folder.file("base.safetensors"))
    let tunedData = tuned.encoded(as: .bf16)
    let tensors = [("w", tunedData), ("extra", randomTensorData(.f16, shape: [10], seed: 2))]
    let baseModel = try openCheckpoint(basePath)
    let deltaPath = try writeCheckpoint(
      tensors, to: folder.file("delta.mkz"), options: WriteOptions(format: .mkz, deltaBase: baseModel))
    let plainPath = try writeCheckpoint(tensors, to: folder.file("plain.mkz"), options: WriteOptions(format: .mkz))

    let delta = try CompressedFile(path: deltaPath, base: baseModel)
    #expect(delta.isDelta("w") && !delta.isDelta("extra"))
    for (name, data) in tensors { #expect(try delta.read(name) == data) }
    let bitsPerWeight = Double(delta.storedByteCount(of: "w")! * 8) / Double(tuned.count)
    let plainBits = Double(try CompressedFile(path: plainPath).storedByteCount(of: "w")! * 8) / Double(tuned.count)
    #expect(bitsPerWeight < 6, "delta stores \(bitsPerWeight) bits per weight")
    #expect(plainBits > 9, "plain stores \(plainBits) bits per weight")

    #expect(throws: CheckpointError.deltaBaseMissing(file: deltaPath, tensor: "w")) {
      try CompressedFile(path: deltaPath).read("w")
    }
    let otherBase = try openCheckpoint(try writeCheckpoint([("w", tunedData)], to: folder.file("other.safetensors")))
    do {
      _ = try CompressedFile(path: deltaPath, base: otherBase).read("w")
      Issue.record("decoded against the wrong base")
    } catch let error as CheckpointError {
      guard case .deltaBaseMismatch(let file, let tensor, _, _) = error else { throw error }
      #expect(file == deltaPath && tensor == "w")
    }
  }
}
