import Foundation
import Tensor

/// aTLAS's coefficients `Lambda`: one value per task vector, block (a parameter tensor, by name)
/// and partition (1 for block-wise scaling). A small JSON file a user can read, edit and reuse:
///
/// ```json
/// {"format": "atlas-coefficients", "tasks": ["tv-a", "tv-b"], "blocks": ["layers.0.weight", ...],
///  "partitions": 1, "coefficients": [[[0.41], ...], [[0.37], ...]]}
/// ```
/// `coefficients[task][block][partition]`. Tensors not listed keep the base's values.
public struct ATLASCoefficients: Sendable, Equatable {
  public var tasks: [String]
  public var blocks: [String]
  public var partitions: Int
  public var values: [[[Double]]]

  /// All coefficients equal to `value`.
  public init(tasks: [String], blocks: [String], partitions: Int = 1, value: Double = 0) {
    self.tasks = tasks
    self.blocks = blocks
    self.partitions = partitions
    values = Array(
      repeating: Array(repeating: Array(repeating: value, count: partitions), count: blocks.count), count: tasks.count)
  }

  public init(tasks: [String], blocks: [String], partitions: Int, values: [[[Double]]]) throws {
    guard partitions >= 1, values.count == tasks.count,
      values.allSatisfy({ $0.count == blocks.count && $0.allSatisfy { $0.count == partitions } })
    else {
      throw MergeError.malformedCoefficients(
        "expected \(tasks.count) tasks x \(blocks.count) blocks x \(partitions) partitions of coefficients")
    }
    guard Set(blocks).count == blocks.count else { throw MergeError.malformedCoefficients("a block is listed twice") }
    self.tasks = tasks
    self.blocks = blocks
    self.partitions = partitions
    self.values = values
  }

  /// The coefficients of `block` per task (and partition), or nil when it is not a block.
  public func coefficients(block: String) -> [[Double]]? {
    guard let b = blocks.firstIndex(of: block) else { return nil }
    return values.map { $0[b] }
  }

  public func json() throws -> Data {
    let object: [String: Any] = [
      "format": "atlas-coefficients", "tasks": tasks, "blocks": blocks, "partitions": partitions,
      "coefficients": values,
    ]
    return try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
  }

  public init(json: Data) throws {
    guard let object = try? JSONSerialization.jsonObject(with: json) as? [String: Any],
      object["format"] as? String == "atlas-coefficients"
    else {
      throw MergeError.malformedCoefficients(
        "not an aTLAS coefficient file (a JSON object with \"format\": \"atlas-coefficients\")")
    }
    guard let tasks = object["tasks"] as? [String], let blocks = object["blocks"] as? [String],
      let partitions = object["partitions"] as? Int,
      let raw = object["coefficients"] as? [[[NSNumber]]]
    else {
      throw MergeError.malformedCoefficients(
        "needs 'tasks', 'blocks' (names), 'partitions' (an integer) and 'coefficients' (tasks x blocks x partitions numbers)"
      )
    }
    try self.init(
      tasks: tasks, blocks: blocks, partitions: partitions, values: raw.map { $0.map { $0.map(\.doubleValue) } })
  }

  /// Checks the coefficients against the base's tensors (name to shape) and the number of task
  /// vectors given: every block must be a tensor of the base.
  public func check(baseShapes: [String: [Int]], taskVectors: Int) throws {
    guard tasks.count == taskVectors else { throw MergeError.taskCount(file: tasks.count, given: taskVectors) }
    let unknown = blocks.filter { baseShapes[$0] == nil }
    guard unknown.isEmpty else { throw MergeError.unknownBlocks(unknown) }
  }

  /// Which partition element `index` of a tensor of `count` elements belongs to: one fixed
  /// random assignment per element count (tensors of one shape share it, as in aTLAS x K, which
  /// keys it by shape), the same on every machine.
  public static func partition(of index: Int, count: Int, partitions: Int) -> Int {
    guard partitions > 1 else { return 0 }
    return Int(CounterRNG(seed: 0, stream: "atlas-partition-\(count)").bits(UInt64(index)) % UInt64(partitions))
  }
}

/// `base + sum_i sum_k lambda[i][b][k] * (mask_k . tau_i)` per tensor: applies aTLAS coefficients to
/// a base and its task vectors (the models), streamed like any merge. With every coefficient
/// equal to `lambda` this is task arithmetic (`apply --scale lambda`), bit for bit.
public struct ATLASApply: StreamingMerge {
  public let coefficients: ATLASCoefficients
  public init(_ coefficients: ATLASCoefficients) { self.coefficients = coefficients }
  public var name: String { "atlas" }
  public var takesTaskVectors: Bool { true }
  public var summary: String { "base + block-wise learned scalings of task vectors (aTLAS)" }
  public var reference: String {
    "Zhang et al., Knowledge Composition using Task Vectors with Learned Anisotropic Scaling, NeurIPS 2024 (arXiv:2407.02880)"
  }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...Int.max }
  public var parameters: [ParameterSpec] { [] }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    try mergeThroughRanges(inputs, p)
  }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger?
  {
    let lambdas =
      coefficients.coefficients(block: name)
      ?? Array(repeating: Array(repeating: 0, count: coefficients.partitions), count: p.models.count)
    let partitions = coefficients.partitions
    guard partitions > 1 else {
      let weights = lambdas.map { $0[0] }
      return RangeMerger { range in
        guard let base = range.base else { throw MergeError.baseRequired(method: "atlas") }
        return Kernels.weightedSum(range.models, weights: weights, base: base)
      }
    }
    return RangeMerger { range in
      guard let base = range.base else { throw MergeError.baseRequired(method: "atlas") }
      return (0..<range.count).map { j in
        let k = ATLASCoefficients.partition(of: range.offset + j, count: count, partitions: partitions)
        var sum = 0.0
        for (i, model) in range.models.enumerated() { sum += lambdas[i][k] * Double(model[j]) }
        return Float(Double(base[j]) + sum)
      }
    }
  }
}
