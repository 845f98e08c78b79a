import Checkpoint
import Foundation
import Merge
import Tensor

/// mergekit's `slices:` form: the output is built slice by slice, each slice merging a range of
/// layers from each of its sources (the same number of layers from each) with the config's
/// method, renumbered after the layers of the slices before it. The tensors before the layers
/// (embeddings) are merged across the first slice's sources and those after them (final norm,
/// LM head) across the last slice's, as mergekit does. `passthrough` with one source per slice
/// stacks layer ranges (a frankenmerge); a single slice over all layers is the `models:` form.
///
/// Gradients are evaluated per slice (0 at its first layer, 1 at its last), at 0 for the
/// tensors before the layers and 1 for those after. Parameters resolve source first, then
/// slice, then the config's.
public struct SlicedMerge: Sendable {
  public struct Source: Sendable {
    public var model: String
    public var layers: Range<Int>
    public var parameters: [String: ParameterValue]
    public init(model: String, layers: Range<Int>, parameters: [String: ParameterValue] = [:]) {
      (self.model, self.layers, self.parameters) = (model, layers, parameters)
    }
  }

  public struct Slice: Sendable {
    public var sources: [Source]
    public var parameters: [String: ParameterValue]
    /// The slice's own base model (mergekit's slice `base_model`), else the configuration's.
    public var base: String?
    public init(sources: [Source], parameters: [String: ParameterValue] = [:], base: String? = nil) {
      (self.sources, self.parameters, self.base) = (sources, parameters, base)
    }
    var layerCount: Int { sources.first?.layers.count ?? 0 }
  }

  public var method: any MergeMethod
  public var base: String?
  public var slices: [Slice]
  public var global: [String: ParameterValue]

  public init(method: any MergeMethod, base: String?, slices: [Slice], global: [String: ParameterValue]) {
    (self.method, self.base, self.slices, self.global) = (method, base, slices, global)
  }

  /// Output layers in all.
  public var layerCount: Int { slices.reduce(0) { $0 + $1.layerCount } }

  /// Checks the structure without reading tensors: at least one slice, sources in each, equal
  /// layer counts within a slice, non-empty ranges, and the method's inputs per slice.
  public func check() throws {
    guard !slices.isEmpty else { throw OperationError.slices(reason: "there are no slices") }
    for (i, slice) in slices.enumerated() {
      guard !slice.sources.isEmpty else { throw OperationError.slices(reason: "slice \(i) has no sources") }
      for source in slice.sources where source.layers.isEmpty || source.layers.lowerBound < 0 {
        throw OperationError.slices(
          reason: "slice \(i): layer_range [\(source.layers.lowerBound), \(source.layers.upperBound)] of "
            + "\(source.model) is empty")
      }
      guard slice.sources.allSatisfy({ $0.layers.count == slice.layerCount }) else {
        throw OperationError.slices(reason: "slice \(i): every source must span the same number of layers")
      }
      let (hasBase, models) = roles(slice)
      do { try method.checkInputs(hasBase: hasBase, modelCount: models.count) } catch let error as MergeError {
        throw OperationError.slices(reason: "slice \(i): \(error)")
      }
    }
  }

  /// Which sources of a slice are the base and the models: for a method that uses a base, the
  /// source that is the slice's base model (or the configuration's) is the base; for others
  /// every source is a model.
  public func roles(_ slice: Slice) -> (hasBase: Bool, models: [Int]) {
    let sliceBase = slice.base ?? base
    let baseIndex = method.base == .unused ? nil : slice.sources.firstIndex { $0.model == sliceBase }
    return (baseIndex != nil, slice.sources.indices.filter { $0 != baseIndex })
  }

  /// The plans that make the output, in output order: the tensors before the layers, each
  /// slice, the tensors after. `open` opens a model once (callers cache).
  public func plans(outputType: DType?, open: (String) throws -> any Checkpoint) throws -> [MergePlan] {
    try check()
    var plans: [MergePlan] = []
    var firstLayer = 0
    let segments: [(slice: Int, kind: LayerView.Part)] =
      [(0, .before)] + slices.indices.map { ($0, .layers) } + [(slices.count - 1, .after)]
    for (index, kind) in segments {
      let slice = slices[index]
      let views = try slice.sources.map { source -> LayerView in
        let checkpoint = try open(source.model)
        return try LayerView(checkpoint, part: kind, layers: source.layers, firstOutputLayer: firstLayer)
      }
      if kind == .layers { firstLayer += slice.layerCount }
      guard views.contains(where: { !$0.tensors.isEmpty }) else { continue }
      let (hasBase, modelIndices) = roles(slice)
      let baseView = hasBase ? slice.sources.indices.first { !modelIndices.contains($0) }.map { views[$0] } : nil
      let positions =
        kind == .layers
        ? LayerPositions(layerCount: slice.layerCount, firstLayer: firstLayer - slice.layerCount)
        : LayerPositions(layerCount: 0)
      plans.append(
        try MergePlan(
          method: method, base: baseView, models: modelIndices.map { views[$0] },
          global: global.merging(slice.parameters) { $1 },
          perModel: modelIndices.map { slice.sources[$0].parameters }, outputType: outputType,
          positions: positions))
    }
    return plans
  }

  /// Runs the plans, in order, into one checkpoint at `destination`.
  public static func run(
    _ plans: [MergePlan], to destination: String, options: WriteOptions, progress: ((Int, Int) -> Void)? = nil
  ) throws {
    let infos = plans.flatMap { MergeRunner.outputTensors($0) }
    var options = options
    if options.metadata["format"] == nil { options.metadata["format"] = "pt" }
    let writer = try CheckpointWriter(destination: destination, tensors: infos, options: options)
    let total = plans.reduce(0) { $0 + $1.bytesRead }
    var before = 0
    for plan in plans {
      try MergeRunner.run(plan, into: writer, finish: false) { done, _ in progress?(before + done, total) }
      before += plan.bytesRead
    }
    try writer.finish()
  }

