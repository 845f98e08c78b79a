import Testing

@testable import Tensor

@Suite struct KernelsTests {
  /// TIES on sparsified deltas, element by element with plain loops: keep, rescale, elect the
  /// sign of the weighted sum (0 counts as +), average the agreeing weighted deltas.
  func referenceTIES(
    base: [Float], deltas: [[Float]], keep: [[Bool]], scales: [Double], weights: [Double], lambda: Double,
    normalize: Bool
  ) -> [Float] {
    base.indices.map { j in
      let sparse = deltas.indices.map { t -> Float in
        guard keep[t][j] else { return 0 }
        return scales[t] == 1 ? deltas[t][j] : Float(Double(deltas[t][j]) * scales[t])
      }
      var total = 0.0
      for t in sparse.indices { total += weights[t] * Double(sparse[t]) }
      let negative = total < 0
      var (mixed, divisor) = (0.0, 0.0)
      for t in sparse.indices {
        let value = weights[t] * Double(sparse[t])
        guard value != 0, (value < 0) == negative else { continue }
        mixed += value
        divisor += weights[t]
      }
      if normalize { mixed /= divisor == 0 ? 1 : divisor }
      return Float(Double(base[j]) + lambda * mixed)
    }
  }

  /// How many elements of two equally long arrays differ in their bits (a count, so that a
  /// failure does not print whole arrays).
  func differingBits(_ a: [Float], _ b: [Float]) -> Int {
    a.count == b.count ? zip(a, b).filter { $0.bitPattern != $1.bitPattern }.count : max(a.count, b.count)
  }

