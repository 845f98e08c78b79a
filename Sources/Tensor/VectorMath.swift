/// `exp` and `log` of eight doubles at a time, for loops that call them per element (Arcee
/// fusion's softmaxes and KL divergences), where the C library's scalar functions cost five
/// times as much as these. Both are within one ulp of the correctly rounded result (the C
/// library's are within about half an ulp), the same bits on every machine: plain products and
/// sums in a fixed order, never fused, and no table. Built from exact identities and Taylor
/// coefficients (`1/k!`, `2/(2k+1)`), no fitted constants.
enum VectorMath {
  typealias Doubles = SIMD8<Double>
  typealias Words = SIMD8<UInt64>
  typealias Integers = SIMD8<Int64>

  // The constants are literals in each function, so that they fold into it wherever it is
  // inlined. `roundingShift` = 2^52 + 2^51: adding it to a double of magnitude below 2^51 rounds
  // it to an integer, which then sits in the low bits of the sum's bit pattern. ln 2 is split
  // in two, the high part with its last 21 bits zero so that `n * ln2High` is exact.

  /// `e^x` lane by lane. `x = n ln 2 + r` with `n` the nearest integer to `x / ln 2` and
  /// `|r| <= ln 2 / 2`; `e^r = 1 + (r + r^2 (1/2! + r/3! + ... + r^11/13!))`, whose truncation
  /// error is below 2^-60; `2^n` applied as two powers of two so that results in the subnormal
  /// range are rounded once. Below -746 the result is 0, above 710 infinity, NaN stays NaN.
  @_transparent
  static func exp(_ x: Doubles) -> Doubles {
    let (roundingShift, log2e): (Double, Double) = (0x1.8p52, 0x1.71547652b82fep0)
    let (ln2High, ln2Low): (Double, Double) = (0x1.62e42fee00000p-1, 0x1.a39ef35793c76p-33)
    var x = x
    x.replace(with: -746, where: x .< -746)
    x.replace(with: 710, where: x .> 710)
    let shifted = x * log2e + roundingShift
    let n = shifted - roundingShift
    let r = (x - n * ln2High) - n * ln2Low
    // 1/2! + r/3! + ... + r^11/13! in Estrin's scheme (pairs, then pairs of pairs), which
    // keeps the chain of dependent operations short.
    let r2 = r * r
    let r4 = r2 * r2
    let a0 = (1.0 / 6) * r + 0.5
    let a1 = (1.0 / 120) * r + 1.0 / 24
    let a2 = (1.0 / 5_040) * r + 1.0 / 720
    let a3 = (1.0 / 362_880) * r + 1.0 / 40_320
    let a4 = (1.0 / 39_916_800) * r + 1.0 / 3_628_800
    let a5 = (1.0 / 6_227_020_800) * r + 1.0 / 479_001_600
    let tail = (a0 + a1 * r2) + r4 * ((a2 + a3 * r2) + r4 * (a4 + a5 * r2))
    let expR = 1 + (r + r * r * tail)
    // n from the low 52 bits of the shifted sum's pattern (sign-extended), in two halves.
    let whole = Integers(truncatingIfNeeded: unsafeBitCast(shifted, to: Words.self) &<< 12) &>> 12
    let half = whole &>> 1
    let first = unsafeBitCast((half &+ 1023) &<< 52, to: Doubles.self)
    let second = unsafeBitCast((whole &- half &+ 1023) &<< 52, to: Doubles.self)
    return expR * first * second
  }

  /// The natural logarithm lane by lane. `x = 2^k m` with `m` in `[sqrt(2)/2, sqrt(2))`,
  /// `f = m - 1` (exact), `s = f / (2 + f)`: `log m = 2 atanh s = f - (f^2/2 - s (f^2/2 + R))`
  /// with `R = 2s^2/3 + 2s^4/5 + ... + 2s^20/21` (truncation below 2^-60 of the result, as
  /// `s^2 <= 0.0295`), then `k ln 2` added in two parts. Subnormal inputs are scaled by 2^54
  /// first; 0 gives -infinity, negative numbers and NaN give NaN, infinity gives infinity.
  @_transparent
  static func log(_ x: Doubles) -> Doubles {
    let roundingShift: Double = 0x1.8p52
    let (ln2High, ln2Low): (Double, Double) = (0x1.62e42fee00000p-1, 0x1.a39ef35793c76p-33)
    let subnormal = x .< 0x1p-1022
    let scaled = x.replacing(with: x * 0x1p54, where: subnormal)
    let pattern = Integers(truncatingIfNeeded: unsafeBitCast(scaled, to: Words.self))
    // Subtracting the pattern of sqrt(2)/2 makes the exponent field count from it.
    var k = (pattern &- 0x3FE6_A09E_667F_3BCD) &>> 52
    let m = unsafeBitCast(pattern &- (k &<< 52), to: Doubles.self)
    k.replace(with: k &- 54, where: subnormal)
    // k as a double, through the same shift as `exp`'s rounding (|k| < 2^51).
    let kd =
      unsafeBitCast(k &+ Integers(repeating: Int64(bitPattern: roundingShift.bitPattern)), to: Doubles.self)
      - roundingShift
    let f = m - 1
    let s = f / (2 + f)
    let z = s * s
    // R = z (2/3 + 2z/5 + ... + 2z^9/21) in Estrin's scheme, as in `exp`.
    let z2 = z * z
    let z4 = z2 * z2
    let b0 = (2.0 / 5) * z + 2.0 / 3
    let b1 = (2.0 / 9) * z + 2.0 / 7
    let b2 = (2.0 / 13) * z + 2.0 / 11
    let b3 = (2.0 / 17) * z + 2.0 / 15
    let b4 = (2.0 / 21) * z + 2.0 / 19
    let series = z * ((b0 + b1 * z2) + z4 * ((b2 + b3 * z2) + z4 * b4))
    let halfSquare = 0.5 * f * f
    var y = kd * ln2High - ((halfSquare - (s * (halfSquare + series) + kd * ln2Low)) - f)
    y.replace(with: -Double.infinity, where: x .== 0)
    y.replace(with: Double.infinity, where: x .== Double.infinity)
    y.replace(with: Double.nan, where: (x .< 0) .| (x .!= x))
    return y
  }

  /// The lanes' sum in a fixed order (halves first), the same on every machine.
  @inline(__always)
  static func sum(_ x: Doubles) -> Double {
    let four = x.lowHalf + x.highHalf
    let two = four.lowHalf + four.highHalf
    return two[0] + two[1]
  }
}
