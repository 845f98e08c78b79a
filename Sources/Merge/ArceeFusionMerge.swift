import Foundation
import Tensor

/// mergekit's `arcee_fusion`: the base takes the other model's value only where the change is
/// important. Importance is `|theta - base|` times the row's KL divergence between the
/// softmaxes of the model's and the base's row (last dimension, each probability plus 1e-8);
/// the threshold is `median + 1.5 (q3 - q1)` of the importances (quantiles at index
/// `floor(q (n - 1))` of the sorted values). mergekit samples a million values with replacement
/// for larger tensors; here the quantiles are exact. Computed in `Double` (probabilities and
/// logarithms within a few ulps, `Kernels.softmaxDivergence`), streamed: a pass over blocks of
/// whole rows gives each row's KL divergence and a histogram of the top 16 bits of the
/// importances' keys; a second pass collects the keys under the three quantiles' 16-bit
/// prefixes (a few percent of them, narrowed by 16 more bits a pass first where they exceed
/// `candidateLimit`), among which the exact quantiles are found in memory; then the merge, range
/// by range. The second pass and the merge read the inputs' stored bytes. Under mergekit's
/// rounding (`MergeArithmetic.rounded`) the tensor is merged whole.
public struct ArceeFusionMerge: StreamingMerge {
  /// The most importance keys collected for the quantile search to finish in memory (8 bytes
  /// each): above it, a pass over the tensor narrows the prefixes by 16 more bits first.
  let candidateLimit: Int

  public init() { candidateLimit = 1 << 22 }

  /// With a smaller `candidateLimit`, to exercise the narrowing passes on small tensors.
  init(candidateLimit: Int) { self.candidateLimit = max(candidateLimit, 0) }

