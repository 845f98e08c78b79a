import Tensor

/// A method whose result at each element depends only on the inputs at that element (given the
/// tensor's parameters), so the runner can stream a tensor in ranges of elements: memory stays at
/// a few ranges however large the tensor, and no whole-tensor copies are made. `merge` on a
/// whole tensor is the same computation on one range.
public protocol ElementwiseMerge: MergeMethod {
  /// Whether this tensor, with these parameters, can be merged range by range (a method may
  /// need whole-tensor statistics for some settings, e.g. sparsification).
  func isElementwise(_ parameters: ResolvedParameters) -> Bool
  /// Merges one range of elements starting at element `offset` of the tensor: `base` and
  /// `models` hold the inputs' values on the range.
  func mergeRange(tensor name: String, offset: Int, base: [Float]?, models: [[Float]], _ parameters: ResolvedParameters) throws -> [Float]
}
