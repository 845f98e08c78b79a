import Foundation
import Tensor

/// mergekit's `nuslerp`: spherical interpolation of exactly two models (or of their task
/// vectors around an optional base, which is added back), with `t = w_2 / (w_1 + w_2)` from the
/// models' weights (0.5 when they sum to 0). The angle is taken over the whole flattened tensor
/// (`nuslerp_flatten`, the default), else per row (vectors along the last dimension) or, with
/// `nuslerp_row_wise`, per column (along the first). Nearly colinear vectors
/// (`1 - cos^2 <= 1e-16`) are interpolated linearly. Computed in `Double`. Outside mergekit's
/// rounding it streams: with one angle, a pass sums the two vectors' Gram matrix and the merge
/// is a weighted sum from the stored bytes; per row, a pass over blocks of whole rows takes each
/// row's coefficients; per column, two passes sum each column's norms, then its cosine.
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

  /// The Gram pass and the weighted sum for one angle, the row or column passes and a merger
  /// with each vector's coefficients otherwise; nil (merged whole) under mergekit's rounding.
  public func prepare(tensor name: String, shape: [Int], _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !p.arithmetic.isRounded else { return nil }
    let t = Self.fraction(p)
    guard Self.flattens(shape, p) else {
      let count = shape.reduce(1, *)
      if p.flag("nuslerp_row_wise") {
        return try columnMerger(scan, count: count, columns: count / max(shape[0], 1), t: t)
      }
      return try rowMerger(scan, count: count, width: shape[shape.count - 1], t: t)
    }
    let (gram, hasBase) = try scan.pointGram(models: 2)
    let nx = max(gram[0].squareRoot(), 1e-7)
    let ny = max(gram[3].squareRoot(), 1e-7)
    let (s0, s1) = Self.weights(cosine: min(1, max(-1, gram[1] / nx / ny)), t: t)
    return RangeMerger(
      WeightedSumForm(method: self.name, terms: [0, 1], weights: [s0, s1], addsBase: hasBase, subtractsBase: hasBase))
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    if !p.arithmetic.isRounded { return try mergeThroughRanges(inputs, p) }
    let shape = inputs.models[0].shape
    let count = shape.reduce(1, *)
    // The vectors interpolated: index lists into the flat tensors.
    let vectors: [[Int]]
    if Self.flattens(shape, p) {
      vectors = [Array(0..<count)]
    } else if p.flag("nuslerp_row_wise") {
      let rows = shape[0]
      let stride = count / max(rows, 1)
      vectors = (0..<stride).map { column in (0..<rows).map { $0 * stride + column } }
    } else {
      let width = shape[shape.count - 1]
      vectors = (0..<(count / max(width, 1))).map { row in Array((row * width)..<((row + 1) * width)) }
    }
    return Self.interpolateRounded(inputs, t: Self.fraction(p), vectors: vectors, arithmetic: p.arithmetic)
  }

  /// The interpolation's weights `(s0, s1)` for vectors at `cosine`: linear when nearly colinear.
  static func weights(cosine: Double, t: Double) -> (Double, Double) {
    guard 1 - cosine * cosine > 1e-16 else { return (1 - t, t) }
    let theta = acos(cosine)
    return (sin((1 - t) * theta) / sin(theta), sin(t * theta) / sin(theta))
  }

  /// Model `model`'s value at element `k` of `range` minus the base's (0 without one), in Double.
  @inline(__always)
  static func relative(_ range: RangeInputs, _ model: Int, _ k: Int) -> Double {
    Double(range.models[model][k]) - (range.base.map { Double($0[k]) } ?? 0)
  }

  /// `s0 x + s1 y` with the base added back (0 without one), rounded once.
  @inline(__always)
  static func interpolated(_ range: RangeInputs, _ k: Int, _ s0: Double, _ s1: Double) -> Float {
    Float(s0 * relative(range, 0, k) + s1 * relative(range, 1, k) + (range.base.map { Double($0[k]) } ?? 0))
  }

  /// Per-row angles (vectors along the last dimension, `width` long): one pass over blocks of
  /// whole rows gives each row's weights from its norms and cosine (each summed in order over
  /// the row: `(x_i / |x|) (y_i / |y|)`, as mergekit divides first); the merger applies them.
  func rowMerger(_ scan: TensorScan, count: Int, width: Int, t: Double) throws -> RangeMerger {
    guard width > 0 else { return RangeMerger { _ in [] } }
    var rowWeights: [(Double, Double)] = []
    rowWeights.reserveCapacity(count / width)
    let blocks = MergeRanges.rowBlocks(count, rowLength: width)
    try TensorScan(ranges: blocks, read: scan.read, release: scan.release).pass { block in
      (0..<(block.count / width)).map { row in
        let elements = (row * width)..<((row + 1) * width)
        let x = elements.map { Self.relative(block, 0, $0) }
        let y = elements.map { Self.relative(block, 1, $0) }
        let nx = max(x.reduce(0) { $0 + $1 * $1 }.squareRoot(), 1e-7)
        let ny = max(y.reduce(0) { $0 + $1 * $1 }.squareRoot(), 1e-7)
        let cosine = zip(x, y).reduce(0) { $0 + ($1.0 / nx) * ($1.1 / ny) }
        return Self.weights(cosine: min(1, max(-1, cosine)), t: t)
      }
    } combine: {
      rowWeights += $0
    }
    let weights = rowWeights
    return RangeMerger { range in
      (0..<range.count).map { k in
        let (s0, s1) = weights[(range.offset + k) / width]
        return Self.interpolated(range, k, s0, s1)
      }
    }
  }

  /// Per-column angles (vectors along the first dimension: element i is in column
  /// `i % columns`): a pass sums each column's squares in row order, a second its
  /// `(x_i / |x|) (y_i / |y|)`; both add in range order, so every sum is taken in row order as
  /// over the column alone. The merger applies each column's weights.
  func columnMerger(_ scan: TensorScan, count: Int, columns: Int, t: Double) throws -> RangeMerger {
    guard columns > 0 else { return RangeMerger { _ in [] } }
    var squares = [Double](repeating: 0, count: 2 * columns)
    try scan.pass { range in
      (range.offset, (0..<range.count).map { k in (Self.relative(range, 0, k), Self.relative(range, 1, k)) })
    } combine: { offset, values in
      for (k, (x, y)) in values.enumerated() {
        let column = (offset + k) % columns
        squares[2 * column] += x * x
        squares[2 * column + 1] += y * y
      }
    }
    let norms = (0..<columns).map {
      (max(squares[2 * $0].squareRoot(), 1e-7), max(squares[2 * $0 + 1].squareRoot(), 1e-7))
    }
    var cosines = [Double](repeating: 0, count: columns)
    try scan.pass { range in
      (
        range.offset,
        (0..<range.count).map { k in
          let (nx, ny) = norms[(range.offset + k) % columns]
          return (Self.relative(range, 0, k) / nx) * (Self.relative(range, 1, k) / ny)
        }
      )
    } combine: { offset, terms in
      for (k, term) in terms.enumerated() { cosines[(offset + k) % columns] += term }
    }
    let weights = cosines.map { Self.weights(cosine: min(1, max(-1, $0)), t: t) }
    return RangeMerger { range in
      (0..<range.count).map { k in
        let (s0, s1) = weights[(range.offset + k) % columns]
        return Self.interpolated(range, k, s0, s1)
      }
    }
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
