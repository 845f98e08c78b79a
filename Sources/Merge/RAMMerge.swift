import Tensor

/// mergekit's `ram` and `ramplus_tl` (Reinforced Agent Merging). Task vector entries with
/// `|tau| <= epsilon` are dropped. Per element, an entry only one model changes is taken whole
/// (in `ramplus_tl` scaled by that model's `lambda_i = 1 + r * clamp(rho_i, 0, alpha)`, `rho_i`
/// the ratio of the model's shared to unique changed entries in this tensor); entries several
/// models change are averaged over those models. Computed in `Double` (`Kernels.changeMerge`),
/// streamed from the stored bytes: RAM merges range by range; RAM+TL first counts each model's
/// shared and unique entries in one pass (`Kernels.changeCounts`).
/// Under mergekit's rounding (`MergeArithmetic.rounded`) the tensor is merged whole.
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
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    return try mergeThroughRanges(inputs, p)
  }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !p.arithmetic.isRounded else { return nil }
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
      let size = elements.count * dtype.size
      let bytes = [UInt8](unsafeUninitializedCapacity: size) { buffer, initialized in
        Kernels.changeMerge(
          base: inputs[0], models: Array(inputs.dropFirst()), count: elements.count, epsilon: epsilon,
          lambdas: fixed, into: UnsafeMutableRawBufferPointer(buffer), as: dtype)
        initialized = size
      }
      return TensorData(dtype: dtype, shape: [elements.count], bytes: bytes)
    }
  }

  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let baseTensor = inputs.base else { throw MergeError.baseRequired(method: name) }
    let r = p.arithmetic
    let base = baseTensor.scalars
    let count = base.count
    let epsilon = p.number("epsilon")
    let tvs = inputs.relativeToBase(r)
    // torch compares with the scalar cast to the tensor's dtype.
    let threshold = r.round(Float(epsilon))
    let changed = tvs.map { tv in tv.map { abs($0) > threshold } }
    let contributors = (0..<count).map { i in changed.reduce(0) { $0 + ($1[i] ? 1 : 0) } }
    func shared(_ m: Int, _ i: Int) -> Float { r.round(tvs[m][i] / Float(contributors[i])) }
    guard plus else {
      return Tensor(
        shape: baseTensor.shape,
        scalars: (0..<count).map { i in
          var sum: Float = 0
          for m in tvs.indices where changed[m][i] { sum += contributors[i] == 1 ? tvs[m][i] : shared(m, i) }
          return r.round(base[i] + r.round(sum))
        })
    }
    let (ratio, cap) = (Float(p.number("r")), Float(p.number("alpha")))
    let lambdas = tvs.indices.map { m -> Float in
      let sharedCount = (0..<count).filter { changed[m][$0] && contributors[$0] > 1 }.count
      let uniqueCount = (0..<count).filter { changed[m][$0] && contributors[$0] == 1 }.count
      let rho = Float(sharedCount) / max(Float(uniqueCount), Float(epsilon))
      return 1 + ratio * min(cap, max(0, rho))
    }
    return Tensor(
      shape: baseTensor.shape,
      scalars: (0..<count).map { i in
        var sum: Float = 0
        for m in tvs.indices where changed[m][i] {
          sum += contributors[i] == 1 ? tvs[m][i] * lambdas[m] : shared(m, i)
        }
        return r.round(base[i] + sum)
      })
  }
}
