import Foundation
import Tensor

/// Opens any supported checkpoint: a `.safetensors` or `.mkz` file, a shard index
/// (`*.index.json`), or a model folder holding one of `model.safetensors.index.json`,
/// `model.mkz.index.json`, `model.safetensors`, `model.mkz` (or a single tensor file).
/// `base` is the checkpoint delta-stored `.mkz` tensors were written against.
///
/// ```swift
/// let model = try openCheckpoint("path/to/model")
/// print(model.tensors.count, model.totalByteCount)
/// ```
public func openCheckpoint(_ path: String, base: (any Checkpoint)? = nil) throws -> any Checkpoint {
  var isDirectory: ObjCBool = false
  guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
    throw CheckpointError.cannotOpen(file: path, reason: "no such file or folder")
  }
  if isDirectory.boolValue {
    guard let file = ModelFolder.tensorFile(in: path) else { throw CheckpointError.notACheckpoint(path: path) }
    return try openCheckpoint(file, base: base)
  }
  if path.hasSuffix(".index.json") { return try ShardedCheckpoint(indexPath: path, base: base) }
  if ModelFolder.startsWithMKZMagic(path) { return try CompressedFile(path: path, base: base) }
  return try SafetensorsFile(path: path)
}

/// Helpers for Hugging Face style model folders.
public enum ModelFolder {
  static let weightExtensions: Set<String> = [
    "safetensors", MKZ.fileExtension, "bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "onnx",
  ]

  /// The file to open for a model folder, by preference: an index, then a single file.
  static func tensorFile(in folder: String) -> String? {
    let candidates = ["model.safetensors.index.json", "model.mkz.index.json", "model.safetensors", "model.mkz"]
    for name in candidates where FileManager.default.fileExists(atPath: "\(folder)/\(name)") {
      return "\(folder)/\(name)"
    }
    let files = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
    let tensorFiles = files.filter {
      $0.hasSuffix(".safetensors") || $0.hasSuffix(".mkz") || $0.hasSuffix(".index.json")
    }
    return tensorFiles.count == 1 ? "\(folder)/\(tensorFiles[0])" : nil
  }

  static func startsWithMKZMagic(_ path: String) -> Bool {
    guard let handle = FileHandle(forReadingAtPath: path) else { return false }
    defer { try? handle.close() }
    return (try? handle.read(upToCount: 8)).map { Array($0) == MKZ.magic } ?? false
  }

  /// The model folder a checkpoint path stands for: the path itself when it is a folder, the
  /// folder of a shard index; nil for a lone tensor file (its neighbours are not its files).
  public static func modelFolder(of path: String) -> String? {
    var isDirectory: ObjCBool = false
    if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue { return path }
    return path.hasSuffix(".index.json") ? URL(fileURLWithPath: path).deletingLastPathComponent().path : nil
  }

  /// Names of a folder's non-tensor entries (config.json, tokenizer files, subfolders such as
  /// `1_Pooling`): everything but weight files, shard indexes and hidden files.
  public static func auxiliaryFiles(in folder: String) -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
    return names.filter { name in
      !name.hasPrefix(".") && !name.hasSuffix(".index.json")
        && !weightExtensions.contains(URL(fileURLWithPath: name).pathExtension.lowercased())
    }.sorted()
  }

  /// Writes a model folder: `weights` as safetensors in `dtype` (floating tensors; others as
  /// they are) and text `files` by name (config.json ...), published atomically.
  public static func write(
    _ weights: [(name: String, tensor: Tensor)], files: [String: String], dtype: DType, to folder: String,
    overwrite: Bool
  ) throws {
    let infos = weights.map { TensorInfo(name: $0.name, dtype: dtype, shape: $0.tensor.shape) }
    var options = WriteOptions(format: .safetensors, metadata: ["format": "pt"], overwrite: overwrite)
    options.files = files.mapValues { Data($0.utf8) }
    let writer = try CheckpointWriter(destination: folder, tensors: infos, options: options)
    for (name, tensor) in weights { try writer.write(name, tensor.encoded(as: dtype)) }
    try writer.finish()
  }

  /// Builds a folder that is not one checkpoint (an adapter, a model with extra files) in a
  /// staging folder next to `destination`, removed on failure or interrupt, and publishes it
  /// once `fill` has written everything into the staging path it is given.
  public static func publishing(_ destination: String, overwrite: Bool, _ fill: (String) throws -> Void) throws {
    let staging = destination + ".staging-\(getpid())"
    let fm = FileManager.default
    try? fm.removeItem(atPath: staging)
    TemporaryOutputs.register(staging)
    defer {
      try? fm.removeItem(atPath: staging)
      TemporaryOutputs.unregister(staging)
    }
    do { try fm.createDirectory(atPath: staging, withIntermediateDirectories: true) } catch {
      throw CheckpointError.cannotWrite(file: destination, reason: error.localizedDescription)
    }
    try fill(staging)
    try publish(staging, at: destination, overwrite: overwrite)
  }

  /// Copies the non-tensor files of the model folder `source` into `destination`.
  public static func copyAuxiliaryFiles(from source: String, to destination: String) throws {
    guard let folder = modelFolder(of: source) else { return }
    for name in auxiliaryFiles(in: folder) {
      let target = "\(destination)/\(name)"
      if FileManager.default.fileExists(atPath: target) { continue }
      do {
        try FileManager.default.copyItem(atPath: "\(folder)/\(name)", toPath: target)
      } catch {
        throw CheckpointError.cannotWrite(
          file: target, reason: "copying \(folder)/\(name): \(error.localizedDescription)")
      }
    }
  }

  /// Moves a finished work folder onto `destination`. An existing destination is replaced only
  /// with `overwrite`, and removed only after the new folder is in place.
  static func publish(_ work: String, at destination: String, overwrite: Bool) throws {
    let fm = FileManager.default
    var old: String?
    if fm.fileExists(atPath: destination) {
      guard overwrite else { throw CheckpointError.outputExists(path: destination) }
      let aside = work + ".old"
      try? fm.removeItem(atPath: aside)
      guard rename(destination, aside) == 0 else {
        throw CheckpointError.cannotWrite(file: destination, reason: String(cString: strerror(errno)))
      }
      old = aside
    }
    guard rename(work, destination) == 0 else {
      let reason = String(cString: strerror(errno))
      if let old { rename(old, destination) }
      throw CheckpointError.cannotWrite(file: destination, reason: reason)
    }
    if let old { try? fm.removeItem(atPath: old) }
  }
}