  public var name: String { "arcee-fusion" }
  public var summary: String { "the base, updated only where the change is important (KL-weighted outliers)" }
  public var reference: String { "Arcee AI, Arcee Fusion (arcee.ai); mergekit's arcee_fusion" }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...1 }
  public var parameters: [ParameterSpec] { [] }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard inputs.base != nil else { throw MergeError.baseRequired(method: name) }
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    return try mergeThroughRanges(inputs, p)
  }

  /// As a vector (one row): `prepare(tensor:shape:)` is the one the runner calls.
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    try prepare(tensor: name, shape: [count], p, scan: scan)
  }

  /// The search for the keys at three ranks among all of a tensor's keys, 16 bits at a time
  /// from the top: each rank's known top bits (its prefix), how many keys lie below the prefix
  /// and how many under it.
  struct QuantileSearch: Sendable {
    let ranks: [Int]
    private(set) var prefixes: [UInt64]
    private var below: [Int]
    private var under: [Int]
    private(set) var knownBits = 0

    static var emptyHistograms: [[Int]] { [[Int]](repeating: [Int](repeating: 0, count: 65536), count: 3) }

    init(ranks: [Int]) {
      self.ranks = ranks
      prefixes = [UInt64](repeating: 0, count: ranks.count)
      below = [Int](repeating: 0, count: ranks.count)
      under = [Int](repeating: Int.max, count: ranks.count)
    }

    /// The keys under at least one prefix, each counted once.
    var candidateCount: Int {
      (0..<prefixes.count).reduce(0) { total, q in
        prefixes[..<q].contains(prefixes[q]) ? total : total &+ under[q]
      }
    }

    /// Whether `key` lies under one of the prefixes.
    @inline(__always) func isCandidate(_ key: UInt64) -> Bool {
      guard knownBits > 0 else { return true }
      return prefixes.contains(key >> UInt64(64 - knownBits))
    }

    /// `body(q, digit)` for each rank `q` whose prefix `key` lies under, with the 16 bits of
    /// `key` that follow the prefix.
    @inline(__always) func forEachDigit(of key: UInt64, _ body: (Int, UInt16) -> Void) {
      let digit = UInt16(truncatingIfNeeded: key >> UInt64(48 - knownBits))
      let top = knownBits == 0 ? 0 : key >> UInt64(64 - knownBits)
      for q in 0..<prefixes.count where top == prefixes[q] { body(q, digit) }
    }

    /// Extends each prefix by 16 bits, from each rank's histogram of the next 16 bits of the
    /// keys under its prefix.
    mutating func narrow(by histograms: [[Int]]) {
      for q in 0..<prefixes.count {
        var bin = 0
        while below[q] + histograms[q][bin] <= ranks[q] {
          below[q] += histograms[q][bin]
          bin += 1
        }
        prefixes[q] = prefixes[q] << 16 | UInt64(bin)
        under[q] = histograms[q][bin]
      }
      knownBits += 16
    }
  }

  public func prepare(tensor name: String, shape: [Int], _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !p.arithmetic.isRounded else { return nil }
    let count = shape.reduce(1, *)
    guard count > 0 else { return RangeMerger { _ in [] } }
    let method = self.name
    let width = max(shape.last ?? 1, 1)
    // Each row's KL divergence between the softmaxes of the model's and the base's row, and
    // with them, as the block holds whole rows, the top 16 bits of each importance's key: one
    // histogram for the three quantiles.
    let blocks = MergeRanges.rowBlocks(count, rowLength: width)
    var divergences: [Double] = []
    divergences.reserveCapacity((count + width - 1) / width)
    var top = [Int](repeating: 0, count: 65536)
    try TensorScan(ranges: blocks, read: scan.read, release: scan.release).pass { rows -> ([Double], [UInt32]) in
      guard let base = rows.base, let model = rows.models.first else { throw MergeError.baseRequired(method: method) }
      var scratch: [Double] = []
      let local = stride(from: 0, to: base.count, by: width).map { start in
        let row = start..<min(base.count, start + width)
        return Kernels.softmaxDivergence(model[row], base[row], epsilon: 1e-8, scratch: &scratch)
      }
      var counts = [UInt32](repeating: 0, count: 2 * 65536)
      Kernels.countImportanceKeys(model: model, base: base, offset: 0, width: width, factors: local, into: &counts)
      return (local, counts)
    } combine: { local, counts in
      divergences += local
      Kernels.addHistograms(counts, into: &top)
    }
    let kl = divergences
    // The keys of a range's importances under the search's prefixes, from its stored elements
    // (the base's first).
    func keys(_ inputs: [Kernels.StoredElements], _ elements: Range<Int>, under search: QuantileSearch) throws
      -> [UInt64]
    {
      guard inputs.count == 2 else { throw MergeError.baseRequired(method: method) }
      return Kernels.importanceKeys(
        model: inputs[1], base: inputs[0], count: elements.count, offset: elements.lowerBound, width: width,
        factors: kl, under: search.prefixes, knownBits: search.knownBits)
    }
    // The three quantiles (sorted ascending, index floor(q (n - 1))), by their keys' bits from
    // the top: 16 from the histogram above; 16 more a pass over the tensor while more than
    // `candidateLimit` keys lie under the three prefixes; then one pass collects those keys and
    // the rest of the bits are found among them in memory.
    var search = QuantileSearch(ranks: [0.25, 0.5, 0.75].map { Int($0 * Double(count - 1)) })
    search.narrow(by: [top, top, top])
    while search.knownBits < 64 && search.candidateCount > candidateLimit {
      let current = search
      var histograms = QuantileSearch.emptyHistograms
      try scan.storedPass { inputs, elements in
        try keys(inputs, elements, under: current)
      } combine: { keys in
        for key in keys { current.forEachDigit(of: key) { q, digit in histograms[q][Int(digit)] += 1 } }
      }
      search.narrow(by: histograms)
    }
    if search.knownBits < 64 {
      let current = search
      var candidates: [UInt64] = []
      candidates.reserveCapacity(search.candidateCount)
      try scan.storedPass { inputs, elements in
        try keys(inputs, elements, under: current)
      } combine: {
        candidates += $0
      }
      while search.knownBits < 64 {
        var histograms = QuantileSearch.emptyHistograms
        for key in candidates { search.forEachDigit(of: key) { q, digit in histograms[q][Int(digit)] += 1 } }
        search.narrow(by: histograms)
        let narrowed = search
        candidates.removeAll { !narrowed.isCandidate($0) }
      }
    }
    let quantiles = search.prefixes.map(Kernels.orderedDouble)
    let threshold = quantiles[1] + 1.5 * (quantiles[2] - quantiles[0])
    return RangeMerger { range in
      guard let base = range.base, let model = range.models.first else { throw MergeError.baseRequired(method: method) }
      return Kernels.fuseByImportance(
        model: model, base: base, offset: range.offset, width: width, factors: kl, threshold: threshold)
    } stored: { inputs, elements, dtype in
      guard inputs.count == 2 else { throw MergeError.baseRequired(method: method) }
      return TensorData(dtype: dtype, count: elements.count) { out in
        Kernels.fuseByImportance(
          model: inputs[1], base: inputs[0], count: elements.count, offset: elements.lowerBound, width: width,
          factors: kl, threshold: threshold, into: out, as: dtype)
      }
    }
  }

  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let baseTensor = inputs.base else { throw MergeError.baseRequired(method: name) }
    let r = p.arithmetic
    let base = baseTensor.scalars
    let model = inputs.models[0].scalars
    let count = base.count
    guard count > 0 else { return baseTensor }
    let width = max(baseTensor.shape.last ?? 1, 1)
    let change = inputs.relativeToBase(r)[0]
    var importance = [Float](repeating: 0, count: count)
    // Rows side by side on all cores, each writing its own elements.
    let rows = (count + width - 1) / width
    let rowsPerItem = max(1, Elementwise.blockSize / width)
    importance.withUnsafeMutableBufferPointer { out in
      guard let o = out.baseAddress else { return }
      try? Parallel.forEach((rows + rowsPerItem - 1) / rowsPerItem) { _, item in
        for rowIndex in (item * rowsPerItem)..<min(rows, (item + 1) * rowsPerItem) {
          let row = (rowIndex * width)..<min(count, (rowIndex + 1) * width)
          let pm = Self.softmax(model[row].map(Double.init)[...]).map { r.round(r.round($0) + 1e-8) }
          let qb = Self.softmax(base[row].map(Double.init)[...]).map { r.round(r.round($0) + 1e-8) }
          let kl = r.round(
            zip(pm, qb).reduce(0.0) { $0 + Double(r.round($1.0 * r.round(Float(log(Double(r.round($1.0 / $1.1))))))) })
          for i in row { o[i] = r.round(abs(change[i]) * kl) }
        }
      }
    }
    // The quartiles as the sorted importances' elements (the order statistics, without a sort).
    let positions = [0.5, 0.75, 0.25].map { Int($0 * Double(count - 1)) }
    let quartiles = RoundedSweeps.orderStatistics(importance, positions)
    let threshold = r.round(quartiles[0] + r.round(1.5 * r.round(quartiles[1] - quartiles[2])))
    return Tensor(
      shape: baseTensor.shape,
      scalars: Elementwise.map(count) { r.round(base[$0] + (importance[$0] >= threshold ? change[$0] : 0)) })
  }

  static func softmax(_ values: ArraySlice<Double>) -> [Double] {
    let top = values.max() ?? 0
    let exps = values.map { exp($0 - top) }
    let total = exps.reduce(0, +)
    return exps.map { $0 / total }
  }
}
