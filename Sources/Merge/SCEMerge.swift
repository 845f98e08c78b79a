import Foundation
import Tensor

/// mergekit's `sce` (select, calculate, erase) over task vectors `tau_i = theta_i - base`:
/// 1. select: with `select_topk` < 1, keep only the `floor(nonzero * select_topk)` elements of
///    largest variance across the models (population variance; ties by index), zero elsewhere;
/// 2. calculate: each model's weight is the mean square of its (selected) task vector over
///    their sum (equal weights when that sum is below 1e-6, as mergekit);
/// 3. erase: per element, drop the entries whose sign differs from the sign of the sum
///    (zero counts as +), then `base + sum w_i m_i tau_i / max(sum w_i m_i, 1e-6)`.
/// Computed in `Double` on whole tensors.
public struct SCEMerge: MergeMethod {
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
    guard let baseTensor = inputs.base else { throw MergeError.baseRequired(method: name) }
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    let base = baseTensor.scalars.map(Double.init)
    let count = base.count
    var tvs = inputs.models.map { model in model.scalars.enumerated().map { Double($1) - base[$0] } }
    let n = Double(tvs.count)
    let density = p.number("select_topk")
    if density < 1 {
      var keep = [Bool](repeating: false, count: count)
      if density > 0 {
        let variance = (0..<count).map { i -> Double in
          let mean = tvs.reduce(0) { $0 + $1[i] } / n
          return tvs.reduce(0) { $0 + ($1[i] - mean) * ($1[i] - mean) } / n
        }
        let k = Int((Double(variance.filter { $0 != 0 }.count) * density).rounded(.towardZero))
        for i in (0..<count).sorted(by: { variance[$0] > variance[$1] || (variance[$0] == variance[$1] && $0 < $1) })
          .prefix(k)
        {
          keep[i] = true
        }
      }
      tvs = tvs.map { tv in tv.enumerated().map { keep[$0] ? $1 : 0 } }
    }
    var weights = tvs.map { tv in tv.reduce(0) { $0 + $1 * $1 } / Double(max(count, 1)) }
    let total = weights.reduce(0, +)
    weights = abs(total) < 1e-6 ? weights.map { _ in 1 / n } : weights.map { $0 / total }
    let merged = (0..<count).map { i -> Float in
      let sum = tvs.reduce(0) { $0 + $1[i] }
      let majority: Double = sum >= 0 ? 1 : -1
      var numerator = 0.0
      var denominator = 0.0
      for (tv, w) in zip(tvs, weights) where tv[i] != 0 && (tv[i] > 0 ? 1.0 : -1.0) == majority {
        numerator += tv[i] * w
        denominator += w
      }
      return Float(base[i] + numerator / max(denominator, 1e-6))
    }
    return Tensor(shape: baseTensor.shape, scalars: merged)
  }

  /// SCE as mergekit computes it in a narrow dtype: task vectors, variances, squares, the
  /// energy weights, each product and the division rounded to it; sums and means accumulate
  /// in float and round once; tied variances are taken in index order.
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
