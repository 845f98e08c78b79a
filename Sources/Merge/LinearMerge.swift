import Tensor

/// Weighted average of the models (a model soup): `sum w_i theta_i / sum w_i`, or the plain
/// weighted sum with `normalize: false`. As mergekit's `linear`.
public struct LinearMerge: StreamingMerge {
  public init() {}
  public var name: String { "linear" }
  public var summary: String { "weighted average of the models (model soup)" }
  public var reference: String { "Wortsman et al., Model Soups, ICML 2022 (arXiv:2203.05482)" }
  public var base: BaseRequirement { .unused }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number("weight", .perModel, default: 1, help: "each model's weight"),
      .flag("normalize", default: true, help: "divide by the sum of the weights"),
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    try mergeThroughRanges(inputs, p)
  }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger?
  {
    let weights = p.models.indices.map { p.number("weight", model: $0) }
    var scale = 1.0
    if p.flag("normalize") {
      let total = weights.reduce(0, +)
      guard total != 0 else { throw MergeError.zeroWeightSum(method: self.name, tensor: name) }
      scale = 1 / total
    }
    return RangeMerger(
      WeightedSumForm(method: self.name, terms: WeightedSumForm.models(weights.count), weights: weights, scale: scale))
  }
}
