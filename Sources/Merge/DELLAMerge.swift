import Foundation
import Tensor

/// mergekit's `della` and `della_linear` (DELLA: drop and rescale by magnitude-ranked
/// probabilities). Per model, `delta = model - base`; within each row (the whole tensor for a
/// vector) the entries are ranked by magnitude, smallest first, and entry of normalised rank
/// `r` in [0, 1] is kept with probability `density - epsilon + 2 epsilon r` (so larger entries
/// survive more often), drawn from a counter-based generator keyed by `seed`, tensor and model
/// (the same on any machine and thread count; mergekit's torch draws are equal in
/// distribution, not in value). With `rescale` (default) the kept entries are scaled back to the
/// delta's L1 norm. The weighted deltas are then combined as in TIES (`della`: sign consensus,
/// normalised by the agreeing weights) or summed (`della_linear`), scaled by `lambda` and added
/// to the base. Magnitude ties rank in index order. Computed in `Double`.
///
/// Streamed by rows: a first pass over blocks of whole rows sums each model's L1 norms before
/// and after the drop; each range of the merge then reads the whole rows it touches, ranks and
/// draws again (the same draws), and keeps its own elements. Memory stays at a few ranges
/// whatever the tensor; a whole tensor merges through the same code (`mergeThroughRanges`).
public struct DELLAMerge: StreamingMerge {
  public let name: String
  public let consensus: Bool
  public let defaultNormalize: Bool

  public static let della = DELLAMerge(name: "della", consensus: true, defaultNormalize: true)
  public static let dellaLinear = DELLAMerge(name: "della-linear", consensus: false, defaultNormalize: false)

  public var summary: String {
    consensus
      ? "magnitude-ranked random drop and rescale, then TIES sign consensus"
      : "magnitude-ranked random drop and rescale, then task arithmetic"
  }
  public var reference: String {
    "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, "
      + "arXiv:2406.11617; mergekit's \(name.replacingOccurrences(of: "-", with: "_"))"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] {
    [
      .number("weight", .perModel, default: 1, help: "scale of each model's task vector"),
      .number("density", .perModel, in: 0...1, default: 1, help: "mean fraction of each task vector's entries kept"),
      .number(
        "epsilon", .perModel, in: 0...1, default: 0.15,
        help: "spread of the keep probabilities around density (density +- epsilon must lie in (0, 1))"),
      .number("lambda", .global, default: 1, help: "scale of the merged task vector"),
      .flag("normalize", default: defaultNormalize, help: "divide by the sum of the (agreeing) weights"),
      .flag("rescale", default: true, help: "rescale each pruned task vector to its original L1 norm"),
      .number(
        "seed", .global, in: 0...9.007_199_254_740_992e15, default: 0,
        help: "random seed; the same seed gives the same output on any machine"),
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    guard let base = inputs.base else { throw MergeError.baseRequired(method: name) }
    guard !streams(tensor: inputs.name, shape: base.shape) else { return try mergeThroughRanges(inputs, p) }
    // Rows longer than a range: the whole tensor as one range, so that each row is ranked once.
    let whole = RangeInputs(offset: 0, base: base.scalars, models: inputs.models.map(\.scalars))
    let scan = TensorScan(ranges: [0..<base.count]) { _ in whole }
    guard let merger = try prepare(tensor: inputs.name, shape: base.shape, p, scan: scan) else {
      throw MergeError.notStreamable(method: name, tensor: inputs.name)
    }
    return Tensor(shape: base.shape, scalars: try merger.merge(whole))
  }

  /// Rows longer than a merge range (a large vector is one row) are merged whole, in one piece:
  /// each range would rank the whole row again.
  public func streams(tensor name: String, shape: [Int]) -> Bool {
    Self.rowLength(shape) <= MergeRanges.size
  }

  /// The length of the rows ranks are taken in: the last dimensions of a matrix or more, the
  /// whole tensor for a vector.
  static func rowLength(_ shape: [Int]) -> Int {
    let count = shape.reduce(1, *)
    return shape.count >= 2 ? count / max(shape[0], 1) : count
  }

  /// As a vector (one row): `prepare(tensor:shape:)` is the one the runner calls.
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    try prepare(tensor: name, shape: [count], p, scan: scan)
  }

  /// One model's drop on this tensor.
  struct Drop: Sendable {
    var density: Double
    var epsilon: Double
    var rng: CounterRNG
    /// L1 norm before over after the drop (1 without `rescale`), as a ratio `before / after`.
    var before = 1.0
    var after = 1.0

    /// Whether entries are dropped at all (0 < density < 1).
    var drops: Bool { density > 0 && density < 1 }
  }

