import Checkpoint
import Foundation
import Merge
import Tensor

/// Runs a recipe: orders the steps by what they read (refusing cycles and undefined
/// references), runs each one streaming through `MergeRunner` (or a checkpoint copy for
/// `convert`), and writes the outputs. A step result that is not an output is spilled to a
/// temporary checkpoint next to the first output and deleted at the end.
public struct RecipeRunner {
  public let recipe: Recipe
  /// The steps in execution order.
  public let order: [Recipe.Step]

  /// Operations that are not merge methods.
  public static let commands = ["task-vector", "apply", "convert"] + NetworkSteps.operations

  public init(_ recipe: Recipe) throws {
    self.recipe = recipe
    let file = recipe.source
    let stepLabels = Dictionary(recipe.steps.map { ($0.label, $0) }, uniquingKeysWith: { first, _ in first })
    var seen = Set(recipe.inputs.map(\.label))
    for step in recipe.steps {
      guard seen.insert(step.label).inserted else {
        throw RecipeError.invalid(file: file, path: "\(step.location).name", line: nil, reason: "the label '\(step.label)' is used twice")
      }
      if !Self.commands.contains(step.operation) {
        do { _ = try MergeRegistry.method(named: step.operation) } catch {
          throw RecipeError.invalid(file: file, path: "\(step.location).method", line: nil, reason: "\(error) (or a command: \(Self.commands.joined(separator: ", ")))")
        }
      }
    }
    let inputLabels = Set(recipe.inputs.map(\.label))
    func check(_ reference: String, at path: String) throws {
      if inputLabels.contains(reference) || stepLabels[reference] != nil || FileManager.default.fileExists(atPath: reference) { return }
      throw RecipeError.invalid(file: file, path: path, line: nil, reason: "'\(reference)' is neither an input, a step nor an existing path")
    }
    for step in recipe.steps {
      if let base = step.base { try check(base, at: "\(step.location).base") }
      if let data = step.data { try check(data, at: "\(step.location).data") }
      for (i, model) in step.models.enumerated() { try check(model, at: "\(step.location).models[\(i)]") }
      if step.models.isEmpty && !["synthetic-data", "synthetic-tokens", "train"].contains(step.operation) {
        throw RecipeError.invalid(file: file, path: step.location, line: nil, reason: "the step names no models")
      }
    }
    for output in recipe.outputs { try check(output.label, at: output.location) }
    for input in recipe.inputs where !FileManager.default.fileExists(atPath: input.path) {
      throw RecipeError.invalid(file: file, path: "inputs.\(input.label)", line: nil, reason: "'\(input.path)' does not exist")
    }
    // Depth-first topological order; a step met again while being visited closes a cycle.
    var order: [Recipe.Step] = []
    var state: [String: Bool] = [:]  // false: visiting, true: done
    func visit(_ step: Recipe.Step, _ trail: [String]) throws {
      if state[step.label] == true { return }
      if state[step.label] == false { throw RecipeError.cycle(file: file, steps: trail.drop { $0 != step.label } + [step.label]) }
      state[step.label] = false
      for reference in (step.base.map { [$0] } ?? []) + (step.data.map { [$0] } ?? []) + step.models {
        if let dependency = stepLabels[reference] { try visit(dependency, trail + [step.label]) }
      }
      state[step.label] = true
      order.append(step)
    }
    for step in recipe.steps { try visit(step, []) }
    self.order = order
  }

  /// Runs every step; `report` receives a line per step and `progress` its byte progress.
  public func run(
    overwrite: Bool = false, dryRun: Bool = false, report: (String) -> Void = { _ in }, progress: ((String, Int, Int) -> Void)? = nil
  ) throws {
    let outputs = Dictionary(recipe.outputs.map { ($0.label, $0) }, uniquingKeysWith: { first, _ in first })
    let firstOutput = URL(fileURLWithPath: recipe.outputs[0].path).deletingLastPathComponent().path
    let work = "\(firstOutput)/.mergekit-run-\(getpid())"
    var paths = Dictionary(recipe.inputs.map { ($0.label, $0.path) }, uniquingKeysWith: { first, _ in first })
    if !dryRun {
      try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
      TemporaryOutputs.register(work)
    }
    defer {
      try? FileManager.default.removeItem(atPath: work)
      TemporaryOutputs.unregister(work)
    }
    for step in order {
      let destination = outputs[step.label]
      let path = destination?.path ?? "\(work)/\(NetworkSteps.operations.contains(step.operation) ? NetworkSteps.spillName(step) : step.label)"
      do {
        try runStep(step, paths: paths, output: destination, to: path, overwrite: overwrite, dryRun: dryRun, report: report, progress: progress)
      } catch let error as RecipeError {
        throw error
      } catch {
        throw RecipeError.stepFailed(file: recipe.source, path: step.location, step: step.label, reason: "\(error)")
      }
      paths[step.label] = path
    }
    // Outputs that are inputs (no step): copies with the output's format and dtype.
    for output in recipe.outputs where !order.contains(where: { $0.label == output.label }) {
      let source = try openCheckpoint(paths[output.label] ?? output.label)
      report("\(output.label): copy to \(output.path)")
      if dryRun { continue }
      try copyCheckpoint(
        from: source, to: output.path, castTo: output.dtype.flatMap { DType(userSpelling: $0) }, options: try writeOptions(output, overwrite: overwrite, copyFrom: paths[output.label]),
        progress: progress.map { p in { p(output.label, $0, $1) } })
    }
  }

