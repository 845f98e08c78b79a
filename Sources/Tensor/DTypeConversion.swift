/// Conversions between stored element types and `Float`/`Double`.
///
/// Every narrowing rounds to nearest even; NaN stays NaN with its high payload bits (the quiet bit
/// is set only when the kept payload would otherwise be zero, so it cannot turn into infinity);
/// infinities and subnormals are kept where the target can represent them. The F32/F16/BF16 paths
/// are branch-free loops over whole buffers, which the compiler vectorises. Byte buffers may be
/// unaligned (safetensors offsets are arbitrary), so loads and stores are unaligned.
public enum DTypeConversion {
  /// Elements converted per step when going through a temporary `Float` or `Double` block.
  static let blockSize = 4096

  // MARK: Scalar bit-level conversions

  /// BF16 bits to F32 bits: exact (a BF16 is the high half of an F32).
  @inlinable @inline(__always) public static func bf16ToF32Bits(_ h: UInt16) -> UInt32 { UInt32(h) << 16 }

  /// F32 bits to BF16 bits, round to nearest even; NaN keeps its high payload.
  @inlinable @inline(__always) public static func f32ToBF16Bits(_ b: UInt32) -> UInt16 {
    let rounded = (b &+ 0x7FFF &+ ((b >> 16) & 1)) >> 16
    let high = b >> 16
    let nan = high | ((high & 0x7F) == 0 ? 0x40 : 0)
    let isNaN = (b & 0x7FFF_FFFF) > 0x7F80_0000
    return UInt16(truncatingIfNeeded: isNaN ? nan : rounded)
  }

  /// F16 bits to F32 bits: exact, subnormals included.
  @inlinable @inline(__always) public static func f16ToF32Bits(_ h: UInt16) -> UInt32 {
    let bits = UInt32(h)
    let sign = (bits & 0x8000) << 16
    let magnitude = bits & 0x7FFF
    let normal = (magnitude << 13) &+ 0x3800_0000
    let special = normal &+ 0x3800_0000  // exponent all ones: Inf/NaN, payload kept
    let subnormal = (Float(magnitude) * 0x1p-24).bitPattern
    let result = magnitude >= 0x7C00 ? special : (magnitude < 0x0400 ? subnormal : normal)
    return result | sign
  }

  /// F32 bits to F16 bits, round to nearest even; overflow becomes infinity, NaN keeps its high payload.
  @inlinable @inline(__always) public static func f32ToF16Bits(_ b: UInt32) -> UInt16 {
    let sign = (b >> 16) & 0x8000
    let magnitude = b & 0x7FFF_FFFF
    let payload = (magnitude >> 13) & 0x3FF
    let nan = 0x7C00 | payload | (payload == 0 ? 0x200 : 0)
    let normal = ((magnitude &- 0x3800_0000) &+ 0xFFF &+ ((magnitude >> 13) & 1)) >> 13
    let subnormal = (Float(bitPattern: magnitude) + 0.5).bitPattern &- 0x3F00_0000
    var result: UInt32 = magnitude < 0x3880_0000 ? subnormal : normal
    result = magnitude >= 0x477F_F000 ? 0x7C00 : result
    result = magnitude > 0x7F80_0000 ? nan : result
    return UInt16(truncatingIfNeeded: result | sign)
  }

  /// F64 to F32 rounded to odd: a later narrowing of the result to F16/BF16 then rounds exactly
  /// as a direct F64 -> F16/BF16 conversion would (no double-rounding error).
  @inlinable @inline(__always) static func roundedToOdd(_ d: Double) -> Float {
    var f = Float(d)
    guard f.isFinite, Double(f) != d else { return f }
    if abs(Double(f)) > abs(d) { f = f > 0 ? f.nextDown : f.nextUp }
    return Float(bitPattern: f.bitPattern | 1)
  }

  // MARK: Buffers to and from Float

