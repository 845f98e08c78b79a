import Tensor

/// Model Stock: moves from the base toward the average of the fine-tunes by a factor set by how
/// aligned their task vectors are. Per tensor, with `cos` the mean pairwise cosine of the task
/// vectors (each clamped to [-1, 1], norms products floored at 1e-6) and N models,
/// `t = N cos / (1 + (N - 1) cos)` and the result is `t * mean(models) + (1 - t) * base`.
/// As mergekit's `model_stock` (whole-tensor cosines; its `filter_wise` option is not offered).
public struct ModelStockMerge: StreamingMerge {
  public init() {}
  public var name: String { "model-stock" }
  public var summary: String { "interpolate from the base toward the models' average by how aligned their task vectors are" }
  public var reference: String { "Jang et al., Model Stock: All We Need Is Just a Few Fine-tuned Models, ECCV 2024 (arXiv:2403.19522)" }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 2...Int.max }
  public var parameters: [ParameterSpec] { [] }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard inputs.base != nil else { throw MergeError.baseRequired(method: name) }
    return try mergeByRanges(inputs, p)!
  }

  /// One pass for the Gram matrix of the task vectors (Double), then every range is a weighted
  /// sum of base and models.
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger? {
    let n = p.models.count
    var gram = [Double](repeating: 0, count: n * n)
    try scan.pass { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: self.name) }
      let deltas = range.models.map { Kernels.difference($0, base) }
      var partial = [Double](repeating: 0, count: n * n)
      for i in 0..<n { for j in i..<n { partial[i * n + j] = Kernels.dot(deltas[i], deltas[j]) } }
      return partial
    } combine: { partial in
      for k in gram.indices { gram[k] += partial[k] }
    }
    var cosines = 0.0
    for i in 0..<n {
      for j in (i + 1)..<n {
        let norms = (gram[i * n + i].squareRoot() * gram[j * n + j].squareRoot())
        cosines += min(1, max(-1, gram[i * n + j] / max(norms, 1e-6)))
      }
    }
    let cosine = cosines / Double(n * (n - 1) / 2)
    let t = Double(n) * cosine / (1 + Double(n - 1) * cosine)
    let weights = [1 - t] + Array(repeating: t / Double(n), count: n)
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: "model-stock") }
      return Kernels.weightedSum([base] + range.models, weights: weights)
    }
  }
}
