import Foundation
import Tensor
import Testing

@testable import Checkpoint
@testable import TestSupport

@Suite struct SafetensorsRoundTripTests {
  static func allDTypes() -> [(String, TensorData)] {
    DType.allCases.enumerated().map { i, dtype in
      ("t.\(dtype.rawValue)", randomTensorData(dtype, shape: [3, 5 + i], seed: UInt64(i)))
    }
      + [
        ("empty", TensorData(dtype: .f32, shape: [0, 4], bytes: [])),
        ("scalar", Tensor(shape: [], scalars: [2.5]).encoded(as: .f32)),
      ]
  }

  @Test func everyDTypeReadsBackBitExactWithShapes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let tensors = Self.allDTypes()
    let path = try writeCheckpoint(
      tensors, to: folder.file("all.safetensors"), options: WriteOptions(metadata: ["format": "pt"]))
    let file = try SafetensorsFile(path: path)
    #expect(file.metadata == ["format": "pt"])
    #expect(file.tensors.map(\.name) == tensors.map(\.0))
    for (name, data) in tensors { #expect(try file.read(name) == data, "\(name)") }
    // The header is padded to a multiple of 8 with spaces.
    let header = readBytes(path)
    let length = header.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
    #expect(length % 8 == 0)
  }

  @Test func rowRangesAreSlicesOfTheWhole() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = randomTensorData(.bf16, shape: [10, 6], seed: 4)
    let file = try openCheckpoint(try writeCheckpoint([("w", data)], to: folder.file("w.safetensors")))
    let rows = try file.readRows("w", 3..<7)
    #expect(rows.shape == [4, 6])
    #expect(rows.bytes == Array(data.bytes[(3 * 12)..<(7 * 12)]))
    #expect(throws: CheckpointError.self) { try file.readRows("w", 8..<11) }
  }

  /// Reads in `MappedFile.copiedReads` (under 256 KiB) come from pooled `pread` buffers, larger
  /// ones from the mapping: the file's bytes either way, also while several reads are held at
  /// once (as a merge holds every input's range), at odd offsets, of a range and of a few bytes.
  @Test func copiedReadsGiveTheStoredBytes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    // 3 x 256 KiB of f32, and a small tensor.
    let tensors =
      (0..<3).map { ("w\($0)", randomTensorData(.f32, shape: [256, 256], seed: UInt64(10 + $0))) }
      + [("small", randomTensorData(.bf16, shape: [64, 8], seed: 20))]
    let file = try SafetensorsFile(path: try writeCheckpoint(tensors, to: folder.file("m.safetensors")))
    let copied = MappedFile.copiedReads
    #expect(copied.contains(1) && copied.contains(64 << 10) && !copied.contains(256 << 10))
    for range in [0..<(256 << 10), 3..<((64 << 10) + 3), 100..<228] {
      func nested(_ i: Int) throws -> Bool {
        guard i < 3 else { return true }
        return try file.withBytes(of: "w\(i)", range: range) { bytes in
          guard Array(bytes) == Array(tensors[i].1.bytes[range]) else { return false }
          return try nested(i + 1)
        }
      }
      #expect(try nested(0), "\(range)")
      // The same range again: now from buffers the pool kept.
      #expect(try nested(0), "\(range), again")
    }
    #expect(try file.withBytes(of: "small", range: nil) { Array($0) } == tensors[3].1.bytes)
    let buffer = ReadBuffers.shared.take((64 << 10) + 1)
    #expect(buffer.count >= (64 << 10) + 1 && Int(bitPattern: buffer.baseAddress) % 64 == 0)
    ReadBuffers.shared.give(buffer)
  }

  /// `copyBytes` puts the asked pieces of a tensor back to back, in the order given (repeats,
  /// odd offsets, an empty piece, the tensor's last byte), the same from a single file (through
  /// its mapping), a sharded folder and a compressed file (piece by piece, through `withBytes`);
  /// a missing tensor is named.
  @Test func copiedPiecesAreTheStoredBytesInOrder() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let tensors = (0..<3).map { ("w\($0)", randomTensorData(.bf16, shape: [300, 70], seed: UInt64(50 + $0))) }
    let paths = [
      try writeCheckpoint(tensors, to: folder.file("one.safetensors")),
      try writeCheckpoint(tensors, to: folder.file("shards"), options: WriteOptions(shardSize: 50_000)),
      try writeCheckpoint(tensors, to: folder.file("packed.mkz"), options: WriteOptions(format: .mkz)),
    ]
    let size = tensors[1].1.bytes.count
    let parts = [1000..<1128, 3..<131, 1000..<1128, 77..<77, (size - 9)..<size, 0..<1]
    let expected = parts.flatMap { tensors[1].1.bytes[$0] }
    for path in paths {
      let model = try openCheckpoint(path)
      let copied = try [UInt8](unsafeUninitializedCapacity: expected.count) { buffer, initialized in
        try model.copyBytes(of: "w1", parts: parts, into: UnsafeMutableRawBufferPointer(buffer))
        initialized = expected.count
      }
      #expect(copied == expected, "\(path)")
      var room = [UInt8](repeating: 0, count: 8)
      #expect(throws: CheckpointError.missingTensor(file: model.path, tensor: "v")) {
        try room.withUnsafeMutableBytes { try model.copyBytes(of: "v", parts: [0..<8], into: $0) }
      }
    }
  }

  /// With every descriptor the cap allows held elsewhere, a file is still read, through its
  /// mapping: the same bytes.
  @Test func filesPastTheDescriptorCapAreReadThroughTheMapping() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let data = randomTensorData(.f32, shape: [256, 256], seed: 30)
    let path = try writeCheckpoint([("w", data)], to: folder.file("m.safetensors"))
    #expect(try MappedFile(path: path).copiesReads)
    var taken = 0
    while ReadDescriptors.shared.hold() { taken += 1 }
    defer { for _ in 0..<taken { ReadDescriptors.shared.letGo() } }
    let withoutDescriptor = try MappedFile(path: path)
    #expect(ReadDescriptors.shared.cap > 0 && !withoutDescriptor.copiesReads)
    let file = try SafetensorsFile(path: path)
    let range = 1000..<(1000 + (64 << 10))
    #expect(try file.withBytes(of: "w", range: range) { Array($0) } == Array(data.bytes[range]))
    #expect(try file.read("w") == data)
  }

  @Test func shardedFolderWithIndexAndAuxiliaryFiles() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let source = folder.file("source")
    try FileManager.default.createDirectory(atPath: source + "/1_Pooling", withIntermediateDirectories: true)
    try "{}".write(toFile: source + "/config.json", atomically: true, encoding: .utf8)
    try "{}".write(toFile: source + "/1_Pooling/config.json", atomically: true, encoding: .utf8)
    // 4000 B each
    let tensors = (0..<6).map { ("layer.\($0).weight", randomTensorData(.f32, shape: [100, 10], seed: UInt64($0))) }
    let out = folder.file("out")
    try writeCheckpoint(tensors, to: out, options: WriteOptions(shardSize: 9000, copyFilesFrom: source))
    let names = try FileManager.default.contentsOfDirectory(atPath: out).sorted()
    #expect(
      names == [
        "1_Pooling", "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json",
      ])
    let model = try openCheckpoint(out)
    #expect(model.tensors.map(\.name) == tensors.map(\.0))
    for (name, data) in tensors { #expect(try model.read(name) == data) }
    let index =
      try JSONSerialization.jsonObject(with: Data(readBytes(out + "/model.safetensors.index.json"))) as! [String: Any]
    #expect((index["metadata"] as! [String: Any])["total_size"] as! Int == 24000)
    #expect((index["weight_map"] as! [String: String])["layer.5.weight"] == "model-00003-of-00003.safetensors")
  }

  @Test func existingOutputIsKeptUnlessOverwriteAndAbandonedWritesLeaveNothing() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let out = folder.file("model.safetensors")
    let data = randomTensorData(.f32, shape: [4], seed: 1)
    try writeCheckpoint([("a", data)], to: out)
    #expect(throws: CheckpointError.outputExists(path: out)) { try writeCheckpoint([("a", data)], to: out) }
    do {
      let writer = try CheckpointWriter(
        destination: folder.file("half"), tensors: [TensorInfo(name: "a", dtype: .f32, shape: [4])],
        options: WriteOptions(overwrite: true))
      try writer.beginTensor("a")
      try data.bytes.withUnsafeBytes { try writer.append(UnsafeRawBufferPointer(rebasing: $0[0..<8])) }
      #expect(throws: CheckpointError.self) { try writer.finish() }
    }
    #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path) == ["model.safetensors"])
  }

  @Test func folderOpensByIndexOrSingleFileAndMissingShardIsNamed() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let out = folder.file("m")
    try writeCheckpoint(
      [("a", randomTensorData(.f16, shape: [600], seed: 1)), ("b", randomTensorData(.f16, shape: [600], seed: 2))],
      to: out, options: WriteOptions(shardSize: 1000))
    try FileManager.default.removeItem(atPath: out + "/model-00002-of-00002.safetensors")
    #expect(
      throws: CheckpointError.missingShard(
        index: out + "/model.safetensors.index.json", shard: "model-00002-of-00002.safetensors")
    ) {
      try openCheckpoint(out)
    }
    #expect(throws: CheckpointError.notACheckpoint(path: folder.path)) { try openCheckpoint(folder.path) }
  }

  @Test(.enabled(if: pythonHasSafetensors())) func pythonSafetensorsLoadsOurOutput() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    // numpy has no bfloat16 or float8; those dtypes are covered by the round-trip tests above.
    let tensors = Self.allDTypes().filter { ![DType.bf16, .f8E4M3, .f8E5M2].contains($0.1.dtype) }
    let path = try writeCheckpoint(
      tensors, to: folder.file("py.safetensors"), options: WriteOptions(metadata: ["format": "np"]))
    let script =
      "from safetensors.numpy import load_file; import sys; t = load_file(sys.argv[1]); print(','.join(sorted(f'{k}:{v.dtype}:{list(v.shape)}:{v.tobytes().hex()}' for k, v in t.items())))"
    let output = try runProcess("/usr/bin/env", ["python3", "-c", script, path])
    let expected = tensors.sorted { $0.0 < $1.0 }.map { name, data in
      "\(name):\(numpyName(data.dtype)):\(data.shape):\(data.bytes.map { String(format: "%02x", $0) }.joined())"
    }.joined(separator: ",")
    #expect(output.trimmingCharacters(in: .whitespacesAndNewlines) == expected)
  }
}

func numpyName(_ dtype: DType) -> String {
  let names = [
    "F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
  ]
  return names[dtype.rawValue] ?? dtype.rawValue
}

func pythonHasSafetensors() -> Bool {
  (try? runProcess("/usr/bin/env", ["python3", "-c", "import safetensors.numpy"])) != nil
}

/// Runs a program and returns its stdout; throws when it exits non-zero.
func runProcess(_ executable: String, _ arguments: [String]) throws -> String {
  let process = Process()
  process.executableURL = URL(fileURLWithPath: executable)
  process.arguments = arguments
  let pipe = Pipe()
  process.standardOutput = pipe
  process.standardError = FileHandle.nullDevice
  try process.run()
  let data = pipe.fileHandleForReading.readDataToEndOfFile()
  process.waitUntilExit()
  guard process.terminationStatus == 0 else { throw CocoaError(.executableLoad) }
  return String(decoding: data, as: UTF8.self)
}