  public func prepare(tensor name: String, shape: [Int], _ p: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    let count = shape.reduce(1, *)
    let rowLength = max(Self.rowLength(shape), 1)
    let models = p.models.count
    let seed = UInt64(p.number("seed"))
    var drops = try (0..<models).map { m -> Drop in
      let (density, epsilon) = (p.number("density", model: m), p.number("epsilon", model: m))
      if density > 0 && density < 1 && !(density - epsilon > 0 && density + epsilon < 1) {
        throw MergeError.invalidParameter(
          method: self.name, name: "epsilon", tensor: name,
          reason: "must leave density +- epsilon inside (0, 1) (density \(density), epsilon \(epsilon))")
      }
      return Drop(density: density, epsilon: epsilon, rng: CounterRNG(seed: seed, stream: "\(self.name)#\(m)"))
    }
    if p.flag("rescale") && drops.contains(where: \.drops) {
      // Blocks of whole rows, about a range each, summed in order.
      let blocks = MergeRanges.rowBlocks(count, rowLength: rowLength)
      var sums = [(before: Double, after: Double)](repeating: (0, 0), count: models)
      let fixed = drops
      try TensorScan(ranges: blocks, read: scan.read, release: scan.release).pass { rows in
        try (0..<models).map { m -> (Double, Double) in
          guard fixed[m].drops else { return (0, 0) }
          var (before, after) = (0.0, 0.0)
          try Self.eachKept(rows, model: m, drop: fixed[m], rowLength: rowLength, method: self.name) { _, delta, kept in
            before += abs(delta)
            if kept { after += abs(delta) }
          }
          return (before, after)
        }
      } combine: { parts in
        for m in 0..<models {
          sums[m].before += parts[m].0
          sums[m].after += parts[m].1
        }
      }
      for m in 0..<models where drops[m].drops && sums[m].before >= 1e-7 && sums[m].after >= 1e-7 {
        (drops[m].before, drops[m].after) = sums[m]
      }
    }
    let weights = (0..<models).map { p.number("weight", model: $0) }
    let (lambda, normalize, consensus) = (p.number("lambda"), p.flag("normalize"), self.consensus)
    let weightSum = weights.reduce(0, +)
    let fixed = drops
    let read = scan.read
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: self.name) }
      let (first, end) = (range.offset, range.offset + base.count)
      // The whole rows the range touches.
      let rowsStart = first / rowLength * rowLength
      let rowsEnd = min(count, (end + rowLength - 1) / rowLength * rowLength)
      let rows = rowsStart == first && rowsEnd == end ? range : try read(rowsStart..<rowsEnd)
      // Each model's weighted, kept (and rescaled) delta on the range's elements.
      var deltas = [[Double]](repeating: [Double](repeating: 0, count: end - first), count: models)
      for m in 0..<models {
        let (drop, weight) = (fixed[m], weights[m])
        try Self.eachKept(rows, model: m, drop: drop, rowLength: rowLength, method: self.name) { i, delta, kept in
          guard i >= first && i < end else { return }
          // before / after is 1 / 1 (exact) without rescale or drop.
          deltas[m][i - first] = (kept ? delta * drop.before / drop.after : 0) * weight
        }
      }
      return (0..<(end - first)).map { j -> Float in
        var mixed = 0.0
        var divisor = 0.0
        if consensus {
          let majority: Double = deltas.reduce(0) { $0 + $1[j] } >= 0 ? 1 : -1
          for (delta, weight) in zip(deltas, weights) where delta[j] != 0 && (delta[j] > 0 ? 1.0 : -1.0) == majority {
            mixed += delta[j]
            divisor += weight
          }
          if divisor == 0 { divisor = 1 }
        } else {
          mixed = deltas.reduce(0) { $0 + $1[j] }
          divisor = abs(weightSum) < 1e-8 ? 1 : weightSum
        }
        if normalize { mixed /= divisor }
        return Float(Double(base[j]) + mixed * lambda)
      }
    }
  }

  /// Calls `body(index, delta, kept)` for every element of `rows` (whole rows of `rowLength`,
  /// the last one possibly shorter at the tensor's end) for model `m`: its index in the tensor,
  /// `model - base` in Double, and whether the drop keeps it (always, when `drop` drops none and
  /// its density is 1; never at density 0).
  static func eachKept(
    _ rows: RangeInputs, model m: Int, drop: Drop, rowLength: Int, method: String,
    _ body: (Int, Double, Bool) throws -> Void
  ) throws {
    guard let base = rows.base else { throw MergeError.baseRequired(method: method) }
    let values = rows.models[m]
    let n = base.count
    // Each entry's rank key: its magnitude's bit pattern (non-negative doubles order as their
    // bits; a NaN above +inf, as torch's sort puts it); equal magnitudes rank in index order.
    var keys = [UInt64](repeating: 0, count: min(rowLength, n))
    var start = 0
    while start < n {
      let length = min(rowLength, n - start)
      guard drop.drops else {
        for k in 0..<length {
          let delta = Double(values[start + k]) - Double(base[start + k])
          try body(rows.offset + start + k, delta, drop.density >= 1)
        }
        start += length
        continue
      }
      for k in 0..<length { keys[k] = abs(Double(values[start + k]) - Double(base[start + k])).bitPattern }
      let order = keys.withUnsafeBufferPointer { KeyOrder.ascending(UnsafeBufferPointer(rebasing: $0[0..<length])) }
      let span = Double(max(length - 1, 1))
      var keep = [Bool](repeating: false, count: length)
      for rank in 0..<length {
        let k = Int(order[rank])
        let probability = drop.density - drop.epsilon + 2 * drop.epsilon * Double(rank) / span
        keep[k] = Double(drop.rng.uniform(UInt64(rows.offset + start + k))) < probability
      }
      for k in 0..<length {
        try body(rows.offset + start + k, Double(values[start + k]) - Double(base[start + k]), keep[k])
      }
      start += length
    }
  }
}
