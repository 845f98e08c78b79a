import Foundation
import Tensor

/// mergekit's `nuslerp`: spherical interpolation of exactly two models (or of their task
/// vectors around an optional base, which is added back), with `t = w_2 / (w_1 + w_2)` from the
/// models' weights (0.5 when they sum to 0). The angle is taken over the whole flattened tensor
/// (`nuslerp_flatten`, the default), else per row (vectors along the last dimension) or, with
/// `nuslerp_row_wise`, per column (along the first). Nearly colinear vectors
/// (`1 - cos^2 <= 1e-16`) are interpolated linearly. Computed in `Double`. With one angle for
/// the whole tensor (and outside mergekit's rounding) it streams: a pass sums the two vectors'
/// Gram matrix, and the merge is a weighted sum from the stored bytes; per-row angles merge the
/// tensor whole.
public struct NuSLERPMerge: StreamingMerge {
  public init() {}
  public var name: String { "nuslerp" }
  public var summary: String { "spherical interpolation of two models by their weights, optionally around a base" }
  public var reference: String { "mergekit's nuslerp (Goddard et al., arXiv:2403.13257)" }
  public var base: BaseRequirement { .optional }
  public var modelCount: ClosedRange<Int> { 2...2 }
  public var parameters: [ParameterSpec] {
    [
      .number("weight", .perModel, default: 1, help: "each model's weight; t = w2 / (w1 + w2)"),
      .flag("nuslerp_flatten", default: true, help: "one angle for the whole tensor"),
      .flag("nuslerp_row_wise", default: false, help: "without flatten: vectors along the first dimension"),
    ]
  }

  /// Whether the tensor takes one angle as a whole (`nuslerp_flatten`, or a vector).
  static func flattens(_ shape: [Int], _ p: ResolvedParameters) -> Bool {
    p.flag("nuslerp_flatten") || shape.count < 2
  }

  /// `t` from the models' weights.
  static func fraction(_ p: ResolvedParameters) -> Double {
    let (w0, w1) = (p.number("weight", model: 0), p.number("weight", model: 1))
    return abs(w0 + w1) < 1e-6 ? 0.5 : w1 / (w0 + w1)
  }