  /// The output's config.json: `source`'s with `num_hidden_layers` set to the output's layers
  /// and per-layer lists (`layer_types` ...) rebuilt from each slice's first source.
  public func outputConfig(_ configOf: (String) throws -> [String: Any]?) throws -> Data? {
    guard let first = slices.first?.sources.first, var config = try configOf(base ?? first.model) else { return nil }
    config["num_hidden_layers"] = layerCount
    for key in ["layer_types"] {
      guard config[key] is [Any] else { continue }
      var list: [Any] = []
      for slice in slices {
        guard let source = slice.sources.first, let values = try configOf(source.model)?[key] as? [Any],
          source.layers.upperBound <= values.count
        else {
          throw OperationError.slices(reason: "config.json '\(key)' does not list every layer of the slice's source")
        }
        list += values[source.layers]
      }
      config[key] = list
    }
    return try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
  }
}

/// One part of a model seen through a slice: the tensors before the layers, after them, or the
/// layers of a range renumbered to start at the slice's first output layer. Reads go to the
/// model's own tensors.
final class LayerView: Checkpoint, @unchecked Sendable {
  enum Part { case before, layers, after }

  let source: any Checkpoint
  let tensors: [TensorInfo]
  private let sourceName: [ExactName: String]

  init(_ source: any Checkpoint, part: Part, layers: Range<Int>, firstOutputLayer: Int) throws {
    self.source = source
    var tensors: [TensorInfo] = []
    var sourceName: [ExactName: String] = [:]
    var present = Set<Int>()
    for info in source.tensors {
      let layer = LayerPositions.layerIndex(info.name)
      var name: String?
      switch (part, layer) {
      case (.layers, let l?) where layers.contains(l):
        name = LayerPositions.renumbered(info.name, to: firstOutputLayer + l - layers.lowerBound)
        present.insert(l)
      case (.before, nil) where !LayerPositions.isAfterLayers(info.name),
        (.after, nil) where LayerPositions.isAfterLayers(info.name):
        name = info.name
      default: break
      }
      guard let name else { continue }
      tensors.append(TensorInfo(name: name, dtype: info.dtype, shape: info.shape))
      sourceName[ExactName(name)] = info.name
    }
    if part == .layers, let missing = layers.first(where: { !present.contains($0) }) {
      throw OperationError.slices(
        reason: "\(source.path) has no layer \(missing) (layer_range [\(layers.lowerBound), \(layers.upperBound)])")
    }
    self.tensors = tensors
    self.sourceName = sourceName
  }

  var path: String { source.path }
  var metadata: [String: String] { source.metadata }
  var files: [StoredFile] {
    [StoredFile(name: URL(fileURLWithPath: path).lastPathComponent, tensors: tensors.map(\.name))]
  }

  func lookup(_ name: String) -> TensorInfo? {
    guard let original = sourceName[ExactName(name)], let info = source.lookup(original) else { return nil }
    return TensorInfo(name: name, dtype: info.dtype, shape: info.shape)
  }

  func file(of name: String) -> String? { sourceName[ExactName(name)].flatMap { source.file(of: $0) } }

  func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
    guard let original = sourceName[ExactName(name)] else {
      throw CheckpointError.missingTensor(file: path, tensor: name)
    }
    return try source.withBytes(of: original, range: range, body)
  }

  func copyBytes(of name: String, parts: [Range<Int>], into destination: UnsafeMutableRawBufferPointer) throws {
    guard let original = sourceName[ExactName(name)] else {
      throw CheckpointError.missingTensor(file: path, tensor: name)
    }
    try source.copyBytes(of: original, parts: parts, into: destination)
  }

  func release(_ name: String, range: Range<Int>?) {
    if let original = sourceName[ExactName(name)] { source.release(original, range: range) }
  }

  func verify(progress: ((Int, Int) -> Void)?) throws { try source.verify(progress: progress) }
}

/// Several views of one model read as one checkpoint, in order (`convert --layers`).
final class LayerStack: Checkpoint, @unchecked Sendable {
  let parts: [LayerView]
  let tensors: [TensorInfo]
  private let partOf: [ExactName: Int]

  init(_ parts: [LayerView]) {
    self.parts = parts
    tensors = parts.flatMap(\.tensors)
    var partOf: [ExactName: Int] = [:]
    for (i, part) in parts.enumerated() { for info in part.tensors { partOf[ExactName(info.name)] = i } }
    self.partOf = partOf
  }

  var path: String { parts[0].path }
  var metadata: [String: String] { parts[0].metadata }
  var files: [StoredFile] {
    [StoredFile(name: URL(fileURLWithPath: path).lastPathComponent, tensors: tensors.map(\.name))]
  }
  func part(_ name: String) -> LayerView? { partOf[ExactName(name)].map { parts[$0] } }
  func lookup(_ name: String) -> TensorInfo? { part(name)?.lookup(name) }
  func file(of name: String) -> String? { part(name)?.file(of: name) }

  func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
    guard let part = part(name) else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    return try part.withBytes(of: name, range: range, body)
  }

  func copyBytes(of name: String, parts: [Range<Int>], into destination: UnsafeMutableRawBufferPointer) throws {
    guard let part = part(name) else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    try part.copyBytes(of: name, parts: parts, into: destination)
  }

  func release(_ name: String, range: Range<Int>?) { part(name)?.release(name, range: range) }
  func verify(progress: ((Int, Int) -> Void)?) throws { try parts[0].verify(progress: progress) }
}
