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
    // At the singularity (opposed task vectors) the base is kept, as mergekit does.
    let denominator = 1 + Double(n - 1) * cosine
    let t = abs(denominator) < 1e-6 ? 0 : Double(n) * cosine / denominator
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
    let r = p.arithmetic
    var gram = [Double](repeating: 0, count: n * n)
    try scan.pass { range in
      let deltas = try range.modelsMinusBase(method: self.name).map(r.round)
      guard r.isRounded else { return Kernels.upperGram(deltas) }
      var partial = [Double](repeating: 0, count: n * n)
      for i in 0..<n {
        for j in i..<n {
          // mergekit's dot products multiply in the compute dtype; its norms square in float.
          partial[i * n + j] =
            i != j
            ? zip(deltas[i], deltas[j]).reduce(0) { $0 + Double(r.round($1.0 * $1.1)) }
            : Kernels.dot(deltas[i], deltas[j])
        }
      }
      return partial
    } combine: { partial in
      for k in gram.indices { gram[k] += partial[k] }
    }
    if r.isRounded { return roundedMerger(gram: gram, models: n, r) }
    let weights = Self.weights(gram: gram, models: n)
    return RangeMerger(WeightedSumForm(method: self.name, terms: [nil] + WeightedSumForm.models(n), weights: weights))
  }

  /// mergekit's model stock in a narrow compute dtype: the norms, products, cosines, their mean
  /// and `t` are tensors of that dtype, each operation rounded; the models' average is summed
  /// one model at a time and divided; then `t * average + (1 - t) * base`, each step rounded.
  func roundedMerger(gram: [Double], models n: Int, _ r: MergeArithmetic) -> RangeMerger {
    var cosines: [Float] = []
    for i in 0..<n {
      for j in (i + 1)..<n {
        let norms = r.round(r.round(gram[i * n + i].squareRoot()) * r.round(gram[j * n + j].squareRoot()))
        cosines.append(min(1, max(-1, r.round(r.round(gram[i * n + j]) / max(norms, 1e-6)))))
      }
    }
    let cosine = r.round(cosines.reduce(0.0) { $0 + Double($1) } / Double(max(cosines.count, 1)))
    let denominator = r.round(1 + r.round(Float(n - 1) * cosine))
    let singular = abs(denominator) < 1e-6
    let t = singular ? 0 : r.round(r.round(Float(n) * cosine) / denominator)
    let keep = r.round(1 - t)
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: self.name) }
      return base.indices.map { k in
        var sum = range.models[0][k]
        for model in range.models.dropFirst() { sum = r.round(sum + model[k]) }
        let average = r.round(sum / Float(n))
        return r.round(r.round(t * average) + r.round(keep * base[k]))
      }
    }
  }
}
