import Foundation
import Tensor

/// A merge method that must see the whole model before merging any tensor. The runner hands it
/// one scan per merged tensor (each can be passed over several times) and merges with the
/// method it returns.
public protocol ModelWideMerge: MergeMethod {
  func prepared(_ tensors: [TensorScan], parameters: ResolvedParameters) throws -> any MergeMethod
}

/// TIES-Merging as the official code does it (`ties-global`), as opposed to mergekit's
/// per-tensor `ties`: each task vector is trimmed over the WHOLE model (all tensors as one flat
/// vector) to its `k = floor(density D)` largest magnitudes, keeping every entry at least the
/// (k+1)-th largest (the official off-by-one: k + 1 entries plus ties); the sign of
/// `sum_i tau_i` is elected per entry, with the model-wide majority sign where the sum is exactly
/// 0; agreeing non-zero entries are averaged; `theta = base + lambda * mean`. No model weights.
/// Preparation reads the model three times (two passes for each task's exact threshold, one
/// for the majority sign) before the merge pass.
public struct TIESGlobalMerge: StreamingMerge, ModelWideMerge {
  /// Per model, the magnitude bit pattern an entry needs to be kept (nil: keep every entry).
  public var thresholds: [UInt32?]?
  /// The model-wide majority sign (+1, -1, or 0 when the elected signs cancel exactly).
  public var majority: Float = 1

  public init() {}

  public var name: String { "ties-global" }
  public var summary: String {
    "TIES as the official code: trim each task vector over the whole model, elect signs, disjoint mean"
  }
  public var reference: String {
    "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708), official implementation"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number(
        "density", .global, in: 0...1, default: 0.2,
        help: "fraction of each task vector kept, over the whole model (the paper's K)"),
      .number("lambda", .global, default: 1, help: "scale of the merged task vector"),
    ]
  }

  public func prepared(_ tensors: [TensorScan], parameters p: ResolvedParameters) throws -> any MergeMethod {
    let total = tensors.reduce(0) { $0 + ($1.ranges.last?.upperBound ?? 0) }
    let k = Int((p.number("density") * Double(total)).rounded(.down))
    let models = p.models.count
    var rankers = (0..<models).map { _ in MagnitudeRanker(keep: min(k + 1, total), count: total) }
    func deltas(_ r: RangeInputs, _ m: Int) -> [Float] {
      let base = Self.base(of: r)
      return r.models[m].indices.map { r.models[m][$0] - base[$0] }
    }
    let keepAll = k >= total
    if !keepAll {
      for scan in tensors {
        try scan.pass { (r: RangeInputs) -> [[UInt32]] in
          (0..<models).map { MagnitudeRanker.highCounts(deltas(r, $0)) }
        } combine: { counts in
          for m in 0..<models { rankers[m].addHigh(counts[m]) }
        }
      }
      for m in 0..<models { rankers[m].finishHigh() }
      let second = rankers
      for scan in tensors {
        try scan.pass({ (r: RangeInputs) -> [[UInt32]] in (0..<models).map { second[$0].lowCounts(deltas(r, $0)) } }) {
          counts in
          for m in 0..<models { rankers[m].addLow(counts[m]) }
        }
      }
      for m in 0..<models { rankers[m].finishLow() }
    }
    var out = self
    out.thresholds = (0..<models).map { m in
      keepAll ? nil : (rankers[m].keep == 0 ? UInt32.max : rankers[m].threshold.key)
    }
    var elected = 0
    for scan in tensors {
      try scan.pass({ r -> Int in
        let trimmed = out.trimmed(r)
        var sum = 0
        for i in 0..<(r.base?.count ?? 0) {
          var total: Float = 0
          for m in trimmed.indices { total += trimmed[m][i] }
          sum += total > 0 ? 1 : (total < 0 ? -1 : 0)
        }
        return sum
      }) { elected += $0 }
    }
    out.majority = elected > 0 ? 1 : (elected < 0 ? -1 : 0)
    return out
  }

  /// The base of a range: always there, since `checkInputs` refuses a ties-global merge without one.
  static func base(of r: RangeInputs) -> [Float] {
    guard let base = r.base else { preconditionFailure("ties-global runs with a base (BaseRequirement.required)") }
    return base
  }

  /// The task vectors of one range with the entries below each model's threshold set to 0.
  func trimmed(_ r: RangeInputs) -> [[Float]] {
    let base = Self.base(of: r)
    return r.models.enumerated().map { m, values in
      values.indices.map { i in
        let d = values[i] - base[i]
        guard let key = thresholds?[m] ?? nil else { return d }
        return d.magnitude.bitPattern >= key ? d : 0
      }
    }
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let out = try mergeByRanges(inputs, p) else { throw MergeError.baseRequired(method: name) }
    return out
  }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger?
  {
    guard thresholds != nil else {
      throw MergeError.invalidParameter(
        method: self.name, name: "density", tensor: name,
        reason: "ties-global trims over the whole model; merge whole checkpoints with it")
    }
    let lambda = Float(p.number("lambda"))
    return RangeMerger { r in
      guard let base = r.base else { throw MergeError.baseRequired(method: "ties-global") }
      let trimmed = trimmed(r)
      return base.indices.map { i in
        var total: Float = 0
        for t in trimmed { total += t[i] }
        let sign: Float = total > 0 ? 1 : (total < 0 ? -1 : majority)
        var sum: Float = 0
        var agreeing: Float = 0
        for t in trimmed where t[i] != 0 && (t[i] > 0 ? 1 : -1) == sign {
          sum += t[i]
          agreeing += 1
        }
        return base[i] + lambda * sum / max(agreeing, 1)
      }
    }
  }
}
