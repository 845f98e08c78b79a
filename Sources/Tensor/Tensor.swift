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

  /// Decodes stored bytes (`dtype`, row-major) to `Float`, in parallel blocks, without an
  /// intermediate copy.
  public init(decoding raw: UnsafeRawBufferPointer, dtype: DType, shape: [Int]) {
    let count = shape.reduce(1, *)
    precondition(raw.count == count * dtype.size, "\(raw.count) bytes do not hold \(count) \(dtype) values")
    let blockSize = Elementwise.blockSize
    let values = [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
      let out = SendablePointer(buffer.baseAddress)
      let source = SendableRawPointer(raw.baseAddress)
      try? Parallel.forEach((count + blockSize - 1) / blockSize) { _, block in
        guard let input = source.pointer, let output = out.pointer else { return }
        let start = block * blockSize
        let n = Swift.min(count, start + blockSize) - start
        DTypeConversion.decode(
          UnsafeRawBufferPointer(start: input + start * dtype.size, count: n * dtype.size), from: dtype,
          into: UnsafeMutableBufferPointer(start: output + start, count: n))
      }
      initialized = count
    }
    self.init(shape: shape, scalars: values)
  }

  /// Encodes elements `range` as `dtype` into `destination` (which holds exactly that many).
  public func encode(_ range: Range<Int>, as dtype: DType, into destination: UnsafeMutableRawBufferPointer) {
    scalars.withUnsafeBufferPointer { values in
      DTypeConversion.encode(UnsafeBufferPointer(rebasing: values[range]), as: dtype, into: destination)
    }
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

  /// Rows `range` of a matrix, as a `range.count x columns` matrix; the tensor must be 2-D.
  public func rows(_ range: Range<Int>) -> Tensor {
    precondition(shape.count == 2 && range.lowerBound >= 0 && range.upperBound <= shape[0], "rows \(range) of \(shape)")
    let columns = shape[1]
    return Tensor(
      shape: [range.count, columns],
      scalars: Array(scalars[(range.lowerBound * columns)..<(range.upperBound * columns)]))
  }

  /// Columns `range` of a matrix, as a `rows x range.count` matrix; the tensor must be 2-D.
  public func columns(_ range: Range<Int>) -> Tensor {
    precondition(
      shape.count == 2 && range.lowerBound >= 0 && range.upperBound <= shape[1], "columns \(range) of \(shape)")
    let (rows, columns) = (shape[0], shape[1])
    var out = [Float](repeating: 0, count: rows * range.count)
    for i in 0..<rows { for (j, c) in range.enumerated() { out[i * range.count + j] = scalars[i * columns + c] } }
    return Tensor(shape: [rows, range.count], scalars: out)
  }

  /// A matrix's transpose (rows become columns); the tensor must be 2-D.
  public func transposed() -> Tensor {
    precondition(shape.count == 2, "transposed() needs a matrix, not shape \(shape)")
    let (rows, columns) = (shape[0], shape[1])
    var out = [Float](repeating: 0, count: count)
    for i in 0..<rows { for j in 0..<columns { out[j * rows + i] = scalars[i * columns + j] } }
    return Tensor(shape: [columns, rows], scalars: out)
  }
}
