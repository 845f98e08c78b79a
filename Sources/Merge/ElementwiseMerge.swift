import Foundation
import Tensor

/// The values of every input on one range of a tensor's elements.
public struct RangeInputs: Sendable {
  /// Index of the range's first element in the tensor.
  public let offset: Int
  public let base: [Float]?
  /// The models' values; empty when only their task vectors were read (`taskVectors`).
  public let models: [[Float]]
  /// Each model minus the base, when the reader computed them for a method that reads only
  /// task vectors (`StreamingMerge.readsTaskVectors`).
  public let taskVectors: [[Float]]?

  public init(offset: Int, base: [Float]?, models: [[Float]], taskVectors: [[Float]]? = nil) {
    self.offset = offset
    self.base = base
    self.models = models
    self.taskVectors = taskVectors
  }

  public var count: Int { base?.count ?? models.first?.count ?? taskVectors?.first?.count ?? 0 }

  /// Each model minus the base (rounded to `Float`), as read or computed here.
  public func modelsMinusBase(method: String) throws -> [[Float]] {
    if let taskVectors { return taskVectors }
    guard let base else { throw MergeError.baseRequired(method: method) }
    return models.map { Kernels.difference($0, base) }
  }
}

/// Merges one range of a prepared tensor.
public struct RangeMerger: Sendable {
  public let merge: @Sendable (RangeInputs) throws -> [Float]
  /// Set when the merge is a weighted sum of the inputs: the runner may then compute it straight
  /// from the stored bytes, with the same bits.
  public let weightedSum: WeightedSumForm?
  /// Set when the merge can also read a range's stored elements (`TensorScan.StoredReader`'s
  /// order: the base first when there is one, then the models) and give `merge`'s bits, encoded
  /// as the given dtype; it may decline a range (nil), which `merge` then takes. The runner
  /// calls it under exact arithmetic.
  public let storedMerge: (@Sendable ([Kernels.StoredElements], Range<Int>, DType) throws -> TensorData?)?

  public init(
    _ merge: @escaping @Sendable (RangeInputs) throws -> [Float],
    stored: (@Sendable ([Kernels.StoredElements], Range<Int>, DType) throws -> TensorData?)? = nil
  ) {
    self.merge = merge
    weightedSum = nil
    storedMerge = stored
  }

  /// A weighted-sum merger (`Kernels.weightedSum` over the inputs the form names).
  public init(_ form: WeightedSumForm) {
    weightedSum = form
    storedMerge = nil
    merge = { range in
      let base = range.base ?? []
      guard !form.usesBase || range.base != nil else { throw MergeError.baseRequired(method: form.method) }
      return Kernels.weightedSum(
        form.terms.map { $0.map { range.models[$0] } ?? base }, weights: form.weights, scale: form.scale,
        base: form.addsBase ? range.base : nil,
        subtractingBase: form.subtractsBase)
    }
  }
}

/// A merge of the form `b + scale * sum_t w_t x_t`, summed in `Double` and rounded once: `x_t` is
/// an input (the base, or model i), or a model minus the base when `subtractsBase` (which needs
/// `addsBase`); `b` is the base when `addsBase`, else 0. Linear, task arithmetic, SLERP, Model Stock and `apply` take it.
public struct WeightedSumForm: Sendable {
  /// Each term's input: a model index, or nil for the base.
  public var terms: [Int?]
  public var weights: [Double]
  public var scale: Double
  public var addsBase: Bool
  public var subtractsBase: Bool
  /// The method's name, for errors.
  public var method: String

  public init(
    method: String, terms: [Int?], weights: [Double], scale: Double = 1, addsBase: Bool = false,
    subtractsBase: Bool = false
  ) {
    precondition(terms.count == weights.count && (addsBase || !subtractsBase), "task vectors are summed onto the base")
    self.method = method
    self.terms = terms
    self.weights = weights
    self.scale = scale
    self.addsBase = addsBase
    self.subtractsBase = subtractsBase
  }

