import Tensor

/// mergekit's `passthrough`: one model's tensors as they are, optionally multiplied by `scale`
/// (usually given with filters, e.g. 0 on `o_proj` and `down_proj` to make a stacked layer start
/// as an identity). With slices it stacks layer ranges of models into a deeper one
/// (frankenmerges); each slice then has exactly one source.
public struct PassthroughMerge: StreamingMerge {
  public init() {}
  public var name: String { "passthrough" }
  public var summary: String { "one model's tensors, optionally scaled (layer stacking with slices)" }
  public var reference: String {
    "mergekit's passthrough (Goddard et al., Arcee's MergeKit, EMNLP 2024 Industry, arXiv:2403.13257)"
  }
  public var base: BaseRequirement { .unused }
  public var modelCount: ClosedRange<Int> { 1...1 }
  public var parameters: [ParameterSpec] {
    [.number("scale", .perModel, default: 1, help: "multiply the tensor by this (with filters to pick tensors)")]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    try mergeThroughRanges(inputs, p)
  }

  /// A weighted sum with the one weight `scale`: computed in `Double` and rounded once, so a
  /// scale of 1 gives the stored values bit for bit.
  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger?
  {
    RangeMerger(WeightedSumForm(method: self.name, terms: [0], weights: [p.number("scale", model: 0)]))
  }
}
