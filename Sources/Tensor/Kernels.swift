/// The element loops of merging, written once with raw pointers over fixed parallel blocks (so
/// results never depend on the thread count). Callers work with arrays; sums run in `Double`
/// and each result is rounded once.
public enum Kernels {
  /// Runs `body(range)` over fixed blocks of `0..<count` in parallel.
  @inline(__always)
  static func blocks(_ count: Int, _ body: (Range<Int>) -> Void) {
    let size = Elementwise.blockSize
    try? Parallel.forEach((count + size - 1) / size) { _, block in
      body((block * size)..<Swift.min(count, (block + 1) * size))
    }
  }

  /// An array of `count` elements filled by `fill(range, output)` over parallel blocks.
  @inline(__always)
  static func make<T>(_ count: Int, _ fill: (Range<Int>, UnsafeMutablePointer<T>) -> Void) -> [T] {
    [T](unsafeUninitializedCapacity: count) { buffer, initialized in
      let out = SendablePointer(buffer.baseAddress)
      blocks(count) { fill($0, out.pointer!) }
      initialized = count
    }
  }

  /// Elements stored as `dtype` from `start` on (unaligned bytes are fine), decoded chunk by chunk.
  public struct StoredElements: @unchecked Sendable {
    public let start: UnsafeRawPointer
    public let dtype: DType

    public init(start: UnsafeRawPointer, dtype: DType) {
      self.start = start
      self.dtype = dtype
    }

    /// Decodes elements `first ..< first + count` into `out`.
    @inline(__always)
    func decode(_ first: Int, _ count: Int, into out: UnsafeMutablePointer<Float>) {
      DTypeConversion.decode(
        UnsafeRawBufferPointer(start: start + first * dtype.size, count: count * dtype.size), from: dtype,
        into: UnsafeMutableBufferPointer(start: out, count: count))
    }
  }

  /// Raw read pointers to each array (valid while the arrays are alive and unmodified).
  static func pointers(_ arrays: [[Float]]) -> [SendableRawPointer] {
    arrays.map { a in a.withUnsafeBufferPointer { SendableRawPointer(UnsafeRawPointer($0.baseAddress)) } }
  }

  /// `a - b`.
  public static func difference(_ a: [Float], _ b: [Float]) -> [Float] {
    precondition(a.count == b.count)
    return a.withUnsafeBufferPointer { pa in
      b.withUnsafeBufferPointer { pb in
        let (x, y) = (SendableRawPointer(UnsafeRawPointer(pa.baseAddress)), SendableRawPointer(UnsafeRawPointer(pb.baseAddress)))
        return make(a.count) { range, out in
          let xa = x.pointer!.assumingMemoryBound(to: Float.self)
          let yb = y.pointer!.assumingMemoryBound(to: Float.self)
          for i in range { (out + i).initialize(to: xa[i] - yb[i]) }
        }
      }
    }
  }

  /// `model - base` for each model, the models read straight from stored elements of any
  /// floating dtype: the bits `difference` gives on decoded arrays, without decoding any model
  /// whole. Runs on the calling thread.
  public static func differences(_ models: [StoredElements], minus base: [Float]) -> [[Float]] {
    let count = base.count
    return base.withUnsafeBufferPointer { b in
      models.map { model in
        [Float](unsafeUninitializedCapacity: count) { out, initialized in
          var start = 0
          while start < count {
            let length = Swift.min(chunk, count - start)
            let (x, y) = (out.baseAddress! + start, b.baseAddress! + start)
            model.decode(start, length, into: x)
            for j in 0..<length { x[j] = x[j] - y[j] }
            start += length
          }
          initialized = count
        }
      }
    }
  }

  /// Elements per step of the chunked kernels: their Double accumulators stay in L1.
  static let chunk = 512

  /// Runs `body(start, length)` over `range` in chunks of at most `chunk` elements, with a
  /// scratch buffer of `buffers * chunk` doubles (stack memory, reused by every chunk).
  @inline(__always)
  static func chunked(_ range: Range<Int>, buffers: Int, _ body: (Int, Int, UnsafeMutablePointer<Double>) -> Void) {
    withUnsafeTemporaryAllocation(of: Double.self, capacity: buffers * chunk) { scratch in
      var start = range.lowerBound
      while start < range.upperBound {
        let length = Swift.min(chunk, range.upperBound - start)
        body(start, length, scratch.baseAddress!)
        start += length
      }
    }
  }

  /// 1 when `m` is not zero, else 0, without a branch.
  @inline(__always) static func isNonzero(_ m: UInt64) -> UInt64 { (m | (0 &- m)) >> 63 }

