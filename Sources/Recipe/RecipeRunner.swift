import Checkpoint
import Foundation
import Merge
import Operations
import Tensor

/// Runs a recipe: checks every step (operation, inputs, every parameter's kind and range) and
/// every output before anything runs, orders the steps by what they read (refusing cycles and
/// undefined references), runs each one streaming through `MergeRunner` (or a checkpoint copy for
/// `convert`), and writes the outputs. A step result that is not an output is kept in memory
/// when it fits the memory budget, else spilled to a temporary checkpoint next to the first
/// output; either is dropped once no later step reads it.
public struct RecipeRunner {
  public let recipe: Recipe
  /// Whether outputs take the tokenizer files of the model their other files come from
  /// (mergekit's `--copy-tokenizer`, the default).
  public var copiesTokenizer = true
  /// Whether merge outputs get a generated model card (mergekit's `--write-model-card`, the
  /// default); the inputs' own cards are never copied either way.
  public var writesModelCard = true
  /// How the inputs' vocabulary tensors are aligned to the output's tokenizer (a mergekit
  /// configuration with `tokenizer_source` or `tokenizer:`), or nil.
  public let vocabulary: VocabularyAlignment?
  /// The steps in execution order.
  public let order: [Recipe.Step]

  /// Operations that are not merge methods: the streamed ones run here, the others come from
  /// `OperationRegistry`.
  public static let commands =
    [ConvertOperation.name]
    + OperationRegistry.streamed.map(\.name).filter { name in !MergeRegistry.methods.contains { $0.name == name } }
    + OperationRegistry.operations.map(\.name)

  public init(_ recipe: Recipe) throws {
    self.recipe = recipe
    vocabulary = try Self.alignment(recipe)
    if let sliced = recipe.slicedMerge {
      order = []
      try checkSliced(sliced)
      return
    }
    let file = recipe.source
    let stepLabels = Dictionary(recipe.steps.map { ($0.label, $0) }, uniquingKeysWith: { first, _ in first })
    var seen = Set(recipe.inputs.map(\.label))
    for step in recipe.steps {
      guard seen.insert(step.label).inserted else {
        throw RecipeError.invalid(
          file: file, path: "\(step.location).name", line: nil, reason: "the label '\(step.label)' is used twice")
      }
      guard Recipe.isIdentifier(step.label) else {
        throw RecipeError.invalid(
          file: file, path: "\(step.location).name", line: nil,
          reason: "'\(step.label)' is not a name: \(Recipe.identifierRule)")
      }
      if OperationRegistry.operation(named: step.operation) == nil
        && OperationRegistry.streamed(named: step.operation) == nil && step.operation != ConvertOperation.name
      {
        let known = MergeRegistry.methods.map(\.name)
        throw RecipeError.invalid(
          file: file, path: "\(step.location).method", line: nil,
          reason:
            "unknown method '\(step.operation)'; merge methods: \(known.joined(separator: ", ")); other operations: \(Self.commands.joined(separator: ", "))"
        )
      }
    }
    let inputLabels = Set(recipe.inputs.map(\.label))
    func check(_ reference: String, at path: String) throws {
      if inputLabels.contains(reference) || stepLabels[reference] != nil
        || HubCache.exists(reference)
      {
        return
      }
      throw RecipeError.invalid(
        file: file, path: path, line: nil, reason: "'\(reference)' is neither an input, a step nor an existing path")
    }
    for step in recipe.steps {
      if let base = step.base { try check(base, at: "\(step.location).base") }
      if let data = step.data { try check(data, at: "\(step.location).data") }
      for (i, model) in step.models.enumerated() { try check(model, at: "\(step.location).models[\(i)]") }
      if step.models.isEmpty && (OperationRegistry.operation(named: step.operation)?.inputs.models.lowerBound ?? 1) > 0
      {
        throw RecipeError.invalid(file: file, path: step.location, line: nil, reason: "the step names no models")
      }
    }
    for output in recipe.outputs { try check(output.label, at: output.location) }
    try Self.checkOutputs(recipe)
    for input in recipe.inputs where !HubCache.exists(input.path) {
      throw RecipeError.invalid(
        file: file, path: "inputs.\(input.label)", line: nil, reason: "'\(input.path)' does not exist")
    }
    // Depth-first topological order; a step met again while being visited closes a cycle.
    var order: [Recipe.Step] = []
    var state: [String: Bool] = [:]  // false: visiting, true: done
    func visit(_ step: Recipe.Step, _ trail: [String]) throws {
      if state[step.label] == true { return }
      if state[step.label] == false {
        throw RecipeError.cycle(file: file, steps: trail.drop { $0 != step.label } + [step.label])
      }
      state[step.label] = false
      for reference in step.references {
        if let dependency = stepLabels[reference] { try visit(dependency, trail + [step.label]) }
      }
      state[step.label] = true
      order.append(step)
    }
    for step in recipe.steps { try visit(step, []) }
    self.order = order
    for step in recipe.steps { try validate(step) }
    for output in recipe.outputs {
      _ = try writeOptions(output, overwrite: true, copyFilesFrom: nil)
      _ = try dtype(output.dtype, at: "\(output.location).dtype")
    }
    for step in recipe.steps { try planFromInputs(step, stepLabels: Set(stepLabels.keys)) }
  }

