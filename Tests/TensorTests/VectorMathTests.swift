import Foundation
import Testing

@testable import Tensor

/// `VectorMath.exp` and `log` against the C library's (correctly rounded to about half an ulp),
/// lane by lane: within one ulp of the result on sweeps over their whole domains, exact where
/// the result is 0, 1, an infinity or NaN.
@Suite struct VectorMathTests {
  /// The distance from `x` to `reference` in units of the reference's last place (the spacing
  /// of doubles at the reference, subnormal spacing included).
  private func ulps(_ x: Double, from reference: Double) -> Double {
    guard reference.isFinite else { return x == reference ? 0 : .infinity }
    return abs(x - reference) / reference.ulp
  }

  /// Applies `f` to `inputs` eight at a time (the last lanes padded with the first input).
  private func lanewise(_ inputs: [Double], _ f: (SIMD8<Double>) -> SIMD8<Double>) -> [Double] {
    stride(from: 0, to: inputs.count, by: 8).flatMap { start -> [Double] in
      var v = SIMD8<Double>(repeating: inputs[0])
      let end = min(inputs.count, start + 8)
      for j in start..<end { v[j - start] = inputs[j] }
      let y = f(v)
      return (0..<(end - start)).map { y[$0] }
    }
  }

  private let rng = CounterRNG(seed: 11, stream: "vector-math")
  private func uniform(_ i: Int) -> Double { Double(rng.bits(UInt64(i)) >> 11) * 0x1p-53 }

  @Test func expIsWithinAnUlpOverItsRange() {
    // Uniform over the whole finite range (results from subnormal to near the largest double),
    // dense near 0, and the integers and half-integers times ln 2 (where the reduction's n
    // changes).
    var inputs = (0..<200_000).map { -745 + 1454.7 * uniform($0) }
    inputs += (0..<50_000).map { (uniform(1_000_000 + $0) - 0.5) * 2 }
    inputs += (0..<50_000).map { (uniform(2_000_000 + $0) - 0.5) * 1e-6 }
    inputs += (-1074...1023).flatMap { k in [Double(k) * M_LN2, (Double(k) + 0.5) * M_LN2] }.filter { $0 < 709.78 }
    let results = lanewise(inputs, VectorMath.exp)
    let worst = zip(inputs, results).map { ulps($1, from: Foundation.exp($0)) }.max() ?? 0
    #expect(worst <= 1, "largest error \(worst) ulp")
  }

  @Test func expSpecialValues() {
    let inputs: [Double] = [0, -0.0, 1, -1, 709.78, 709.79, 710, 1e300, .infinity, -745.1, -746, -1e300, -.infinity]
    let expected: [Double] = [
      1, 1, M_E, 1 / M_E, Foundation.exp(709.78), .infinity, .infinity, .infinity, .infinity,
      Foundation.exp(-745.1), 0, 0, 0,
    ]
    let results = lanewise(inputs, VectorMath.exp)
    for (x, (y, e)) in zip(inputs, zip(results, expected)) {
      #expect(ulps(y, from: e) <= 1, "exp(\(x)) = \(y), expected \(e)")
    }
    #expect(lanewise([.nan], VectorMath.exp)[0].isNaN)
    #expect(
      lanewise([0, -0.0, -.infinity, .infinity, 710, -746], VectorMath.exp) == [1, 1, 0, .infinity, .infinity, 0])
  }

  @Test func logIsWithinAnUlpOverItsRange() {
    // Random bit patterns over every positive finite double (subnormals included), values near
    // 1 (where the result is small and relative error matters most), and the powers of two.
    var inputs = (0..<200_000).map { i -> Double in
      Double(bitPattern: rng.bits(UInt64(3_000_000 + i)) % Double.greatestFiniteMagnitude.bitPattern + 1)
    }
    inputs += (0..<50_000).map { 1 + (uniform(4_000_000 + $0) - 0.5) * 1e-3 }
    inputs += (0..<50_000).map { 0.5 + 1.5 * uniform(5_000_000 + $0) }
    inputs += (-1074...1023).map { Foundation.pow(2, Double($0)) }
    let results = lanewise(inputs, VectorMath.log)
    let worst = zip(inputs, results).map { ulps($1, from: Foundation.log($0)) }.max() ?? 0
    #expect(worst <= 1, "largest error \(worst) ulp")
  }

  @Test func logSpecialValues() {
    let results = lanewise([0, -0.0, 1, .infinity, .leastNonzeroMagnitude, .greatestFiniteMagnitude], VectorMath.log)
    #expect(results[0] == -.infinity && results[1] == -.infinity)
    #expect(results[2] == 0)
    #expect(results[3] == .infinity)
    #expect(ulps(results[4], from: Foundation.log(Double.leastNonzeroMagnitude)) <= 1)
    #expect(ulps(results[5], from: Foundation.log(Double.greatestFiniteMagnitude)) <= 1)
    #expect(lanewise([-1, -.infinity, .nan, -.leastNonzeroMagnitude], VectorMath.log).allSatisfy { $0.isNaN })
  }

  /// The lanes are added halves first: lane i with lane i + 4, then i with i + 2, then the two.
  @Test func sumAddsTheLanesInItsFixedOrder() {
    let x = SIMD8<Double>(1e16, 1, -1e16, 1, 3, 0.5, 7, 0.25)
    let expected = ((1e16 + 3) + (-1e16 + 7)) + ((1 + 0.5) + (1 + 0.25))
    #expect(VectorMath.sum(x) == expected)
    #expect(VectorMath.sum(x) != x.indices.reduce(0) { $0 + x[$1] })
  }
}
