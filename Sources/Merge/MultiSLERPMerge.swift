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

  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    let r = p.arithmetic
    let shape = inputs.models[0].shape
    let base = inputs.base?.scalars
    let points = inputs.relativeToBase(r)
    let count = points[0].count
    var weights = inputs.models.indices.map { r.round(Float(p.number("weight", model: $0))) }
    if p.flag("normalize_weights") {
      let total = r.round(weights.reduce(0.0) { $0 + Double($1) })
      guard total != 0 else { throw MergeError.zeroWeightSum(method: name, tensor: inputs.name) }
      weights = weights.map { r.round($0 / total) }
    }
    let eps = Float(p.number("eps"))
    func norm(_ v: [Float]) -> Float { r.round(v.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()) }
    /// `sum_i values[i][j] * w_i` over the models, each product rounded, the sum rounded once.
    func weightedSum(_ values: [[Float]]) -> [Float] {
      (0..<count).map { j in r.round(zip(values, weights).reduce(0.0) { $0 + Double(r.round($1.0[j] * $1.1)) }) }
    }
    func finish(_ values: [Float]) -> Tensor {
      Tensor(shape: shape, scalars: base.map { zip(values, $0).map { r.round($0 + $1) } } ?? values)
    }
    let norms = points.map(norm)
    let units = zip(points, norms).map { v, n in
      let divisor = r.round(n + eps)
      return v.map { r.round($0 / divisor) }
    }
    var mean = weightedSum(units)
    let meanNorm = norm(mean)
    if meanNorm < eps {
      guard points.count == 2 else { throw MergeError.opposedInputs(method: name, tensor: inputs.name) }
      return finish(
        (0..<count).map { r.round(r.round(points[0][$0] * weights[0]) + r.round(points[1][$0] * weights[1])) })
    }
    mean = mean.map { r.round($0 / meanNorm) }
    let tangents = units.map { u -> [Float] in
      let dot = r.round(zip(u, mean).reduce(0.0) { $0 + Double(r.round($1.0 * $1.1)) })
      return zip(u, mean).map { r.round($0 - r.round(dot * $1)) }
    }
    let tangent = weightedSum(tangents)
    let tangentNorm = r.round(norm(tangent) + eps)
    let cosine = r.round(Float(cos(Double(tangentNorm))))
    let scale = r.round(r.round(Float(sin(Double(tangentNorm)))) / tangentNorm)
    let averageNorm = r.round(zip(norms, weights).reduce(0.0) { $0 + Double(r.round($1.0 * $1.1)) })
    return finish(
      (0..<count).map { j in r.round(r.round(r.round(mean[j] * cosine) + r.round(tangent[j] * scale)) * averageNorm) })
  }
}
