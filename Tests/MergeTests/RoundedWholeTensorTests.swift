import Foundation
import Testing

@testable import Merge
@testable import Tensor

/// The merges under mergekit's rounding written once per dtype as sweeps (Karcher, Multi-SLERP,
/// SCE, Arcee fusion, NuSLERP whole; the task-vector methods' combination by range), against
/// their plain definitions: each torch operation rounded in turn over whole arrays, the sums over
/// elements as `Elementwise.sum` sums them, SCE's selection by a full sort and Arcee's quartiles
/// from the sorted importances. The tensors span several blocks.
@Suite struct RoundedWholeTensorTests {
  static let count = 3 * Elementwise.blockSize + 777

  /// Inputs already in the compute dtype, as mergekit casts them: a base and three models near it.
  static func inputs(_ r: MergeArithmetic, _ stream: String) -> (base: [Float], models: [[Float]]) {
    let base = r.round(random([count], "\(stream)-base").scalars)
    let models = (0..<3).map { t in
      r.round(zip(base, random([count], "\(stream)-\(t)", scale: 0.3).scalars).map { $0 + $1 })
    }
    return (base, models)
  }

  /// The same bits everywhere; on a failure, the count that differ and the first of them.
  static func expectSameBits(_ a: [Float], _ b: [Float], sourceLocation: SourceLocation = #_sourceLocation) {
    let differing = a.indices.filter { a[$0].bitPattern != b[$0].bitPattern }
    #expect(
      a.count == b.count && differing.isEmpty,
      "\(differing.count) of \(a.count) differ; first: \(differing.first.map { "[\($0)] \(a[$0]) against \(b[$0])" } ?? "none")",
      sourceLocation: sourceLocation)
  }

  static func sum(_ values: [Double]) -> Double { Elementwise.sum(values.count) { values[$0] } }
  static func norm(_ v: [Float]) -> Float { Float(sum(v.map { Double($0) * Double($0) }).squareRoot()) }

  @Test(arguments: [DType.bf16, .f16])
  func karcherIsItsDefinition(_ dtype: DType) throws {
    let r = MergeArithmetic.rounded(dtype)
    let points = Self.inputs(r, "karcher").models
    var p = try resolve(KarcherMerge(), [:], models: [[:], [:], [:]])
    p.arithmetic = r
    let merged = try KarcherMerge().merge(
      MergeInputs(name: "w", base: nil, models: points.map { Tensor(shape: [Self.count], scalars: $0) }), p)
    let (expected, iterations) = Self.karcher(points, tol: 1e-5, maxIter: 10, r)
    #expect(iterations > 1, "the iteration should move the mean")
    Self.expectSameBits(merged.scalars, expected)
  }

  /// mergekit's karcher, each torch operation rounded; also returns the steps taken.
  static func karcher(_ points: [[Float]], tol: Double, maxIter: Int, _ r: MergeArithmetic) -> ([Float], Int) {
    let count = points[0].count
    let alphas = [Double](repeating: 1 / Double(points.count), count: points.count)
    let norms = points.map(norm)
    let valid = norms.indices.filter { Double(norms[$0]) > tol }
    let units = valid.map { i in points[i].map { r.round($0 / norms[i]) } }
    let weights = valid.map { Float(alphas[$0] / valid.reduce(0) { $0 + alphas[$1] }) }
    var mean = [Float](repeating: 0, count: count)
    for (u, w) in zip(units, weights) { for i in 0..<count { mean[i] = r.round(mean[i] + r.round(w * u[i])) } }
    let meanNorm = norm(mean)
    mean = Double(meanNorm) < tol ? units[0] : mean.map { r.round($0 / meanNorm) }
    var steps = 0
    for _ in 0..<maxIter {
      steps += 1
      var tangent = [Float](repeating: 0, count: count)
      for (u, w) in zip(units, weights) {
        let dot = min(1, max(-1, r.round(sum((0..<count).map { Double(mean[$0]) * Double(u[$0]) }))))
        let theta = r.round(Float(acos(Double(dot))))
        if Double(theta) < tol { continue }
        let factor = r.round(w * r.round(theta / r.round(Float(sin(Double(theta))))))
        for i in 0..<count {
          tangent[i] = r.round(tangent[i] + r.round(factor * r.round(u[i] - r.round(dot * mean[i]))))
        }
      }
      let step = norm(tangent)
      if Double(step) < tol { break }
      let (c, s) = (Float(cos(Double(step))), Float(sin(Double(step))))
      mean = (0..<count).map { r.round(r.round(c * mean[$0]) + r.round(s * r.round(tangent[$0] / step))) }
      let length = norm(mean)
      if Double(length) > tol { mean = mean.map { r.round($0 / length) } }
    }
    var scale: Float = 0
    for (alpha, n) in zip(alphas, norms) { scale += Float(alpha) * n }
    return (mean.map { r.round(scale * $0) }, steps)
  }

  @Test func multiSLERPIsItsDefinition() throws {
    let r = MergeArithmetic.rounded(.bf16)
    let (base, models) = Self.inputs(r, "multislerp")
    let weights: [Float] = [0.2, 0.5, 0.3]
    var p = try resolve(MultiSLERPMerge(), [:], models: weights.map { ["weight": .number(Double($0))] })
    p.arithmetic = r
    let merged = try MultiSLERPMerge().merge(
      MergeInputs(
        name: "w", base: Tensor(shape: [Self.count], scalars: base),
        models: models.map { Tensor(shape: [Self.count], scalars: $0) }), p)
    // mergekit's multislerp: the weights rounded and normalised; norms, unit points, their
    // weighted mean, the tangents at it, the exponential map, the mean norm, the base added.
    let rounded = weights.map { r.round($0) }
    let total = r.round(rounded.reduce(0.0) { $0 + Double($1) })
    let w = rounded.map { r.round($0 / total) }
    let points = models.map { m in zip(m, base).map { r.round($0 - $1) } }
    let count = Self.count
    func weightedSum(_ values: [[Float]]) -> [Float] {
      (0..<count).map { j in r.round(zip(values, w).reduce(0.0) { $0 + Double(r.round($1.0[j] * $1.1)) }) }
    }
    func norm(_ v: [Float]) -> Float { r.round(Self.sum(v.map { Double($0) * Double($0) }).squareRoot()) }
    let norms = points.map(norm)
    let units = zip(points, norms).map { v, n in v.map { r.round($0 / r.round(n + 1e-8)) } }
    let meanNorm = norm(weightedSum(units))
    let mean = weightedSum(units).map { r.round($0 / meanNorm) }
    let tangents = units.map { u -> [Float] in
      let dot = r.round(Self.sum((0..<count).map { Double(r.round(u[$0] * mean[$0])) }))
      return zip(u, mean).map { r.round($0 - r.round(dot * $1)) }
    }
    let tangent = weightedSum(tangents)
    let tangentNorm = r.round(norm(tangent) + 1e-8)
    let cosine = r.round(Float(cos(Double(tangentNorm))))
    let scale = r.round(r.round(Float(sin(Double(tangentNorm)))) / tangentNorm)
    let averageNorm = r.round(zip(norms, w).reduce(0.0) { $0 + Double(r.round($1.0 * $1.1)) })
    let expected = (0..<count).map { j in
      r.round(r.round(r.round(r.round(mean[j] * cosine) + r.round(tangent[j] * scale)) * averageNorm) + base[j])
    }
    Self.expectSameBits(merged.scalars, expected)
  }

  @Test func sceIsItsDefinition() throws {
    let r = MergeArithmetic.rounded(.bf16)
    var (base, models) = Self.inputs(r, "sce")
    // Some elements unchanged in every model (variance 0) and some equal variances, so that the
    // count of nonzero variances and the ties to the lower index both matter.
    for i in stride(from: 0, to: Self.count, by: 97) { for t in 0..<3 { models[t][i] = base[i] } }
    for i in stride(from: 5, to: Self.count, by: 89) { for t in 0..<3 { models[t][i] = r.round(base[i] + Float(t)) } }
    var p = try resolve(SCEMerge(), ["select_topk": .number(0.7)], models: [[:], [:], [:]])
    p.arithmetic = r
    let merged = try SCEMerge().merge(
      MergeInputs(
        name: "w", base: Tensor(shape: [Self.count], scalars: base),
        models: models.map { Tensor(shape: [Self.count], scalars: $0) }), p)
    let count = Self.count
    var tvs = models.map { m in zip(m, base).map { r.round($0 - $1) } }
    let n = Double(tvs.count)
    let variance = (0..<count).map { i -> Float in
      let mean = tvs.reduce(0.0) { $0 + Double($1[i]) } / n
      return r.round(tvs.reduce(0.0) { $0 + (Double($1[i]) - mean) * (Double($1[i]) - mean) } / n)
    }
    let k = Int((Double(variance.filter { $0 != 0 }.count) * 0.7).rounded(.towardZero))
    let order = (0..<count).sorted { variance[$0] > variance[$1] || (variance[$0] == variance[$1] && $0 < $1) }
    var keep = [Bool](repeating: false, count: count)
    for i in order.prefix(k) { keep[i] = true }
    #expect(k > 0 && variance[order[k - 1]] == variance[order[k]], "a tie should straddle the kept count")
    tvs = tvs.map { tv in tv.enumerated().map { keep[$0] ? $1 : 0 } }
    let squares = tvs.map { tv in r.round(Self.sum(tv.map { Double(r.round($0 * $0)) }) / Double(count)) }
    let total = r.round(squares.reduce(0.0) { $0 + Double($1) })
    let weights = squares.map { r.round($0 / total) }
    let expected = (0..<count).map { i -> Float in
      let majority: Float = tvs.reduce(0.0) { $0 + Double($1[i]) } >= 0 ? 1 : -1
      var numerator = 0.0
      var denominator = 0.0
      for (tv, w) in zip(tvs, weights) where tv[i] != 0 && (tv[i] > 0 ? 1 : -1) == majority {
        numerator += Double(r.round(tv[i] * w))
        denominator += Double(w)
      }
      return r.round(base[i] + r.round(r.round(numerator) / max(r.round(denominator), r.round(Float(1e-6)))))
    }
    Self.expectSameBits(merged.scalars, expected)
  }

  @Test func arceeFusionIsItsDefinition() throws {
    let r = MergeArithmetic.rounded(.bf16)
    let (base, models) = Self.inputs(r, "arcee")
    let width = 256
    let shape = [Self.count / width, width]
    let count = shape[0] * width
    var p = try resolve(ArceeFusionMerge(), [:], models: [[:]])
    p.arithmetic = r
    let merged = try ArceeFusionMerge().merge(
      MergeInputs(
        name: "w", base: Tensor(shape: shape, scalars: Array(base[..<count])),
        models: [Tensor(shape: shape, scalars: Array(models[0][..<count]))]), p)
    let change = (0..<count).map { r.round(models[0][$0] - base[$0]) }
    var importance = [Float](repeating: 0, count: count)
    for start in stride(from: 0, to: count, by: width) {
      let row = start..<(start + width)
      let pm = ArceeFusionMerge.softmax(models[0][row].map(Double.init)[...]).map { r.round(r.round($0) + 1e-8) }
      let qb = ArceeFusionMerge.softmax(base[row].map(Double.init)[...]).map { r.round(r.round($0) + 1e-8) }
      let kl = r.round(
        zip(pm, qb).reduce(0.0) { $0 + Double(r.round($1.0 * r.round(Float(log(Double(r.round($1.0 / $1.1))))))) })
      for i in row { importance[i] = r.round(abs(change[i]) * kl) }
    }
    let sorted = importance.sorted()
    func quantile(_ q: Double) -> Float { sorted[Int(q * Double(count - 1))] }
    let threshold = r.round(quantile(0.5) + r.round(1.5 * r.round(quantile(0.75) - quantile(0.25))))
    let expected = (0..<count).map { r.round(base[$0] + (importance[$0] >= threshold ? change[$0] : 0)) }
    let fused = (0..<count).filter { importance[$0] >= threshold }.count
    #expect(fused > 0 && fused < count / 2)
    Self.expectSameBits(merged.scalars, expected)
  }

  /// NuSLERP in its three layouts: one angle for the tensor, one per row, one per column
  /// (`nuslerp_row_wise`); both task vectors are 0.5 everywhere on one row, which is colinear.
  @Test(arguments: [(true, false), (false, false), (false, true)])
  func nuSLERPIsItsDefinition(_ flatten: Bool, _ rowWise: Bool) throws {
    let r = MergeArithmetic.rounded(.bf16)
    var (base, models) = Self.inputs(r, "nuslerp")
    let width = 256
    let shape = [Self.count / width, width]
    let count = shape[0] * width
    for i in width..<(2 * width) { (base[i], models[0][i], models[1][i]) = (0, 0.5, 0.5) }
    var p = try resolve(
      NuSLERPMerge(), ["nuslerp_flatten": .flag(flatten), "nuslerp_row_wise": .flag(rowWise)],
      models: [["weight": .number(0.3)], ["weight": .number(0.7)]])
    p.arithmetic = r
    let merged = try NuSLERPMerge().merge(
      MergeInputs(
        name: "w", base: Tensor(shape: shape, scalars: Array(base[..<count])),
        models: models[..<2].map { Tensor(shape: shape, scalars: Array($0[..<count])) }), p)
    let vectors: [[Int]] =
      flatten
      ? [Array(0..<count)]
      : rowWise
        ? (0..<width).map { column in (0..<shape[0]).map { $0 * width + column } }
        : (0..<shape[0]).map { Array(($0 * width)..<(($0 + 1) * width)) }
    let (v0, v1) = (
      (0..<count).map { r.round(models[0][$0] - base[$0]) }, (0..<count).map { r.round(models[1][$0] - base[$0]) }
    )
    let t: Float = 0.7
    var expected = [Float](repeating: 0, count: count)
    var colinear = 0
    for indices in vectors {
      func unit(_ v: [Float]) -> [Float] {
        let n = max(
          r.round(indices.reduce(0.0) { $0 + Double(v[$1]) * Double(v[$1]) }.squareRoot()), r.round(Float(1e-7)))
        return indices.map { r.round(v[$0] / n) }
      }
      let (x, y) = (unit(v0), unit(v1))
      let cosine = min(1, max(-1, r.round(zip(x, y).reduce(0.0) { $0 + Double(r.round($1.0 * $1.1)) })))
      if r.round(1 - r.round(cosine * cosine)) <= r.round(Float(1e-16)) {
        colinear += 1
        for i in indices { expected[i] = r.round(r.round((1 - t) * v0[i]) + r.round(t * v1[i])) }
        continue
      }
      let theta = r.round(Float(acos(Double(cosine))))
      let sine = r.round(Float(sin(Double(theta))))
      let s0 = r.round(Float(sin(Double(r.round((1 - t) * theta)))))
      let s1 = r.round(Float(sin(Double(r.round(t * theta)))))
      for i in indices { expected[i] = r.round(r.round(r.round(s0 * v0[i]) + r.round(s1 * v1[i])) / sine) }
    }
    #expect(colinear == (!flatten && !rowWise ? 1 : 0))
    Self.expectSameBits(merged.scalars, (0..<count).map { r.round(expected[$0] + base[$0]) })
  }

  /// The task-vector methods' rounded combination (`combineRounded`), with and without the
  /// sign election, normalising or not, lambda 1 or not; zero deltas and sums of both signs.
  @Test(arguments: [(true, true, 1.0), (true, false, 0.7), (false, false, 1.0), (false, true, 1.3)])
  func consensusIsItsDefinition(_ elect: Bool, _ normalize: Bool, _ lambda: Double) throws {
    let r = MergeArithmetic.rounded(.bf16)
    let (base, models) = Self.inputs(r, "consensus")
    let deltas = models.map { m in (0..<Self.count).map { $0 % 7 == 0 ? 0 : r.round(m[$0] - base[$0]) } }
    let method = elect ? TaskVectorMerge.ties : TaskVectorMerge.taskArithmetic
    var p = try resolve(
      method, ["lambda": .number(lambda), "normalize": .flag(normalize)],
      models: [["weight": .number(0.3)], ["weight": .number(-0.45)], ["weight": .number(0.8)]])
    p.arithmetic = r
    let merged = method.combineRounded(base: base, deltas: deltas, p)
    let weights = [0.3, -0.45, 0.8].map { r.round(Float($0)) }
    let weighted = deltas.enumerated().map { i, delta in delta.map { r.round($0 * weights[i]) } }
    var allWeights: Float = 0
    for w in weights { allWeights += w }
    let expected = base.indices.map { j -> Float in
      var mixed: Float = 0
      var divisor: Float = 0
      if elect {
        var total: Float = 0
        for d in weighted { total += d[j] }
        let majority: Float = total >= 0 ? 1 : -1
        for (i, d) in weighted.enumerated() where (d[j] > 0 ? 1 : (d[j] < 0 ? -1 : 0)) == majority {
          mixed += d[j]
          divisor += weights[i]
        }
        divisor = r.round(divisor)
        if divisor == 0 { divisor = 1 }
      } else {
        for d in weighted { mixed += d[j] }
        divisor = r.round(allWeights)
        if abs(divisor) < 1e-8 { divisor = 1 }
      }
      mixed = r.round(mixed)
      if normalize { mixed = r.round(mixed / divisor) }
      if lambda != 1 { mixed = r.round(mixed * Float(lambda)) }
      return r.round(base[j] + mixed)
    }
    Self.expectSameBits(merged, expected)
  }

  /// The order statistics are the sorted array's elements, negatives, zeros of both signs,
  /// repeats and infinities included.
  @Test func orderStatisticsAreTheSortedElements() {
    var values = random([5000], "order").scalars.map { ($0 * 8).rounded() / 8 }
    values += [0, -0.0, .infinity, -.infinity, 0, 3, 3]
    let sorted = values.sorted()
    let positions = [0, 1, 17, 2500, 2501, values.count / 4, values.count - 2, values.count - 1]
    let found = RoundedSweeps.orderStatistics(values, positions)
    // -0 and +0 are equal: compare the values, and the bits elsewhere.
    #expect(found == positions.map { sorted[$0] })
    #expect(found.map { $0 == 0 ? 0 : $0.bitPattern } == positions.map { sorted[$0] == 0 ? 0 : sorted[$0].bitPattern })
  }

  /// `BF16Rounding` (masks) rounds every float as `DTypeConversion.f32ToBF16Bits` (selects):
  /// a sweep over the bit patterns, ties, infinities and NaNs with and without a kept payload.
  @Test func bf16RoundingIsTheConversion() {
    var patterns = stride(from: UInt32(0), to: UInt32.max - 40_000, by: 40_009).map { $0 }
    patterns += [
      0x3F80_8000, 0x3F81_8000, 0x7F80_0000, 0xFF80_0000, 0x7F80_0001, 0x7FC0_0000, 0xFF80_0100, 0x7F7F_FFFF,
    ]
    for bits in patterns {
      let x = Float(bitPattern: bits)
      let expected = DTypeConversion.bf16ToF32Bits(DTypeConversion.f32ToBF16Bits(bits))
      #expect(BF16Rounding.round(x).bitPattern == expected, "bits \(String(bits, radix: 16))")
    }
  }
}
