import Foundation
import Tensor

/// mergekit's `della` and `della_linear` (DELLA: drop and rescale by magnitude-ranked
/// probabilities). Per model, `delta = model - base`; within each row (the whole tensor for a
/// vector) the entries are ranked by magnitude, smallest first, and entry of normalised rank
/// `r` in [0, 1] is kept with probability `density - epsilon + 2 epsilon r` (so larger entries
/// survive more often), drawn from a counter-based generator keyed by `seed`, tensor and model
/// (the same on any machine and thread count; mergekit's torch draws are equal in
/// distribution, not in value). With `rescale` (default) the kept entries are scaled back to the
/// delta's L1 norm. The weighted deltas are then combined as in TIES (`della`: sign consensus,
/// normalised by the agreeing weights) or summed (`della_linear`), scaled by `lambda` and added
/// to the base. Magnitude ties rank in index order. Computed in `Double` on whole tensors.
public struct DELLAMerge: MergeMethod {
  public let name: String
  public let consensus: Bool
  public let defaultNormalize: Bool

  public static let della = DELLAMerge(name: "della", consensus: true, defaultNormalize: true)
  public static let dellaLinear = DELLAMerge(name: "della-linear", consensus: false, defaultNormalize: false)

  public var summary: String {
    consensus
      ? "magnitude-ranked random drop and rescale, then TIES sign consensus"
      : "magnitude-ranked random drop and rescale, then task arithmetic"
  }
  public var reference: String {
    "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, "
      + "arXiv:2406.11617; mergekit's \(name.replacingOccurrences(of: "-", with: "_"))"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number("weight", .perModel, default: 1, help: "scale of each model's task vector"),
      .number("density", .perModel, in: 0...1, default: 1, help: "mean fraction of each task vector's entries kept"),
      .number(
        "epsilon", .perModel, in: 0...1, default: 0.15,
        help: "spread of the keep probabilities around density (density +- epsilon must lie in (0, 1))"),
      .number("lambda", .global, default: 1, help: "scale of the merged task vector"),
      .flag("normalize", default: defaultNormalize, help: "divide by the sum of the (agreeing) weights"),
      .flag("rescale", default: true, help: "rescale each pruned task vector to its original L1 norm"),
      .number(
        "seed", .global, in: 0...9.007_199_254_740_992e15, default: 0,
        help: "random seed; the same seed gives the same output on any machine"),
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let baseTensor = inputs.base else { throw MergeError.baseRequired(method: name) }
    let base = baseTensor.scalars.map(Double.init)
    let count = base.count
    let shape = baseTensor.shape
    let rowLength = shape.count >= 2 ? count / max(shape[0], 1) : count
    var deltas: [[Double]] = []
    var weights: [Double] = []
    for (m, model) in inputs.models.enumerated() {
      var delta = model.scalars.enumerated().map { Double($1) - base[$0] }
      let density = p.number("density", model: m)
      if density <= 0 {
        delta = [Double](repeating: 0, count: count)
      } else if density < 1 {
        let epsilon = p.number("epsilon", model: m)
        guard density - epsilon > 0 && density + epsilon < 1 else {
          throw MergeError.invalidParameter(
            method: name, name: "epsilon", tensor: inputs.name,
            reason: "must leave density +- epsilon inside (0, 1) (density \(density), epsilon \(epsilon))")
        }
        let rng = CounterRNG(seed: UInt64(p.number("seed")), stream: "\(name)#\(m)")
        var kept = [Double](repeating: 0, count: count)
        for start in stride(from: 0, to: count, by: max(rowLength, 1)) {
          let row = start..<min(count, start + rowLength)
          let order = row.sorted { abs(delta[$0]) < abs(delta[$1]) || (abs(delta[$0]) == abs(delta[$1]) && $0 < $1) }
          let span = Double(max(order.count - 1, 1))
          for (rank, i) in order.enumerated() {
            let probability = density - epsilon + 2 * epsilon * Double(rank) / span
            if Double(rng.uniform(UInt64(i))) < probability { kept[i] = delta[i] }
          }
        }
        if p.flag("rescale") {
          let before = delta.reduce(0) { $0 + abs($1) }
          let after = kept.reduce(0) { $0 + abs($1) }
          if before >= 1e-7 && after >= 1e-7 { kept = kept.map { $0 * before / after } }
        }
        delta = kept
      }
      let weight = p.number("weight", model: m)
      deltas.append(delta.map { $0 * weight })
      weights.append(weight)
    }
    let lambda = p.number("lambda")
    let normalize = p.flag("normalize")
    let weightSum = weights.reduce(0, +)
    let merged = (0..<count).map { i -> Float in
      var mixed = 0.0
      var divisor = 0.0
      if consensus {
        let majority: Double = deltas.reduce(0) { $0 + $1[i] } >= 0 ? 1 : -1
        for (delta, weight) in zip(deltas, weights) where delta[i] != 0 && (delta[i] > 0 ? 1.0 : -1.0) == majority {
          mixed += delta[i]
          divisor += weight
        }
        if divisor == 0 { divisor = 1 }
      } else {
        mixed = deltas.reduce(0) { $0 + $1[i] }
        divisor = abs(weightSum) < 1e-8 ? 1 : weightSum
      }
      if normalize { mixed /= divisor }
      return Float(base[i] + mixed * lambda)
    }
    return Tensor(shape: shape, scalars: merged)
  }
}