  /// The models `terms[t]` of every term, in order (all models, when there is no base term).
  public static func models(_ count: Int) -> [Int?] { (0..<count).map { $0 } }

  /// Whether the base is read.
  public var usesBase: Bool { addsBase || subtractsBase || terms.contains(nil) }
}

/// Fixed ranges of elements: statistics passes and merges cut every tensor the same way,
/// whether it is streamed from disk or held in memory, so both give identical bits.
public enum MergeRanges {
  public static let size = 1 << 18

  /// Ranges a pass or a merge holds ahead of the one being written or combined, at most; input
  /// pages are released this many ranges at a time.
  public static var inFlight: Int { 2 * Parallel.threadCount }

  /// The elements of the batch of `inFlight` consecutive ranges (from range 0) that range `j`
  /// completes, whose input pages can then be released: the whole batch at its last range and
  /// at the last range of all; nil elsewhere.
  public static func completedBatch(_ ranges: [Range<Int>], at j: Int) -> Range<Int>? {
    guard (j + 1) % inFlight == 0 || j == ranges.count - 1 else { return nil }
    return ranges[j / inFlight * inFlight].lowerBound..<ranges[j].upperBound
  }

  public static func ranges(_ count: Int) -> [Range<Int>] {
    stride(from: 0, to: count, by: size).map { $0..<min(count, $0 + size) }
  }

  /// Blocks of whole rows of `rowLength` elements, about a range each (at least one row), for
  /// passes that need whole rows (DELLA's ranks, arcee fusion's row divergences).
  public static func rowBlocks(_ count: Int, rowLength: Int) -> [Range<Int>] {
    let block = max(1, size / max(rowLength, 1)) * max(rowLength, 1)
    return stride(from: 0, to: count, by: block).map { $0..<min(count, $0 + block) }
  }
}

/// Statistics passes over one tensor, range by range. `pass` summarises every range (in
/// parallel, so `summarize` must only read shared state) and hands the summaries to `combine`
/// one at a time in range order, so sums come out the same on any machine. The runner reads
/// ranges from memory-mapped inputs and releases their pages a few ranges at a time.
public struct TensorScan {
  /// Calls its body with the stored elements of one range of every input: the base first when
  /// there is one, then the models (valid only inside the body).
  public typealias StoredReader = (Range<Int>, ([Kernels.StoredElements]) throws -> Void) throws -> Void
  /// Calls its body with the stored elements of short blocks `start ..< start + length` of every
  /// input (base first), one buffer per input holding the blocks back to back in the order of
  /// `starts` (valid only inside the body).
  public typealias StoredBlocksReader = (_ starts: [Int], _ length: Int, ([Kernels.StoredElements]) throws -> Void)
    throws -> Void

  public let ranges: [Range<Int>]
  let read: (Range<Int>) throws -> RangeInputs
  let readStored: StoredReader?
  let readStoredBlocks: StoredBlocksReader?
  let release: (Range<Int>) throws -> Void

  /// - `read`: the inputs' values on one range; `readStored`: their stored bytes, when they can
  ///   be read as stored and the merge's arithmetic is exact (else `storedPass` presents `read`'s
  ///   values as F32); `readStoredBlocks`: many short blocks' stored bytes at once, under the
  ///   same conditions; `release`: called on each batch's elements once summarised.
  public init(
    ranges: [Range<Int>], read: @escaping (Range<Int>) throws -> RangeInputs, readStored: StoredReader? = nil,
    readStoredBlocks: StoredBlocksReader? = nil, release: @escaping (Range<Int>) throws -> Void = { _ in }
  ) {
    self.ranges = ranges
    self.read = read
    self.readStored = readStored
    self.readStoredBlocks = readStoredBlocks
    self.release = release
  }

