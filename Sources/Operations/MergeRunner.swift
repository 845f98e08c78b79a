import Checkpoint
import Foundation
import Merge
import Tensor

/// A planned merge: which tensors are merged, which copied, in what output dtype, and what it
/// will cost. Built and checked before anything is written.
public struct MergePlan {
  /// How the merge computes: exactly (the default), or with mergekit's arithmetic, where the
  /// inputs are cast to `dtype` (each tensor's own when nil) and every operation is rounded to it
  /// as torch does, so that published bf16/f16 configurations give mergekit's numbers.
  public enum Compute: Sendable, Equatable {
    case exact
    case mergekit(dtype: DType?)

    /// Parses `exact` or `mergekit`.
    public init?(name: String, dtype: DType?) {
      switch name {
      case "exact": self = .exact
      case "mergekit": self = .mergekit(dtype: dtype)
      default: return nil
      }
    }
  }

  public enum Action: Equatable {
    /// Merged from the inputs that hold it.
    case merge
    /// Copied from input `index` (0 = the reference): integer tensors, or tensors missing from
    /// some model under `allowMissing`.
    case copy(from: Int)
  }

  public struct Item {
    public let name: String
    public let shape: [Int]
    public let outputType: DType
    public let action: Action
    /// Bytes read from all inputs for this tensor.
    public let bytesRead: Int
    public var count: Int { shape.reduce(1, *) }
  }

  public var method: any MergeMethod
  public let base: (any Checkpoint)?
  public let models: [any Checkpoint]
  public let resolver: ParameterResolver
  public let items: [Item]
  /// The checkpoint whose tensor order, sharding and non-tensor files the output follows.
  public let reference: any Checkpoint
  /// How the merge computes.
  public var compute: Compute = .exact
  /// Working memory for whole tensors merged side by side (see `MergeRunner`).
  public var memoryBudget = MergeRunner.memoryBudget

  /// The arithmetic of tensor `name`: mergekit's rounds to the compute dtype, or without one to
  /// the inputs' dtype (promoted as torch does: mixed half types compute in f32).
  public func arithmetic(_ name: String) -> MergeArithmetic {
    guard case .mergekit(let dtype) = compute else { return .exact }
    if let dtype { return .rounded(dtype) }
    let types = Set(((base.map { [$0] } ?? []) + models).compactMap { $0.lookup(name)?.dtype })
    return .rounded(types.count == 1 ? types.first ?? .f32 : (types.contains(.f64) ? .f64 : .f32))
  }

  /// The parameters of tensor `name`, with its arithmetic.
  public func parameters(_ name: String) throws -> ResolvedParameters {
    var parameters = try resolver.resolve(tensor: name)
    parameters.arithmetic = arithmetic(name)
    return parameters
  }

  public var bytesRead: Int { items.reduce(0) { $0 + $1.bytesRead } }
  public var bytesWritten: Int { items.reduce(0) { $0 + $1.count * $1.outputType.size } }

