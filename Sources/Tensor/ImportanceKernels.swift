import CKernels

extension Kernels {
  /// `sum_i p_i log(p_i / q_i)` with `p = softmax(model) + epsilon` and
  /// `q = softmax(base) + epsilon` (each probability plus `epsilon`), for two rows of the same
  /// length: Arcee fusion's per-row KL divergence, in `Double`. Each softmax is
  /// `exp(x - max) * (1 / sum exp(x - max))`; the exponentials are `VectorMath`'s (within one
  /// ulp), or for a row of BF16 values a table's times `exp(-max)` (within two), the logarithms
  /// `VectorMath`'s, and every sum runs in eight lanes (element `i` into lane `i % 8`),
  /// added up in `VectorMath.sum`'s order, so the result is the same on every machine and
  /// thread count. `scratch` is grown to twice `count` rounded up to 8 doubles and reused. An empty
  /// row gives 0; a NaN or an infinity in a row gives NaN.
  public static func softmaxDivergence(
    _ model: ArraySlice<Float>, _ base: ArraySlice<Float>, epsilon: Double, scratch: inout [Double]
  ) -> Double {
    let count = min(model.count, base.count)
    guard count > 0 else { return 0 }
    let stride = (count + 7) & ~7
    if scratch.count < 2 * stride { scratch = [Double](repeating: 0, count: 2 * stride) }
    return model.withUnsafeBufferPointer { model in
      base.withUnsafeBufferPointer { base in
        scratch.withUnsafeMutableBufferPointer { scratch in
          guard let m = model.baseAddress, let b = base.baseAddress, let p = scratch.baseAddress else { return 0 }
          return divergence(m, b, count: count, epsilon: epsilon, p: p, q: p + stride)
        }
      }
    }
  }

  typealias Doubles = SIMD8<Double>

