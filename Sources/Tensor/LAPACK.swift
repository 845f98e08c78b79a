import CLAPACKE

/// Errors from LAPACK routines: only genuine numerical failures (`info > 0`); `info < 0` is a bug.
public enum LinearAlgebraError: Error, CustomStringConvertible, Equatable {
  /// The matrix is exactly singular: pivot `pivot` (1-based) is zero.
  case singular(pivot: Int)

  public var description: String {
    switch self {
    case .singular(let pivot): return "the matrix is singular (zero pivot at position \(pivot)); the system has no unique solution"
    }
  }
}

/// The LAPACK layer: the only file that calls LAPACKE.
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
    precondition(info >= 0, "LAPACKE_sgesv argument \(-info) is invalid")
    if info > 0 { throw LinearAlgebraError.singular(pivot: Int(info)) }
    return Tensor(shape: b.shape, scalars: x)
  }
}
