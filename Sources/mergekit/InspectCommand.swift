import ArgumentParser
import Checkpoint
import Foundation
import Tensor

struct InspectCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "inspect",
    abstract: "List a checkpoint's tensors: name, dtype, shape, parameters, bytes (and stored bytes for .mkz).")

  @Argument(help: "A .safetensors or .mkz file, a shard index, or a model folder.")
  var path: String

  @Flag(help: "Print JSON instead of a table.")
  var json = false

  @Option(help: "Only tensors whose name matches this regular expression.")
  var select: String?

  func validate() throws { try requireExisting(path, "checkpoint") }

  func run() throws {
    let model = try openCheckpoint(path)
    let selection = try TensorSelection(select: select)
    let infos = model.tensors.filter { selection.keeps($0.name) }
    let stored = infos.map { storedBytes(model, $0.name) }
    let parameters = infos.reduce(0) { $0 + $1.count }
    let bytes = infos.reduce(0) { $0 + $1.byteCount }
    let storedTotal = stored.allSatisfy { $0 != nil } ? stored.reduce(0) { $0 + ($1 ?? 0) } : nil
    if json {
      var rows: [[String: Any]] = []
      for (info, s) in zip(infos, stored) {
        var row: [String: Any] = [
          "name": info.name, "dtype": info.dtype.rawValue, "shape": info.shape, "parameters": info.count,
          "bytes": info.byteCount,
        ]
        if let s { row["stored_bytes"] = s }
        rows.append(row)
      }
      var summary: [String: Any] = [
        "path": path, "tensors": rows, "total_parameters": parameters, "total_bytes": bytes, "metadata": model.metadata,
      ]
      if let storedTotal { summary["total_stored_bytes"] = storedTotal }
      try printJSON(summary)
      return
    }
    let nameWidth = max(4, infos.map(\.name.count).max() ?? 0)
    let showStored = storedTotal != nil
    var header =
      "name".padding(toLength: nameWidth, withPad: " ", startingAt: 0)
      + "  dtype    shape                parameters          bytes"
    if showStored { header += "         stored" }
    print(header)
    for (info, s) in zip(infos, stored) {
      let shape = "[" + info.shape.map(String.init).joined(separator: ", ") + "]"
      var line =
        info.name.padding(toLength: nameWidth, withPad: " ", startingAt: 0) + "  "
        + info.dtype.rawValue.padding(toLength: 7, withPad: " ", startingAt: 0)
      line +=
        "  " + shape.padding(toLength: 19, withPad: " ", startingAt: 0)
        + String(format: "%12d  %13d", info.count, info.byteCount)
      if let s { line += String(format: "  %13d", s) }
      print(line)
    }
    var total = "\(infos.count) tensors, \(parameters) parameters, \(formatBytes(bytes))"
    if let storedTotal, storedTotal > 0 {
      total += String(format: ", stored in %@ (%.3fx)", formatBytes(storedTotal), Double(bytes) / Double(storedTotal))
    }
    print(total)
  }

  private func storedBytes(_ model: any Checkpoint, _ name: String) -> Int? {
    if let file = model as? CompressedFile { return file.storedByteCount(of: name) }
    if let sharded = model as? ShardedCheckpoint, let shard = sharded.shard(of: name) {
      return storedBytes(shard, name)
    }
    return nil
  }
}
