import Foundation
import Nets
import Tensor

/// What the SVD-based merges (TSV-M, Iso-C, Iso-CTS) share. Each works on the task matrices
/// `D_t = W_t - W_0` of one 2-D weight at a time and returns a merged update `M`; the model is
/// `W_0 + alpha M`. Tensors that are not matrices (1-D, or names matching `exclude`: embeddings
/// and output heads by default, as the papers leave out CLIP's text projection) take the mean of
/// the task vectors instead, `W_0 + alpha mean_t D_t`, as the official code does. Everything runs
/// in Double and is rounded once.
enum SpectralMerge {
  /// Names left out of the SVD treatment unless `exclude` says otherwise.
  static let defaultExclusion =
    "embed|lm_head|wte|wpe|word_embeddings|position_embeddings|shared\\.weight|text_projection"

  /// The parameters every SVD-based merge takes.
  static func commonParameters(alphaHelp: String) -> [ParameterSpec] {
    [
      .number("alpha", .global, default: 1, help: alphaHelp),
      .pattern(
        "exclude", default: defaultExclusion,
        help: "2-D tensors whose names match this regular expression take the mean task vector instead"),
    ]
  }

  /// Whether `name` of `shape` gets the SVD treatment: 2-D, both sides above 1, and not excluded.
  static func isMatrix(_ name: String, shape: [Int], exclude: String) throws -> Bool {
    guard shape.count == 2, shape[0] > 1, shape[1] > 1 else { return false }
    guard !exclude.isEmpty else { return true }
    let pattern = try Regex(exclude)
    return !name.contains(pattern)
  }

  /// The per-tensor flow: `W_0 + alpha update(D_1, ..., D_T)` for matrices, the mean task vector
  /// for other tensors.
  static func merge(
    _ inputs: MergeInputs, _ p: ResolvedParameters, method: String,
    update: ([Matrix<Double>]) throws -> Matrix<Double>
  ) throws -> Tensor {
    guard let base = inputs.base else { throw MergeError.baseRequired(method: method) }
    let alpha = p.number("alpha")
    let merged: [Double]
    if try isMatrix(inputs.name, shape: base.shape, exclude: p.text("exclude")) {
      merged = try update(inputs.models.map { STFMerge.difference($0, base) }).values
    } else {
      let scale = 1 / Double(inputs.models.count)
      merged = Elementwise.map(base.count) { i in
        inputs.models.reduce(0.0) { $0 + Double($1.scalars[i]) - Double(base.scalars[i]) } * scale
      }
    }
    return Tensor(
      shape: base.shape, scalars: Elementwise.map(base.count) { Float(Double(base.scalars[$0]) + alpha * merged[$0]) })
  }

  /// `G^(-1/2)` for the Gram matrix `G = F Fᵀ` of K row vectors `F`: `G^(-1/2) F` are the
  /// orthonormal rows nearest to `F` (orthogonal Procrustes; the polar factor `P Qᵀ` of
  /// `F = P S Qᵀ`). Eigenvalues at most `1e-12` of the largest (rows that repeat others) are
  /// dropped, so repeated rows share one direction instead of being amplified.
  static func inverseSquareRoot(ofGramOf rows: Matrix<Double>) throws -> DoubleMatrix {
    let k = rows.rows
    let gram = DoubleMatrix(
      rows: k, columns: k, values: BLAS.gram(rows.values, rows: k, columns: rows.columns, ofRows: true))
    let (values, vectors) = try LAPACK.symmetricEigen(gram)
    let cutoff = 1e-12 * (values.last ?? 0)
    var scaled = vectors
    for j in 0..<k {
      let factor = values[j] > cutoff && values[j] > 0 ? 1 / values[j].squareRoot() : 0
      for i in 0..<k { scaled[i, j] *= factor }
    }
    return BLAS.matmul(scaled, vectors, transposeB: true)
  }

  /// `uᵀ C v` for features as rows (`u` K x m, `v` K x n) and a K x K core `C`: the m x n update.
  static func expand(_ u: Matrix<Double>, core: DoubleMatrix, _ v: Matrix<Double>) -> Matrix<Double> {
    let right = Matrix(
      rows: v.rows, columns: v.columns,
      values: BLAS.matmul(core, DoubleMatrix(rows: v.rows, columns: v.columns, values: v.values)).values)
    return u.matmul(right, transposeSelf: true)
  }

  /// The top `rank` singular triplets of one matrix, as rows (exact SVD below 256 on the smaller
  /// side, else from the Gram matrix; see `STFMerge.features`).
  static func triplets(of matrix: Matrix<Double>, rank: Int) throws -> STFMerge.Features<Double> {
    try STFMerge.features(of: [matrix], rank: rank)
  }
}
