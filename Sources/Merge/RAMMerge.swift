import Tensor

/// mergekit's `ram` and `ramplus_tl` (Reinforced Agent Merging). Task vector entries with
/// `|tau| <= epsilon` are dropped. Per element, an entry only one model changes is taken whole
/// (in `ramplus_tl` scaled by that model's `lambda_i = 1 + r * clamp(rho_i, 0, alpha)`, `rho_i`
/// the ratio of the model's shared to unique changed entries in this tensor); entries several
/// models change are averaged over those models. Computed in `Double` (`Kernels.changeMerge`),
/// streamed from the stored bytes: RAM merges range by range; RAM+TL first counts each model's
/// shared and unique entries in one pass (`Kernels.changeCounts`).
/// Under mergekit's rounding (`MergeArithmetic.rounded`) it streams the same way, in `Float`
/// (`preparedRounded`).
public struct RAMMerge: StreamingMerge {
  public let name: String
  public let plus: Bool

  public static let ram = RAMMerge(name: "ram", plus: false)
  public static let ramPlus = RAMMerge(name: "ramplus-tl", plus: true)

  public var summary: String {
    plus
      ? "RAM with unique entries amplified by each model's shared-to-unique ratio (tensor-local)"
      : "entries changed by one model kept whole, entries changed by several averaged"
  }
  public var reference: String {
    "Reinforced Agent Merging, arXiv:2601.13572; mergekit's \(plus ? "ramplus_tl" : "ram")"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    var specs: [ParameterSpec] = [
      .number(
        "epsilon", .global, in: 0...Double.greatestFiniteMagnitude, default: 1e-5,
        help: "|tau| at most this counts as unchanged")
    ]
    if plus {
      specs += [
        .number("r", .global, default: 0.1, help: "amplification per unit of the shared-to-unique ratio"),
        .number("alpha", .global, in: 0...Double.greatestFiniteMagnitude, default: 0.2, help: "cap on the ratio"),
      ]
    }
    return specs
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard inputs.base != nil else { throw MergeError.baseRequired(method: name) }
    return try mergeThroughRanges(inputs, p)
  }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    if p.arithmetic.isRounded { return try preparedRounded(p, scan: scan) }
    let method = self.name
    let epsilon = p.number("epsilon")
    let models = p.models.count
    var lambdas = [Double](repeating: 1, count: models)
    if plus {
      var shared = [Int](repeating: 0, count: models)
      var unique = [Int](repeating: 0, count: models)
      try scan.storedPass { inputs, elements in
        guard inputs.count == models + 1 else { throw MergeError.baseRequired(method: method) }
        return Kernels.changeCounts(
          base: inputs[0], models: Array(inputs.dropFirst()), count: elements.count, epsilon: epsilon)
      } combine: { counts in
        for m in 0..<models {
          shared[m] += counts.shared[m]
          unique[m] += counts.unique[m]
        }
      }
      let (r, alpha) = (p.number("r"), p.number("alpha"))
      for m in 0..<models {
        let rho = Double(shared[m]) / max(Double(unique[m]), epsilon)
        lambdas[m] = 1 + r * min(alpha, max(0, rho))
      }
    }
    let fixed = lambdas
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: method) }
      return TensorScan.withF32Elements([base] + range.models) { inputs in
        Kernels.changeMerge(
          base: inputs[0], models: Array(inputs.dropFirst()), count: base.count, epsilon: epsilon, lambdas: fixed)
      }
    } stored: { inputs, elements, dtype in
      guard inputs.count == models + 1 else { throw MergeError.baseRequired(method: method) }
      return TensorData(dtype: dtype, count: elements.count) { out in
        Kernels.changeMerge(
          base: inputs[0], models: Array(inputs.dropFirst()), count: elements.count, epsilon: epsilon,
          lambdas: fixed, into: out, as: dtype)
      }
    }
  }

  /// The merge under mergekit's rounding (`MergeArithmetic.rounded`), range by range as the
  /// exact one: each task vector entry rounded to the compute dtype and compared with epsilon
  /// cast to it (torch compares with the scalar in the tensor's dtype); a shared entry divided
  /// by its count and rounded; the entries summed in `Float`. RAM rounds the sum and then its
  /// addition to the base. RAM+TL's lambdas are float32, as torch promotes the task vectors
  /// times them (mergekit then writes F32), so only the sum's addition to the base is rounded.
  func preparedRounded(_ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger {
    let r = p.arithmetic
    let method = self.name
    let epsilon = p.number("epsilon")
    let threshold = r.round(Float(epsilon))
    let models = p.models.count
    /// The range's rounded task vectors and each element's count of models changing it.
    @Sendable func changes(_ range: RangeInputs) throws -> (taskVectors: [[Float]], contributors: [Int32]) {
      guard let base = range.base else { throw MergeError.baseRequired(method: method) }
      let taskVectors = range.models.map { model in zip(model, base).map { r.round($0 - $1) } }
      var contributors = [Int32](repeating: 0, count: base.count)
      for tv in taskVectors {
        for i in tv.indices where abs(tv[i]) > threshold { contributors[i] &+= 1 }
      }
      return (taskVectors, contributors)
    }
    var lambdas: [Float]?
    if plus {
      var shared = [Int](repeating: 0, count: models)
      var unique = [Int](repeating: 0, count: models)
      try scan.pass { range -> [(Int, Int)] in
        let (taskVectors, contributors) = try changes(range)
        return taskVectors.map { tv in
          var (s, u) = (0, 0)
          for i in tv.indices where abs(tv[i]) > threshold {
            if contributors[i] > 1 { s += 1 } else { u += 1 }
          }
          return (s, u)
        }
      } combine: { counts in
        for m in 0..<models {
          shared[m] += counts[m].0
          unique[m] += counts[m].1
        }
      }
      let (ratio, cap) = (Float(p.number("r")), Float(p.number("alpha")))
      lambdas = (0..<models).map { m in
        let rho = Float(shared[m]) / max(Float(unique[m]), Float(epsilon))
        return 1 + ratio * min(cap, max(0, rho))
      }
    }
    let fixed = lambdas
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: method) }
      let (taskVectors, contributors) = try changes(range)
      return base.indices.map { i in
        let c = contributors[i]
        var sum: Float = 0
        for (m, tv) in taskVectors.enumerated() where abs(tv[i]) > threshold {
          sum += c == 1 ? tv[i] * (fixed?[m] ?? 1) : r.round(tv[i] / Float(c))
        }
        return fixed == nil ? r.round(base[i] + r.round(sum)) : r.round(base[i] + sum)
      }
    }
  }
}
