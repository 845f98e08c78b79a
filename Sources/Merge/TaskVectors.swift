import Tensor

/// Task vectors as methods the runner can stream: `difference` makes `tau = finetuned - base`;
/// `sum` adds scaled task vectors back, `base + sum_i scale_i tau_i` (negative scales forget,
/// and `tau_C + tau_B - tau_A` is an analogy). Not merge methods: the `task-vector` and `apply`
/// commands use them.
public enum TaskVectors {
  /// `tau = model - base`, per tensor.
  public struct Difference: StreamingMerge {
    public init() {}
    public var name: String { "task-vector" }
    public var summary: String { "task vector: fine-tuned minus base" }
    public var reference: String { "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)" }
    public var base: BaseRequirement { .required }
    public var modelCount: ClosedRange<Int> { 1...1 }
    /// The low-rank options: when one is given, the task vector is written with its matrices as
    /// singular triplets (`LowRankTaskVector` in Operations) instead of streamed dense.
    public var parameters: [ParameterSpec] {
      [
        .number(
          "rank_fraction", .global, in: 0...1, openBelow: true, default: nil, optional: true,
          help:
            "keep each matrix as its leading singular triplets, at the rank where they take this fraction of its dense size (0.1: about a tenth)"
        ),
        .number(
          "energy", .global, in: 0...1, openBelow: true, default: nil, optional: true,
          help: "keep each matrix as the fewest singular triplets that hold this fraction of its energy"),
      ]
    }

    public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
      try mergeThroughRanges(inputs, p)
    }

    public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
      -> RangeMerger?
    {
      RangeMerger { range in
        guard let base = range.base else { throw MergeError.baseRequired(method: "task-vector") }
        return Kernels.difference(range.models[0], base)
      }
    }
  }

  /// `base + sum_i scale_i tau_i`, where the "models" are task vectors.
  public struct Sum: StreamingMerge {
    public init() {}
    public var name: String { "apply" }
    public var takesTaskVectors: Bool { true }
    public var summary: String { "add scaled task vectors to a base model" }
    public var reference: String { "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)" }
    public var base: BaseRequirement { .required }
    public var modelCount: ClosedRange<Int> { 1...Int.max }
    public var parameters: [ParameterSpec] {
      [.number("scale", .perModel, default: 1, help: "each task vector's scale (lambda); negative forgets")]
    }

    public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
      try mergeThroughRanges(inputs, p)
    }

    public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws
      -> RangeMerger?
    {
      let scales = p.models.indices.map { p.number("scale", model: $0) }
      return RangeMerger(
        WeightedSumForm(method: name, terms: WeightedSumForm.models(scales.count), weights: scales, addsBase: true))
    }
  }
}
