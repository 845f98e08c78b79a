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

  /// `base + scale * sum_t weights[t] * arrays[t]` (no base: 0), summed in `Double`.
  public static func weightedSum(_ arrays: [[Float]], weights: [Double], scale: Double = 1, base: [Float]? = nil) -> [Float] {
    let n = arrays.first?.count ?? base?.count ?? 0
    precondition(arrays.allSatisfy { $0.count == n } && weights.count == arrays.count && (base?.count ?? n) == n)
    return withExtendedLifetime((arrays, base)) {
      let inputs = pointers(arrays)
      let b = base.map { pointers([$0])[0] }
      return make(n) { range, out in
        let count = inputs.count
        for i in range {
          var sum = 0.0
          for t in 0..<count { sum += weights[t] * Double(inputs[t].pointer!.assumingMemoryBound(to: Float.self)[i]) }
          let start = b.map { Double($0.pointer!.assumingMemoryBound(to: Float.self)[i]) } ?? 0
          (out + i).initialize(to: Float(start + scale * sum))
        }
      }
    }
  }

  /// TIES's disjoint merge: per element, the sign of `sum_t w_t d_t` is elected (0 counts as +);
  /// the weighted deltas agreeing with it (zeros never agree) are summed, divided by their
  /// weights' sum when `normalize` (0 -> 1), scaled by `lambda` and added to `base`.
  public static func consensusMerge(base: [Float], deltas: [[Float]], weights: [Double], lambda: Double, normalize: Bool) -> [Float] {
    let n = base.count
    precondition(deltas.allSatisfy { $0.count == n } && weights.count == deltas.count)
    return withExtendedLifetime((base, deltas)) {
      let inputs = pointers(deltas)
      let b = pointers([base])[0]
      return make(n) { range, out in
        let count = inputs.count
        let basePointer = b.pointer!.assumingMemoryBound(to: Float.self)
        for i in range {
          var total = 0.0
          for t in 0..<count { total += weights[t] * Double(inputs[t].pointer!.assumingMemoryBound(to: Float.self)[i]) }
          var mixed = 0.0
          var divisor = 0.0
          for t in 0..<count {
            let d = weights[t] * Double(inputs[t].pointer!.assumingMemoryBound(to: Float.self)[i])
            if d != 0 && (d > 0) == (total >= 0) {
              mixed += d
              divisor += weights[t]
            }
          }
          if normalize { mixed /= divisor == 0 ? 1 : divisor }
          (out + i).initialize(to: Float(Double(basePointer[i]) + lambda * mixed))
        }
      }
    }
  }

  /// `keep[i] ? values[i] * scale : 0` (scale applied in `Double`; 1 leaves values exact).
  public static func masked(_ values: [Float], keep: [Bool], scale: Double = 1) -> [Float] {
    precondition(values.count == keep.count)
    return withExtendedLifetime((values, keep)) {
      let v = pointers([values])[0]
      let k = keep.withUnsafeBufferPointer { SendableRawPointer(UnsafeRawPointer($0.baseAddress)) }
      return make(values.count) { range, out in
        let vp = v.pointer!.assumingMemoryBound(to: Float.self)
        let kp = k.pointer!.assumingMemoryBound(to: Bool.self)
        for i in range {
          let x = kp[i] ? (scale == 1 ? vp[i] : Float(Double(vp[i]) * scale)) : 0
          (out + i).initialize(to: x)
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
      return Elementwise.sum(a.count) { i in
        Double(x.pointer!.assumingMemoryBound(to: Float.self)[i]) * Double(y.pointer!.assumingMemoryBound(to: Float.self)[i])
      }
    }
  }

  /// Sum of |values| (where `keep`, if given), in `Double`, deterministic.
  public static func absoluteSum(_ values: [Float], keep: [Bool]? = nil) -> Double {
    values.withUnsafeBufferPointer { v in
      let p = SendableRawPointer(UnsafeRawPointer(v.baseAddress))
      return withExtendedLifetime(keep) {
        let k = keep.map { $0.withUnsafeBufferPointer { SendableRawPointer(UnsafeRawPointer($0.baseAddress)) } }
        return Elementwise.sum(values.count) { i in
          if let k, !k.pointer!.assumingMemoryBound(to: Bool.self)[i] { return 0 }
          return Double(abs(p.pointer!.assumingMemoryBound(to: Float.self)[i]))
        }
      }
    }
  }
}
