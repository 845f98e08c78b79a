import Tensor

/// Model Stock: moves from the base toward the average of the fine-tunes by a factor set by how
/// aligned their task vectors are. Per tensor, with `cos` the mean pairwise cosine of the task
/// vectors (each clamped to [-1, 1], norms products floored at 1e-6) and N models,
/// `t = N cos / (1 + (N - 1) cos)` and the result is `t * mean(models) + (1 - t) * base`.
/// As mergekit's `model_stock`: whole-tensor cosines, or with `filter_wise` one cosine and `t`
/// per row (the last dimension; a 1-D tensor is one row), merged whole rather than streamed.
public struct ModelStockMerge: StreamingMerge {
  public init() {}
  public var name: String { "model-stock" }
  public var summary: String {
    "interpolate from the base toward the models' average by how aligned their task vectors are"
  }
  public var reference: String {
    "Jang et al., Model Stock: All We Need Is Just a Few Fine-tuned Models, ECCV 2024 (arXiv:2403.19522)"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 2...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .flag(
        "filter_wise", default: false,
        help: "one interpolation factor per row instead of per tensor (mergekit's filter_wise)")
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let base = inputs.base else { throw MergeError.baseRequired(method: name) }
    guard p.flag("filter_wise") else { return try mergeThroughRanges(inputs, p) }
    let width = base.shape.last ?? 1
    let n = inputs.models.count
    var out = base.scalars
    for row in 0..<(base.count / max(width, 1)) {
      let r = (row * width)..<((row + 1) * width)
      let rowBase = Array(base.scalars[r])
      let models = inputs.models.map { Array($0.scalars[r]) }
      let deltas = models.map { Kernels.difference($0, rowBase) }
      var gram = [Double](repeating: 0, count: n * n)
      for i in 0..<n { for j in i..<n { gram[i * n + j] = Kernels.dot(deltas[i], deltas[j]) } }
      let merged = Kernels.weightedSum([rowBase] + models, weights: Self.weights(gram: gram, models: n))
      out.replaceSubrange(r, with: merged)
    }
    return Tensor(shape: base.shape, scalars: out)
  }

  /// `[1 - t, t / N, ...]` from the upper triangle of the task vectors' Gram matrix.
  static func weights(gram: [Double], models n: Int) -> [Double] {
    var cosines = 0.0
    for i in 0..<n {
      for j in (i + 1)..<n {
        let norms = (gram[i * n + i].squareRoot() * gram[j * n + j].squareRoot())
        cosines += min(1, max(-1, gram[i * n + j] / max(norms, 1e-6)))
      }
    }
    let cosine = cosines / Double(n * (n - 1) / 2)
    let t = Double(n) * cosine / (1 + Double(n - 1) * cosine)
    return [1 - t] + Array(repeating: t / Double(n), count: n)
  }

  /// One pass for the Gram matrix of the task vectors (Double), then every range is a weighted
  /// sum of base and models.
  /// The Gram pass reads task vectors; the merge itself is a weighted-sum form.
  public var readsTaskVectors: Bool { true }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger?
  {
    guard !p.flag("filter_wise") else { return nil }  // rows need the shape: merged whole
    let n = p.models.count
    var gram = [Double](repeating: 0, count: n * n)
    try scan.pass { range in
      let deltas = try range.modelsMinusBase(method: self.name)
      var partial = [Double](repeating: 0, count: n * n)
      for i in 0..<n { for j in i..<n { partial[i * n + j] = Kernels.dot(deltas[i], deltas[j]) } }
      return partial
    } combine: { partial in
      for k in gram.indices { gram[k] += partial[k] }
    }
    let weights = Self.weights(gram: gram, models: n)
    return RangeMerger(WeightedSumForm(method: self.name, terms: [nil] + WeightedSumForm.models(n), weights: weights))
  }
}