  /// The weighted sum from stored bytes (its decoding fused into the sum loops when the inputs
  /// share one dtype among BF16, F16 and F32) gives the bits of the weighted sum of the decoded
  /// arrays, encoded: with and without a base, subtracting it or not, into each of the three
  /// output dtypes, with zeros and a negative weight (-0 products) and a count off the chunk size;
  /// inputs of mixed dtypes take the scratch route and agree too. One to six terms, through the
  /// AVX-512 loop (BF16 and F32) where the machine has it and through the portable loops.
  @Test func storedWeightedSumIsTheDecodedOne() {
    let n = 1_037
    let rng = CounterRNG(seed: 9, stream: "weighted")
    // Zeros everywhere at i % 7 == 0, the base's negative at every other one of them.
    let values = (0..<7).map { k in
      (0..<n).map { i -> Float in i % 7 == 0 ? (k == 0 && i % 14 == 0 ? -0.0 : 0) : rng.normal(UInt64(k * n + i)) }
    }
    // Two negative weights alone leave a -0 sum where both products are -0, which the sums'
    // leading `0 +` turns to +0 (seen where the base is -0).
    let weightSets = [[-0.7, -1.3, 0.25], [-0.7, -1.3], [0.6], [0.3, -0.2, 1.1, 0.5, 0.9, -0.4]]
    func withBytes<R>(_ arrays: [[UInt8]], _ body: ([UnsafeRawPointer]) -> R) -> R {
      func nest(_ i: Int, _ held: [UnsafeRawPointer]) -> R {
        guard i < arrays.count else { return body(held) }
        return arrays[i].withUnsafeBytes { nest(i + 1, held + [$0.baseAddress ?? Kernels.noElements]) }
      }
      return nest(0, [])
    }
    for pattern in [
      [DType.bf16, .bf16, .bf16, .bf16], [.f16, .f16, .f16, .f16], [.f32, .f32, .f32, .f32],
      [.bf16, .f32, .bf16, .f16],
    ] {
      let types = pattern + pattern.prefix(3)
      let stored = zip(values, types).map { Tensor(shape: [n], scalars: $0).encoded(as: $1).bytes }
      let decoded = zip(stored, types).map { bytes, type in
        bytes.withUnsafeBytes { Tensor(decoding: $0, dtype: type, shape: [n]).scalars }
      }
      for output in [DType.bf16, .f16, .f32] {
        for weights in weightSets {
          for (hasBase, subtracting) in [(false, false), (true, false), (true, true)] {
            let terms = 1...weights.count
            let expected = Tensor(
              shape: [n],
              scalars: Kernels.weightedSum(
                Array(decoded[terms]), weights: weights, scale: 0.9, base: hasBase ? decoded[0] : nil,
                subtractingBase: subtracting)
            ).encoded(as: output).bytes
            for unit in VectorUnit.runnable {
              let actual = withBytes(stored) { p in
                let elements = zip(p, types).map { Kernels.StoredElements(start: $0, dtype: $1) }
                return [UInt8](unsafeUninitializedCapacity: n * output.size) { buffer, initialized in
                  Kernels.weightedSum(
                    Array(elements[terms]), weights: weights, scale: 0.9, base: hasBase ? elements[0] : nil,
                    subtractingBase: subtracting, count: n, into: UnsafeMutableRawBufferPointer(buffer), as: output,
                    unit: unit)
                  initialized = n * output.size
                }
              }
              let same = actual == expected
              #expect(
                same,
                "\(pattern) -> \(output), \(weights), base \(hasBase), subtracting \(subtracting), \(unit)"
              )
            }
          }
        }
      }
    }
  }

  /// DARE's draws packed straight into words are the packed draws of `randomKeep`, element for
  /// element, by every vector unit the machine runs and the portable loop (counts off the word
  /// boundary, offsets, counters whose low word wraps, densities near the ends), and the two L1
  /// sums over them are the mask's and the whole slice's sums to the bit, by every unit (groups
  /// of four blocks, a pair, a lone block).
  @Test(arguments: [Float(1e-7), 0.1, 0.5, 0.9, 0.999_999_9])
  func packedRandomKeepIsTheMask(_ density: Float) {
    let rng = CounterRNG(seed: 4, stream: "dare#1")
    let values = rng.normalTensor([7 * 32_768 + 9]).scalars
    for (count, offset) in [(1, 0), (63, 5), (64, 64), (70_001, 262_144), (7 * 32_768 + 9, 3), (300, (1 << 32) - 100)] {
      let mask = Kernels.randomKeep(count, offset: offset, rng: rng, density: density)
      let expected = (0..<count).map { Double(rng.bits32(UInt64(offset + $0)) >> 8) * 0x1p-24 < Double(density) }
      #expect(mask == expected)
      let bits = Kernels.packBits(mask)
      let slice = Array(values[0..<count])
      let sums = Kernels.absoluteSums(slice, keepBits: bits, unit: .portable)
      #expect(sums.all == Kernels.absoluteSum(slice) && sums.kept == Kernels.absoluteSum(slice, keep: mask))
      for unit in VectorUnit.runnable {
        #expect(
          Kernels.randomKeepBits(count, offset: offset, rng: rng, density: density, unit: unit) == bits, "\(unit)")
        let unitSums = Kernels.absoluteSums(slice, keepBits: bits, unit: unit)
        #expect(unitSums.all == sums.all && unitSums.kept == sums.kept, "\(unit)")
      }
      // Against float64 sums in another order: equal to rounding.
      let exact = zip(slice, mask).reduce((0.0, 0.0)) {
        ($0.0 + Double(abs($1.0)), $0.1 + ($1.1 ? Double(abs($1.0)) : 0))
      }
      #expect(abs(sums.all - exact.0) <= 1e-9 * exact.0 && abs(sums.kept - exact.1) <= 1e-9 * max(exact.1, 1e-30))
    }
  }

  /// DARE's two L1 sums of stored differences `model - base` are those of `differences`' array
  /// to the bit: BF16 pairs through every vector unit's loop (groups of four blocks, a pair, a
  /// lone block and a partial one) and the portable path, other dtypes through the array; with
  /// differences of zero of either sign.
  @Test func absoluteSumsOfStoredDifferencesAreThoseOfTheArray() {
    let block = Elementwise.blockSize
    for n in [5, 4 * block, 7 * block + 1_001] {
      let base = CounterRNG(seed: 13, stream: "l1-base").normalTensor([n])
      let model = Tensor(
        shape: [n],
        scalars: base.scalars.enumerated().map { i, b in
          i % 9 == 0 ? b : b + 0.05 * CounterRNG(seed: 14, stream: "l1-model").normal(UInt64(i))
        })
      let bits = Kernels.randomKeepBits(n, offset: 3, rng: CounterRNG(seed: 15, stream: "l1"), density: 0.4)
      for (modelType, baseType) in [(DType.bf16, DType.bf16), (.f32, .f32), (.bf16, .f16)] {
        let (m, b) = (model.encoded(as: modelType), base.encoded(as: baseType))
        m.bytes.withUnsafeBytes { mb in
          b.bytes.withUnsafeBytes { bb in
            let (ms, bs) = (
              Kernels.StoredElements(start: mb.baseAddress!, dtype: modelType),
              Kernels.StoredElements(start: bb.baseAddress!, dtype: baseType)
            )
            let expected = Kernels.absoluteSums(
              Kernels.differences([ms], minus: bs.decoded(count: n))[0], keepBits: bits, unit: .portable)
            for unit in VectorUnit.runnable {
              let sums = Kernels.absoluteSums(differenceOf: ms, minus: bs, count: n, keepBits: bits, unit: unit)
              #expect(
                sums.all == expected.all && sums.kept == expected.kept, "\(n) \(modelType) \(baseType) \(unit)")
            }
          }
        }
      }
    }
  }

  /// Packing puts flag i on bit i % 64 of word i / 64, for lengths with and without a partial
  /// last word (checked against the bits read back one by one).
  @Test func packedFlagsSitOnTheirBits() {
    let rng = CounterRNG(seed: 12, stream: "pack")
    for length in [0, 1, 8, 63, 64, 65, 300, 1_000] {
      let flags = (0..<length).map { rng.uniform(UInt64(length * 1_000 + $0)) < 0.5 }
      let words = Kernels.packBits(flags)
      #expect(words.count == (length + 63) / 64)
      let read = (0..<length).map { i in (words[i / 64] >> UInt64(i % 64)) & 1 == 1 }
      #expect(read == flags, "\(length)")
      // No stray bits past the last flag.
      if length % 64 != 0, let last = words.last { #expect(last >> UInt64(length % 64) == 0) }
    }
  }

  /// Packed flags unpack to all-ones or zero masks, element for element, from any first element
  /// (on a word boundary or not) and for any count.
  @Test func packedFlagsUnpackToMasks() {
    let rng = CounterRNG(seed: 6, stream: "flags")
    let flags = (0..<300).map { rng.uniform(UInt64($0)) < 0.5 }
    let words = Kernels.packBits(flags)
    for (first, count) in [(0, 300), (5, 1), (63, 2), (64, 64), (100, 137), (37, 0)] {
      var masks = [UInt32](repeating: 7, count: count)
      words.withUnsafeBufferPointer { w in
        masks.withUnsafeMutableBufferPointer { m in
          if let wp = w.baseAddress, let mp = m.baseAddress {
            Kernels.unpackMasks(wp, first: first, count: count, into: mp)
          }
        }
      }
      #expect(masks == flags[first..<(first + count)].map { $0 ? UInt32.max : 0 })
    }
  }

  /// The three sums of one sweep are the three dot products to the bit, on one block, several
  /// blocks (in groups of four and alone), and a count off the four lanes; and close to a plain
  /// float64 sum.
  @Test func dotsOfPairAreTheDots() {
    for n in [1, 7, 32_768, 100_003, 300_007] {
      let a = CounterRNG(seed: 1, stream: "a").normalTensor([n]).scalars
      let b = CounterRNG(seed: 2, stream: "b").normalTensor([n]).scalars
      let sums = Kernels.dotsOfPair(a, b)
      #expect(sums.aa == Kernels.dot(a, a) && sums.ab == Kernels.dot(a, b) && sums.bb == Kernels.dot(b, b))
      var plain = 0.0
      for i in 0..<n { plain += Double(a[i]) * Double(b[i]) }
      #expect(abs(sums.ab - plain) <= 1e-9 * Double(n))
    }
  }

  /// The Gram matrix's upper triangle is every pair's `dot` to the bit (the lower triangle 0),
  /// on one block, several, a count off the four lanes, and no elements.
  @Test func upperGramIsEveryPairsDot() {
    for n in [0, 7, 32_768, 70_003] {
      let arrays = (0..<3).map { CounterRNG(seed: UInt64($0), stream: "gram").normalTensor([n]).scalars }
      let gram = Kernels.upperGram(arrays)
      for s in 0..<3 {
        for t in 0..<3 {
          let expected = t < s || n == 0 ? 0 : Kernels.dot(arrays[s], arrays[t])
          #expect(gram[s * 3 + t].bitPattern == expected.bitPattern, "n \(n), pair \(s) \(t)")
        }
      }
    }
  }

  /// From stored BF16 and F32 bytes (and mixed dtypes), both the AVX-512 sweep and the portable
  /// loop give the sums of the decoded arrays to the bit, on counts with whole groups of four
  /// blocks, a lone whole block and a partial one.
  @Test func dotsOfPairFromStoredBytesAreTheDotsOfTheValues() {
    for n in [5, 32_768, 4 * 32_768 + 3, 7 * 32_768, 9 * 32_768 + 1_001] {
      let a = CounterRNG(seed: 3, stream: "a").normalTensor([n])
      let b = CounterRNG(seed: 4, stream: "b").normalTensor([n])
      for (ta, tb) in [(DType.bf16, DType.bf16), (.f32, .f32), (.bf16, .f32), (.f16, .bf16)] {
        let (sa, sb) = (a.encoded(as: ta), b.encoded(as: tb))
        let expected = Kernels.dotsOfPair(sa.decoded().scalars, sb.decoded().scalars)
        for unit in VectorUnit.runnable {
          let sums = sa.bytes.withUnsafeBytes { x in
            sb.bytes.withUnsafeBytes { y in
              Kernels.dotsOfPair(
                Kernels.StoredElements(start: x.baseAddress!, dtype: ta),
                Kernels.StoredElements(start: y.baseAddress!, dtype: tb),
                count: n, unit: unit)
            }
          }
          #expect(
            sums.aa == expected.aa && sums.ab == expected.ab && sums.bb == expected.bb, "\(n) \(ta) \(tb) \(unit)")
        }
      }
    }
  }

  /// Each keep rule (all, a band of magnitudes, packed bits, a mask) with and without rescaling gives the
  /// reference's bits, over several chunks and parallel blocks.
  @Test(arguments: [true, false])
  func sparseConsensusMergeMatchesTheReference(_ normalize: Bool) {
    let n = 70_001
    let rng = CounterRNG(seed: 9, stream: "ties")
    let base = rng.normalTensor([n]).scalars
    let deltas = (0..<4).map { CounterRNG(seed: UInt64($0), stream: "delta").normalTensor([n]).scalars }
    let band = UInt32(0x3E80_0000)...UInt32(0x3FC0_0000)  // magnitudes in [0.25, 1.5]
    let randomMask = (0..<n).map { rng.uniform(UInt64($0)) < 0.3 }
    let rules: [Kernels.KeepRule] = [
      .all, .magnitudes(band), .bits(Kernels.packBits(randomMask)), .magnitudes(0x8000_0000...0x8000_0000),
    ]
    let keep: [[Bool]] = [
      Array(repeating: true, count: n), deltas[1].map { band.contains($0.bitPattern & 0x7FFF_FFFF) }, randomMask,
      Array(repeating: false, count: n),
    ]
    let (scales, weights) = ([1.0, 1.7, 0.6, 2.0], [1.0, 0.8, -0.5, 0.3])
    let got = Kernels.sparseConsensusMerge(
      base: base, deltas: deltas, keep: rules, scales: scales, weights: weights, lambda: 0.9, normalize: normalize)
    let want = referenceTIES(
      base: base, deltas: deltas, keep: keep, scales: scales, weights: weights, lambda: 0.9, normalize: normalize)
    #expect(differingBits(got, want) == 0)
    // The same mask unpacked (one byte a flag) gives the same bits.
    var unpacked = rules
    unpacked[2] = .mask(randomMask)
    let viaMask = Kernels.sparseConsensusMerge(
      base: base, deltas: deltas, keep: unpacked, scales: scales, weights: weights, lambda: 0.9, normalize: normalize)
    #expect(differingBits(viaMask, want) == 0)
    // The plain consensus merge is the case where everything is kept.
    let plain = Kernels.consensusMerge(base: base, deltas: deltas, weights: weights, lambda: 0.9, normalize: normalize)
    let all = referenceTIES(
      base: base, deltas: deltas, keep: Array(repeating: Array(repeating: true, count: n), count: 4),
      scales: [1, 1, 1, 1], weights: weights, lambda: 0.9, normalize: normalize)
    #expect(differingBits(plain, all) == 0)
    // From stored BF16 models and base, the deltas formed chunk by chunk: the reference on the
    // deltas `differences` forms.
    let stored = ([base] + zip(deltas, [0.5, 1, 2, 1] as [Float]).map { d, s in zip(base, d).map { $0 + s * $1 } })
      .map { Tensor(shape: [n], scalars: $0).encoded(as: .bf16).bytes }
    let decodedBase = stored[0].withUnsafeBytes { Tensor(decoding: $0, dtype: .bf16, shape: [n]).scalars }
    stored.withUnsafeBufferPointers { p in
      let elements = p.map { Kernels.StoredElements(start: $0, dtype: .bf16) }
      let storedDeltas = Kernels.differences(Array(elements.dropFirst()), minus: decodedBase)
      let storedKeep = keep.indices.map { m -> [Bool] in
        m == 1 ? storedDeltas[1].map { band.contains($0.bitPattern & 0x7FFF_FFFF) } : keep[m]
      }
      let fromStored = Kernels.sparseConsensusMerge(
        base: elements[0], models: Array(elements.dropFirst()), count: n, keep: rules, scales: scales,
        weights: weights, lambda: 0.9, normalize: normalize)
      let reference = referenceTIES(
        base: decodedBase, deltas: storedDeltas, keep: storedKeep, scales: scales, weights: weights, lambda: 0.9,
        normalize: normalize)
      #expect(differingBits(fromStored, reference) == 0)
    }
  }
}