  /// A merge step that reads only the recipe's inputs (no earlier step) is planned now, from the
  /// files' headers: missing tensors, differing shapes or a coefficient file that does not fit
  /// are refused before any step runs, naming the step.
  func planFromInputs(_ step: Recipe.Step, stepLabels: Set<String>) throws {
    guard let operation = OperationRegistry.streamed(named: step.operation),
      !step.references.contains(where: stepLabels.contains)
    else { return }
    let paths = Dictionary(recipe.inputs.map { ($0.label, $0.path) }) { first, _ in first }
    do {
      let base = try step.base.map { try aligned(openCheckpoint(paths[$0] ?? $0), path: paths[$0] ?? $0) }
      let models = try step.models.map {
        try aligned(openCheckpoint(paths[$0] ?? $0, base: base), path: paths[$0] ?? $0)
      }
      let method = try operation.method(files: operation.filePaths(step.global), base: base, models: models.count)
      _ = try MergePlan(
        method: method, base: base, models: models, global: operation.methodParameters(step.global),
        perModel: step.perModel,
        allowMissing: step.allowMissing)
    } catch let error as RecipeError {
      throw error
    } catch {
      throw RecipeError.stepFailed(file: recipe.source, path: step.location, step: step.label, reason: "\(error)")
    }
  }

  /// Two outputs with one path, or an output that is also an input, would lose data or feed a
  /// later step the new result instead of the input.
  static func checkOutputs(_ recipe: Recipe) throws {
    var written: [String: String] = [:]
    let inputs =
      recipe.inputs.map(\.path) + recipe.steps.flatMap(\.references).filter(FileManager.default.fileExists(atPath:))
    for output in recipe.outputs {
      let path = URL(fileURLWithPath: output.path).standardizedFileURL.path
      if let other = written[path] {
        throw RecipeError.invalid(
          file: recipe.source, path: output.location, line: nil,
          reason: "'\(output.path)' is also the path of output \(other); each output needs its own path")
      }
      do { try ModelFolder.checkOutput(output.path, isNotAmong: inputs) } catch {
        throw RecipeError.invalid(
          file: recipe.source, path: output.location, line: nil,
          reason:
            "'\(output.path)' is also read by the recipe (or holds or lies in what it reads); write the output elsewhere"
        )
      }
      written[path] = output.label
    }
  }

  /// Checks one step as far as it can be checked without its inputs' contents: the operation's
  /// inputs and every parameter (kind, range, required ones, rules between them). Errors name
  /// the YAML path of the parameter.
  func validate(_ step: Recipe.Step) throws {
    let file = recipe.source
    func invalid(_ path: String, _ line: Int?, _ reason: String) -> RecipeError {
      .invalid(file: file, path: path, line: line, reason: reason)
    }
    if let operation = OperationRegistry.operation(named: step.operation) {
      if let i = step.perModel.firstIndex(where: { !$0.isEmpty }) {
        throw invalid(
          "\(step.modelsLocation)[\(i)].parameters", nil,
          "\(operation.name) takes no per-model parameters; give them under parameters")
      }
      do {
        _ = try prepare(operation, step, paths: { $0 }, output: spillPath(step, operation, folder: "."))
      } catch let error as OperationError {
        if let name = error.parameter {
          throw invalid(step.parameterPath(name), step.parameterLine(name), error.reason)
        }
        throw invalid(step.location, nil, error.message { "parameter '\($0)'" })
      }
      return
    }
    if step.operation == ConvertOperation.name {
      guard step.models.count == 1 else { throw invalid(step.location, nil, "convert takes one model") }
      _ = try convertSettings(step)
      return
    }
    _ = try dtype(step.dtype, at: "\(step.location).dtype")
    let operation = try streamed(step)
    if operation.name == StreamedOperation.taskVector.name {
      do { _ = try LowRankTaskVector.rule(step.global) } catch let error as OperationError {
        throw invalid(step.parametersLocation, nil, error.reason)
      }
    }
    if let search = step.alphaSearch {
      let at = "\(step.location).alpha_search"
      guard step.data != nil else { throw invalid(at, nil, "alpha_search needs 'data' (the validation data)") }
      do { _ = try AlphaSearch.grid(search) } catch let error as OperationError { throw invalid(at, nil, error.reason) }
      guard operation.parameters.contains(where: { $0.name == "alpha" }) else {
        throw invalid(at, nil, "\(operation.name) has no alpha parameter (tsv, iso-c and iso-cts do)")
      }
      guard step.global["alpha"] == nil else {
        throw invalid(step.parameterPath("alpha"), step.parameterLine("alpha"), "give alpha or alpha_search, not both")
      }
    } else if step.data != nil {
      throw invalid("\(step.location).data", nil, "a merge step reads data only to choose its alpha (alpha_search)")
    }
    do {
      try operation.checkParameters(
        hasBase: step.base != nil, modelCount: step.models.count, global: step.global, perModel: step.perModel)
      for (name, path) in operation.filePaths(step.global) where !FileManager.default.fileExists(atPath: path) {
        throw invalid(step.parameterPath(name), step.parameterLine(name), "'\(path)' does not exist")
      }
    } catch let error as OperationError {
      let name = error.parameter ?? ""
      throw invalid(step.parameterPath(name), step.parameterLine(name), error.reason)
    } catch let error as MergeError {
      let reason: String
      let label: String
      switch error {
      case .unknownParameter(let method, let name, let known):
        (label, reason) = (
          name,
          "\(method) has no parameter '\(Self.parameterName(name).0)'; it takes \(known.isEmpty ? "none" : known.joined(separator: ", "))"
        )
      case .invalidParameter(let method, let name, _, let why): (label, reason) = (name, "\(method): \(why)")
      case .missingParameter(let method, let name, let help):
        (label, reason) = (name, "\(method): is required (\(help))")
      default: throw invalid(step.location, nil, "\(error)")
      }
      let (key, model) = Self.parameterName(label)
      throw invalid(step.parameterPath(key, model: model), step.parameterLine(key, model: model), reason)
    }
  }

