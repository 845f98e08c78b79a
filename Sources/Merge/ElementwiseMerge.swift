import Tensor

/// The values of every input on one range of a tensor's elements.
public struct RangeInputs: Sendable {
  /// Index of the range's first element in the tensor.
  public let offset: Int
  public let base: [Float]?
  public let models: [[Float]]

  public init(offset: Int, base: [Float]?, models: [[Float]]) {
    self.offset = offset
    self.base = base
    self.models = models
  }

  public var count: Int { base?.count ?? models.first?.count ?? 0 }
}

/// Merges one range of a prepared tensor.
public struct RangeMerger: Sendable {
  public let merge: @Sendable (RangeInputs) throws -> [Float]
  public init(_ merge: @escaping @Sendable (RangeInputs) throws -> [Float]) { self.merge = merge }
}

/// Fixed ranges of elements: statistics passes and merges cut every tensor the same way,
/// whether it is streamed from disk or held in memory, so both give identical bits.
public enum MergeRanges {
  public static let size = 1 << 18

  public static func ranges(_ count: Int) -> [Range<Int>] {
    stride(from: 0, to: count, by: size).map { $0..<min(count, $0 + size) }
  }
}

/// A method the runner can stream range by range: memory stays at a few ranges however large
/// the tensor. `prepare` may first read the tensor in full passes (`scan` visits every range in
/// order) to gather statistics such as top-k thresholds or norms; it returns the range merger,
/// or nil when this tensor must be merged whole.
public protocol StreamingMerge: MergeMethod {
  func prepare(tensor name: String, count: Int, _ parameters: ResolvedParameters, scan: ((RangeInputs) throws -> Void) throws -> Void) throws -> RangeMerger?
}

extension StreamingMerge {
  /// The whole-tensor merge done through the same ranges as streaming (nil: not streamable).
  public func mergeByRanges(_ inputs: MergeInputs, _ parameters: ResolvedParameters) throws -> Tensor? {
    let shape = (inputs.base ?? inputs.models[0]).shape
    let count = shape.reduce(1, *)
    let ranges = MergeRanges.ranges(count)
    func slice(_ r: Range<Int>) -> RangeInputs {
      RangeInputs(offset: r.lowerBound, base: inputs.base.map { Array($0.scalars[r]) }, models: inputs.models.map { Array($0.scalars[r]) })
    }
    guard let merger = try prepare(tensor: inputs.name, count: count, parameters, scan: { visit in for r in ranges { try visit(slice(r)) } }) else {
      return nil
    }
    var out: [Float] = []
    out.reserveCapacity(count)
    for r in ranges { out += try merger.merge(slice(r)) }
    return Tensor(shape: shape, scalars: out)
  }
}
