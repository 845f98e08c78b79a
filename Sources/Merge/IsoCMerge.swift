import Foundation
import Nets
import Tensor

/// Iso-C (isotropic merging in the common subspace). Per weight matrix, the task matrices are
/// summed (task arithmetic) and the sum's spectrum is made flat: with `sum_t D_t = U S Vᵀ`,
/// `M = mean(S) U Vᵀ`, so every direction the tasks share gets the same strength. Directions
/// whose singular value is at most 1e-6 of the largest are left out of `U Vᵀ` (they count as
/// zero in the mean): the official code keeps them, but there they are arbitrary vectors of a
/// rank-deficient sum (low-rank task vectors, or rounding). Low-rank task vectors are summed as
/// triplets, without forming the matrices.
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

  public var usesStoredTaskVectors: Bool { true }

  public func scratchBytes(name: String, shape: [Int], models: Int, _ p: ResolvedParameters) -> Int {
    SpectralMerge.scratchBytes(name: name, shape: shape, models: models, p) { $0 }
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    try SpectralMerge.merge(
      inputs, p, method: name,
      update: { tasks in
        let (m, n) = (tasks[0].rows, tasks[0].columns)
        var sum = Matrix<Double>(zeros: m, n)
        for task in tasks { sum.add(task) }
        return Self.flattened(try SpectralMerge.triplets(of: sum, rank: min(m, n)))
      },
      factored: { tasks in Self.flattened(try SpectralMerge.svd(ofSum: SpectralMerge.stacked(tasks))) })
  }

  /// `mean(s) U Vᵀ` over the `r = min(m, n)` singular values of the sum (those left out count
  /// as zero).
  static func flattened(_ f: STFMerge.Features<Double>) -> Matrix<Double> {
    let mean = f.s.reduce(0, +) / Double(min(f.u.columns, f.v.columns))
    return SpectralMerge.expand(f.u, core: .identity(f.s.count), f.v).map { $0 * mean }
  }
}
