import Tensor

/// Task vectors as methods the runner can stream: `difference` makes `tau = finetuned - base`;
/// `sum` adds scaled task vectors back, `base + sum_i scale_i tau_i` (negative scales forget,
/// and `tau_C + tau_B - tau_A` is an analogy). Not merge methods: the `task-vector` and `apply`
/// commands use them.
public enum TaskVectors {
  /// `tau = model - base`, per tensor.
  public struct Difference: ElementwiseMerge {
    public init() {}
    public var name: String { "task-vector" }
    public var summary: String { "task vector: fine-tuned minus base" }
    public var reference: String { "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)" }
    public var base: BaseRequirement { .required }
    public var modelCount: ClosedRange<Int> { 1...1 }
    public var parameters: [ParameterSpec] { [] }

    public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
      guard let base = inputs.base else { throw MergeError.baseRequired(method: name) }
      return Tensor(shape: base.shape, scalars: try mergeRange(tensor: inputs.name, offset: 0, base: base.scalars, models: inputs.models.map(\.scalars), p))
    }

    public func isElementwise(_ parameters: ResolvedParameters) -> Bool { true }

    public func mergeRange(tensor name: String, offset: Int, base: [Float]?, models: [[Float]], _ p: ResolvedParameters) throws -> [Float] {
      guard let base else { throw MergeError.baseRequired(method: self.name) }
      let model = models[0]
      return Elementwise.map(base.count) { model[$0] - base[$0] }
    }
  }

  /// `base + sum_i scale_i tau_i`, where the "models" are task vectors.
  public struct Sum: ElementwiseMerge {
    public init() {}
    public var name: String { "apply" }
    public var summary: String { "add scaled task vectors to a base model" }
    public var reference: String { "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)" }
    public var base: BaseRequirement { .required }
    public var modelCount: ClosedRange<Int> { 1...Int.max }
    public var parameters: [ParameterSpec] {
      [.number("scale", .perModel, default: 1, help: "each task vector's scale (lambda); negative forgets")]
    }

    public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
      guard let base = inputs.base else { throw MergeError.baseRequired(method: name) }
      return Tensor(shape: base.shape, scalars: try mergeRange(tensor: inputs.name, offset: 0, base: base.scalars, models: inputs.models.map(\.scalars), p))
    }

    public func isElementwise(_ parameters: ResolvedParameters) -> Bool { true }

    public func mergeRange(tensor name: String, offset: Int, base: [Float]?, models vectors: [[Float]], _ p: ResolvedParameters) throws -> [Float] {
      guard let base else { throw MergeError.baseRequired(method: self.name) }
      let scales = vectors.indices.map { p.number("scale", model: $0) }
      return Elementwise.map(base.count) { i in
        var sum = Double(base[i])
        for t in 0..<vectors.count { sum += scales[t] * Double(vectors[t][i]) }
        return Float(sum)
      }
    }
  }
}
