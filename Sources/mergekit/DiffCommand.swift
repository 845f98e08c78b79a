import ArgumentParser
import Checkpoint
import Foundation
import Tensor

struct DiffCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "diff",
    abstract: "Compare two checkpoints tensor by tensor: max abs difference, relative Frobenius difference, cosine.",
    discussion: """
      Relative Frobenius difference is |A - B| / |A|. Tensors present in only one checkpoint and \
      shape mismatches are listed; tensors with the same shape but different dtypes are compared by \
      value and their dtypes shown.
      """)

  @Argument(help: "First checkpoint (the reference).")
  var a: String

  @Argument(help: "Second checkpoint.")
  var b: String

  @Option(help: "Base checkpoint for delta-stored .mkz inputs.")
  var base: String?

  @Flag(help: "Print JSON instead of a table.")
  var json = false

  func validate() throws {
    try requireExisting(a, "checkpoint")
    try requireExisting(b, "checkpoint")
    if let base { try requireExisting(base, "base") }
  }

  func run() throws {
    let baseModel = try openBase(base)
    let left = try openCheckpoint(a, base: baseModel)
    let right = try openCheckpoint(b, base: baseModel)
    let rightNames = Set(right.tensors.map(\.name))
    var rows: [(name: String, maxAbs: Double, relativeFrobenius: Double, cosine: Double, dtypes: String?)] = []
    var mismatches: [String] = []
    for info in left.tensors {
      guard let other = right.lookup(info.name) else {
        mismatches.append("only in A: \(info.name)")
        continue
      }
      guard other.shape == info.shape else {
        mismatches.append("shape differs: \(info.name) \(info.shape) vs \(other.shape)")
        continue
      }
      let stats = try TensorDifference.compare(left, right, info, other)
      let dtypes = other.dtype != info.dtype ? "\(info.dtype.rawValue) vs \(other.dtype.rawValue)" : nil
      rows.append((info.name, Double(stats.maxAbs), Double(stats.relativeFrobenius), Double(stats.cosine), dtypes))
    }
    for info in right.tensors where left.lookup(info.name) == nil && rightNames.contains(info.name) {
      mismatches.append("only in B: \(info.name)")
    }
    if json {
      let tensors = rows.map { row -> [String: Any] in
        var json: [String: Any] = [
          "name": row.name, "max_abs": row.maxAbs, "relative_frobenius": row.relativeFrobenius, "cosine": row.cosine,
        ]
        if let dtypes = row.dtypes { json["dtypes"] = dtypes }
        return json
      }
      try printJSON(["tensors": tensors, "mismatches": mismatches])
      return
    }
    let width = max(4, rows.map(\.name.count).max() ?? 0)
    print("name".padding(toLength: width, withPad: " ", startingAt: 0) + "       max_abs   rel_frobenius      cosine")
    for row in rows {
      var line = row.name.padding(toLength: width, withPad: " ", startingAt: 0)
      line += String(format: "  %12.6g  %14.6g  %10.7f", row.maxAbs, row.relativeFrobenius, row.cosine)
      if let dtypes = row.dtypes { line += "  (\(dtypes))" }
      print(line)
    }
    for line in mismatches { print(line) }
    let identical = rows.filter { $0.maxAbs == 0 }.count
    print("\(rows.count) tensors compared, \(identical) identical, \(mismatches.count) mismatches")
  }
}

/// Streaming comparison of two same-shape tensors (values decoded to Float, sums in Double).
enum TensorDifference {
  struct Stats {
    var maxAbs = 0.0
    var relativeFrobenius = 0.0
    var cosine = 1.0
  }

  static func compare(_ left: any Checkpoint, _ right: any Checkpoint, _ a: TensorInfo, _ b: TensorInfo) throws -> Stats
  {
    let piece = 1 << 20
    var x = [Float](repeating: 0, count: piece)
    var y = [Float](repeating: 0, count: piece)
    var (maxAbs, diff2, a2, b2, dot) = (0.0, 0.0, 0.0, 0.0, 0.0)
    var start = 0
    while start < a.count {
      let n = min(piece, a.count - start)
      try left.withBytes(of: a.name, range: (start * a.dtype.size)..<((start + n) * a.dtype.size)) { bytes in
        x.withUnsafeMutableBufferPointer {
          DTypeConversion.decode(bytes, from: a.dtype, into: UnsafeMutableBufferPointer(rebasing: $0[0..<n]))
        }
      }
      try right.withBytes(of: b.name, range: (start * b.dtype.size)..<((start + n) * b.dtype.size)) { bytes in
        y.withUnsafeMutableBufferPointer {
          DTypeConversion.decode(bytes, from: b.dtype, into: UnsafeMutableBufferPointer(rebasing: $0[0..<n]))
        }
      }
      for i in 0..<n {
        let (p, q) = (Double(x[i]), Double(y[i]))
        let d = p - q
        maxAbs = max(maxAbs, abs(d))
        diff2 += d * d
        a2 += p * p
        b2 += q * q
        dot += p * q
      }
      start += n
    }
    var stats = Stats(maxAbs: maxAbs)
    stats.relativeFrobenius = a2 > 0 ? (diff2 / a2).squareRoot() : (diff2 > 0 ? .infinity : 0)
    stats.cosine = a2 > 0 && b2 > 0 ? dot / (a2 * b2).squareRoot() : (a2 == b2 ? 1 : 0)
    return stats
  }
}
