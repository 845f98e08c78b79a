import Foundation
import Testing

@testable import Checkpoint
@testable import TestSupport

/// One hand-made bad file per rule of the format, each with the error it must produce.
@Suite struct SafetensorsBadFileTests {
  static let one = #"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#
  static let eight = [UInt8](repeating: 1, count: 8)

  struct Case: Sendable, CustomStringConvertible {
    let label: String
    let bytes: [UInt8]
    let expected: @Sendable (String) -> CheckpointError
    var description: String { label }
  }

  static let cases: [Case] = [
    Case(label: "too short", bytes: [1, 2, 3], expected: { .fileTooShort(file: $0, size: 3) }),
    Case(
      label: "header length past end", bytes: safetensorsBytes(header: one, data: eight, declaredLength: 1000),
      expected: { .headerLengthPastEnd(file: $0, headerLength: 1000, fileSize: 8 + one.utf8.count + 8) }),
    Case(
      label: "header too large", bytes: safetensorsBytes(header: one, declaredLength: 200_000_000),
      expected: { .headerTooLarge(file: $0, headerLength: 200_000_000) }),
    Case(
      label: "invalid UTF-8",
      bytes: withUnsafeBytes(of: UInt64(4).littleEndian) { Array($0) } + [0x7B, 0xFF, 0xFE, 0x7D],
      expected: { .headerNotUTF8(file: $0) }),
    Case(
      label: "invalid JSON", bytes: safetensorsBytes(header: #"{"t": "#),
      expected: { .headerNotJSON(file: $0, reason: "unexpected end at byte 6") }),
    Case(
      label: "unknown dtype",
      bytes: safetensorsBytes(header: #"{"t":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#, data: eight),
      expected: { .unknownDType(file: $0, tensor: "t", dtype: "F33") }),
    Case(
      label: "duplicate name",
      bytes: safetensorsBytes(
        header:
          #"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        data: eight), expected: { .duplicateTensor(file: $0, tensor: "t") }),
    Case(
      label: "shape/byte-size mismatch",
      bytes: safetensorsBytes(header: #"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, data: eight),
      expected: { .byteSizeMismatch(file: $0, tensor: "t", expected: 12, actual: 8) }),
    Case(
      label: "overlapping offsets",
      bytes: safetensorsBytes(
        header:
          #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        data: eight + [0, 0, 0, 0]), expected: { .overlappingTensors(file: $0, tensor: "b", previous: "a") }),
    Case(
      label: "gap between tensors",
      bytes: safetensorsBytes(
        header:
          #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
        data: eight + [0, 0, 0, 0]), expected: { .gapBeforeTensor(file: $0, tensor: "b", gap: 4) }),
    Case(
      label: "trailing bytes", bytes: safetensorsBytes(header: one, data: eight + [9, 9]),
      expected: { .trailingBytes(file: $0, count: 2) }),
    Case(
      label: "offsets past end", bytes: safetensorsBytes(header: one, data: [1, 2, 3, 4]),
      expected: { .tensorPastEnd(file: $0, tensor: "t", end: 8, dataSize: 4) }),
    Case(
      label: "negative shape",
      bytes: safetensorsBytes(header: #"{"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, data: eight),
      expected: { .invalidShape(file: $0, tensor: "t", shape: "[-2]") }),
    Case(
      label: "shape product overflows",
      bytes: safetensorsBytes(
        header: #"{"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, data: eight),
      expected: { .sizeOverflow(file: $0, tensor: "t") }),
    Case(
      label: "dimension overflows Int",
      bytes: safetensorsBytes(
        header: #"{"t":{"dtype":"F32","shape":[99999999999999999999999],"data_offsets":[0,8]}}"#, data: eight),
      expected: { .sizeOverflow(file: $0, tensor: "t") }),
    Case(
      label: "metadata not string",
      bytes: safetensorsBytes(
        header: #"{"__metadata__":{"k":1},"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, data: eight),
      expected: { .metadataNotStrings(file: $0, key: "k") }),
    Case(
      label: "missing offsets", bytes: safetensorsBytes(header: #"{"t":{"dtype":"F32","shape":[2]}}"#, data: eight),
      expected: { .invalidEntry(file: $0, tensor: "t", reason: "'data_offsets' must be an array of two integers") }),
  ]

  @Test(arguments: cases) func badFileGivesItsOwnError(_ item: Case) throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let path = folder.file("bad.safetensors")
    writeBytes(item.bytes, to: path)
    do {
      _ = try SafetensorsFile(path: path)
      Issue.record("\(item.label): opened without error")
    } catch let error as CheckpointError {
      #expect(error == item.expected(path), "\(item.label)")
      #expect(error.description.contains(path), "\(item.label): message names the file")
    }
  }

  @Test func theValidReferenceFileOpens() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let path = folder.file("good.safetensors")
    writeBytes(safetensorsBytes(header: Self.one, data: Self.eight), to: path)
    let file = try SafetensorsFile(path: path)
    #expect(try file.read("t").bytes == Self.eight)
  }
}
