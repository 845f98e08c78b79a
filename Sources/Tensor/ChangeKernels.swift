extension Kernels {
  /// Reinforced Agent Merging's merge (mergekit's `ram` and `ramplus_tl`, computed in `Double`)
  /// of `count` stored elements of a base and its models, into `out` as `dtype` (at least
  /// `count * dtype.size` bytes). Per element, model t's task vector entry
  /// `tau_t = Double(model_t) - Double(base)` (each input decoded to `Float` first) counts as
  /// changed when `|tau_t| > epsilon` (a NaN never does). With `c` models changing the element,
  /// a changed entry adds `tau_t * lambdas[t]` when it is the only one (`c == 1`), else
  /// `tau_t / c`; the entries are summed in model order from 0, and the result is
  /// `Float(Double(base) + sum)`, encoded as `dtype`. Eight elements a step in `Double`, a chunk
  /// of every input decoded into stack scratch at a time; runs on the calling thread.
  public static func changeMerge(
    base: StoredElements, models: [StoredElements], count n: Int, epsilon: Double, lambdas: [Double],
    into out: UnsafeMutableRawBufferPointer, as dtype: DType
  ) {
    precondition(lambdas.count == models.count && out.count >= n * dtype.size)
    guard let target = out.baseAddress else { return }
    withUnsafeTemporaryAllocation(of: Float.self, capacity: chunk) { merged in
      guard let merged = merged.baseAddress else { return }
      withDecodedChunks(base: base, models: models, count: n) { start, length, b, x, stride in
        changeMergeChunk(
          b, x, stride: stride, models: models.count, length: length, epsilon: epsilon, lambdas: lambdas,
          into: merged)
        DTypeConversion.encode(
          UnsafeBufferPointer(start: merged, count: length), as: dtype,
          into: UnsafeMutableRawBufferPointer(start: target + start * dtype.size, count: length * dtype.size))
      }
    }
  }

  /// `changeMerge` of `count` stored elements as floats.
  public static func changeMerge(
    base: StoredElements, models: [StoredElements], count n: Int, epsilon: Double, lambdas: [Double]
  ) -> [Float] {
    [Float](unsafeUninitializedCapacity: n) { buffer, initialized in
      changeMerge(
        base: base, models: models, count: n, epsilon: epsilon, lambdas: lambdas,
        into: UnsafeMutableRawBufferPointer(buffer), as: .f32)
      initialized = n
    }
  }

  /// Each model's changed entries (`changeMerge`'s `|tau_t| > epsilon`) among `count` stored
  /// elements, split into those some other model changes too (`shared`) and those no other model
  /// changes (`unique`): the counts behind RAM+TL's per-model amplification. Runs on the
  /// calling thread.
  public static func changeCounts(base: StoredElements, models: [StoredElements], count n: Int, epsilon: Double)
    -> (shared: [Int], unique: [Int])
  {
    typealias Counts = SIMD8<Int64>
    var shared = [Int](repeating: 0, count: models.count)
    var unique = [Int](repeating: 0, count: models.count)
    let m = models.count
    withUnsafeTemporaryAllocation(of: Counts.self, capacity: 2 * max(m, 1)) { lanes in
      guard let lanes = lanes.baseAddress else { return }
      lanes.initialize(repeating: Counts(repeating: 0), count: 2 * max(m, 1))
      withDecodedChunks(base: base, models: models, count: n) { _, length, b, x, stride in
        let limit = Doubles(repeating: epsilon)
        var j = 0
        while j < length {
          let baseValues = floats(b, j)
          let c = changedCount(x, stride: stride, models: m, at: j, base: baseValues, epsilon: limit)
          let alone = c .== 1
          let several = c .> 1
          for t in 0..<m {
            let changed = magnitude(floats(x + t * stride, j) - baseValues) .> limit
            lanes[2 * t] &+= Counts(repeating: 0).replacing(with: 1, where: changed .& several)
            lanes[2 * t + 1] &+= Counts(repeating: 0).replacing(with: 1, where: changed .& alone)
          }
          j += 8
        }
      }
      for t in 0..<m {
        shared[t] = Int(lanes[2 * t].wrappedSum())
        unique[t] = Int(lanes[2 * t + 1].wrappedSum())
      }
    }
    return (shared, unique)
  }

  /// Calls `body(start, length, base, models, stride)` over `count` elements in chunks of at
  /// most `chunk`, with the chunk of the base decoded to floats at `base` and of model t at
  /// `models + t * stride`, each padded with zeros to a multiple of eight.
  @inline(__always)
  private static func withDecodedChunks(
    base: StoredElements, models: [StoredElements], count n: Int,
    _ body: (Int, Int, UnsafePointer<Float>, UnsafePointer<Float>, Int) -> Void
  ) {
    let stride = chunk
    withUnsafeTemporaryAllocation(of: Float.self, capacity: (models.count + 1) * stride) { scratch in
      guard let b = scratch.baseAddress else { return }
      let x = b + stride
      var start = 0
      while start < n {
        let length = Swift.min(chunk, n - start)
        let padded = (length + 7) & ~7
        base.decode(start, length, into: b)
        (b + length).update(repeating: 0, count: padded - length)
        for (t, model) in models.enumerated() {
          model.decode(start, length, into: x + t * stride)
          (x + t * stride + length).update(repeating: 0, count: padded - length)
        }
        body(start, length, b, x, stride)
        start += length
      }
    }
  }

  /// `changeMerge`'s arithmetic on one decoded chunk (`withDecodedChunks`' layout) into `out`.
  @inline(__always)
  private static func changeMergeChunk(
    _ b: UnsafePointer<Float>, _ x: UnsafePointer<Float>, stride: Int, models m: Int, length: Int, epsilon: Double,
    lambdas: [Double], into out: UnsafeMutablePointer<Float>
  ) {
    let limit = Doubles(repeating: epsilon)
    let amplified = lambdas.contains { $0 != 1 }
    var j = 0
    while j < length {
      let baseValues = floats(b, j)
      let c = changedCount(x, stride: stride, models: m, at: j, base: baseValues, epsilon: limit)
      // tau / c, times lambda where the entry is the only change (tau / 1 is tau): the
      // reference's `c == 1 ? tau * lambda : tau / c`, one division and no select.
      let divisor = c.replacing(with: 1, where: c .== 0)
      let alone = c .== 1
      var sum = Doubles(repeating: 0)
      for t in 0..<m {
        let tau = floats(x + t * stride, j) - baseValues
        var term = tau / divisor
        if amplified { term *= Doubles(repeating: 1).replacing(with: lambdas[t], where: alone) }
        // An unchanged entry adds +0, which leaves the sum as it was: the sum is never -0.
        sum += term.replacing(with: 0, where: .!(magnitude(tau) .> limit))
      }
      let merged = SIMD8<Float>(baseValues + sum)
      if j + 8 <= length {
        UnsafeMutableRawPointer(out + j).storeBytes(of: merged, as: SIMD8<Float>.self)
      } else {
        for k in 0..<(length - j) { out[j + k] = merged[k] }
      }
      j += 8
    }
  }

  /// How many of the `m` models change each of the eight elements from `j` (`|tau| > epsilon`).
  @inline(__always)
  private static func changedCount(
    _ x: UnsafePointer<Float>, stride: Int, models m: Int, at j: Int, base: Doubles, epsilon: Doubles
  ) -> Doubles {
    var c = Doubles(repeating: 0)
    for t in 0..<m {
      let tau = floats(x + t * stride, j) - base
      c = c.replacing(with: c + 1, where: magnitude(tau) .> epsilon)
    }
    return c
  }

  /// Eight floats from `p + j` as doubles.
  @inline(__always)
  private static func floats(_ p: UnsafePointer<Float>, _ j: Int) -> Doubles {
    Doubles(UnsafeRawPointer(p + j).loadUnaligned(as: SIMD8<Float>.self))
  }

  /// `|v|` lane by lane (the sign bit cleared; a NaN stays a NaN).
  @inline(__always)
  private static func magnitude(_ v: Doubles) -> Doubles {
    unsafeBitCast(unsafeBitCast(v, to: SIMD8<UInt64>.self) & 0x7FFF_FFFF_FFFF_FFFF, to: Doubles.self)
  }
}