  /// A convert step's selection and cast: `select`, `drop`, `rename` and `dtype` as step keys or
  /// under `parameters` (not both), checked by `ConvertOperation` as the CLI's flags are.
  func convertSettings(_ step: Recipe.Step) throws -> ConvertOperation.Resolved {
    func invalid(_ name: String, _ reason: String) -> RecipeError {
      let asParameter = step.global[name] != nil
      return RecipeError.invalid(
        file: recipe.source, path: asParameter ? step.parameterPath(name) : "\(step.location).\(name)",
        line: asParameter ? step.parameterLine(name) : nil, reason: reason)
    }
    let known = ConvertOperation.parameters.map(\.name)
    if let unknown = step.global.keys.sorted().first(where: { !known.contains($0) }) {
      throw invalid(unknown, "convert has no parameter '\(unknown)'; it takes \(known.joined(separator: ", "))")
    }
    func text(_ name: String, _ key: String?) throws -> String? {
      switch (key, step.global[name]) {
      case (_?, _?): throw invalid(name, "given both as a step key and under parameters; give it once")
      case (let key?, nil): return key
      case (nil, .text(let value)?): return value
      case (nil, .number(let x)?): return ParameterSpec.Kind.plain(x)
      case (nil, nil): return nil
      case (nil, let other?): throw invalid(name, "'\(other)' is not text")
      }
    }
    let renames = step.renames + (try text("rename", nil).map { [$0] } ?? [])
    do {
      return try ConvertOperation.resolve(
        select: try text("select", step.select), drop: try text("drop", step.drop), renames: renames,
        dtype: try text("dtype", step.dtype), layers: try text("layers", step.layers))
    } catch let error as OperationError {
      throw invalid(error.parameter ?? "", error.reason)
    }
  }

  /// A resolver label (`density (model 2)`) as the parameter name and 0-based model index.
  static func parameterName(_ label: String) -> (String, Int?) {
    guard let open = label.range(of: " (model "), label.hasSuffix(")"),
      let n = Int(label[open.upperBound...].dropLast())
    else { return (label, nil) }
    return (String(label[..<open.lowerBound]), n - 1)
  }

  /// The streamed operation of a step (a merge method, task-vector, apply or atlas-apply).
  func streamed(_ step: Recipe.Step) throws -> StreamedOperation {
    guard let operation = OperationRegistry.streamed(named: step.operation) else {
      throw RecipeError.invalid(
        file: recipe.source, path: "\(step.location).method", line: nil, reason: "unknown method '\(step.operation)'")
    }
    return operation
  }

  /// Where a registered operation's result goes when it is not an output: data sets and
  /// reports need their file extension.
  func spillPath(_ step: Recipe.Step, _ operation: any MergekitOperation, folder: String) -> String {
    if let output = recipe.outputs.first(where: { $0.label == step.label }) { return output.path }
    switch operation.output {
    case .file(let ext): return "\(folder)/\(step.label).\(ext)"
    case .report: return "\(folder)/\(step.label).json"
    case .model: return "\(folder)/\(step.label)"
    }
  }

  /// The operation's request for a step, with references turned into paths by `paths`.
  func prepare(_ operation: any MergekitOperation, _ step: Recipe.Step, paths: (String) -> String, output: String)
    throws -> OperationRequest
  {
    var parameters = step.global
    for spec in operation.parameters where spec.kind == .inputPath {
      if case .text(let reference)? = parameters[spec.name] { parameters[spec.name] = .text(paths(reference)) }
    }
    return try operation.prepare(
      models: step.models.map(paths), base: step.base.map(paths), data: step.data.map(paths), output: output,
      parameters: parameters, modelNames: step.models)
  }

  /// Default memory for intermediates kept in memory: an eighth of physical memory, at most 4 GiB.
  public static let defaultMemoryBudget = min(4 << 30, Int(ProcessInfo.processInfo.physicalMemory / 8))

