import CLAPACKE

/// Errors from LAPACK routines: only genuine numerical failures (`info > 0`); `info < 0` is a bug.
public enum LinearAlgebraError: Error, CustomStringConvertible, Equatable {
  /// The matrix is exactly singular: pivot `pivot` (1-based) is zero.
  case singular(pivot: Int)
  /// A Cholesky factorisation met a non-positive pivot: the matrix is not positive definite.
  case notPositiveDefinite(order: Int)
  /// An iterative routine (SVD, eigendecomposition) did not converge.
  case noConvergence(routine: String)

  public var description: String {
    switch self {
    case .singular(let pivot):
      return "the matrix is singular (zero pivot at position \(pivot)); the system has no unique solution"
    case .notPositiveDefinite(let order): return "the matrix is not positive definite (leading minor of order \(order))"
    case .noConvergence(let routine): return "\(routine) did not converge; the matrix may hold NaN or infinite values"
    }
  }
}

/// A thin singular value decomposition `a = u diag(s) vt` of an m x n matrix, k = min(m, n) (or
/// the requested rank): `u` m x k with orthonormal columns, `s` descending, `vt` k x n.
public struct SVD: Sendable {
  public var u: Tensor
  public var s: [Float]
  public var vt: Tensor

  /// `u diag(s) vt`.
  public var reconstructed: Tensor {
    var scaled = u
    let k = s.count
    for i in 0..<u.shape[0] { for j in 0..<k { scaled.scalars[i * k + j] *= s[j] } }
    return BLAS.matmul(scaled, vt)
  }
}

/// The LAPACK layer: the only file that calls LAPACKE. Every routine works on copies; inputs are
/// never modified.
public enum LAPACK {
  /// Solves `a x = b` for square `a (n x n)` and `b (n x m)` by LU with partial pivoting (`sgesv`).
  /// Throws `LinearAlgebraError.singular` when `a` is singular.
  public static func solve(_ a: Tensor, _ b: Tensor) throws -> Tensor {
    precondition(a.shape.count == 2 && a.shape[0] == a.shape[1], "solve needs a square matrix, got \(a.shape)")
    precondition(b.shape.count == 2 && b.shape[0] == a.shape[0], "right-hand side \(b.shape) does not match \(a.shape)")
    let n = BLAS.int32(a.shape[0])
    let m = BLAS.int32(b.shape[1])
    var lu = a.scalars
    var x = b.scalars
    var pivots = [Int32](repeating: 0, count: a.shape[0])
    let info = LAPACKE_sgesv(LAPACK_ROW_MAJOR, n, m, &lu, n, &pivots, &x, m)
    try check(info, "sgesv") { .singular(pivot: $0) }
    return Tensor(shape: b.shape, scalars: x)
  }

  /// Solves `a x = b` in double precision by LU with partial pivoting (`dgesv`).
  public static func solve(_ a: DoubleMatrix, _ b: DoubleMatrix) throws -> DoubleMatrix {
    precondition(
      a.rows == a.columns && b.rows == a.rows,
      "solve: \(a.rows)x\(a.columns) with right-hand side \(b.rows)x\(b.columns)")
    var lu = a.values
    var x = b
    var pivots = [Int32](repeating: 0, count: a.rows)
    let info = LAPACKE_dgesv(
      LAPACK_ROW_MAJOR, BLAS.int32(a.rows), BLAS.int32(b.columns), &lu, BLAS.int32(a.rows), &pivots, &x.values,
      BLAS.int32(b.columns))
    try check(info, "dgesv") { .singular(pivot: $0) }
    return x
  }

