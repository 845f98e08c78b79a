import Foundation
import Tensor

/// Spherical linear interpolation between the base (t = 0) and one model (t = 1), per tensor on
/// the flattened values: the angle comes from the normalised tensors, the interpolation weights
/// apply to the original ones (norms are not re-imposed). Nearly colinear tensors (|cos| >
/// 0.9995) fall back to linear interpolation. As mergekit's `slerp`.
public struct SlerpMerge: MergeMethod {
  public init() {}
  public var name: String { "slerp" }
  public var summary: String { "spherical interpolation between the base (t=0) and one model (t=1)" }
  public var reference: String { "Shoemake, Animating Rotation with Quaternion Curves, SIGGRAPH 1985; mergekit's slerp" }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...1 }
  public var parameters: [ParameterSpec] {
    [.number("t", .global, in: 0...1, default: nil, help: "interpolation factor: 0 gives the base, 1 the other model")]
  }

  /// Above this |cos| the tensors are treated as colinear and interpolated linearly.
  static let colinearThreshold = 0.9995

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let v0 = inputs.base else { throw MergeError.baseRequired(method: name) }
    let v1 = inputs.models[0]
    let t = p.number("t")
    let n = v0.count
    let norm0 = Elementwise.sum(n) { Double(v0.scalars[$0]) * Double(v0.scalars[$0]) }.squareRoot()
    let norm1 = Elementwise.sum(n) { Double(v1.scalars[$0]) * Double(v1.scalars[$0]) }.squareRoot()
    let dot = Elementwise.sum(n) { Double(v0.scalars[$0]) * Double(v1.scalars[$0]) }
    // A tensor with norm <= 1e-8 is left unnormalised, as mergekit does.
    let cosine = dot / (norm0 > 1e-8 ? norm0 : 1) / (norm1 > 1e-8 ? norm1 : 1)
    let (s0, s1): (Double, Double)
    if abs(cosine) > Self.colinearThreshold {
      (s0, s1) = (1 - t, t)
    } else {
      let theta = acos(min(1, max(-1, cosine)))
      let sine = sin(theta)
      (s0, s1) = (sin((1 - t) * theta) / sine, sin(t * theta) / sine)
    }
    let merged = Elementwise.map(n) { Float(s0 * Double(v0.scalars[$0]) + s1 * Double(v1.scalars[$0])) }
    return Tensor(shape: v0.shape, scalars: merged)
  }
}
