import Foundation
import Tensor

/// mergekit's `arcee_fusion`: the base takes the other model's value only where the change is
/// important. Importance is `|theta - base|` times the row's KL divergence between the
/// softmaxes of the model's and the base's row (last dimension, each probability plus 1e-8);
/// the threshold is `median + 1.5 (q3 - q1)` of the importances (quantiles at index
/// `floor(q (n - 1))` of the sorted values). mergekit samples a million values with replacement
/// for larger tensors; here the quantiles are exact. Computed in `Double`, streamed: a pass over
/// blocks of whole rows gives each row's KL divergence and the top 16 bits of the importances,
/// three more radix passes (16 bits of the importances' 64 at a time, counting only the keys
/// under each quantile's prefix) the three exact quantiles, then the merge range by range. Under
/// mergekit's rounding (`MergeArithmetic.rounded`) the tensor is merged whole.
public struct ArceeFusionMerge: StreamingMerge {
  public init() {}
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

  /// An order-preserving 64-bit key of a Double (negative values below positive ones).
  static func key(_ x: Double) -> UInt64 {
    let bits = x.bitPattern
    return bits >> 63 == 1 ? ~bits : bits | (1 << 63)
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
      var scratch = Self.DivergenceScratch()
      let local = stride(from: 0, to: base.count, by: width).map { start in
        scratch.divergence(model[start..<min(base.count, start + width)], base[start..<min(base.count, start + width)])
      }
      let firstRow = rows.offset / width
      var counts = [UInt32](repeating: 0, count: 65536)
      for x in Self.importances(rows, width: width, divergence: { local[$0 - firstRow] }) {
        counts[Int(Self.key(x) >> 48)] &+= 1
      }
      return (local, counts)
    } combine: { local, counts in
      divergences += local
      for bin in 0..<65536 { top[bin] += Int(counts[bin]) }
    }
    let kl = divergences
    @Sendable func importances(_ range: RangeInputs) throws -> [Double] {
      guard range.base != nil, range.models.first != nil else { throw MergeError.baseRequired(method: method) }
      return Self.importances(range, width: width, divergence: { kl[$0] })
    }
    // The three quantiles (sorted ascending, index floor(q (n - 1))), 16 bits a pass, the first
    // 16 from the histogram above.
    let ranks = [0.25, 0.5, 0.75].map { Int($0 * Double(count - 1)) }
    var prefixes = [UInt64](repeating: 0, count: 3)
    var below = [Int](repeating: 0, count: 3)
    for pass in 0..<4 {
      let shift = UInt64(48 - 16 * pass)
      let known = prefixes
      var histograms = pass == 0 ? [top, top, top] : [[Int]](repeating: [Int](repeating: 0, count: 65536), count: 3)
      if pass > 0 {
        // The next 16 bits of the keys under each quantile's prefix, few of the range's.
        try scan.pass { range -> [[UInt16]] in
          var digits: [[UInt16]] = [[], [], []]
          for x in try importances(range) {
            let key = Self.key(x)
            for q in 0..<3 where key >> (shift + 16) == known[q] {
              digits[q].append(UInt16(truncatingIfNeeded: key >> shift))
            }
          }
          return digits
        } combine: { parts in
          for q in 0..<3 { for digit in parts[q] { histograms[q][Int(digit)] += 1 } }
        }
      }
      for q in 0..<3 {
        var bin = 0
        while below[q] + histograms[q][bin] <= ranks[q] {
          below[q] += histograms[q][bin]
          bin += 1
        }
        prefixes[q] = prefixes[q] << 16 | UInt64(bin)
      }
    }
    let quantiles = prefixes.map { key -> Double in
      Double(bitPattern: key >> 63 == 1 ? key & ~(1 << 63) : ~key)
    }
    let threshold = quantiles[1] + 1.5 * (quantiles[2] - quantiles[0])
    return RangeMerger { range in
      guard let base = range.base, let model = range.models.first else { throw MergeError.baseRequired(method: method) }
      let importance = try importances(range)
      return base.indices.map { i in Float(importance[i] >= threshold ? Double(model[i]) : Double(base[i])) }
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
    for start in stride(from: 0, to: count, by: width) {
      let row = start..<min(count, start + width)
      let pm = Self.softmax(model[row].map(Double.init)[...]).map { r.round(r.round($0) + 1e-8) }
      let qb = Self.softmax(base[row].map(Double.init)[...]).map { r.round(r.round($0) + 1e-8) }
      let kl = r.round(
        zip(pm, qb).reduce(0.0) { $0 + Double(r.round($1.0 * r.round(Float(log(Double(r.round($1.0 / $1.1))))))) })
      for i in row { importance[i] = r.round(abs(change[i]) * kl) }
    }
    let sorted = importance.sorted()
    func quantile(_ q: Double) -> Float { sorted[Int(q * Double(count - 1))] }
    let threshold = r.round(quantile(0.5) + r.round(1.5 * r.round(quantile(0.75) - quantile(0.25))))
    return Tensor(
      shape: baseTensor.shape,
      scalars: (0..<count).map { r.round(base[$0] + (importance[$0] >= threshold ? change[$0] : 0)) })
  }

  /// `|model - base| * divergence(row)` for each element of `range` (with a base and a model),
  /// row segment by row segment; `divergence` takes the tensor's row index.
  static func importances(_ range: RangeInputs, width: Int, divergence: (Int) -> Double) -> [Double] {
    guard let base = range.base, let model = range.models.first else { return [] }
    return [Double](unsafeUninitializedCapacity: base.count) { out, initialized in
      var start = 0
      while start < base.count {
        let row = (range.offset + start) / width
        let end = min(base.count, (row + 1) * width - range.offset)
        let factor = divergence(row)
        for i in start..<end { out[i] = abs(Double(model[i]) - Double(base[i])) * factor }
        start = end
      }
      initialized = base.count
    }
  }

  /// Buffers for the KL divergence of row after row, reused.
  struct DivergenceScratch {
    private var model: [Double] = []
    private var base: [Double] = []

    /// `sum p log(p / q)` over the row, `p` and `q` the softmaxes of the model's and the
    /// base's row, each probability plus 1e-8: `softmax`'s arithmetic, in the same order.
    mutating func divergence(_ modelRow: ArraySlice<Float>, _ baseRow: ArraySlice<Float>) -> Double {
      let n = modelRow.count
      if model.count < n { (model, base) = ([Double](repeating: 0, count: n), [Double](repeating: 0, count: n)) }
      return model.withUnsafeMutableBufferPointer { p in
        base.withUnsafeMutableBufferPointer { q in
          ArceeFusionMerge.fillSoftmax(modelRow, into: p)
          ArceeFusionMerge.fillSoftmax(baseRow, into: q)
          var sum = 0.0
          for i in 0..<n {
            let (pi, qi) = (p[i] + 1e-8, q[i] + 1e-8)
            sum += pi * log(pi / qi)
          }
          return sum
        }
      }
    }
  }

  /// `softmax` of a row of floats into the first `row.count` elements of `out`.
  static func fillSoftmax(_ row: ArraySlice<Float>, into out: UnsafeMutableBufferPointer<Double>) {
    let top = row.max().map(Double.init) ?? 0
    var total = 0.0
    for (i, x) in row.enumerated() {
      out[i] = exp(Double(x) - top)
      total += out[i]
    }
    for i in 0..<row.count { out[i] /= total }
  }

  static func softmax(_ values: ArraySlice<Double>) -> [Double] {
    let top = values.max() ?? 0
    let exps = values.map { exp($0 - top) }
    let total = exps.reduce(0, +)
    return exps.map { $0 / total }
  }
}