  /// `base + scale * sum_t weights[t] * x_t` (no base: 0), summed in `Double` and rounded once,
  /// where `x_t` is `arrays[t]`, or `arrays[t] - base` rounded to `Float` when `subtractingBase`.
  public static func weightedSum(
    _ arrays: [[Float]], weights: [Double], scale: Double = 1, base: [Float]? = nil, subtractingBase: Bool = false
  ) -> [Float] {
    let n = arrays.first?.count ?? base?.count ?? 0
    precondition(arrays.allSatisfy { $0.count == n } && weights.count == arrays.count && (base?.count ?? n) == n)
    precondition(!subtractingBase || base != nil)
    return withExtendedLifetime((arrays, base)) {
      let terms = pointers(arrays).map { StoredElements(start: $0.pointer!, dtype: .f32) }
      let b = base.map { StoredElements(start: pointers([$0])[0].pointer!, dtype: .f32) }
      return make(n) { range, out in
        weightedSumChunks(range, terms: terms, weights: weights, scale: scale, base: b, subtractingBase: subtractingBase) { start, length, sums in
          (out + start).initialize(from: sums, count: length)
        }
      }
    }
  }

  /// The same weighted sum computed straight from stored elements of any floating dtype, `count`
  /// of them, encoded as `dtype` into `out`: each chunk is decoded into L1-sized scratch, so no
  /// input is ever decoded whole. Gives the bits `weightedSum` gives on the decoded arrays,
  /// encoded. Runs on the calling thread.
  public static func weightedSum(
    _ terms: [StoredElements], weights: [Double], scale: Double, base: StoredElements?, subtractingBase: Bool, count: Int,
    into out: UnsafeMutableRawBufferPointer, as dtype: DType
  ) {
    precondition(out.count >= count * dtype.size && weights.count == terms.count && (!subtractingBase || base != nil))
    weightedSumChunks(0..<count, terms: terms, weights: weights, scale: scale, base: base, subtractingBase: subtractingBase) { start, length, sums in
      DTypeConversion.encode(
        UnsafeBufferPointer(start: sums, count: length), as: dtype,
        into: UnsafeMutableRawBufferPointer(rebasing: out[(start * dtype.size)..<((start + length) * dtype.size)]))
    }
  }

