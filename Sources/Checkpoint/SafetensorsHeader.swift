import Tensor

/// The parsed and validated header of a safetensors file.
///
/// Layout: 8-byte little-endian header length `n`, `n` bytes of UTF-8 JSON (an object mapping
/// tensor names to `{dtype, shape, data_offsets: [begin, end]}` plus an optional `__metadata__`
/// map of strings), then the data section; offsets are relative to the data section.
struct SafetensorsHeader {
  static let maxHeaderLength: UInt64 = 100_000_000

  struct Entry {
    var info: TensorInfo
    /// Byte range inside the data section.
    var offsets: Range<Int>
  }

  var entries: [Entry]
  var metadata: [String: String]
  /// Absolute file offset of the data section.
  var dataStart: Int
  /// The header JSON exactly as stored (padding included).
  var headerBytes: [UInt8]

  /// Validates, in order: size >= 8; header length within limits and the file; UTF-8; JSON
  /// object; each entry (dtype, shape, offsets, byte size, with overflow checks); duplicates;
  /// offsets contiguous from 0 without overlap or gap; data ending exactly at the end of file.
  static func parse(_ file: UnsafeRawBufferPointer, path: String) throws -> SafetensorsHeader {
    guard file.count >= 8 else { throw CheckpointError.fileTooShort(file: path, size: file.count) }
    var reader = ByteReader(file)
    guard let headerLength = reader.read(UInt64.self) else {
      throw CheckpointError.fileTooShort(file: path, size: file.count)
    }
    guard headerLength <= maxHeaderLength else {
      throw CheckpointError.headerTooLarge(file: path, headerLength: headerLength)
    }
    guard Int(headerLength) <= file.count - 8 else {
      throw CheckpointError.headerLengthPastEnd(file: path, headerLength: headerLength, fileSize: file.count)
    }
    let headerBytes = UnsafeRawBufferPointer(rebasing: file[8..<(8 + Int(headerLength))])
    let (entries, metadata) = try parseTable(headerBytes, path: path)
    let dataStart = 8 + Int(headerLength)
    try checkLayout(entries, dataSize: file.count - dataStart, path: path)
    return SafetensorsHeader(
      entries: entries, metadata: metadata, dataStart: dataStart, headerBytes: Array(headerBytes))
  }

  /// Parses the JSON header text: UTF-8, a JSON object, each entry valid, no duplicate names.
  static func parseTable(_ headerBytes: UnsafeRawBufferPointer, path: String) throws -> ([Entry], [String: String]) {
    guard String(validating: headerBytes, as: UTF8.self) != nil else { throw CheckpointError.headerNotUTF8(file: path) }
    var entries: [Entry] = []
    var metadata: [String: String] = [:]
    do {
      try JSON.parseObject(headerBytes) { name, value in
        if name == "__metadata__" {
          metadata = try parseMetadata(value, path: path)
        } else {
          entries.append(try parseEntry(name: name, value, path: path))
        }
      }
    } catch let duplicate as JSON.DuplicateKey {
      if duplicate.depth == 0 { throw CheckpointError.duplicateTensor(file: path, tensor: duplicate.key) }
      throw CheckpointError.headerNotJSON(file: path, reason: "duplicate key '\(duplicate.key)'")
    } catch let error as JSON.ParseError {
      throw CheckpointError.headerNotJSON(file: path, reason: error.message)
    }
    return (entries, metadata)
  }

  /// Whether a header text is a valid header describing exactly `tensors` laid out contiguously
  /// in that order, with `metadata` (so it can be written again verbatim).
  static func matches(_ headerBytes: [UInt8], tensors: [TensorInfo], metadata: [String: String]) -> Bool {
    guard headerBytes.count % 8 == 0,
      let (entries, parsedMetadata) = try? headerBytes.withUnsafeBytes({ try parseTable($0, path: "") }),
      parsedMetadata == metadata, entries.count == tensors.count
    else { return false }
    let ordered = entries.sorted { $0.offsets.lowerBound < $1.offsets.lowerBound }
    var offset = 0
    for (entry, info) in zip(ordered, tensors) {
      guard entry.info == info, entry.offsets == offset..<(offset + info.byteCount) else { return false }
      offset += info.byteCount
    }
    return true
  }