  func reference(_ label: String, _ paths: [String: String]) -> String { paths[label] ?? label }

  func writeOptions(_ output: Recipe.Output?, overwrite: Bool, copyFrom: String?) throws -> WriteOptions {
    let format = try output?.format.map { name -> CheckpointFormat in
      guard let f = CheckpointFormat(rawValue: name.lowercased()) else {
        throw RecipeError.invalid(file: recipe.source, path: "\(output!.location).format", line: nil, reason: "unknown format '\(name)' (use safetensors or mkz)")
      }
      return f
    }
    var shardSize: Int?
    if let text = output?.shardSize {
      guard let size = WriteOptions.parseSize(text) else { throw RecipeError.invalid(file: recipe.source, path: "\(output!.location).shard_size", line: nil, reason: "invalid size '\(text)' (examples: 5GB, 500MB)") }
      shardSize = size
    }
    let named = output.flatMap { CheckpointFormat(pathExtension: URL(fileURLWithPath: $0.path).pathExtension) }
    var options = WriteOptions(format: format ?? named ?? .safetensors, shardSize: shardSize, overwrite: overwrite || output == nil)
    options.copyFilesFrom = copyFrom.flatMap(ModelFolder.modelFolder(of:))
    return options
  }

  func dtype(_ name: String?, at path: String) throws -> DType? {
    guard let name else { return nil }
    guard let type = DType(userSpelling: name), type.isFloatingPoint else {
      throw RecipeError.invalid(file: recipe.source, path: path, line: nil, reason: "unknown dtype '\(name)' (use bf16, f16, f32 or f64)")
    }
    return type
  }

  private func runStep(
    _ step: Recipe.Step, paths: [String: String], output: Recipe.Output?, to destination: String, overwrite: Bool, dryRun: Bool, report: (String) -> Void,
    progress: ((String, Int, Int) -> Void)?
  ) throws {
    if NetworkSteps.operations.contains(step.operation) {
      let reads = (step.data.map { [reference($0, paths)] } ?? []) + step.models.map { reference($0, paths) }
      report("\(step.label): \(step.operation)\(reads.isEmpty ? "" : " of " + reads.joined(separator: ", ")) -> \(destination)")
      if dryRun { return }
      try NetworkSteps.run(step, file: recipe.source, model: { reference($0, paths) }, to: destination, overwrite: overwrite || output == nil, report: report)
      return
    }
    let basePath = step.base.map { reference($0, paths) }
    let modelPaths = step.models.map { reference($0, paths) }
    let outputType = try dtype(output?.dtype, at: "\(output?.location ?? "").dtype") ?? dtype(step.dtype, at: "\(step.location).dtype")
    report("\(step.label): \(step.operation) of \(modelPaths.joined(separator: ", "))\(basePath.map { " on base \($0)" } ?? "") -> \(destination)")
    if dryRun { return }
    let base = try basePath.map { try openCheckpoint($0) }
    let models = try modelPaths.map { try openCheckpoint($0, base: base) }
    let options = try writeOptions(output, overwrite: overwrite, copyFrom: basePath ?? modelPaths[0])
    let report = progress.map { p in { (done: Int, total: Int) in p(step.label, done, total) } }
    if step.operation == "convert" {
      guard models.count == 1 else { throw RecipeError.invalid(file: recipe.source, path: step.location, line: nil, reason: "convert takes one model") }
      let selection = try TensorSelection(select: step.select, drop: step.drop, renames: step.renames)
      try copyCheckpoint(from: models[0], to: destination, selection: selection, castTo: outputType, options: options, progress: report)
      return
    }
    let method: any MergeMethod
    var type = outputType
    var metadata: [String: String] = [:]
    switch step.operation {
    case "task-vector":
      method = TaskVectors.Difference()
      type = type ?? .f32
      metadata = ["mergekit.kind": "task-vector"]
    case "apply": method = TaskVectors.Sum()
    default: method = try MergeRegistry.method(named: step.operation)
    }
    let plan = try MergePlan(method: method, base: base, models: models, global: step.global, perModel: step.perModel, outputType: type)
    var writeOptions = options
    writeOptions.metadata = metadata
    try MergeRunner.run(plan, to: destination, options: writeOptions, progress: report)
  }
}