  /// Plans `method` over `models` (and `base`), with parameters from the user.
  /// - `outputType`: cast floating outputs to this dtype (default: the reference tensor's).
  /// - `allowMissing`: tensors absent from some model are copied from the base (or reference);
  ///   tensors only some models have are ignored.
  public init(
    method: any MergeMethod, base: (any Checkpoint)?, models: [any Checkpoint], global: [String: ParameterValue],
    perModel: [[String: ParameterValue]],
    outputType: DType? = nil, allowMissing: Bool = false, positions: LayerPositions? = nil
  ) throws {
    try method.checkInputs(hasBase: base != nil, modelCount: models.count)
    self.method = method
    self.base = base
    // A task vector among the models of a merge stands for base + tau.
    let models = method.takesTaskVectors ? models : try TaskVectorModel.models(models, base: base)
    self.models = models
    let inputs: [any Checkpoint] = (base.map { [$0] } ?? []) + models
    let reference = inputs[0]
    self.reference = reference
    resolver = try ParameterResolver(
      method: method.name, specs: method.parameters, global: global,
      models: perModel.isEmpty ? Array(repeating: [:], count: models.count) : perModel,
      positions: positions ?? LayerPositions(names: reference.tensors.map(\.name)))

    let referenceNames = Set(reference.tensors.map { ExactName($0.name) })
    for model in inputs.dropFirst() where !allowMissing {
      let extra = model.tensors.map(\.name).filter { !referenceNames.contains(ExactName($0)) }
      if !extra.isEmpty { throw OperationError.extraTensors(file: model.path, names: extra) }
    }
    var items: [Item] = []
    var missingByFile: [String: [String]] = [:]
    for info in reference.tensors {
      let found = inputs.map { $0.lookup(info.name) }
      if found.contains(where: { $0.map { $0.shape != info.shape } ?? false }) {
        throw OperationError.shapeMismatch(
          tensor: info.name, shapes: zip(inputs, found).map { "\($0.path): \($1.map { "\($0.shape)" } ?? "absent")" })
      }
      let outputType = info.dtype.isFloatingPoint ? (outputType ?? info.dtype) : info.dtype
      let bytesRead = found.compactMap { $0?.byteCount }.reduce(0, +)
      if found.contains(where: { $0 == nil }) {
        for (input, f) in zip(inputs, found) where f == nil { missingByFile[input.path, default: []].append(info.name) }
        items.append(
          Item(
            name: info.name, shape: info.shape, outputType: outputType, action: .copy(from: 0),
            bytesRead: info.byteCount))
      } else if !info.dtype.isFloatingPoint || found.contains(where: { $0.map { !$0.dtype.isFloatingPoint } ?? false })
      {
        items.append(
          Item(name: info.name, shape: info.shape, outputType: outputType, action: .copy(from: 0), bytesRead: bytesRead)
        )
      } else {
        items.append(
          Item(name: info.name, shape: info.shape, outputType: outputType, action: .merge, bytesRead: bytesRead))
      }
    }
    if !allowMissing, let (file, names) = missingByFile.sorted(by: { $0.key < $1.key }).first {
      throw OperationError.missingTensors(file: file, names: names)
    }
    guard items.contains(where: { $0.action == .merge }) else { throw OperationError.noFloatingTensors }
    self.items = items
  }
}

/// Runs a planned merge into a checkpoint, tensor by tensor in order. The tensors a
/// `StreamingMerge` method streams are read in fixed ranges (after its statistics passes), so
/// memory stays at a few ranges; other tensors are merged whole, several in flight
/// (`runInFlight`): as many as fit the plan's `memoryBudget` (their stored and decoded inputs,
/// results and the method's declared scratch) are merged side by side, each on one core with
/// BLAS on one thread, and written in order; a tensor that fills the budget alone runs alone.
/// Inputs are memory-mapped and their pages released after use. The output is bit-identical
/// whatever the worker count, shard size or format.
public enum MergeRunner {
  /// The default working memory for one group of whole tensors merged side by side: 2 GiB, or
  /// an eighth of the machine's memory where that is less. Streamed tensors stay far below it.
  public static let memoryBudget = min(2 << 30, Int(ProcessInfo.processInfo.physicalMemory / 8))

  /// Memory the writer and readers hold besides the tensors (staging buffers, chunk batches).
  public static let bufferBytes = 48 << 20

  /// Working memory of one tensor: the inputs' stored bytes (their mapped pages stay resident
  /// until the tensor is written), every input decoded to Float, the result, its encoding, and
  /// the method's own scratch.
  static func workingSet(_ item: MergePlan.Item, plan: MergePlan) throws -> Int {
    let inputs = plan.models.count + (plan.base == nil ? 0 : 1)
    let own = item.bytesRead + item.count * (4 * (inputs + 1) + item.outputType.size)
    guard item.action == .merge else { return own }
    return own
      + plan.method.scratchBytes(
        name: item.name, shape: item.shape, models: plan.models.count, try plan.parameters(item.name))
  }

  /// Whether `item` is streamed range by range (its method streams it, and it is merged, not
  /// copied).
  static func isStreamed(_ item: MergePlan.Item, _ plan: MergePlan) -> Bool {
    guard item.action == .merge, let method = plan.method as? any StreamingMerge else { return false }
    return method.streams(tensor: item.name, shape: item.shape)
  }

