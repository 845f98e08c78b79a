import Foundation
import Tensor
import Testing

@testable import Nets

/// Random `rows x columns` matrix in Float64, reproducible by `stream`.
func randomMatrix(_ rows: Int, _ columns: Int, _ stream: String, scale: Double = 1) -> Matrix<Double> {
  let rng = CounterRNG(seed: 5, stream: stream)
  return Matrix(
    rows: rows, columns: columns, values: (0..<(rows * columns)).map { Double(rng.normal(UInt64($0))) * scale })
}

/// Checks the tape's gradients of `build` (reduced to a scalar as `sum(output * R)` for a fixed
/// random R, so every output element matters) against central finite differences in Float64.
/// Returns the largest error relative to max(1, |numeric|).
func gradientError(_ inputs: [Matrix<Double>], step: Double = 1e-6, _ build: (Tape<Double>, [Var]) -> Var) -> Double {
  func loss(_ values: [Matrix<Double>], tape: Tape<Double>) -> (Var, [Var]) {
    let vars = values.map { tape.parameter($0) }
    let out = build(tape, vars)
    let o = tape.value(out)
    let weights = tape.constant(randomMatrix(o.rows, o.columns, "projection"))
    return (tape.sum(tape.multiply(out, weights)), vars)
  }
  let tape = Tape<Double>()
  let (l, vars) = loss(inputs, tape: tape)
  tape.backward(from: l)
  var worst = 0.0
  for (k, input) in inputs.enumerated() {
    let analytic = tape.gradient(vars[k])!
    for i in input.values.indices {
      var plus = inputs
      plus[k].values[i] += step
      var minus = inputs
      minus[k].values[i] -= step
      let up = Tape<Double>()
      let down = Tape<Double>()
      let numeric =
        (up.value(loss(plus, tape: up).0).values[0] - down.value(loss(minus, tape: down).0).values[0]) / (2 * step)
      worst = max(worst, abs(analytic.values[i] - numeric) / max(1, abs(numeric)))
    }
  }
  return worst
}

@Suite struct GradientCheckTests {
  let tolerance = 1e-6