  /// Decodes `source` (elements of `dtype`) into `out`; `out.count` elements are read.
  public static func decode(
    _ source: UnsafeRawBufferPointer, from dtype: DType, into out: UnsafeMutableBufferPointer<Float>
  ) {
    precondition(source.count >= out.count * dtype.size)
    guard let base = source.baseAddress, let o = out.baseAddress else { return }
    let n = out.count
    switch dtype {
    case .f32:
      for i in 0..<n { o[i] = Float(bitPattern: base.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)) }
    case .bf16:
      for i in 0..<n {
        o[i] = Float(bitPattern: bf16ToF32Bits(base.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
      }
    case .f16:
      for i in 0..<n {
        o[i] = Float(bitPattern: f16ToF32Bits(base.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
      }
    case .f64:
      for i in 0..<n { o[i] = Float(Double(bitPattern: base.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))) }
    case .f8E4M3, .f8E5M2:
      let table = dtype == .f8E4M3 ? MiniFloat.e4m3Table : MiniFloat.e5m2Table
      for i in 0..<n { o[i] = table[Int(base.load(fromByteOffset: i, as: UInt8.self))] }
    case .i64: for i in 0..<n { o[i] = Float(base.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)) }
    case .i32: for i in 0..<n { o[i] = Float(base.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)) }
    case .i16: for i in 0..<n { o[i] = Float(base.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self)) }
    case .i8: for i in 0..<n { o[i] = Float(base.load(fromByteOffset: i, as: Int8.self)) }
    case .u64: for i in 0..<n { o[i] = Float(base.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)) }
    case .u32: for i in 0..<n { o[i] = Float(base.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)) }
    case .u16: for i in 0..<n { o[i] = Float(base.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
    case .u8: for i in 0..<n { o[i] = Float(base.load(fromByteOffset: i, as: UInt8.self)) }
    case .bool: for i in 0..<n { o[i] = base.load(fromByteOffset: i, as: UInt8.self) != 0 ? 1 : 0 }
    }
  }

  /// Encodes `values` as `dtype` into `destination` (which must hold `values.count` elements).
  public static func encode(
    _ values: UnsafeBufferPointer<Float>, as dtype: DType, into destination: UnsafeMutableRawBufferPointer
  ) {
    precondition(destination.count >= values.count * dtype.size)
    guard let o = destination.baseAddress, let v = values.baseAddress else { return }
    let n = values.count
    switch dtype {
    case .f32:
      for i in 0..<n { o.storeBytes(of: v[i].bitPattern, toByteOffset: 4 * i, as: UInt32.self) }
    case .bf16:
      for i in 0..<n { o.storeBytes(of: f32ToBF16Bits(v[i].bitPattern), toByteOffset: 2 * i, as: UInt16.self) }
    case .f16:
      for i in 0..<n { o.storeBytes(of: f32ToF16Bits(v[i].bitPattern), toByteOffset: 2 * i, as: UInt16.self) }
    case .f64:
      for i in 0..<n { o.storeBytes(of: Double(v[i]).bitPattern, toByteOffset: 8 * i, as: UInt64.self) }
    case .f8E4M3:
      for i in 0..<n { o.storeBytes(of: MiniFloat.e4m3.encode(v[i]), toByteOffset: i, as: UInt8.self) }
    case .f8E5M2:
      for i in 0..<n { o.storeBytes(of: MiniFloat.e5m2.encode(v[i]), toByteOffset: i, as: UInt8.self) }
    case .i64:
      for i in 0..<n { o.storeBytes(of: saturated(Double(v[i]), as: Int64.self), toByteOffset: 8 * i, as: Int64.self) }
    case .i32:
      for i in 0..<n { o.storeBytes(of: saturated(Double(v[i]), as: Int32.self), toByteOffset: 4 * i, as: Int32.self) }
    case .i16:
      for i in 0..<n { o.storeBytes(of: saturated(Double(v[i]), as: Int16.self), toByteOffset: 2 * i, as: Int16.self) }
    case .i8:
      for i in 0..<n { o.storeBytes(of: saturated(Double(v[i]), as: Int8.self), toByteOffset: i, as: Int8.self) }
    case .u64:
      for i in 0..<n {
        o.storeBytes(of: saturated(Double(v[i]), as: UInt64.self), toByteOffset: 8 * i, as: UInt64.self)
      }
    case .u32:
      for i in 0..<n {
        o.storeBytes(of: saturated(Double(v[i]), as: UInt32.self), toByteOffset: 4 * i, as: UInt32.self)
      }
    case .u16:
      for i in 0..<n {
        o.storeBytes(of: saturated(Double(v[i]), as: UInt16.self), toByteOffset: 2 * i, as: UInt16.self)
      }
    case .u8:
      for i in 0..<n { o.storeBytes(of: saturated(Double(v[i]), as: UInt8.self), toByteOffset: i, as: UInt8.self) }
    case .bool: for i in 0..<n { o.storeBytes(of: v[i] != 0 && !v[i].isNaN ? 1 : 0, toByteOffset: i, as: UInt8.self) }
    }
  }

  /// Rounds to nearest even and clamps into the integer type's range; NaN becomes 0.
  @inline(__always) static func saturated<I: FixedWidthInteger>(_ x: Double, as: I.Type) -> I {
    if x.isNaN { return 0 }
    let r = x.rounded(.toNearestOrEven)
    if r <= Double(I.min) { return I.min }
    if r >= Double(I.max) { return I.max }
    return I(r)
  }

  // MARK: Stored type to stored type

  /// Converts `count` elements from one stored dtype to another, in blocks (bounded scratch).
  /// F64 and 64-bit integers go through `Double`; F64 -> F16/BF16 rounds once, not twice.
  public static func convert(
    _ source: UnsafeRawBufferPointer, from: DType, to: DType, into destination: UnsafeMutableRawBufferPointer
  ) {
    let count = source.count / from.size
    precondition(destination.count >= count * to.size)
    if from == to {
      destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[0..<(count * from.size)]))
      return
    }
    if from == .f64 || to == .f64 || [.i64, .u64, .i32, .u32].contains(from) {
      convertThroughDouble(source, count: count, from: from, to: to, into: destination)
      return
    }
    withUnsafeTemporaryAllocation(of: Float.self, capacity: blockSize) { scratch in
      var start = 0
      while start < count {
        let n = min(blockSize, count - start)
        let block = UnsafeMutableBufferPointer(rebasing: scratch[0..<n])
        decode(UnsafeRawBufferPointer(rebasing: source[(start * from.size)...]), from: from, into: block)
        encode(
          UnsafeBufferPointer(block), as: to,
          into: UnsafeMutableRawBufferPointer(rebasing: destination[(start * to.size)...]))
        start += n
      }
    }
  }

  private static func convertThroughDouble(
    _ source: UnsafeRawBufferPointer, count: Int, from: DType, to: DType,
    into destination: UnsafeMutableRawBufferPointer
  ) {
    guard let s = source.baseAddress, let o = destination.baseAddress else { return }
    for i in 0..<count {
      let value: Double
      switch from {
      case .f64: value = Double(bitPattern: s.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
      case .i64: value = Double(s.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))
      case .u64: value = Double(s.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
      case .i32: value = Double(s.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))
      case .u32: value = Double(s.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))
      default:
        var single: Float = 0
        withUnsafeMutablePointer(to: &single) { p in
          decode(
            UnsafeRawBufferPointer(start: s + i * from.size, count: from.size), from: from,
            into: UnsafeMutableBufferPointer(start: p, count: 1))
        }
        value = Double(single)
      }
      let target = UnsafeMutableRawBufferPointer(start: o + i * to.size, count: to.size)
      switch to {
      case .f64: target.storeBytes(of: value.bitPattern, as: UInt64.self)
      case .i64: target.storeBytes(of: saturated(value, as: Int64.self), as: Int64.self)
      case .u64: target.storeBytes(of: saturated(value, as: UInt64.self), as: UInt64.self)
      case .i32: target.storeBytes(of: saturated(value, as: Int32.self), as: Int32.self)
      case .u32: target.storeBytes(of: saturated(value, as: UInt32.self), as: UInt32.self)
      default:
        var single = to == .f32 ? Float(value) : roundedToOdd(value)
        withUnsafePointer(to: &single) { p in
          encode(UnsafeBufferPointer(start: p, count: 1), as: to, into: target)
        }
      }
    }
  }
}