  /// The plan cut into consecutive runs processed together, with the most memory each holds: a
  /// streamed tensor alone; else a run of whole tensors, which holds at most the budget (or
  /// its largest tensor, which runs alone when larger).
  static func groups(_ plan: MergePlan) throws -> [(range: Range<Int>, bytes: Int)] {
    let inputs = plan.models.count + (plan.base == nil ? 0 : 1)
    var result: [(range: Range<Int>, bytes: Int)] = []
    var start = 0
    while start < plan.items.count {
      if isStreamed(plan.items[start], plan) {
        let bytes =
          MergeRanges.inFlight * MergeRanges.size * (4 * (inputs + 1) + plan.items[start].outputType.size)
        result.append((start..<(start + 1), bytes))
        start += 1
        continue
      }
      var end = start
      var total = 0
      var largest = 0
      while end < plan.items.count, !isStreamed(plan.items[end], plan) {
        let bytes = try workingSet(plan.items[end], plan: plan)
        total += bytes
        largest = max(largest, bytes)
        end += 1
      }
      result.append((start..<end, max(largest, min(total, plan.memoryBudget))))
      start = end
    }
    return result
  }

  /// The largest working set of any group: the tensor memory the merge needs at its peak.
  public static func workingSetBytes(_ plan: MergePlan) throws -> Int {
    try groups(plan).map(\.bytes).max() ?? 0
  }

  /// The output's tensors, in order.
  public static func outputTensors(_ plan: MergePlan) -> [TensorInfo] {
    plan.items.map { TensorInfo(name: $0.name, dtype: $0.outputType, shape: $0.shape) }
  }

  /// Runs the merge into a checkpoint file or folder at `destination`, sharded like the reference
  /// unless `options` says otherwise.
  public static func run(
    _ plan: MergePlan, to destination: String, options: WriteOptions, progress: ((Int, Int) -> Void)? = nil
  ) throws {
    var options = options
    if options.layout == nil { options.layout = plan.reference.files }
    try options.takeEmbeddedFiles(of: plan.reference)
    // transformers before 4.40 refuses safetensors files without `format: pt`.
    if options.metadata["format"] == nil { options.metadata["format"] = "pt" }
    let writer = try CheckpointWriter(destination: destination, tensors: outputTensors(plan), options: options)
    try run(plan, into: writer, progress: progress)
  }

  /// Runs the merge into `writer`, which declared `outputTensors(plan)` (or those of several
  /// plans, run in turn); finishes it unless `finish` is false.
  public static func run(
    _ plan: MergePlan, into writer: any TensorSink, finish: Bool = true, progress: ((Int, Int) -> Void)? = nil
  ) throws {
    let inputs: [any Checkpoint] = (plan.base.map { [$0] } ?? []) + plan.models
    let plan = try preparedForModel(plan, inputs: inputs)
    let total = plan.bytesRead
    var done = 0
    for (range, _) in try groups(plan) {
      if range.count == 1, isStreamed(plan.items[range.lowerBound], plan),
        let method = plan.method as? any StreamingMerge
      {
        let item = plan.items[range.lowerBound]
        let streamed = try stream(item, method: method, plan: plan, inputs: inputs, writer: writer) { bytes in
          done += bytes
          progress?(done, total)
        }
        if streamed { continue }
      }
      try runInFlight(Array(plan.items[range]), plan: plan, inputs: inputs) { item, produced in
        switch produced {
        case .stored(let data): try writer.write(item.name, data)
        case .merged(let tensor): try writer.write(item.name, tensor, as: item.outputType)
        }
        for input in inputs where input.lookup(item.name) != nil { input.release(item.name, range: nil) }
        done += item.bytesRead
        progress?(done, total)
      }
    }
    if finish { try writer.finish() }
  }