  /// Solves `a x = b` for symmetric positive definite `a` by Cholesky (`dposv`); throws
  /// `.notPositiveDefinite` otherwise (callers fall back to a rank-revealing solver).
  public static func choleskySolve(_ a: DoubleMatrix, _ b: DoubleMatrix) throws -> DoubleMatrix {
    precondition(
      a.rows == a.columns && b.rows == a.rows,
      "choleskySolve: \(a.rows)x\(a.columns) with right-hand side \(b.rows)x\(b.columns)")
    var factor = a.values
    var x = b
    let n = BLAS.int32(a.rows)
    let info = LAPACKE_dposv(
      LAPACK_ROW_MAJOR, ascii("U"), n, BLAS.int32(b.columns), &factor, n, &x.values, BLAS.int32(b.columns))
    try check(info, "dposv") { .notPositiveDefinite(order: $0) }
    return x
  }

  /// Thin QR factorisation `a = q r` (`sgeqrf`, `sorgqr`): for m x n, k = min(m, n), `q` is
  /// m x k with orthonormal columns and `r` k x n upper triangular.
  public static func qr(_ a: Tensor) -> (q: Tensor, r: Tensor) {
    precondition(a.shape.count == 2, "qr needs a matrix, got \(a.shape)")
    let (m, n) = (a.shape[0], a.shape[1])
    let k = min(m, n)
    guard k > 0 else { return (Tensor(zeros: [m, 0]), Tensor(zeros: [0, n])) }
    var work = a.scalars
    var tau = [Float](repeating: 0, count: k)
    let info = LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, BLAS.int32(m), BLAS.int32(n), &work, BLAS.int32(n), &tau)
    precondition(info == 0, "LAPACKE_sgeqrf failed with \(info)")
    var r = Tensor(zeros: [k, n])
    for i in 0..<k { for j in i..<n { r.scalars[i * n + j] = work[i * n + j] } }
    // Q from the reflectors: the first k columns of the factored matrix.
    var q = [Float](repeating: 0, count: m * k)
    for i in 0..<m { for j in 0..<k { q[i * k + j] = work[i * n + j] } }
    let info2 = LAPACKE_sorgqr(LAPACK_ROW_MAJOR, BLAS.int32(m), BLAS.int32(k), BLAS.int32(k), &q, BLAS.int32(k), &tau)
    precondition(info2 == 0, "LAPACKE_sorgqr failed with \(info2)")
    return (Tensor(shape: [m, k], scalars: q), r)
  }

  /// Thin SVD by divide and conquer (`sgesdd`).
  public static func svd(_ a: Tensor) throws -> SVD {
    precondition(a.shape.count == 2, "svd needs a matrix, got \(a.shape)")
    let (m, n) = (a.shape[0], a.shape[1])
    let k = min(m, n)
    guard k > 0 else { return SVD(u: Tensor(zeros: [m, 0]), s: [], vt: Tensor(zeros: [0, n])) }
    var work = a.scalars
    var s = [Float](repeating: 0, count: k)
    var u = [Float](repeating: 0, count: m * k)
    var vt = [Float](repeating: 0, count: k * n)
    let info = LAPACKE_sgesdd(
      LAPACK_ROW_MAJOR, ascii("S"), BLAS.int32(m), BLAS.int32(n), &work, BLAS.int32(n), &s, &u, BLAS.int32(k), &vt,
      BLAS.int32(n))
    try check(info, "sgesdd") { _ in .noConvergence(routine: "SVD (sgesdd)") }
    return SVD(u: Tensor(shape: [m, k], scalars: u), s: s, vt: Tensor(shape: [k, n], scalars: vt))
  }

  /// Thin SVD in double precision (`dgesdd`): `u` m x k, `s` descending, `vt` k x n.
  public static func svd(_ a: DoubleMatrix) throws -> (u: DoubleMatrix, s: [Double], vt: DoubleMatrix) {
    let (m, n) = (a.rows, a.columns)
    let k = min(m, n)
    guard k > 0 else { return (DoubleMatrix(zeros: m, 0), [], DoubleMatrix(zeros: 0, n)) }
    var work = a.values
    var s = [Double](repeating: 0, count: k)
    var u = DoubleMatrix(zeros: m, k)
    var vt = DoubleMatrix(zeros: k, n)
    let info = LAPACKE_dgesdd(
      LAPACK_ROW_MAJOR, ascii("S"), BLAS.int32(m), BLAS.int32(n), &work, BLAS.int32(n), &s, &u.values, BLAS.int32(k),
      &vt.values, BLAS.int32(n))
    try check(info, "dgesdd") { _ in .noConvergence(routine: "SVD (dgesdd)") }
    return (u, s, vt)
  }

  /// Eigendecomposition of a symmetric matrix (`dsyevd`, upper triangle read): eigenvalues
  /// ascending, eigenvectors as the columns of `vectors`.
  public static func symmetricEigen(_ a: DoubleMatrix) throws -> (values: [Double], vectors: DoubleMatrix) {
    precondition(a.rows == a.columns, "symmetricEigen needs a square matrix, got \(a.rows)x\(a.columns)")
    var vectors = a
    var values = [Double](repeating: 0, count: a.rows)
    guard a.rows > 0 else { return (values, vectors) }
    let info = LAPACKE_dsyevd(
      LAPACK_ROW_MAJOR, ascii("V"), ascii("U"), BLAS.int32(a.rows), &vectors.values, BLAS.int32(a.rows), &values)
    try check(info, "dsyevd") { _ in .noConvergence(routine: "eigendecomposition (dsyevd)") }
    return (values, vectors)
  }

  /// The eigenvalues of a symmetric matrix, ascending (`dsyevd` without vectors, upper triangle
  /// read): the tridiagonal reduction and a root-free QR on it, a fraction of the cost of
  /// `symmetricEigen` when only the spectrum is wanted.
  public static func symmetricEigenvalues(_ a: DoubleMatrix) throws -> [Double] {
    precondition(a.rows == a.columns, "symmetricEigenvalues needs a square matrix, got \(a.rows)x\(a.columns)")
    var work = a.values
    var values = [Double](repeating: 0, count: a.rows)
    guard a.rows > 0 else { return values }
    let info = LAPACKE_dsyevd(
      LAPACK_ROW_MAJOR, ascii("N"), ascii("U"), BLAS.int32(a.rows), &work, BLAS.int32(a.rows), &values)
    try check(info, "dsyevd") { _ in .noConvergence(routine: "eigenvalues (dsyevd)") }
    return values
  }

  /// The `count` largest eigenpairs of a symmetric `n x n` matrix (row-major; one triangle is
  /// read, so either layout serves): eigenvalues descending, and the matching eigenvectors as the
  /// rows of a `count x n` row-major array. Only the kept vectors are transformed back.
  /// - A few pairs (`count < n / 8`): bisection and inverse iteration on the tridiagonal form
  ///   (`ssyevr`/`dsyevr` with an index range), whose cost past the reduction is sized by `count`.
  /// - Many (`divideAndConquerShare`): every eigenvector of the tridiagonal form by divide and
  ///   conquer (`sstedc`), then only the kept ones through the reduction's reflectors
  ///   (`sormtr`). Inverse iteration re-orthogonalises the vectors of close eigenvalues against
  ///   each other, which the flat bulk of a task matrix's spectrum makes quadratic in `count`:
  ///   for the 682 largest of a real 2048-sided Gram matrix, 0.41-0.44 s against 0.25-0.26 s
  ///   here (one core), with residuals and orthogonality at float precision in both.
  @_specialize(exported:true,where T == Float)
  @_specialize(exported:true,where T == Double)
  public static func largestEigenpairs<T: LAPACKScalar>(_ a: consuming [T], order n: Int, count: Int) throws -> (
    values: [T], vectorRows: [T]
  ) {
    precondition(a.count == n * n && count >= 0 && count <= n, "largestEigenpairs(\(count)) of a \(n) x \(n) matrix")
    guard count > 0 else { return ([], []) }
    if count * divideAndConquerShare >= n { return try largestByDivideAndConquer(a, order: n, count: count) }
    var work = consume a
    var values = [T](repeating: 0, count: n)
    var vectors = [T](repeating: 0, count: n * count)
    var support = [Int32](repeating: 0, count: 2 * count)
    var found: Int32 = 0
    // Column-major: the symmetric input reads the same, and each eigenvector comes out contiguous.
    let info = T.syevr(
      BLAS.int32(n), &work, BLAS.int32(n - count + 1), BLAS.int32(n), &found, &values, &vectors, &support)
    try check(info, T.self == Float.self ? "ssyevr" : "dsyevr") { _ in
      .noConvergence(routine: "eigendecomposition (syevr)")
    }
    guard Int(found) == count else { throw LinearAlgebraError.noConvergence(routine: "eigendecomposition (syevr)") }
    // Ascending from LAPACK; the largest first.
    var rows = [T](repeating: 0, count: n * count)
    for j in 0..<count {
      let from = (count - 1 - j) * n
      for i in 0..<n { rows[j * n + i] = vectors[from + i] }
    }
    return (Array(values.prefix(count).reversed()), rows)
  }

  /// `largestEigenpairs` takes the divide-and-conquer route from `n / divideAndConquerShare` pairs.
  static let divideAndConquerShare = 8

  /// `largestEigenpairs` by `sytrd`, `stedc` (all vectors of the tridiagonal form) and `ormtr` on
  /// the kept ones; column-major throughout (the symmetric input reads the same).
  static func largestByDivideAndConquer<T: LAPACKScalar>(_ a: consuming [T], order n: Int, count: Int) throws -> (
    values: [T], vectorRows: [T]
  ) {
    let order = BLAS.int32(n)
    // Taken over, not copied, when the caller passes its last use (a Gram matrix made for this).
    var reduced = consume a
    var diagonal = [T](repeating: 0, count: n)
    var offDiagonal = [T](repeating: 0, count: max(1, n - 1))
    var reflectors = [T](repeating: 0, count: max(1, n - 1))
    let name = T.self == Float.self ? "s" : "d"
    try check(T.sytrd(order, &reduced, &diagonal, &offDiagonal, &reflectors), name + "sytrd") { _ in
      .noConvergence(routine: "tridiagonal reduction (\(name)sytrd)")
    }
    // stedc with compz = I writes every element.
    var tridiagonalVectors = [T](unsafeUninitializedCapacity: n * n) { _, initialized in initialized = n * n }
    try check(T.stedc(order, &diagonal, &offDiagonal, &tridiagonalVectors), name + "stedc") { _ in
      .noConvergence(routine: "eigendecomposition (\(name)stedc)")
    }
    // Ascending: the kept vectors are the last `count` columns.
    var kept = Array(tridiagonalVectors[((n - count) * n)...])
    tridiagonalVectors = []
    try check(T.ormtr(order, BLAS.int32(count), &reduced, &reflectors, &kept), name + "ormtr") { _ in
      .noConvergence(routine: "back-transformation (\(name)ormtr)")
    }
    var rows = [T](repeating: 0, count: n * count)
    for j in 0..<count {
      let from = (count - 1 - j) * n
      for i in 0..<n { rows[j * n + i] = kept[from + i] }
    }
    return (Array(diagonal[(n - count)...].reversed()), rows)
  }

  /// Solves `a x = b` for symmetric `a` by Cholesky when `a` is positive definite with an
  /// estimated 1-norm condition number below `maxCondition` (`dpotrf`, `dpocon`, `dpotrs`), else
  /// returns nil, for the caller's rank-revealing solver. The 1-norm condition bounds the 2-norm
  /// one from above; LAPACK's estimate of it is a lower bound that is rarely off by more than a
  /// factor of 3, so callers leave a margin.
  public static func wellConditionedCholeskySolve(_ a: DoubleMatrix, _ b: DoubleMatrix, maxCondition: Double) throws
    -> DoubleMatrix?
  {
    precondition(
      a.rows == a.columns && b.rows == a.rows,
      "wellConditionedCholeskySolve: \(a.rows)x\(a.columns) with right-hand side \(b.rows)x\(b.columns)")
    let n = BLAS.int32(a.rows)
    guard n > 0 else { return b }
    var factor = a.values
    let norm = LAPACKE_dlansy(LAPACK_ROW_MAJOR, ascii("1"), ascii("U"), n, &factor, n)
    guard LAPACKE_dpotrf(LAPACK_ROW_MAJOR, ascii("U"), n, &factor, n) == 0 else { return nil }
    var reciprocal = 0.0
    guard LAPACKE_dpocon(LAPACK_ROW_MAJOR, ascii("U"), n, &factor, n, norm, &reciprocal) == 0,
      reciprocal * maxCondition > 1
    else { return nil }
    var x = b
    let info = LAPACKE_dpotrs(
      LAPACK_ROW_MAJOR, ascii("U"), n, BLAS.int32(b.columns), &factor, n, &x.values, BLAS.int32(b.columns))
    try check(info, "dpotrs") { .notPositiveDefinite(order: $0) }
    return x
  }

  /// Minimum-norm least squares `min |a x - b|` (`dgelsd`, SVD based): singular values below
  /// `rcond * s_max` are treated as zero. Returns the solution (n x nrhs) and the effective rank.
  public static func leastSquares(_ a: DoubleMatrix, _ b: DoubleMatrix, rcond: Double = -1) throws -> (
    x: DoubleMatrix, rank: Int
  ) {
    precondition(b.rows == a.rows, "leastSquares: \(a.rows)x\(a.columns) with right-hand side \(b.rows)x\(b.columns)")
    let (m, n, nrhs) = (a.rows, a.columns, b.columns)
    var work = a.values
    // dgelsd overwrites a max(m, n) x nrhs right-hand side with the solution in its first n rows.
    let height = max(m, n)
    var rhs = [Double](repeating: 0, count: height * nrhs)
    for i in 0..<m { for j in 0..<nrhs { rhs[i * nrhs + j] = b.values[i * nrhs + j] } }
    var s = [Double](repeating: 0, count: min(m, n))
    var rank: Int32 = 0
    if m > 0 && n > 0 && nrhs > 0 {
      let info = LAPACKE_dgelsd(
        LAPACK_ROW_MAJOR, BLAS.int32(m), BLAS.int32(n), BLAS.int32(nrhs), &work, BLAS.int32(n), &rhs, BLAS.int32(nrhs),
        &s, rcond, &rank)
      try check(info, "dgelsd") { _ in .noConvergence(routine: "least squares (dgelsd)") }
    }
    return (DoubleMatrix(rows: n, columns: nrhs, values: Array(rhs.prefix(n * nrhs))), Int(rank))
  }

  /// Randomized truncated SVD of rank `rank` (Halko, Martinsson and Tropp): a Gaussian sketch of
  /// `rank + oversampling` columns, `powerIterations` rounds of re-orthonormalised power iteration,
  /// then an exact SVD of the small projected matrix. Deterministic in `seed`.
  ///
  /// With `tolerance`, power iterations continue (up to `maxExtraIterations` more) while one more
  /// round still raises the energy the rank-`rank` truncation captures by more than `tolerance`
  /// times the energy it leaves out: the captured energy rises toward the optimum as the sketch
  /// converges, so stopping when it no longer moves keeps the truncation error close to optimal
  /// where the spectrum decays slowly (the case fixed iterations miss).
  public static func randomizedSVD(
    _ a: Tensor, rank: Int, oversampling: Int = 10, powerIterations: Int = 2, seed: UInt64 = 0,
    tolerance: Double? = nil, maxExtraIterations: Int = 8
  ) throws -> SVD {
    precondition(a.shape.count == 2 && rank >= 0, "randomizedSVD of \(a.shape) at rank \(rank)")
    let (m, n) = (a.shape[0], a.shape[1])
    let r = min(rank, m, n)
    let width = min(r + oversampling, m, n)
    if width == min(m, n) {
      return truncated(try svd(a), to: r)  // a sketch as wide as the matrix saves nothing
    }
    let omega = CounterRNG(seed: seed, stream: "randomized-svd").normalTensor([n, width])
    var q = qr(BLAS.matmul(a, omega)).q  // m x width
    func iterate() {
      let z = qr(BLAS.matmul(a, q, transposeA: true)).q  // n x width
      q = qr(BLAS.matmul(a, z)).q
    }
    for _ in 0..<powerIterations { iterate() }
    var small = try svd(BLAS.matmul(q, a, transposeA: true))  // width x n
    if let tolerance {
      let total = a.scalars.reduce(0.0) { $0 + Double($1) * Double($1) }
      func captured(_ s: [Float]) -> Double { s.prefix(r).reduce(0.0) { $0 + Double($1) * Double($1) } }
      var energy = captured(small.s)
      for _ in 0..<maxExtraIterations {
        iterate()
        let next = try svd(BLAS.matmul(q, a, transposeA: true))
        let gain = captured(next.s) - energy
        small = next
        energy += gain
        if gain <= tolerance * max(total - energy, 0) { break }
      }
    }
    let full = SVD(u: BLAS.matmul(q, small.u), s: small.s, vt: small.vt)
    return truncated(full, to: r)
  }

  /// The leading `rank` singular triplets.
  public static func truncated(_ svd: SVD, to rank: Int) -> SVD {
    let k = svd.s.count
    guard rank < k else { return svd }
    let m = svd.u.shape[0]
    let n = svd.vt.shape[1]
    var u = [Float](repeating: 0, count: m * rank)
    for i in 0..<m { for j in 0..<rank { u[i * rank + j] = svd.u.scalars[i * k + j] } }
    return SVD(
      u: Tensor(shape: [m, rank], scalars: u), s: Array(svd.s.prefix(rank)),
      vt: Tensor(shape: [rank, n], scalars: Array(svd.vt.scalars.prefix(rank * n))))
  }

  fileprivate static func ascii(_ c: Unicode.Scalar) -> CChar { CChar(UInt8(ascii: c)) }

  /// `info < 0` is a wrong argument (our bug); `info > 0` a numerical failure for the caller.
  private static func check(_ info: Int32, _ routine: String, _ failure: (Int) -> LinearAlgebraError) throws {
    precondition(info >= 0, "LAPACKE_\(routine) argument \(-info) is invalid")
    if info > 0 { throw failure(Int(info)) }
  }
}

