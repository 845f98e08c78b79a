import ArgumentParser
import Checkpoint
import Foundation
import Tensor

struct InspectCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "inspect",
    abstract:
      "List a checkpoint's tensors: name, dtype, shape, parameters, bytes (and stored bytes for .mkz, the rank of low-rank matrices)."
  )

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
      printInspectJSON(
        infos: infos, stored: stored, parameters: parameters, bytes: bytes, storedTotal: storedTotal, model)
      return
    }
    let nameWidth = max(4, infos.map(\.name.count).max() ?? 0)
    let showStored = storedTotal != nil
    var header = pad("name", nameWidth) + "  dtype    shape                parameters          bytes"
    if showStored { header += "         stored" }
    var out = header + "\n"
    for (info, s) in zip(infos, stored) {
      let shape = "[" + info.shape.map(String.init).joined(separator: ", ") + "]"
      out += pad(info.name, nameWidth) + "  " + pad(info.dtype.rawValue, 7) + "  " + pad(shape, 19)
      out += pad(String(info.count), 12, right: true) + "  " + pad(String(info.byteCount), 13, right: true)
      if let s { out += "  " + pad(String(s), 13, right: true) }
      if let rank = (model as? FactoredCheckpoint)?.rank(of: info.name) { out += "  low-rank \(rank)" }
      out += "\n"
      if out.utf8.count > 1 << 16 {
        print(out, terminator: "")
        out = ""
      }
    }
    print(out, terminator: "")
    var total = "\(infos.count) tensors, \(parameters) parameters, \(formatBytes(bytes))"
    if let factored = model as? FactoredCheckpoint {
      let count = infos.filter { factored.rank(of: $0.name) != nil }.count
      total += " (dense view; \(count) matrices stored as singular triplets)"
    }
    if let storedTotal, storedTotal > 0 {
      total += String(format: ", stored in %@ (%.3fx)", formatBytes(storedTotal), Double(bytes) / Double(storedTotal))
    }
    print(total)
  }

  /// The listing as JSON (keys sorted, as `printJSON` writes them), written row by row: a
  /// header of a million tensors must not become a million dictionaries first.
  private func printInspectJSON(
    infos: [TensorInfo], stored: [Int?], parameters: Int, bytes: Int, storedTotal: Int?, _ model: any Checkpoint
  ) {
    var out = "{\n  \"metadata\" : {"
    out += model.metadata.sorted { $0.key < $1.key }.map {
      "\n    \(jsonStringLiteral($0.key)) : \(jsonStringLiteral($0.value))"
    }
    .joined(separator: ",")
    out += model.metadata.isEmpty ? "},\n" : "\n  },\n"
    out += "  \"path\" : \(jsonStringLiteral(path)),\n  \"tensors\" : ["
    for (i, (info, s)) in zip(infos, stored).enumerated() {
      out += i == 0 ? "\n" : ",\n"
      out += "    {\"bytes\" : \(info.byteCount), \"dtype\" : \(jsonStringLiteral(info.dtype.rawValue)), "
      out += "\"name\" : \(jsonStringLiteral(info.name)), \"parameters\" : \(info.count), "
      if let rank = (model as? FactoredCheckpoint)?.rank(of: info.name) { out += "\"rank\" : \(rank), " }
      out += "\"shape\" : [" + info.shape.map(String.init).joined(separator: ", ") + "]"
      if let s { out += ", \"stored_bytes\" : \(s)" }
      out += "}"
      if out.utf8.count > 1 << 16 {
        print(out, terminator: "")
        out = ""
      }
    }
    out += infos.isEmpty ? "],\n" : "\n  ],\n"
    out += "  \"total_bytes\" : \(bytes),\n  \"total_parameters\" : \(parameters)"
    if let storedTotal { out += ",\n  \"total_stored_bytes\" : \(storedTotal)" }
    print(out + "\n}")
  }

  /// `text` padded with spaces to `width` characters, on the left with `right` (numbers).
  private func pad(_ text: String, _ width: Int, right: Bool = false) -> String {
    let fill = String(repeating: " ", count: max(0, width - text.count))
    return right ? fill + text : text + fill
  }

  private func storedBytes(_ model: any Checkpoint, _ name: String) -> Int? {
    if let file = model as? CompressedFile { return file.storedByteCount(of: name) }
    if let sharded = model as? ShardedCheckpoint, let shard = sharded.shard(of: name) {
      return storedBytes(shard, name)
    }
    return nil
  }
}
