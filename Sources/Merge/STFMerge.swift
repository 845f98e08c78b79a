import Foundation
import Tensor

/// STF: superpose the task-specific features of every model in one linear map per weight matrix.
///
/// For each 2-D linear weight W (m x n), each task matrix `dW_t = W_t - W_0` is decomposed by SVD;
/// its top r_t right singular vectors v (input features) map to `sigma u` (output features).
/// Stacking every kept feature of every task (U, V, s; K columns in all), one small K x K linear
/// system finds the merged `dW*`:
/// - `projection` (default): `dW* = U diag(a) Vᵀ` with `(UᵀU ∘ VᵀV) a = s`, so every feature keeps its
///   strength along its own direction, `u_jᵀ dW* v_j = s_j`;
/// - `outputs`: the minimum-norm `dW*` with `dW* V = U diag(s)`, so `W* v = W_t v` for every kept
///   feature v of every task.
/// Singular systems are solved in the minimum-norm least-squares sense (eigenvalues below `rcond`
/// of the largest are dropped), which averages the outputs of conflicting features. Then
/// `W* = W_0 + lambda dW*`. Tensors that are not linear maps (1-D, embeddings, the output head)
/// get task arithmetic `W_0 + fallback_lambda sum_t dW_t`, by default the mean of the models.
/// SVDs, Gram matrices and solves run in Double; the result is rounded once.
public struct STFMerge: MergeMethod {
  public init() {}
  public var name: String { "stf" }
  public var summary: String { "superpose the task-specific features of each weight matrix by solving a linear system" }
  public var reference: String {
    "Qiu et al., Superpose Task-specific Features for Model Merging, EMNLP 2025 (arXiv:2502.10698)"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .choice(
        "mode", ["projection", "outputs"], default: "projection",
        help: "which property of each feature the merged map preserves"),
      .number(
        "rank", .global, in: 0...Double(Int32.max), default: 0,
        help: "features kept per task and matrix; 0: max(1, min(m, n) / T)"),
      .number("lambda", .global, default: 1, help: "scale of the merged task matrix"),
      .number(
        "fallback_lambda", .global, default: nil, optional: true,
        help: "task-arithmetic scale for tensors that are not linear maps (default 1/T: the mean of the models)"),
      .number(
        "rcond", .global, in: 0...1, default: 1e-6,
        help: "relative cut-off below which the linear system's directions are dropped"),
    ]
  }

  /// Whether STF treats a tensor as a linear map: 2-D and not an embedding table or output head.
  public static func isLinearMap(_ name: String, shape: [Int]) -> Bool {
    guard shape.count == 2, shape[0] > 1, shape[1] > 1 else { return false }
    let lower = name.lowercased()
    return !["embed", "lm_head", "wte", "wpe", "shared.weight", "word_embeddings", "position_embeddings"].contains {
      lower.contains($0)
    }
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let base = inputs.base else { throw MergeError.baseRequired(method: name) }
    let taskCount = inputs.models.count
    guard Self.isLinearMap(inputs.name, shape: base.shape) else {
      let scale = p.optionalNumber("fallback_lambda") ?? 1 / Double(taskCount)
      let merged = Elementwise.map(base.count) { i in
        var sum = 0.0
        for model in inputs.models { sum += Double(model.scalars[i]) - Double(base.scalars[i]) }
        return Float(Double(base.scalars[i]) + scale * sum)
      }
      return Tensor(shape: base.shape, scalars: merged)
    }
    let (m, n) = (base.shape[0], base.shape[1])
    let requested = Int(p.number("rank"))
    let rank = requested > 0 ? min(requested, m, n) : max(1, min(m, n) / taskCount)
    let features = try Self.features(of: inputs.models.map { Self.difference($0, base) }, rank: rank)
    let delta = try Self.superpose(features, mode: p.text("mode"), rcond: p.number("rcond"), rows: m, columns: n)
    let lambda = p.number("lambda")
    let merged = Elementwise.map(base.count) { Float(Double(base.scalars[$0]) + lambda * delta.values[$0]) }
    return Tensor(shape: base.shape, scalars: merged)
  }

  /// The kept features of all tasks: `u` (m x K), `v` (n x K), strengths `s` (K).
  struct Features {
    var u: DoubleMatrix
    var v: DoubleMatrix
    var s: [Double]
  }

  static func difference(_ model: Tensor, _ base: Tensor) -> DoubleMatrix {
    DoubleMatrix(
      rows: base.shape[0], columns: base.shape[1],
      values: Elementwise.map(base.count) { Double(model.scalars[$0]) - Double(base.scalars[$0]) })
  }

  /// Matrices whose smaller side reaches this many get their singular triplets from the Gram
  /// matrix of that side (`dsyrk` + `dsyevd`, several times faster than `dgesdd` on large
  /// matrices); smaller ones from `dgesdd`.
  static let gramMethodSide = 256

  /// The top `rank` singular triplets of each task matrix, dropping those with sigma <= 1e-12
  /// sigma_max (1e-6 by the Gram method, whose small singular values are less accurate); a zero
  /// task matrix contributes none.
  static func features(of tasks: [DoubleMatrix], rank: Int, gramSide: Int = gramMethodSide) throws -> Features {
    var columnsU: [[Double]] = []
    var columnsV: [[Double]] = []
    var s: [Double] = []
    for task in tasks {
      let triplets =
        min(task.rows, task.columns) >= gramSide
        ? try topTriplets(task, rank: rank) : try exactTriplets(task, rank: rank)
      columnsU += triplets.u
      columnsV += triplets.v
      s += triplets.s
    }
    func matrix(_ columns: [[Double]], rows: Int) -> DoubleMatrix {
      var out = DoubleMatrix(zeros: rows, columns.count)
      for (j, column) in columns.enumerated() { for i in 0..<rows { out[i, j] = column[i] } }
      return out
    }
    let rows = tasks.first?.rows ?? 0
    let cols = tasks.first?.columns ?? 0
    return Features(u: matrix(columnsU, rows: rows), v: matrix(columnsV, rows: cols), s: s)
  }

  static func exactTriplets(_ task: DoubleMatrix, rank: Int) throws -> (u: [[Double]], v: [[Double]], s: [Double]) {
    let (u, sigma, vt) = try LAPACK.svd(task)
    guard let largest = sigma.first, largest > 0 else { return ([], [], []) }
    let kept = (0..<min(rank, sigma.count)).filter { sigma[$0] > 1e-12 * largest }
    return (kept.map { u.column($0) }, kept.map { k in (0..<vt.columns).map { vt[k, $0] } }, kept.map { sigma[$0] })
  }

  /// The top triplets from the eigenvectors of the Gram matrix of the smaller side: for m <= n,
  /// `A A^T = U S^2 U^T` and `v_k = A^T u_k / s_k` (else the same on `A^T`).
  static func topTriplets(_ task: DoubleMatrix, rank: Int) throws -> (u: [[Double]], v: [[Double]], s: [Double]) {
    let wide = task.rows <= task.columns
    let a = wide ? transposed(task) : task  // the Gram of a's columns is the smaller side's
    let (values, vectors) = try LAPACK.symmetricEigen(BLAS.gram(a))
    let side = values.count
    guard let largest = values.last, largest > 0 else { return ([], [], []) }
    let kept = (0..<min(rank, side)).map { side - 1 - $0 }.filter { values[$0] > 1e-12 * largest }
    var basis = DoubleMatrix(zeros: side, kept.count)
    for (j, k) in kept.enumerated() { for i in 0..<side { basis[i, j] = vectors[i, k] } }
    let sigma = kept.map { values[$0].squareRoot() }
    var other = BLAS.matmul(a, basis)  // the other side's vectors times sigma
    for i in 0..<other.rows { for j in 0..<kept.count { other[i, j] /= sigma[j] } }
    let small = (0..<kept.count).map { basis.column($0) }
    let large = (0..<kept.count).map { other.column($0) }
    return wide ? (small, large, sigma) : (large, small, sigma)
  }

  static func transposed(_ m: DoubleMatrix) -> DoubleMatrix {
    var t = DoubleMatrix(zeros: m.columns, m.rows)
    for i in 0..<m.rows { for j in 0..<m.columns { t.values[j * m.rows + i] = m.values[i * m.columns + j] } }
    return t
  }

  /// Solves STF's linear system and returns `dW*` (m x n).
  static func superpose(_ f: Features, mode: String, rcond: Double, rows m: Int, columns n: Int) throws -> DoubleMatrix
  {
    let k = f.s.count
    guard k > 0 else { return DoubleMatrix(zeros: m, n) }
    let gramV = BLAS.gram(f.v)  // K x K
    if mode == "outputs" {
      // dW* = B V⁺ = B (VᵀV)⁺ Vᵀ with B = U diag(s).
      let pinv = try pseudoInverse(gramV, rcond: rcond * rcond)  // eigenvalues of VᵀV are squared singular values of V
      var b = f.u
      for i in 0..<m { for j in 0..<k { b[i, j] *= f.s[j] } }
      let coefficients = BLAS.matmul(b, pinv)  // m x K
      return BLAS.matmul(coefficients, f.v, transposeB: true)
    }
    // Projection: (UᵀU ∘ VᵀV) a = s, dW* = U diag(a) Vᵀ.
    var system = BLAS.gram(f.u)
    for i in 0..<(k * k) { system.values[i] *= gramV.values[i] }
    let pinv = try pseudoInverse(system, rcond: rcond)
    let a = BLAS.matmul(pinv, DoubleMatrix(rows: k, columns: 1, values: f.s)).values
    var scaled = f.u
    for i in 0..<m { for j in 0..<k { scaled[i, j] *= a[j] } }
    return BLAS.matmul(scaled, f.v, transposeB: true)
  }

  /// Pseudo-inverse of a symmetric positive semi-definite matrix from its eigendecomposition,
  /// dropping eigenvalues <= rcond * the largest.
  static func pseudoInverse(_ a: DoubleMatrix, rcond: Double) throws -> DoubleMatrix {
    let (values, vectors) = try LAPACK.symmetricEigen(a)
    let cutoff = rcond * (values.last ?? 0)
    var scaled = vectors
    let n = a.rows
    for j in 0..<n {
      let inverse = values[j] > cutoff && values[j] > 0 ? 1 / values[j] : 0
      for i in 0..<n { scaled[i, j] *= inverse }
    }
    return BLAS.matmul(scaled, vectors, transposeB: true)
  }
}