  /// Merges `items` (consecutive whole tensors) with several in flight and writes them in
  /// order: each worker takes the next tensor once its working set fits the budget next to those
  /// not yet written (a tensor too large for the budget waits until nothing else is held, then
  /// runs alone), and whoever finishes writes every result that is next in order. With more
  /// than one tensor, BLAS runs on one thread (the tensors share the cores); a lone tensor
  /// keeps BLAS on every core. Throws the error of the lowest-numbered failing tensor; nothing
  /// after it is written.
  static func runInFlight(
    _ items: [MergePlan.Item], plan: MergePlan, inputs: [any Checkpoint],
    write: (MergePlan.Item, Produced) throws -> Void
  ) throws {
    if items.count == 1 {
      return try write(items[0], try produce(items[0], plan: plan, inputs: inputs))
    }
    let sizes = try items.map { try workingSet($0, plan: plan) }
    try BLAS.singleThreaded {
      try Parallel.inOrder(
        items.count, budget: plan.memoryBudget, size: { sizes[$0] },
        produce: { try produce(items[$0], plan: plan, inputs: inputs) },
        consume: { try write(items[$0], $1) })
    }
  }

  /// An output tensor: bytes to copy, or merged values still to encode.
  enum Produced {
    case stored(TensorData)
    case merged(Tensor)
  }

  /// One output tensor: merged (inputs decoded to Float, merged; encoded when written) or copied.
  static func produce(_ item: MergePlan.Item, plan: MergePlan, inputs: [any Checkpoint]) throws -> Produced {
    switch item.action {
    case .copy(let index):
      let data = try inputs[index].read(item.name)
      for other in inputs where other !== inputs[index] && !data.dtype.isFloatingPoint {
        guard let info = other.lookup(item.name) else { continue }
        guard try info.dtype == data.dtype && other.read(item.name) == data else {
          throw OperationError.integerMismatch(tensor: item.name, file: other.path)
        }
      }
      return .stored(
        data.dtype.isFloatingPoint && data.dtype != item.outputType ? data.cast(to: item.outputType) : data)
    case .merge:
      let parameters = try plan.parameters(item.name)
      let arithmetic = parameters.arithmetic
      func read(_ input: any Checkpoint) throws -> Tensor {
        let tensor = try input.tensor(named: item.name)
        return arithmetic.isRounded ? Tensor(shape: tensor.shape, scalars: arithmetic.round(tensor.scalars)) : tensor
      }
      let base = try plan.base.map(read)
      let taskVectors = try storedTaskVectors(item, plan: plan, base: base, arithmetic: arithmetic)
      let models = taskVectors == nil ? try plan.models.map(read) : []
      let merged = try plan.method.merge(
        MergeInputs(name: item.name, base: base, models: models, taskVectors: taskVectors), parameters)
      guard arithmetic.isRounded else { return .merged(merged) }
      return .merged(Tensor(shape: merged.shape, scalars: arithmetic.round(merged.scalars)))
    }
  }

  /// The models' task vectors as stored, for a method that reads them, when some model is a
  /// task vector: low-rank ones as triplets, dense ones as stored; a plain model as its
  /// difference from the base. Nil otherwise (and under mergekit's rounding).
  static func storedTaskVectors(_ item: MergePlan.Item, plan: MergePlan, base: Tensor?, arithmetic: MergeArithmetic)
    throws -> [StoredTaskVector]?
  {
    guard plan.method.usesStoredTaskVectors, !arithmetic.isRounded, let base,
      plan.models.contains(where: { $0 is TaskVectorModel })
    else { return nil }
    return try plan.models.map { model in
      if let vector = model as? TaskVectorModel {
        if let factors = try vector.factors(of: item.name) { return .factored(factors) }
        return .dense(try vector.storedTensor(named: item.name))
      }
      let values = try model.tensor(named: item.name)
      return .dense(Tensor(shape: values.shape, scalars: zip(values.scalars, base.scalars).map { $0 - $1 }))
    }
  }

