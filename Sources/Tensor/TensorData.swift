/// A tensor as stored: its dtype, shape and raw little-endian bytes, untouched.
///
/// Checkpoint I/O moves `TensorData` so that a round trip is bit-exact for every dtype (NaN
/// payloads included); `decoded()` and `Tensor.encoded(as:)` cross into `Float` maths.
public struct TensorData: Sendable, Equatable {
  public var dtype: DType
  public var shape: [Int]
  public var bytes: [UInt8]

  /// Wraps stored bytes; `bytes.count` must equal the element count times the dtype size.
  public init(dtype: DType, shape: [Int], bytes: [UInt8]) {
    precondition(bytes.count == shape.reduce(1, *) * dtype.size, "byte count does not match \(dtype) \(shape)")
    self.dtype = dtype
    self.shape = shape
    self.bytes = bytes
  }

  /// A vector of `count` elements of `dtype` whose bytes `write` fills, every one of them (the
  /// buffer is not zero-filled first): what a merge that encodes straight from stored inputs
  /// hands back.
  public init(dtype: DType, count: Int, writing write: (UnsafeMutableRawBufferPointer) -> Void) {
    let size = count * dtype.size
    let bytes = [UInt8](unsafeUninitializedCapacity: size) { buffer, initialized in
      write(UnsafeMutableRawBufferPointer(buffer))
      initialized = size
    }
    self.init(dtype: dtype, shape: [count], bytes: bytes)
  }

  /// Number of elements.
  public var count: Int { shape.reduce(1, *) }

  /// The values as `Float` (exact for F32/F16/BF16/FP8 and small integers; F64 rounds to nearest).
  public func decoded() -> Tensor {
    bytes.withUnsafeBytes { Tensor(decoding: $0, dtype: dtype, shape: shape) }
  }

  /// The values as `Double`: exact for F64 (float64 statistics) and every narrower type.
  public func doubles() -> [Double] {
    guard dtype == .f64 else { return decoded().scalars.map(Double.init) }
    return bytes.withUnsafeBytes { raw in
      (0..<count).map {
        Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * $0, as: UInt64.self)))
      }
    }
  }

  /// Wraps `Double` values as F64 data.
  public init(doubles values: [Double], shape: [Int]) {
    self.init(dtype: .f64, shape: shape, bytes: values.map { $0.bitPattern.littleEndian }.withUnsafeBytes { Array($0) })
  }

  /// The same values in another dtype (floating types round to nearest even; integer types are
  /// rounded and saturated). Converting to the same dtype returns `self` unchanged.
  public func cast(to target: DType) -> TensorData {
    if target == dtype { return self }
    var out = [UInt8](repeating: 0, count: count * target.size)
    bytes.withUnsafeBytes { source in
      out.withUnsafeMutableBytes { destination in
        DTypeConversion.convert(source, from: dtype, to: target, into: destination)
      }
    }
    return TensorData(dtype: target, shape: shape, bytes: out)
  }
}

extension Tensor {
  /// Stores the values in `dtype` (round to nearest even when narrowing).
  public func encoded(as dtype: DType) -> TensorData {
    // Not zero-filled first: `encode` writes every element of every dtype.
    let size = count * dtype.size
    let out = [UInt8](unsafeUninitializedCapacity: size) { buffer, initialized in
      scalars.withUnsafeBufferPointer { values in
        DTypeConversion.encode(values, as: dtype, into: UnsafeMutableRawBufferPointer(buffer))
      }
      initialized = size
    }
    return TensorData(dtype: dtype, shape: shape, bytes: out)
  }
}
