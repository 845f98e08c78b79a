/// A dense row-major tensor of `Float` values: the type every merge and adaptation works on.
///
/// Storage is a Swift array, so copies are cheap until written (copy-on-write). Reductions that
/// need precision accumulate in `Double`.
public struct Tensor: Sendable, Equatable {
  /// Extent of each dimension, outermost first; `[]` is a scalar.
  public private(set) var shape: [Int]
  /// The elements in row-major order; `scalars.count == shape.reduce(1, *)`.
  public var scalars: [Float]

  /// Creates a tensor; the element count must match the shape.
  public init(shape: [Int], scalars: [Float]) {
    precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
    precondition(shape.reduce(1, *) == scalars.count, "shape \(shape) does not hold \(scalars.count) values")
    self.shape = shape
    self.scalars = scalars
  }

  /// A tensor of zeros.
  public init(zeros shape: [Int]) {
    self.init(shape: shape, scalars: [Float](repeating: 0, count: shape.reduce(1, *)))
  }

  /// Number of elements.
  public var count: Int { scalars.count }

  /// Number of rows when viewed as a matrix (`shape[0]`, or 1 for a scalar).
  public var rows: Int { shape.first ?? 1 }

  /// Elements per row when viewed as a matrix (product of all but the first dimension).
  public var columns: Int { shape.count >= 2 ? shape.dropFirst().reduce(1, *) : 1 }

  /// The same elements under another shape with the same element count.
  public func reshaped(_ newShape: [Int]) -> Tensor {
    Tensor(shape: newShape, scalars: scalars)
  }

  /// Sum of squares, accumulated in `Double`.
  public var squaredNorm: Double {
    scalars.reduce(0.0) { $0 + Double($1) * Double($1) }
  }
}