  /// Runs every step; `report` receives a line per step and `progress` its byte progress.
  /// A step result that is not an output stays in memory while the intermediates held stay
  /// within `memoryBudget` bytes and no network step (which reads model folders) uses it;
  /// otherwise it is spilled to a temporary folder next to the first output. Each is dropped
  /// once the last step that reads it is done.
  /// Returns the results table of the recipe's `eval` steps (`summary`), empty without any.
  @discardableResult
  public func run(
    overwrite: Bool = false, dryRun: Bool = false, memoryBudget: Int = RecipeRunner.defaultMemoryBudget,
    report: (String) -> Void = { _ in },
    progress: ((String, Int, Int) -> Void)? = nil
  ) throws -> [String] {
    if let sliced = recipe.slicedMerge {
      try runSliced(sliced, overwrite: overwrite, dryRun: dryRun, report: report, progress: progress)
      return []
    }
    let outputs = Dictionary(recipe.outputs.map { ($0.label, $0) }, uniquingKeysWith: { first, _ in first })
    let firstOutput = URL(fileURLWithPath: recipe.outputs[0].path).deletingLastPathComponent().path
    let work = TemporaryOutputs.path(for: "\(firstOutput)/recipe-steps")
    var results = Results(
      paths: Dictionary(recipe.inputs.map { ($0.label, $0.path) }, uniquingKeysWith: { first, _ in first }))
    if !dryRun {
      try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
      TemporaryOutputs.register(work)
    }
    defer {
      try? FileManager.default.removeItem(atPath: work)
      TemporaryOutputs.unregister(work)
    }
    var readers: [String: Int] = [:]
    var readByNetworkSteps = Set<String>()
    for step in order {
      for label in Set(references(step)) {
        readers[label, default: 0] += 1
        if OperationRegistry.operation(named: step.operation) != nil { readByNetworkSteps.insert(label) }
      }
    }
    var evaluations: [(step: Recipe.Step, report: [String: Any])] = []
    for step in order {
      let destination = outputs[step.label]
      let path =
        OperationRegistry.operation(named: step.operation).map { spillPath(step, $0, folder: work) } ?? destination?
        .path ?? "\(work)/\(step.label)"
      let canStayInMemory = destination == nil && !readByNetworkSteps.contains(step.label)
      do {
        let held = try runStep(
          step, results: results, output: destination, to: path,
          memory: canStayInMemory ? memoryBudget - results.heldBytes : 0, overwrite: overwrite,
          dryRun: dryRun, report: report, progress: progress
        ) { json in evaluations.append((step, json)) }
        if let held {
          results.held[step.label] = held
        } else if !dryRun || destination != nil {
          results.paths[step.label] = path
        }
      } catch let error as RecipeError {
        throw error
      } catch {
        throw RecipeError.stepFailed(file: recipe.source, path: step.location, step: step.label, reason: "\(error)")
      }
      for label in Set(references(step)) {
        readers[label, default: 1] -= 1
        guard readers[label] == 0 else { continue }
        results.held[label] = nil
        if let spilled = results.paths[label], spilled.hasPrefix(work + "/") {
          try? FileManager.default.removeItem(atPath: spilled)
        }
      }
    }
    // Outputs that are inputs (no step): copies with the output's format and dtype.
    for output in recipe.outputs where !order.contains(where: { $0.label == output.label }) {
      let source = try openCheckpoint(results.paths[output.label] ?? output.label)
      report("\(output.label): copy to \(output.path)")
      if dryRun { continue }
      try copyCheckpoint(
        from: source, to: output.path, castTo: output.dtype.flatMap { DType(userSpelling: $0) },
        options: try writeOptions(
          output, overwrite: overwrite, copyFilesFrom: results.paths[output.label].flatMap(ModelFolder.modelFolder(of:))
        ),
        progress: progress.map { p in { p(output.label, $0, $1) } })
    }
    return Self.summary(evaluations)
  }

  /// What a step reads: its base, data and models, and the path parameters of a registered
  /// operation that name an input or step (`validation: test-data`).
  func references(_ step: Recipe.Step) -> [String] {
    guard let operation = OperationRegistry.operation(named: step.operation) else { return step.references }
    let labels = Set(recipe.inputs.map(\.label) + recipe.steps.map(\.label))
    let extra = operation.parameters.filter { $0.kind == .inputPath }.compactMap { spec -> String? in
      if case .text(let reference)? = step.global[spec.name], labels.contains(reference) { return reference }
      return nil
    }
    return step.references + extra
  }

  /// Where each input and step result is: a path, or a checkpoint held in memory.
  struct Results {
    var paths: [String: String]
    var held: [String: MemoryCheckpoint] = [:]

    var heldBytes: Int { held.values.reduce(0) { $0 + $1.byteCount } }

    /// How a reference reads in messages.
    func name(_ label: String) -> String { held[label]?.path ?? paths[label] ?? label }

    func open(_ label: String, base: (any Checkpoint)? = nil) throws -> any Checkpoint {
      if let checkpoint = held[label] { return checkpoint }
      return try openCheckpoint(paths[label] ?? label, base: base)
    }