  /// The one implementation of the weighted sum: chunk by chunk over `range`, inputs decoded to
  /// `Float` scratch, sums in `Double`; `emit(start, length, results)` takes each chunk's results.
  @inline(__always)
  static func weightedSumChunks(
    _ range: Range<Int>, terms: [StoredElements], weights: [Double], scale: Double, base: StoredElements?, subtractingBase: Bool,
    emit: (Int, Int, UnsafePointer<Float>) -> Void
  ) {
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 3 * chunk) { floats in
      let (b, x, results) = (floats.baseAddress!, floats.baseAddress! + chunk, floats.baseAddress! + 2 * chunk)
      chunked(range, buffers: 1) { start, length, sum in
        if let base { base.decode(start, length, into: b) }
        for j in 0..<length { sum[j] = 0 }
        for t in terms.indices {
          terms[t].decode(start, length, into: x)
          if subtractingBase { for j in 0..<length { x[j] = x[j] - b[j] } }
          let w = weights[t]
          for j in 0..<length { sum[j] += w * Double(x[j]) }
        }
        if base != nil {
          for j in 0..<length { results[j] = Float(Double(b[j]) + scale * sum[j]) }
        } else {
          for j in 0..<length { results[j] = Float(0 + scale * sum[j]) }
        }
        emit(start, length, results)
      }
    }
  }

  /// TIES's disjoint merge: per element, the sign of `sum_t w_t d_t` is elected (0 counts as +);
  /// the weighted deltas agreeing with it (zeros never agree) are summed, divided by their
  /// weights' sum when `normalize` (0 -> 1), scaled by `lambda` and added to `base`. Branch-free
  /// over chunks: which deltas agree is unpredictable, and mispredicted branches cost 20x.
  public static func consensusMerge(base: [Float], deltas: [[Float]], weights: [Double], lambda: Double, normalize: Bool) -> [Float] {
    let n = base.count
    precondition(deltas.allSatisfy { $0.count == n } && weights.count == deltas.count)
    return withExtendedLifetime((base, deltas)) {
      let inputs = pointers(deltas)
      let b = pointers([base])[0]
      return make(n) { range, out in
        chunked(range, buffers: 4) { start, length, scratch in
          let (total, mixed, divisor) = (scratch, scratch + chunk, scratch + 2 * chunk)
          // 1 where the elected sign is negative (the sum is below -0), per element.
          let negative = UnsafeMutableRawPointer(scratch + 3 * chunk).assumingMemoryBound(to: UInt64.self)
          for j in 0..<length {
            total[j] = 0
            mixed[j] = 0
            divisor[j] = 0
          }
          for t in inputs.indices {
            let x = inputs[t].pointer!.assumingMemoryBound(to: Float.self) + start
            let w = weights[t]
            for j in 0..<length { total[j] += w * Double(x[j]) }
          }
          for j in 0..<length {
            // Sign bits as integers: comparisons compile to branches, which mispredict here.
            let sum = total[j].bitPattern
            negative[j] = (sum >> 63) & isNonzero(sum << 1)  // -0 counts as +
          }
          for t in inputs.indices {
            let x = inputs[t].pointer!.assumingMemoryBound(to: Float.self) + start
            let w = weights[t]
            if normalize {
              for j in 0..<length {
                let bits = (w * Double(x[j])).bitPattern
                let keep = 0 &- (isNonzero(bits << 1) & ~((bits >> 63) ^ negative[j]))
                mixed[j] += Double(bitPattern: bits & keep)
                divisor[j] += Double(bitPattern: w.bitPattern & keep)
              }
            } else {
              for j in 0..<length {
                let bits = (w * Double(x[j])).bitPattern
                mixed[j] += Double(bitPattern: bits & (0 &- (isNonzero(bits << 1) & ~((bits >> 63) ^ negative[j]))))
              }
            }
          }
          let x = b.pointer!.assumingMemoryBound(to: Float.self) + start
          if normalize {
            for j in 0..<length { mixed[j] /= divisor[j] == 0 ? 1 : divisor[j] }
          }
          for j in 0..<length { (out + start + j).initialize(to: Float(Double(x[j]) + lambda * mixed[j])) }
        }
      }
    }
  }

  /// `keep[i] ? values[i] * scale : 0` (scale applied in `Double`; 1 leaves values exact).
  /// Branch-free: the kept bits are masked, since the keep pattern is unpredictable.
  public static func masked(_ values: [Float], keep: [Bool], scale: Double = 1) -> [Float] {
    precondition(values.count == keep.count)
    return withExtendedLifetime((values, keep)) {
      let v = pointers([values])[0]
      let k = keep.withUnsafeBufferPointer { SendableRawPointer(UnsafeRawPointer($0.baseAddress)) }
      return make(values.count) { range, out in
        let vp = v.pointer!.assumingMemoryBound(to: UInt32.self)
        let kp = k.pointer!.assumingMemoryBound(to: UInt8.self)
        if scale == 1 {
          for i in range { (out + i).initialize(to: Float(bitPattern: vp[i] & (0 &- UInt32(kp[i] & 1)))) }
        } else {
          for i in range {
            let scaled = Float(Double(Float(bitPattern: vp[i])) * scale).bitPattern
            (out + i).initialize(to: Float(bitPattern: scaled & (0 &- UInt32(kp[i] & 1))))
          }
        }
      }
    }
  }

  /// `a[i] && !b[i]`.
  public static func andNot(_ a: [Bool], _ b: [Bool]) -> [Bool] {
    zip(a, b).map { $0 && !$1 }
  }

  /// DARE's keep mask: element `offset + i` is kept when draw `offset + i` of `rng` is below `density`.
  public static func randomKeep(_ count: Int, offset: Int, rng: CounterRNG, density: Float) -> [Bool] {
    make(count) { range, out in
      for i in range { (out + i).initialize(to: rng.uniform(UInt64(offset + i)) < density) }
    }
  }

  /// `sum a[i] * b[i]` in `Double`, deterministic.
  public static func dot(_ a: [Float], _ b: [Float]) -> Double {
    precondition(a.count == b.count)
    return withExtendedLifetime((a, b)) {
      let (x, y) = (pointers([a])[0], pointers([b])[0])
      return Elementwise.sumOfBlocks(a.count) { range in
        let (xp, yp) = (x.pointer!.assumingMemoryBound(to: Float.self), y.pointer!.assumingMemoryBound(to: Float.self))
        return Elementwise.blockSum(range) { Double(xp[$0]) * Double(yp[$0]) }
      }
    }
  }

  /// Sum of |values| (where `keep`, if given), in `Double`, deterministic.
  public static func absoluteSum(_ values: [Float], keep: [Bool]? = nil) -> Double {
    withExtendedLifetime((values, keep)) {
      let v = pointers([values])[0]
      let k = keep.map { $0.withUnsafeBufferPointer { SendableRawPointer(UnsafeRawPointer($0.baseAddress)) } }
      return Elementwise.sumOfBlocks(values.count) { range in
        let vp = v.pointer!.assumingMemoryBound(to: UInt32.self)
        guard let kp = k?.pointer?.assumingMemoryBound(to: UInt8.self) else {
          return Elementwise.blockSum(range) { Double(Float(bitPattern: vp[$0] & 0x7FFF_FFFF)) }
        }
        return Elementwise.blockSum(range) { Double(Float(bitPattern: vp[$0] & 0x7FFF_FFFF & (0 &- UInt32(kp[$0] & 1)))) }
      }
    }
  }
}
