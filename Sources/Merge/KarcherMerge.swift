import Foundation
import Tensor

/// mergekit's `karcher`: the Karcher (Riemannian) mean of the models' directions on the unit
/// hypersphere, found by fixed-point iteration (at most `max_iter` steps, stopping when the
/// tangent step is below `tol`), scaled by the mean of their norms. Models with a norm at most
/// `tol` do not steer the direction. Equal weights; computed in `Double` on whole tensors.
public struct KarcherMerge: MergeMethod {
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
    let shape = inputs.models[0].shape
    let tol = p.number("tol")
    let points = inputs.models.map { $0.scalars.map(Double.init) }
    let count = points[0].count
    let alphas = [Double](repeating: 1 / Double(points.count), count: points.count)
    let norms = points.map { v in v.reduce(0) { $0 + $1 * $1 }.squareRoot() }
    let valid = norms.indices.filter { norms[$0] > tol }
    guard !valid.isEmpty else { return Tensor(shape: shape, scalars: [Float](repeating: 0, count: count)) }
    let units = valid.map { i in points[i].map { $0 / norms[i] } }
    let total = valid.reduce(0) { $0 + alphas[$1] }
    let weights = valid.map { alphas[$0] / total }
    func norm(_ v: [Double]) -> Double { v.reduce(0) { $0 + $1 * $1 }.squareRoot() }
    var mean = [Double](repeating: 0, count: count)
    for (u, w) in zip(units, weights) { for i in 0..<count { mean[i] += w * u[i] } }
    let meanNorm = norm(mean)
    mean = meanNorm < tol ? units[0] : mean.map { $0 / meanNorm }
    for _ in 0..<Int(p.number("max_iter")) {
      var tangent = [Double](repeating: 0, count: count)
      for (u, w) in zip(units, weights) {
        let dot = min(1, max(-1, zip(mean, u).reduce(0) { $0 + $1.0 * $1.1 }))
        let theta = acos(dot)
        if theta < tol { continue }
        let factor = w * theta / sin(theta)
        for i in 0..<count { tangent[i] += factor * (u[i] - dot * mean[i]) }
      }
      let step = norm(tangent)
      if step < tol { break }
      mean = (0..<count).map { cos(step) * mean[$0] + sin(step) * tangent[$0] / step }
      let length = norm(mean)
      if length > tol { mean = mean.map { $0 / length } }
    }
    let scale = zip(alphas, norms).reduce(0) { $0 + $1.0 * $1.1 }
    return Tensor(shape: shape, scalars: mean.map { Float(scale * $0) })
  }
}
