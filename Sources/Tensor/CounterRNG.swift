import Foundation

/// A counter-based random generator: draw `i` of a stream is a pure function of (seed, stream
/// key, i), so results do not depend on thread count, chunking or call order.
///
/// The stream key is the XXH64 of a name (for example a tensor name and a model index), mixed with
/// the seed; draw `i` is SplitMix64's finaliser applied to `key + (i + 1) * golden gamma`.
public struct CounterRNG: Sendable {
  public let key: UInt64

  /// A stream for `seed` and a stable name (for example `"model.layers.0.mlp.up_proj.weight#1"`).
  public init(seed: UInt64, stream: String) {
    key = XXHash64.hash(stream, seed: seed)
  }

  /// Raw 64 random bits for counter `index`.
  @inline(__always) public func bits(_ index: UInt64) -> UInt64 {
    var z = key &+ (index &+ 1) &* 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }

  /// 32 random bits for counter `index`, for decisions drawn per element (DARE's keep masks):
  /// two rounds of a 32-bit multiply-xorshift mix (the `lowbias32` constants) over the counter
  /// times an odd constant, the key's low word and the counter's high word entering before the
  /// first round and the key's high word before the second. Only 32-bit products, which AVX2
  /// computes eight at a time where `bits` needs 64-bit ones. A different stream from `bits`.
  @inline(__always) public func bits32(_ index: UInt64) -> UInt32 {
    @inline(__always) func mix(_ value: UInt32) -> UInt32 {
      var x = value
      x = (x ^ (x &>> 16)) &* 0x7FEB_352D
      x = (x ^ (x &>> 15)) &* 0x846C_A68B
      return x ^ (x &>> 16)
    }
    let (low, high) = (UInt32(truncatingIfNeeded: index), UInt32(truncatingIfNeeded: index &>> 32))
    let first = mix(low &* 0x9E37_79B9 ^ UInt32(truncatingIfNeeded: key) ^ (high &* 0x85EB_CA6B))
    return mix(first ^ UInt32(truncatingIfNeeded: key &>> 32))
  }

  /// The bound `bits32` is compared with for a keep probability `density`: draw `i` is kept when
  /// `bits32(i) >> 8 < density * 2^24` (24 random bits, as `uniform`), that is when
  /// `bits32(i) < ceil(density * 2^24) << 8`. Nil when every draw is kept (density above 1 - 2^-25).
  @inline(__always) public static func keepBound(density: Float) -> UInt32? {
    let threshold = (Double(density) * 0x1p24).rounded(.up)
    guard threshold < 0x1p24 else { return nil }
    return UInt32(Swift.max(0, threshold)) &<< 8
  }

  /// Uniform in [0, 1) with 24 random bits (every value exactly representable as `Float`).
  @inline(__always) public func uniform(_ index: UInt64) -> Float {
    Float(bits(index) >> 40) * 0x1p-24
  }

  /// Standard normal draw `index` (Box-Muller on two independent 32-bit halves of one draw).
  @inline(__always) public func normal(_ index: UInt64) -> Float {
    let b = bits(index)
    let u1 = (Double(b >> 32) + 0.5) * 0x1p-32
    let u2 = Double(b & 0xFFFF_FFFF) * 0x1p-32
    return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
  }

  /// A tensor of `shape` filled with normal draws times `scale`, draws 0, 1, 2, ... in row-major order.
  public func normalTensor(_ shape: [Int], scale: Float = 1) -> Tensor {
    let n = shape.reduce(1, *)
    return Tensor(shape: shape, scalars: (0..<n).map { normal(UInt64($0)) * scale })
  }
}
