import Foundation
import Tensor

/// mergekit's `multislerp`: barycentric interpolation of several tensors on the hypersphere.
/// Each model (minus the base, when there is one) is flattened and normalised; their weighted
/// mean direction `m` is the tangent point; the weighted sum of the unit vectors' tangent
/// components at `m` is mapped back to the sphere with the exponential map and scaled by the
/// weighted mean of the norms (then the base is added back). Two exactly opposed inputs fall
/// back to the weighted sum. Computed in `Double`.
///
/// Every vector involved (the unit points, their mean, the tangent) is a combination of the
/// points, so the result is `sum_t k_t v_t` (plus the base) with coefficients found from the
/// points' Gram matrix `G_st = v_s . v_t`: one streamed pass sums `G`, and the merge is a weighted
/// sum, computed from the stored bytes like SLERP's. Under mergekit's rounding
/// (`MergeArithmetic.rounded`) the tensor is merged whole, each step rounded as mergekit's.
public struct MultiSLERPMerge: StreamingMerge {
  public init() {}
  public var name: String { "multislerp" }
  public var summary: String { "spherical barycentric interpolation of several models (optionally around a base)" }
  public var reference: String { "Goddard, Multi-SLERP (goddard.blog, 2025); mergekit's multislerp" }
  public var base: BaseRequirement { .optional }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number(
        "weight", .perModel, default: 1,
        help: "each model's weight (mergekit requires it; here equal weights by default)"),
      .flag("normalize_weights", default: true, help: "divide the weights by their sum"),
      .number("eps", .global, in: 0...1, default: 1e-8, help: "added to norms for stability"),
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    if inputs.models.count == 1 { return inputs.models[0] }
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    return try mergeThroughRanges(inputs, p)
  }

  /// The Gram pass, then the weighted sum; nil under mergekit's rounding (merged whole).
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !p.arithmetic.isRounded else { return nil }
    let models = p.models.count
    let (gram, hasBase) =
      models > 1 ? try scan.pointGram(models: models) : ([Double](repeating: 0, count: models * models), false)
    let coefficients = try self.coefficients(gram: gram, p, tensor: name)
    return RangeMerger(
      WeightedSumForm(
        method: self.name, terms: WeightedSumForm.models(models), weights: coefficients, addsBase: hasBase,
        subtractsBase: hasBase))
  }

  /// The coefficients `k_t` of the result `sum_t k_t v_t` from the points' Gram matrix (models x
  /// models, row-major): norms `n_t = sqrt G_tt`; the mean direction `sum_t a_t v_t / |.|` with
  /// `a_t = w_t / (n_t + eps)`; each unit point's dot with it; the tangent's coefficients and norm;
  /// the exponential map, scaled by the weighted mean norm.
  func coefficients(gram: [Double], _ p: ResolvedParameters, tensor: String) throws -> [Double] {
    let models = p.models.count
    guard models > 1 else { return [1] }
    var weights = (0..<models).map { p.number("weight", model: $0) }
    if p.flag("normalize_weights") {
      let total = weights.reduce(0, +)
      guard total != 0 else { throw MergeError.zeroWeightSum(method: name, tensor: tensor) }
      weights = weights.map { $0 / total }
    }
    let eps = p.number("eps")
    func quadratic(_ c: [Double]) -> Double {
      var total = 0.0
      for s in 0..<models { for t in 0..<models { total += c[s] * c[t] * gram[s * models + t] } }
      return max(total, 0)
    }
    let norms = (0..<models).map { gram[$0 * models + $0].squareRoot() }
    let a = (0..<models).map { weights[$0] / (norms[$0] + eps) }
    let meanNorm = quadratic(a).squareRoot()
    if meanNorm < eps {
      guard models == 2 else { throw MergeError.opposedInputs(method: name, tensor: tensor) }
      return weights
    }
    let mean = a.map { $0 / meanNorm }
    // Each unit point's dot with the mean direction, and the tangent sum_t w_t (u_t - dot_t mean).
    let dots = (0..<models).map { t in
      (0..<models).reduce(0.0) { $0 + mean[$1] * gram[t * models + $1] } / (norms[t] + eps)
    }
    let drift = zip(weights, dots).reduce(0.0) { $0 + $1.0 * $1.1 }
    let tangent = (0..<models).map { a[$0] - drift * mean[$0] }
    let tangentNorm = quadratic(tangent).squareRoot() + eps
    let averageNorm = zip(norms, weights).reduce(0.0) { $0 + $1.0 * $1.1 }
    let (c, s) = (cos(tangentNorm), sin(tangentNorm) / tangentNorm)
    return (0..<models).map { (mean[$0] * c + tangent[$0] * s) * averageNorm }
  }

  /// mergekit's torch operations, each rounded (`MergeArithmetic.rounded`), on the whole
  /// tensor (`RoundedMultiSLERP`).
  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    let r = p.arithmetic
    var weights = inputs.models.indices.map { r.round(Float(p.number("weight", model: $0))) }
    if p.flag("normalize_weights") {
      let total = r.round(weights.reduce(0.0) { $0 + Double($1) })
      guard total != 0 else { throw MergeError.zeroWeightSum(method: name, tensor: inputs.name) }
      weights = weights.map { r.round($0 / total) }
    }
    let merged = try r.withRule(
      RoundedMultiSLERP(
        points: inputs.relativeToBase(r), base: inputs.base?.scalars, weights: weights, eps: Float(p.number("eps")),
        tensor: inputs.name, method: name))
    return Tensor(shape: inputs.models[0].shape, scalars: merged)
  }
}

