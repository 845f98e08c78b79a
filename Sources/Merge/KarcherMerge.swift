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
    if case .rounded(let dtype) = p.arithmetic, dtype == .bf16 || dtype == .f16 { return mergeRounded(inputs, p) }
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

  /// The Karcher mean as mergekit computes it for half-precision tensors: norms in float32,
  /// the directions, the running mean and every element-wise step in the compute dtype (each
  /// rounded), dot products accumulated in float and rounded; the same iterations and stops.
  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) -> Tensor {
    let r = p.arithmetic
    let tol = p.number("tol")
    let shape = inputs.models[0].shape
    let points = inputs.models.map(\.scalars)
    let count = points[0].count
    let zeros = [Float](repeating: 0, count: count)
    let alphas = [Double](repeating: 1 / Double(points.count), count: points.count)
    func norm(_ v: [Float]) -> Float { Float(v.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()) }
    let norms = points.map(norm)
    let valid = norms.indices.filter { Double(norms[$0]) > tol }
    guard !valid.isEmpty else { return Tensor(shape: shape, scalars: zeros) }
    let units = valid.map { i in points[i].map { r.round($0 / norms[i]) } }
    let total = valid.reduce(0) { $0 + alphas[$1] }
    let weights = valid.map { Float(alphas[$0] / total) }
    var mean = zeros
    for (u, w) in zip(units, weights) { for i in 0..<count { mean[i] = r.round(mean[i] + r.round(w * u[i])) } }
    let meanNorm = norm(mean)
    mean = Double(meanNorm) < tol ? units[0] : mean.map { r.round($0 / meanNorm) }
    for _ in 0..<Int(p.number("max_iter")) {
      var tangent = zeros
      for (u, w) in zip(units, weights) {
        let dot = min(1, max(-1, r.round(zip(mean, u).reduce(0.0) { $0 + Double($1.0) * Double($1.1) })))
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
    return Tensor(shape: shape, scalars: mean.map { r.round(scale * $0) })
  }
}
