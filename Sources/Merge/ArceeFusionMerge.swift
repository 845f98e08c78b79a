import Foundation
import Tensor

/// mergekit's `arcee_fusion`: the base takes the other model's value only where the change is
/// important. Importance is `|theta - base|` times the row's KL divergence between the
/// softmaxes of the model's and the base's row (last dimension, each probability plus 1e-8);
/// the threshold is `median + 1.5 (q3 - q1)` of the importances (quantiles at index
/// `floor(q (n - 1))` of the sorted values). mergekit samples a million values with replacement
/// for larger tensors; here the quantiles are exact. Computed in `Double` on whole tensors.
public struct ArceeFusionMerge: MergeMethod {
  public init() {}
  public var name: String { "arcee-fusion" }
  public var summary: String { "the base, updated only where the change is important (KL-weighted outliers)" }
  public var reference: String { "Arcee AI, Arcee Fusion (arcee.ai); mergekit's arcee_fusion" }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...1 }
  public var parameters: [ParameterSpec] { [] }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let baseTensor = inputs.base else { throw MergeError.baseRequired(method: name) }
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    let base = baseTensor.scalars.map(Double.init)
    let model = inputs.models[0].scalars.map(Double.init)
    let count = base.count
    guard count > 0 else { return baseTensor }
    let width = baseTensor.shape.last ?? 1
    var importance = [Double](repeating: 0, count: count)
    for start in stride(from: 0, to: count, by: max(width, 1)) {
      let row = start..<min(count, start + width)
      let p = Self.softmax(model[row]).map { $0 + 1e-8 }
      let q = Self.softmax(base[row]).map { $0 + 1e-8 }
      let kl = zip(p, q).reduce(0) { $0 + $1.0 * log($1.0 / $1.1) }
      for i in row { importance[i] = abs(model[i] - base[i]) * kl }
    }
    let sorted = importance.sorted()
    func quantile(_ q: Double) -> Double { sorted[Int(q * Double(count - 1))] }
    let threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    return Tensor(
      shape: baseTensor.shape,
      scalars: (0..<count).map { Float(importance[$0] >= threshold ? model[$0] : base[$0]) })
  }

  /// Arcee Fusion as mergekit computes it in a narrow dtype: the change, both softmaxes (plus
  /// 1e-8), their ratio, its logarithm, the products, each row's KL sum, the importances and the
  /// threshold's arithmetic rounded to it; the masked change is added to the base in float32
  /// (the mask is a float32 tensor) and rounded once.
  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let baseTensor = inputs.base else { throw MergeError.baseRequired(method: name) }
    let r = p.arithmetic
    let base = baseTensor.scalars
    let model = inputs.models[0].scalars
    let count = base.count
    guard count > 0 else { return baseTensor }
    let width = max(baseTensor.shape.last ?? 1, 1)
    let change = inputs.relativeToBase(r)[0]
    var importance = [Float](repeating: 0, count: count)
    for start in stride(from: 0, to: count, by: width) {
      let row = start..<min(count, start + width)
      let pm = Self.softmax(model[row].map(Double.init)[...]).map { r.round(r.round($0) + 1e-8) }
      let qb = Self.softmax(base[row].map(Double.init)[...]).map { r.round(r.round($0) + 1e-8) }
      let kl = r.round(
        zip(pm, qb).reduce(0.0) { $0 + Double(r.round($1.0 * r.round(Float(log(Double(r.round($1.0 / $1.1))))))) })
      for i in row { importance[i] = r.round(abs(change[i]) * kl) }
    }
    let sorted = importance.sorted()
    func quantile(_ q: Double) -> Float { sorted[Int(q * Double(count - 1))] }
    let threshold = r.round(quantile(0.5) + r.round(1.5 * r.round(quantile(0.75) - quantile(0.25))))
    return Tensor(
      shape: baseTensor.shape,
      scalars: (0..<count).map { r.round(base[$0] + (importance[$0] >= threshold ? change[$0] : 0)) })
  }

  static func softmax(_ values: ArraySlice<Double>) -> [Double] {
    let top = values.max() ?? 0
    let exps = values.map { exp($0 - top) }
    let total = exps.reduce(0, +)
    return exps.map { $0 / total }
  }
}
