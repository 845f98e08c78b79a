import Foundation
import Tensor

/// mergekit's `sce` (select, calculate, erase) over task vectors `tau_i = theta_i - base`:
/// 1. select: with `select_topk` < 1, keep only the `floor(nonzero * select_topk)` elements of
///    largest variance across the models (population variance; ties by index), zero elsewhere;
/// 2. calculate: each model's weight is the mean square of its (selected) task vector over
///    their sum (equal weights when that sum is below 1e-6, as mergekit);
/// 3. erase: per element, drop the entries whose sign differs from the sign of the sum
///    (zero counts as +), then `base + sum w_i m_i tau_i / max(sum w_i m_i, 1e-6)`.
/// Computed in `Double`; the variances are ranked as float32 values (ties by index), as
/// mergekit ranks them in its float32 compute.
///
/// Streamed: the exact top-k of the variances, in one pass where a sample's bracket holds the
/// threshold (`MagnitudeBracket`, retargeted to the count of nonzero variances the pass finds),
/// else by `MagnitudeRanker`'s passes; a pass for the mean squares; then the merge range by range.
/// Under mergekit's rounding (`MergeArithmetic.rounded`) the tensor is merged whole.
public struct SCEMerge: StreamingMerge {
  public init() {}
  public var name: String { "sce" }
  public var summary: String { "variance-selected task vectors, weighted by energy, with sign consensus" }
  public var reference: String {
    "Wan et al., FuseChat: Knowledge Fusion of Chat Models (SCE), arXiv:2408.07990; mergekit's sce"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number(
        "select_topk", .global, in: 0...1, default: 1, help: "fraction of elements kept, by variance across models")
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard inputs.base != nil else { throw MergeError.baseRequired(method: name) }
    if p.arithmetic.isRounded { return try mergeRounded(inputs, p) }
    return try mergeThroughRanges(inputs, p)
  }

  /// Elements per block of `eachBlock`: a block's task vectors stay in the first-level cache.
  static let block = 1024

  /// Calls `body(start, length, tvs)` for each block of up to `block` elements of `range`, in
  /// order: `tvs` holds the block's task vectors `model - base` in Double, model by model
  /// (model m's element j at `m * length + j`), with the elements `keep` drops set to +0.
  static func eachBlock(
    _ range: RangeInputs, keep: [Bool]?, method: String, _ body: (Int, Int, UnsafeBufferPointer<Double>) -> Void
  ) throws {
    guard let base = range.base else { throw MergeError.baseRequired(method: method) }
    let (count, models) = (base.count, range.models.count)
    var scratch = [Double](repeating: 0, count: models * block)
    for start in stride(from: 0, to: count, by: block) {
      let length = min(block, count - start)
      scratch.withUnsafeMutableBufferPointer { tvs in
        for (m, model) in range.models.enumerated() {
          model.withUnsafeBufferPointer { model in
            base.withUnsafeBufferPointer { base in
              for j in 0..<length { tvs[m * length + j] = Double(model[start + j]) - Double(base[start + j]) }
            }
          }
          // Dropped elements +0, by masking the bits: a loop in vectors.
          keep?.withUnsafeBytes { keep in
            for j in 0..<length {
              let bits = tvs[m * length + j].bitPattern & (0 &- UInt64(keep[start + j] & 1))
              tvs[m * length + j] = Double(bitPattern: bits)
            }
          }
        }
        body(start, length, UnsafeBufferPointer(tvs))
      }
    }
  }

  /// Each element's population variance across the models, as float32 (the ranking key): the
  /// mean and the squared deviations summed in model order.
  static func variances(_ range: RangeInputs, method: String) throws -> [Float] {
    let models = range.models.count
    let n = Double(models)
    var (mean, squares) = ([Double](repeating: 0, count: block), [Double](repeating: 0, count: block))
    return try [Float](unsafeUninitializedCapacity: range.count) { out, initialized in
      try eachBlock(range, keep: nil, method: method) { start, length, tvs in
        mean.withUnsafeMutableBufferPointer { mean in
          squares.withUnsafeMutableBufferPointer { squares in
            for j in 0..<length { (mean[j], squares[j]) = (0, 0) }
            for m in 0..<models {
              for j in 0..<length { mean[j] += tvs[m * length + j] }
            }
            for j in 0..<length { mean[j] /= n }
            for m in 0..<models {
              for j in 0..<length {
                let deviation = tvs[m * length + j] - mean[j]
                squares[j] += deviation * deviation
              }
            }
            for j in 0..<length { out[start + j] = Float(squares[j] / n) }
          }
        }
      }
      initialized = range.count
    }
  }

