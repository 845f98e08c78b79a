import Foundation
import Testing

@testable import Tensor

/// `FloatMath.exp` against `exp` in `Double` rounded to `Float` (the correctly rounded result,
/// but for rare double roundings), lane by lane: within one ulp over its whole range (99% of
/// the results correctly rounded), exact where the result is 0, 1, an infinity or NaN;
/// `exponentiate` gives the same lanes on buffers of every length (the padded tail included).
@Suite struct FloatMathTests {
  /// The distance from `x` to `reference` in units of the reference's last place (subnormal
  /// spacing included).
  private func ulps(_ x: Float, from reference: Float) -> Double {
    guard reference.isFinite else { return x == reference ? 0 : .infinity }
    return abs(Double(x) - Double(reference)) / Double(reference.ulp)
  }

  private func reference(_ x: Float) -> Float { Float(Foundation.exp(Double(x))) }

  /// `FloatMath.exp` of `inputs`, sixteen at a time (the last lanes padded with the first input).
  private func lanewise(_ inputs: [Float]) -> [Float] {
    stride(from: 0, to: inputs.count, by: 16).flatMap { start -> [Float] in
      var v = SIMD16<Float>(repeating: inputs[0])
      let end = min(inputs.count, start + 16)
      for j in start..<end { v[j - start] = inputs[j] }
      let y = FloatMath.exp(v)
      return (0..<(end - start)).map { y[$0] }
    }
  }

  @Test func expIsWithinAnUlpOverItsRange() {
    // Every 1021st float from -104 (results deep in the subnormals) to 88.72 (near the largest
    // float), both signs, and the integers and half-integers times ln 2 (where the reduction's
    // n changes).
    var inputs = stride(from: UInt32(0), to: Float(88.72).bitPattern, by: 1021).map { Float(bitPattern: $0) }
    inputs += stride(from: UInt32(0), to: Float(104).bitPattern, by: 1021).map { -Float(bitPattern: $0) }
    for k in -150...127 {
      let multiples = [Double(k) * M_LN2, (Double(k) + 0.5) * M_LN2].map { Float($0) }
      inputs += multiples.filter { $0 < 88.72 }
    }
    let results = lanewise(inputs)
    let errors = zip(inputs, results).map { ulps($1, from: reference($0)) }
    let worst = errors.max() ?? 0
    #expect(worst <= 1, "largest error \(worst) ulp")
    // Most results are the correctly rounded ones.
    let exact = errors.filter { $0 == 0 }.count
    #expect(Double(exact) > 0.98 * Double(inputs.count), "\(exact) of \(inputs.count) exact")
  }

  @Test func expSpecialValues() {
    let inputs: [Float] = [0, -0.0, 1, -1, 88.72, 88.73, 89, 1e30, .infinity, -103.9, -104, -110, -1e30, -.infinity]
    let results = lanewise(inputs)
    for (x, y) in zip(inputs, results) {
      #expect(ulps(y, from: reference(x)) <= 2, "exp(\(x)) = \(y), expected \(reference(x))")
    }
    #expect(lanewise([0, -0.0, 88.73, .infinity, -110, -.infinity]) == [1, 1, .infinity, .infinity, 0, 0])
    #expect(lanewise([.nan, 1])[0].isNaN)
  }

  @Test func exponentiateMatchesTheLanesAtEveryLength() {
    let rng = CounterRNG(seed: 5, stream: "float-math")
    for count in 0..<40 {
      let values = (0..<count).map { Float(Double(rng.bits(UInt64(count * 64 + $0)) >> 11) * 0x1p-53 * 40 - 20) }
      var exponentiated = values
      exponentiated.withUnsafeMutableBufferPointer { FloatMath.exponentiate($0) }
      #expect(exponentiated == (values.isEmpty ? [] : lanewise(values)), "length \(count)")
    }
  }
}