  /// The eight lanes from `i` of `count` floats as doubles, `fill` in the lanes past the end.
  @inline(__always)
  static func lanes(_ x: UnsafePointer<Float>, _ i: Int, count: Int, fill: Double) -> Doubles {
    if i + 8 <= count { return Doubles(UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)) }
    var v = Doubles(repeating: fill)
    for j in 0..<(count - i) { v[j] = Double(x[i + j]) }
    return v
  }

  /// `exp(x - max x)` of each of `count` floats into `out`, and their sum; `out` has room for
  /// `count` rounded up to 8, and the elements past `count` are set to 0. A row whose values are
  /// all BF16 values (the low 16 bits of each float zero) within `tableBound` of 0 takes each
  /// exponential from `bf16Exponentials` times `exp(-max x)`, within two ulps of `exp(x - max x)`
  /// (a lookup where the polynomial costs a few nanoseconds: BF16 checkpoints are the common
  /// input); any other row, `VectorMath.exp`.
  @inline(__always)
  static func shiftedExponentials(_ x: UnsafePointer<Float>, count: Int, into out: UnsafeMutablePointer<Double>)
    -> Double
  {
    var top = SIMD8<Float>(repeating: -.infinity)
    var lowBits = SIMD8<UInt32>(repeating: 0)
    var inside = SIMDMask<SIMD8<Int32>>(repeating: true)
    let bound = SIMD8<UInt32>(repeating: tableBound.bitPattern)
    var i = 0
    while i + 8 <= count {
      let v = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
      top.replace(with: v, where: v .> top)
      let bits = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<UInt32>.self)
      lowBits |= bits & 0xFFFF
      // |v| <= bound as the magnitudes' bit patterns (a NaN's are above every number's).
      inside = inside .& (bits & 0x7FFF_FFFF .<= bound)
      i += 8
    }
    var largest = top.max()
    var fromTable = lowBits == .zero && all(inside)
    while i < count {
      if x[i] > largest { largest = x[i] }
      fromTable = fromTable && x[i].bitPattern & 0xFFFF == 0 && abs(x[i]) <= tableBound
      i += 1
    }
    var total = Doubles(repeating: 0)
    i = 0
    if fromTable {
      // The lanes past the end are 0, which adds nothing to the sum.
      let scale = VectorMath.exp(Doubles(repeating: -Double(largest)))
      bf16Exponentials.withUnsafeBufferPointer { table in
        guard let entries = table.baseAddress else { return }
        while i < count {
          // Each float's top 16 bits are its BF16 pattern.
          if i + 8 <= count {
            for j in 0..<8 { out[i + j] = entries[Int(x[i + j].bitPattern >> 16)] }
          } else {
            for j in 0..<8 { out[i + j] = i + j < count ? entries[Int(x[i + j].bitPattern >> 16)] : 0 }
          }
          let e = UnsafeRawPointer(out + i).loadUnaligned(as: Doubles.self) * scale
          UnsafeMutableRawPointer(out + i).storeBytes(of: e, as: Doubles.self)
          total += e
          i += 8
        }
      }
      return VectorMath.sum(total)
    }
    // The lanes past the end are exp(-inf) = 0, which adds nothing to the sum.
    let shift = Doubles(repeating: Double(largest))
    while i < count {
      let e = VectorMath.exp(lanes(x, i, count: count, fill: -.infinity) - shift)
      UnsafeMutableRawPointer(out + i).storeBytes(of: e, as: Doubles.self)
      total += e
      i += 8
    }
    return VectorMath.sum(total)
  }

  /// The largest magnitude a row's values may have to take their exponentials from
  /// `bf16Exponentials`: `exp(x)`, `exp(-max x)` and their product (`x - max x` down to
  /// -700) stay normal doubles.
  static let tableBound: Float = 350

  /// `exp` of every BF16 value, indexed by its 16-bit pattern, in `Double`: `VectorMath`'s
  /// (within an ulp, the same on every machine, as the rest of the divergence). 512 KiB, of
  /// which a checkpoint's rows touch the few kilobytes around their magnitudes.
  static let bf16Exponentials: [Double] = [Double](unsafeUninitializedCapacity: 65536) { table, initialized in
    for first in stride(from: 0, to: 65536, by: 8) {
      var x = Doubles()
      for j in 0..<8 { x[j] = Double(Float(bitPattern: UInt32(first + j) << 16)) }
      let e = VectorMath.exp(x)
      for j in 0..<8 { table[first + j] = e[j] }
    }
    initialized = 65536
  }

  /// The divergence of two rows, `p` and `q` each with room for `count` rounded up to 8.
  static func divergence(
    _ model: UnsafePointer<Float>, _ base: UnsafePointer<Float>, count: Int, epsilon: Double,
    p: UnsafeMutablePointer<Double>, q: UnsafeMutablePointer<Double>
  ) -> Double {
    // Each softmax's division as a product with the reciprocal of its sum (within 1.5 ulps
    // where the division is within half of one): a vector division costs several times a
    // product, and this loop had three an element.
    let modelScale = Doubles(repeating: 1 / shiftedExponentials(model, count: count, into: p))
    let baseScale = Doubles(repeating: 1 / shiftedExponentials(base, count: count, into: q))
    var sum = Doubles(repeating: 0)
    var i = 0
    while i < count {
      // Past the end both sides are 0 * scale + epsilon, whose term epsilon * log 1 is 0.
      let pi = UnsafeRawPointer(p + i).loadUnaligned(as: Doubles.self) * modelScale + epsilon
      let qi = UnsafeRawPointer(q + i).loadUnaligned(as: Doubles.self) * baseScale + epsilon
      sum += pi * VectorMath.log(pi / qi)
      i += 8
    }
    return VectorMath.sum(sum)
  }
}

/// Arcee fusion's importances, `|model_i - base_i| * factor(row of i)` in `Double`, over one
/// range of a tensor whose rows are `width` long, eight at a time; and what its passes make of
/// them: a histogram of their keys' top 16 bits, the keys under given prefixes, the fused range.
/// `factors` holds one factor per row of the whole tensor; `offset` is the range's first
/// element in the tensor. The keys are the order-preserving 64-bit keys of the importances
/// (negative values below positive ones, as `orderKey`).
extension Kernels {
  /// The order-preserving key of a double: its pattern with the sign bit set when positive, all
  /// bits flipped when negative, so that unsigned order is the doubles' order.
  @inline(__always)
  public static func orderKey(_ x: Double) -> UInt64 {
    let bits = x.bitPattern
    return bits ^ ((0 &- (bits >> 63)) | (1 << 63))
  }

  /// The double whose `orderKey` is `key`.
  @inline(__always)
  public static func orderedDouble(_ key: UInt64) -> Double {
    Double(bitPattern: key >> 63 == 1 ? key & ~(1 << 63) : ~key)
  }

  @inline(__always)
  static func orderKeys(_ x: Doubles) -> SIMD8<UInt64> {
    let bits = unsafeBitCast(x, to: SIMD8<UInt64>.self)
    return bits ^ ((0 &- (bits &>> 63)) | (1 << 63))
  }

