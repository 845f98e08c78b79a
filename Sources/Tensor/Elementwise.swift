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

  /// `count` elements computed block by block in parallel: `fill(range, out)` sets every element
  /// of `out`, which holds elements `range` (element `range.lowerBound + k` is `out[k]`). Each
  /// block but the last holds a multiple of `unit` elements (whole rows of a matrix), about
  /// `blockSize`. For loops that work through a block in sweeps (a vector function over the
  /// whole block, then a second loop over it) rather than element by element.
  @inlinable
  public static func mapBlocks<T: BitwiseCopyable>(
    _ count: Int, unit: Int = 1, _ fill: (Range<Int>, UnsafeMutableBufferPointer<T>) -> Void
  ) -> [T] {
    let unit = Swift.max(unit, 1)
    let size = Swift.max(1, blockSize / unit) * unit
    return [T](unsafeUninitializedCapacity: count) { buffer, initialized in
      let out = SendablePointer(buffer.baseAddress)
      try? Parallel.forEach((count + size - 1) / size) { _, block in
        guard let pointer = out.pointer else { return }
        let range = (block * size)..<Swift.min(count, (block + 1) * size)
        fill(range, UnsafeMutableBufferPointer(start: pointer + range.lowerBound, count: range.count))
      }
      initialized = count
    }
  }

  /// Runs `body(range)` over the fixed blocks of `0..<count`, side by side on all cores (for
  /// loops that write disjoint elements in place).
  @inlinable
  public static func forEachBlock(_ count: Int, _ body: (Range<Int>) -> Void) {
    try? Parallel.forEach((count + blockSize - 1) / blockSize) { _, block in
      body((block * blockSize)..<Swift.min(count, (block + 1) * blockSize))
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

  /// Two sums over the same fixed blocks in one sweep (`block` gives both partial sums); each
  /// has the bits `sumOfBlocks` gives it alone.
  @inlinable
  public static func sumOfBlockPairs(_ count: Int, _ block: (Range<Int>) -> (Double, Double)) -> (Double, Double) {
    let blocks = (count + blockSize - 1) / blockSize
    guard blocks > 1 else { return block(0..<count) }
    var partials = [(Double, Double)](repeating: (0, 0), count: blocks)
    partials.withUnsafeMutableBufferPointer { slots in
      let out = SendablePointer(slots.baseAddress)
      try? Parallel.forEach(blocks) { _, b in
        out.pointer?[b] = block((b * blockSize)..<Swift.min(count, (b + 1) * blockSize))
      }
    }
    return (partials.reduce(0) { $0 + $1.0 }, partials.reduce(0) { $0 + $1.1 })
  }

  /// Two `blockSum`s in one sweep: each sum has the bits `blockSum` gives it alone (lane k of
  /// its vector holds `blockSum`'s chain k).
  @inlinable
  public static func blockSumPair(_ range: Range<Int>, _ f: (Int) -> (Double, Double)) -> (Double, Double) {
    var (a, b) = (SIMD4<Double>(repeating: 0), SIMD4<Double>(repeating: 0))
    var i = range.lowerBound
    while i + 4 <= range.upperBound {
      let (x0, y0) = f(i)
      let (x1, y1) = f(i + 1)
      let (x2, y2) = f(i + 2)
      let (x3, y3) = f(i + 3)
      a += SIMD4(x0, x1, x2, x3)
      b += SIMD4(y0, y1, y2, y3)
      i += 4
    }
    var (first, second) = ((a[0] + a[1]) + (a[2] + a[3]), (b[0] + b[1]) + (b[2] + b[3]))
    while i < range.upperBound {
      let (x, y) = f(i)
      first += x
      second += y
      i += 1
    }
    return (first, second)
  }

  /// The sum of `f(i)` over one block in four interleaved lanes, `(l0 + l1) + (l2 + l3)`, then
  /// the tail: four independent additions pipeline, where one chain would wait on each.
  @inlinable
  public static func blockSum(_ range: Range<Int>, _ f: (Int) -> Double) -> Double {
    // The lanes in one vector: the same additions, which the compiler then keeps in one register.
    var lanes = SIMD4<Double>(repeating: 0)
    var i = range.lowerBound
    while i + 4 <= range.upperBound {
      lanes += SIMD4(f(i), f(i + 1), f(i + 2), f(i + 3))
      i += 4
    }
    var total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
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
