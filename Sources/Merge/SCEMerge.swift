import Foundation
import Tensor

/// mergekit's `sce` (select, calculate, erase) over task vectors `tau_i = theta_i - base`:
/// 1. select: with `select_topk` < 1, keep only the `floor(nonzero * select_topk)` elements of
///    largest variance across the models (population variance; ties by index), zero elsewhere;
/// 2. calculate: each model's weight is the mean square of its (selected) task vector over
///    their sum (equal weights when that sum is below 1e-6, as mergekit);
/// 3. erase: per element, drop the entries whose sign differs from the sign of the sum
///    (zero counts as +), then `base + sum w_i m_i tau_i / max(sum w_i m_i, 1e-6)`.
/// Computed in `Double`; the variances are ranked as float32 values (ties by index), as
/// mergekit ranks them in its float32 compute.
///
/// Streamed: the exact top-k of the variances by `MagnitudeRanker`'s passes (with the count of
/// nonzero variances in the first), a pass for the mean squares, then the merge range by range.
/// Under mergekit's rounding (`MergeArithmetic.rounded`) the tensor is merged whole.
public struct SCEMerge: StreamingMerge {
  public init() {}
  public var name: String { "sce" }
  public var summary: String { "variance-selected task vectors, weighted by energy, with sign consensus" }
  public var reference: String {
    "Wan et al., FuseChat: Knowledge Fusion of Chat Models (SCE), arXiv:2408.07990; mergekit's sce"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number(
        "select_topk", .global, in: 0...1, default: 1, help: "fraction of elements kept, by variance across models")
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard inputs.base != nil else { throw MergeError.baseRequired(method: name) }
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    return try mergeThroughRanges(inputs, p)
  }

  /// The task vectors of one range in Double.
  static func taskVectors(_ range: RangeInputs, method: String) throws -> [[Double]] {
    guard let base = range.base else { throw MergeError.baseRequired(method: method) }
    return range.models.map { model in (0..<base.count).map { Double(model[$0]) - Double(base[$0]) } }
  }

