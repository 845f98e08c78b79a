import Foundation
import Tensor

/// mergekit's `ram` and `ramplus_tl` (Reinforced Agent Merging). Task vector entries with
/// `|tau| <= epsilon` are dropped. Per element, an entry only one model changes is taken whole
/// (in `ramplus_tl` scaled by that model's `lambda_i = 1 + r * clamp(rho_i, 0, alpha)`, `rho_i`
/// the ratio of the model's shared to unique changed entries in this tensor); entries several
/// models change are averaged over those models. Computed in `Double` on whole tensors.
public struct RAMMerge: MergeMethod {
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
    guard let baseTensor = inputs.base else { throw MergeError.baseRequired(method: name) }
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    let base = baseTensor.scalars.map(Double.init)
    let count = base.count
    let epsilon = p.number("epsilon")
    let tvs = inputs.models.map { model in model.scalars.enumerated().map { Double($1) - base[$0] } }
    let changed = tvs.map { tv in tv.map { abs($0) > epsilon } }
    let contributors = (0..<count).map { i in changed.reduce(0) { $0 + ($1[i] ? 1 : 0) } }
    var lambdas = [Double](repeating: 1, count: tvs.count)
    if plus {
      let (r, alpha) = (p.number("r"), p.number("alpha"))
      for m in tvs.indices {
        let shared = (0..<count).filter { changed[m][$0] && contributors[$0] > 1 }.count
        let unique = (0..<count).filter { changed[m][$0] && contributors[$0] == 1 }.count
        let rho = Double(shared) / max(Double(unique), epsilon)
        lambdas[m] = 1 + r * min(alpha, max(0, rho))
      }
    }
    let merged = (0..<count).map { i -> Float in
      var delta = 0.0
      for m in tvs.indices where changed[m][i] {
        delta += contributors[i] == 1 ? tvs[m][i] * lambdas[m] : tvs[m][i] / Double(contributors[i])
      }
      return Float(base[i] + delta)
    }
    return Tensor(shape: baseTensor.shape, scalars: merged)
  }

  /// RAM as mergekit computes it in a narrow dtype: task vectors and the shared entries' division
  /// by their count rounded to it, the models' sum accumulated in float and rounded, then the
  /// addition to the base. RAM+'s amplification is a float32 tensor, so that variant computes
  /// in float32 (torch's type promotion) and rounds once at the end.
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
