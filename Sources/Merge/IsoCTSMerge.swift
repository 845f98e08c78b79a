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
/// lowered by one, so `k_c` never goes negative.
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

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    try SpectralMerge.merge(inputs, p, method: name) { tasks in
      let (m, n) = (tasks[0].rows, tasks[0].columns)
      let r = min(m, n)
      let (commonCount, perTask) = Self.subspaceSizes(
        side: r, tasks: tasks.count, commonFraction: p.number("common_space_fraction"))
      var sum = Matrix<Double>(zeros: m, n)
      for task in tasks { sum.add(task) }
      let common = try SpectralMerge.triplets(of: sum, rank: commonCount)
      var parts: [STFMerge.Features<Double>] = []
      if perTask > 0 {
        for task in tasks {
          // D_t - U_c (U_cᵀ D_t), with U_c as rows.
          var specific = task
          specific.addProduct(common.u, common.u.matmul(task), transposeA: true, alpha: -1)
          parts.append(try SpectralMerge.triplets(of: specific, rank: perTask))
        }
      }
      parts.append(common)
      let all = STFMerge.Features(stacking: parts, rows: m, columns: n)
      guard !all.s.isEmpty else { return Matrix(zeros: m, n) }
      let mean = all.s.reduce(0, +) / Double(r)
      var core = BLAS.matmul(
        try SpectralMerge.inverseSquareRoot(ofGramOf: all.u), try SpectralMerge.inverseSquareRoot(ofGramOf: all.v))
      for i in core.values.indices { core.values[i] *= mean }
      return SpectralMerge.expand(all.u, core: core, all.v)
    }
  }
}