  /// Calls `visitor.lanes(i, importances)` for eight elements from `i` at a time and
  /// `visitor.one(i, importance)` for the rest, row segment by row segment; `i` counts from the
  /// range's start. A visitor type, not closures: each kernel's loop is then specialised with
  /// its step inlined (a closure that appends was called once per eight elements).
  @inline(__always)
  static func forEachImportance<Visitor: ImportanceVisitor>(
    model: UnsafePointer<Float>, base: UnsafePointer<Float>, count: Int, offset: Int, width: Int,
    factors: UnsafePointer<Double>, _ visitor: inout Visitor
  ) {
    forEachRowSegment(count: count, offset: offset, width: width) { start, end, row in
      let factor = factors[row]
      var i = start
      while i + 8 <= end {
        let m = Doubles(UnsafeRawPointer(model + i).loadUnaligned(as: SIMD8<Float>.self))
        let b = Doubles(UnsafeRawPointer(base + i).loadUnaligned(as: SIMD8<Float>.self))
        let difference = m - b
        // |d|: the sign bit cleared.
        let magnitude = unsafeBitCast(
          unsafeBitCast(difference, to: SIMD8<UInt64>.self) & ~(1 << 63), to: Doubles.self)
        visitor.lanes(i, magnitude * factor)
        i += 8
      }
      while i < end {
        visitor.one(i, abs(Double(model[i]) - Double(base[i])) * factor)
        i += 1
      }
    }
  }

  /// Calls `body` with the range's model, base and factors as pointers.
  @inline(__always)
  static func withImportanceInputs<R>(
    _ model: [Float], _ base: [Float], _ factors: [Double],
    _ body: (UnsafePointer<Float>, UnsafePointer<Float>, UnsafePointer<Double>) -> R
  ) -> R? {
    model.withUnsafeBufferPointer { m in
      base.withUnsafeBufferPointer { b in
        factors.withUnsafeBufferPointer { f in
          guard let m = m.baseAddress, let b = b.baseAddress, let f = f.baseAddress else { return nil }
          return body(m, b, f)
        }
      }
    }
  }

  /// Adds the top 16 bits of each importance's key into `counts`: two histograms of 65536
  /// bins, back to back, whose sum is the histogram. Half the lanes count into the second: a
  /// block's importances crowd into a few bins, and increments of one bin wait on each other
  /// through memory.
  public static func countImportanceKeys(
    model: [Float], base: [Float], offset: Int, width: Int, factors: [Double], into counts: inout [UInt32]
  ) {
    let count = Swift.min(model.count, base.count)
    precondition(counts.count == 2 * 65536, "countImportanceKeys needs two histograms of 65536 bins")
    counts.withUnsafeMutableBufferPointer { counts in
      guard let bins = counts.baseAddress else { return }
      struct Counter: ImportanceVisitor {
        let bins: UnsafeMutablePointer<UInt32>
        let others: UnsafeMutablePointer<UInt32>
        @inline(__always) mutating func lanes(_ i: Int, _ x: Doubles) {
          let top = Kernels.orderKeys(x) &>> 48
          for j in 0..<4 {
            bins[Int(top[2 * j])] &+= 1
            others[Int(top[2 * j + 1])] &+= 1
          }
        }
        @inline(__always) mutating func one(_ i: Int, _ x: Double) { bins[Int(Kernels.orderKey(x) >> 48)] &+= 1 }
      }
      var counter = Counter(bins: bins, others: bins + 65536)
      _ = withImportanceInputs(model, base, factors) { m, b, f in
        forEachImportance(model: m, base: b, count: count, offset: offset, width: width, factors: f, &counter)
      }
    }
  }

  /// Adds `countImportanceKeys`' two histograms (`counts`, back to back) into `histogram`, bin
  /// by bin: a loop over buffers that runs in vectors (once per range of a pass).
  public static func addHistograms(_ counts: [UInt32], into histogram: inout [Int]) {
    precondition(counts.count == 2 * 65536 && histogram.count == 65536, "addHistograms' bins")
    counts.withUnsafeBufferPointer { counts in
      histogram.withUnsafeMutableBufferPointer { histogram in
        for bin in 0..<65536 { histogram[bin] &+= Int(counts[bin]) &+ Int(counts[65536 + bin]) }
      }
    }
  }