/// Multi-SLERP as mergekit computes it in a narrow dtype, each torch operation rounded: the
/// norms and dot products are sums in `Double` (`Elementwise.sum`), rounded once; each sum
/// over the models is in `Double`, in model order, rounded once. The unit points are formed
/// again where a sweep reads them rather than held; the sweeps run over the blocks on all cores.
struct RoundedMultiSLERP: RoundedComputation {
  /// The models minus the base (rounded), or the models.
  let points: [[Float]]
  let base: [Float]?
  /// The rounded (and normalised) weights.
  let weights: [Float]
  let eps: Float
  let tensor: String
  let method: String

  func callAsFunction<R: RoundingRule>(_: R.Type) throws(MergeError) -> [Float] {
    typealias S = RoundedSweeps
    let count = points[0].count
    let norms = points.map { R.round(S.length($0)) }
    let divisors = norms.map { R.round($0 + eps) }
    let weights = self.weights
    var mean = [Float](repeating: 0, count: count)
    var tangent = [Float](repeating: 0, count: count)
    var opposed = false
    points.withUnsafeBufferPointers { v in
      mean.withUnsafeMutableBufferPointer { meanBuffer in
        tangent.withUnsafeMutableBufferPointer { tangentBuffer in
          guard let m = meanBuffer.baseAddress, let t = tangentBuffer.baseAddress else { return }
          Elementwise.forEachBlock(count) { r in
            for i in r {
              var sum = 0.0
              for (a, point) in v.enumerated() { sum += Double(R.round(R.round(point[i] / divisors[a]) * weights[a])) }
              m[i] = R.round(sum)
            }
          }
          let meanNorm = R.round(S.length(m, count: count))
          if meanNorm < eps {
            opposed = true
            return
          }
          Elementwise.forEachBlock(count) { r in for i in r { m[i] = R.round(m[i] / meanNorm) } }
          let dots = v.enumerated().map { a, point in
            R.round(
              Elementwise.sumOfBlocks(count) {
                Elementwise.blockSum($0) { Double(R.round(R.round(point[$0] / divisors[a]) * m[$0])) }
              })
          }
          Elementwise.forEachBlock(count) { r in
            for i in r {
              var sum = 0.0
              for (a, point) in v.enumerated() {
                let unit = R.round(point[i] / divisors[a])
                sum += Double(R.round(R.round(unit - R.round(dots[a] * m[i])) * weights[a]))
              }
              t[i] = R.round(sum)
            }
          }
          let tangentNorm = R.round(R.round(S.length(t, count: count)) + eps)
          let cosine = R.round(Float(cos(Double(tangentNorm))))
          let scale = R.round(R.round(Float(sin(Double(tangentNorm)))) / tangentNorm)
          var normSum = 0.0
          for (n, w) in zip(norms, weights) { normSum += Double(R.round(n * w)) }
          let averageNorm = R.round(normSum)
          Elementwise.forEachBlock(count) { r in
            for i in r { m[i] = R.round(R.round(R.round(m[i] * cosine) + R.round(t[i] * scale)) * averageNorm) }
          }
        }
      }
    }
    if opposed {
      guard points.count == 2 else { throw MergeError.opposedInputs(method: method, tensor: tensor) }
      mean = (0..<count).map { R.round(R.round(points[0][$0] * weights[0]) + R.round(points[1][$0] * weights[1])) }
    }
    guard let base else { return mean }
    return zip(mean, base).map { R.round($0 + $1) }
  }
}