/// The element types LAPACK's symmetric eigensolvers take: `Float` (`ssyevr`, `ssytrd`, `sstedc`,
/// `sormtr`) and `Double` (the `d` routines).
public protocol LAPACKScalar: BLASScalar {
  /// `syevr` in column-major layout on an `n x n` matrix, eigenvalues `first...last` (1-based,
  /// ascending), upper triangle read; eigenvectors into `vectors` (n x (last - first + 1)).
  static func syevr(
    _ n: Int32, _ a: inout [Self], _ first: Int32, _ last: Int32, _ found: inout Int32, _ values: inout [Self],
    _ vectors: inout [Self], _ support: inout [Int32]
  ) -> Int32
  /// `sytrd` in column-major layout: the upper triangle of `a` reduced to tridiagonal form
  /// (`diagonal`, `offDiagonal`), the reflectors left in `a` and `tau`.
  static func sytrd(
    _ n: Int32, _ a: inout [Self], _ diagonal: inout [Self], _ offDiagonal: inout [Self], _ tau: inout [Self]
  ) -> Int32
  /// `stedc` with `compz = I`: every eigenpair of a symmetric tridiagonal matrix, eigenvalues
  /// ascending into `diagonal`, eigenvectors into the columns of `vectors` (n x n).
  static func stedc(_ n: Int32, _ diagonal: inout [Self], _ offDiagonal: inout [Self], _ vectors: inout [Self])
    -> Int32
  /// `ormtr` from the left, no transpose, upper: `c` (n x columns) becomes Q c, with Q the
  /// product of the reflectors `sytrd` left in `a` and `tau`.
  static func ormtr(_ n: Int32, _ columns: Int32, _ a: inout [Self], _ tau: inout [Self], _ c: inout [Self]) -> Int32
}

