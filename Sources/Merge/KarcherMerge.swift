import Foundation
import Tensor

/// mergekit's `karcher`: the Karcher (Riemannian) mean of the models' directions on the unit
/// hypersphere, found by fixed-point iteration (at most `max_iter` steps, stopping when the
/// tangent step is below `tol`), scaled by the mean of their norms. Models with a norm at most
/// `tol` do not steer the direction. Equal weights; computed in `Double`.
///
/// Every iterate stays in the span of the models' directions, so the iteration runs on
/// coefficients over them, with dot products from the models' Gram matrix: one streamed pass
/// sums it, and the merge is a weighted sum of the models, computed from the stored bytes. Under
/// mergekit's rounding in bf16 or f16 the tensor is merged whole, each step rounded as mergekit's.
public struct KarcherMerge: StreamingMerge {
  public init() {}
  public var name: String { "karcher" }
  public var summary: String { "Karcher mean of the models' directions on the hypersphere, times their mean norm" }
  public var reference: String {
    "Karcher, Riemannian center of mass, CPAM 1977 (arXiv:2603.04972); mergekit's karcher"
  }
  public var base: BaseRequirement { .unused }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number("max_iter", .global, in: 1...10_000, default: 10, help: "most fixed-point iterations (an integer)"),
      .number("tol", .global, in: 0...1, default: 1e-5, help: "convergence and zero-norm tolerance"),
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    if inputs.models.count == 1 { return inputs.models[0] }
    if Self.roundsSteps(p) { return mergeRounded(inputs, p) }
    return try mergeThroughRanges(MergeInputs(name: inputs.name, base: nil, models: inputs.models), p)
  }

  /// Whether mergekit's rounding applies (bf16 or f16 compute): then the tensor is merged whole.
  static func roundsSteps(_ p: ResolvedParameters) -> Bool {
    if case .rounded(let dtype) = p.arithmetic, dtype == .bf16 || dtype == .f16 { return true }
    return false
  }

  /// The Gram pass, then the weighted sum; nil under mergekit's rounding (merged whole).
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !Self.roundsSteps(p) else { return nil }
    let models = p.models.count
    guard models > 1 else {
      return RangeMerger(WeightedSumForm(method: self.name, terms: [0], weights: [1]))
    }
    let gram = try scan.pointGram(models: models, ignoringBase: true).gram
    guard let weights = coefficients(gram: gram, models: models, p) else {
      // Every model has a norm within tol: zeros.
      return RangeMerger { range in [Float](repeating: 0, count: range.count) }
    }
    return RangeMerger(WeightedSumForm(method: self.name, terms: WeightedSumForm.models(models), weights: weights))
  }

  /// The Karcher iteration on coefficients: the mean direction is `sum_j c_j u_j` over the
  /// directions `u_j = v_j / n_j` of the models whose norm exceeds `tol`, with `u_i . u_j =
  /// G_ij / (n_i n_j)`. Returns each model's weight in the result (`scale c_j / n_j`, 0 for the
  /// others), or nil when no model's norm exceeds `tol`.
  func coefficients(gram: [Double], models: Int, _ p: ResolvedParameters) -> [Double]? {
    let tol = p.number("tol")
    let alphas = [Double](repeating: 1 / Double(models), count: models)
    let norms = (0..<models).map { gram[$0 * models + $0].squareRoot() }
    let valid = norms.indices.filter { norms[$0] > tol }
    guard !valid.isEmpty else { return nil }
    let v = valid.count
    // The directions' Gram matrix.
    var units = [Double](repeating: 0, count: v * v)
    for (a, i) in valid.enumerated() {
      for (b, j) in valid.enumerated() { units[a * v + b] = gram[i * models + j] / (norms[i] * norms[j]) }
    }
    func times(_ c: [Double]) -> [Double] {
      (0..<v).map { a in (0..<v).reduce(0.0) { $0 + units[a * v + $1] * c[$1] } }
    }
    func norm(_ c: [Double]) -> Double { max(zip(c, times(c)).reduce(0.0) { $0 + $1.0 * $1.1 }, 0).squareRoot() }
    let total = valid.reduce(0) { $0 + alphas[$1] }
    let weights = valid.map { alphas[$0] / total }
    var mean = weights
    let meanNorm = norm(mean)
    mean = meanNorm < tol ? (0..<v).map { $0 == 0 ? 1 : 0 } : mean.map { $0 / meanNorm }
    for _ in 0..<Int(p.number("max_iter")) {
      var tangent = [Double](repeating: 0, count: v)
      let dots = times(mean)
      for a in 0..<v {
        let dot = min(1, max(-1, dots[a]))
        let theta = acos(dot)
        if theta < tol { continue }
        let factor = weights[a] * theta / sin(theta)
        for b in 0..<v { tangent[b] += factor * ((a == b ? 1 : 0) - dot * mean[b]) }
      }
      let step = norm(tangent)
      if step < tol { break }
      mean = (0..<v).map { cos(step) * mean[$0] + sin(step) * tangent[$0] / step }
      let length = norm(mean)
      if length > tol { mean = mean.map { $0 / length } }
    }
    let scale = zip(alphas, norms).reduce(0) { $0 + $1.0 * $1.1 }
    var result = [Double](repeating: 0, count: models)
    for (a, i) in valid.enumerated() { result[i] = scale * mean[a] / norms[i] }
    return result
  }

  /// mergekit's iteration with each torch operation rounded (`MergeArithmetic.rounded`), on the
  /// whole tensor (`RoundedKarcher`).
  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) -> Tensor {
    let points = inputs.models.map(\.scalars)
    let merged = p.arithmetic.withRule(
      RoundedKarcher(points: points, tol: p.number("tol"), iterations: Int(p.number("max_iter"))))
    return Tensor(shape: inputs.models[0].shape, scalars: merged)
  }
}

