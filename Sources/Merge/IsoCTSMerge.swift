import Foundation
import Nets
import Tensor

/// Iso-CTS (isotropic merging in common and task-specific subspaces). Per weight matrix of
/// smaller side `r`:
/// 1. The sum of the task matrices gives the common subspace: its top `k_c` singular triplets,
///    `k_c = r - T k_t` with `k_t = round((r - floor(r c)) / T)` (Python's rounding, half to
///    even, as the official code), `c = common_space_fraction`.
/// 2. Each task matrix, with the common subspace projected out of its columns
///    (`D_t - U_c U_cᵀ D_t`), gives its top `k_t` triplets.
/// 3. The `r` stacked left and right vectors are replaced by the nearest orthonormal ones
///    (orthogonal Procrustes) and the spectrum by its mean: `M = mean(s) U_perp V_perpᵀ`.
/// With `c = 1` this is Iso-C. Where `k_t` rounds up past `r` (tiny matrices, many tasks) it is
/// lowered by one, so `k_c` never goes negative. Task-specific directions weaker than 1e-6 of
/// the sum's largest singular value are left out: where the common subspace already holds a
/// task (low-rank task vectors), what remains of it is rounding.
public struct IsoCTSMerge: MergeMethod {
  public init() {}
  public var name: String { "iso-cts" }
  public var summary: String {
    "Iso-CTS: a flat spectrum over the tasks' common subspace plus each task's own directions"
  }
  public var reference: String {
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025 (arXiv:2502.04959)"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    SpectralMerge.commonParameters(alphaHelp: "scale of the merged update (the paper tunes it on validation data)") + [
      .number(
        "common_space_fraction", .global, in: 0...1, default: 0.8,
        help: "fraction of min(m, n) directions taken from the summed task matrices (the paper's default 0.8)")
    ]
  }

  /// `(k_c, k_t)` for a matrix of smaller side `r`, `tasks` tasks and common fraction `c`.
  static func subspaceSizes(side r: Int, tasks: Int, commonFraction c: Double) -> (common: Int, perTask: Int) {
    let initial = Int(Double(r) * c)
    var perTask = Int((Double(r - initial) / Double(tasks)).rounded(.toNearestOrEven))
    while perTask > 0 && perTask * tasks > r { perTask -= 1 }
    return (r - perTask * tasks, perTask)
  }

  public var usesStoredTaskVectors: Bool { true }

  public func scratchBytes(name: String, shape: [Int], models: Int, _ p: ResolvedParameters) -> Int {
    SpectralMerge.scratchBytes(name: name, shape: shape, models: models, p) { $0 }
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    let fraction = p.number("common_space_fraction")
    return try SpectralMerge.merge(
      inputs, p, method: name,
      update: { tasks in
        let (m, n) = (tasks[0].rows, tasks[0].columns)
        let (commonCount, perTask) = Self.subspaceSizes(side: min(m, n), tasks: tasks.count, commonFraction: fraction)
        var sum = Matrix<Double>(zeros: m, n)
        for task in tasks { sum.add(task) }
        let common = try SpectralMerge.triplets(of: sum, rank: commonCount)
        let specific = try tasks.map { task in
          // D_t - U_c (U_cᵀ D_t), with U_c as rows.
          var rest = task
          rest.addProduct(common.u, common.u.matmul(task), transposeA: true, alpha: -1)
          return try SpectralMerge.triplets(of: rest, rank: perTask, scale: common.s.first ?? 0)
        }
        return try Self.combined(common: common, specific: perTask > 0 ? specific : [])
      },
      factored: { tasks in
        let (m, n) = (tasks[0].u.columns, tasks[0].v.columns)
        let (commonCount, perTask) = Self.subspaceSizes(side: min(m, n), tasks: tasks.count, commonFraction: fraction)
        let common = SpectralMerge.leading(try SpectralMerge.svd(ofSum: SpectralMerge.stacked(tasks)), commonCount)
        let specific = try tasks.map { task in
          // (I - U_c U_cᵀ) U_t S_t V_tᵀ: the left factors with the common subspace removed.
          var left = task.u
          left.addProduct(task.u.matmul(common.u, transposeB: true), common.u, alpha: -1)
          return SpectralMerge.leading(
            try SpectralMerge.svd(ofSum: STFMerge.Features(u: left, v: task.v, s: task.s), scale: common.s.first ?? 0),
            perTask)
        }
        return try Self.combined(common: common, specific: perTask > 0 ? specific : [])
      })
  }

  /// `mean(s) U_perp V_perpᵀ` over the task-specific then common features, the mean over all
  /// `r` directions.
  static func combined(common: STFMerge.Features<Double>, specific: [STFMerge.Features<Double>]) throws
    -> Matrix<Double>
  {
    let all = SpectralMerge.stacked(specific + [common])
    let (m, n) = (all.u.columns, all.v.columns)
    guard !all.s.isEmpty else { return Matrix(zeros: m, n) }
    let mean = all.s.reduce(0, +) / Double(min(m, n))
    var core = BLAS.matmul(
      try SpectralMerge.inverseSquareRoot(ofGramOf: all.u), try SpectralMerge.inverseSquareRoot(ofGramOf: all.v))
    for i in core.values.indices { core.values[i] *= mean }
    return SpectralMerge.expand(all.u, core: core, all.v)
  }
}
