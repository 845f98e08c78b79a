import Foundation
import Nets
import Tensor

/// TSV-M (Task Singular Vectors: Merge). Per weight matrix, each task matrix keeps its top
/// `k = floor(r * task_fraction)` singular triplets (`r = min(m, n)`; by default `r / T`). The
/// stacked left vectors `U` (m x Tk) and right vectors `V` (n x Tk) are replaced by the nearest
/// matrices with orthonormal columns (orthogonal Procrustes), which removes the interference
/// between tasks, and `M = U_perp diag(s) V_perpᵀ`. With one task at full rank `M` is the task
/// matrix; tasks whose kept vectors are already orthogonal give the sum of their truncations.
public struct TSVMerge: MergeMethod {
  public init() {}
  public var name: String { "tsv" }
  public var summary: String {
    "Task Singular Vectors: each task's top singular vectors, decorrelated across tasks (TSV-M)"
  }
  public var reference: String {
    "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 (arXiv:2412.00081)"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    SpectralMerge.commonParameters(alphaHelp: "scale of the merged update (the official code's default is 1)") + [
      .number(
        "task_fraction", .global, in: 0...1, openBelow: true, default: nil, optional: true,
        help: "fraction of min(m, n) singular triplets each task keeps (default 1/T)")
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    try SpectralMerge.merge(inputs, p, method: name) { tasks in
      let (m, n) = (tasks[0].rows, tasks[0].columns)
      let fraction = p.optionalNumber("task_fraction") ?? 1 / Double(tasks.count)
      let kept = Int((Double(min(m, n)) * fraction).rounded(.down))
      let f = try STFMerge.features(of: tasks, rank: kept)
      guard !f.s.isEmpty else { return Matrix(zeros: m, n) }
      // U_perp diag(s) V_perpᵀ = uᵀ [G_u^(-1/2) diag(s) G_v^(-1/2)] v, features as rows.
      var left = try SpectralMerge.inverseSquareRoot(ofGramOf: f.u)
      for i in 0..<left.rows { for j in 0..<left.columns { left[i, j] *= f.s[j] } }
      let core = BLAS.matmul(left, try SpectralMerge.inverseSquareRoot(ofGramOf: f.v))
      return SpectralMerge.expand(f.u, core: core, f.v)
    }
  }
}