  /// As a vector (one angle): `prepare(tensor:shape:)` is the one the runner calls.
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    try prepare(tensor: name, shape: [count], p, scan: scan)
  }

  /// The Gram pass and the weighted sum; nil (merged whole) for per-row angles or under
  /// mergekit's rounding.
  public func prepare(tensor name: String, shape: [Int], _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !p.arithmetic.isRounded, Self.flattens(shape, p) else { return nil }
    let (gram, hasBase) = try scan.pointGram(models: 2)
    let t = Self.fraction(p)
    let nx = max(gram[0].squareRoot(), 1e-7)
    let ny = max(gram[3].squareRoot(), 1e-7)
    let cosine = min(1, max(-1, gram[1] / nx / ny))
    let colinear = 1 - cosine * cosine <= 1e-16
    let theta = colinear ? 0 : acos(cosine)
    let (s0, s1) = colinear ? (1 - t, t) : (sin((1 - t) * theta) / sin(theta), sin(t * theta) / sin(theta))
    return RangeMerger(
      WeightedSumForm(method: self.name, terms: [0, 1], weights: [s0, s1], addsBase: hasBase, subtractsBase: hasBase))
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    let shape = inputs.models[0].shape
    if !p.arithmetic.isRounded && Self.flattens(shape, p) { return try mergeThroughRanges(inputs, p) }
    let t = Self.fraction(p)
    let base = inputs.base.map { $0.scalars.map(Double.init) }
    let (a, b) = (inputs.models[0].scalars, inputs.models[1].scalars)
    let v0 = a.indices.map { Double(a[$0]) - (base?[$0] ?? 0) }
    let v1 = b.indices.map { Double(b[$0]) - (base?[$0] ?? 0) }
    // The vectors interpolated: index lists into the flat tensors.
    let count = v0.count
    let vectors: [[Int]]
    if p.flag("nuslerp_flatten") || shape.count < 2 {
      vectors = [Array(0..<count)]
    } else if p.flag("nuslerp_row_wise") {
      let rows = shape[0]
      let stride = count / max(rows, 1)
      vectors = (0..<stride).map { column in (0..<rows).map { $0 * stride + column } }
    } else {
      let width = shape[shape.count - 1]
      vectors = (0..<(count / max(width, 1))).map { row in Array((row * width)..<((row + 1) * width)) }
    }
    if p.arithmetic.isRounded {
      return Self.interpolateRounded(
        inputs, t: t, vectors: vectors, arithmetic: p.arithmetic)
    }
    var out = [Double](repeating: 0, count: count)
    for indices in vectors {
      let x = indices.map { v0[$0] }
      let y = indices.map { v1[$0] }
      let nx = max(x.reduce(0) { $0 + $1 * $1 }.squareRoot(), 1e-7)
      let ny = max(y.reduce(0) { $0 + $1 * $1 }.squareRoot(), 1e-7)
      let cosine = min(1, max(-1, zip(x, y).reduce(0) { $0 + ($1.0 / nx) * ($1.1 / ny) }))
      let colinear = 1 - cosine * cosine <= 1e-16
      let theta = colinear ? 0 : acos(cosine)
      let (s0, s1) = colinear ? (1 - t, t) : (sin((1 - t) * theta) / sin(theta), sin(t * theta) / sin(theta))
      for (k, i) in indices.enumerated() { out[i] = s0 * x[k] + s1 * y[k] }
    }
    return Tensor(shape: shape, scalars: out.enumerated().map { i, v in Float(v + (base?[i] ?? 0)) })
  }

  /// NuSLERP as mergekit computes it in a narrow dtype, vector by vector: the task vectors, the
  /// normalised vectors, the cosine, the angle and its sines, each product and the sum rounded
  /// to it (reductions accumulate in float and round once); the clamps' bounds are cast to it.
  static func interpolateRounded(_ inputs: MergeInputs, t: Double, vectors: [[Int]], arithmetic r: MergeArithmetic)
    -> Tensor
  {
    let base = inputs.base?.scalars
    let relative = inputs.relativeToBase(r)
    let (v0, v1) = (relative[0], relative[1])
    let floor = r.round(Float(1e-7))
    let tolerance = r.round(Float(1e-16))
    let (keep, take) = (Float(1 - t), Float(t))
    var out = [Float](repeating: 0, count: v0.count)
    for indices in vectors {
      func unit(_ v: [Float]) -> [Float] {
        let n = max(r.round(indices.reduce(0.0) { $0 + Double(v[$1]) * Double(v[$1]) }.squareRoot()), floor)
        return indices.map { r.round(v[$0] / n) }
      }
      let (x, y) = (unit(v0), unit(v1))
      let cosine = min(1, max(-1, r.round(zip(x, y).reduce(0.0) { $0 + Double(r.round($1.0 * $1.1)) })))
      let colinear = r.round(1 - r.round(cosine * cosine)) <= tolerance
      if colinear {
        for i in indices { out[i] = r.round(r.round(keep * v0[i]) + r.round(take * v1[i])) }
        continue
      }
      let theta = r.round(Float(acos(Double(cosine))))
      let sine = r.round(Float(sin(Double(theta))))
      let s0 = r.round(Float(sin(Double(r.round(keep * theta)))))
      let s1 = r.round(Float(sin(Double(r.round(take * theta)))))
      for i in indices { out[i] = r.round(r.round(r.round(s0 * v0[i]) + r.round(s1 * v1[i])) / sine) }
    }
    if let base { out = zip(out, base).map { r.round($0 + $1) } }
    return Tensor(shape: inputs.models[0].shape, scalars: out)
  }
}