  /// `base + sum w_m tv_m / max(sum w_m, 1e-6)` per element of a block (task vectors laid out
  /// as `eachBlock` gives them) over the task vectors whose sign is the sign of their sum (+
  /// for 0), zeros left out, into `out`. Model by model over the block, so that the loops run
  /// in vectors without branches (the signs are random), each element's sums taken in model
  /// order; adding +0 for the others changes nothing, as neither sum can be -0 (both start at
  /// +0).
  static func erase(
    _ tvs: UnsafeBufferPointer<Double>, length: Int, weights: [Double], base: UnsafeBufferPointer<Float>,
    into out: UnsafeMutableBufferPointer<Float>, scratch: inout [Double]
  ) {
    scratch.withUnsafeMutableBufferPointer { scratch in
      guard let total = scratch.baseAddress else { return }
      let (numerator, denominator) = (total + length, total + 2 * length)
      for j in 0..<length { (total[j], numerator[j], denominator[j]) = (0, 0, 0) }
      for m in weights.indices {
        for j in 0..<length { total[j] += tvs[m * length + j] }
      }
      for (m, w) in weights.enumerated() {
        for j in 0..<length {
          let value = tvs[m * length + j]
          let agrees = value != 0 && (value > 0) == (total[j] >= 0)
          numerator[j] += agrees ? value * w : 0
          denominator[j] += agrees ? w : 0
        }
      }
      for j in 0..<length { out[j] = Float(Double(base[j]) + numerator[j] / max(denominator[j], 1e-6)) }
    }
  }

