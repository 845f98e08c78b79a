import Checkpoint
import Foundation
import Nets
import Tensor

/// The activation-statistics file `mergekit stats` writes and `zip` reads: a safetensors file
/// with, for every activation point, `<point>.count` (i64 [1]), `<point>.sum` (f64 [width]) and
/// `<point>.products` (f64 [width, width]); with two models, each point's rows are the two
/// models' features side by side.
public enum StatsFiles {
  /// Writes the statistics, with what they were made from in the metadata.
  public static func write(
    _ statistics: [(name: String, stats: FeatureStatistics)], to path: String, metadata: [String: String],
    overwrite: Bool
  ) throws {
    var entries: [(TensorInfo, TensorData)] = []
    for (name, s) in statistics {
      let count = TensorData(
        dtype: .i64, shape: [1], bytes: [Int64(s.count).littleEndian].withUnsafeBytes { Array($0) })
      entries.append((TensorInfo(name: name + ".count", dtype: .i64, shape: [1]), count))
      entries.append(
        (TensorInfo(name: name + ".sum", dtype: .f64, shape: [s.width]), TensorData(doubles: s.sum, shape: [s.width])))
      entries.append(
        (
          TensorInfo(name: name + ".products", dtype: .f64, shape: [s.width, s.width]),
          TensorData(doubles: s.products, shape: [s.width, s.width])
        ))
    }
    let options = WriteOptions(
      format: .safetensors, metadata: metadata.merging(["mergekit.kind": "activation-statistics"]) { $1 },
      overwrite: overwrite)
    let writer = try CheckpointWriter(destination: path, tensors: entries.map(\.0), options: options)
    for (info, bytes) in entries { try writer.write(info.name, bytes) }
    try writer.finish()
  }

  /// The joint statistics of every merge point `layers.{i}.hidden` (`points` of them) of
  /// `models` models, as `mergekit stats MODELS... --at 'hidden$'` writes them.
  public static func mergePoints(_ path: String, points: Int, models: Int) throws -> [FeatureStatistics] {
    let file = try openCheckpoint(path)
    return try (0..<points).map { p in
      let name = "layers.\(p).hidden"
      guard file.lookup(name + ".products") != nil, let count = try file.tensor(named: name + ".count").scalars.first
      else {
        throw CheckpointError.badDataFile(
          file: path,
          reason:
            "no statistics of '\(name)'; make them with mergekit stats \(models == 2 ? "A B" : "MODELS...") --at 'hidden$'"
        )
      }
      let sum = try file.read(name + ".sum").doubles()
      let products = try file.read(name + ".products").doubles()
      guard sum.count * sum.count == products.count, sum.count % models == 0, count >= 0, count < 1e15 else {
        throw CheckpointError.badDataFile(
          file: path, reason: "statistics of '\(name)' do not hold \(models) models' features side by side")
      }
      return FeatureStatistics(count: Int(count), sum: sum, products: products)
    }
  }
}