    /// The model folder whose config and tokenizer files a result derived from `label` takes.
    func modelFolder(_ label: String) -> String? {
      if let checkpoint = held[label] { return checkpoint.modelFolder }
      return ModelFolder.modelFolder(of: paths[label] ?? label)
    }
  }

  /// The write options an output asks for (format, shard size), taking non-tensor files from
  /// the model folder `copyFilesFrom`.
  func writeOptions(_ output: Recipe.Output?, overwrite: Bool, copyFilesFrom: String?) throws -> WriteOptions {
    let location = output?.location ?? "outputs"
    let format = try output?.format.map { name -> CheckpointFormat in
      guard let f = CheckpointFormat(rawValue: name.lowercased()) else {
        throw RecipeError.invalid(
          file: recipe.source, path: "\(location).format", line: nil,
          reason: "unknown format '\(name)' (use safetensors or mkz)")
      }
      return f
    }
    var shardSize: Int?
    if let text = output?.shardSize {
      guard let size = WriteOptions.parseSize(text) else {
        throw RecipeError.invalid(
          file: recipe.source, path: "\(location).shard_size", line: nil,
          reason: "invalid size '\(text)' (examples: 5GB, 500MB)")
      }
      shardSize = size
    }
    let named = output.flatMap { CheckpointFormat(pathExtension: URL(fileURLWithPath: $0.path).pathExtension) }
    var options = WriteOptions(
      format: format ?? named ?? .safetensors, shardSize: shardSize, copyFilesFrom: copyFilesFrom,
      overwrite: overwrite || output == nil)
    var tokenizerFolder = copyFilesFrom
    if output != nil, let vocabulary {
      if vocabulary.buildsTokenizer {
        // mergekit writes the tokenizer it built whatever --copy-tokenizer says.
        options.skippedFiles = ModelFolder.tokenizerFiles
        options.files.merge(try tokenizerFiles(vocabulary)) { $1 }
        tokenizerFolder = vocabulary.tokenizerFolder
      } else if !copiesTokenizer {
        options.skippedFiles = ModelFolder.tokenizerFiles
        tokenizerFolder = nil
      }
      if let folder = copyFilesFrom, let config = try InputFile.jsonObject(folder + "/config.json") {
        options.files["config.json"] = try VocabularyAlignment.json(vocabulary.outputConfig(config))
      }
    } else if !copiesTokenizer {
      options.skippedFiles = ModelFolder.tokenizerFiles
      tokenizerFolder = nil
    }
    if output != nil, let setting = recipe.chatTemplate,
      let template = ChatTemplates.resolve(setting, models: recipe.inputs.map(\.path))
    {
      let written = options.files["tokenizer_config.json"].flatMap {
        (try? JSONSerialization.jsonObject(with: $0)) as? [String: Any]
      }
      let config = try written ?? tokenizerFolder.flatMap { try InputFile.jsonObject($0 + "/tokenizer_config.json") }
      options.files.merge(ChatTemplates.files(template, tokenizerConfig: config)) { $1 }
    }
    return options
  }

  /// `options` with the model card of a merge into `output` (models named by their input paths,
  /// the recipe's text as the configuration).
  func withCard(_ options: WriteOptions, output: String, method: any MergeMethod, base: String?, models: [String])
    -> WriteOptions
  {
    guard writesModelCard else {
      var options = options
      options.skippedFiles.formUnion(ModelCard.replacedFiles)
      return options
    }
    let paths = Dictionary(recipe.inputs.map { ($0.label, $0.path) }) { first, _ in first }
    return ModelCard.adding(
      to: options, output: output, method: method, base: base.map { paths[$0] ?? $0 },
      models: models.map { paths[$0] ?? $0 }, configuration: recipe.text ?? "", isYAML: recipe.text != nil)
  }

  /// How the recipe's merges compute: exactly, or with mergekit's rounding to the compute dtype
  /// (a mergekit configuration's `dtype`, else the step's `dtype`, else each tensor's own).
  func compute(dtype step: String?, at path: String) throws -> MergePlan.Compute {
    guard recipe.compute == "mergekit" else { return .exact }
    return .mergekit(dtype: try dtype(recipe.computeDType ?? step, at: path))
  }

  func dtype(_ name: String?, at path: String) throws -> DType? {
    guard let name else { return nil }
    guard let type = DType(userSpelling: name), type.isFloatingPoint else {
      throw RecipeError.invalid(
        file: recipe.source, path: path, line: nil, reason: "unknown dtype '\(name)' (use bf16, f16, f32 or f64)")
    }
    return type
  }