  /// The variances of short blocks `start ..< start + length` (for each of `starts`), back to
  /// back: copied from the stored bytes in one go where the inputs allow it, else read block by
  /// block.
  static func sampledVariances(_ scan: TensorScan, starts: [Int], length: Int, method: String) throws -> [Float] {
    let count = starts.count * length
    let stored = try scan.withStoredBlocks(starts, length: length) { inputs -> [Float] in
      guard inputs.count >= 2 else { throw MergeError.baseRequired(method: method) }
      let values = inputs.map { $0.decoded(count: count) }
      return try variances(
        RangeInputs(offset: 0, base: values[0], models: Array(values.dropFirst())), method: method)
    }
    if let stored { return stored }
    return try starts.flatMap { start in try variances(try scan.read(start..<(start + length)), method: method) }
  }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    guard !p.arithmetic.isRounded else { return nil }
    let models = p.models.count
    let density = p.number("select_topk")
    let method = self.name
    // The selection: nil keeps everything; else a ranker over the variances and, when ties at
    // the threshold are cut, the count of threshold-equal elements before each range.
    var selection: (ranker: MagnitudeRanker, equalBefore: [Int: Int])?
    if density < 1 {
      // A sample of the variances brackets the threshold for the kept share its nonzero
      // variances suggest; the first pass counts the nonzero variances, the high histogram and
      // the bracket's summary. Where the exact count's threshold falls inside the bracket, that
      // pass settles it with the tie order; else `MagnitudeRanker`'s remaining passes do.
      var sample: [Float] = []
      try scan.sampleBlocks(count: count) { starts, length in
        try Self.sampledVariances(scan, starts: starts, length: length, method: method)
      } consume: {
        sample += $0
      }
      let sampledNonzero = sample.filter { $0 != 0 }.count
      let expectedKeep = Int(Double(count) * Double(sampledNonzero) / Double(max(sample.count, 1)) * density)
      let bracket = MagnitudeBracket(keep: expectedKeep, count: count, sample: sample, budget: max(1 << 18, count / 32))
      var nonzero = 0
      var high = [UInt32](repeating: 0, count: 65536)
      var summaries: [MagnitudeBracket.Summary] = []
      try scan.pass { range -> ([UInt32], Int, MagnitudeBracket.Summary?) in
        let v = try Self.variances(range, method: method)
        return (MagnitudeRanker.highCounts(v), v.filter { $0 != 0 }.count, bracket?.summarize(v))
      } combine: { counts, nonzeroInRange, summary in
        nonzero += nonzeroInRange
        for bin in 0..<65536 { high[bin] &+= counts[bin] }
        if let summary { summaries.append(summary) }
      }
      let kept = density > 0 ? Int((Double(nonzero) * density).rounded(.towardZero)) : 0
      var ranker = MagnitudeRanker(keep: kept, count: count)
      var equalBefore: [Int: Int] = [:]
      if ranker.needsPasses, let settled = bracket?.keeping(kept).ranker(summaries) {
        ranker = settled.ranker
        equalBefore = Dictionary(uniqueKeysWithValues: zip(scan.ranges.map(\.lowerBound), settled.equalBefore))
      } else if ranker.needsPasses {
        ranker.addHigh(high)
        ranker.finishHigh()
        let first = ranker
        try scan.pass { range in
          first.lowCounts(try Self.variances(range, method: method))
        } combine: {
          ranker.addLow($0)
        }
        ranker.finishLow()
        if ranker.needsTieOrder {
          let settled = ranker
          var running = 0
          try scan.pass { range in
            (range.offset, settled.equalCount(try Self.variances(range, method: method)))
          } combine: { offset, equal in
            equalBefore[offset] = running
            running += equal
          }
        }
      }
      selection = (ranker, equalBefore)
    }
    let chosen = selection
    /// Which elements of a range the selection keeps (nil: all).
    @Sendable func keep(_ range: RangeInputs) throws -> [Bool]? {
      guard let (ranker, equalBefore) = chosen else { return nil }
      return ranker.mask(try Self.variances(range, method: method), equalBefore: equalBefore[range.offset] ?? 0)
    }
    // Each model's mean square over the tensor: summed in element order within each range,
    // the ranges' sums in range order.
    var squares = [Double](repeating: 0, count: models)
    try scan.pass { range in
      var sums = [Double](repeating: 0, count: models)
      try Self.eachBlock(range, keep: try keep(range), method: method) { _, length, tvs in
        for m in 0..<models {
          for j in 0..<length { sums[m] += tvs[m * length + j] * tvs[m * length + j] }
        }
      }
      return sums
    } combine: { parts in
      for m in 0..<models { squares[m] += parts[m] }
    }
    var weights = squares.map { $0 / Double(max(count, 1)) }
    let total = weights.reduce(0, +)
    weights = abs(total) < 1e-6 ? weights.map { _ in 1 / Double(models) } : weights.map { $0 / total }
    let fixed = weights
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: method) }
      var scratch = [Double](repeating: 0, count: 3 * Self.block)
      return try [Float](unsafeUninitializedCapacity: base.count) { out, initialized in
        try base.withUnsafeBufferPointer { base in
          try Self.eachBlock(range, keep: try keep(range), method: method) { start, length, tvs in
            Self.erase(
              tvs, length: length, weights: fixed, base: UnsafeBufferPointer(rebasing: base[start..<start + length]),
              into: UnsafeMutableBufferPointer(rebasing: out[start..<start + length]), scratch: &scratch)
          }
        }
        initialized = base.count
      }
    }
  }

  /// mergekit's torch operations, each rounded (`MergeArithmetic.rounded`), on the whole
  /// tensor (`RoundedSCE`).
  func mergeRounded(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let base = inputs.base else { throw MergeError.baseRequired(method: name) }
    let merged = p.arithmetic.withRule(
      RoundedSCE(
        base: base.scalars, taskVectors: inputs.relativeToBase(p.arithmetic), density: p.number("select_topk")))
    return Tensor(shape: base.shape, scalars: merged)
  }
}

