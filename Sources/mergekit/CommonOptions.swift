import ArgumentParser
import Checkpoint
import Foundation
import Tensor

/// Checks that a path to read exists (a usage error, exit 64, when it does not).
func requireExisting(_ path: String, _ what: String) throws {
  guard HubCache.exists(path) else {
    if HubCache.parse(path) != nil {
      throw ValidationError(CheckpointError.notCached(id: path, cache: HubCache.root).description)
    }
    throw ValidationError("\(what) '\(path)' does not exist")
  }
}

/// Refuses to replace an existing output unless `--overwrite` was given (a usage error, exit 64).
func requireNewOutput(_ output: String, overwrite: Bool) throws {
  if !overwrite && FileManager.default.fileExists(atPath: output) {
    throw ValidationError("'\(output)' already exists; pass --overwrite to replace it")
  }
}

/// Parses sizes such as `5GB`, `500MB`, `2GiB`, `1048576`.
func parseByteSize(_ text: String) -> Int? { WriteOptions.parseSize(text) }

/// Checks the output flags shared by every command that writes a checkpoint (usage errors,
/// exit 64): known format and dtype, a valid shard size, an extension that agrees with
/// `--format`, shards only for folders, and no silent replacement of an existing output.
func validateOutput(_ output: String, format: String?, dtype: String?, shardSize: String?, mayExist: Bool) throws {
  if let format, CheckpointFormat(rawValue: format.lowercased()) == nil {
    throw ValidationError("unknown --format '\(format)' (use safetensors or mkz)")
  }
  if let dtype, DType(userSpelling: dtype)?.isFloatingPoint != true {
    throw ValidationError("unknown --dtype '\(dtype)' (use bf16, f16, f32 or f64)")
  }
  if let shardSize, parseByteSize(shardSize) == nil {
    throw ValidationError("invalid --shard-size '\(shardSize)' (examples: 5GB, 500MB, 1048576)")
  }
  let named = CheckpointFormat(pathExtension: URL(fileURLWithPath: output).pathExtension)
  if let named, let format, named.rawValue != format.lowercased() {
    throw ValidationError("output '\(output)' is a .\(named.fileExtension) file but --format is \(format)")
  }
  if named != nil && shardSize != nil { throw ValidationError("--shard-size needs a folder output, not a single file") }
  try requireNewOutput(output, overwrite: mayExist)
}

/// Human-readable byte count (decimal units).
func formatBytes(_ bytes: Int) -> String {
  let units = ["B", "kB", "MB", "GB", "TB"]
  var value = Double(bytes)
  var unit = 0
  while value >= 1000 && unit < units.count - 1 {
    value /= 1000
    unit += 1
  }
  return unit == 0 ? "\(bytes) B" : String(format: "%.2f %@", value, units[unit])
}

/// Opens the base checkpoint named by `--base`, if any.
func openBase(_ path: String?) throws -> (any Checkpoint)? {
  try path.map { try openCheckpoint($0) }
}

/// Writes a JSON value to stdout, pretty-printed with sorted keys.
func printJSON(_ value: Any) throws {
  let data = try JSONSerialization.data(withJSONObject: value, options: [.prettyPrinted, .sortedKeys])
  print(String(decoding: data, as: UTF8.self))
}

/// Runs a check inside `validate()`: ArgumentParser wraps what `validate` throws, so a usage
/// error of the libraries (a parameter out of range) is turned into a `ValidationError` here to
/// keep its exit status 64 and its flag-naming message.
func asUsage<T>(_ check: () throws -> T) throws -> T {
  do { return try check() } catch {
    guard let message = usageMessage(error) else { throw error }
    throw ValidationError(message)
  }
}
