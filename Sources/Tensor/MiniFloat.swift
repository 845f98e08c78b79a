/// The 8-bit float formats of safetensors: `F8_E4M3` (E4M3FN: no infinities, NaN = S.1111.111,
/// largest finite 448) and `F8_E5M2` (IEEE-like: infinities and NaNs, largest finite 57344).
///
/// Decoding goes through a 256-entry table; encoding rounds to nearest even. Out-of-range values
/// become infinity (E5M2) or NaN (E4M3FN, which has no infinity), as PyTorch's casts do.
struct MiniFloat: Sendable {
  let exponentBits: Int
  let mantissaBits: Int
  let hasInfinity: Bool

  static let e4m3 = MiniFloat(exponentBits: 4, mantissaBits: 3, hasInfinity: false)
  static let e5m2 = MiniFloat(exponentBits: 5, mantissaBits: 2, hasInfinity: true)
  static let e4m3Table: [Float] = (0..<256).map { e4m3.decode(UInt8($0)) }
  static let e5m2Table: [Float] = (0..<256).map { e5m2.decode(UInt8($0)) }

  var bias: Int { (1 << (exponentBits - 1)) - 1 }
  var maxExponentField: Int { (1 << exponentBits) - 1 }
  var mantissaMask: Int { (1 << mantissaBits) - 1 }
  /// Largest finite value.
  var maxFinite: Float {
    if hasInfinity {
      return Float(sign: .plus, exponent: maxExponentField - 1 - bias, significand: 2 - 1 / Float(1 << mantissaBits))
    }
    return Float(sign: .plus, exponent: maxExponentField - bias, significand: 2 - 2 / Float(1 << mantissaBits))
  }
  var nanBits: UInt8 { hasInfinity ? UInt8((maxExponentField << mantissaBits) | (1 << (mantissaBits - 1))) : 0x7F }

  func decode(_ bits: UInt8) -> Float {
    let negative = bits & 0x80 != 0
    let exponentField = (Int(bits) >> mantissaBits) & maxExponentField
    let mantissa = Int(bits) & mantissaMask
    let magnitude: Float
    if hasInfinity && exponentField == maxExponentField {
      magnitude = mantissa == 0 ? .infinity : .nan
    } else if !hasInfinity && exponentField == maxExponentField && mantissa == mantissaMask {
      magnitude = .nan
    } else if exponentField == 0 {
      magnitude = Float(mantissa) * Float(sign: .plus, exponent: 1 - bias - mantissaBits, significand: 1)
    } else {
      magnitude = Float(
        sign: .plus, exponent: exponentField - bias, significand: 1 + Float(mantissa) / Float(1 << mantissaBits))
    }
    return negative ? -magnitude : magnitude
  }

  func encode(_ x: Float) -> UInt8 {
    let sign: UInt8 = x.sign == .minus ? 0x80 : 0
    if x.isNaN { return sign | nanBits }
    let a = abs(x)
    let overflow: UInt8 = hasInfinity ? UInt8(maxExponentField << mantissaBits) : 0x7F
    if a.isInfinite { return sign | overflow }
    if a == 0 { return sign }
    let minNormalExponent = 1 - bias
    let quantumExponent = max(Int(a.exponent), minNormalExponent) - mantissaBits
    let quantum = Float(sign: .plus, exponent: quantumExponent, significand: 1)
    let rounded = (a / quantum).rounded(.toNearestOrEven) * quantum
    if rounded > maxFinite { return sign | overflow }
    if rounded == 0 { return sign }
    let exponent = Int(rounded.exponent)
    if exponent < minNormalExponent {
      let mantissa = Int(rounded / Float(sign: .plus, exponent: minNormalExponent - mantissaBits, significand: 1))
      return sign | UInt8(mantissa)
    }
    let mantissa =
      Int(rounded / Float(sign: .plus, exponent: exponent - mantissaBits, significand: 1)) - (1 << mantissaBits)
    return sign | UInt8(((exponent + bias) << mantissaBits) | mantissa)
  }
}
