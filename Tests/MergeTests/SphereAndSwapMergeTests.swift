import Foundation
import Testing

@testable import Merge
@testable import Tensor

/// nearswap, multislerp and karcher (mergekit's methods) against closed forms.
@Suite struct SphereAndSwapMergeTests {
  @Test func nearswapTakesTheOtherModelWhereTheyAreClose() throws {
    let a = Tensor(shape: [4], scalars: [0, 1, 2, 3])
    let b = Tensor(shape: [4], scalars: [0.0005, 1.5, 10, 3])
    let out = try NearSwapMerge().merge(
      MergeInputs(name: "w", base: a, models: [b]), try resolve(NearSwapMerge(), ["t": .number(0.001)], models: [[:]]))
    // |a - b| = 0.0005 (w = 1: b), 0.5 (w = 0.002), 8 (w = 0.000125), 0 (w = 1: b, which equals a).
    expectClose(out.scalars, [0.0005, 0.002 * 1.5 + 0.998 * 1, 0.000125 * 10 + 0.999875 * 2, 3], relative: 1e-7)
  }

  @Test func multislerpOfOrthogonalModelsIsTheArcMidpointAtTheirNorm() throws {
    let a = Tensor(shape: [3], scalars: [2, 0, 0])
    let b = Tensor(shape: [3], scalars: [0, 2, 0])
    let p = try resolve(MultiSLERPMerge(), [:], models: [["weight": .number(1)], ["weight": .number(1)]])
    let out = try MultiSLERPMerge().merge(MergeInputs(name: "w", base: nil, models: [a, b]), p)
    expectClose(out.scalars, [2 / 2.0.squareRoot(), 2 / 2.0.squareRoot(), 0], relative: 1e-7)
    // Around a base: the same construction on the differences, the base added back.
    let base = Tensor(shape: [3], scalars: [1, 1, 1])
    let shifted = try MultiSLERPMerge().merge(
      MergeInputs(
        name: "w", base: base,
        models: [Tensor(shape: [3], scalars: [3, 1, 1]), Tensor(shape: [3], scalars: [1, 3, 1])]), p)
    expectClose(shifted.scalars, [1 + 2 / 2.0.squareRoot(), 1 + 2 / 2.0.squareRoot(), 1], relative: 1e-7)
    // Exactly opposed pair: the weighted sum (here zero).
    let opposed = try MultiSLERPMerge().merge(
      MergeInputs(name: "w", base: nil, models: [a, Tensor(shape: [3], scalars: [-2, 0, 0])]), p)
    #expect(opposed.scalars == [0, 0, 0])
  }

