import Foundation
import Tensor
import Testing

@testable import Checkpoint
@testable import TestSupport

@Suite struct MemoryCheckpointTests {
  let infos = [TensorInfo(name: "w", dtype: .bf16, shape: [3, 5]), TensorInfo(name: "ids", dtype: .i64, shape: [4])]

  /// Bytes written piece by piece read back exactly, whole and by range; a written copy of the
  /// checkpoint is the same file as the one written directly.
  @Test func readsBackWhatWasWrittenAndCopiesLikeAFile() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let w = Tensor(shape: [3, 5], scalars: (0..<15).map { Float($0) * 0.25 - 1 })
    let ids = TensorData(
      dtype: .i64, shape: [4], bytes: (0..<4).flatMap { withUnsafeBytes(of: Int64($0 * 1000).littleEndian, Array.init) }
    )
    let sink = MemoryCheckpointWriter(name: "held", tensors: infos, metadata: ["k": "v"], modelFolder: "/models/base")
    let encoded = w.encoded(as: .bf16)
    try sink.beginTensor("w")
    try encoded.bytes.withUnsafeBytes { all in
      try sink.append(UnsafeRawBufferPointer(rebasing: all[0..<7]))
      try sink.append(UnsafeRawBufferPointer(rebasing: all[7...]))
    }
    try sink.write("ids", ids)
    try sink.finish()
    let held = sink.checkpoint
    #expect(
      held.tensors == infos && held.metadata == ["k": "v"] && held.modelFolder == "/models/base"
        && held.byteCount == 30 + 32)
    #expect(try held.read("w") == encoded && held.read("ids") == ids)
    #expect(try held.withBytes(of: "w", range: 4..<10) { Array($0) } == Array(encoded.bytes[4..<10]))
    #expect(throws: CheckpointError.missingTensor(file: "held", tensor: "nope")) { try held.read("nope") }

    let direct = folder.file("direct.safetensors")
    let viaMemory = folder.file("copy.safetensors")
    let writer = try CheckpointWriter(destination: direct, tensors: infos, options: WriteOptions(metadata: ["k": "v"]))
    try writer.write("w", encoded)
    try writer.write("ids", ids)
    try writer.finish()
    try copyCheckpoint(from: held, to: viaMemory, options: WriteOptions(metadata: ["k": "v"]))
    #expect(readBytes(direct) == readBytes(viaMemory))
  }

  /// Out of order, too many or too few bytes, a tensor left out: refused, naming the checkpoint.
  @Test func refusesWritesThatBreakTheDeclaration() throws {
    let w = [UInt8](repeating: 1, count: 30)
    func expectOrderError(_ body: (MemoryCheckpointWriter) throws -> Void) {
      let sink = MemoryCheckpointWriter(name: "held", tensors: infos)
      do {
        try body(sink)
        Issue.record("accepted")
      } catch let CheckpointError.writeOrder(file, _) {
        #expect(file == "held")
      } catch {
        Issue.record("\(error)")
      }
    }
    expectOrderError { try $0.beginTensor("ids") }
    expectOrderError { s in
      try s.beginTensor("w"); try w.withUnsafeBytes { try s.append($0) };
      try s.append(UnsafeRawBufferPointer(start: nil, count: 0));
      try [UInt8](repeating: 0, count: 1).withUnsafeBytes { try s.append($0) }
    }
    expectOrderError { s in
      try s.beginTensor("w"); try w.dropLast().withUnsafeBytes { try s.append($0) }; try s.beginTensor("ids")
    }
    expectOrderError { s in
      try s.beginTensor("w"); try w.withUnsafeBytes { try s.append($0) }; try s.finish()
    }
    expectOrderError { try $0.append(UnsafeRawBufferPointer(start: nil, count: 0)) }
  }
}
