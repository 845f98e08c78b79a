import CBLAS

/// The BLAS layer: the only file that calls CBLAS. Sizes cross into C as `Int32(exactly:)`
/// because Debian's OpenBLAS takes 32-bit integers.
public enum BLAS {
  /// Matrix product `a (m x k) * b (k x n)` of two 2-D tensors, by `cblas_sgemm`.
  /// Precondition: inner dimensions agree and every size fits in `Int32`.
  public static func matmul(_ a: Tensor, _ b: Tensor) -> Tensor {
    precondition(a.shape.count == 2 && b.shape.count == 2 && a.shape[1] == b.shape[0], "matmul shapes \(a.shape) x \(b.shape)")
    let (m, k, n) = (a.shape[0], a.shape[1], b.shape[1])
    var c = Tensor(zeros: [m, n])
    guard m > 0, n > 0, k > 0 else { return c }
    let (m32, k32, n32) = (int32(m), int32(k), int32(n))
    a.scalars.withUnsafeBufferPointer { pa in
      b.scalars.withUnsafeBufferPointer { pb in
        c.scalars.withUnsafeMutableBufferPointer { pc in
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m32, n32, k32, 1, pa.baseAddress, k32, pb.baseAddress, n32, 0, pc.baseAddress, n32)
        }
      }
    }
    return c
  }

  /// Converts a size for a BLAS call; sizes past `Int32.max` are a caller bug (tensors that large
  /// must be processed in blocks).
  static func int32(_ value: Int) -> Int32 {
    guard let v = Int32(exactly: value) else { preconditionFailure("size \(value) exceeds BLAS's 32-bit limit") }
    return v
  }
}