  /// Each element's population variance across the models, as float32 (the ranking key).
  static func variances(_ tvs: [[Double]]) -> [Float] {
    let n = Double(tvs.count)
    return (0..<(tvs.first?.count ?? 0)).map { i in
      let mean = tvs.reduce(0) { $0 + $1[i] } / n
      return Float(tvs.reduce(0) { $0 + ($1[i] - mean) * ($1[i] - mean) } / n)
    }
  }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !p.arithmetic.isRounded else { return nil }
    let models = p.models.count
    let density = p.number("select_topk")
    let method = self.name
    // The selection: nil keeps everything; else a ranker over the variances and, when ties at
    // the threshold are cut, the count of threshold-equal elements before each range.
    var selection: (ranker: MagnitudeRanker, equalBefore: [Int: Int])?
    if density < 1 {
      var nonzero = 0
      var high = [UInt32](repeating: 0, count: 65536)
      try scan.pass { range -> ([UInt32], Int) in
        let v = Self.variances(try Self.taskVectors(range, method: method))
        return (MagnitudeRanker.highCounts(v), v.filter { $0 != 0 }.count)
      } combine: { counts, nonzeroInRange in
        nonzero += nonzeroInRange
        for bin in 0..<65536 { high[bin] &+= counts[bin] }
      }
      let kept = density > 0 ? Int((Double(nonzero) * density).rounded(.towardZero)) : 0
      var ranker = MagnitudeRanker(keep: kept, count: count)
      var equalBefore: [Int: Int] = [:]
      if ranker.needsPasses {
        ranker.addHigh(high)
        ranker.finishHigh()
        let first = ranker
        try scan.pass { range in
          first.lowCounts(Self.variances(try Self.taskVectors(range, method: method)))
        } combine: {
          ranker.addLow($0)
        }
        ranker.finishLow()
        if ranker.needsTieOrder {
          let settled = ranker
          var running = 0
          try scan.pass { range in
            (range.offset, settled.equalCount(Self.variances(try Self.taskVectors(range, method: method))))
          } combine: { offset, equal in
            equalBefore[offset] = running
            running += equal
          }
        }
      }
      selection = (ranker, equalBefore)
    }
    let chosen = selection
    @Sendable func selected(_ range: RangeInputs) throws -> [[Double]] {
      let tvs = try Self.taskVectors(range, method: method)
      guard let (ranker, equalBefore) = chosen else { return tvs }
      let keep = ranker.mask(Self.variances(tvs), equalBefore: equalBefore[range.offset] ?? 0)
      return tvs.map { tv in tv.indices.map { keep[$0] ? tv[$0] : 0 } }
    }
    // Each model's mean square over the tensor, summed in range order.
    var squares = [Double](repeating: 0, count: models)
    try scan.pass { range in
      try selected(range).map { tv in tv.reduce(0) { $0 + $1 * $1 } }
    } combine: { parts in
      for m in 0..<models { squares[m] += parts[m] }
    }
    var weights = squares.map { $0 / Double(max(count, 1)) }
    let total = weights.reduce(0, +)
    weights = abs(total) < 1e-6 ? weights.map { _ in 1 / Double(models) } : weights.map { $0 / total }
    let fixed = weights
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: method) }
      let tvs = try selected(range)
      return base.indices.map { i -> Float in
        let sum = tvs.reduce(0) { $0 + $1[i] }
        let majority: Double = sum >= 0 ? 1 : -1
        var numerator = 0.0
        var denominator = 0.0
        for (tv, w) in zip(tvs, fixed) where tv[i] != 0 && (tv[i] > 0 ? 1.0 : -1.0) == majority {
          numerator += tv[i] * w
          denominator += w
        }
        return Float(Double(base[i]) + numerator / max(denominator, 1e-6))
      }
    }
  }

  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let baseTensor = inputs.base else { throw MergeError.baseRequired(method: name) }
    let r = p.arithmetic
    let base = baseTensor.scalars
    let count = base.count
    var tvs = inputs.relativeToBase(r)
    let n = Float(tvs.count)
    let density = p.number("select_topk")
    if density < 1 {
      var keep = [Bool](repeating: false, count: count)
      if density > 0 {
        let variance = (0..<count).map { i -> Float in
          let mean = tvs.reduce(0.0) { $0 + Double($1[i]) } / Double(n)
          return r.round(tvs.reduce(0.0) { $0 + (Double($1[i]) - mean) * (Double($1[i]) - mean) } / Double(n))
        }
        let k = Int((Double(variance.filter { $0 != 0 }.count) * density).rounded(.towardZero))
        let order = (0..<count).sorted {
          abs(variance[$0]) > abs(variance[$1]) || (abs(variance[$0]) == abs(variance[$1]) && $0 < $1)
        }
        for i in order.prefix(k) { keep[i] = true }
      }
      tvs = tvs.map { tv in tv.enumerated().map { keep[$0] ? $1 : 0 } }
    }
    let squares = tvs.map { tv in r.round(tv.reduce(0.0) { $0 + Double(r.round($1 * $1)) } / Double(max(count, 1))) }
    let total = r.round(squares.reduce(0.0) { $0 + Double($1) })
    let weights = abs(total) < 1e-6 ? squares.map { _ in r.round(1 / n) } : squares.map { r.round($0 / total) }
    let floor = r.round(Float(1e-6))
    let merged = (0..<count).map { i -> Float in
      let sum = tvs.reduce(0.0) { $0 + Double($1[i]) }
      let majority: Float = sum >= 0 ? 1 : -1
      var numerator = 0.0
      var denominator = 0.0
      for (tv, w) in zip(tvs, weights) where tv[i] != 0 && (tv[i] > 0 ? 1 : -1) == majority {
        numerator += Double(r.round(tv[i] * w))
        denominator += Double(w)
      }
      return r.round(base[i] + r.round(r.round(numerator) / max(r.round(denominator), floor)))
    }
    return Tensor(shape: baseTensor.shape, scalars: merged)
  }
}
