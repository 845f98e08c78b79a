import Tensor

/// The task-vector engine behind task arithmetic, TIES, DARE and breadcrumbs: per tensor,
/// `delta_i = model_i - base`; each delta is sparsified (by magnitude, at random, or by magnitude
/// without outliers) and optionally rescaled to keep its L1 norm; deltas are weighted; a sign
/// consensus (TIES) keeps per element only the deltas agreeing with the sign of the weighted sum;
/// the result is summed, optionally divided by the summed weights, scaled by `lambda`, and added
/// to the base. Semantics and defaults follow mergekit's generalized task arithmetic, so a
/// mergekit config gives the same result (up to rounding: we compute in Float with Double sums
/// and round once).
public struct TaskVectorMerge: ElementwiseMerge {
  public enum Sparsification: Sendable {
    /// Keep the `density` fraction of largest |delta| (exactly k = floor(density * n)).
    case magnitude
    /// Keep each element with probability `density` (DARE), from a counter-based generator
    /// keyed by `seed`, tensor name and model index.
    case random
    /// Drop the `gamma` fraction of largest |delta|, then the smallest, to keep `density` (breadcrumbs).
    case magnitudeOutliers
  }

  public let name: String
  public let summary: String
  public let reference: String
  public let sparsification: Sparsification?
  public let consensus: Bool
  public let defaultNormalize: Bool
  public let defaultRescale: Bool

  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }

  public var parameters: [ParameterSpec] {
    var specs: [ParameterSpec] = [
      .number("weight", .perModel, default: 1, help: "scale of each model's task vector"),
      .number("lambda", .global, default: 1, help: "scale of the merged task vector"),
      .flag("normalize", default: defaultNormalize, help: "divide by the sum of the weights (of the agreeing models, with consensus)"),
    ]
    if let sparsification {
      specs.append(.number("density", .perModel, in: 0...1, openBelow: true, default: 1, help: "fraction of each task vector's entries to keep, in (0, 1]"))
      specs.append(.flag("rescale", default: defaultRescale, help: "rescale each sparsified task vector to its original L1 norm"))
      if sparsification == .magnitudeOutliers {
        specs.append(.number("gamma", .perModel, in: 0...1, default: 0.01, help: "fraction of the largest-magnitude entries removed as outliers"))
      }
      if sparsification == .random {
        specs.append(.number("seed", .global, in: 0...9.007_199_254_740_992e15, default: 0, help: "random seed; the same seed gives the same output on any machine"))
      }
    }
    return specs
  }

  public static let taskArithmetic = TaskVectorMerge(
    name: "task-arithmetic", summary: "base + lambda * sum of weight_i * (model_i - base)",
    reference: "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    sparsification: nil, consensus: false, defaultNormalize: false, defaultRescale: false)
  public static let ties = TaskVectorMerge(
    name: "ties", summary: "trim task vectors to the largest entries, elect signs, average the agreeing entries",
    reference: "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)",
    sparsification: .magnitude, consensus: true, defaultNormalize: true, defaultRescale: false)
  public static let dareLinear = TaskVectorMerge(
    name: "dare-linear", summary: "drop task-vector entries at random and rescale, then task arithmetic",
    reference: "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
    sparsification: .random, consensus: false, defaultNormalize: false, defaultRescale: true)
  public static let dareTies = TaskVectorMerge(
    name: "dare-ties", summary: "DARE's random drop and rescale, then TIES sign consensus",
    reference: "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
    sparsification: .random, consensus: true, defaultNormalize: false, defaultRescale: true)
  public static let breadcrumbs = TaskVectorMerge(
    name: "breadcrumbs", summary: "drop the largest outliers and the smallest entries of each task vector, then task arithmetic",
    reference: "Davari and Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795)",
    sparsification: .magnitudeOutliers, consensus: false, defaultNormalize: false, defaultRescale: false)
  public static let breadcrumbsTies = TaskVectorMerge(
    name: "breadcrumbs-ties", summary: "breadcrumbs sparsification with TIES sign consensus",
    reference: "Davari and Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795)",
    sparsification: .magnitudeOutliers, consensus: true, defaultNormalize: false, defaultRescale: false)

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let base = inputs.base else { throw MergeError.baseRequired(method: name) }
    let deltas: [[Float]] = inputs.models.enumerated().map { index, model in
      let delta = Elementwise.map(base.count) { model.scalars[$0] - base.scalars[$0] }
      return sparsify(delta, model: index, tensor: inputs.name, offset: 0, p)
    }
    return Tensor(shape: base.shape, scalars: combine(base: base.scalars, deltas: deltas, p))
  }

  /// Element-wise unless a model's task vector is sparsified by magnitude or rescaled (both need
  /// the whole tensor); DARE's random drop without rescaling is element-wise too.
  public func isElementwise(_ p: ResolvedParameters) -> Bool {
    guard let sparsification else { return true }
    let sparse = p.models.indices.contains { p.number("density", model: $0) < 1 }
    return !sparse || (sparsification == .random && !p.flag("rescale"))
  }

  public func mergeRange(tensor name: String, offset: Int, base: [Float]?, models: [[Float]], _ p: ResolvedParameters) throws -> [Float] {
    guard let base else { throw MergeError.baseRequired(method: self.name) }
    let deltas: [[Float]] = models.enumerated().map { index, model in
      let delta = Elementwise.map(base.count) { model[$0] - base[$0] }
      return sparsify(delta, model: index, tensor: name, offset: offset, p)
    }
    return combine(base: base, deltas: deltas, p)
  }

  /// Weighted sum of the (sparsified) deltas, with TIES's sign consensus when enabled, scaled
  /// and added to the base.
  func combine(base: [Float], deltas: [[Float]], _ p: ResolvedParameters) -> [Float] {
    let weights = deltas.indices.map { p.number("weight", model: $0) }
    let lambda = p.number("lambda")
    let normalize = p.flag("normalize")
    let consensus = self.consensus
    return Elementwise.map(base.count) { i in
      var mixed = 0.0
      var divisor = 0.0
      if consensus {
        var total = 0.0
        for t in 0..<deltas.count { total += weights[t] * Double(deltas[t][i]) }
        let elected = total >= 0 ? 1.0 : -1.0
        for t in 0..<deltas.count {
          let d = weights[t] * Double(deltas[t][i])
          if d != 0 && (d > 0 ? 1.0 : -1.0) == elected {
            mixed += d
            divisor += weights[t]
          }
        }
        if divisor == 0 { divisor = 1 }
      } else {
        for t in 0..<deltas.count {
          mixed += weights[t] * Double(deltas[t][i])
          divisor += weights[t]
        }
        if abs(divisor) < 1e-8 { divisor = 1 }
      }
      if normalize { mixed /= divisor }
      return Float(Double(base[i]) + lambda * mixed)
    }
  }

  /// The delta with dropped entries zeroed, rescaled to its original L1 norm when asked.
  /// `offset` is the element index of `delta[0]` in the tensor (random draws are per element).
  func sparsify(_ delta: [Float], model: Int, tensor: String, offset: Int = 0, _ p: ResolvedParameters) -> [Float] {
    guard let sparsification else { return delta }
    let density = p.number("density", model: model)
    guard density < 1 else { return delta }
    let n = delta.count
    let keep: [Bool]
    switch sparsification {
    case .magnitude:
      keep = Selection.largestMagnitudes(delta, keep: Int(density * Double(n)))
    case .random:
      let rng = CounterRNG(seed: UInt64(p.number("seed")), stream: "\(tensor)#\(model)")
      let threshold = Float(density)
      keep = Elementwise.map(n) { rng.uniform(UInt64(offset + $0)) < threshold }
    case .magnitudeOutliers:
      // Rank by |delta| descending; keep ranks topCount ..< topCount + kept.
      let kept = Int(density * Double(n))
      var top = Int(p.number("gamma", model: model) * Double(n))
      if n - kept - top < 0 { top = n - kept }
      let upper = Selection.largestMagnitudes(delta, keep: top + kept)
      let outliers = Selection.largestMagnitudes(delta, keep: top)
      keep = Elementwise.map(n) { upper[$0] && !outliers[$0] }
    }
    let masked = Elementwise.map(n) { keep[$0] ? delta[$0] : 0 }
    guard p.flag("rescale") else { return masked }
    let before = Elementwise.sum(n) { Double(abs(delta[$0])) }
    let after = Elementwise.sum(n) { Double(abs(masked[$0])) }
    guard before >= 1e-7, after >= 1e-7 else { return masked }
    let scale = before / after
    return Elementwise.map(n) { Float(Double(masked[$0]) * scale) }
  }
}
