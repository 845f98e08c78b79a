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

  /// The peak of one matrix's merge besides its decoded inputs and result, in Double: the task
  /// matrices and their sum, the update and its copies on the way out (five m x n in all), a
  /// Gram matrix with LAPACK's copy and workspace, the stacked features (`k` of them, twice
  /// while stacking), and the k x k Gram matrices with their eigenvectors and products. 0 for
  /// tensors that take the mean task vector.
  static func scratchBytes(
    name: String, shape: [Int], models: Int, _ p: ResolvedParameters, features k: (_ side: Int) -> Int
  ) -> Int {
    guard (try? isMatrix(name, shape: shape, exclude: p.text("exclude"))) == true else { return 0 }
    let (m, n) = (shape[0], shape[1])
    let r = min(m, n)
    let kept = k(r)
    return 8 * ((models + 5) * m * n + 4 * r * r + 2 * kept * (m + n) + 6 * kept * kept)
  }

  /// Whether `name` of `shape` gets the SVD treatment: 2-D, both sides above 1, and not excluded.
  static func isMatrix(_ name: String, shape: [Int], exclude: String) throws -> Bool {
    guard shape.count == 2, shape[0] > 1, shape[1] > 1 else { return false }
    guard !exclude.isEmpty else { return true }
    let pattern = try Regex(exclude)
    return !name.contains(pattern)
  }

  /// The per-tensor flow: `W_0 + alpha update(D_1, ..., D_T)` for matrices, the mean task vector
  /// for other tensors. When every task vector comes as triplets (low-rank task vectors),
  /// `factored` computes the update from them and no task matrix is formed.
  static func merge(
    _ inputs: MergeInputs, _ p: ResolvedParameters, method: String,
    update: ([Matrix<Double>]) throws -> Matrix<Double>,
    factored: ([Features<Double>]) throws -> Matrix<Double>
  ) throws -> Tensor {
    guard let base = inputs.base else { throw MergeError.baseRequired(method: method) }
    let alpha = p.number("alpha")
    let isMatrix = try isMatrix(inputs.name, shape: base.shape, exclude: p.text("exclude"))
    let merged: [Double]
    if let stored = inputs.taskVectors {
      let factors = stored.compactMap { vector -> SingularFactors? in
        if case .factored(let f) = vector { return f }
        return nil
      }
      if isMatrix && factors.count == stored.count {
        merged = try factored(factors.map(features(of:))).values
      } else {
        let dense = stored.map { $0.dense.scalars }
        if isMatrix {
          merged = try update(
            dense.map { Matrix(rows: base.shape[0], columns: base.shape[1], values: $0.map { Double($0) }) }
          ).values
        } else {
          let scale = 1 / Double(dense.count)
          merged = Elementwise.map(base.count) { i in dense.reduce(0.0) { $0 + Double($1[i]) } * scale }
        }
      }
    } else if isMatrix {
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

  typealias Features = STFMerge.Features

  /// Stored triplets as features (rows), in Double.
  static func features(of f: SingularFactors) -> Features<Double> {
    let (m, n, k) = (f.rows, f.columns, f.rank)
    var u = [Double](repeating: 0, count: k * m)
    for i in 0..<m { for j in 0..<k { u[j * m + i] = Double(f.u.scalars[i * k + j]) } }
    return Features(
      u: Matrix(rows: k, columns: m, values: u),
      v: Matrix(rows: k, columns: n, values: f.vt.scalars.map { Double($0) }),
      s: f.s.map { Double($0) })
  }

  /// The first `count` features (the strongest, for triplets stored in order).
  static func leading(_ f: Features<Double>, _ count: Int) -> Features<Double> {
    let k = min(count, f.s.count)
    return Features(
      u: Matrix(rows: k, columns: f.u.columns, values: Array(f.u.values.prefix(k * f.u.columns))),
      v: Matrix(rows: k, columns: f.v.columns, values: Array(f.v.values.prefix(k * f.v.columns))),
      s: Array(f.s.prefix(k)))
  }

  /// The SVD of `sum_j s_j l_j r_jᵀ` (rows `l_j` of `f.u`, `r_j` of `f.v`, not orthonormal)
  /// without forming it: with `L = Q_l B_l` and `R = Q_r B_r` from the eigendecompositions of the
  /// K x K Gram matrices, the SVD of the small core `B_l diag(s) B_rᵀ` rotated back. Directions
  /// below `1e-6` of the largest singular value (or of `scale`) are dropped, as in
  /// `triplets(of:)`. Cost `O((m + n) K² + K³)`.
  static func svd(ofSum f: Features<Double>, scale: Double = 0) throws -> Features<Double> {
    let k = f.s.count
    guard k > 0 else { return f }
    /// For rows `F`: `B = Λ^(1/2) Eᵀ` (F's coordinates in an orthonormal basis of its
    /// span, `F = Bᵀ Q`) and `C = Λ^(-1/2) Eᵀ` (so `C F = Q`, that basis as rows), from
    /// `F Fᵀ = E Λ Eᵀ`, without the directions `F` does not span.
    func split(_ rows: Matrix<Double>) throws -> (b: DoubleMatrix, toOrthonormal: DoubleMatrix) {
      let (values, vectors) = try gramEigen(rows)
      let kept = (0..<k).filter { values[$0] > 1e-12 * (values.last ?? 0) && values[$0] > 0 }
      var b = DoubleMatrix(zeros: kept.count, k)  // Λ^(1/2) Eᵀ
      var c = DoubleMatrix(zeros: kept.count, k)  // Λ^(-1/2) Eᵀ
      for (r, j) in kept.enumerated() {
        let root = values[j].squareRoot()
        for i in 0..<k {
          b[r, i] = root * vectors[i, j]
          c[r, i] = vectors[i, j] / root
        }
      }
      return (b, c)
    }
    let (bl, cl) = try split(f.u)
    let (br, cr) = try split(f.v)
    var scaled = bl
    for i in 0..<scaled.rows { for j in 0..<k { scaled[i, j] *= f.s[j] } }
    let core = BLAS.matmul(scaled, br, transposeB: true)  // K'_l x K'_r
    let (p, sigma, wt) = try LAPACK.svd(core)
    let largest = max(sigma.first ?? 0, scale)
    let kept = (0..<sigma.count).filter { sigma[$0] > 1e-6 * largest && sigma[$0] > 0 }
    func rows(_ rotation: DoubleMatrix, _ c: DoubleMatrix, _ original: Matrix<Double>) -> Matrix<Double> {
      // Rows (rotationᵀ C) original, for the kept directions only.
      let map = BLAS.matmul(rotation, c)  // kept x K
      let out = BLAS.matmul(map, DoubleMatrix(rows: k, columns: original.columns, values: original.values))
      return Matrix(rows: out.rows, columns: out.columns, values: out.values)
    }
    var pt = DoubleMatrix(zeros: kept.count, p.rows)
    for (r, j) in kept.enumerated() { for i in 0..<p.rows { pt[r, i] = p[i, j] } }
    var w = DoubleMatrix(zeros: kept.count, wt.columns)
    for (r, j) in kept.enumerated() { for i in 0..<wt.columns { w[r, i] = wt[j, i] } }
    return Features(u: rows(pt, cl, f.u), v: rows(w, cr, f.v), s: kept.map { sigma[$0] })
  }

  /// Several tasks' features as one set of rows (for sums).
  static func stacked(_ parts: [Features<Double>]) -> Features<Double> {
    Features(stacking: parts, rows: parts.first?.u.columns ?? 0, columns: parts.first?.v.columns ?? 0)
  }

  /// `G^(-1/2)` for the Gram matrix `G = F Fᵀ` of K row vectors `F`: `G^(-1/2) F` are the
  /// orthonormal rows nearest to `F` (orthogonal Procrustes; the polar factor `P Qᵀ` of
  /// `F = P S Qᵀ`). Eigenvalues at most `1e-14` of the largest are dropped: near the rounding of
  /// a Double Gram matrix (rows that repeat others), so repeated rows share one direction
  /// instead of being amplified. Real task vectors do reach 1e-12 (a right singular vector
  /// that three tasks nearly share), and the official SVD-based polar factor keeps those.
  static func inverseSquareRoot(ofGramOf rows: Matrix<Double>) throws -> DoubleMatrix {
    let k = rows.rows
    let (values, vectors) = try gramEigen(rows)
    let cutoff = 1e-14 * (values.last ?? 0)
    var scaled = vectors
    for j in 0..<k {
      let factor = values[j] > cutoff && values[j] > 0 ? 1 / values[j].squareRoot() : 0
      for i in 0..<k { scaled[i, j] *= factor }
    }
    return BLAS.matmul(scaled, vectors, transposeB: true)
  }

  /// The eigendecomposition of `F Fᵀ` for rows `F` (values ascending, vectors as columns).
  static func gramEigen(_ rows: Matrix<Double>) throws -> (values: [Double], vectors: DoubleMatrix) {
    let k = rows.rows
    return try LAPACK.symmetricEigen(
      DoubleMatrix(rows: k, columns: k, values: BLAS.gram(rows.values, rows: k, columns: rows.columns, ofRows: true)))
  }

  /// `uᵀ C v` for features as rows (`u` K x m, `v` K x n) and a K x K core `C`: the m x n update.
  static func expand(_ u: Matrix<Double>, core: DoubleMatrix, _ v: Matrix<Double>) -> Matrix<Double> {
    let right = Matrix(
      rows: v.rows, columns: v.columns,
      values: BLAS.matmul(core, DoubleMatrix(rows: v.rows, columns: v.columns, values: v.values)).values)
    return u.matmul(right, transposeSelf: true)
  }

  /// The top `rank` singular triplets of one matrix, as rows (exact SVD below 256 on the smaller
  /// side, else from the Gram matrix; see `STFMerge.features`), without those below `1e-6` of
  /// the largest (or of `scale`, when that is larger: the size of the matrix this one was cut
  /// from): directions of a rank-deficient matrix that rounding alone puts there.
  static func triplets(of matrix: Matrix<Double>, rank: Int, scale: Double = 0) throws -> STFMerge.Features<Double> {
    let f = try STFMerge.features(of: [matrix], rank: rank)
    let largest = max(f.s.first ?? 0, scale)
    return leading(f, f.s.prefix { $0 > 1e-6 * largest }.count)
  }
}

extension SingularFactors {
  /// The top `rank` singular triplets of `matrix` as f32 factors (computed in Double: the exact
  /// SVD below 256 on the smaller side, else the Gram matrix of that side), padded with zero
  /// triplets where the matrix has fewer (a zero or low-rank matrix).
  public init(truncating matrix: Matrix<Double>, rank k: Int) throws {
    let f = try STFMerge.features(of: [matrix], rank: k)
    let (m, n) = (matrix.rows, matrix.columns)
    var u = [Float](repeating: 0, count: m * k)
    var vt = [Float](repeating: 0, count: k * n)
    var s = [Float](repeating: 0, count: k)
    for j in 0..<f.s.count {
      s[j] = Float(f.s[j])
      for i in 0..<m { u[i * k + j] = Float(f.u.values[j * m + i]) }
      for i in 0..<n { vt[j * n + i] = Float(f.v.values[j * n + i]) }
    }
    self.init(u: Tensor(shape: [m, k], scalars: u), s: s, vt: Tensor(shape: [k, n], scalars: vt))
  }
}
