import Foundation
import Nets
import Tensor

/// Iso-C (isotropic merging in the common subspace). Per weight matrix, the task matrices are
/// summed (task arithmetic) and the sum's spectrum is made flat: with `sum_t D_t = U S Vᵀ`,
/// `M = mean(S) U Vᵀ`, so every direction the tasks share gets the same strength. Directions
/// whose singular value is at most 1e-6 (1e-12 for matrices under 256 on their smaller side) of
/// the largest are left out of `U Vᵀ` (they still count in the mean): the official code keeps
/// them, but there they are arbitrary vectors of a rank-deficient sum.
public struct IsoCMerge: MergeMethod {
  public init() {}
  public var name: String { "iso-c" }
  public var summary: String { "Iso-C: task arithmetic with the spectrum of each matrix made flat" }
  public var reference: String {
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025 (arXiv:2502.04959)"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    SpectralMerge.commonParameters(alphaHelp: "scale of the merged update (the paper tunes it on validation data)")
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    try SpectralMerge.merge(inputs, p, method: name) { tasks in
      let (m, n) = (tasks[0].rows, tasks[0].columns)
      var sum = Matrix<Double>(zeros: m, n)
      for task in tasks { sum.add(task) }
      let r = min(m, n)
      let f = try SpectralMerge.triplets(of: sum, rank: r)
      let mean = f.s.reduce(0, +) / Double(r)
      return SpectralMerge.expand(f.u, core: .identity(f.s.count), f.v).map { $0 * mean }
    }
  }
}