  /// Runs one step into `destination`, or into memory (returned) when its result fits `memory` bytes.
  private func runStep(
    _ step: Recipe.Step, results: Results, output: Recipe.Output?, to destination: String, memory: Int, overwrite: Bool,
    dryRun: Bool,
    report: (String) -> Void, progress: ((String, Int, Int) -> Void)?, evaluated: ([String: Any]) -> Void
  ) throws -> MemoryCheckpoint? {
    if let operation = OperationRegistry.operation(named: step.operation) {
      // Steps are named by their labels; a result that is no output is just "intermediate".
      let reads = references(step)
      report(
        "\(step.label): \(operation.name)\(reads.isEmpty ? "" : " of " + reads.joined(separator: ", ")) -> "
          + (output == nil ? "intermediate" : destination))
      if dryRun { return nil }
      let request = try prepare(operation, step, paths: { results.paths[$0] ?? $0 }, output: destination)
      let result = try operation.run(request, context: OperationContext(overwrite: overwrite || output == nil))
      result.lines.forEach { report("  " + $0) }
      if step.operation == "eval", let json = result.json { evaluated(json) }
      return nil
    }
    let convert = step.operation == ConvertOperation.name ? try convertSettings(step) : nil
    let outputType =
      try dtype(output?.dtype, at: "\(output?.location ?? "").dtype") ?? convert?.dtype
      ?? dtype(step.dtype, at: "\(step.location).dtype")
    let described =
      "\(step.label): \(step.operation) of \(step.models.map(results.name).joined(separator: ", "))\(step.base.map { " on base \(results.name($0))" } ?? "")"
    func reportStep(_ target: String) { report("\(described) -> \(target)") }
    if dryRun {
      reportStep(output == nil ? "intermediate (in memory when small, else a temporary file)" : destination)
      return nil
    }
    let base = try step.base.map { try aligned(results.open($0), path: results.name($0)) }
    let models = try step.models.map { try aligned(results.open($0, base: base), path: results.name($0)) }
    let modelFolder = results.modelFolder(step.base ?? step.models[0])
    let label = "step '\(step.label)' (in memory)"
    let stepProgress = progress.map { p in { (done: Int, total: Int) in p(step.label, done, total) } }
    if let convert {
      guard models.count == 1 else {
        throw RecipeError.invalid(
          file: recipe.source, path: step.location, line: nil, reason: "convert takes one model")
      }
      var held: MemoryCheckpointWriter?
      var source = models[0]
      var config: Data?
      if let ranges = convert.layers {
        source = try ConvertOperation.stackingLayers(source, ranges)
        config = try ConvertOperation.stackedConfig(of: modelFolder, ranges)
      }
      try copyCheckpoint(from: source, selection: convert.selection, castTo: outputType, progress: stepProgress) {
        tensors, layout in
        // A result held in memory takes its config.json from its source's folder, so a
        // re-layered one (its layer count changed) is written out with its own.
        if config == nil && tensors.reduce(0, { $0 + $1.byteCount }) <= memory {
          reportStep("memory")
          let writer = MemoryCheckpointWriter(name: label, tensors: tensors, layout: layout, modelFolder: modelFolder)
          held = writer
          return writer
        }
        reportStep(destination)
        var options = try writeOptions(output, overwrite: overwrite, copyFilesFrom: modelFolder)
        options.layout = layout
        if let config { options.files["config.json"] = config }
        return try CheckpointWriter(destination: destination, tensors: tensors, options: options)
      }
      return held?.checkpoint
    }
    let operation = try streamed(step)
    let method = try operation.method(files: operation.filePaths(step.global), base: base, models: models.count)
    let metadata = operation.kind.map { ["mergekit.kind": $0] } ?? [:]
    if operation.name == StreamedOperation.taskVector.name, let rule = try LowRankTaskVector.rule(step.global),
      let base
    {
      reportStep(destination)
      var options = try writeOptions(output, overwrite: overwrite, copyFilesFrom: modelFolder)
      options.metadata = metadata
      options.skippedFiles.formUnion(ModelCard.replacedFiles)
      _ = try LowRankTaskVector.write(
        finetuned: models[0], base: base, rule: rule, to: destination, options: options, progress: stepProgress)
      return nil
    }
    var global = operation.methodParameters(step.global)
    if let search = step.alphaSearch, let data = step.data, let folder = modelFolder {
      let (points, best) = try AlphaSearch.run(
        method: method, base: base, models: models, global: global, perModel: step.perModel,
        grid: try AlphaSearch.grid(search), data: results.paths[data] ?? data, config: folder + "/config.json")
      for point in points {
        report("  alpha \(point.alpha.formatted()): \(point.score.label) \(point.score.formatted)")
      }
      report("  best alpha \(best.alpha.formatted()): \(best.score.label) \(best.score.formatted)")
      global["alpha"] = .number(best.alpha)
    } else if step.alphaSearch != nil {
      throw RecipeError.invalid(
        file: recipe.source, path: "\(step.location).alpha_search", line: nil,
        reason: "the merged network needs a config.json, and \(step.base ?? step.models[0]) has no model folder")
    }
    var plan = try MergePlan(
      method: method, base: base, models: models, global: global,
      perModel: step.perModel,
      outputType: outputType ?? operation.defaultDType, allowMissing: step.allowMissing)
    plan.compute = try compute(dtype: step.dtype, at: "\(step.location).dtype")
    if plan.bytesWritten <= memory {
      reportStep("memory")
      let held = MemoryCheckpointWriter(
        name: label, tensors: MergeRunner.outputTensors(plan), metadata: metadata, layout: plan.reference.files,
        modelFolder: modelFolder)
      try MergeRunner.run(plan, into: held, progress: stepProgress)
      return held.checkpoint
    }
    reportStep(destination)
    var options = try writeOptions(output, overwrite: overwrite, copyFilesFrom: modelFolder)
    options.metadata = metadata
    if output != nil, let mergeMethod = try? MergeRegistry.method(named: step.operation) {
      options = withCard(options, output: destination, method: mergeMethod, base: step.base, models: step.models)
    }
    try MergeRunner.run(plan, to: destination, options: options, progress: stepProgress)
    return nil
  }
}