  static func parseMetadata(_ value: JSON, path: String) throws -> [String: String] {
    guard let pairs = value.objectPairs else {
      throw CheckpointError.metadataNotStrings(file: path, key: "__metadata__")
    }
    var metadata: [String: String] = [:]
    for (key, item) in pairs {
      guard let text = item.stringValue else { throw CheckpointError.metadataNotStrings(file: path, key: key) }
      metadata[key] = text
    }
    return metadata
  }

  /// A non-negative integer field; digits too long for `Int` are an overflow, anything else invalid.
  static func integer(_ value: JSON, path: String, tensor: String) throws -> Int? {
    if let v = value.intValue { return v }
    if case .number(let text) = value, !text.isEmpty, text.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) {
      throw CheckpointError.sizeOverflow(file: path, tensor: tensor)
    }
    return nil
  }

  static func parseEntry(name: String, _ value: JSON, path: String) throws -> Entry {
    guard value.objectPairs != nil else {
      throw CheckpointError.invalidEntry(file: path, tensor: name, reason: "entry is not an object")
    }
    guard let dtypeName = value["dtype"]?.stringValue else {
      throw CheckpointError.invalidEntry(file: path, tensor: name, reason: "missing or non-string 'dtype'")
    }
    guard let dtype = DType(rawValue: dtypeName) else {
      throw CheckpointError.unknownDType(file: path, tensor: name, dtype: dtypeName)
    }
    guard let shapeItems = value["shape"]?.arrayValue else {
      throw CheckpointError.invalidEntry(file: path, tensor: name, reason: "missing or non-array 'shape'")
    }
    var shape: [Int] = []
    for item in shapeItems {
      guard let dimension = try integer(item, path: path, tensor: name) else {
        throw CheckpointError.invalidShape(
          file: path, tensor: name, shape: "[" + shapeItems.map(\.serialized).joined(separator: ", ") + "]")
      }
      shape.append(dimension)
    }
    guard let offsetItems = value["data_offsets"]?.arrayValue, offsetItems.count == 2 else {
      throw CheckpointError.invalidEntry(
        file: path, tensor: name, reason: "'data_offsets' must be an array of two integers")
    }
    guard let begin = try integer(offsetItems[0], path: path, tensor: name),
      let end = try integer(offsetItems[1], path: path, tensor: name)
    else {
      throw CheckpointError.invalidEntry(
        file: path, tensor: name, reason: "'data_offsets' must be non-negative integers")
    }
    guard begin <= end else {
      throw CheckpointError.invalidEntry(
        file: path, tensor: name, reason: "data_offsets [\(begin), \(end)] end before they begin")
    }
    guard let byteCount = checkedByteCount(shape: shape, dtype: dtype) else {
      throw CheckpointError.sizeOverflow(file: path, tensor: name)
    }
    guard byteCount == end - begin else {
      throw CheckpointError.byteSizeMismatch(file: path, tensor: name, expected: byteCount, actual: end - begin)
    }
    return Entry(info: TensorInfo(name: name, dtype: dtype, shape: shape), offsets: begin..<end)
  }

  /// Element count times element size, or nil when it overflows `Int`.
  static func checkedByteCount(shape: [Int], dtype: DType) -> Int? { checkedProduct(shape + [dtype.size]) }

  /// Offsets must tile the data section exactly: sorted by start they run contiguously from 0,
  /// stay inside the data, never overlap, and the last one ends at the end of the file.
  static func checkLayout(_ entries: [Entry], dataSize: Int, path: String) throws {
    let sorted = entries.sorted {
      ($0.offsets.lowerBound, $0.offsets.upperBound) < ($1.offsets.lowerBound, $1.offsets.upperBound)
    }
    var expected = 0
    var previous: String?
    for entry in sorted {
      let name = entry.info.name
      if entry.offsets.upperBound > dataSize {
        throw CheckpointError.tensorPastEnd(file: path, tensor: name, end: entry.offsets.upperBound, dataSize: dataSize)
      }
      if entry.offsets.lowerBound < expected, let previous {
        throw CheckpointError.overlappingTensors(file: path, tensor: name, previous: previous)
      }
      if entry.offsets.lowerBound > expected {
        throw CheckpointError.gapBeforeTensor(file: path, tensor: name, gap: entry.offsets.lowerBound - expected)
      }
      expected = entry.offsets.upperBound
      previous = name
    }
    if expected < dataSize { throw CheckpointError.trailingBytes(file: path, count: dataSize - expected) }
  }
}