/// How a merge rounds its arithmetic: exactly (Float values, Double sums, one rounding when the
/// result is stored; the default), or as mergekit does with torch, where the inputs are cast
/// to the configuration's `dtype` and each operation's result is rounded to it.
public enum MergeArithmetic: Sendable, Equatable {
  case exact
  /// Every input and intermediate rounded to this dtype (bf16, f16 or f32).
  case rounded(DType)

  /// `x` rounded to the arithmetic's dtype (nearest, ties to even); `x` itself when exact.
  /// Inlinable, with the bit conversions it uses, so that the element loops of other modules
  /// inline it: as a call per element it took a third of a `--compute mergekit` merge.
  @inlinable @inline(__always) public func round(_ x: Float) -> Float {
    switch self {
    case .exact: return x
    case .rounded(let dtype):
      switch dtype {
      case .bf16: return BF16Rounding.round(x)
      case .f16: return F16Rounding.round(x)
      default: return x
      }
    }
  }

  /// A `Double` (an exact sum) rounded to the arithmetic's dtype once, without the error of
  /// rounding to Float first.
  @inlinable @inline(__always) public func round(_ x: Double) -> Float {
    switch self {
    case .rounded(.bf16), .rounded(.f16): return round(DTypeConversion.roundedToOdd(x))
    default: return Float(x)
    }
  }