  /// The keys of the importances whose top `knownBits` bits (16 to 48) equal one of
  /// `prefixes` (one to three), in element order.
  public static func importanceKeys(
    model: [Float], base: [Float], offset: Int, width: Int, factors: [Double], under prefixes: [UInt64],
    knownBits: Int
  ) -> [UInt64] {
    precondition((1...3).contains(prefixes.count) && (16...48).contains(knownBits), "importanceKeys' prefixes")
    let count = Swift.min(model.count, base.count)
    struct Collector: ImportanceVisitor {
      let shift: SIMD8<UInt64>
      let p0: SIMD8<UInt64>, p1: SIMD8<UInt64>, p2: SIMD8<UInt64>
      var keys: [UInt64] = []
      @inline(__always) mutating func lanes(_ i: Int, _ x: Doubles) {
        let k = Kernels.orderKeys(x)
        let top = k &>> shift
        // A lane's top bit set where `top` equals a prefix ((d - 1) & ~d has it only for d = 0),
        // in plain vector operations: few lanes ever match.
        let (d0, d1, d2) = (top ^ p0, top ^ p1, top ^ p2)
        let zero = ((d0 &- 1) & ~d0) | ((d1 &- 1) & ~d1) | ((d2 &- 1) & ~d2)
        // Lane j's flag at bit j, the lanes' flags or-ed together.
        let flags = (zero &>> 63) &<< SIMD8<UInt64>(0, 1, 2, 3, 4, 5, 6, 7)
        let four = flags.lowHalf | flags.highHalf
        let two = four.lowHalf | four.highHalf
        var hits = two[0] | two[1]
        while hits != 0 {
          keys.append(k[hits.trailingZeroBitCount])
          hits &= hits &- 1
        }
      }
      @inline(__always) mutating func one(_ i: Int, _ x: Double) {
        let key = Kernels.orderKey(x)
        let top = key >> shift[0]
        if top == p0[0] || top == p1[0] || top == p2[0] { keys.append(key) }
      }
    }
    var collector = Collector(
      shift: SIMD8(repeating: UInt64(64 - knownBits)), p0: SIMD8(repeating: prefixes[0]),
      p1: SIMD8(repeating: prefixes[prefixes.count > 1 ? 1 : 0]), p2: SIMD8(repeating: prefixes[prefixes.count - 1]))
    _ = withImportanceInputs(model, base, factors) { m, b, f in
      forEachImportance(model: m, base: b, count: count, offset: offset, width: width, factors: f, &collector)
    }
    return collector.keys
  }

  /// The fused range: the model's element where its importance is at least `threshold`, else
  /// the base's.
  public static func fuseByImportance(
    model: [Float], base: [Float], offset: Int, width: Int, factors: [Double], threshold: Double
  ) -> [Float] {
    let count = Swift.min(model.count, base.count)
    return [Float](unsafeUninitializedCapacity: count) { out, initialized in
      guard let o = out.baseAddress else { return }
      struct Fuser: ImportanceVisitor {
        let model: UnsafePointer<Float>, base: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>
        let threshold: Double
        @inline(__always) mutating func lanes(_ i: Int, _ x: Doubles) {
          let m = Doubles(UnsafeRawPointer(model + i).loadUnaligned(as: SIMD8<Float>.self))
          let chosen = Doubles(UnsafeRawPointer(base + i).loadUnaligned(as: SIMD8<Float>.self)).replacing(
            with: m, where: x .>= threshold)
          UnsafeMutableRawPointer(out + i).storeBytes(of: SIMD8<Float>(chosen), as: SIMD8<Float>.self)
        }
        @inline(__always) mutating func one(_ i: Int, _ x: Double) { out[i] = x >= threshold ? model[i] : base[i] }
      }
      _ = withImportanceInputs(model, base, factors) { m, b, f in
        var fuser = Fuser(model: m, base: b, out: o, threshold: threshold)
        forEachImportance(model: m, base: b, count: count, offset: offset, width: width, factors: f, &fuser)
      }
      initialized = count
    }
  }
}

/// One kernel's step over Arcee fusion's importances (`Kernels.forEachImportance`).
protocol ImportanceVisitor {
  /// Eight importances, of elements `i ..< i + 8` of the range.
  mutating func lanes(_ i: Int, _ x: SIMD8<Double>)
  /// The importance of element `i`.
  mutating func one(_ i: Int, _ x: Double)
}