extension KernelsTests {
  /// TIES's merge from stored bytes gives the same bits through the AVX-512 and AVX2 kernels
  /// (those the machine runs) as through the portable loops (which the test above holds to the reference): BF16 and F32 inputs, one
  /// to five models, the fast case (bands of magnitudes and all, unscaled) and the general one
  /// (packed bits, rescaling), with zero deltas, exact ties of the elected sum, NaNs, a negative
  /// weight, and a count off the 16-element step; and its BF16 and F32 output, written by the
  /// kernel itself, is the floats encoded. Without the election it is, to the bit, the weighted
  /// sum of the masked and rescaled deltas with the base (breadcrumbs' and DARE's merge).
  @Test(arguments: [DType.bf16, .f32])
  func storedSparseConsensusMergeIsThePortableOne(_ dtype: DType) {
    let n = 40_003
    let rng = CounterRNG(seed: 11, stream: "ties-stored")
    // At i % 9 == 1 the base is 0, models 0 and 3 are 0.25 and -0.25 (of weight 1 both) and
    // the others equal the base: the elected sum is exactly 0 from four models on.
    let base = (0..<n).map { i -> Float in i % 9 == 1 ? 0 : rng.normal(UInt64(i)) }
    let models = (0..<5).map { m in
      (0..<n).map { i -> Float in
        if i % 9 == 0 { return base[i] }  // a zero delta
        if i % 997 == 5 && m == 0 { return i % 2 == 0 ? .nan : -.nan }  // NaN merges, quietened in BF16
        if i % 9 == 1 { return m == 0 ? 0.25 : (m == 3 ? -0.25 : 0) }
        return base[i] + 0.1 * rng.normal(UInt64((m + 1) * n + i))
      }
    }
    let stored = ([base] + models).map { Tensor(shape: [n], scalars: $0).encoded(as: dtype).bytes }
    let drawn = (0..<n).map { rng.uniform(UInt64(7 * n + $0)) < 0.4 }
    let band = UInt32(0x3D00_0000)...UInt32(0x7FFF_FFFF)  // magnitudes from 1/32
    let weights = [1.0, 0.8, -0.5, 1.0, 0.3]
    stored.withUnsafeBufferPointers { p in
      let elements = p.map { Kernels.StoredElements(start: $0, dtype: dtype) }
      for count in 1...5 {
        let fast: [Kernels.KeepRule] = (0..<count).map { $0 % 2 == 0 ? .magnitudes(band) : .all }
        let general: [Kernels.KeepRule] = (0..<count).map {
          $0 == 1 ? .bits(Kernels.packBits(drawn)) : .magnitudes(band)
        }
        for (rules, scales) in [
          (fast, [Double](repeating: 1, count: count)), (general, [1, 1.6, 1, 0.7, 1].prefix(count).map { $0 }),
        ] {
          for (normalize, elect) in [(true, true), (false, true), (false, false)] {
            // The portable loops first, then each kernel the machine runs.
            let merged = ([.portable] + VectorUnit.runnable.filter { $0 != .portable }).map { unit in
              Kernels.sparseConsensusMerge(
                base: elements[0], models: Array(elements[1...count]), count: n, keep: rules, scales: scales,
                weights: Array(weights.prefix(count)), lambda: 0.9, normalize: normalize, elect: elect, unit: unit)
            }
            if !elect {
              let decodedBase = elements[0].decoded(count: n)
              let masked = (0..<count).map { m in
                let delta = Kernels.differences([elements[1 + m]], minus: decodedBase)[0]
                let keep: [Bool] =
                  switch rules[m] {
                  case .magnitudes(let kept): Kernels.magnitudeMask(delta, band: kept)
                  case .bits: drawn
                  default: [Bool](repeating: true, count: n)
                  }
                return Kernels.masked(delta, keep: keep, scale: scales[m])
              }
              let sum = Kernels.weightedSum(
                masked, weights: Array(weights.prefix(count)), scale: 0.9, base: decodedBase)
              #expect(differingBits(merged[0], sum) == 0, "\(dtype), \(count) models, no election")
            }
            // Written as BF16 or F32 by the kernel itself (F16 through the floats): the floats encoded.
            for output in [DType.bf16, .f32, .f16] {
              var bytes = [UInt8](repeating: 0xA5, count: n * output.size)
              bytes.withUnsafeMutableBytes { out in
                Kernels.sparseConsensusMerge(
                  base: elements[0], models: Array(elements[1...count]), count: n, keep: rules, scales: scales,
                  weights: Array(weights.prefix(count)), lambda: 0.9, normalize: normalize, elect: elect, into: out,
                  as: output)
              }
              let expected = Tensor(shape: [n], scalars: merged[0]).encoded(as: output).bytes
              #expect(
                zip(bytes, expected).filter { $0 != $1 }.count == 0, "\(dtype) -> \(output), \(count) models")
            }
            for (unit, kernel) in zip(VectorUnit.runnable.filter { $0 != .portable }, merged.dropFirst()) {
              #expect(
                differingBits(merged[0], kernel) == 0,
                "\(dtype), \(count) models, \(rules.count) rules, normalize \(normalize), elect \(elect), \(unit)")
            }
          }
        }
      }
    }
  }
}

extension VectorUnit {
  /// Every unit this machine runs, `.portable` first.
  static let runnable = allCases.filter { $0 <= machine }
}

extension Array where Element == [UInt8] {
  /// Calls `body` with a pointer to each array's bytes (valid only inside `body`).
  func withUnsafeBufferPointers<R>(_ body: ([UnsafeRawPointer]) throws -> R) rethrows -> R {
    func nest(_ i: Int, _ pointers: [UnsafeRawPointer]) throws -> R {
      guard i < count else { return try body(pointers) }
      return try self[i].withUnsafeBytes { bytes in
        guard let start = bytes.baseAddress else { preconditionFailure("empty array") }
        return try nest(i + 1, pointers + [start])
      }
    }
    return try nest(0, [])
  }
}