/// Karcher's iteration as mergekit computes it in a narrow dtype, each torch operation rounded:
/// the norms and dot products are sums in `Double` (`Elementwise.sum`), rounded once; every
/// elementwise step is rounded. Sweeps over buffers allocated once, on all cores.
struct RoundedKarcher: RoundedComputation {
  let points: [[Float]]
  let tol: Double
  let iterations: Int

  func callAsFunction<R: RoundingRule>(_: R.Type) -> [Float] {
    typealias S = RoundedSweeps
    let count = points[0].count
    let alphas = [Double](repeating: 1 / Double(points.count), count: points.count)
    let norms = points.map(S.norm)
    let valid = norms.indices.filter { Double(norms[$0]) > tol }
    guard !valid.isEmpty else { return [Float](repeating: 0, count: count) }
    let total = valid.reduce(0) { $0 + alphas[$1] }
    let weights = valid.map { Float(alphas[$0] / total) }
    var scale: Float = 0
    for (alpha, n) in zip(alphas, norms) { scale += Float(alpha) * n }
    var mean = [Float](repeating: 0, count: count)
    var tangent = [Float](repeating: 0, count: count)
    // Unit point a's element i, `R.round(p[i] / n)`, is formed where a sweep reads it.
    let validPoints = valid.map { points[$0] }
    let divisors = valid.map { norms[$0] }
    validPoints.withUnsafeBufferPointers { point in
      mean.withUnsafeMutableBufferPointer { meanBuffer in
        tangent.withUnsafeMutableBufferPointer { tangentBuffer in
          guard let m = meanBuffer.baseAddress, let t = tangentBuffer.baseAddress else { return }
          for (a, w) in weights.enumerated() {
            let (p, n) = (point[a], divisors[a])
            Elementwise.forEachBlock(count) { r in for i in r { m[i] = R.round(m[i] + R.round(w * R.round(p[i] / n))) }
            }
          }
          let meanNorm = S.norm(m, count: count)
          if Double(meanNorm) < tol {
            let (p, n) = (point[0], divisors[0])
            Elementwise.forEachBlock(count) { r in for i in r { m[i] = R.round(p[i] / n) } }
          } else {
            Elementwise.forEachBlock(count) { r in for i in r { m[i] = R.round(m[i] / meanNorm) } }
          }
          for _ in 0..<iterations {
            t.update(repeating: 0, count: count)
            for (a, w) in weights.enumerated() {
              let (p, n) = (point[a], divisors[a])
              let dot = min(
                1,
                max(
                  -1,
                  R.round(
                    Elementwise.sumOfBlocks(count) {
                      Elementwise.blockSum($0) { Double(m[$0]) * Double(R.round(p[$0] / n)) }
                    }
                  )))
              let theta = R.round(Float(acos(Double(dot))))
              if Double(theta) < tol { continue }
              let factor = R.round(w * R.round(theta / R.round(Float(sin(Double(theta))))))
              Elementwise.forEachBlock(count) { r in
                for i in r { t[i] = R.round(t[i] + R.round(factor * R.round(R.round(p[i] / n) - R.round(dot * m[i])))) }
              }
            }
            let step = S.norm(t, count: count)
            if Double(step) < tol { break }
            let (c, s) = (Float(cos(Double(step))), Float(sin(Double(step))))
            Elementwise.forEachBlock(count) { r in
              for i in r { m[i] = R.round(R.round(c * m[i]) + R.round(s * R.round(t[i] / step))) }
            }
            let length = S.norm(m, count: count)
            if Double(length) > tol {
              Elementwise.forEachBlock(count) { r in for i in r { m[i] = R.round(m[i] / length) } }
            }
          }
          Elementwise.forEachBlock(count) { r in for i in r { m[i] = R.round(scale * m[i]) } }
        }
      }
    }
    return mean
  }
}