extension Float: LAPACKScalar {
  public static func syevr(
    _ n: Int32, _ a: inout [Float], _ first: Int32, _ last: Int32, _ found: inout Int32, _ values: inout [Float],
    _ vectors: inout [Float], _ support: inout [Int32]
  ) -> Int32 {
    LAPACKE_ssyevr(
      LAPACK_COL_MAJOR, LAPACK.ascii("V"), LAPACK.ascii("I"), LAPACK.ascii("U"), n, &a, n, 0, 0,
      first, last, 0, &found, &values, &vectors, n, &support)
  }

  public static func sytrd(
    _ n: Int32, _ a: inout [Float], _ diagonal: inout [Float], _ offDiagonal: inout [Float], _ tau: inout [Float]
  ) -> Int32 {
    LAPACKE_ssytrd(LAPACK_COL_MAJOR, LAPACK.ascii("U"), n, &a, n, &diagonal, &offDiagonal, &tau)
  }

  public static func stedc(
    _ n: Int32, _ diagonal: inout [Float], _ offDiagonal: inout [Float], _ vectors: inout [Float]
  )
    -> Int32
  {
    LAPACKE_sstedc(LAPACK_COL_MAJOR, LAPACK.ascii("I"), n, &diagonal, &offDiagonal, &vectors, n)
  }

