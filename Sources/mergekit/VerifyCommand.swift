import ArgumentParser
import Checkpoint

struct VerifyCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "verify",
    abstract: "Validate a checkpoint's structure and every checksum; exit 1 naming the first bad tensor or chunk.")

  @Argument(help: "A .safetensors or .mkz file, a shard index, or a model folder.")
  var path: String

  @Option(help: "The base a delta-stored .mkz was written against (also checks the tensor digests of delta tensors).")
  var base: String?

  @Flag(name: .shortAndLong, help: "No progress output.")
  var quiet = false

  func validate() throws {
    try requireExisting(path, "checkpoint")
    if let base { try requireExisting(base, "base") }
  }

  func run() throws {
    let model = try openCheckpoint(path, base: try openBase(base))
    let progress = Progress("verify", quiet: quiet)
    try model.verify(progress: { progress.update($0, $1) })
    progress.finish()
    print("OK: \(path): \(model.tensors.count) tensors, \(formatBytes(model.totalByteCount)) verified")
  }
}
