import CKernels

/// The element loops of merging, written once with raw pointers over fixed parallel blocks (so
/// results never depend on the thread count). Callers work with arrays; sums run in `Double`
/// and each result is rounded once.
public enum Kernels {
  /// Runs `body(range)` over fixed blocks of `0..<count` in parallel.
  @inline(__always)
  static func blocks(_ count: Int, _ body: (Range<Int>) -> Void) {
    Elementwise.forEachBlock(count, body)
  }

  /// An array of `count` elements filled by `fill(range, output)` over parallel blocks.
  @inline(__always)
  static func make<T>(_ count: Int, _ fill: (Range<Int>, UnsafeMutablePointer<T>) -> Void) -> [T] {
    [T](unsafeUninitializedCapacity: count) { buffer, initialized in
      guard let start = buffer.baseAddress, count > 0 else { return }
      let out = SendablePointer(start)
      blocks(count) { range in if let pointer = out.pointer { fill(range, pointer) } }
      initialized = count
    }
  }

  /// A valid address to stand for an empty range of bytes (nothing is ever read through it).
  nonisolated(unsafe) public static let noElements = UnsafeRawPointer(
    UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16))

  /// Elements stored as `dtype` from `start` on (unaligned bytes are fine), decoded chunk by chunk.
  public struct StoredElements: @unchecked Sendable {
    public let start: UnsafeRawPointer
    public let dtype: DType

    public init(start: UnsafeRawPointer, dtype: DType) {
      self.start = start
      self.dtype = dtype
    }

    /// Elements `0 ..< count` decoded to a new array.
    public func decoded(count: Int) -> [Float] {
      [Float](unsafeUninitializedCapacity: count) { values, initialized in
        if let start = values.baseAddress { decode(0, count, into: start) }
        initialized = count
      }
    }

    /// Decodes elements `first ..< first + count` into `out`.
    @inline(__always)
    func decode(_ first: Int, _ count: Int, into out: UnsafeMutablePointer<Float>) {
      DTypeConversion.decode(
        UnsafeRawBufferPointer(start: start + first * dtype.size, count: count * dtype.size), from: dtype,
        into: UnsafeMutableBufferPointer(start: out, count: count))
    }
  }

  /// Calls `body` with the bytes of every array, each pinned by a nested `withUnsafeBytes` for
  /// the whole call (no pointer outlives its closure; an empty array's buffer may have no
  /// address).
  public static func withBytes<Element, R>(
    of arrays: [[Element]], _ body: ([UnsafeRawBufferPointer]) throws -> R
  ) rethrows -> R {
    func nest(_ i: Int, _ held: [UnsafeRawBufferPointer]) throws -> R {
      guard i < arrays.count else { return try body(held) }
      return try arrays[i].withUnsafeBytes { try nest(i + 1, held + [$0]) }
    }
    return try nest(0, [])
  }

  /// Calls `body` with read pointers to the elements of every array (`withBytes(of:)`). The
  /// arrays must not be empty.
  static func withPointers<R>(_ arrays: [[Float]], _ body: ([UnsafeRawPointer]) -> R) -> R {
    withBytes(of: arrays) { buffers in
      body(
        buffers.enumerated().map { i, buffer in
          guard let start = buffer.baseAddress, buffer.count > 0 else {
            preconditionFailure("Kernels.withPointers: array \(i) is empty")
          }
          return start
        })
    }
  }

  /// Calls `body` with the raw bytes of a Bool mask (one byte each, 0 or 1), read as bytes rather
  /// than bound to another type.
  @inline(__always)
  static func withMaskBytes<R>(_ mask: [Bool], _ body: (SendableRawPointer) -> R) -> R {
    mask.withUnsafeBytes { body(SendableRawPointer($0.baseAddress)) }
  }

  /// `a - b`.
  public static func difference(_ a: [Float], _ b: [Float]) -> [Float] {
    precondition(a.count == b.count)
    guard !a.isEmpty else { return [] }
    return withPointers([a, b]) { p in
      let (x, y) = (SendableRawPointer(p[0]), SendableRawPointer(p[1]))
      return make(a.count) { range, out in
        guard let xa = x.floats, let yb = y.floats else { return }
        for i in range { (out + i).initialize(to: xa[i] - yb[i]) }
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
          guard let outStart = out.baseAddress, let baseStart = b.baseAddress else { return }
          var start = 0
          while start < count {
            let length = Swift.min(chunk, count - start)
            let (x, y) = (outStart + start, baseStart + start)
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
      guard let buffer = scratch.baseAddress else { return }
      var start = range.lowerBound
      while start < range.upperBound {
        let length = Swift.min(chunk, range.upperBound - start)
        body(start, length, buffer)
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
    guard n > 0 else { return [] }
    return withPointers(arrays + (base.map { [$0] } ?? [])) { p in
      let terms = p.prefix(arrays.count).map { StoredElements(start: $0, dtype: .f32) }
      let b = base == nil ? nil : StoredElements(start: p[arrays.count], dtype: .f32)
      return make(n) { range, out in
        weightedSumChunks(
          range, terms: terms, weights: weights, scale: scale, base: b, subtractingBase: subtractingBase
        ) { start, length, sums in
          (out + start).initialize(from: sums, count: length)
        }
      }
    }
  }

  /// The same weighted sum computed straight from stored elements of any floating dtype, `count`
  /// of them, encoded as `dtype` into `out`: each chunk is decoded into L1-sized scratch, so no
  /// input is ever decoded whole. Gives the bits `weightedSum` gives on the decoded arrays,
  /// encoded. Runs on the calling thread. On an AVX-512 machine, inputs all BF16 or all F32 into
  /// BF16 or F32 run in `CKernels`, sixteen elements a step (when `unit` allows AVX-512).
  public static func weightedSum(
    _ terms: [StoredElements], weights: [Double], scale: Double, base: StoredElements?, subtractingBase: Bool,
    count: Int,
    into out: UnsafeMutableRawBufferPointer, as dtype: DType, unit: VectorUnit = .machine
  ) {
    precondition(out.count >= count * dtype.size && weights.count == terms.count && (!subtractingBase || base != nil))
    if unit.available == .avx512, let o = out.baseAddress,
      vectorWeightedSum(
        terms, weights: weights, scale: scale, base: base, subtractingBase: subtractingBase, count: count, into: o,
        as: dtype)
    {
      return
    }
    if let o = out.baseAddress,
      fusedWeightedSum(
        terms, weights: weights, scale: scale, base: base, subtractingBase: subtractingBase, count: count, into: o,
        as: dtype)
    {
      return
    }
    weightedSumChunks(
      0..<count, terms: terms, weights: weights, scale: scale, base: base, subtractingBase: subtractingBase
    ) { start, length, sums in
      DTypeConversion.encode(
        UnsafeBufferPointer(start: sums, count: length), as: dtype,
        into: UnsafeMutableRawBufferPointer(rebasing: out[(start * dtype.size)..<((start + length) * dtype.size)]))
    }
  }

  /// `weightedSum` from stored bytes in the AVX-512 loop (`mergekit_weighted_sum_*`; the caller
  /// checks that the machine has it), where every input is BF16 or every input F32 and the
  /// output is BF16 or F32; returns false otherwise.
  static func vectorWeightedSum(
    _ terms: [StoredElements], weights: [Double], scale: Double, base: StoredElements?, subtractingBase: Bool,
    count: Int, into out: UnsafeMutableRawPointer, as dtype: DType
  ) -> Bool {
    let inputType = terms.first?.dtype ?? base?.dtype
    guard let inputType, inputType == .bf16 || inputType == .f32, dtype == .bf16 || dtype == .f32,
      terms.allSatisfy({ $0.dtype == inputType }), (base?.dtype ?? inputType) == inputType
    else { return false }
    let pointers: [UnsafeRawPointer?] = terms.map { $0.start }
    let (subtract, bf16Out) = (subtractingBase ? Int32(1) : 0, dtype == .bf16 ? Int32(1) : 0)
    pointers.withUnsafeBufferPointer { t in
      weights.withUnsafeBufferPointer { w in
        // With no terms, neither pointer is read.
        if inputType == .bf16 {
          mergekit_weighted_sum_bf16_avx512(
            t.baseAddress, w.baseAddress, terms.count, base?.start, subtract, scale, 0, count, out, bf16Out)
        } else {
          mergekit_weighted_sum_f32_avx512(
            t.baseAddress, w.baseAddress, terms.count, base?.start, subtract, scale, 0, count, out, bf16Out)
        }
      }
    }
    return true
  }

  /// `weightedSum` from stored bytes with the decoding, the sum and the encoding in one loop per
  /// term (no `Float` scratch to write and read back), when every input has one dtype among
  /// BF16, F16 and F32 and the output is one of those; returns false otherwise. The same
  /// operations in the same order as `weightedSumChunks`, so the same bits.
  static func fusedWeightedSum(
    _ terms: [StoredElements], weights: [Double], scale: Double, base: StoredElements?, subtractingBase: Bool,
    count: Int, into out: UnsafeMutableRawPointer, as dtype: DType
  ) -> Bool {
    let inputType = terms.first?.dtype ?? base?.dtype
    guard let inputType, terms.allSatisfy({ $0.dtype == inputType }), (base?.dtype ?? inputType) == inputType else {
      return false
    }
    func run<In: FloatStorage>(_: In.Type) -> Bool {
      switch dtype {
      case .bf16: fusedWeightedSum(In.self, BF16Storage.self, terms, weights, scale, base, subtractingBase, count, out)
      case .f16: fusedWeightedSum(In.self, F16Storage.self, terms, weights, scale, base, subtractingBase, count, out)
      case .f32: fusedWeightedSum(In.self, F32Storage.self, terms, weights, scale, base, subtractingBase, count, out)
      default: return false
      }
      return true
    }
    switch inputType {
    case .bf16: return run(BF16Storage.self)
    case .f16: return run(F16Storage.self)
    case .f32: return run(F32Storage.self)
    default: return false
    }
  }

  /// `fusedWeightedSum` specialised to its input and output dtypes, with a chunk of `Float`
  /// scratch for the rounded results.
  @inline(__always)
  static func fusedWeightedSum<In: FloatStorage, Out: FloatStorage>(
    _: In.Type, _: Out.Type, _ terms: [StoredElements], _ weights: [Double], _ scale: Double, _ base: StoredElements?,
    _ subtractingBase: Bool, _ count: Int, _ out: UnsafeMutableRawPointer
  ) {
    let b = base?.start
    withUnsafeTemporaryAllocation(of: Float.self, capacity: chunk) { scratch in
      guard let results = scratch.baseAddress else { return }
      fusedWeightedSumChunks(In.self, Out.self, terms, weights, scale, b, subtractingBase, count, out, results)
    }
  }

  /// The chunks of `fusedWeightedSum`: per chunk, one loop per term into the `Double` sums, then
  /// the rounding to `Float` and the encoding.
  @inline(__always)
  static func fusedWeightedSumChunks<In: FloatStorage, Out: FloatStorage>(
    _: In.Type, _: Out.Type, _ terms: [StoredElements], _ weights: [Double], _ scale: Double, _ b: UnsafeRawPointer?,
    _ subtractingBase: Bool, _ count: Int, _ out: UnsafeMutableRawPointer, _ results: UnsafeMutablePointer<Float>
  ) {
    chunked(0..<count, buffers: 1) { start, length, sum in
      for t in terms.indices {
        let x = terms[t].start
        let w = weights[t]
        // `0 + w * v` as in the scratch loop: a -0 product gives +0 there too.
        switch (t == 0, subtractingBase, b) {
        case (true, true, let b?):
          for j in 0..<length { sum[j] = 0 + w * Double(In.load(x, start + j) - In.load(b, start + j)) }
        case (true, _, _):
          for j in 0..<length { sum[j] = 0 + w * Double(In.load(x, start + j)) }
        case (false, true, let b?):
          for j in 0..<length { sum[j] += w * Double(In.load(x, start + j) - In.load(b, start + j)) }
        case (false, _, _):
          for j in 0..<length { sum[j] += w * Double(In.load(x, start + j)) }
        }
      }
      if terms.isEmpty { for j in 0..<length { sum[j] = 0 } }
      // Rounded to Float, then encoded in a loop of its own: eight floats to a step instead
      // of the four doubles of the sums.
      if let b {
        for j in 0..<length { results[j] = Float(Double(In.load(b, start + j)) + scale * sum[j]) }
      } else {
        for j in 0..<length { results[j] = Float(0 + scale * sum[j]) }
      }
      for j in 0..<length { Out.store(results[j], out, start + j) }
    }
  }

  /// The one implementation of the weighted sum: chunk by chunk over `range`, inputs decoded to
  /// `Float` scratch, sums in `Double`; `emit(start, length, results)` takes each chunk's results.
  @inline(__always)
  static func weightedSumChunks(
    _ range: Range<Int>, terms: [StoredElements], weights: [Double], scale: Double, base: StoredElements?,
    subtractingBase: Bool,
    emit: (Int, Int, UnsafePointer<Float>) -> Void
  ) {
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 3 * chunk) { floats in
      guard let b = floats.baseAddress else { return }
      let (x, results) = (b + chunk, b + 2 * chunk)
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

  /// Which entries of a task vector a sparsified merge keeps (`sparseConsensusMerge`).
  public enum KeepRule: Sendable {
    case all
    /// Entries whose magnitude bit pattern (`bits & 0x7FFF_FFFF`) lies in the range: a top-k
    /// threshold without ties to order, or breadcrumbs' band below the outliers.
    case magnitudes(ClosedRange<UInt32>)
    /// An explicit mask (DARE's random drop, or a threshold whose ties are kept by index).
    case mask([Bool])
    /// The same as bits, element i kept when bit `i % 64` of word `i / 64` is set (`packBits`):
    /// an eighth of the memory, for masks kept from one pass to the next.
    case bits([UInt64])
  }

  /// Eight flag bytes (0 or 1; byte k at bits 8k of a little-endian word) as eight bits, flag k
  /// at bit k: times 0x0102040810204080, flag k's term lands on bit 56 + k and every other term
  /// on a bit of its own elsewhere (no carries), so the top byte holds the flags in order.
  @inline(__always)
  static func bitsOfFlagBytes(_ eight: UInt64) -> UInt64 { (eight &* 0x0102_0408_1020_4080) &>> 56 }

  /// `mask` packed 64 flags to a word (element i: bit `i % 64` of word `i / 64`), eight flags a
  /// multiply (`bitsOfFlagBytes`).
  public static func packBits(_ mask: [Bool]) -> [UInt64] {
    let count = (mask.count + 63) / 64
    return mask.withUnsafeBytes { m in
      [UInt64](unsafeUninitializedCapacity: count) { words, initialized in
        let whole = mask.count / 64
        for w in 0..<whole {
          var word: UInt64 = 0
          for octet in 0..<8 {
            let flags = m.loadUnaligned(fromByteOffset: 64 * w + 8 * octet, as: UInt64.self) & 0x0101_0101_0101_0101
            word |= bitsOfFlagBytes(flags) << UInt64(8 * octet)
          }
          words[w] = word
        }
        if whole < count {
          var word: UInt64 = 0
          for k in 0..<(mask.count - 64 * whole) { word |= UInt64(m[64 * whole + k] & 1) << UInt64(k) }
          words[whole] = word
        }
        initialized = count
      }
    }
  }

  /// TIES's disjoint merge: per element, the sign of `sum_t w_t d_t` is elected (0 counts as +);
  /// the weighted deltas agreeing with it (zeros never agree) are summed, divided by their
  /// weights' sum when `normalize` (0 -> 1), scaled by `lambda` and added to `base`. Branch-free
  /// over chunks: which deltas agree is unpredictable, and mispredicted branches cost 20x.
  public static func consensusMerge(
    base: [Float], deltas: [[Float]], weights: [Double], lambda: Double, normalize: Bool
  ) -> [Float] {
    sparseConsensusMerge(
      base: base, deltas: deltas, keep: deltas.map { _ in .all }, scales: deltas.map { _ in 1 }, weights: weights,
      lambda: lambda, normalize: normalize)
  }

  /// `consensusMerge` of the sparsified deltas `masked(deltas[t], keep[t], scales[t])`, with the
  /// same bits, in one sweep: each chunk's kept (and rescaled) entries are formed in scratch
  /// memory instead of whole masked arrays. Without `elect`, no sign is elected: the result is
  /// `weightedSum` of the sparsified deltas with scale `lambda` and the base, to the bit
  /// (`normalize` is not used; a caller folds the weights' sum into `lambda`).
  public static func sparseConsensusMerge(
    base: [Float], deltas: [[Float]], keep: [KeepRule], scales: [Double], weights: [Double], lambda: Double,
    normalize: Bool, elect: Bool = true
  ) -> [Float] {
    let n = base.count
    let models = deltas.count
    precondition(
      deltas.allSatisfy { $0.count == n } && weights.count == models && keep.count == models
        && scales.count == models)
    for rule in keep {
      if case .mask(let m) = rule { precondition(m.count == n) }
      if case .bits(let b) = rule { precondition(b.count == (n + 63) / 64) }
    }
    guard n > 0 else { return [] }
    let masks = keep.map { rule -> [Bool] in
      if case .mask(let m) = rule { return m }
      return []
    }
    let words = keep.map { rule -> [UInt64] in
      if case .bits(let b) = rule { return b }
      return []
    }
    // The rules without their arrays (reached through the pointers below): copying a rule that
    // holds an array retains it, once per chunk and model.
    let rules = keep.map { rule -> KeepRule in
      switch rule {
      case .all, .magnitudes: return rule
      case .mask: return .mask([])
      case .bits: return .bits([])
      }
    }
    return withPointers(deltas + [base]) { p in
      let inputs = p.prefix(models).map { SendableRawPointer($0) }
      let b = SendableRawPointer(p[models])
      return withBytePointers(masks) { maskBytes in
        withBytePointers(words) { wordPointers in
          make(n) { range, out in
            // Scratch: one Float chunk per model.
            chunked(range, buffers: max(1, (models + 1) / 2)) { start, length, scratch in
              let stash = UnsafeMutableRawPointer(scratch).assumingMemoryBound(to: Float.self)
              // The chunk's sparse values per model, one pointer each, in stack memory.
              withUnsafeTemporaryAllocation(of: UnsafePointer<Float>?.self, capacity: models) { sparse in
                for t in 0..<models {
                  sparse[t] = inputs[t].floats.map { x in
                    sparseChunk(
                      x + start, length, rules[t], scale: scales[t], mask: maskBytes[t].pointer.map { $0 + start },
                      words: wordPointers[t].pointer, first: start, into: stash + t * chunk)
                  }
                }
                guard let x = b.floats.map({ $0 + start }) else { return }
                consensusChunk(
                  sparse, models: models, length: length, weights: weights, lambda: lambda, normalize: normalize,
                  elect: elect, base: x, into: out + start)
              }
            }
          }
        }
      }
    }
  }

  /// `sparseConsensusMerge` of `count` stored elements: the deltas are each model minus the
  /// base, rounded to `Float` as `differences` forms them, formed chunk by chunk in scratch
  /// memory with the base's chunk, instead of as whole arrays (the same bits). For keep rules
  /// that need no delta array: `.all`, `.magnitudes` and `.bits`. On an AVX-512 machine, inputs
  /// all BF16 or all F32 (up to `MERGEKIT_CONSENSUS_MODELS` models) run in `CKernels`, sixteen
  /// elements a step with every model's terms in registers (eight on an AVX2 machine), in the
  /// best form `unit` allows. `elect` as in the array form.
  public static func sparseConsensusMerge(
    base: StoredElements, models: [StoredElements], count n: Int, keep: [KeepRule], scales: [Double],
    weights: [Double], lambda: Double, normalize: Bool, elect: Bool = true, unit: VectorUnit = .machine
  ) -> [Float] {
    guard n > 0 else { return [] }
    return storedConsensus(
      base: base, models: models, count: n, keep: keep, scales: scales, weights: weights, lambda: lambda,
      normalize: normalize, elect: elect, fused: fusedConsensusUnit(base: base, models: models, unit: unit),
      bf16: false
    ) { fill in make(n) { range, out in fill(range, UnsafeMutableRawPointer(out)) } }
  }

  /// `sparseConsensusMerge` of stored elements, encoded as `dtype` into `out` (at least
  /// `count * dtype.size` bytes). The AVX-512 and AVX2 loops write BF16 and F32 themselves
  /// (rounded as `DTypeConversion` rounds), without a `Float` array between; other cases encode
  /// that array.
  public static func sparseConsensusMerge(
    base: StoredElements, models: [StoredElements], count n: Int, keep: [KeepRule], scales: [Double],
    weights: [Double], lambda: Double, normalize: Bool, elect: Bool = true, into out: UnsafeMutableRawBufferPointer,
    as dtype: DType, unit: VectorUnit = .machine
  ) {
    precondition(out.count >= n * dtype.size)
    guard n > 0, let start = out.baseAddress else { return }
    let fused = fusedConsensusUnit(base: base, models: models, unit: unit)
    guard (dtype == .bf16 || dtype == .f32) && fused != .portable
    else {
      let merged = sparseConsensusMerge(
        base: base, models: models, count: n, keep: keep, scales: scales, weights: weights, lambda: lambda,
        normalize: normalize, elect: elect, unit: unit)
      merged.withUnsafeBufferPointer { DTypeConversion.encode($0, as: dtype, into: out) }
      return
    }
    let target = SendableRawPointer(UnsafeRawPointer(start))
    storedConsensus(
      base: base, models: models, count: n, keep: keep, scales: scales, weights: weights, lambda: lambda,
      normalize: normalize, elect: elect, fused: fused, bf16: dtype == .bf16
    ) { fill in blocks(n) { range in if let p = target.pointer { fill(range, UnsafeMutableRawPointer(mutating: p)) } } }
  }

  /// The `CKernels` loop `sparseConsensusMerge` of these stored inputs runs under `unit`
  /// (AVX-512 or AVX2), or `.portable` for the Swift loop.
  static func fusedConsensusUnit(base: StoredElements, models: [StoredElements], unit: VectorUnit) -> VectorUnit {
    let fits =
      (1...Int(MERGEKIT_CONSENSUS_MODELS)).contains(models.count) && models.allSatisfy { $0.dtype == base.dtype }
      && (base.dtype == .bf16 || base.dtype == .f32)
    return fits ? unit.available : .portable
  }

  /// The two forms' shared body: checks the rules, pins the packed words, and hands `run` the
  /// function that merges a range of elements into the output (indexed from element 0): floats,
  /// or BF16 when `bf16`, which only the `fused` loops (any unit but `.portable`) write.
  static func storedConsensus<R>(
    base: StoredElements, models: [StoredElements], count n: Int, keep: [KeepRule], scales: [Double],
    weights: [Double], lambda: Double, normalize: Bool, elect: Bool, fused: VectorUnit, bf16: Bool,
    _ run: ((Range<Int>, UnsafeMutableRawPointer) -> Void) -> R
  ) -> R {
    let count = models.count
    precondition(
      weights.count == count && keep.count == count && scales.count == count && (fused != .portable || !bf16))
    for rule in keep {
      if case .mask = rule { preconditionFailure("sparseConsensusMerge(base:models:): a mask needs the deltas") }
      if case .bits(let b) = rule { precondition(b.count == (n + 63) / 64) }
    }
    let words = keep.map { rule -> [UInt64] in
      if case .bits(let b) = rule { return b }
      return []
    }
    let rules = keep.map { rule -> KeepRule in
      if case .bits = rule { return .bits([]) }
      return rule
    }
    return withBytePointers(words) { wordPointers in
      if fused != .portable {
        let terms = (0..<count).map { t in
          let (lowest, highest): (UInt32, UInt32) =
            switch rules[t] {
            case .magnitudes(let band): (band.lowerBound, band.upperBound)
            default: (0, 0x7FFF_FFFF)
            }
          return mergekit_consensus_model(
            elements: models[t].start, words: wordPointers[t].pointer?.assumingMemoryBound(to: UInt64.self),
            lowest: lowest, highest: highest, scale: scales[t], weight: weights[t])
        }
        let b = base.start
        let bf16Inputs = base.dtype == .bf16
        return run { range, out in
          terms.withUnsafeBufferPointer { t in
            guard let t = t.baseAddress else { return }
            let (first, length, n, e, bf16Out) = (
              range.lowerBound, range.count, normalize ? Int32(1) : 0, elect ? Int32(1) : 0, bf16 ? Int32(1) : 0
            )
            switch (bf16Inputs, fused) {
            case (true, .avx512):
              mergekit_sparse_consensus_bf16_avx512(b, t, count, first, length, lambda, n, e, out, bf16Out)
            case (false, .avx512):
              mergekit_sparse_consensus_f32_avx512(b, t, count, first, length, lambda, n, e, out, bf16Out)
            case (true, _): mergekit_sparse_consensus_bf16_avx2(b, t, count, first, length, lambda, n, e, out, bf16Out)
            case (false, _): mergekit_sparse_consensus_f32_avx2(b, t, count, first, length, lambda, n, e, out, bf16Out)
            }
          }
        }
      }
      return run { range, output in
        let out = output.assumingMemoryBound(to: Float.self)
        // Scratch: the base's chunk, then a delta and a stash chunk per model.
        chunked(range, buffers: count + 1) { start, length, scratch in
          let floats = UnsafeMutableRawPointer(scratch).assumingMemoryBound(to: Float.self)
          base.decode(start, length, into: floats)
          withUnsafeTemporaryAllocation(of: UnsafePointer<Float>?.self, capacity: count) { sparse in
            for t in 0..<count {
              let delta = floats + (1 + t) * chunk
              models[t].decode(start, length, into: delta)
              for j in 0..<length { delta[j] = delta[j] - floats[j] }
              sparse[t] = sparseChunk(
                delta, length, rules[t], scale: scales[t], mask: nil, words: wordPointers[t].pointer, first: start,
                into: floats + (1 + count + t) * chunk)
            }
            consensusChunk(
              sparse, models: count, length: length, weights: weights, lambda: lambda, normalize: normalize,
              elect: elect, base: floats, into: out + start)
          }
        }
      }
    }
  }

  /// The consensus merge of one chunk (`sparseConsensusMerge`'s arithmetic), eight elements at
  /// a time with every model's terms in registers: per element, `total = sum_t w_t x_t` in
  /// Double, model by model; the elected sign is negative when `total` is below -0; the terms
  /// `w_t x_t` that are nonzero and agree with it are summed into `mixed`, their weights into
  /// `divisor`; `mixed / divisor` (0 -> 1) when `normalize`; `Float(base + lambda * mixed)`.
  /// Without `elect`, `mixed` is `total` (no election, no division). The same operations in the
  /// same order for every element as a loop per model would do. Branch-free: which terms agree
  /// is unpredictable.
  @inline(__always)
  static func consensusChunk(
    _ sparse: UnsafeMutableBufferPointer<UnsafePointer<Float>?>, models: Int, length: Int, weights: [Double],
    lambda: Double, normalize: Bool, elect: Bool, base: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>
  ) {
    typealias Doubles = SIMD8<Double>
    typealias Words = SIMD8<UInt64>
    @inline(__always) func load(_ p: UnsafePointer<Float>, _ j: Int) -> Doubles {
      Doubles(UnsafeRawPointer(p + j).loadUnaligned(as: SIMD8<Float>.self))
    }
    @inline(__always) func nonzero(_ m: Words) -> Words { (m | (0 &- m)) &>> 63 }
    let lanes = Doubles.scalarCount
    var j = 0
    while j + lanes <= length {
      var total = Doubles(repeating: 0)
      for t in 0..<models {
        guard let x = sparse[t] else { continue }
        total += Doubles(repeating: weights[t]) * load(x, j)
      }
      var mixed = total
      if elect {
        let sum = unsafeBitCast(total, to: Words.self)
        let negative = (sum &>> 63) & nonzero(sum &<< 1)  // -0 counts as +
        var divisor = Doubles(repeating: 0)
        mixed = Doubles(repeating: 0)
        for t in 0..<models {
          guard let x = sparse[t] else { continue }
          let w = weights[t]
          let bits = unsafeBitCast(Doubles(repeating: w) * load(x, j), to: Words.self)
          let keep = 0 &- (nonzero(bits &<< 1) & ~((bits &>> 63) ^ negative))
          mixed += unsafeBitCast(bits & keep, to: Doubles.self)
          divisor += unsafeBitCast(Words(repeating: w.bitPattern) & keep, to: Doubles.self)
        }
        if normalize { mixed /= divisor.replacing(with: 1, where: divisor .== 0) }
      }
      let merged = load(base, j) + Doubles(repeating: lambda) * mixed
      UnsafeMutableRawPointer(out + j).storeBytes(of: SIMD8<Float>(merged), as: SIMD8<Float>.self)
      j += lanes
    }
    while j < length {
      var total = 0.0
      for t in 0..<models {
        guard let x = sparse[t] else { continue }
        total += weights[t] * Double(x[j])
      }
      var mixed = total
      if elect {
        let sum = total.bitPattern
        let negative = (sum >> 63) & isNonzero(sum << 1)
        var divisor = 0.0
        mixed = 0
        for t in 0..<models {
          guard let x = sparse[t] else { continue }
          let w = weights[t]
          let bits = (w * Double(x[j])).bitPattern
          let keep = 0 &- (isNonzero(bits << 1) & ~((bits >> 63) ^ negative))
          mixed += Double(bitPattern: bits & keep)
          divisor += Double(bitPattern: w.bitPattern & keep)
        }
        if normalize { mixed /= divisor == 0 ? 1 : divisor }
      }
      (out + j).initialize(to: Float(Double(base[j]) + lambda * mixed))
      j += 1
    }
  }

  /// One chunk of `masked(x, keep, scale)`: the source itself when everything is kept unscaled,
  /// else the kept (rescaled) entries written to `stash`, branch-free.
  @inline(__always)
  static func sparseChunk(
    _ x: UnsafePointer<Float>, _ length: Int, _ rule: KeepRule, scale: Double, mask: UnsafeRawPointer?,
    words: UnsafeRawPointer? = nil, first: Int = 0, into stash: UnsafeMutablePointer<Float>
  ) -> UnsafePointer<Float> {
    @inline(__always) func scaled(_ v: Float) -> UInt32 {
      scale == 1 ? v.bitPattern : Float(Double(v) * scale).bitPattern
    }
    switch rule {
    case .all:
      if scale == 1 { return x }
      for j in 0..<length { stash[j] = Float(bitPattern: scaled(x[j])) }
    case .magnitudes(let kept):
      // Keys are below 2^31 (bounds up to 2^31): (a - b) >> 31 is 1 exactly when a < b.
      let (lowest, highest) = (kept.lowerBound, kept.upperBound)
      for j in 0..<length {
        let key = x[j].bitPattern & 0x7FFF_FFFF
        let inside = (1 ^ ((key &- lowest) >> 31)) & (1 ^ ((highest &- key) >> 31))
        stash[j] = Float(bitPattern: scaled(x[j]) & (0 &- inside))
      }
    case .bits:
      guard let words else { return x }
      // Unpacked to masks first: testing bits in the loop below compiles to a branch, which the
      // random pattern mispredicts half the time.
      withUnsafeTemporaryAllocation(of: UInt32.self, capacity: length) { masks in
        guard let m = masks.baseAddress else { return }
        unpackMasks(words.assumingMemoryBound(to: UInt64.self), first: first, count: length, into: m)
        for j in 0..<length { stash[j] = Float(bitPattern: scaled(x[j]) & m[j]) }
      }
    case .mask:
      guard let mask else { return x }
      for j in 0..<length {
        stash[j] = Float(bitPattern: scaled(x[j]) & (0 &- UInt32(mask.load(fromByteOffset: j, as: UInt8.self) & 1)))
      }
    }
    return UnsafePointer(stash)
  }

  /// The keep flags of elements `first ..< first + count` of packed `words` (bit `i % 64` of
  /// word `i / 64`, as `packBits` packs them) as masks for `&`: all ones where kept, else 0.
  /// One word is loaded per 64 elements; `first` need not be a multiple of 64.
  @inline(__always)
  static func unpackMasks(
    _ words: UnsafePointer<UInt64>, first: Int, count: Int, into masks: UnsafeMutablePointer<UInt32>
  ) {
    var j = 0
    while j < count {
      let i = first + j
      let word = words[i &>> 6] &>> UInt64(i & 63)
      let length = Swift.min(64 - (i & 63), count - j)
      for k in 0..<length { masks[j + k] = 0 &- UInt32(truncatingIfNeeded: (word &>> UInt64(k)) & 1) }
      j += length
    }
  }

  /// Calls `body` with the raw bytes of every array (masks, packed words; nil pointers for
  /// empty ones), valid only inside `body`.
  static func withBytePointers<Element, R>(_ arrays: [[Element]], _ body: ([SendableRawPointer]) -> R) -> R {
    withBytes(of: arrays) { buffers in body(buffers.map { SendableRawPointer($0.isEmpty ? nil : $0.baseAddress) }) }
  }

  /// `keep[i] ? values[i] * scale : 0` (scale applied in `Double`; 1 leaves values exact).
  /// Branch-free: the kept bits are masked, since the keep pattern is unpredictable.
  public static func masked(_ values: [Float], keep: [Bool], scale: Double = 1) -> [Float] {
    precondition(values.count == keep.count)
    guard !values.isEmpty else { return [] }
    return withPointers([values]) { p in
      let v = SendableRawPointer(p[0])
      return withMaskBytes(keep) { k in
        make(values.count) { range, out in
          guard let vp = v.floats, let kp = k.pointer else { return }
          if scale == 1 {
            for i in range {
              (out + i).initialize(
                to: Float(bitPattern: vp[i].bitPattern & (0 &- UInt32(kp.load(fromByteOffset: i, as: UInt8.self) & 1))))
            }
          } else {
            for i in range {
              let scaled = Float(Double(vp[i]) * scale).bitPattern
              (out + i).initialize(
                to: Float(bitPattern: scaled & (0 &- UInt32(kp.load(fromByteOffset: i, as: UInt8.self) & 1))))
            }
          }
        }
      }
    }
  }

  /// `a[i] && !b[i]`, branch-free on the flag bytes.
  public static func andNot(_ a: [Bool], _ b: [Bool]) -> [Bool] {
    precondition(a.count == b.count)
    return a.withUnsafeBytes { x in
      b.withUnsafeBytes { y in
        make(a.count) { range, out in
          for i in range { (out + i).initialize(to: x[i] & ~y[i] & 1 == 1) }
        }
      }
    }
  }

  /// The entries whose magnitude key (`bits & 0x7FFF_FFFF`) lies in `band` (bounds up to 2^31):
  /// the mask of the rule `.magnitudes(band)`.
  public static func magnitudeMask(_ values: [Float], band: ClosedRange<UInt32>) -> [Bool] {
    let (lowest, highest) = (band.lowerBound, band.upperBound)
    return values.withUnsafeBufferPointer { v in
      make(values.count) { range, out in
        for i in range {
          // Keys are below 2^31: (a - b) >> 31 is 1 exactly when a < b.
          let key = v[i].bitPattern & 0x7FFF_FFFF
          (out + i).initialize(to: ((key &- lowest) >> 31) | ((highest &- key) >> 31) == 0)
        }
      }
    }
  }

  /// DARE's keep mask: element `offset + i` is kept when draw `offset + i` of `rng` is below
  /// `density` (`CounterRNG.bits32` against `keepBound`).
  public static func randomKeep(_ count: Int, offset: Int, rng: CounterRNG, density: Float) -> [Bool] {
    guard let bound = CounterRNG.keepBound(density: density) else { return [Bool](repeating: true, count: count) }
    return make(count) { range, out in
      for i in range { (out + i).initialize(to: rng.bits32(UInt64(offset + i)) < bound) }
    }
  }

  /// `randomKeep` packed as `packBits` packs it, drawn straight into the words: element
  /// `offset + i` is bit `i % 64` of word `i / 64`, set when its draw is below `density`.
  /// The same draws and decisions as `randomKeep`, with no byte per element in between: on a
  /// machine with AVX-512 or AVX2 (when `unit` allows it) sixteen or eight draws a step in
  /// `CKernels`, whose comparison gives the bits themselves.
  public static func randomKeepBits(
    _ count: Int, offset: Int, rng: CounterRNG, density: Float, unit: VectorUnit = .machine
  ) -> [UInt64] {
    guard let bound = CounterRNG.keepBound(density: density) else {
      return packBits([Bool](repeating: true, count: count))
    }
    switch unit.available {
    case .avx512:
      return make((count + 63) / 64) { words, out in
        mergekit_random_keep_bits_avx512(rng.key, UInt64(offset), count, bound, words.lowerBound, words.count, out)
      }
    case .avx2:
      return make((count + 63) / 64) { words, out in
        mergekit_random_keep_bits_avx2(rng.key, UInt64(offset), count, bound, words.lowerBound, words.count, out)
      }
    case .portable: break
    }
    return make((count + 63) / 64) { words, out in
      // 64 flag bytes as raw memory: stored a byte at a time, loaded 8 at a time.
      withUnsafeTemporaryAllocation(byteCount: 64, alignment: 8) { buffer in
        guard let flags = buffer.baseAddress else { return }
        for w in words {
          let first = w * 64
          let length = Swift.min(64, count - first)
          // The draws first, a byte each (a loop the compiler vectorises); then each 8 flag bytes,
          // loaded as one word, become 8 bits by one product (`bitsOfFlagBytes`).
          for k in 0..<length {
            flags.storeBytes(
              of: rng.bits32(UInt64(offset + first + k)) < bound ? 1 : 0, toByteOffset: k, as: UInt8.self)
          }
          for k in length..<64 { flags.storeBytes(of: 0, toByteOffset: k, as: UInt8.self) }
          var word: UInt64 = 0
          for g in 0..<8 {
            word |= bitsOfFlagBytes(flags.load(fromByteOffset: 8 * g, as: UInt64.self)) &<< UInt64(8 * g)
          }
          (out + w).initialize(to: word)
        }
      }
    }
  }

  /// `sum a[i] * b[i]` in `Double`, deterministic.
  public static func dot(_ a: [Float], _ b: [Float]) -> Double {
    precondition(a.count == b.count)
    guard !a.isEmpty else { return 0 }
    return withPointers([a, b]) { p in
      let (x, y) = (SendableRawPointer(p[0]), SendableRawPointer(p[1]))
      return Elementwise.sumOfBlocks(a.count) { range in
        guard let xp = x.floats, let yp = y.floats else { return 0 }
        return Elementwise.blockSum(range) { Double(xp[$0]) * Double(yp[$0]) }
      }
    }
  }

  /// `dot(arrays[i], arrays[j])` for every `i <= j` (at `i * n + j` of an n x n row-major
  /// matrix, the lower triangle 0), each to the bit of `dot` (the same blocks, lanes and
  /// order): block by block, every pair's sum of the block while the block is in cache, where
  /// `dot` per pair streams the arrays from memory once per pair. Model Stock's Gram matrix.
  public static func upperGram(_ arrays: [[Float]]) -> [Double] {
    let n = arrays.count
    let count = arrays.first?.count ?? 0
    precondition(arrays.allSatisfy { $0.count == count })
    var gram = [Double](repeating: 0, count: n * n)
    guard count > 0 else { return gram }
    let blockSize = Elementwise.blockSize
    let blocks = (count + blockSize - 1) / blockSize
    var partials = [Double](repeating: 0, count: blocks * n * n)
    withPointers(arrays) { pointers in
      let floats = pointers.map { $0.assumingMemoryBound(to: Float.self) }
      for b in 0..<blocks {
        let range = (b * blockSize)..<min(count, (b + 1) * blockSize)
        for s in 0..<n {
          for t in s..<n {
            let (x, y) = (floats[s], floats[t])
            partials[b * n * n + s * n + t] = Elementwise.blockSum(range) { Double(x[$0]) * Double(y[$0]) }
          }
        }
      }
    }
    // One block's sum as it is; more blocks' sums added in order from 0, as `sumOfBlocks` does.
    for s in 0..<n {
      for t in s..<n {
        gram[s * n + t] =
          blocks == 1 ? partials[s * n + t] : (0..<blocks).reduce(0) { $0 + partials[$1 * n * n + s * n + t] }
      }
    }
    return gram
  }

  /// `(dot(a, a), dot(a, b), dot(b, b))` in one sweep over the two arrays instead of three: the
  /// same three sums to the bit (the same blocks, lanes and order as `blockSum`). SLERP's norms
  /// and angle.
  public static func dotsOfPair(_ a: [Float], _ b: [Float]) -> (aa: Double, ab: Double, bb: Double) {
    precondition(a.count == b.count)
    guard !a.isEmpty else { return (0, 0, 0) }
    return withPointers([a, b]) { p in
      dotsOfPair(StoredElements(start: p[0], dtype: .f32), StoredElements(start: p[1], dtype: .f32), count: a.count)
    }
  }

  /// `dotsOfPair` of `count` stored elements of each input, decoded inside the sweep (BF16, F16
  /// and F32; other dtypes are decoded to arrays first): the sums of the decoded values to the
  /// bit, without writing and reading back a `Float` copy of either input. Two BF16 or two F32
  /// inputs run `CKernels`' AVX-512 sweep where the CPU has it and `unit` allows it.
  public static func dotsOfPair(
    _ a: StoredElements, _ b: StoredElements, count: Int, unit: VectorUnit = .machine
  ) -> (aa: Double, ab: Double, bb: Double) {
    guard count > 0 else { return (0, 0, 0) }
    func second<A: FloatStorage>(_: A.Type) -> (aa: Double, ab: Double, bb: Double)? {
      switch b.dtype {
      case .bf16:
        dotsOfPair(A.self, BF16Storage.self, a.start, b.start, count: count, vectorized: unit.available == .avx512)
      case .f16: dotsOfPair(A.self, F16Storage.self, a.start, b.start, count: count, vectorized: false)
      case .f32:
        dotsOfPair(A.self, F32Storage.self, a.start, b.start, count: count, vectorized: unit.available == .avx512)
      default: nil
      }
    }
    let sums: (aa: Double, ab: Double, bb: Double)? =
      switch a.dtype {
      case .bf16: second(BF16Storage.self)
      case .f16: second(F16Storage.self)
      case .f32: second(F32Storage.self)
      default: nil
      }
    if let sums { return sums }
    return dotsOfPair(a.decoded(count: count), b.decoded(count: count))
  }

  /// The sweep of `dotsOfPair`: blocks of `Elementwise.blockSize` in parallel, four chains a
  /// block in the lanes of one vector, the blocks' sums added in order. With `vectorized` (two
  /// BF16 or two F32 inputs), whole blocks run in `CKernels`, which converts eight elements at
  /// once and sweeps four blocks side by side.
  @inline(__always)
  static func dotsOfPair<A: FloatStorage, B: FloatStorage>(
    _: A.Type, _: B.Type, _ a: UnsafeRawPointer, _ b: UnsafeRawPointer, count: Int, vectorized: Bool
  ) -> (aa: Double, ab: Double, bb: Double) {
    let size = Elementwise.blockSize
    let kernel: ((UnsafeRawPointer, UnsafeRawPointer, Int, Int, Int, UnsafeMutablePointer<Double>) -> Void)? =
      switch (vectorized, A.self == B.self, A.self) {
      case (true, true, is BF16Storage.Type): mergekit_pair_dots_bf16_avx512
      case (true, true, is F32Storage.Type): mergekit_pair_dots_f32_avx512
      default: nil
      }
    let sums = sumsOfBlocks(
      count: count, width: 3, whole: kernel.map { kernel in { kernel(a, b, $0, $1, size, $2) } },
      single: { dotsOfBlock(A.self, B.self, a, b, block: $0, count: count, into: $1) })
    return (sums[0], sums[1], sums[2])
  }

  /// `width` sums over `count` elements, each summed per block of `Elementwise.blockSize` and
  /// then over the blocks in order from 0, as `Elementwise.sumOfBlocks` adds one (one block is
  /// its own sum). The blocks run in parallel four to a task: `whole` (when given) takes each
  /// task's whole blocks at once (`first`, `count`, the partials), `single` each other block
  /// (its index, the partials); both write block j's sums at `width * j` of the partials.
  static func sumsOfBlocks(
    count: Int, width: Int, whole: ((Int, Int, UnsafeMutablePointer<Double>) -> Void)?,
    single: (Int, UnsafeMutablePointer<Double>) -> Void
  ) -> [Double] {
    let size = Elementwise.blockSize
    let blocks = (count + size - 1) / size
    var partials = [Double](repeating: 0, count: width * blocks)
    partials.withUnsafeMutableBufferPointer { slots in
      let out = SendablePointer(slots.baseAddress)
      try? Parallel.forEach((blocks + 3) / 4) { _, group in
        guard let o = out.pointer else { return }
        var block = 4 * group
        let end = Swift.min(blocks, block + 4)
        if let whole {
          let wholeBlocks = Swift.min(end, count / size) - block
          if wholeBlocks > 0 {
            whole(block, wholeBlocks, o)
            block += wholeBlocks
          }
        }
        while block < end {
          single(block, o)
          block += 1
        }
      }
    }
    guard blocks > 1 else { return blocks == 1 ? partials : [Double](repeating: 0, count: width) }
    var sums = [Double](repeating: 0, count: width)
    for block in 0..<blocks {
      for k in 0..<width { sums[k] += partials[width * block + k] }
    }
    return sums
  }

  /// One block's three sums into `o[3 block ..< 3 block + 3]`: lane k of each vector is
  /// `blockSum`'s chain k, then the tail past the last four.
  @inline(__always)
  static func dotsOfBlock<A: FloatStorage, B: FloatStorage>(
    _: A.Type, _: B.Type, _ xp: UnsafeRawPointer, _ yp: UnsafeRawPointer, block: Int, count: Int,
    into o: UnsafeMutablePointer<Double>
  ) {
    let end = Swift.min(count, (block + 1) * Elementwise.blockSize)
    var (aa4, ab4, bb4) = (SIMD4<Double>(repeating: 0), SIMD4<Double>(repeating: 0), SIMD4<Double>(repeating: 0))
    var i = block * Elementwise.blockSize
    while i + 4 <= end {
      let (a4, b4) = (quad(A.self, xp, i), quad(B.self, yp, i))
      aa4 += a4 * a4
      ab4 += a4 * b4
      bb4 += b4 * b4
      i += 4
    }
    var (aa, ab, bb) = (chainTotal(aa4), chainTotal(ab4), chainTotal(bb4))
    while i < end {
      let (ai, bi) = (Double(A.load(xp, i)), Double(B.load(yp, i)))
      aa += ai * ai
      ab += ai * bi
      bb += bi * bi
      i += 1
    }
    (o[3 * block], o[3 * block + 1], o[3 * block + 2]) = (aa, ab, bb)
  }

  /// Elements `i ..< i + 4` as doubles.
  @inline(__always)
  static func quad<S: FloatStorage>(_: S.Type, _ p: UnsafeRawPointer, _ i: Int) -> SIMD4<Double> {
    SIMD4(Double(S.load(p, i)), Double(S.load(p, i + 1)), Double(S.load(p, i + 2)), Double(S.load(p, i + 3)))
  }

  /// A block's four chains added as `blockSum` adds them.
  @inline(__always)
  static func chainTotal(_ v: SIMD4<Double>) -> Double { (v[0] + v[1]) + (v[2] + v[3]) }

  /// DARE's two L1 norms of one range in one sweep: the sum of |values| and the sum over the
  /// elements kept by packed flags (bit `i % 64` of word `i / 64`), each in `Double` with the bits
  /// `absoluteSum(values)` and `absoluteSum(values, keep:)` of the unpacked mask give. Whole
  /// blocks run in `CKernels` where the CPU has AVX-512 or AVX2 and `unit` allows it.
  public static func absoluteSums(_ values: [Float], keepBits keep: [UInt64], unit: VectorUnit = .machine) -> (
    all: Double, kept: Double
  ) {
    precondition(keep.count == (values.count + 63) / 64)
    guard !values.isEmpty else { return (0, 0) }
    let sums = values.withUnsafeBufferPointer { v in
      keep.withUnsafeBufferPointer { k in
        guard let vp = v.baseAddress, let kp = k.baseAddress else { return [0.0, 0.0] }
        let whole: ((Int, Int, UnsafeMutablePointer<Double>) -> Void)? =
          switch unit.available {
          case .avx512: { mergekit_absolute_sums_avx512(vp, kp, $0, $1, Elementwise.blockSize, $2) }
          case .avx2: { mergekit_absolute_sums_avx2(vp, kp, $0, $1, Elementwise.blockSize, $2) }
          case .portable: nil
          }
        return sumsOfBlocks(count: values.count, width: 2, whole: whole) { block, o in
          let range = (block * Elementwise.blockSize)..<Swift.min(values.count, (block + 1) * Elementwise.blockSize)
          (o[2 * block], o[2 * block + 1]) = absoluteSumsOfBlock(
            vp + range.lowerBound, kp, first: range.lowerBound, count: range.count)
        }
      }
    }
    return (sums[0], sums[1])
  }

  /// `absoluteSums` of the differences `model - base` of `count` stored elements, rounded to
  /// `Float` as `differences` forms them: the same sums to the bit. Two BF16 inputs on an
  /// AVX-512 or AVX2 machine (when `unit` allows it) form each difference in a register, without
  /// decoding the base or writing the differences out; other cases sum `differences`' array.
  public static func absoluteSums(
    differenceOf model: StoredElements, minus base: StoredElements, count: Int, keepBits keep: [UInt64],
    unit: VectorUnit = .machine
  ) -> (all: Double, kept: Double) {
    let vectorUnit = unit.available
    guard vectorUnit != .portable, model.dtype == .bf16, base.dtype == .bf16 else {
      return absoluteSums(
        differences([model], minus: base.decoded(count: count))[0], keepBits: keep, unit: unit)
    }
    precondition(keep.count == (count + 63) / 64)
    guard count > 0 else { return (0, 0) }
    let source = mergekit_key_source(first: model.start, second: base.start)
    let sums = keep.withUnsafeBufferPointer { k in
      guard let kp = k.baseAddress else { return [0.0, 0.0] }
      return sumsOfBlocks(
        count: count, width: 2,
        whole: {
          if vectorUnit == .avx512 {
            mergekit_absolute_sums_bf16_differences_avx512(source, kp, $0, $1, Elementwise.blockSize, $2)
          } else {
            mergekit_absolute_sums_bf16_differences_avx2(source, kp, $0, $1, Elementwise.blockSize, $2)
          }
        }
      ) { block, o in
        // The partial last block: its differences formed here, summed as the array's are.
        let range = (block * Elementwise.blockSize)..<Swift.min(count, (block + 1) * Elementwise.blockSize)
        let offset = range.lowerBound
        let shifted = [model, base].map { StoredElements(start: $0.start + offset * $0.dtype.size, dtype: $0.dtype) }
        let difference = differences([shifted[0]], minus: shifted[1].decoded(count: range.count))[0]
        (o[2 * block], o[2 * block + 1]) = difference.withUnsafeBufferPointer { d in
          guard let dp = d.baseAddress else { return (0, 0) }
          return absoluteSumsOfBlock(dp, kp, first: offset, count: range.count)
        }
      }
    }
    return (sums[0], sums[1])
  }

  /// The two sums of one block for `absoluteSums`: `count` values from `values` (elements `first`
  /// on), their flags from packed `keep`. Unpacked to masks first: the sum then runs as fast as
  /// over a `[Bool]` mask (testing the bits inside it is several times slower).
  static func absoluteSumsOfBlock(
    _ values: UnsafePointer<Float>, _ keep: UnsafePointer<UInt64>, first: Int, count: Int
  ) -> (Double, Double) {
    withUnsafeTemporaryAllocation(of: UInt32.self, capacity: count) { masks in
      guard let m = masks.baseAddress else { return (0, 0) }
      unpackMasks(keep, first: first, count: count, into: m)
      return Elementwise.blockSumPair(0..<count) {
        let magnitude = values[$0].bitPattern & 0x7FFF_FFFF
        return (Double(Float(bitPattern: magnitude)), Double(Float(bitPattern: magnitude & m[$0])))
      }
    }
  }

  /// Sum of |values| (where `keep`, if given), in `Double`, deterministic.
  public static func absoluteSum(_ values: [Float], keep: [Bool]? = nil) -> Double {
    precondition(keep.map { $0.count == values.count } ?? true)
    guard !values.isEmpty else { return 0 }
    return withPointers([values]) { p in
      let v = SendableRawPointer(p[0])
      return withMaskBytes(keep ?? []) { k in
        Elementwise.sumOfBlocks(values.count) { range in
          guard let vp = v.floats else { return 0 }
          guard keep != nil, let kp = k.pointer else { return Elementwise.blockSum(range) { Double(abs(vp[$0])) } }
          return Elementwise.blockSum(range) {
            Double(
              Float(
                bitPattern: vp[$0].bitPattern & 0x7FFF_FFFF
                  & (0 &- UInt32(kp.load(fromByteOffset: $0, as: UInt8.self) & 1))))
          }
        }
      }
    }
  }
}

/// Loading and storing one element of a floating dtype at an element index of unaligned bytes,
/// for kernels specialised per dtype (`Kernels.fusedWeightedSum`).
protocol FloatStorage {
  static func load(_ bytes: UnsafeRawPointer, _ index: Int) -> Float
  static func store(_ value: Float, _ bytes: UnsafeMutableRawPointer, _ index: Int)
}

enum BF16Storage: FloatStorage {
  @inline(__always) static func load(_ bytes: UnsafeRawPointer, _ index: Int) -> Float {
    Float(bitPattern: DTypeConversion.bf16ToF32Bits(bytes.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self)))
  }
  @inline(__always) static func store(_ value: Float, _ bytes: UnsafeMutableRawPointer, _ index: Int) {
    bytes.storeBytes(of: DTypeConversion.f32ToBF16Bits(value.bitPattern), toByteOffset: 2 * index, as: UInt16.self)
  }
}

enum F16Storage: FloatStorage {
  @inline(__always) static func load(_ bytes: UnsafeRawPointer, _ index: Int) -> Float {
    Float(bitPattern: DTypeConversion.f16ToF32Bits(bytes.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self)))
  }
  @inline(__always) static func store(_ value: Float, _ bytes: UnsafeMutableRawPointer, _ index: Int) {
    bytes.storeBytes(of: DTypeConversion.f32ToF16Bits(value.bitPattern), toByteOffset: 2 * index, as: UInt16.self)
  }
}

enum F32Storage: FloatStorage {
  @inline(__always) static func load(_ bytes: UnsafeRawPointer, _ index: Int) -> Float {
    Float(bitPattern: bytes.loadUnaligned(fromByteOffset: 4 * index, as: UInt32.self))
  }
  @inline(__always) static func store(_ value: Float, _ bytes: UnsafeMutableRawPointer, _ index: Int) {
    bytes.storeBytes(of: value.bitPattern, toByteOffset: 4 * index, as: UInt32.self)
  }
}
