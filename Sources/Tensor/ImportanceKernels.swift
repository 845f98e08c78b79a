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

  /// Calls `lanes(i, importances)` for eight elements from `i` at a time and `one(i, importance)`
  /// for the rest, row segment by row segment; `i` counts from the range's start.
  @inline(__always)
  static func forEachImportance(
    model: UnsafePointer<Float>, base: UnsafePointer<Float>, count: Int, offset: Int, width: Int,
    factors: UnsafePointer<Double>, lanes: (Int, Doubles) -> Void, one: (Int, Double) -> Void
  ) {
    var start = 0
    while start < count {
      let row = (offset + start) / width
      let end = Swift.min(count, (row + 1) * width - offset)
      let factor = factors[row]
      var i = start
      while i + 8 <= end {
        let m = Doubles(UnsafeRawPointer(model + i).loadUnaligned(as: SIMD8<Float>.self))
        let b = Doubles(UnsafeRawPointer(base + i).loadUnaligned(as: SIMD8<Float>.self))
        let difference = m - b
        // |d|: the sign bit cleared.
        let magnitude = unsafeBitCast(
          unsafeBitCast(difference, to: SIMD8<UInt64>.self) & ~(1 << 63), to: Doubles.self)
        lanes(i, magnitude * factor)
        i += 8
      }
      while i < end {
        one(i, abs(Double(model[i]) - Double(base[i])) * factor)
        i += 1
      }
      start = end
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
      let others = bins + 65536
      _ = withImportanceInputs(model, base, factors) { m, b, f in
        forEachImportance(
          model: m, base: b, count: count, offset: offset, width: width, factors: f,
          lanes: { _, x in
            let top = orderKeys(x) &>> 48
            for j in 0..<4 {
              bins[Int(top[2 * j])] &+= 1
              others[Int(top[2 * j + 1])] &+= 1
            }
          }, one: { _, x in bins[Int(orderKey(x) >> 48)] &+= 1 })
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
    let shift = UInt64(64 - knownBits)
    let (p0, p1, p2) = (prefixes[0], prefixes[prefixes.count > 1 ? 1 : 0], prefixes[prefixes.count - 1])
    var keys: [UInt64] = []
    @inline(__always) func appendIfUnder(_ key: UInt64) {
      let top = key >> shift
      if top == p0 || top == p1 || top == p2 { keys.append(key) }
    }
    _ = withImportanceInputs(model, base, factors) { m, b, f in
      forEachImportance(
        model: m, base: b, count: count, offset: offset, width: width, factors: f,
        lanes: { _, x in
          let k = orderKeys(x)
          let top = k &>> shift
          // A lane's top bit set where `top` equals a prefix ((d - 1) & ~d has it only for d = 0),
          // in plain integer operations: few lanes ever match.
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
        },
        one: { _, x in appendIfUnder(orderKey(x)) })
    }
    return keys
  }

  /// The fused range: the model's element where its importance is at least `threshold`, else
  /// the base's.
  public static func fuseByImportance(
    model: [Float], base: [Float], offset: Int, width: Int, factors: [Double], threshold: Double
  ) -> [Float] {
    let count = Swift.min(model.count, base.count)
    return [Float](unsafeUninitializedCapacity: count) { out, initialized in
      guard let o = out.baseAddress else { return }
      _ = withImportanceInputs(model, base, factors) { m, b, f in
        forEachImportance(
          model: m, base: b, count: count, offset: offset, width: width, factors: f,
          lanes: { i, x in
            let chosen = Doubles(UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)).replacing(
              with: Doubles(UnsafeRawPointer(m + i).loadUnaligned(as: SIMD8<Float>.self)), where: x .>= threshold)
            UnsafeMutableRawPointer(o + i).storeBytes(of: SIMD8<Float>(chosen), as: SIMD8<Float>.self)
          }, one: { i, x in o[i] = x >= threshold ? m[i] : b[i] })
      }
      initialized = count
    }
  }
}
