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
}
