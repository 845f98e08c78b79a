import Foundation
import Nets
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
/// get task arithmetic `W_0 + fallback_lambda sum_t dW_t`, by default the mean of the models,
/// streamed range by range when large (an embedding held whole with its inputs would fill the
/// memory budget alone).
/// By default the factorisations and products run in `Float` (the Gram matrix of each task
/// matrix's smaller side, its top eigenpairs only, sgemm), and the K x K systems in `Double`;
/// `precision: float64` runs everything in `Double`, the reference. The result is rounded once.
public struct STFMerge: StreamingMerge {
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
      .choice(
        "precision", ["float32", "float64"], default: "float32",
        help:
          "arithmetic of the factorisations and products (the linear systems are solved in float64); float64 is the reference, about 3x slower"
      ),
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
    guard Self.isLinearMap(inputs.name, shape: base.shape) else { return try mergeThroughRanges(inputs, p) }
    let rank = Self.rank(p, shape: base.shape, tasks: taskCount)
    let (mode, rcond, lambda) = (p.text("mode"), p.number("rcond"), p.number("lambda"))
    func merged<T: NetScalar & LAPACKScalar>(_: T.Type) throws -> [Float] {
      let tasks: [Matrix<T>] = inputs.models.map { Self.difference($0, base) }
      let delta = try Self.superpose(try Self.features(of: tasks, rank: rank), mode: mode, rcond: rcond)
      return Elementwise.map(base.count) { Float(Double(base.scalars[$0]) + lambda * Double(delta.values[$0])) }
    }
    let scalars = p.text("precision") == "float64" ? try merged(Double.self) : try merged(Float.self)
    return Tensor(shape: base.shape, scalars: scalars)
  }

  /// Tensors that are not linear maps and have at least this many elements are streamed.
  static let streamedFallbackCount = 1 << 22

  /// Large tensors that are not linear maps (embeddings, the output head): the runner streams
  /// their task arithmetic instead of holding their inputs whole.
  public func streams(tensor name: String, shape: [Int]) -> Bool {
    !Self.isLinearMap(name, shape: shape) && shape.reduce(1, *) >= Self.streamedFallbackCount
  }

  /// As a vector (not a linear map): `prepare(tensor:shape:)` is the one the runner calls.
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    try prepare(tensor: name, shape: [count], p, scan: scan)
  }

  /// The merge of a tensor that is not a linear map: `W_0 + fallback_lambda sum_t (W_t - W_0)`,
  /// summed in Double. Nil for a linear map, which is merged whole.
  public func prepare(tensor name: String, shape: [Int], _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !Self.isLinearMap(name, shape: shape) else { return nil }
    let models = p.models.count
    let scale = p.optionalNumber("fallback_lambda") ?? 1 / Double(models)
    return RangeMerger(
      WeightedSumForm(
        method: self.name, terms: WeightedSumForm.models(models), weights: Array(repeating: 1, count: models),
        scale: scale, addsBase: true, subtractsBase: true))
  }

  /// Features kept per task of an m x n matrix: the `rank` parameter, or `max(1, min(m, n) / T)`
  /// so that all tasks together keep at most `min(m, n)`.
  static func rank(_ p: ResolvedParameters, shape: [Int], tasks: Int) -> Int {
    let requested = Int(p.number("rank"))
    let side = min(shape[0], shape[1])
    return requested > 0 ? min(requested, side) : max(1, side / max(1, tasks))
  }

  /// The peak of one linear map's merge besides its decoded inputs and result: the task
  /// matrices, the features (per task, then stacked), the larger of one task's factorisation
  /// (its Gram matrix, the reduced copy, the tridiagonal form's vectors and LAPACK's workspace,
  /// the kept vectors) and the K x K systems in Double, and `dW*`.
  public func scratchBytes(name: String, shape: [Int], models: Int, _ p: ResolvedParameters) -> Int {
    guard Self.isLinearMap(name, shape: shape) else { return 0 }
    let (m, n) = (shape[0], shape[1])
    let e = p.text("precision") == "float64" ? 8 : 4
    let r = Self.rank(p, shape: shape, tasks: models)
    let k = models * r
    let factorising = 4 * min(m, n) * min(m, n) * e + 4 * (m + n) * r * e
    let solving = 6 * k * k * 8 + 2 * k * n * 8
    return models * m * n * e + 2 * k * (m + n) * e + max(factorising, solving) + m * n * e
  }

  /// The kept features of all tasks, one per row: `u` (K x m, unit output directions), `v`
  /// (K x n, unit input directions) and their strengths `s`, so that the task matrices map
  /// `v_j` to `s_j u_j`.
  struct Features<T: NetScalar> {
    var u: Matrix<T>
    var v: Matrix<T>
    var s: [Double]

    static func empty(rows m: Int, columns n: Int) -> Features {
      Features(u: Matrix(zeros: 0, m), v: Matrix(zeros: 0, n), s: [])
    }

    /// Features `j` as row `j` of `u` and of `v`, with strength `s[j]`.
    init(u: Matrix<T>, v: Matrix<T>, s: [Double]) {
      precondition(u.rows == s.count && v.rows == s.count, "\(s.count) features with \(u.rows) and \(v.rows) rows")
      self.u = u
      self.v = v
      self.s = s
    }

    /// All tasks' features, stacked.
    init(stacking parts: [Features], rows m: Int, columns n: Int) {
      self.init(
        u: Matrix(rows: parts.reduce(0) { $0 + $1.s.count }, columns: m, values: parts.flatMap(\.u.values)),
        v: Matrix(rows: parts.reduce(0) { $0 + $1.s.count }, columns: n, values: parts.flatMap(\.v.values)),
        s: parts.flatMap(\.s))
    }
  }

  /// `model - base` as an m x n matrix (a task matrix), in `T`.
  public static func difference<T: NetScalar>(_ model: Tensor, _ base: Tensor) -> Matrix<T> {
    Matrix(
      rows: base.shape[0], columns: base.shape[1],
      values: Elementwise.map(base.count) { T(model.scalars[$0]) - T(base.scalars[$0]) })
  }

  /// Matrices whose smaller side reaches this many get their singular triplets from the Gram
  /// matrix of that side (`syrk`, then only the kept eigenpairs by `LAPACK.largestEigenpairs`:
  /// several times faster than a full SVD); smaller ones from the exact SVD (`dgesdd`).
  static let gramMethodSide = 256

  /// Features whose strength is at most this fraction of the task's largest are dropped: 1e-12
  /// from the exact SVD; from a Gram matrix in precision `T`, whose eigenvalues carry absolute
  /// errors near `eps * sigma_max^2`, `3 sqrt(eps)` (1e-3 in Float) and at least 1e-6.
  static func cutoff<T: NetScalar>(gram: Bool, _: T.Type) -> Double {
    gram ? max(1e-6, 3 * Double(T.ulpOfOne).squareRoot()) : 1e-12
  }

  /// The top `rank` singular triplets of each task matrix (those above `cutoff`; a zero task
  /// matrix contributes none), stacked in task order.
  static func features<T: NetScalar & LAPACKScalar>(
    of tasks: [Matrix<T>], rank: Int, gramSide: Int = gramMethodSide
  ) throws -> Features<T> {
    let (m, n) = (tasks.first?.rows ?? 0, tasks.first?.columns ?? 0)
    // The tasks side by side, BLAS on one thread each: the eigensolver runs mostly on one core.
    let parts = ResultSlots<Features<T>>(count: tasks.count)
    try BLAS.singleThreaded {
      try Parallel.forEachTakingTurns(tasks.count) { t in
        let task = tasks[t]
        parts.set(
          t,
          min(task.rows, task.columns) >= gramSide
            ? try gramTriplets(task, rank: rank) : try exactTriplets(task, rank: rank))
      }
    }
    return Features(stacking: tasks.indices.map(parts.get), rows: m, columns: n)
  }

  /// The top triplets from the exact SVD, computed in Double.
  static func exactTriplets<T: NetScalar>(_ task: Matrix<T>, rank: Int) throws -> Features<T> {
    let (m, n) = (task.rows, task.columns)
    let (u, sigma, vt) = try LAPACK.svd(DoubleMatrix(rows: m, columns: n, values: task.values.map { Double($0) }))
    guard let largest = sigma.first, largest > 0 else { return .empty(rows: m, columns: n) }
    let kept = (0..<min(rank, sigma.count)).filter { sigma[$0] > cutoff(gram: false, T.self) * largest }
    return Features(
      u: Matrix(rows: kept.count, columns: m, values: kept.flatMap { k in (0..<m).map { T(u[$0, k]) } }),
      v: Matrix(rows: kept.count, columns: n, values: kept.flatMap { k in (0..<n).map { T(vt[k, $0]) } }),
      s: kept.map { sigma[$0] })
  }

  /// The top triplets from the kept eigenvectors of the Gram matrix of the smaller side: for
  /// m <= n, `A Aᵀ = U S² Uᵀ` and `s_k v_k = Aᵀ u_k` (else the same on `Aᵀ`). Each strength is
  /// the norm of `Aᵀ u_k` (or `A v_k`), accurate to the precision of `T` where the eigenvalue's
  /// square root would not be.
  static func gramTriplets<T: NetScalar & LAPACKScalar>(_ task: Matrix<T>, rank: Int) throws -> Features<T> {
    let (m, n) = (task.rows, task.columns)
    let wide = m <= n
    let (side, other) = wide ? (m, n) : (n, m)
    let count = min(rank, side)
    let gram = BLAS.gram(task.values, rows: m, columns: n, ofRows: wide)
    let basis = try LAPACK.largestEigenpairs(gram, order: side, count: count).vectorRows  // count x side
    var mapped = [T](repeating: 0, count: count * other)  // the other side's vectors times sigma
    BLAS.gemm(basis, count, side, task.values, m, n, transposeB: !wide, into: &mapped)
    let sigma = (0..<count).map { j in
      Elementwise.blockSum(0..<other) { Double(mapped[j * other + $0]) * Double(mapped[j * other + $0]) }.squareRoot()
    }
    guard let largest = sigma.max(), largest > 0 else { return .empty(rows: m, columns: n) }
    let kept = (0..<count).filter { sigma[$0] > cutoff(gram: true, T.self) * largest }
    let small = Matrix(
      rows: kept.count, columns: side, values: kept.flatMap { basis[($0 * side)..<($0 * side + side)] })
    let large = Matrix(
      rows: kept.count, columns: other,
      values: kept.flatMap { j in mapped[(j * other)..<(j * other + other)].map { $0 / T(sigma[j]) } })
    let s = kept.map { sigma[$0] }
    return wide ? Features(u: small, v: large, s: s) : Features(u: large, v: small, s: s)
  }

  /// Solves STF's linear system and returns `dW*` (m x n) in the precision of the features:
  /// the Gram matrices of the features in `T`, the K x K system in Double, `dW* = Uᵀ diag(c) X`
  /// by one product.
  static func superpose<T: NetScalar>(_ f: Features<T>, mode: String, rcond: Double) throws -> Matrix<T> {
    let (k, m, n) = (f.s.count, f.u.columns, f.v.columns)
    guard k > 0 else { return Matrix(zeros: m, n) }
    func gram(_ rows: Matrix<T>) -> DoubleMatrix {
      DoubleMatrix(
        rows: k, columns: k,
        values: BLAS.gram(rows.values, rows: k, columns: rows.columns, ofRows: true).map(Double.init))
    }
    let gramV = gram(f.v)  // VᵀV, K x K
    var right: Matrix<T>  // K x n: dW* = Uᵀ-rows times this
    if mode == "outputs" {
      // dW* = U diag(s) (VᵀV)⁺ Vᵀ; the eigenvalues of VᵀV are the squared singular values of V.
      let x = try solve(
        gramV, DoubleMatrix(rows: k, columns: n, values: f.v.values.map { Double($0) }), rcond: rcond * rcond)
      right = Matrix(rows: k, columns: n, values: Elementwise.map(k * n) { T(f.s[$0 / n] * x.values[$0]) })
    } else {
      // Projection: (UᵀU ∘ VᵀV) a = s, dW* = U diag(a) Vᵀ.
      var system = gram(f.u)
      for i in 0..<(k * k) { system.values[i] *= gramV.values[i] }
      let a = try solve(system, DoubleMatrix(rows: k, columns: 1, values: f.s), rcond: rcond).values
      right = f.v
      for j in 0..<k { for i in 0..<n { right.values[j * n + i] *= T(a[j]) } }
    }
    return f.u.matmul(right, transposeSelf: true)
  }

  /// `a⁺ b` for a symmetric positive semi-definite `a`: by Cholesky when `a` is well within
  /// `rcond` (estimated condition at most 1% of `1 / rcond`, so no eigenvalue would be dropped),
  /// else from its eigendecomposition, dropping eigenvalues <= rcond * the largest.
  static func solve(_ a: DoubleMatrix, _ b: DoubleMatrix, rcond: Double) throws -> DoubleMatrix {
    if rcond > 0, let x = try LAPACK.wellConditionedCholeskySolve(a, b, maxCondition: 0.01 / rcond) { return x }
    return BLAS.matmul(try pseudoInverse(a, rcond: rcond), b)
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
