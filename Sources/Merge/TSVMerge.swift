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

  public var usesStoredTaskVectors: Bool { true }

  public func scratchBytes(name: String, shape: [Int], models: Int, _ p: ResolvedParameters) -> Int {
    SpectralMerge.scratchBytes(name: name, shape: shape, models: models, p) { side in
      models * Int((Double(side) * (p.optionalNumber("task_fraction") ?? 1 / Double(models))).rounded(.down))
    }
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    let fraction = p.optionalNumber("task_fraction")
    func kept(_ shape: (Int, Int), tasks: Int) -> Int {
      Int((Double(min(shape.0, shape.1)) * (fraction ?? 1 / Double(tasks))).rounded(.down))
    }
    return try SpectralMerge.merge(
      inputs, p, method: name,
      update: { tasks in
        let k = kept((tasks[0].rows, tasks[0].columns), tasks: tasks.count)
        return try Self.decorrelated(
          SpectralMerge.stacked(try tasks.map { try SpectralMerge.triplets(of: $0, rank: k) }))
      },
      factored: { tasks in
        let k = kept((tasks[0].u.columns, tasks[0].v.columns), tasks: tasks.count)
        return try Self.decorrelated(SpectralMerge.stacked(tasks.map { SpectralMerge.leading($0, k) }))
      })
  }

  /// `U_perp diag(s) V_perpᵀ = uᵀ [G_u^(-1/2) diag(s) G_v^(-1/2)] v` for the tasks' kept
  /// features as rows.
  static func decorrelated(_ f: STFMerge.Features<Double>) throws -> Matrix<Double> {
    guard !f.s.isEmpty else { return Matrix(zeros: f.u.columns, f.v.columns) }
    var left = try SpectralMerge.inverseSquareRoot(ofGramOf: f.u)
    for i in 0..<left.rows { for j in 0..<left.columns { left[i, j] *= f.s[j] } }
    let core = BLAS.matmul(left, try SpectralMerge.inverseSquareRoot(ofGramOf: f.v))
    return SpectralMerge.expand(f.u, core: core, f.v)
  }
}
