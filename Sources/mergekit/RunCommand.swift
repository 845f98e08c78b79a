import ArgumentParser
import Foundation
import Merge
import Recipe
import Tensor

struct RunCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "run",
    abstract: "Run a recipe (YAML): named inputs, steps whose results feed later steps, outputs.",
    discussion: """
      Also runs mergekit's own configuration files (merge_method, base_model, models or slices \
      with parameters, parameters, dtype) unchanged for the methods both tools have: \
      `mergekit run CONFIG OUT` takes mergekit-yaml's command line and flags. Parameters the \
      method does not declare are ignored with a warning, as mergekit ignores them (an error \
      with --strict). See recipes/ for an example of every method.

      A step result that is not an output stays in memory within --memory, else it goes to a \
      temporary folder next to the first output; either is dropped once no later step reads it.
      """)

  @Argument(help: "The recipe or mergekit configuration file.")
  var recipe: String

  @Argument(help: "Output path, as mergekit-yaml takes it (the same as -o).")
  var outputPath: String?

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

  @Flag(name: .shortAndLong, inversion: .prefixedNo, help: "No progress output.")
  var quiet = false

  @Flag(help: "Refuse (exit 64) parameters a mergekit configuration's method does not declare, instead of warning.")
  var strict = false

  // mergekit-yaml's flags, accepted with their meaning.
  @Flag(
    name: .customLong("copy-tokenizer"), inversion: .prefixedNo,
    help: "Copy the tokenizer files with the other model files (mergekit-yaml's default).")
  var copyTokenizer = true

  @Flag(
    name: .customLong("allow-crimes"), inversion: .prefixedNo,
    help: "Allow merging models of different architectures (as mergekit).")
  var allowCrimes = false

  @Flag(
    name: .customLong("unsafe-truncate-embeddings"), inversion: .prefixedNo,
    help:
      "Without tokenizer settings, cut embeddings and LM heads to the smallest vocabulary's rows, assuming equal token ids (mergekit's; tokenizer_source is the safe way)."
  )
  var unsafeTruncateEmbeddings = false

  @Option(
    name: .customLong("transformers-cache"),
    help: ArgumentHelp("Hugging Face cache folder that model ids are resolved in (as HF_HUB_CACHE).", valueName: "path")
  )
  var transformersCache: String?

  @Option(
    name: [.customLong("num-threads"), .customShort("j")],
    help: "Worker threads (default: every core; as MERGEKIT_THREADS). Results do not depend on it.")
  var numThreads: Int?

  @Option(
    name: .customLong("out-shard-size"),
    help: ArgumentHelp(
      "Largest output shard, mergekit's way: a count with K, M or B (thousand, million, billion bytes), e.g. 5B.",
      valueName: "size"))
  var outShardSize: String?

  @Option(
    help: ArgumentHelp(
      "exact (default: each merge computed exactly, rounded once) or mergekit (inputs cast to the configuration's dtype and every operation rounded to it, as mergekit's torch arithmetic does); overrides the recipe's compute key.",
      valueName: "mode"))
  var compute: String?

  @Option(
    name: .customLong("random-seed"), help: "Seed of the random methods (DARE ...), for every step that takes one.")
  var randomSeed: UInt64?

  @Flag(
    name: .customLong("lazy-unpickle"), inversion: .prefixedNo,
    help: "Accepted for mergekit-yaml; inputs are always streamed.")
  var lazyUnpickle = false

  @Flag(
    name: .customLong("low-cpu-memory"), inversion: .prefixedNo,
    help: "Accepted for mergekit-yaml; memory is always bounded.")
  var lowCPUMemory = false

  @Flag(
    name: .customLong("clone-tensors"), inversion: .prefixedNo,
    help: "Accepted for mergekit-yaml; every output tensor is written from its own bytes.")
  var cloneTensors = false

  @Flag(
    name: .customLong("safe-serialization"), inversion: .prefixedNo,
    help: "Write safetensors (the default and the only format written; --no-safe-serialization is refused).")
  var safeSerialization = true

  @Flag(
    name: .customLong("async-write"), inversion: .prefixedNo,
    help: "Accepted for mergekit-yaml; writing overlaps merging already.")
  var asyncWrite = false

  @Option(name: .customLong("write-threads"), help: "Accepted for mergekit-yaml (shards are written in order).")
  var writeThreads: Int?

  @Option(
    name: .customLong("lora-merge-cache"),
    help: ArgumentHelp("Accepted for mergekit-yaml; LoRA-on-base model references are not read yet.", valueName: "path")
  )
  var loraMergeCache: String?

  @Option(
    name: .customLong("lora-merge-dtype"),
    help: ArgumentHelp(
      "Accepted for mergekit-yaml; LoRA-on-base model references are not read yet.", valueName: "dtype"))
  var loraMergeDType: String?

  @Flag(
    name: .customLong("write-model-card"), inversion: .prefixedNo,
    help: "Write a model card (README.md) and mergekit_config.yml into a merge's output (the default).")
  var writeModelCard = true

  @Flag(
    name: .customLong("trust-remote-code"), inversion: .prefixedNo,
    help: "Accepted for mergekit-yaml; no code from a model is ever run.")
  var trustRemoteCode = false

  @Flag(name: .shortAndLong, help: "Accepted for mergekit-yaml (repeatable); the steps are always reported.")
  var verbose: Int

  @Flag(
    name: .customLong("cuda"), inversion: .prefixedNo, help: "Accepted for mergekit-yaml; the merge runs on the CPU.")
  var cuda = false

  @Flag(name: .customLong("gpu-rich"), help: "Accepted for mergekit-yaml; the merge runs on the CPU.")
  var gpuRich = false

  @Flag(
    name: .customLong("read-to-gpu"), inversion: .prefixedNo,
    help: "Accepted for mergekit-yaml; the merge runs on the CPU.")
  var readToGPU = false

  @Flag(
    name: .customLong("multi-gpu"), inversion: .prefixedNo,
    help: "Accepted for mergekit-yaml; the merge runs on the CPU.")
  var multiGPU = false

  @Option(help: "Accepted for mergekit-yaml (cpu, cuda, auto ...); the merge runs on the CPU.")
  var device: String?

  func validate() throws {
    try requireExisting(recipe, "recipe")
    _ = try memoryBudget()
    if let output, let outputPath, output != outputPath {
      throw ValidationError("the output is given twice ('\(outputPath)' and -o '\(output)'); give it once")
    }
    if !safeSerialization {
      throw ValidationError(
        "--no-safe-serialization would write PyTorch pickles; outputs are always safetensors (or .mkz)")
    }
    if let numThreads, numThreads < 1 { throw ValidationError("--num-threads must be at least 1") }
    if let outShardSize, Self.mergekitSize(outShardSize) == nil {
      throw ValidationError("invalid --out-shard-size '\(outShardSize)' (examples: 5B, 500M, 1000000000)")
    }
  }

  /// mergekit's sizes: an integer with an optional K, M or B suffix (10^3, 10^6, 10^9).
  static func mergekitSize(_ text: String) -> Int? {
    let trimmed = text.trimmingCharacters(in: .whitespaces).uppercased()
    let factors: [Character: Double] = ["K": 1e3, "M": 1e6, "B": 1e9]
    let factor = trimmed.last.flatMap { factors[$0] } ?? 1
    let digits = factors[trimmed.last ?? " "] == nil ? trimmed : String(trimmed.dropLast())
    guard let value = Double(digits), value > 0, let bytes = Int(exactly: (value * factor).rounded(.down)), bytes > 0
    else { return nil }
    return bytes
  }

  /// The recipe with the command line's mergekit-yaml settings applied: output shard size and
  /// the random seed of every step (or slice merge) whose method takes one and was not given it.
  func adjusted(_ loaded: Recipe) throws -> Recipe {
    var recipe = loaded
    recipe.truncatesEmbeddings = unsafeTruncateEmbeddings
    if let compute {
      guard ["exact", "mergekit"].contains(compute) else {
        throw ValidationError("invalid --compute '\(compute)' (use exact or mergekit)")
      }
      recipe.compute = compute
    }
    if let outShardSize, let bytes = Self.mergekitSize(outShardSize) {
      for i in recipe.outputs.indices { recipe.outputs[i].shardSize = String(bytes) }
    }
    if let randomSeed {
      let seed = ParameterValue.number(Double(randomSeed))
      for i in recipe.steps.indices where recipe.steps[i].global["seed"] == nil {
        if let method = try? MergeRegistry.method(named: recipe.steps[i].operation),
          method.parameters.contains(where: { $0.name == "seed" })
        {
          recipe.steps[i].global["seed"] = seed
        }
      }
      if let sliced = recipe.slicedMerge, sliced.global["seed"] == nil,
        sliced.method.parameters.contains(where: { $0.name == "seed" })
      {
        recipe.slicedMerge?.global["seed"] = seed
      }
    }
    return recipe
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
    // Before anything reads them: the worker count and the cache model ids resolve in.
    if let numThreads { setenv("MERGEKIT_THREADS", String(numThreads), 1) }
    if let transformersCache { setenv("HF_HUB_CACHE", transformersCache, 1) }
    MemoryPolicy.reuseTensorMemory()
    let loaded = try adjusted(try Recipe.load(recipe, output: output ?? outputPath))
    func note(_ line: String) { FileHandle.standardError.write(Data((line + "\n").utf8)) }
    if !loaded.warnings.isEmpty {
      if strict {
        throw RecipeError.unreadable(
          file: recipe, reason: loaded.warnings.joined(separator: "\n") + " (refused: --strict)")
      }
      for warning in loaded.warnings { note("warning: \(recipe): \(warning), and so does this run") }
    }
    if cuda || gpuRich || readToGPU || multiGPU || (device.map { $0 != "cpu" } ?? false) {
      note(
        "note: the GPU flags (--cuda, --gpu-rich, --read-to-gpu, --multi-gpu, --device) are accepted; the merge runs on the CPU"
      )
    }
    var runner = try RecipeRunner(loaded)
    for path in runner.vocabulary?.assumed ?? [] {
      note("warning: \(path) has no tokenizer.json; its vocabulary is taken to be the base's, as mergekit does")
    }
    runner.copiesTokenizer = copyTokenizer
    runner.writesModelCard = writeModelCard
    if loaded.isMergekitConfiguration, !allowCrimes, let mixed = runner.mixedArchitectures() {
      throw RecipeError.invalid(
        file: recipe, path: loaded.slicedMerge == nil ? "models" : "slices", line: nil,
        reason:
          "the models have different architectures (\(mixed.joined(separator: ", "))); pass --allow-crimes to merge them anyway, as mergekit asks"
      )
    }
    if !overwrite && !dryRun {
      for output in runner.recipe.outputs where FileManager.default.fileExists(atPath: output.path) {
        throw ValidationError("output '\(output.path)' already exists; pass --overwrite to replace it")
      }
    }
    var bars: [String: Progress] = [:]
    let results = try runner.run(
      overwrite: overwrite, dryRun: dryRun, memoryBudget: try memoryBudget(),
      report: { line in if dryRun || !quiet { FileHandle.standardError.write(Data((line + "\n").utf8)) } },
      progress: { label, done, total in
        let bar = bars[label] ?? Progress(label, quiet: quiet)
        bars[label] = bar
        bar.update(done, total)
        if done == total { bar.finish() }
      })
    // The comparison the recipe exists for, on stdout (the steps' reports go to stderr).
    results.forEach { print($0) }
  }
}