  /// `body`'s result on the stored elements of blocks `start ..< start + length`, for each of
  /// `starts`, of every input (base first), back to back: block i's elements from `i * length`
  /// (valid only inside `body`). Nil when the inputs cannot be read as stored.
  public func withStoredBlocks<R>(_ starts: [Int], length: Int, _ body: ([Kernels.StoredElements]) throws -> R)
    throws -> R?
  {
    guard let readStoredBlocks else { return nil }
    var result: R?
    try readStoredBlocks(starts, length) { result = try body($0) }
    return result
  }

  public func pass<Summary>(_ summarize: (RangeInputs) throws -> Summary, combine: (Summary) throws -> Void) throws {
    try pass(summarizingRange: { try summarize(try read(ranges[$0])) }, combine: combine)
  }

  /// `pass` over each range's stored elements (`StoredReader`'s order) instead of arrays of
  /// decoded values, for sweeps that decode as they go; `summarize` gets them and the range's
  /// elements. The summaries must depend only on the values, not on their stored dtype: where
  /// the inputs cannot be read as stored, the decoded values come as F32. For methods that read
  /// the models, not only their task vectors.
  public func storedPass<Summary>(
    _ summarize: (_ inputs: [Kernels.StoredElements], _ elements: Range<Int>) throws -> Summary,
    combine: (Summary) throws -> Void
  ) throws {
    try pass(
      summarizingRange: { j in
        let range = ranges[j]
        if let readStored {
          var summary: Summary?
          try readStored(range) { summary = try summarize($0, range) }
          guard let summary else { preconditionFailure("TensorScan.readStored did not call its body") }
          return summary
        }
        let values = try read(range)
        precondition(values.taskVectors == nil, "storedPass needs the models' values, not task vectors")
        return try Self.withF32Elements((values.base.map { [$0] } ?? []) + values.models) {
          try summarize($0, range)
        }
      }, combine: combine)
  }

  /// A sample of a tensor of `count` elements for bracketing a threshold: blocks of 64
  /// neighbouring elements at evenly spaced places, about `count / 256` elements (2^16 to 2^20;
  /// the whole tensor when it is smaller), in batches of 32 blocks. `produce(starts, length)`
  /// reads one batch's blocks (thousands of short reads a tensor, side by side on all cores);
  /// `consume` gets the batches' results in order. Safetensors inputs read the blocks with
  /// `pread` (`MappedTensors.copyBytes`), which maps nothing; an input read through a mapping
  /// brings each sampled page's neighbours into memory (the kernel maps a 2 MiB folio, or up to
  /// 64 KiB, around a fault), so the pages behind the sample are let go as it moves on, a batch
  /// of ranges at a time as the passes release theirs: memory stays at a few ranges.
  func sampleBlocks<Part>(
    count n: Int, produce: (_ starts: [Int], _ length: Int) throws -> Part,
    consume: (Part) throws -> Void
  ) throws {
    let block = 64
    let wanted = min(n, max(1 << 16, min(1 << 20, n / 256)))
    let blocks = max(1, wanted / block)
    let starts =
      blocks * block >= n ? [0] : (0..<blocks).map { b in blocks == 1 ? 0 : b * (n - block) / (blocks - 1) }
    let length = blocks * block >= n ? n : block
    let batch = 32
    var released = 0
    try Parallel.inOrder(
      (starts.count + batch - 1) / batch, budget: MergeRanges.inFlight,
      produce: { j in try produce(Array(starts[(j * batch)..<min(starts.count, (j + 1) * batch)]), length) },
      consume: { j, part in
        try consume(part)
        let last = min(starts.count, (j + 1) * batch) - 1
        let end = last == starts.count - 1 ? n : max(released, starts[last] - MergeRanges.size)
        guard end == n || end - released >= MergeRanges.size * MergeRanges.inFlight else { return }
        if end > released { try release(released..<end) }
        released = end
      })
  }

