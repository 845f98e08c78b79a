/// The byte transform applied to each chunk before zstd, and undone after.
///
/// Elements are split into byte planes (all lowest bytes, then all next bytes, ...), so that
/// bytes with similar statistics sit together and zstd's entropy coder sees each plane apart.
/// For floating-point types each element is first rotated left by one bit, which moves the sign
/// to the bottom and puts the exponent alone in the top byte of BF16 and F32 (ZipNN's key
/// observation: the exponent byte has ~2.6 bits of entropy, the mantissa bytes ~8).
/// For delta storage an element becomes the zigzag-encoded wrapping difference of its bit
/// pattern from the base element's, so small moves become small unsigned numbers.
enum ByteTransform: String, Sendable {
  /// Byte planes only (integer types).
  case planes
  /// Rotate left by one bit, then byte planes (floating-point types).
  case floatPlanes = "float-planes"
  /// Zigzag of the bit difference from a base tensor, then byte planes.
  case delta

  static func forDType(_ elementSize: Int, isFloatingPoint: Bool) -> ByteTransform {
    isFloatingPoint && elementSize > 1 ? .floatPlanes : .planes
  }

  /// Transforms `source` (whole elements of `elementSize` bytes) into `destination`; `base` is
  /// the base tensor's bytes at the same offsets, required for `.delta`.
  func encode(_ source: UnsafeRawBufferPointer, base: UnsafeRawBufferPointer?, elementSize: Int, into destination: UnsafeMutableRawBufferPointer) {
    switch elementSize {
    case 2: Self.encode(UInt16.self, self, source, base, destination)
    case 4: Self.encode(UInt32.self, self, source, base, destination)
    case 8: Self.encode(UInt64.self, self, source, base, destination)
    default: Self.encode(UInt8.self, self, source, base, destination)
    }
  }

  /// Inverse of `encode`.
  func decode(_ payload: UnsafeRawBufferPointer, base: UnsafeRawBufferPointer?, elementSize: Int, into destination: UnsafeMutableRawBufferPointer) {
    switch elementSize {
    case 2: Self.decode(UInt16.self, self, payload, base, destination)
    case 4: Self.decode(UInt32.self, self, payload, base, destination)
    case 8: Self.decode(UInt64.self, self, payload, base, destination)
    default: Self.decode(UInt8.self, self, payload, base, destination)
    }
  }

  @inline(__always) private static func forward<T: FixedWidthInteger & UnsignedInteger>(_ x: T, _ b: T, _ mode: ByteTransform) -> T {
    switch mode {
    case .planes: return x
    case .floatPlanes: return (x << 1) | (x >> (T.bitWidth - 1))
    case .delta:
      let d = x &- b
      let negative: T = (d >> (T.bitWidth - 1)) != 0 ? ~0 : 0
      return (d << 1) ^ negative
    }
  }

  @inline(__always) private static func inverse<T: FixedWidthInteger & UnsignedInteger>(_ y: T, _ b: T, _ mode: ByteTransform) -> T {
    switch mode {
    case .planes: return y
    case .floatPlanes: return (y >> 1) | (y << (T.bitWidth - 1))
    case .delta:
      let d = (y >> 1) ^ (0 &- (y & 1))
      return d &+ b
    }
  }

  @inline(__always) private static func encode<T: FixedWidthInteger & UnsignedInteger>(
    _: T.Type, _ mode: ByteTransform, _ source: UnsafeRawBufferPointer, _ base: UnsafeRawBufferPointer?, _ destination: UnsafeMutableRawBufferPointer
  ) {
    let size = MemoryLayout<T>.size
    let n = source.count / size
    guard n > 0, let s = source.baseAddress, let o = destination.baseAddress else { return }
    let b = base?.baseAddress
    precondition(mode != .delta || (base?.count ?? 0) >= n * size, "delta transform needs base bytes")
    for i in 0..<n {
      let x = s.loadUnaligned(fromByteOffset: i * size, as: T.self)
      let y = forward(x, b?.loadUnaligned(fromByteOffset: i * size, as: T.self) ?? 0, mode)
      for k in 0..<size { o.storeBytes(of: UInt8(truncatingIfNeeded: y >> (8 * k)), toByteOffset: k * n + i, as: UInt8.self) }
    }
  }

  @inline(__always) private static func decode<T: FixedWidthInteger & UnsignedInteger>(
    _: T.Type, _ mode: ByteTransform, _ payload: UnsafeRawBufferPointer, _ base: UnsafeRawBufferPointer?, _ destination: UnsafeMutableRawBufferPointer
  ) {
    let size = MemoryLayout<T>.size
    let n = payload.count / size
    guard n > 0, let p = payload.baseAddress, let o = destination.baseAddress else { return }
    let b = base?.baseAddress
    precondition(mode != .delta || (base?.count ?? 0) >= n * size, "delta transform needs base bytes")
    for i in 0..<n {
      var y: T = 0
      for k in 0..<size { y |= T(p.load(fromByteOffset: k * n + i, as: UInt8.self)) << (8 * k) }
      let x = inverse(y, b?.loadUnaligned(fromByteOffset: i * size, as: T.self) ?? 0, mode)
      o.storeBytes(of: x, toByteOffset: i * size, as: T.self)
    }
  }
}