// MARK: - mergekit slices

extension RecipeRunner {
  /// Checks a `slices:` configuration before anything runs: its structure, every parameter of
  /// every slice and source, the inputs, the output, and the plan from the inputs' headers
  /// (layers that exist, tensors and shapes that agree).
  func checkSliced(_ sliced: SlicedMerge) throws {
    let file = recipe.source
    do { try sliced.check() } catch let error as OperationError {
      throw RecipeError.invalid(file: file, path: "slices", line: nil, reason: error.reason)
    }
    for (i, slice) in sliced.slices.enumerated() {
      let (_, models) = sliced.roles(slice)
      do {
        try ParameterResolver(
          method: sliced.method.name, specs: sliced.method.parameters,
          global: sliced.global.merging(slice.parameters) { $1 },
          models: models.map { slice.sources[$0].parameters }, positions: LayerPositions(layerCount: 0)
        ).checkValues()
      } catch let error as MergeError {
        throw RecipeError.invalid(file: file, path: "slices[\(i)]", line: nil, reason: "\(error)")
      }
    }
    for input in recipe.inputs where !HubCache.exists(input.path) {
      throw RecipeError.invalid(file: file, path: "slices", line: nil, reason: "'\(input.path)' does not exist")
    }
    try Self.checkOutputs(recipe)
    let output = recipe.outputs[0]
    _ = try writeOptions(output, overwrite: true, copyFilesFrom: nil)
    do {
      _ = try sliced.plans(outputType: try dtype(output.dtype, at: "dtype")) {
        try aligned(openCheckpoint($0), path: $0)
      }
    } catch let error as RecipeError {
      throw error
    } catch {
      throw RecipeError.stepFailed(file: file, path: "slices", step: output.label, reason: "\(error)")
    }
  }

  /// Runs a `slices:` configuration into its output: the merged tensors in output order and the
  /// config.json of the base (or first source) with the output's layer count.
  func runSliced(
    _ sliced: SlicedMerge, overwrite: Bool, dryRun: Bool, report: (String) -> Void,
    progress: ((String, Int, Int) -> Void)?
  ) throws {
    let output = recipe.outputs[0]
    var opened: [String: any Checkpoint] = [:]
    let compute = try compute(dtype: nil, at: "dtype")
    let plans = try sliced.plans(outputType: try dtype(output.dtype, at: "dtype")) { path in
      if let checkpoint = opened[path] { return checkpoint }
      let checkpoint = try aligned(openCheckpoint(path), path: path)
      opened[path] = checkpoint
      return checkpoint
    }
    .map { plan in
      var plan = plan
      plan.compute = compute
      return plan
    }
    let tensors = plans.reduce(0) { $0 + $1.items.count }
    report(
      "\(output.label): \(sliced.method.name) over \(sliced.slices.count) slice\(sliced.slices.count == 1 ? "" : "s"), "
        + "\(sliced.layerCount) layers, \(tensors) tensors -> \(output.path)")
    if dryRun { return }
    let source = sliced.base ?? sliced.slices[0].sources[0].model
    var options = withCard(
      try writeOptions(output, overwrite: overwrite, copyFilesFrom: ModelFolder.modelFolder(of: source)),
      output: output.path, method: sliced.method, base: sliced.base,
      models: recipe.inputs.map(\.path).filter { $0 != sliced.base })
    let config = try sliced.outputConfig { path in
      try ModelFolder.modelFolder(of: path).flatMap { try InputFile.jsonObject($0 + "/config.json") }
    }
    if let config {
      options.files["config.json"] = config
      if let vocabulary, let object = (try? JSONSerialization.jsonObject(with: config)) as? [String: Any] {
        options.files["config.json"] = try VocabularyAlignment.json(vocabulary.outputConfig(object))
      }
    }
    do {
      try SlicedMerge.run(
        plans, to: output.path, options: options, progress: progress.map { p in { p(output.label, $0, $1) } })
    } catch {
      throw RecipeError.stepFailed(file: recipe.source, path: "slices", step: output.label, reason: "\(error)")
    }
  }
}