  /// Multi-SLERP through its Gram pass and weighted sum, over several ranges, against the
  /// construction done on the vectors themselves in float64 (with and without a base, uneven
  /// weights); a lone model is returned as it is, and three opposed-summing inputs are refused.
  @Test(arguments: [true, false])
  func multislerpFromTheGramMatrixIsTheConstructionOnTheVectors(_ withBase: Bool) throws {
    let n = MergeRanges.size + 3_001
    let base = random([n], "ms-base").scalars
    let models = (0..<3).map { t in
      zip(base, random([n], "ms-\(t)", scale: 0.02).scalars).map { $0 + $1 + (t == 0 ? 0.01 : 0) }
    }
    let weights = [0.5, 0.3, 0.2]
    let p = try resolve(MultiSLERPMerge(), [:], models: weights.map { ["weight": .number($0)] })
    let out = try MultiSLERPMerge().merge(
      MergeInputs(
        name: "w", base: withBase ? Tensor(shape: [n], scalars: base) : nil,
        models: models.map { Tensor(shape: [n], scalars: $0) }), p)
    // The construction, step by step on the vectors.
    let points = models.map { m in (0..<n).map { Double(m[$0]) - (withBase ? Double(base[$0]) : 0) } }
    func dot(_ x: [Double], _ y: [Double]) -> Double { zip(x, y).reduce(0) { $0 + $1.0 * $1.1 } }
    let norms = points.map { dot($0, $0).squareRoot() }
    let units = zip(points, norms).map { v, norm in v.map { $0 / (norm + 1e-8) } }
    var mean = (0..<n).map { i in (0..<3).reduce(0.0) { $0 + weights[$1] * units[$1][i] } }
    let meanNorm = dot(mean, mean).squareRoot()
    mean = mean.map { $0 / meanNorm }
    var tangent = [Double](repeating: 0, count: n)
    for t in 0..<3 {
      let d = dot(units[t], mean)
      for i in 0..<n { tangent[i] += weights[t] * (units[t][i] - d * mean[i]) }
    }
    let tangentNorm = dot(tangent, tangent).squareRoot() + 1e-8
    let averageNorm = zip(norms, weights).reduce(0.0) { $0 + $1.0 * $1.1 }
    let expected = (0..<n).map { i in
      (mean[i] * cos(tangentNorm) + tangent[i] * sin(tangentNorm) / tangentNorm) * averageNorm
        + (withBase ? Double(base[i]) : 0)
    }
    expectClose(out.scalars, expected, relative: 1e-6)
    let lone = try MultiSLERPMerge().merge(
      MergeInputs(name: "w", base: nil, models: [Tensor(shape: [n], scalars: models[0])]),
      try resolve(MultiSLERPMerge(), [:], models: [[:]]))
    #expect(lone.scalars == models[0])
    let x = Tensor(shape: [2], scalars: [1, 0])
    let y = Tensor(shape: [2], scalars: [-1, 0])
    #expect(throws: MergeError.self) {
      try MultiSLERPMerge().merge(
        MergeInputs(name: "w", base: nil, models: [x, y, Tensor(shape: [2], scalars: [0, 0])]),
        try resolve(MultiSLERPMerge(), [:], models: [[:], [:], [:]]))
    }
  }

  /// Karcher through its Gram pass and coefficients, over several ranges, against the fixed-point
  /// iteration done on the vectors themselves in float64.
  /// The Gram matrix of a range, formed block by block, is the plain four-lane sums of the
  /// points to the bit (element i in lane i % 4, the lanes added pairwise, then the last n % 4
  /// products in order): lengths with and without a tail, across blocks, with and without a
  /// base.
  @Test(arguments: [0, 3, 1_024, 2_050, 5_003])
  func gramPartIsTheFourLaneSumOfThePoints(_ n: Int) {
    let base = random([n], "gram-base").scalars
    let models = (0..<3).map { random([n], "gram-\($0)").scalars }
    for withBase in [true, false] {
      let points = models.map { model in (0..<n).map { Double(model[$0]) - (withBase ? Double(base[$0]) : 0) } }
      let part = TensorScan.gramPart(RangeInputs(offset: 0, base: withBase ? base : nil, models: models))
      for s in 0..<3 {
        for t in s..<3 {
          var lanes = SIMD4<Double>(repeating: 0)
          for i in 0..<(n / 4 * 4) { lanes[i % 4] += points[s][i] * points[t][i] }
          var expected = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
          for i in (n / 4 * 4)..<n { expected += points[s][i] * points[t][i] }
          #expect(part[s * 3 + t].bitPattern == expected.bitPattern, "n \(n), pair \(s) \(t), base \(withBase)")
        }
      }
    }
  }

  @Test func karcherFromTheGramMatrixIsTheIterationOnTheVectors() throws {
    let n = MergeRanges.size + 1_001
    let shared = random([n], "k-shared").scalars
    let models = (0..<3).map { t in zip(shared, random([n], "k-\(t)", scale: 0.6).scalars).map { $0 + $1 } }
    let p = try resolve(KarcherMerge(), ["max_iter": .number(20), "tol": .number(1e-9)], models: [[:], [:], [:]])
    let out = try KarcherMerge().merge(
      MergeInputs(name: "w", base: nil, models: models.map { Tensor(shape: [n], scalars: $0) }), p)
    func dot(_ x: [Double], _ y: [Double]) -> Double { zip(x, y).reduce(0) { $0 + $1.0 * $1.1 } }
    let points = models.map { $0.map(Double.init) }
    let norms = points.map { dot($0, $0).squareRoot() }
    let units = zip(points, norms).map { v, norm in v.map { $0 / norm } }
    var mean = (0..<n).map { i in units.reduce(0.0) { $0 + $1[i] / 3 } }
    let first = dot(mean, mean).squareRoot()
    mean = mean.map { $0 / first }
    for _ in 0..<20 {
      var tangent = [Double](repeating: 0, count: n)
      for u in units {
        let c = min(1, max(-1, dot(mean, u)))
        let theta = acos(c)
        guard theta >= 1e-9 else { continue }
        for i in 0..<n { tangent[i] += theta / sin(theta) / 3 * (u[i] - c * mean[i]) }
      }
      let step = dot(tangent, tangent).squareRoot()
      if step < 1e-9 { break }
      mean = (0..<n).map { cos(step) * mean[$0] + sin(step) * tangent[$0] / step }
      let length = dot(mean, mean).squareRoot()
      mean = mean.map { $0 / length }
    }
    let scale = norms.reduce(0, +) / 3
    expectClose(out.scalars, mean.map { $0 * scale }, relative: 1e-6)
  }

  @Test func karcherMeanIsTheSphericalCentreScaledByTheMeanNorm() throws {
    let p = try resolve(KarcherMerge(), [:], models: [[:], [:], [:]])
    // Orthogonal directions of norms 2, 4 and 6: centre (1, 1, 1)/sqrt 3, mean norm 4.
    let out = try KarcherMerge().merge(
      MergeInputs(
        name: "w", base: nil,
        models: [
          Tensor(shape: [3], scalars: [2, 0, 0]), Tensor(shape: [3], scalars: [0, 4, 0]),
          Tensor(shape: [3], scalars: [0, 0, 6]),
        ]), p)
    let c = 4 / 3.0.squareRoot()
    expectClose(out.scalars, [c, c, c], relative: 1e-6)
    // Two directions 90 degrees apart but weighted by a third on one of them: the Karcher mean
    // lies where the weighted tangent sum vanishes, at 30 degrees from the doubled direction.
    let three = try KarcherMerge().merge(
      MergeInputs(
        name: "w", base: nil,
        models: [
          Tensor(shape: [2], scalars: [1, 0]), Tensor(shape: [2], scalars: [1, 0]),
          Tensor(shape: [2], scalars: [0, 1]),
        ]), try resolve(KarcherMerge(), ["max_iter": .number(100), "tol": .number(1e-12)], models: [[:], [:], [:]]))
    expectClose(three.scalars, [cos(Double.pi / 6), sin(Double.pi / 6)], relative: 1e-6)
  }

  func nuslerp(_ a: [Float], _ b: [Float], shape: [Int], _ global: [String: ParameterValue], weights: (Double, Double))
    throws -> [Float]
  {
    let p = try resolve(
      NuSLERPMerge(), global, models: [["weight": .number(weights.0)], ["weight": .number(weights.1)]])
    return try NuSLERPMerge().merge(
      MergeInputs(
        name: "w", base: nil, models: [Tensor(shape: shape, scalars: a), Tensor(shape: shape, scalars: b)]), p
    ).scalars
  }

  @Test func nuslerpInterpolatesByTheWeightsOverTensorsRowsOrColumns() throws {
    let h = 0.5.squareRoot()
    expectClose(try nuslerp([1, 0], [0, 1], shape: [2], [:], weights: (1, 1)), [h, h], relative: 1e-7)
    // t = 3/4 of a right angle.
    expectClose(
      try nuslerp([1, 0], [0, 1], shape: [2], [:], weights: (1, 3)), [sin(Double.pi / 8), sin(3 * Double.pi / 8)],
      relative: 1e-7)
    let a: [Float] = [1, 0, 1, 0]
    let b: [Float] = [0, 1, 1, 0]
    let flat = ["nuslerp_flatten": ParameterValue.flag(false)]
    // Rows (last dimension): (1,0)~(0,1) meet halfway; (1,0)~(1,0) are colinear.
    expectClose(try nuslerp(a, b, shape: [2, 2], flat, weights: (1, 1)), [h, h, 1, 0], relative: 1e-7)
    // Columns: (1,1)~(0,1) at 45 degrees, halfway: sin(pi/8)/sin(pi/4) of each; (0,0)~(1,0) at 90.
    let s = sin(Double.pi / 8) / sin(Double.pi / 4)
    expectClose(
      try nuslerp(a, b, shape: [2, 2], flat.merging(["nuslerp_row_wise": .flag(true)]) { $1 }, weights: (1, 1)),
      [s * 1 + s * 0, h, s * 1 + s * 1, 0], relative: 1e-6)
  }

  @Test func sceSelectsWeighsAndErases() throws {
    let base = Tensor(shape: [4], scalars: [0, 0, 0, 0])
    let one = Tensor(shape: [4], scalars: [1, -2, 3, 0])
    // Weights 3.5/5 and 1.5/5; element 1's sum is 0 (counts as +), so only the +2 is kept.
    let all = try SCEMerge().merge(
      MergeInputs(name: "w", base: base, models: [one, Tensor(shape: [4], scalars: [1, 2, -1, 0])]),
      try resolve(SCEMerge(), [:], models: [[:], [:]]))
    expectClose(all.scalars, [1, 2, 3, 0], relative: 1e-7)
    // select_topk 0.5 of the 2 elements that vary: only element 2 (variance 6.25, against 4) is kept.
    let selected = try SCEMerge().merge(
      MergeInputs(name: "w", base: base, models: [one, Tensor(shape: [4], scalars: [1, 2, -2, 0])]),
      try resolve(SCEMerge(), ["select_topk": .number(0.5)], models: [[:], [:]]))
    expectClose(selected.scalars, [0, 0, 3, 0], relative: 1e-7)
  }

  /// SCE streamed over several ranges against the whole-tensor construction in float64 (the
  /// variances ranked as float32, ties by index), with quantised task vectors so that many
  /// variances tie, including at the threshold. The threshold is found by the bracket from a
  /// sample in one pass; with the models changed only where the sample does not look (its
  /// blocks of 64 at 1024 evenly spaced places, `TensorScan.sampleBlocks`), the sample sees no
  /// nonzero variance and the ranker's own passes find it.
  @Test(arguments: [(0.3, false), (1.0, false), (0.3, true)])
  func sceStreamedIsTheWholeTensorConstruction(_ topk: Double, hiddenFromSample: Bool) throws {
    let n = MergeRanges.size + 9_000
    let base = random([n], "sce-base").scalars
    var sampled = [Bool](repeating: false, count: n)
    for b in 0..<1024 { for i in (b * (n - 64) / 1023)..<(b * (n - 64) / 1023 + 64) { sampled[i] = true } }
    let models = (0..<3).map { t in
      zip(base, random([n], "sce-\(t)", scale: 0.02).scalars).enumerated().map { i, pair in
        hiddenFromSample && sampled[i] ? pair.0 : pair.0 + (pair.1 * 256).rounded() / 256
      }
    }
    let p = try resolve(SCEMerge(), ["select_topk": .number(topk)], models: [[:], [:], [:]])
    let out = try SCEMerge().merge(
      MergeInputs(
        name: "w", base: Tensor(shape: [n], scalars: base), models: models.map { Tensor(shape: [n], scalars: $0) }),
      p)
    var tvs = models.map { m in (0..<n).map { Double(m[$0]) - Double(base[$0]) } }
    if topk < 1 {
      let variance = (0..<n).map { i -> Float in
        let mean = tvs.reduce(0) { $0 + $1[i] } / 3
        return Float(tvs.reduce(0) { $0 + ($1[i] - mean) * ($1[i] - mean) } / 3)
      }
      let k = Int((Double(variance.filter { $0 != 0 }.count) * topk).rounded(.towardZero))
      var keep = [Bool](repeating: false, count: n)
      for i in (0..<n).sorted(by: { variance[$0] > variance[$1] || (variance[$0] == variance[$1] && $0 < $1) })
        .prefix(k)
      {
        keep[i] = true
      }
      tvs = tvs.map { tv in tv.indices.map { keep[$0] ? tv[$0] : 0 } }
    }
    var weights = tvs.map { tv in tv.reduce(0) { $0 + $1 * $1 } / Double(n) }
    let total = weights.reduce(0, +)
    weights = weights.map { $0 / total }
    let expected = (0..<n).map { i -> Double in
      let majority: Double = tvs.reduce(0) { $0 + $1[i] } >= 0 ? 1 : -1
      var (numerator, denominator) = (0.0, 0.0)
      for (tv, w) in zip(tvs, weights) where tv[i] != 0 && (tv[i] > 0 ? 1.0 : -1.0) == majority {
        numerator += tv[i] * w
        denominator += w
      }
      return Double(base[i]) + numerator / max(denominator, 1e-6)
    }
    #expect(zip(out.scalars, base).map { $0 != $1 } == zip(expected, base).map { Float($0) != $1 })
    expectClose(out.scalars, expected, relative: 1e-6)
  }

  /// RAM and RAM+TL streamed over several ranges give the whole-tensor construction's values
  /// exactly (its per-element arithmetic is unchanged; RAM+TL's counts span the ranges).
  @Test(arguments: [false, true])
  func ramStreamedIsTheWholeTensorConstruction(_ plus: Bool) throws {
    let method = plus ? RAMMerge.ramPlus : RAMMerge.ram
    let n = MergeRanges.size + 5_000
    let base = random([n], "ram-base").scalars
    // About a third of each task vector's entries unchanged.
    let models = (0..<3).map { t in
      zip(base, random([n], "ram-\(t)", scale: 0.01).scalars).enumerated().map { i, pair in
        (i + t) % 3 == 0 ? pair.0 : pair.0 + pair.1
      }
    }
    let p = try resolve(method, [:], models: [[:], [:], [:]])
    let out = try method.merge(
      MergeInputs(
        name: "w", base: Tensor(shape: [n], scalars: base), models: models.map { Tensor(shape: [n], scalars: $0) }),
      p)
    let epsilon = 1e-5
    let tvs = models.map { m in (0..<n).map { Double(m[$0]) - Double(base[$0]) } }
    let changed = tvs.map { tv in tv.map { abs($0) > epsilon } }
    let contributors = (0..<n).map { i in changed.reduce(0) { $0 + ($1[i] ? 1 : 0) } }
    let lambdas = (0..<3).map { m -> Double in
      guard plus else { return 1 }
      let shared = (0..<n).filter { changed[m][$0] && contributors[$0] > 1 }.count
      let unique = (0..<n).filter { changed[m][$0] && contributors[$0] == 1 }.count
      return 1 + 0.1 * min(0.2, max(0, Double(shared) / max(Double(unique), epsilon)))
    }
    let expected = (0..<n).map { i -> Float in
      var delta = 0.0
      for m in 0..<3 where changed[m][i] {
        delta += contributors[i] == 1 ? tvs[m][i] * lambdas[m] : tvs[m][i] / Double(contributors[i])
      }
      return Float(Double(base[i]) + delta)
    }
    #expect(out.scalars == expected)
  }

  @Test func ramKeepsUniqueChangesAndAveragesShared() throws {
    let base = Tensor(shape: [4], scalars: [0, 0, 0, 0])
    let models = [Tensor(shape: [4], scalars: [1, 1, 0, 1e-6]), Tensor(shape: [4], scalars: [0, 3, 2, 0])]
    let ram = try RAMMerge.ram.merge(
      MergeInputs(name: "w", base: base, models: models), try resolve(RAMMerge.ram, [:], models: [[:], [:]]))
    expectClose(ram.scalars, [1, 2, 2, 0], relative: 1e-7)
    // Each model: one shared and one unique change, rho 1, lambda 1 + 0.1 min(0.2, 1) = 1.02.
    let plus = try RAMMerge.ramPlus.merge(
      MergeInputs(name: "w", base: base, models: models), try resolve(RAMMerge.ramPlus, [:], models: [[:], [:]]))
    expectClose(plus.scalars, [1.02, 2, 2.04, 0], relative: 1e-6)
  }

  /// NuSLERP with one angle streams through a Gram pass and a weighted sum over several ranges:
  /// the construction on the vectors in float64, with and without a base.
  @Test(arguments: [true, false])
  func nuslerpStreamedIsTheConstructionOnTheVectors(_ withBase: Bool) throws {
    let n = MergeRanges.size + 2_000
    let base = random([n], "nu-base").scalars
    let models = (0..<2).map { t in zip(base, random([n], "nu-\(t)", scale: 0.03).scalars).map { $0 + $1 } }
    let p = try resolve(NuSLERPMerge(), [:], models: [["weight": .number(0.7)], ["weight": .number(0.3)]])
    let out = try NuSLERPMerge().merge(
      MergeInputs(
        name: "w", base: withBase ? Tensor(shape: [n], scalars: base) : nil,
        models: models.map { Tensor(shape: [n], scalars: $0) }), p)
    let (x, y) = (
      (0..<n).map { Double(models[0][$0]) - (withBase ? Double(base[$0]) : 0) },
      (0..<n).map { Double(models[1][$0]) - (withBase ? Double(base[$0]) : 0) }
    )
    let nx = x.reduce(0) { $0 + $1 * $1 }.squareRoot()
    let ny = y.reduce(0) { $0 + $1 * $1 }.squareRoot()
    let theta = acos(zip(x, y).reduce(0) { $0 + $1.0 * $1.1 } / nx / ny)
    let (s0, s1) = (sin(0.7 * theta) / sin(theta), sin(0.3 * theta) / sin(theta))
    expectClose(
      out.scalars, (0..<n).map { s0 * x[$0] + s1 * y[$0] + (withBase ? Double(base[$0]) : 0) }, relative: 1e-6)
  }

  /// NuSLERP per row and per column streams (rows straddling the ranges, columns summed across
  /// them): each vector's construction in float64, taken over the vector alone, to the bit,
  /// with and without a base.
  @Test(arguments: [true, false])
  func nuslerpPerRowAndColumnStreamsTheConstructionOnEachVector(_ withBase: Bool) throws {
    let shape = [301, 1_000]
    let n = shape[0] * shape[1]
    let base = random([n], "nv-base").scalars
    let noise = (0..<2).map { random([n], "nv-\($0)", scale: 0.03).scalars }
    // Row 7 of the second model moves twice as far from the base as the first's: nearly
    // colinear task vectors.
    let models: [[Float]] = (0..<2).map { t in
      (0..<n).map { i -> Float in
        let step: Float = t == 1 && i / 1_000 == 7 ? 2 * noise[0][i] : noise[t][i]
        return base[i] + step
      }
    }
    for rowWise in [false, true] {
      let p = try resolve(
        NuSLERPMerge(), ["nuslerp_flatten": .flag(false), "nuslerp_row_wise": .flag(rowWise)],
        models: [["weight": .number(0.6)], ["weight": .number(0.4)]])
      let out = try NuSLERPMerge().merge(
        MergeInputs(
          name: "w", base: withBase ? Tensor(shape: shape, scalars: base) : nil,
          models: models.map { Tensor(shape: shape, scalars: $0) }), p)
      let b = (0..<n).map { withBase ? Double(base[$0]) : 0 }
      let (x, y) = ((0..<n).map { Double(models[0][$0]) - b[$0] }, (0..<n).map { Double(models[1][$0]) - b[$0] })
      let vectors: [[Int]] =
        rowWise
        ? (0..<1_000).map { c in (0..<301).map { $0 * 1_000 + c } }
        : (0..<301).map { r in Array((r * 1_000)..<((r + 1) * 1_000)) }
      var expected = [Float](repeating: 0, count: n)
      for v in vectors {
        let nx = max(v.reduce(0.0) { $0 + x[$1] * x[$1] }.squareRoot(), 1e-7)
        let ny = max(v.reduce(0.0) { $0 + y[$1] * y[$1] }.squareRoot(), 1e-7)
        let dot: Double = v.reduce(0.0) { $0 + (x[$1] / nx) * (y[$1] / ny) }
        let cosine = min(1, max(-1, dot))
        // t = 0.4 / (0.6 + 0.4).
        var (s0, s1) = (0.6, 0.4)
        if 1 - cosine * cosine > 1e-16 {
          let theta = acos(cosine)
          (s0, s1) = (sin(0.6 * theta) / sin(theta), sin(0.4 * theta) / sin(theta))
        }
        for i in v { expected[i] = Float(s0 * x[i] + s1 * y[i] + b[i]) }
      }
      let wrong = (0..<n).filter { out.scalars[$0].bitPattern != expected[$0].bitPattern }
      #expect(
        wrong.count == 0,
        "row-wise \(rowWise): first differing \(wrong.prefix(3).map { ($0, out.scalars[$0], expected[$0]) })")
    }
  }

  /// Arcee fusion streamed (rows straddling the ranges, quantiles by radix passes) gives the
  /// whole-tensor construction with sorted quantiles exactly: with the quantile keys found in
  /// memory after one collecting pass (the default limit), after a narrowing pass (1000), and
  /// by narrowing passes alone (0); and with BF16 values, whose rows take their exponentials
  /// from a table.
  @Test(arguments: [(nil, false), (1000, false), (0, false), (nil, true)])
  func arceeFusionStreamedIsTheWholeTensorConstruction(candidateLimit: Int?, bf16: Bool) throws {
    // Rows of an odd length, so that rows and ranges split the eight-element lanes.
    let width = 99_997
    let shape = [3, width]
    let n = 3 * width
    func stored(_ x: [Float]) -> [Float] { bf16 ? x.map { Float(bitPattern: $0.bitPattern & 0xFFFF_0000) } : x }
    let base = stored(random([n], "af-base").scalars)
    let model = stored(
      zip(base, random([n], "af-model", scale: 0.05).scalars).enumerated().map { i, pair in
        pair.0 + pair.1 * Float(1 + (i / width))
      })
    let method = candidateLimit.map { ArceeFusionMerge(candidateLimit: $0) } ?? ArceeFusionMerge()
    let out = try method.merge(
      MergeInputs(name: "w", base: Tensor(shape: shape, scalars: base), models: [Tensor(shape: shape, scalars: model)]),
      try resolve(ArceeFusionMerge(), [:], models: [[:]]))
    let (m, b) = (model.map(Double.init), base.map(Double.init))
    var importance = [Double](repeating: 0, count: n)
    for start in stride(from: 0, to: n, by: width) {
      let row = start..<(start + width)
      let p = ArceeFusionMerge.softmax(m[row]).map { $0 + 1e-8 }
      let q = ArceeFusionMerge.softmax(b[row]).map { $0 + 1e-8 }
      let kl = zip(p, q).reduce(0) { $0 + $1.0 * log($1.0 / $1.1) }
      for i in row { importance[i] = abs(m[i] - b[i]) * kl }
    }
    let sorted = importance.sorted()
    func quantile(_ q: Double) -> Double { sorted[Int(q * Double(n - 1))] }
    let threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    let expected = (0..<n).map { Float(importance[$0] >= threshold ? m[$0] : b[$0]) }
    #expect(out.scalars == expected)
    #expect(expected.enumerated().contains { $1 != base[$0] } && expected.enumerated().contains { $1 == base[$0] })
  }

  @Test func arceeFusionKeepsOnlyOutlyingImportance() throws {
    // One row: importances k * (1, 2, 3, 4, 100) with k the row's KL divergence; quartiles 2k,
    // 3k, 4k give the threshold 6k, so only the last change is taken.
    let out = try ArceeFusionMerge().merge(
      MergeInputs(
        name: "w", base: Tensor(shape: [5], scalars: [0, 0, 0, 0, 0]),
        models: [Tensor(shape: [5], scalars: [1, 2, 3, 4, 100])]), try resolve(ArceeFusionMerge(), [:], models: [[:]]))
    #expect(out.scalars == [0, 0, 0, 0, 100])
  }
}
