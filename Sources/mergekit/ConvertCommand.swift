import ArgumentParser
import Checkpoint
import Foundation
import Operations
import Tensor

struct ConvertCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "convert",
    abstract:
      "Copy a checkpoint to another format, dtype or sharding, optionally selecting, dropping or renaming tensors.",
    discussion: """
      OUT ending in .safetensors or .mkz writes one file; any other OUT is a model folder (shards \
      plus index when --shard-size requires, and the input folder's config and tokenizer files). \
      With --base, an .mkz output stores every tensor the base also has (same dtype and shape) as \
      a lossless delta against it, and a delta-stored .mkz input is decoded against it.
      """)

  @Argument(help: "Input checkpoint (file or model folder).")
  var input: String

  @Argument(help: "Output: a .safetensors or .mkz file, or a folder.")
  var output: String

  @Option(help: "Output format: safetensors or mkz (default: from OUT's extension, else safetensors).")
  var format: String?

  @Option(help: "Cast floating-point tensors to bf16, f16, f32 or f64 (round to nearest even).")
  var dtype: String?

  @Option(help: "Base checkpoint for delta storage (.mkz output) or delta decoding (.mkz input).")
  var base: String?

  @Option(name: .customLong("shard-size"), help: "Largest shard of a folder output, e.g. 5GB or 500MB.")
  var shardSize: String?

  @Option(help: "Keep only tensors whose name matches this regular expression.")
  var select: String?

  @Option(help: "Drop tensors whose name matches this regular expression.")
  var drop: String?

  @Option(help: "Rename tensors: PATTERN=REPLACEMENT (regular expression, $1 for groups); repeatable.")
  var rename: [String] = []

  @Option(
    help: ArgumentHelp(
      "Keep these layer ranges, stacked and renumbered (config.json follows): START-END with END excluded, as mergekit's layer_range, comma-separated (0-8,4-12).",
      valueName: "ranges"))
  var layers: String?

  @Flag(help: "Replace OUT if it exists (only after the new output is complete).")
  var overwrite = false

  @Flag(name: .shortAndLong, help: "No progress output.")
  var quiet = false

  func validate() throws {
    try requireExisting(input, "input")
    if let base { try requireExisting(base, "base") }
    _ = try asUsage {
      try ConvertOperation.resolve(select: select, drop: drop, renames: rename, dtype: dtype, layers: layers)
    }
    try validateOutput(output, format: format, dtype: dtype, shardSize: shardSize, mayExist: overwrite)
    try asUsage { try ModelFolder.checkOutput(output, isNotAmong: [input] + (base.map { [$0] } ?? [])) }
  }

  func run() throws {
    let baseModel = try openBase(base)
    let resolved = try ConvertOperation.resolve(
      select: select, drop: drop, renames: rename, dtype: dtype, layers: layers)
    var source = try openCheckpoint(input, base: baseModel)
    if let ranges = resolved.layers { source = try ConvertOperation.stackingLayers(source, ranges) }
    let outputFormat =
      format.flatMap { CheckpointFormat(rawValue: $0.lowercased()) } ?? CheckpointFormat(
        pathExtension: URL(fileURLWithPath: output).pathExtension) ?? .safetensors
    let metadata = source.metadata
    var options = WriteOptions(
      format: outputFormat, shardSize: shardSize.flatMap(parseByteSize), metadata: metadata,
      deltaBase: outputFormat == .mkz ? baseModel : nil, copyFilesFrom: ModelFolder.modelFolder(of: input),
      overwrite: overwrite)
    if let ranges = resolved.layers,
      let config = try ConvertOperation.stackedConfig(of: ModelFolder.modelFolder(of: input), ranges)
    {
      options.files["config.json"] = config
    }
    let progress = Progress(ConvertOperation.name, quiet: quiet)
    try copyCheckpoint(
      from: source, to: output, selection: resolved.selection, castTo: resolved.dtype, options: options,
      progress: { progress.update($0, $1) })
    progress.finish()
  }
}
