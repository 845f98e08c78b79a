import ArgumentParser
import Foundation
import Recipe
import Tensor

struct RunCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "run",
    abstract: "Run a recipe (YAML): named inputs, steps whose results feed later steps, outputs.",
    discussion: """
      Also runs mergekit's own configuration files (merge_method, base_model, models with \
      parameters, parameters, dtype) unchanged for the methods both tools have; give the output \
      with -o, as mergekit-yaml takes it. See recipes/ for an example of every method.

      A step result that is not an output stays in memory within --memory, else it goes to a \
      temporary folder next to the first output; either is dropped once no later step reads it.
      """)

  @Argument(help: "The recipe or mergekit configuration file.")
  var recipe: String

  @Option(
    name: .shortAndLong,
    help: "Output path: required for a mergekit configuration; for a recipe with one output, overrides its path.")
  var output: String?

  @Flag(name: .customLong("dry-run"), help: "Check the recipe and print the steps in order without running them.")
  var dryRun = false

  @Option(
    help: ArgumentHelp(
      "Memory for intermediate results (e.g. 2GB, 0 to spill every one to a temporary file); default: an eighth of physical memory, at most 4 GiB.",
      valueName: "size"))
  var memory: String?

  @Flag(help: "Replace outputs that exist (each only after its new version is complete).")
  var overwrite = false

  @Flag(name: .shortAndLong, help: "No progress output.")
  var quiet = false

  func validate() throws {
    try requireExisting(recipe, "recipe")
    _ = try memoryBudget()
  }

  func memoryBudget() throws -> Int {
    guard let memory else { return RecipeRunner.defaultMemoryBudget }
    if memory.trimmingCharacters(in: .whitespaces) == "0" { return 0 }
    guard let bytes = parseByteSize(memory) else {
      throw ValidationError("invalid --memory '\(memory)' (examples: 2GB, 500MB, 0)")
    }
    return bytes
  }

  func run() throws {
    MemoryPolicy.reuseTensorMemory()
    let runner = try RecipeRunner(try Recipe.load(recipe, output: output))
    if !overwrite && !dryRun {
      for output in runner.recipe.outputs where FileManager.default.fileExists(atPath: output.path) {
        throw ValidationError("output '\(output.path)' already exists; pass --overwrite to replace it")
      }
    }
    var bars: [String: Progress] = [:]
    try runner.run(
      overwrite: overwrite, dryRun: dryRun, memoryBudget: try memoryBudget(),
      report: { line in if dryRun || !quiet { FileHandle.standardError.write(Data((line + "\n").utf8)) } },
      progress: { label, done, total in
        let bar = bars[label] ?? Progress(label, quiet: quiet)
        bars[label] = bar
        bar.update(done, total)
        if done == total { bar.finish() }
      })
  }
}