extension RecipeRunner {
  /// The vocabulary alignment a mergekit configuration's tokenizer settings ask for, or nil.
  /// Throws `RecipeError.invalid` naming `tokenizer_source` when a tokenizer cannot be read.
  static func alignment(_ recipe: Recipe) throws -> VocabularyAlignment? {
    let base = recipe.slicedMerge?.base ?? recipe.steps.first?.base
    var inputs = recipe.inputs.map(\.path)
    if let base, let index = inputs.firstIndex(of: base) { inputs.insert(inputs.remove(at: index), at: 0) }
    do {
      guard let settings = recipe.tokenizer else {
        guard recipe.truncatesEmbeddings else { return nil }
        return try VocabularyAlignment.truncating(inputs: inputs) { try openCheckpoint($0) }
      }
      return try VocabularyAlignment(settings: settings, base: base, inputs: inputs) { try openCheckpoint($0) }
    } catch let error as OperationError {
      throw RecipeError.invalid(file: recipe.source, path: "tokenizer_source", line: nil, reason: error.reason)
    }
  }

  /// `checkpoint` (input `path`) as the merge reads it: with its vocabulary tensors aligned to
  /// the output's tokenizer when the configuration asks for it.
  func aligned(_ checkpoint: any Checkpoint, path: String) throws -> any Checkpoint {
    guard let vocabulary, let index = vocabulary.inputs.firstIndex(of: path) else { return checkpoint }
    do { return try vocabulary.view(of: checkpoint, input: index) } catch let error as OperationError {
      throw RecipeError.invalid(file: recipe.source, path: "tokenizer_source", line: nil, reason: error.reason)
    }
  }

  /// The output's tokenizer files, with messages naming `tokenizer_source`.
  func tokenizerFiles(_ vocabulary: VocabularyAlignment) throws -> [String: Data] {
    do { return try vocabulary.tokenizerFiles() } catch let error as OperationError {
      throw RecipeError.invalid(file: recipe.source, path: "tokenizer_source", line: nil, reason: error.reason)
    }
  }

  /// The architectures of the recipe's inputs when their config.json files disagree
  /// (`architectures`, else `model_type`): mergekit refuses such a merge unless asked with
  /// `--allow-crimes`. Nil when they agree or say nothing.
  public func mixedArchitectures() -> [String]? {
    var seen: [String] = []
    for input in recipe.inputs {
      guard let folder = ModelFolder.modelFolder(of: input.path),
        let config = try? InputFile.jsonObject(folder + "/config.json")
      else { continue }
      let name = (config["architectures"] as? [String])?.first ?? (config["model_type"] as? String)
      if let name, !seen.contains(name) { seen.append(name) }
    }
    return seen.count > 1 ? seen : nil
  }
}

extension RecipeRunner {
  /// The table a recipe with `eval` steps ends with: per step, the model evaluated and its
  /// scores (accuracy, joint accuracy and each task's accuracy for classifiers; loss and
  /// perplexity for language models), so that the comparison the recipe exists for is read at
  /// a glance.
  static func summary(_ evaluations: [(step: Recipe.Step, report: [String: Any])]) -> [String] {
    guard !evaluations.isEmpty else { return [] }
    func percent(_ value: Any?) -> String { (value as? Double).map { String(format: "%.2f%%", $0 * 100) } ?? "-" }
    let classifiers = evaluations.filter { $0.report["accuracy"] != nil }
    let models = evaluations.filter { $0.report["perplexity"] != nil }
    var lines = ["results:"]
    func table(_ header: [String], _ rows: [[String]]) {
      let widths = header.indices.map { i in ([header[i]] + rows.map { $0[i] }).map(\.count).max() ?? 0 }
      func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, cell in
          i < 2
            ? cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
            : String(repeating: " ", count: widths[i] - cell.count) + cell
        }.joined(separator: "  ")
      }
      lines.append("  " + line(header))
      lines += rows.map { "  " + line($0) }
    }
    if !classifiers.isEmpty {
      let tasks = Set(
        classifiers.flatMap { ($0.report["tasks"] as? [[String: Any]] ?? []).compactMap { $0["task"] as? Int } }
      )
      .sorted()
      // Per task: accuracy within the task's own classes (the papers' per-task, task-aware
      // accuracy), and their mean.
      let several = tasks.count > 1
      table(
        ["step", "model", "accuracy"] + (several ? ["joint", "mean of tasks"] + tasks.map { "task \($0)" } : []),
        classifiers.map { step, report in
          let perTask = report["tasks"] as? [[String: Any]] ?? []
          let within = tasks.map { t in perTask.first { $0["task"] as? Int == t }?["accuracy_within_task"] as? Double }
          let known = within.compactMap { $0 }
          let mean = known.isEmpty ? nil : known.reduce(0, +) / Double(known.count)
          return [step.label, step.models.first ?? "", percent(report["accuracy"])]
            + (several ? [percent(report["joint_accuracy"]), percent(mean)] + within.map { percent($0) } : [])
        })
      if several { lines.append("  (task columns: accuracy within each task's own classes)") }
    }
    if !models.isEmpty {
      table(
        ["step", "model", "loss", "perplexity"],
        models.map { step, report in
          [
            step.label, step.models.first ?? "", (report["loss"] as? Double).map { String(format: "%.4f", $0) } ?? "-",
            (report["perplexity"] as? Double).map { String(format: "%.3f", $0) } ?? "-",
          ]
        })
    }
    return lines
  }
}
