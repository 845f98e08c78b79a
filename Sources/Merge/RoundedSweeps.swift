import Tensor

/// Sweeps over whole tensors for the methods that, under mergekit's rounding
/// (`MergeArithmetic.rounded`), merge a tensor whole (Karcher, Multi-SLERP, SCE, Arcee fusion):
/// elementwise steps over fixed blocks on all cores, and sums in `Double` over the same blocks
/// in a fixed order (`Elementwise.sum`), so that the result never depends on the thread count.
enum RoundedSweeps {
  /// `sqrt(sum_i x_i^2)` in `Double` (each square exact, summed as `Elementwise.sum` sums), for
  /// a rounding once (`RoundingRule.round(_: Double)`).
  static func length(_ values: UnsafePointer<Float>, count: Int) -> Double {
    Elementwise.sumOfBlocks(count) { Elementwise.blockSum($0) { Double(values[$0]) * Double(values[$0]) } }
      .squareRoot()
  }

  static func length(_ values: [Float]) -> Double {
    values.withUnsafeBufferPointer {
      length($0.baseAddress ?? Kernels.noElements.assumingMemoryBound(to: Float.self), count: $0.count)
    }
  }

  /// `length` as a `Float` (rounded to it once).
  static func norm(_ values: UnsafePointer<Float>, count: Int) -> Float { Float(length(values, count: count)) }

  static func norm(_ values: [Float]) -> Float { Float(length(values)) }
}

extension RoundedSweeps {
  /// The elements at `positions` of `values` sorted ascending (`values.sorted()[k]` for each k),
  /// found without sorting: the floats' order keys (sign bit set for positives, every bit
  /// flipped for negatives) ranked by a histogram of their high 16 bits, then of the low 16
  /// bits within the bin the position falls in. NaNs rank beyond the infinities of their sign
  /// (a sort of them would be unspecified); -0 ranks below +0, which compare equal.
  static func orderStatistics(_ values: [Float], _ positions: [Int]) -> [Float] {
    func key(_ x: Float) -> UInt32 {
      let bits = x.bitPattern
      return bits & 0x8000_0000 != 0 ? ~bits : bits | 0x8000_0000
    }
    func value(_ key: UInt32) -> Float {
      Float(bitPattern: key & 0x8000_0000 != 0 ? key & 0x7FFF_FFFF : ~key)
    }
    var high = [Int](repeating: 0, count: 1 << 16)
    for x in values { high[Int(key(x) >> 16)] += 1 }
    return positions.map { position in
      precondition(position >= 0 && position < values.count, "order statistic \(position) of \(values.count)")
      var bin = 0
      var below = 0
      while below + high[bin] <= position {
        below += high[bin]
        bin += 1
      }
      var low = [Int](repeating: 0, count: 1 << 16)
      for x in values {
        let k = key(x)
        if Int(k >> 16) == bin { low[Int(k & 0xFFFF)] += 1 }
      }
      var part = 0
      while below + low[part] <= position {
        below += low[part]
        part += 1
      }
      return value(UInt32(bin) << 16 | UInt32(part))
    }
  }
}

extension Array where Element == [Float] {
  /// Calls `body` with a read pointer to each array's elements (valid only inside `body`; an
  /// empty array's pointer is not to be read).
  func withUnsafeBufferPointers<R>(_ body: ([UnsafePointer<Float>]) throws -> R) rethrows -> R {
    func nest(_ i: Int, _ held: [UnsafePointer<Float>]) throws -> R {
      guard i < count else { return try body(held) }
      return try self[i].withUnsafeBufferPointer { buffer in
        let start = buffer.baseAddress ?? Kernels.noElements.assumingMemoryBound(to: Float.self)
        return try nest(i + 1, held + [start])
      }
    }
    return try nest(0, [])
  }
}