  /// Reading one tensor's ranges from every input (`inputs`: the base first when there is one,
  /// then the models) decoded to Float, or as stored, and many short blocks of it as stored (both
  /// nil under mergekit's rounding, which rounds the decoded values), and releasing their pages
  /// (returning the bytes released).
  static func rangeAccess(
    _ item: MergePlan.Item, plan: MergePlan, inputs: [any Checkpoint]
  ) -> (
    read: (Range<Int>) throws -> RangeInputs, stored: TensorScan.StoredReader?,
    blocks: TensorScan.StoredBlocksReader?, release: (Range<Int>) throws -> Int
  ) {
    let arithmetic = plan.arithmetic(item.name)
    // Every input's dtype, looked up once: a statistics sample reads thousands of short ranges.
    let inputTypes = Result { try inputs.map { try $0.info(item.name).dtype } }
    let firstModel = plan.base == nil ? 0 : 1
    func values(_ input: any Checkpoint, _ dtype: DType, _ elements: Range<Int>) throws -> [Float] {
      let bytes = (elements.lowerBound * dtype.size)..<(elements.upperBound * dtype.size)
      return arithmetic.round(
        try input.withBytes(of: item.name, range: bytes) {
          Tensor(decoding: $0, dtype: dtype, shape: [elements.count]).scalars
        })
    }
    let readsTaskVectors =
      (plan.method as? any StreamingMerge)?.readsTaskVectors == true && !arithmetic.isRounded
    let read = { (elements: Range<Int>) throws -> RangeInputs in
      let allTypes = try inputTypes.get()
      let types = Array(allTypes[firstModel...])
      let baseValues = try plan.base.map { try values($0, allTypes[0], elements) }
      if readsTaskVectors, let baseValues {
        // Task vectors straight from the stored bytes: the models are never decoded whole.
        let taskVectors = try withStoredElements(plan.models, types, name: item.name, elements: elements) {
          Kernels.differences($0, minus: baseValues)
        }
        return RangeInputs(offset: elements.lowerBound, base: baseValues, models: [], taskVectors: taskVectors)
      }
      return RangeInputs(
        offset: elements.lowerBound, base: baseValues,
        models: try plan.models.indices.map { try values(plan.models[$0], types[$0], elements) })
    }
    let stored: TensorScan.StoredReader? =
      arithmetic.isRounded
      ? nil
      : { elements, body in
        try withStoredElements(inputs, try inputTypes.get(), name: item.name, elements: elements, body)
      }
    // A statistics sample's blocks, every input's copied back to back into one buffer.
    let blocks: TensorScan.StoredBlocksReader? =
      arithmetic.isRounded
      ? nil
      : { starts, length, body in
        let types = try inputTypes.get()
        let buffers = types.map {
          UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, starts.count * length * $0.size), alignment: 64)
        }
        defer { for buffer in buffers { buffer.deallocate() } }
        for (input, (dtype, buffer)) in zip(inputs, zip(types, buffers)) {
          let parts = starts.map { ($0 * dtype.size)..<(($0 + length) * dtype.size) }
          try input.copyBytes(of: item.name, parts: parts, into: buffer)
        }
        try body(
          zip(buffers, types).map {
            Kernels.StoredElements(start: UnsafeRawPointer($0.0.baseAddress) ?? Kernels.noElements, dtype: $0.1)
          })
      }
    let release = { (elements: Range<Int>) throws -> Int in
      var bytes = 0
      for (input, dtype) in zip(inputs, try inputTypes.get()) {
        input.release(item.name, range: (elements.lowerBound * dtype.size)..<(elements.upperBound * dtype.size))
        bytes += elements.count * dtype.size
      }
      return bytes
    }
    return (read, stored, blocks, release)
  }

  /// A method that needs the whole model first (TIES's global trimming) gets it here: one scan
  /// per merged tensor, which it may pass over several times; it returns the method to merge with.
  static func preparedForModel(_ plan: MergePlan, inputs: [any Checkpoint]) throws -> MergePlan {
    guard let wide = plan.method as? any ModelWideMerge, let first = plan.items.first(where: { $0.action == .merge })
    else { return plan }
    let scans = plan.items.filter { $0.action == .merge }.map { item in
      let (read, stored, blocks, release) = rangeAccess(item, plan: plan, inputs: inputs)
      return TensorScan(
        ranges: MergeRanges.ranges(item.count), read: read, readStored: stored, readStoredBlocks: blocks
      ) { _ = try release($0) }
    }
    var prepared = plan
    prepared.method = try wide.prepared(scans, parameters: try plan.parameters(first.name))
    return prepared
  }

  /// Streams one tensor range by range: the method's statistics passes read the ranges in
  /// order; then the ranges are decoded from every input, merged and encoded in parallel, and
  /// appended in order, and the inputs' pages are released a batch of ranges at a time.
  /// `advance` gets the input bytes done. Returns false (writing nothing) when the method must
  /// merge this tensor whole.
  static func stream(
    _ item: MergePlan.Item, method: any StreamingMerge, plan: MergePlan, inputs: [any Checkpoint],
    writer: any TensorSink, advance: (Int) -> Void
  ) throws -> Bool {
    let parameters = try plan.parameters(item.name)
    let arithmetic = parameters.arithmetic
    let ranges = MergeRanges.ranges(item.count)
    let (read, stored, blocks, release) = rangeAccess(item, plan: plan, inputs: inputs)
    let scan = TensorScan(ranges: ranges, read: read, readStored: stored, readStoredBlocks: blocks) {
      _ = try release($0)
    }
    guard let merger = try method.prepare(tensor: item.name, shape: item.shape, parameters, scan: scan) else {
      return false
    }
    try writer.beginTensor(item.name)
    // Ranges are merged side by side and written in order by whoever finishes the next one, so
    // the write overlaps the following merges; a few ranges ahead of the writer at most. Input
    // pages are released a batch of ranges at a time.
    try Parallel.inOrder(
      ranges.count, budget: MergeRanges.inFlight,
      produce: { j -> TensorData in
        let elements = ranges[j]
        if let form = merger.weightedSum, !arithmetic.isRounded {
          return try weightedSum(form, item, elements, plan: plan)
        }
        if let storedMerge = merger.storedMerge, let stored {
          var merged: TensorData?
          try stored(elements) { merged = try storedMerge($0, elements, item.outputType) }
          if let merged { return merged }
        }
        let merged = arithmetic.round(try merger.merge(try read(elements)))
        return Tensor(shape: [elements.count], scalars: merged).encoded(as: item.outputType)
      },
      consume: { j, encoded in
        try writer.append(owned: encoded.bytes)
        if let batch = MergeRanges.completedBatch(ranges, at: j) { advance(try release(batch)) }
      })
    return true
  }

  /// A weighted-sum merge of one range computed straight from the inputs' stored bytes (the
  /// same bits as decoding each input to an array and merging it, without the arrays).
  static func weightedSum(_ form: WeightedSumForm, _ item: MergePlan.Item, _ elements: Range<Int>, plan: MergePlan)
    throws -> TensorData
  {
    let base = form.usesBase ? plan.base : nil
    if form.usesBase && base == nil { throw MergeError.baseRequired(method: form.method) }
    let inputs: [any Checkpoint] = (base.map { [$0] } ?? []) + plan.models
    let types = try inputs.map { try $0.info(item.name).dtype }
    let bytes = try withStoredElements(inputs, types, name: item.name, elements: elements) { stored in
      let models = Array(stored.dropFirst(base == nil ? 0 : 1))
      let size = elements.count * item.outputType.size
      return [UInt8](unsafeUninitializedCapacity: size) { buffer, initialized in
        Kernels.weightedSum(
          form.terms.map { $0.map { models[$0] } ?? stored[0] }, weights: form.weights, scale: form.scale,
          base: form.addsBase ? stored[0] : nil,
          subtractingBase: form.subtractsBase, count: elements.count, into: UnsafeMutableRawBufferPointer(buffer),
          as: item.outputType)
        initialized = size
      }
    }
    return TensorData(dtype: item.outputType, shape: [elements.count], bytes: bytes)
  }

  /// Calls `body` with every input's stored elements of `elements` (valid only inside `body`).
  static func withStoredElements<R>(
    _ inputs: [any Checkpoint], _ types: [DType], name: String, elements: Range<Int>,
    _ body: ([Kernels.StoredElements]) throws -> R
  ) throws -> R {
    func nest(_ i: Int, _ held: [Kernels.StoredElements]) throws -> R {
      guard i < inputs.count else { return try body(held) }
      let size = types[i].size
      return try inputs[i].withBytes(of: name, range: (elements.lowerBound * size)..<(elements.upperBound * size)) {
        bytes in
        try nest(
          i + 1, held + [Kernels.StoredElements(start: bytes.baseAddress ?? Kernels.noElements, dtype: types[i])])
      }
    }
    return try nest(0, [])
  }
}
