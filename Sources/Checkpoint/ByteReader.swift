/// Reads little-endian integers from a byte buffer with bounds checks: the one place where binary
/// headers, footers and index records are parsed. A read past the end returns nil.
struct ByteReader {
  let bytes: UnsafeRawBufferPointer
  var position: Int

  init(_ bytes: UnsafeRawBufferPointer, at position: Int = 0) {
    self.bytes = bytes
    self.position = position
  }

  mutating func read<T: FixedWidthInteger>(_: T.Type) -> T? {
    let size = MemoryLayout<T>.size
    guard position >= 0, position <= bytes.count - size else { return nil }
    defer { position += size }
    return T(littleEndian: bytes.loadUnaligned(fromByteOffset: position, as: T.self))
  }

  /// A `u64` that must fit in `Int` (sizes and offsets); nil when it does not.
  mutating func readSize() -> Int? {
    guard let v = read(UInt64.self) else { return nil }
    return Int(exactly: v)
  }

  mutating func readBytes(_ count: Int) -> [UInt8]? {
    guard count >= 0, position >= 0, position <= bytes.count - count else { return nil }
    defer { position += count }
    return Array(bytes[position..<(position + count)])
  }
}
