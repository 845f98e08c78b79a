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
        let start = block * blockSize
        let end = Swift.min(count, start + blockSize)
        var i = start
        while i < end {
          (out.pointer! + i).initialize(to: f(i))
          i += 1
        }
      }
      initialized = count
    }
  }

  /// `sum of f(i)` over `0..<count` in `Double`, deterministic (fixed blocks, ordered combination).
  @inlinable
  public static func sum(_ count: Int, _ f: (Int) -> Double) -> Double {
    let blocks = (count + blockSize - 1) / blockSize
    guard blocks > 1 else { return (0..<count).reduce(0.0) { $0 + f($1) } }
    var partials = [Double](repeating: 0, count: blocks)
    partials.withUnsafeMutableBufferPointer { slots in
      let out = SendablePointer(slots.baseAddress)
      try? Parallel.forEach(blocks) { _, block in
        let start = block * blockSize
        let end = Swift.min(count, start + blockSize)
        var total = 0.0
        var i = start
        while i < end {
          total += f(i)
          i += 1
        }
        out.pointer![block] = total
      }
    }
    return partials.reduce(0, +)
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
}
