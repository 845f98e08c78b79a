import Foundation
import Tensor

/// Spherical linear interpolation between the base (t = 0) and one model (t = 1), per tensor on
/// the flattened values: the angle comes from the normalised tensors, the interpolation weights
/// apply to the original ones (norms are not re-imposed). Nearly colinear tensors (|cos| >
/// 0.9995) fall back to linear interpolation. As mergekit's `slerp`.
public struct SlerpMerge: StreamingMerge {
  public init() {}
  public var name: String { "slerp" }
  public var summary: String { "spherical interpolation between the base (t=0) and one model (t=1)" }
  public var reference: String {
    "Shoemake, Animating Rotation with Quaternion Curves, SIGGRAPH 1985; mergekit's slerp"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...1 }
  public var parameters: [ParameterSpec] {
    [.number("t", .global, in: 0...1, default: nil, help: "interpolation factor: 0 gives the base, 1 the other model")]
  }

  /// Above this |cos| the tensors are treated as colinear and interpolated linearly.
  static let colinearThreshold = 0.9995

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard inputs.base != nil else { throw MergeError.baseRequired(method: name) }
    return try mergeThroughRanges(inputs, p)
  }

  /// One pass for the two norms and the dot product (in Double, one sweep per range over the
  /// stored bytes), then every range is `s0 v0 + s1 v1` with the tensor's coefficients.
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger?
  {
    let t = p.number("t")
    var (norm0, norm1, dot) = (0.0, 0.0, 0.0)
    // The stored base and model, decoded inside the sweep.
    try scan.storedPass { inputs, elements in
      guard inputs.count == 2 else { throw MergeError.baseRequired(method: self.name) }
      return Kernels.dotsOfPair(inputs[0], inputs[1], count: elements.count)
    } combine: { sums in
      norm0 += sums.aa
      norm1 += sums.bb
      dot += sums.ab
    }
    (norm0, norm1) = (norm0.squareRoot(), norm1.squareRoot())
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
    if p.arithmetic.isRounded {
      // mergekit computes `coef_a * x + coef_b * y` as float32 tensors, each product rounded.
      let (c0, c1) = (Float(s0), Float(s1))
      return RangeMerger { range in
        guard let v0 = range.base else { throw MergeError.baseRequired(method: self.name) }
        return zip(v0, range.models[0]).map { c0 * $0 + c1 * $1 }
      }
    }
    return RangeMerger(WeightedSumForm(method: self.name, terms: [nil, 0], weights: [s0, s1]))
  }
}
