/// Element-wise loops over large arrays, split into fixed blocks that run in parallel. Block
/// boundaries never depend on the thread count, and reductions combine per-block partial sums in
/// block order, so results are bit-identical on any machine and any `MERGEKIT_THREADS`.
public enum Elementwise {
  /// Elements per block: large enough to amortise scheduling, small enough to balance cores.
  public static let blockSize = 1 << 15

  /// `[f(0), f(1), ..., f(count - 1)]`, computed in parallel blocks.
  @inlinable
  public static func map<T>(_ count: Int, _ f: (Int) -> T) -> [T] {
    [T](unsafeUninitializedCapacity: count) { buffer, initialized in
      let out = SendablePointer(buffer.baseAddress)
      let blocks = (count + blockSize - 1) / blockSize
      try? Parallel.forEach(blocks) { _, block in
        guard let pointer = out.pointer else { return }
        let start = block * blockSize
        let end = Swift.min(count, start + blockSize)
        var i = start
        while i < end {
          (pointer + i).initialize(to: f(i))
          i += 1
        }
      }
      initialized = count
    }
  }

  /// `sum of f(i)` over `0..<count` in `Double`, deterministic: fixed blocks combined in
  /// order, each summed by `blockSum`.
  @inlinable
  public static func sum(_ count: Int, _ f: (Int) -> Double) -> Double {
    sumOfBlocks(count) { blockSum($0, f) }
  }

  /// `sum of block(range)` over the fixed blocks of `0..<count`, computed in parallel and added
  /// in block order. For loops that set up pointers once per block, then call `blockSum`.
  @inlinable
  public static func sumOfBlocks(_ count: Int, _ block: (Range<Int>) -> Double) -> Double {
    let blocks = (count + blockSize - 1) / blockSize
    guard blocks > 1 else { return block(0..<count) }
    var partials = [Double](repeating: 0, count: blocks)
    partials.withUnsafeMutableBufferPointer { slots in
      let out = SendablePointer(slots.baseAddress)
      try? Parallel.forEach(blocks) { _, b in
        out.pointer?[b] = block((b * blockSize)..<Swift.min(count, (b + 1) * blockSize))
      }
    }
    return partials.reduce(0, +)
  }

  /// The sum of `f(i)` over one block in four interleaved lanes, `(l0 + l1) + (l2 + l3)`, then
  /// the tail: four independent additions pipeline, where one chain would wait on each.
  @inlinable
  public static func blockSum(_ range: Range<Int>, _ f: (Int) -> Double) -> Double {
    var (l0, l1, l2, l3) = (0.0, 0.0, 0.0, 0.0)
    var i = range.lowerBound
    while i + 4 <= range.upperBound {
      l0 += f(i)
      l1 += f(i + 1)
      l2 += f(i + 2)
      l3 += f(i + 3)
      i += 4
    }
    var total = (l0 + l1) + (l2 + l3)
    while i < range.upperBound {
      total += f(i)
      i += 1
    }
    return total
  }
}

/// A raw pointer handed to parallel blocks that write disjoint elements.
@usableFromInline
struct SendablePointer<T>: @unchecked Sendable {
  @usableFromInline let pointer: UnsafeMutablePointer<T>?
  @usableFromInline init(_ pointer: UnsafeMutablePointer<T>?) { self.pointer = pointer }
}

/// A raw read-only pointer handed to parallel blocks.
@usableFromInline
struct SendableRawPointer: @unchecked Sendable {
  @usableFromInline let pointer: UnsafeRawPointer?
  @usableFromInline init(_ pointer: UnsafeRawPointer?) { self.pointer = pointer }
  /// The pointer to `Float` elements it was made from (a pointer into a `[Float]`'s storage).
  @usableFromInline var floats: UnsafePointer<Float>? { pointer?.assumingMemoryBound(to: Float.self) }
}
