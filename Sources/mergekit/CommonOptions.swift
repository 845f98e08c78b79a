import ArgumentParser
import Checkpoint
import Foundation
import Tensor

/// Checks that a path to read exists (a usage error, exit 64, when it does not).
func requireExisting(_ path: String, _ what: String) throws {
  guard FileManager.default.fileExists(atPath: path) else { throw ValidationError("\(what) '\(path)' does not exist") }
}

/// Parses sizes such as `5GB`, `500MB`, `2GiB`, `1048576`.
func parseByteSize(_ text: String) -> Int? { WriteOptions.parseSize(text) }

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