  /// `values` rounded element by element: for BF16 and F16 a branch-free loop over the buffer
  /// (the dtype chosen once, not per element), which the compiler vectorises.
  public func round(_ values: [Float]) -> [Float] {
    guard case .rounded(let dtype) = self, dtype == .bf16 || dtype == .f16, !values.isEmpty else { return values }
    return [Float](unsafeUninitializedCapacity: values.count) { out, initialized in
      values.withUnsafeBufferPointer { v in
        if dtype == .bf16 {
          for i in v.indices { out[i] = BF16Rounding.round(v[i]) }
        } else {
          for i in v.indices { out[i] = F16Rounding.round(v[i]) }
        }
      }
      initialized = values.count
    }
  }

  /// Whether values are rounded at each step.
  public var isRounded: Bool { self != .exact }
}

/// One compute dtype's rounding as a type (`MergeArithmetic.withRule`), so that an element loop
/// written generically over it is compiled once per dtype, with the rounding inlined and the
/// loop vectorised, rather than choosing the dtype at every operation.
public protocol RoundingRule {
  /// `x` rounded to the dtype (nearest, ties to even), as `MergeArithmetic.round(_: Float)`.
  static func round(_ x: Float) -> Float
  /// A `Double` rounded to the dtype once, as `MergeArithmetic.round(_: Double)`.
  static func round(_ x: Double) -> Float
}

/// Rounding to BF16.
public enum BF16Rounding: RoundingRule {
  /// `DTypeConversion.f32ToBF16Bits`, its choices made with masks rather than selects, so that
  /// loops of several roundings vectorise (the selects became branches there).
  @inlinable @inline(__always) public static func round(_ x: Float) -> Float {
    let b = x.bitPattern
    let high = b &>> 16
    let rounded = (b &+ 0x7FFF &+ (high & 1)) &>> 16
    // All ones where the kept payload is 0 (high & 0x7F == 0), and where x is a NaN.
    let emptyPayload = UInt32(bitPattern: Int32(bitPattern: (high & 0x7F) &- 1) &>> 31)
    let nan = UInt32(bitPattern: Int32(bitPattern: 0x7F80_0000 &- (b & 0x7FFF_FFFF)) &>> 31)
    let quietened = high | (emptyPayload & 0x40)
    return Float(bitPattern: ((rounded & ~nan) | (quietened & nan)) &<< 16)
  }
  @inlinable @inline(__always) public static func round(_ x: Double) -> Float {
    round(DTypeConversion.roundedToOdd(x))
  }
}

/// Rounding to F16.
public enum F16Rounding: RoundingRule {
  @inlinable @inline(__always) public static func round(_ x: Float) -> Float {
    Float(bitPattern: DTypeConversion.f16ToF32Bits(DTypeConversion.f32ToF16Bits(x.bitPattern)))
  }
  @inlinable @inline(__always) public static func round(_ x: Double) -> Float {
    round(DTypeConversion.roundedToOdd(x))
  }
}

/// No rounding beyond `Float`'s own (exact arithmetic, or an F32 compute dtype).
public enum FloatRounding: RoundingRule {
  @inlinable @inline(__always) public static func round(_ x: Float) -> Float { x }
  @inlinable @inline(__always) public static func round(_ x: Double) -> Float { Float(x) }
}

/// A computation written once over a `RoundingRule` (`MergeArithmetic.withRule`).
public protocol RoundedComputation {
  associatedtype Output
  associatedtype Failure: Error = Never
  func callAsFunction<Rule: RoundingRule>(_ rule: Rule.Type) throws(Failure) -> Output
}

extension MergeArithmetic {
  /// Runs `computation` with this arithmetic's rounding rule: BF16 or F16 rounding, else none
  /// (exact, or F32), exactly as `round` rounds.
  @inlinable public func withRule<C: RoundedComputation>(_ computation: C) throws(C.Failure) -> C.Output {
    switch self {
    case .rounded(.bf16): return try computation(BF16Rounding.self)
    case .rounded(.f16): return try computation(F16Rounding.self)
    default: return try computation(FloatRounding.self)
    }
  }
}
