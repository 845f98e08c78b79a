import Foundation
import Testing

@testable import Nets
@testable import Tensor

/// The layers that run a block of rows at a time (SiLU, RMSNorm, rotary, the attention softmax,
/// element-wise sums and products) on matrices of several blocks: in float64 the same bits as
/// the plain per-element definition, and in float32 within rounding of float64.
@Suite struct BlockedLayerTests {
  // 520 x 128: three blocks of `Elementwise.blockSize` elements (256 rows), the last partial.
  let rows = 520
  let columns = 128
  let heads = 4

  private func floats(_ m: Matrix<Double>) -> Matrix<Float> {
    Matrix(rows: m.rows, columns: m.columns, values: m.values.map { Float($0) })
  }

  /// The first index where `a` and `b` differ (nil when equal), short in a failure's message.
  private func firstDifference(_ a: [Double], _ b: [Double]) -> Int? {
    a.count == b.count ? a.indices.first { a[$0] != b[$0] } : min(a.count, b.count)
  }

  /// The largest difference between a float32 result and the float64 one.
  private func gap(_ a: Matrix<Float>, _ b: Matrix<Double>) -> Double {
    zip(a.values, b.values).map { abs(Double($0) - $1) }.max() ?? .infinity
  }

  @Test func siluAndRMSNormAreTheirDefinitions() {
    let x = randomMatrix(rows, columns, "blocked-x", scale: 3)
    let gain = randomMatrix(1, columns, "blocked-gain")
    let tape = Tape<Double>()
    let silu = tape.value(tape.silu(tape.constant(x)))
    #expect(firstDifference(silu.values, x.values.map { $0 / (1 + Foundation.exp(-$0)) }) == nil)
    let normalized = tape.value(tape.rmsNorm(tape.constant(x), weight: tape.constant(gain), epsilon: 1e-5))
    var expected = [Double]()
    for r in 0..<rows {
      var squares = 0.0
      for c in 0..<columns { squares += x[r, c] * x[r, c] }
      let inverse = 1 / (squares / Double(columns) + 1e-5).squareRoot()
      expected += (0..<columns).map { x[r, $0] * inverse * gain.values[$0] }
    }
    #expect(firstDifference(normalized.values, expected) == nil)
    let product = tape.value(tape.multiply(tape.constant(x), tape.constant(silu)))
    #expect(firstDifference(product.values, zip(x.values, silu.values).map { $0 * $1 }) == nil)
    let sum = tape.value(tape.add(tape.constant(x), tape.constant(silu)))
    #expect(firstDifference(sum.values, zip(x.values, silu.values).map { $0 + $1 }) == nil)

    let single = Tape<Float>()
    #expect(gap(single.value(single.silu(single.constant(floats(x)))), silu) < 1e-5)
    let normalizedSingle = single.value(
      single.rmsNorm(single.constant(floats(x)), weight: single.constant(floats(gain)), epsilon: 1e-5))
    #expect(gap(normalizedSingle, normalized) < 1e-5)
  }

  @Test func rotaryIsItsDefinition() {
    let x = randomMatrix(rows, columns, "blocked-rotary")
    let positions = (0..<rows).map { $0 % 97 }
    let (d, half) = (columns / heads, columns / heads / 2)
    let frequencies = (0..<half).map { 1 / Foundation.pow(10_000, Double(2 * $0) / Double(d)) }
    let tape = Tape<Double>()
    let rotated = tape.value(tape.rotary(tape.constant(x), positions: positions, heads: heads, theta: 10_000))
    var expected = x
    for r in 0..<rows {
      for h in 0..<heads {
        for i in 0..<half {
          let angle = Double(positions[r]) * frequencies[i]
          let (c, s) = (Foundation.cos(angle), Foundation.sin(angle))
          let (low, high) = (x[r, h * d + i], x[r, h * d + half + i])
          expected.values[r * columns + h * d + i] = low * c - high * s
          expected.values[r * columns + h * d + half + i] = high * c + low * s
        }
      }
    }
    #expect(firstDifference(rotated.values, expected.values) == nil)
    let single = Tape<Float>()
    let rotatedSingle = single.value(
      single.rotary(single.constant(floats(x)), positions: positions, heads: heads, theta: 10_000))
    #expect(gap(rotatedSingle, rotated) < 1e-5)
  }

  @Test func attentionSoftmaxInFloat32IsWithinRoundingOfFloat64() {
    // Two sequences of 130 with causal masking, a padded key and a window: rows of softmax
    // over spans of every length, exponentials in vectors and the padded tail.
    let (sequence, d) = (130, 16)
    let q = randomMatrix(2 * sequence, 2 * d, "blocked-q", scale: 2)
    let k = randomMatrix(2 * sequence, d, "blocked-k", scale: 2)
    let v = randomMatrix(2 * sequence, d, "blocked-v")
    var mask = [Bool](repeating: true, count: 2 * sequence)
    mask[3] = false
    for window in [nil, 40] as [Int?] {
      let tape = Tape<Double>()
      let reference = tape.value(
        tape.attention(
          query: tape.constant(q), key: tape.constant(k), value: tape.constant(v), sequence: sequence, heads: 2,
          kvHeads: 1, causal: true, keyMask: mask, window: window))
      let single = Tape<Float>()
      let result = single.value(
        single.attention(
          query: single.constant(floats(q)), key: single.constant(floats(k)), value: single.constant(floats(v)),
          sequence: sequence, heads: 2, kvHeads: 1, causal: true, keyMask: mask, window: window))
      #expect(gap(result, reference) < 1e-5, "window \(String(describing: window))")
    }
  }
}