/// SCE as mergekit computes it in a narrow dtype: the task vectors rounded; with `select_topk`
/// below 1, each element's variance across them (mean and sum of squares in `Double`, rounded),
/// the `floor(nonzero * select_topk)` largest variances kept (ties to the lower index,
/// `Selection.largestMagnitudes`) and the other elements zeroed; each task vector's mean
/// rounded square (summed as `Elementwise.sum` sums, rounded) over their total gives its
/// weight; then, where a task vector agrees with the sign of the elements' sum, its rounded
/// weighted value is summed and divided by the summed weights (at least 1e-6 rounded), and the
/// quotient added to the base. Elementwise steps run over the blocks on all cores.
struct RoundedSCE: RoundedComputation {
  let base: [Float]
  let taskVectors: [[Float]]
  let density: Double

  /// The unselected elements are read as 0 where a sweep reads them, not zeroed in a copy of
  /// the task vectors.
  func callAsFunction<R: RoundingRule>(_: R.Type) -> [Float] {
    typealias S = RoundedSweeps
    let count = base.count
    let models = taskVectors.count
    let n = Double(models)
    var keep = [Bool](repeating: true, count: count)
    if density < 1 {
      var variance = [Float](repeating: 0, count: count)
      if density > 0 {
        taskVectors.withUnsafeBufferPointers { t in
          variance.withUnsafeMutableBufferPointer { out in
            guard let v = out.baseAddress else { return }
            Elementwise.forEachBlock(count) { r in
              for i in r {
                var sum = 0.0
                for tv in t { sum += Double(tv[i]) }
                let mean = sum / n
                var squares = 0.0
                for tv in t { squares += (Double(tv[i]) - mean) * (Double(tv[i]) - mean) }
                v[i] = R.round(squares / n)
              }
            }
          }
        }
      }
      let nonzero = variance.reduce(0) { $0 + ($1 != 0 ? 1 : 0) }
      keep = Selection.largestMagnitudes(variance, keep: Int((Double(nonzero) * density).rounded(.towardZero)))
    }
    return keep.withUnsafeBufferPointer { keepBuffer in
      let kept = keepBuffer.baseAddress ?? Kernels.noElements.assumingMemoryBound(to: Bool.self)
      let squares = taskVectors.map { tv in
        tv.withUnsafeBufferPointer { b -> Float in
          guard let t = b.baseAddress else { return R.round(0.0 / Double(max(count, 1))) }
          return R.round(
            Elementwise.sumOfBlocks(count) {
              Elementwise.blockSum($0) { kept[$0] ? Double(R.round(t[$0] * t[$0])) : 0 }
            } / Double(max(count, 1)))
        }
      }
      var sum = 0.0
      for square in squares { sum += Double(square) }
      let total = R.round(sum)
      let weights =
        abs(total) < 1e-6 ? squares.map { _ in R.round(1 / Float(models)) } : squares.map { R.round($0 / total) }
      let floor = R.round(Float(1e-6))
      return [Float](unsafeUninitializedCapacity: count) { out, initialized in
        taskVectors.withUnsafeBufferPointers { t in
          base.withUnsafeBufferPointer { b in
            guard let o = out.baseAddress, let basis = b.baseAddress else { return }
            Elementwise.forEachBlock(count) { r in
              for i in r {
                guard kept[i] else {
                  // Every task vector reads 0: no agreeing term, the divisor's floor.
                  o[i] = R.round(basis[i] + R.round(R.round(0.0) / max(R.round(0.0), floor)))
                  continue
                }
                var sum = 0.0
                for tv in t { sum += Double(tv[i]) }
                let majority: Float = sum >= 0 ? 1 : -1
                var numerator = 0.0
                var denominator = 0.0
                for (tv, w) in zip(t, weights) where tv[i] != 0 && (tv[i] > 0 ? 1 : -1) == majority {
                  numerator += Double(R.round(tv[i] * w))
                  denominator += Double(w)
                }
                o[i] = R.round(basis[i] + R.round(R.round(numerator) / max(R.round(denominator), floor)))
              }
            }
          }
        }
        initialized = count
      }
    }
  }
}
