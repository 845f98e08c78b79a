import ArgumentParser
import Checkpoint
import Foundation
import Tensor

/// Checks that a path to read exists (a usage error, exit 64, when it does not).
func requireExisting(_ path: String, _ what: String) throws {
  guard FileManager.default.fileExists(atPath: path) else { throw ValidationError("\(what) '\(path)' does not exist") }
}

/// Parses sizes such as `5GB`, `500MB`, `2GiB`, `1048576` (decimal units as Hugging Face uses them).
func parseByteSize(_ text: String) -> Int? {
  let units: [(String, Double)] = [("KIB", 1024), ("MIB", 1_048_576), ("GIB", 1_073_741_824), ("TIB", 1_099_511_627_776), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12), ("K", 1e3), ("M", 1e6), ("G", 1e9), ("B", 1)]
  let upper = text.uppercased().trimmingCharacters(in: .whitespaces)
  for (suffix, factor) in units where upper.hasSuffix(suffix) {
    guard let value = Double(upper.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)), value > 0 else { return nil }
    return Int(value * factor)
  }
  guard let value = Int(upper), value > 0 else { return nil }
  return value
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
