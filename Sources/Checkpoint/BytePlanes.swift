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
  func encode(
    _ source: UnsafeRawBufferPointer, base: UnsafeRawBufferPointer?, elementSize: Int,
    into destination: UnsafeMutableRawBufferPointer
  ) {
    switch elementSize {
    case 2: Self.encode(UInt16.self, self, source, base, destination)
    case 4: Self.encode(UInt32.self, self, source, base, destination)
    case 8: Self.encode(UInt64.self, self, source, base, destination)
    default: Self.encode(UInt8.self, self, source, base, destination)
    }
  }

  /// Inverse of `encode`.
  func decode(
    _ payload: UnsafeRawBufferPointer, base: UnsafeRawBufferPointer?, elementSize: Int,
    into destination: UnsafeMutableRawBufferPointer
  ) {
    switch elementSize {
    case 2: Self.decode(UInt16.self, self, payload, base, destination)
    case 4: Self.decode(UInt32.self, self, payload, base, destination)
    case 8: Self.decode(UInt64.self, self, payload, base, destination)
    default: Self.decode(UInt8.self, self, payload, base, destination)
    }
  }

  /// Element `x` to its stored form (before plane splitting).
  @inline(__always) private static func forward<T: FixedWidthInteger & UnsignedInteger>(
    _ x: T, _ b: T, _ mode: ByteTransform
  ) -> T {
    switch mode {
    case .planes: return x
    case .floatPlanes: return (x << 1) | (x >> (T.bitWidth - 1))
    case .delta:
      let d = x &- b
      return (d << 1) ^ (0 &- (d >> (T.bitWidth - 1)))
    }
  }

  /// Stored form back to the element.
  @inline(__always) private static func inverse<T: FixedWidthInteger & UnsignedInteger>(
    _ y: T, _ b: T, _ mode: ByteTransform
  ) -> T {
    switch mode {
    case .planes: return y
    case .floatPlanes: return (y >> 1) | (y << (T.bitWidth - 1))
    case .delta: return ((y >> 1) ^ (0 &- (y & 1))) &+ b
    }
  }

  // The loops below are written once per mode so that the mode test sits outside the loop and
  // the compiler vectorises each body (plane stores become byte shuffles).

  private static func encode<T: FixedWidthInteger & UnsignedInteger>(
    _: T.Type, _ mode: ByteTransform, _ source: UnsafeRawBufferPointer, _ base: UnsafeRawBufferPointer?,
    _ destination: UnsafeMutableRawBufferPointer
  ) {
    let size = MemoryLayout<T>.size
    let n = source.count / size
    guard n > 0, let s = source.baseAddress, let o = destination.baseAddress else { return }
    let planes = o.bindMemory(to: UInt8.self, capacity: n * size)
    switch mode {
    case .planes: split(T.self, n, planes) { s.loadUnaligned(fromByteOffset: $0 * size, as: T.self) }
    case .floatPlanes:
      split(T.self, n, planes) { forward(s.loadUnaligned(fromByteOffset: $0 * size, as: T.self), 0, .floatPlanes) }
    case .delta:
      guard let base, let b = base.baseAddress, base.count >= n * size else {
        preconditionFailure("delta transform needs base bytes")
      }
      split(T.self, n, planes) {
        forward(
          s.loadUnaligned(fromByteOffset: $0 * size, as: T.self),
          b.loadUnaligned(fromByteOffset: $0 * size, as: T.self), .delta)
      }
    }
  }

  private static func decode<T: FixedWidthInteger & UnsignedInteger>(
    _: T.Type, _ mode: ByteTransform, _ payload: UnsafeRawBufferPointer, _ base: UnsafeRawBufferPointer?,
    _ destination: UnsafeMutableRawBufferPointer
  ) {
    let size = MemoryLayout<T>.size
    let n = payload.count / size
    guard n > 0, let p = payload.baseAddress, let o = destination.baseAddress else { return }
    let planes = p.bindMemory(to: UInt8.self, capacity: n * size)
    switch mode {
    case .planes: join(T.self, n, planes) { o.storeBytes(of: $1, toByteOffset: $0 * size, as: T.self) }
    case .floatPlanes:
      join(T.self, n, planes) { o.storeBytes(of: inverse($1, 0, .floatPlanes), toByteOffset: $0 * size, as: T.self) }
    case .delta:
      guard let base, let b = base.baseAddress, base.count >= n * size else {
        preconditionFailure("delta transform needs base bytes")
      }
      join(T.self, n, planes) {
        o.storeBytes(
          of: inverse($1, b.loadUnaligned(fromByteOffset: $0 * size, as: T.self), .delta), toByteOffset: $0 * size,
          as: T.self)
      }
    }
  }

  /// Writes byte k of `value(i)` to `planes[k * n + i]`.
  @inline(__always) private static func split<T: FixedWidthInteger>(
    _: T.Type, _ n: Int, _ planes: UnsafeMutablePointer<UInt8>, _ value: (Int) -> T
  ) {
    switch MemoryLayout<T>.size {
    case 1:
      for i in 0..<n { planes[i] = UInt8(truncatingIfNeeded: value(i)) }
    case 2:
      let p1 = planes + n
      for i in 0..<n {
        let v = value(i)
        planes[i] = UInt8(truncatingIfNeeded: v)
        p1[i] = UInt8(truncatingIfNeeded: v >> 8)
      }
    case 4:
      let (p1, p2, p3) = (planes + n, planes + 2 * n, planes + 3 * n)
      for i in 0..<n {
        let v = value(i)
        planes[i] = UInt8(truncatingIfNeeded: v)
        p1[i] = UInt8(truncatingIfNeeded: v >> 8)
        p2[i] = UInt8(truncatingIfNeeded: v >> 16)
        p3[i] = UInt8(truncatingIfNeeded: v >> 24)
      }
    default:
      for i in 0..<n {
        let v = value(i)
        for k in 0..<MemoryLayout<T>.size { planes[k * n + i] = UInt8(truncatingIfNeeded: v >> (8 * k)) }
      }
    }
  }

  /// Calls `store(i, value)` with element i rebuilt from `planes[k * n + i]`.
  @inline(__always) private static func join<T: FixedWidthInteger>(
    _: T.Type, _ n: Int, _ planes: UnsafePointer<UInt8>, _ store: (Int, T) -> Void
  ) {
    switch MemoryLayout<T>.size {
    case 1:
      for i in 0..<n { store(i, T(truncatingIfNeeded: planes[i])) }
    case 2:
      let p1 = planes + n
      for i in 0..<n { store(i, T(truncatingIfNeeded: UInt16(planes[i]) | UInt16(p1[i]) << 8)) }
    case 4:
      let (p1, p2, p3) = (planes + n, planes + 2 * n, planes + 3 * n)
      for i in 0..<n {
        store(
          i, T(truncatingIfNeeded: UInt32(planes[i]) | UInt32(p1[i]) << 8 | UInt32(p2[i]) << 16 | UInt32(p3[i]) << 24))
      }
    default:
      for i in 0..<n {
        var v: T = 0
        for k in 0..<MemoryLayout<T>.size { v |= T(truncatingIfNeeded: planes[k * n + i]) << (8 * k) }
        store(i, v)
      }
    }
  }
}
