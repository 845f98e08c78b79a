import Tensor

/// Weighted average of the models (a model soup): `sum w_i theta_i / sum w_i`, or the plain
/// weighted sum with `normalize: false`. As mergekit's `linear` (which, with its arithmetic,
/// sums in float32 weight by weight before the result is rounded to the compute dtype).
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
    if p.arithmetic.isRounded {
      // mergekit accumulates in float32 (torch fuses each multiply-add), weight by weight, then
      // divides by the float32 sum.
      let single = weights.map(Float.init)
      let total = single.reduce(Float(0), +)  // float32, in order, as torch sums the weights
      let normalize = p.flag("normalize")
      return RangeMerger { range in
        var sum = [Float](repeating: 0, count: range.count)
        for (model, w) in zip(range.models, single) {
          for j in sum.indices { sum[j].addProduct(model[j], w) }
        }
        return normalize ? sum.map { $0 / total } : sum
      }
    }
    return RangeMerger(
      WeightedSumForm(method: self.name, terms: WeightedSumForm.models(weights.count), weights: weights, scale: scale))
  }
}
