import Foundation
import Tensor

/// mergekit's `multislerp`: barycentric interpolation of several tensors on the hypersphere.
/// Each model (minus the base, when there is one) is flattened and normalised; their weighted
/// mean direction `m` is the tangent point; the weighted sum of the unit vectors' tangent
/// components at `m` is mapped back to the sphere with the exponential map and scaled by the
/// weighted mean of the norms (then the base is added back). Two exactly opposed inputs fall
/// back to the weighted sum. Computed in `Double` on whole tensors.
public struct MultiSLERPMerge: MergeMethod {
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
    let shape = inputs.models[0].shape
    if inputs.models.count == 1 { return inputs.models[0] }
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    let base = inputs.base.map { $0.scalars.map(Double.init) }
    let points = inputs.models.map { model in
      model.scalars.enumerated().map { i, x in Double(x) - (base?[i] ?? 0) }
    }
    var weights = inputs.models.indices.map { p.number("weight", model: $0) }
    if p.flag("normalize_weights") {
      let total = weights.reduce(0, +)
      guard total != 0 else { throw MergeError.zeroWeightSum(method: name, tensor: inputs.name) }
      weights = weights.map { $0 / total }
    }
    let eps = p.number("eps")
    let count = points[0].count
    let norms = points.map { v in v.reduce(0) { $0 + $1 * $1 }.squareRoot() }
    let units = zip(points, norms).map { v, n in v.map { $0 / (n + eps) } }
    var mean = [Double](repeating: 0, count: count)
    for (u, w) in zip(units, weights) { for i in 0..<count { mean[i] += w * u[i] } }
    let meanNorm = mean.reduce(0) { $0 + $1 * $1 }.squareRoot()
    func finish(_ values: [Double]) -> Tensor {
      Tensor(shape: shape, scalars: values.enumerated().map { i, x in Float(x + (base?[i] ?? 0)) })
    }
    if meanNorm < eps {
      guard points.count == 2 else { throw MergeError.opposedInputs(method: name, tensor: inputs.name) }
      return finish((0..<count).map { points[0][$0] * weights[0] + points[1][$0] * weights[1] })
    }
    mean = mean.map { $0 / meanNorm }
    var tangent = [Double](repeating: 0, count: count)
    for (u, w) in zip(units, weights) {
      let dot = zip(u, mean).reduce(0) { $0 + $1.0 * $1.1 }
      for i in 0..<count { tangent[i] += w * (u[i] - dot * mean[i]) }
    }
    let tangentNorm = tangent.reduce(0) { $0 + $1 * $1 }.squareRoot() + eps
    let averageNorm = zip(norms, weights).reduce(0) { $0 + $1.0 * $1.1 }
    let (c, s) = (cos(tangentNorm), sin(tangentNorm) / tangentNorm)
    return finish((0..<count).map { (mean[$0] * c + tangent[$0] * s) * averageNorm })
  }

  /// Multi-SLERP as mergekit computes it in a narrow dtype: every element-wise product,
  /// quotient and difference rounded to it, each reduction (norms, the weighted sums over the
  /// models, the dot products) accumulated in float and rounded once.
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
