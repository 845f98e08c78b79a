@testable import Tensor

/// Stored elements of `arrays` encoded as `types`, for `body` (valid only inside it): what the
/// kernels that read a checkpoint's bytes are handed.
func withStoredElements<R>(_ arrays: [[Float]], _ types: [DType], _ body: ([Kernels.StoredElements]) -> R) -> R {
  let bytes = zip(arrays, types).map { Tensor(shape: [$0.count], scalars: $0).encoded(as: $1).bytes }
  func nest(_ i: Int, _ held: [Kernels.StoredElements]) -> R {
    guard i < bytes.count else { return body(held) }
    return bytes[i].withUnsafeBytes {
      nest(i + 1, held + [Kernels.StoredElements(start: $0.baseAddress ?? Kernels.noElements, dtype: types[i])])
    }
  }
  return nest(0, [])
}