  @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
  func matmulWithEveryTransposition(_ transposes: (Bool, Bool)) {
    let a = transposes.0 ? randomMatrix(4, 3, "a") : randomMatrix(3, 4, "a")
    let b = transposes.1 ? randomMatrix(5, 4, "b") : randomMatrix(4, 5, "b")
    #expect(
      gradientError([a, b]) { t, v in t.matmul(v[0], v[1], transposeA: transposes.0, transposeB: transposes.1) }
        < tolerance)
  }

  @Test func linearWithBiasAndColumns() {
    let inputs = [randomMatrix(6, 4, "x"), randomMatrix(5, 4, "w"), randomMatrix(1, 5, "b")]
    #expect(gradientError(inputs) { t, v in t.columns(t.linear(v[0], weight: v[1], bias: v[2]), 1..<4) } < tolerance)
  }

  @Test func elementwiseOperations() {
    let inputs = [randomMatrix(3, 4, "x"), randomMatrix(3, 4, "y"), randomMatrix(1, 1, "s")]
    #expect(gradientError(inputs) { t, v in t.multiply(t.subtract(v[0], v[1]), t.scale(v[1], by: v[2])) } < tolerance)
    #expect(gradientError([inputs[0]]) { t, v in t.mean(t.scale(v[0], 3)) } < tolerance)
  }

  @Test(arguments: Activation.allCases)
  func activations(_ activation: Activation) {
    #expect(gradientError([randomMatrix(4, 5, "act", scale: 2)]) { t, v in t.activation(activation, v[0]) } < tolerance)
  }

  @Test func normalisations() {
    let x = randomMatrix(4, 6, "x", scale: 3)
    let gamma = randomMatrix(1, 6, "g")
    let beta = randomMatrix(1, 6, "b")
    #expect(
      gradientError([x, gamma, beta]) { t, v in t.layerNorm(v[0], gamma: v[1], beta: v[2], epsilon: 1e-5) } < tolerance)
    #expect(gradientError([x, gamma]) { t, v in t.rmsNorm(v[0], weight: v[1], epsilon: 1e-6) } < tolerance)
  }

  @Test func embeddingLookupWithRepeatedIds() {
    #expect(
      gradientError([randomMatrix(7, 3, "table")]) { t, v in t.embedding([2, 0, 2, 6], table: v[0]) } < tolerance)
  }

  @Test(arguments: [(4, 4, true), (4, 2, true), (4, 1, false)])
  func attentionWithCausalMaskGroupedHeadsAndPadding(_ config: (Int, Int, Bool)) {
    let (heads, kvHeads, causal) = config
    let (sequence, d) = (5, 2)
    let q = randomMatrix(2 * sequence, heads * d, "q")
    let k = randomMatrix(2 * sequence, kvHeads * d, "k")
    let v = randomMatrix(2 * sequence, kvHeads * d, "v")
    let mask = (0..<(2 * sequence)).map { $0 != 3 && $0 != 9 }
    #expect(
      gradientError([q, k, v]) { t, x in
        t.attention(
          query: x[0], key: x[1], value: x[2], sequence: sequence, heads: heads, kvHeads: kvHeads, causal: causal,
          keyMask: mask)
      } < tolerance)
  }

  /// Sliding windows, a custom score scale and Gemma 2's soft-capped scores.
  @Test(arguments: [(2, nil), (3, 1.5), (nil, 0.7)] as [(Int?, Double?)])
  func attentionWithWindowScaleAndSoftcap(_ config: (Int?, Double?)) {
    let (sequence, d) = (5, 2)
    let q = randomMatrix(2 * sequence, 2 * d, "q", scale: 2)
    let k = randomMatrix(2 * sequence, d, "k", scale: 2)
    let v = randomMatrix(2 * sequence, d, "v")
    #expect(
      gradientError([q, k, v]) { t, x in
        t.attention(
          query: x[0], key: x[1], value: x[2], sequence: sequence, heads: 2, kvHeads: 1, causal: true,
          window: config.0, scale: 0.4, softcap: config.1)
      } < tolerance)
  }

  @Test func rotaryAndPooling() {
    let x = randomMatrix(6, 8, "x")
    #expect(
      gradientError([x]) { t, v in t.rotary(v[0], positions: [0, 1, 2, 0, 1, 2], heads: 2, theta: 10_000) } < tolerance)
    #expect(
      gradientError([x]) { t, v in
        t.rotary(v[0], positions: [0, 1, 2, 0, 1, 2], heads: 2, frequencies: [0.9, 0.05], scale: 1.3)
      } < tolerance)
    #expect(
      gradientError([x]) { t, v in t.reshaped(t.tanh(t.reshaped(v[0], rows: 12, columns: 4)), rows: 6, columns: 8) }
        < tolerance)
    #expect(
      gradientError([x]) { t, v in t.meanPool(v[0], sequence: 3, mask: [true, true, false, true, false, false]) }
        < tolerance)
  }

  @Test func losses() {
    let logits = randomMatrix(5, 4, "z", scale: 2)
    let teacher = randomMatrix(5, 4, "teacher", scale: 2)
    #expect(gradientError([logits]) { t, v in t.crossEntropy(v[0], labels: [0, 3, -100, 1, 2]) } < tolerance)
    #expect(
      gradientError([logits]) { t, v in t.klDivergence(teacher: teacher, student: v[0], temperature: 2) } < tolerance)
    #expect(gradientError([logits]) { t, v in t.entropy(v[0]) } < tolerance)
    #expect(gradientError([logits, teacher]) { t, v in t.meanSquaredError(v[0], v[1]) } < tolerance)
    let targets = softmax(teacher)
    #expect(
      gradientError([logits]) { t, v in t.softCrossEntropy(v[0], targets: targets, weights: [1, 0, 0.5, 2, 1]) }
        < tolerance)
  }

  /// PELA's weight-perturbation term `max |B A - W|`: random entries have a unique largest
  /// magnitude, so the subgradient is the gradient there.
  @Test func maxAbsOfAProductOfFactors() {
    let (b, a, w) = (randomMatrix(5, 2, "B"), randomMatrix(2, 4, "A"), randomMatrix(5, 4, "W"))
    #expect(gradientError([b, a]) { t, v in t.maxAbs(t.subtract(t.matmul(v[0], v[1]), t.constant(w))) } < tolerance)
    let t = Tape<Double>()
    let x = t.parameter(Matrix(rows: 1, columns: 4, values: [0.5, -3, 2, -1]))
    let m = t.maxAbs(x)
    t.backward(from: m)
    #expect(t.value(m).values == [3])
    #expect(t.gradient(x)!.values == [0, -1, 0, 0])
  }

  /// MatryoshkaKV's parametrisation: the Cayley map, and column concatenation.
  @Test func cayleyMapAndConcatenation() {
    let x = randomMatrix(5, 5, "X", scale: 0.7)
    let u0 = randomMatrix(5, 5, "U0")
    #expect(gradientError([x]) { t, v in t.cayley(v[0]) } < tolerance)
    #expect(gradientError([x]) { t, v in t.matmul(t.constant(u0), t.cayley(v[0])) } < tolerance)
    #expect(
      gradientError([randomMatrix(3, 2, "a"), randomMatrix(3, 4, "b")]) { t, v in t.concatenateColumns(v) } < tolerance)
  }

  @Test func bestHeadScoresOfAMultiHeadModel() {
    let heads = [
      randomMatrix(4, 5, "h0", scale: 2), randomMatrix(4, 5, "h1", scale: 2), randomMatrix(4, 5, "h2", scale: 2),
    ]
    #expect(gradientError(heads) { t, v in t.bestHeadScores(v) } < tolerance)
    let t = Tape<Double>()
    let scores = t.value(t.bestHeadScores(heads.map { t.constant($0) }))
    let p = heads.map { softmax($0) }
    #expect(abs(scores[2, 3] - log(max(p[0][2, 3], p[1][2, 3], p[2][2, 3]))) < 1e-12)
  }

  /// The tails' ensemble of a partially zipped decoder: `log((1/H) sum_h softmax(z_h))`,
  /// checked against the float64 mean of the softmaxes, and its gradient.
  @Test func meanProbabilityScoresOfTails() {
    let heads = [randomMatrix(4, 5, "t0", scale: 3), randomMatrix(4, 5, "t1", scale: 3)]
    #expect(gradientError(heads) { t, v in t.meanProbabilityScores(v) } < tolerance)
    let t = Tape<Double>()
    let scores = t.value(t.meanProbabilityScores(heads.map { t.constant($0) }))
    let p = heads.map { softmax($0) }
    for r in 0..<4 {
      for c in 0..<5 { #expect(abs(scores[r, c] - log((p[0][r, c] + p[1][r, c]) / 2)) < 1e-12) }
      #expect(abs((0..<5).map { exp(scores[r, $0]) }.reduce(0, +) - 1) < 1e-12)
    }
  }

  /// A whole pre-norm decoder block with a head, every weight checked at once.
  @Test func wholeDecoderBlock() {
    let (sequence, width, heads, kvHeads, hidden, vocabulary) = (4, 8, 4, 2, 12, 6)
    let d = width / heads
    let names = ["emb", "norm1", "wq", "wk", "wv", "wo", "norm2", "gate", "up", "down", "head"]
    let shapes = [
      (vocabulary, width), (1, width), (width, width), (kvHeads * d, width), (kvHeads * d, width), (width, width),
      (1, width),
      (hidden, width), (hidden, width), (width, hidden), (vocabulary, width),
    ]
    let weights = zip(names, shapes).map { randomMatrix($1.0, $1.1, $0, scale: 0.5) }
    let ids = [1, 4, 2, 5, 0, 3, 3, 1]
    #expect(
      gradientError(weights) { t, w in
        let x = t.embedding(ids, table: w[0])
        let h = t.rmsNorm(x, weight: w[1], epsilon: 1e-6)
        let positions = (0..<ids.count).map { $0 % sequence }
        let q = t.rotary(t.linear(h, weight: w[2]), positions: positions, heads: heads, theta: 10_000)
        let k = t.rotary(t.linear(h, weight: w[3]), positions: positions, heads: kvHeads, theta: 10_000)
        let a = t.attention(
          query: q, key: k, value: t.linear(h, weight: w[4]), sequence: sequence, heads: heads, kvHeads: kvHeads,
          causal: true)
        let r = t.add(x, t.linear(a, weight: w[5]))
        let m = t.rmsNorm(r, weight: w[6], epsilon: 1e-6)
        let mlp = t.linear(t.multiply(t.silu(t.linear(m, weight: w[7])), t.linear(m, weight: w[8])), weight: w[9])
        return t.crossEntropy(t.linear(t.add(r, mlp), weight: w[10]), labels: [4, 2, 5, -100, 3, 3, 1, 0])
      } < tolerance)
  }
}