  /// Summaries are combined in order by whoever finishes the next one, a few ranges ahead at
  /// most; pages are released a batch of ranges at a time.
  private func pass<Summary>(summarizingRange summarize: (Int) throws -> Summary, combine: (Summary) throws -> Void)
    throws
  {
    try Parallel.inOrder(
      ranges.count, budget: MergeRanges.inFlight, produce: summarize,
      consume: { j, summary in
        try combine(summary)
        if let batch = MergeRanges.completedBatch(ranges, at: j) { try release(batch) }
      })
  }

  /// Calls `body` with `arrays` as F32 stored elements (valid only inside `body`).
  static func withF32Elements<R>(_ arrays: [[Float]], _ body: ([Kernels.StoredElements]) throws -> R) rethrows -> R {
    try Kernels.withBytes(of: arrays) { buffers in
      try body(buffers.map { Kernels.StoredElements(start: $0.baseAddress ?? Kernels.noElements, dtype: .f32) })
    }
  }
}

/// A method the runner can stream range by range: memory stays at a few ranges however large
/// the tensor. `prepare` may first make statistics passes over the tensor (`scan`) to gather
/// top-k thresholds or norms; it returns the range merger, or nil when this tensor must be
/// merged whole.
public protocol StreamingMerge: MergeMethod {
  func prepare(tensor name: String, count: Int, _ parameters: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  /// Whether the method reads the models only through `modelsMinusBase` (and the base), apart
  /// from a `WeightedSumForm` merger, which the runner computes from the stored bytes anyway:
  /// the runner may then compute the task vectors straight from the stored bytes.
  var readsTaskVectors: Bool { get }
  /// Whether the runner streams this tensor through `prepare` (every tensor unless the method
  /// says otherwise); the others are merged whole by `merge`, several in flight.
  func streams(tensor name: String, shape: [Int]) -> Bool
  /// `prepare` for a method that needs the tensor's shape (DELLA ranks within rows); by default
  /// the count-only `prepare`. The runner and `mergeByRanges` call this one.
  func prepare(tensor name: String, shape: [Int], _ parameters: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
}

extension StreamingMerge {
  public var readsTaskVectors: Bool { false }
  public func streams(tensor name: String, shape: [Int]) -> Bool { true }
  public func prepare(tensor name: String, shape: [Int], _ parameters: ResolvedParameters, scan: TensorScan) throws
    -> RangeMerger?
  {
    try prepare(tensor: name, count: shape.reduce(1, *), parameters, scan: scan)
  }

  /// The whole-tensor merge through the ranges, for methods whose `prepare` always gives a
  /// range merger. Throws `MergeError.notStreamable` where it does not.
  public func mergeThroughRanges(_ inputs: MergeInputs, _ parameters: ResolvedParameters) throws -> Tensor {
    guard let merged = try mergeByRanges(inputs, parameters) else {
      throw MergeError.notStreamable(method: name, tensor: inputs.name)
    }
    return merged
  }

  /// The whole-tensor merge done through the same ranges as streaming (nil: not streamable).
  public func mergeByRanges(_ inputs: MergeInputs, _ parameters: ResolvedParameters) throws -> Tensor? {
    let shape = (inputs.base ?? inputs.models[0]).shape
    let count = shape.reduce(1, *)
    let ranges = MergeRanges.ranges(count)
    @Sendable func slice(_ r: Range<Int>) -> RangeInputs {
      RangeInputs(
        offset: r.lowerBound, base: inputs.base.map { Array($0.scalars[r]) },
        models: inputs.models.map { Array($0.scalars[r]) })
    }
    guard
      let merger = try prepare(
        tensor: inputs.name, shape: shape, parameters, scan: TensorScan(ranges: ranges, read: slice))
    else {
      return nil
    }
    var out: [Float] = []
    out.reserveCapacity(count)
    for r in ranges { out += try merger.merge(slice(r)) }
    return Tensor(shape: shape, scalars: out)
  }
}
