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
    // The vectors interpolated, as strided runs of the flat tensors.
    let layout: RoundedNuSLERP.Layout
    if Self.flattens(shape, p) {
      layout = .init(vectors: 1, length: count, step: 1, spacing: 0)
    } else if p.flag("nuslerp_row_wise") {
      let rows = shape[0]
      layout = .init(vectors: count / max(rows, 1), length: rows, step: count / max(rows, 1), spacing: 1)
    } else {
      let width = shape[shape.count - 1]
      layout = .init(vectors: count / max(width, 1), length: width, step: 1, spacing: width)
    }
    let r = p.arithmetic
    let relative = inputs.relativeToBase(r)
    let merged = r.withRule(
      RoundedNuSLERP(
        first: relative[0], second: relative[1], base: inputs.base?.scalars, t: Self.fraction(p), layout: layout))
    return Tensor(shape: shape, scalars: merged)
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
}

/// NuSLERP as mergekit computes it in a narrow dtype, vector by vector: the task vectors, the
/// normalised vectors, the cosine, the angle and its sines, each product and the sum rounded to
/// it (reductions accumulate in `Double`, element by element in order, and round once); the
/// clamps' bounds are cast to it. The normalised vectors are formed again where they are read;
/// the vectors run side by side on all cores.
struct RoundedNuSLERP: RoundedComputation {
  /// Vector k is elements `k * spacing + j * step` for j in `0..<length` of the flat tensors.
  struct Layout {
    let vectors: Int
    let length: Int
    let step: Int
    let spacing: Int
  }

  let first: [Float]
  let second: [Float]
  let base: [Float]?
  let t: Double
  let layout: Layout

  func callAsFunction<R: RoundingRule>(_: R.Type) -> [Float] {
    let count = first.count
    let floor = R.round(Float(1e-7))
    let tolerance = R.round(Float(1e-16))
    let (keep, take) = (Float(1 - t), Float(t))
    let layout = self.layout
    var out = [Float](repeating: 0, count: count)
    let perItem = max(1, Elementwise.blockSize / max(layout.length, 1))
    out.withUnsafeMutableBufferPointer { outBuffer in
      first.withUnsafeBufferPointer { firstBuffer in
        second.withUnsafeBufferPointer { secondBuffer in
          guard let o = outBuffer.baseAddress, let v0 = firstBuffer.baseAddress, let v1 = secondBuffer.baseAddress
          else { return }
          try? Parallel.forEach((layout.vectors + perItem - 1) / perItem) { _, item in
            for k in (item * perItem)..<min(layout.vectors, (item + 1) * perItem) {
              let start = k * layout.spacing
              let (length, step) = (layout.length, layout.step)
              var squares0 = 0.0
              var squares1 = 0.0
              for j in 0..<length {
                let i = start + j * step
                squares0 += Double(v0[i]) * Double(v0[i])
                squares1 += Double(v1[i]) * Double(v1[i])
              }
              let n0 = max(R.round(squares0.squareRoot()), floor)
              let n1 = max(R.round(squares1.squareRoot()), floor)
              var dot = 0.0
              for j in 0..<length {
                let i = start + j * step
                dot += Double(R.round(R.round(v0[i] / n0) * R.round(v1[i] / n1)))
              }
              let cosine = min(1, max(-1, R.round(dot)))
              if R.round(1 - R.round(cosine * cosine)) <= tolerance {
                for j in 0..<length {
                  let i = start + j * step
                  o[i] = R.round(R.round(keep * v0[i]) + R.round(take * v1[i]))
                }
                continue
              }
              let theta = R.round(Float(acos(Double(cosine))))
              let sine = R.round(Float(sin(Double(theta))))
              let s0 = R.round(Float(sin(Double(R.round(keep * theta)))))
              let s1 = R.round(Float(sin(Double(R.round(take * theta)))))
              for j in 0..<length {
                let i = start + j * step
                o[i] = R.round(R.round(R.round(s0 * v0[i]) + R.round(s1 * v1[i])) / sine)
              }
            }
          }
        }
      }
    }
    guard let base else { return out }
    return Elementwise.map(count) { R.round(out[$0] + base[$0]) }
  }
}
