import Foundation
import Testing

@testable import Checkpoint
@testable import Tensor
@testable import TestSupport

/// PyTorch zip checkpoints written by torch itself (Fixtures/pytorch, see its README), read by
/// our restricted pickle reader and compared with the same tensors written by the safetensors
/// library.
@Suite struct PyTorchFileTests {
  static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
    "Fixtures/pytorch"
  ).path

  static func fixture(_ name: String) -> String { fixtures + "/" + name }

  /// Every tensor (bf16, f16 and a view into its storage at an offset, f32 from a Parameter,
  /// a 0-dimensional f64, bool, i64) has the safetensors twin's dtype, shape and bytes.
  @Test func stateDictMatchesItsSafetensorsTwin() throws {
    let file = try openCheckpoint(Self.fixture("state.pt"))
    #expect(file is PyTorchFile)
    let twin = try openCheckpoint(Self.fixture("state.safetensors"))
    #expect(
      file.tensors.map(\.name) == ["embed.weight", "proj.weight", "half", "half_rows", "scalar", "mask", "steps"])
    for info in file.tensors {
      let reference = try twin.info(info.name)
      #expect(info.dtype == reference.dtype && info.shape == reference.shape, "\(info.name)")
      #expect(try file.read(info.name) == twin.read(info.name), "\(info.name)")
    }
    // The view's rows are rows 1 and 2 of the tensor it shares storage with.
    #expect(try file.read("half_rows").bytes == file.readRows("half", 1..<3).bytes)
    try file.verify(progress: nil)
  }

  /// A state dict under `state_dict` is found (an `epoch` beside it is skipped); shards listed
  /// by `pytorch_model.bin.index.json` open as one checkpoint, and a folder holding them does.
  @Test func nestedAndShardedStateDicts() throws {
    let nested = try openCheckpoint(Self.fixture("nested.pt"))
    #expect(nested.tensors.map(\.name) == ["embed.weight", "steps"])
    let twin = try openCheckpoint(Self.fixture("state.safetensors"))
    #expect(try nested.read("steps") == twin.read("steps"))
    let sharded = try openCheckpoint(Self.fixture("sharded"))
    #expect(sharded.tensors.count == 7)
    #expect(sharded.files.map(\.name) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    for info in sharded.tensors { #expect(try sharded.read(info.name) == twin.read(info.name), "\(info.name)") }
  }

  /// What a state dict never holds is refused by name, and nothing is run: another global, a
  /// strided view, the legacy format, a damaged storage (its CRC-32), a truncated archive.
  @Test func whatAStateDictNeverHoldsIsRefused() throws {
    func message(_ path: String) -> String {
      do {
        _ = try openCheckpoint(path)
        return "opened"
      } catch { return "\(error)" }
    }
    #expect(message(Self.fixture("other-global.pt")).contains("collections.Counter"))
    #expect(message(Self.fixture("strided.pt")).contains("strided view"))
    #expect(message(Self.fixture("legacy.pt")).contains("legacy PyTorch pickle"))
    let folder = TemporaryFolder()
    defer { folder.remove() }
    var bytes = readBytes(Self.fixture("state.pt"))
    let truncated = folder.file("truncated.pt")
    writeBytes(Array(bytes.prefix(bytes.count - 30)), to: truncated)
    #expect(message(truncated).contains("end of central directory"), "\(message(truncated))")
    // Flip a byte of the first storage's data: the file opens, and verify names the entry.
    let start = try #require(try PyTorchFile(path: Self.fixture("state.pt")).byteRange(of: "embed.weight")).lowerBound
    bytes[start] ^= 0xFF
    let damaged = folder.file("damaged.pt")
    writeBytes(bytes, to: damaged)
    let opened = try openCheckpoint(damaged)
    #expect(throws: CheckpointError.self) { try opened.verify(progress: nil) }
  }
}