/// Arcee fusion's key-collecting and fusing kernels over the stored elements of a range: where
/// the model and the base are both BF16 or both F32 and the machine has the unit's `CKernels`
/// loop (AVX-512 or AVX2 for the keys, AVX-512 for the fusing), the loop runs per row segment,
/// widening each element in a register as it goes, without decoding the range into arrays;
/// otherwise the inputs are decoded and the array kernels run. The same results every way.
extension Kernels {
  /// `importanceKeys` of `count` stored elements of the model and the base, the range's first
  /// element being element `offset` of the tensor.
  public static func importanceKeys(
    model: StoredElements, base: StoredElements, count: Int, offset: Int, width: Int, factors: [Double],
    under prefixes: [UInt64], knownBits: Int, unit: VectorUnit = .machine
  ) -> [UInt64] {
    precondition((1...3).contains(prefixes.count) && (16...48).contains(knownBits), "importanceKeys' prefixes")
    guard count > 0, let kernel = storedKeysKernel(model, base, unit: unit) else {
      return importanceKeys(
        model: model.decoded(count: count), base: base.decoded(count: count), offset: offset, width: width,
        factors: factors, under: prefixes, knownBits: knownBits)
    }
    // Each prefix as the range of keys under it.
    let shift = UInt64(64 - knownBits)
    let lows = (0..<3).map { prefixes[Swift.min($0, prefixes.count - 1)] << shift }
    let highs = lows.map { $0 | ((1 << shift) - 1) }
    return withUnsafeTemporaryAllocation(of: UInt64.self, capacity: count + 8) { scratch in
      guard let out = scratch.baseAddress else { return [] }
      var found = 0
      forEachRowSegment(count: count, offset: offset, width: width) { start, end, row in
        found += kernel(model.start, base.start, start, end - start, factors[row], lows, highs, out + found)
      }
      return Array(UnsafeBufferPointer(start: out, count: found))
    }
  }

  /// `fuseByImportance` of `count` stored elements of the model and the base, encoded as
  /// `dtype` into `out` (room for `count` elements of it).
  public static func fuseByImportance(
    model: StoredElements, base: StoredElements, count: Int, offset: Int, width: Int, factors: [Double],
    threshold: Double, into out: UnsafeMutableRawBufferPointer, as dtype: DType, unit: VectorUnit = .machine
  ) {
    precondition(out.count >= count * dtype.size, "fuseByImportance's output")
    guard let target = out.baseAddress, count > 0 else { return }
    guard dtype == .bf16 || dtype == .f32, let kernel = storedFuseKernel(model, base, unit: unit)
    else {
      let fused = fuseByImportance(
        model: model.decoded(count: count), base: base.decoded(count: count), offset: offset, width: width,
        factors: factors, threshold: threshold)
      fused.withUnsafeBufferPointer { DTypeConversion.encode($0, as: dtype, into: out) }
      return
    }
    forEachRowSegment(count: count, offset: offset, width: width) { start, end, row in
      kernel(model.start, base.start, start, end - start, factors[row], threshold, target, dtype == .bf16 ? 1 : 0)
    }
  }

  typealias StoredKeysKernel = (
    UnsafeRawPointer?, UnsafeRawPointer?, Int, Int, Double, UnsafePointer<UInt64>?, UnsafePointer<UInt64>?,
    UnsafeMutablePointer<UInt64>?
  ) -> Int
  typealias StoredFuseKernel = (
    UnsafeRawPointer?, UnsafeRawPointer?, Int, Int, Double, Double, UnsafeMutableRawPointer?, Int32
  ) -> Void

  /// The `CKernels` key loop for a model and base both BF16 or both F32 on `unit` (AVX-512 or
  /// AVX2, as the machine has them); nil where the inputs must be decoded first.
  static func storedKeysKernel(_ model: StoredElements, _ base: StoredElements, unit: VectorUnit)
    -> StoredKeysKernel?
  {
    guard model.dtype == base.dtype else { return nil }
    switch (unit.available, model.dtype) {
    case (.avx512, .bf16): return mergekit_importance_keys_bf16_avx512
    case (.avx512, .f32): return mergekit_importance_keys_f32_avx512
    case (.avx2, .bf16): return mergekit_importance_keys_bf16_avx2
    case (.avx2, .f32): return mergekit_importance_keys_f32_avx2
    default: return nil
    }
  }

  /// The `CKernels` fusing loop for a model and base both BF16 or both F32 on a unit with
  /// AVX-512; nil elsewhere (an AVX2 form ran no faster than the Swift loop over decoded values).
  static func storedFuseKernel(_ model: StoredElements, _ base: StoredElements, unit: VectorUnit)
    -> StoredFuseKernel?
  {
    guard model.dtype == base.dtype, unit.available == .avx512 else { return nil }
    switch model.dtype {
    case .bf16: return mergekit_fuse_by_importance_bf16_avx512
    case .f32: return mergekit_fuse_by_importance_f32_avx512
    default: return nil
    }
  }

  /// Calls `body(start, end, row)` for each segment `start ..< end` of a range of `count`
  /// elements (counted from the range's start, element `offset` of the tensor) that lies in one
  /// row of `width` elements, in order.
  @inline(__always)
  static func forEachRowSegment(count: Int, offset: Int, width: Int, _ body: (Int, Int, Int) -> Void) {
    var start = 0
    while start < count {
      let row = (offset + start) / width
      let end = Swift.min(count, (row + 1) * width - offset)
      body(start, end, row)
      start = end
    }
  }
}