/// A checkpoint spread over shard files listed by a `*.index.json` (`weight_map`: tensor -> file).
public final class ShardedCheckpoint: Checkpoint, @unchecked Sendable {
  public let path: String
  public let tensors: [TensorInfo]
  public let metadata: [String: String]
  public var files: [StoredFile] { shards.flatMap(\.files) }
  /// The shard files, in index order.
  public let shards: [any Checkpoint]
  private let shardOf: [String: Int]

  public init(indexPath: String, base: (any Checkpoint)? = nil) throws {
    path = indexPath
    let folder = URL(fileURLWithPath: indexPath).deletingLastPathComponent().path
    guard let data = FileManager.default.contents(atPath: indexPath) else {
      throw CheckpointError.cannotOpen(file: indexPath, reason: "cannot read the file")
    }
    let json: JSON
    do { json = try JSON.parse([UInt8](data)) } catch {
      throw CheckpointError.invalidIndex(file: indexPath, reason: "not valid JSON")
    }
    guard let map = json["weight_map"]?.objectPairs else {
      throw CheckpointError.invalidIndex(file: indexPath, reason: "no 'weight_map' object")
    }
    var fileNames: [String] = []
    var fileOf: [String: String] = [:]
    for (tensor, value) in map {
      guard let file = value.stringValue, !file.contains("/") else {
        throw CheckpointError.invalidIndex(
          file: indexPath, reason: "weight_map entry '\(tensor)' is not a file name in this folder")
      }
      if !fileNames.contains(file) { fileNames.append(file) }
      fileOf[tensor] = file
    }
    var shards: [any Checkpoint] = []
    var shardOf: [String: Int] = [:]
    var tensors: [TensorInfo] = []
    for (i, file) in fileNames.enumerated() {
      let shardPath = "\(folder)/\(file)"
      guard FileManager.default.fileExists(atPath: shardPath) else {
        throw CheckpointError.missingShard(index: indexPath, shard: file)
      }
      let shard = try openCheckpoint(shardPath, base: base)
      for info in shard.tensors {
        guard fileOf[info.name] == file else {
          throw CheckpointError.invalidIndex(
            file: indexPath,
            reason: "tensor '\(info.name)' is in \(file) but the weight_map says \(fileOf[info.name] ?? "nothing")")
        }
        shardOf[info.name] = i
        tensors.append(info)
      }
      shards.append(shard)
    }
    for (tensor, file) in fileOf where shardOf[tensor] == nil {
      throw CheckpointError.missingTensor(file: "\(folder)/\(file)", tensor: tensor)
    }
    self.shards = shards
    self.shardOf = shardOf
    self.tensors = tensors
    metadata = shards.first?.metadata ?? [:]
  }

  public func lookup(_ name: String) -> TensorInfo? { shardOf[name].flatMap { shards[$0].lookup(name) } }

  public func file(of name: String) -> String? { shardOf[name].map { shards[$0].path } }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  {
    guard let i = shardOf[name] else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    return try shards[i].withBytes(of: name, range: range, body)
  }

  public func release(_ name: String, range: Range<Int>?) {
    shardOf[name].map { shards[$0].release(name, range: range) }
  }

  /// The shard that holds tensor `name`.
  public func shard(of name: String) -> (any Checkpoint)? { shardOf[name].map { shards[$0] } }

  public func verify(progress: ((Int, Int) -> Void)?) throws {
    let total = totalByteCount
    var before = 0
    for shard in shards {
      try shard.verify { done, _ in progress?(before + done, total) }
      before += shard.totalByteCount
    }
  }
}