  public static func ormtr(_ n: Int32, _ columns: Int32, _ a: inout [Float], _ tau: inout [Float], _ c: inout [Float])
    -> Int32
  {
    LAPACKE_sormtr(
      LAPACK_COL_MAJOR, LAPACK.ascii("L"), LAPACK.ascii("U"), LAPACK.ascii("N"), n, columns, &a, n, &tau, &c, n)
  }
}

extension Double: LAPACKScalar {
  public static func syevr(
    _ n: Int32, _ a: inout [Double], _ first: Int32, _ last: Int32, _ found: inout Int32, _ values: inout [Double],
    _ vectors: inout [Double], _ support: inout [Int32]
  ) -> Int32 {
    LAPACKE_dsyevr(
      LAPACK_COL_MAJOR, LAPACK.ascii("V"), LAPACK.ascii("I"), LAPACK.ascii("U"), n, &a, n, 0, 0,
      first, last, 0, &found, &values, &vectors, n, &support)
  }

  public static func sytrd(
    _ n: Int32, _ a: inout [Double], _ diagonal: inout [Double], _ offDiagonal: inout [Double], _ tau: inout [Double]
  ) -> Int32 {
    LAPACKE_dsytrd(LAPACK_COL_MAJOR, LAPACK.ascii("U"), n, &a, n, &diagonal, &offDiagonal, &tau)
  }

  public static func stedc(
    _ n: Int32, _ diagonal: inout [Double], _ offDiagonal: inout [Double], _ vectors: inout [Double]
  )
    -> Int32
  {
    LAPACKE_dstedc(LAPACK_COL_MAJOR, LAPACK.ascii("I"), n, &diagonal, &offDiagonal, &vectors, n)
  }

  public static func ormtr(
    _ n: Int32, _ columns: Int32, _ a: inout [Double], _ tau: inout [Double], _ c: inout [Double]
  )
    -> Int32
  {
    LAPACKE_dormtr(
      LAPACK_COL_MAJOR, LAPACK.ascii("L"), LAPACK.ascii("U"), LAPACK.ascii("N"), n, columns, &a, n, &tau, &c, n)
  }
}
