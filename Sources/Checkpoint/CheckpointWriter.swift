import Foundation
import Tensor

/// Where a checkpoint is written, tensor by tensor in a declared order: a `CheckpointWriter`
/// (files) or a `MemoryCheckpointWriter` (a recipe intermediate kept in memory).
public protocol TensorSink: AnyObject {
  /// Starts tensor `name`; it must be the next one in the declared order.
  func beginTensor(_ name: String) throws
  /// Appends bytes of the current tensor.
  func append(_ piece: UnsafeRawBufferPointer) throws
  /// Appends bytes of the current tensor that the caller hands over: a file writer queues the
  /// array for its background writes instead of copying it (the default copies).
  func append(owned bytes: [UInt8]) throws
  /// Completes the checkpoint (every declared tensor must have been written).
  func finish() throws
}

extension TensorSink {
  public func append(owned bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try append($0) } }

  /// Writes a whole tensor (its dtype and shape must match the declaration).
  public func write(_ name: String, _ data: TensorData) throws {
    try beginTensor(name)
    try data.bytes.withUnsafeBytes { try append($0) }
  }

  /// Writes a `Float` tensor stored as `dtype`, encoding it piece by piece (no full-size copy).
  public func write(_ name: String, _ tensor: Tensor, as dtype: DType) throws {
    try beginTensor(name)
    let piece = 1 << 20
    var scratch = [UInt8](repeating: 0, count: min(tensor.count, piece) * dtype.size)
    var start = 0
    while start < tensor.count {
      let end = min(tensor.count, start + piece)
      try scratch.withUnsafeMutableBytes { buffer in
        let out = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<((end - start) * dtype.size)])
        tensor.encode(start..<end, as: dtype, into: out)
        try append(UnsafeRawBufferPointer(out))
      }
      start = end
    }
  }
}

/// One output file being streamed: tensors in declared order, bytes in pieces.
protocol TensorFileWriter: AnyObject {
  func beginTensor(_ name: String) throws
  func append(_ piece: UnsafeRawBufferPointer) throws
  func append(owned bytes: [UInt8]) throws
  func finish() throws
  func discard()
}

extension TensorFileWriter {
  func append(owned bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try append($0) } }
}

/// On-disk formats a checkpoint can be written in.
public enum CheckpointFormat: String, CaseIterable, Sendable {
  /// Hugging Face safetensors.
  case safetensors
  /// mergekit's compressed format (`.mkz`).
  case mkz

  public var fileExtension: String { self == .safetensors ? "safetensors" : MKZ.fileExtension }

  /// The format a path's extension names, if any.
  public init?(pathExtension: String) {
    switch pathExtension.lowercased() {
    case "safetensors": self = .safetensors
    case MKZ.fileExtension: self = .mkz
    default: return nil
    }
  }
}

/// Options for `CheckpointWriter`.
public struct WriteOptions: Sendable {
  public var format: CheckpointFormat
  /// Largest shard in bytes (stored size before compression); nil writes one file.
  public var shardSize: Int?
  public var metadata: [String: String]
  /// `.mkz` only: store tensors the base also has (same dtype and shape) as deltas against it.
  public var deltaBase: (any Checkpoint)?
  /// A model folder whose non-tensor files (config.json, tokenizer files, ...) are copied.
  public var copyFilesFrom: String?
  /// Names of `copyFilesFrom`'s files not to copy (the tokenizer's, with mergekit's
  /// `--no-copy-tokenizer`).
  public var skippedFiles: Set<String> = []
  /// Files written into a folder output by name (a config.json changed by the command); they
  /// take precedence over those copied from `copyFilesFrom`.
  public var files: [String: Data] = [:]
  /// Replace an existing output (the old one is removed only after the new one is complete).
  public var overwrite: Bool
  /// The files of the checkpoint being copied: a folder output without `shardSize` keeps the same
  /// sharding and file names, and each file keeps its original safetensors header when the tensors
  /// are unchanged, so that a round trip through `.mkz` is bit-identical.
  public var layout: [StoredFile]?

  public init(
    format: CheckpointFormat = .safetensors, shardSize: Int? = nil, metadata: [String: String] = [:],
    deltaBase: (any Checkpoint)? = nil, copyFilesFrom: String? = nil, overwrite: Bool = false
  ) {
    self.format = format
    self.shardSize = shardSize
    self.metadata = metadata
    self.deltaBase = deltaBase
    self.copyFilesFrom = copyFilesFrom
    self.overwrite = overwrite
  }

  /// The shard plan: `layout` when it covers exactly `tensors` in order (and no shard size was
  /// asked for), else consecutive groups of at most `shardSize` bytes.
  func shardPlan(_ tensors: [TensorInfo], folder: Bool) -> [(name: String?, tensors: [TensorInfo], header: [UInt8]?)] {
    if let layout, folder ? shardSize == nil : layout.count == 1, layout.flatMap(\.tensors) == tensors.map(\.name) {
      var start = 0
      return layout.map { file in
        defer { start += file.tensors.count }
        let stem = URL(fileURLWithPath: file.name).deletingPathExtension().lastPathComponent
        return (
          layout.count == 1 ? nil : "\(stem).\(format.fileExtension)",
          Array(tensors[start..<(start + file.tensors.count)]), file.safetensorsHeader
        )
      }
    }
    return CheckpointWriter.shardGroups(tensors, maxBytes: folder ? shardSize : nil).map { (nil, $0, nil) }
  }
}

extension WriteOptions {
  /// Parses sizes such as `5GB`, `500MB`, `2GiB`, `1048576` (decimal units as Hugging Face uses them).
  public static func parseSize(_ text: String) -> Int? {
    let units: [(String, Double)] = [
      ("KIB", 1024), ("MIB", 1_048_576), ("GIB", 1_073_741_824), ("TIB", 1_099_511_627_776), ("KB", 1e3), ("MB", 1e6),
      ("GB", 1e9), ("TB", 1e12), ("K", 1e3), ("M", 1e6), ("G", 1e9), ("B", 1),
    ]
    let upper = text.uppercased().trimmingCharacters(in: .whitespaces)
    for (suffix, factor) in units where upper.hasSuffix(suffix) {
      guard let value = Double(upper.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)), value > 0 else {
        return nil
      }
      return Int(exactly: (value * factor).rounded(.down)).flatMap { $0 > 0 ? $0 : nil }
    }
    guard let value = Int(upper), value > 0 else { return nil }
    return value
  }
}

/// Writes a checkpoint: a single file (destination ending in `.safetensors` or `.mkz`) or a model
/// folder (shards of at most `shardSize` bytes plus `model.<ext>.index.json` when there are
/// several, and the copied non-tensor files). The tensor list is declared up front; bytes then
/// stream in declared order. Nothing appears at the destination until `finish()` succeeds.
///
/// ```swift
/// let writer = try CheckpointWriter(destination: "out", tensors: infos, options: WriteOptions(format: .mkz))
/// for info in infos { try writer.write(info.name, try source.read(info.name)) }
/// try writer.finish()
/// ```
public final class CheckpointWriter: TensorSink {
  public let destination: String
  private let options: WriteOptions
  private let isFolder: Bool
  private let workPath: String
  private let shards: [(file: String, tensors: [TensorInfo], header: [UInt8]?)]
  private var shardOfTensor: [ExactName: Int] = [:]
  private var openShard: (index: Int, writer: TensorFileWriter)?
  private var finishedShards = Set<Int>()
  private var done = false

  public init(destination: String, tensors: [TensorInfo], options: WriteOptions) throws {
    self.destination = destination
    self.options = options
    let url = URL(fileURLWithPath: destination)
    let named = CheckpointFormat(pathExtension: url.pathExtension)
    isFolder = named == nil
    if let named, named != options.format {
      throw CheckpointError.cannotWrite(
        file: destination, reason: "the extension says \(named.rawValue) but the format is \(options.format.rawValue)")
    }
    if FileManager.default.fileExists(atPath: destination) && !options.overwrite {
      throw CheckpointError.outputExists(path: destination)
    }
    let groups = options.shardPlan(tensors, folder: isFolder)
    let ext = options.format.fileExtension
    if isFolder {
      let work = TemporaryOutputs.path(for: destination)
      workPath = work
      try? FileManager.default.removeItem(atPath: work)
      do {
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
      } catch {
        throw CheckpointError.cannotWrite(file: destination, reason: error.localizedDescription)
      }
      TemporaryOutputs.register(work)
      shards = groups.enumerated().map { i, group in
        let name =
          group.name
          ?? (groups.count == 1 ? "model.\(ext)" : String(format: "model-%05d-of-%05d.\(ext)", i + 1, groups.count))
        return ("\(work)/\(name)", group.tensors, group.header)
      }
    } else {
      workPath = destination
      shards = [(destination, tensors, groups.first?.header)]
    }
    for (i, shard) in shards.enumerated() { for t in shard.tensors { shardOfTensor[ExactName(t.name)] = i } }
  }

  deinit { abandon() }

  /// Tensors cut into consecutive groups of at most `maxBytes` (a tensor larger than that gets a
  /// shard of its own); one group when `maxBytes` is nil.
  static func shardGroups(_ tensors: [TensorInfo], maxBytes: Int?) -> [[TensorInfo]] {
    guard let maxBytes else { return [tensors] }
    var groups: [[TensorInfo]] = [[]]
    var size = 0
    for t in tensors {
      if !groups[groups.count - 1].isEmpty && size + t.byteCount > maxBytes {
        groups.append([])
        size = 0
      }
      groups[groups.count - 1].append(t)
      size += t.byteCount
    }
    return groups
  }

  /// Starts tensor `name`; it must be the next one in the declared order.
  public func beginTensor(_ name: String) throws {
    guard let shard = shardOfTensor[ExactName(name)] else {
      throw CheckpointError.writeOrder(file: destination, reason: "tensor '\(name)' was not declared")
    }
    if openShard?.index != shard {
      if let open = openShard {
        try namedInOutput(open.index) { try open.writer.finish() }
        finishedShards.insert(open.index)
      }
      let file = shards[shard]
      let writer: TensorFileWriter = try namedInOutput(shard) {
        switch options.format {
        case .safetensors:
          try SafetensorsWriter(
            destination: file.file, tensors: file.tensors, metadata: options.metadata, preservedHeader: file.header)
        case .mkz:
          try CompressedWriter(
            destination: file.file, tensors: file.tensors, metadata: options.metadata, base: options.deltaBase,
            safetensorsHeader: file.header, files: isFolder ? [:] : try filesToEmbed())
        }
      }
      openShard = (shard, writer)
    }
    guard let open = openShard else { return }
    try namedInOutput(open.index) { try open.writer.beginTensor(name) }
  }

  /// Appends bytes of the current tensor.
  public func append(_ piece: UnsafeRawBufferPointer) throws {
    try appendToOpenShard { try $0.append(piece) }
  }

  /// Appends bytes of the current tensor, handed over: queued for the file's background writes
  /// without a copy.
  public func append(owned bytes: [UInt8]) throws {
    try appendToOpenShard { try $0.append(owned: bytes) }
  }

  /// Runs `append` on the open shard's file (a write-order error when no tensor has begun).
  private func appendToOpenShard(_ append: (any TensorFileWriter) throws -> Void) throws {
    guard let open = openShard else {
      throw CheckpointError.writeOrder(file: destination, reason: "bytes written before any tensor")
    }
    try namedInOutput(open.index) { try append(open.writer) }
  }

  /// Runs `body` on shard `index`'s file. A folder's shards are written in a work folder; a
  /// `cannotWrite` (a full disk, a refused preallocation) names the shard where the user will
  /// look for it, in the output folder.
  private func namedInOutput<R>(_ index: Int, _ body: () throws -> R) throws -> R {
    do {
      return try body()
    } catch CheckpointError.cannotWrite(let path, let reason) where isFolder && path == shards[index].file {
      let name = URL(fileURLWithPath: path).lastPathComponent
      throw CheckpointError.cannotWrite(file: "\(destination)/\(name)", reason: reason)
    }
  }

  /// Completes every file, writes the shard index, copies the non-tensor files and publishes.
  public func finish() throws {
    if let open = openShard {
      try namedInOutput(open.index) { try open.writer.finish() }
      finishedShards.insert(open.index)
    }
    openShard = nil
    for i in shards.indices where !finishedShards.contains(i) {
      if let missing = shards[i].tensors.first {
        throw CheckpointError.writeOrder(file: destination, reason: "tensor '\(missing.name)' was never written")
      }
      let writer: TensorFileWriter =
        options.format == .safetensors
        ? try SafetensorsWriter(destination: shards[i].file, tensors: [], metadata: options.metadata)
        : try CompressedWriter(
          destination: shards[i].file, tensors: [], metadata: options.metadata, base: nil,
          files: isFolder ? [:] : try filesToEmbed())
      try writer.finish()
    }
    guard isFolder else {
      done = true
      return
    }
    if shards.count > 1 { try writeIndex() }
    for (name, contents) in options.files.sorted(by: { $0.key < $1.key }) {
      let out = try OutputFile(destination: "\(workPath)/\(name)")
      try out.write(Array(contents))
      try out.publish()
    }
    if let source = options.copyFilesFrom {
      try ModelFolder.copyAuxiliaryFiles(from: source, to: workPath, skipping: options.skippedFiles)
    }
    try recordDType()
    try ModelFolder.publish(workPath, at: destination, overwrite: options.overwrite)
    TemporaryOutputs.unregister(workPath)
    done = true
  }

  /// The model folder's files a single `.mkz` output carries (version 2's `files`): those of
  /// `copyFilesFrom` and `files`, as a folder output would get them, config.json's dtype recorded.
  private func filesToEmbed() throws -> [String: Data] {
    var files =
      try options.copyFilesFrom.map { try ModelFolder.smallFiles(in: $0, skipping: options.skippedFiles) } ?? [:]
    files.merge(options.files) { $1 }
    if let config = files["config.json"], let updated = try withWrittenDType(config) {
      files["config.json"] = updated
    }
    return files
  }

  /// config.json's text with `torch_dtype` and `dtype` (transformers 4 and 5 read one each) set
  /// to the floating dtype that holds most of the written bytes, so that a plain
  /// `from_pretrained` loads a bf16 merge as bf16 rather than as the input config's float32; nil
  /// when it already says so (or is not a JSON object).
  private func withWrittenDType(_ config: Data) throws -> Data? {
    var bytesByType: [DType: Int] = [:]
    for shard in shards {
      for t in shard.tensors where t.dtype.isFloatingPoint { bytesByType[t.dtype, default: 0] += t.byteCount }
    }
    guard let dtype = bytesByType.max(by: { $0.value < $1.value })?.key, let name = dtype.torchName,
      var object = (try? JSONSerialization.jsonObject(with: config)) as? [String: Any],
      object["torch_dtype"] as? String != name || object["dtype"] as? String != name
    else { return nil }
    object["torch_dtype"] = name
    object["dtype"] = name
    do {
      return try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]) + [0x0A]
    } catch {
      throw CheckpointError.cannotWrite(file: destination + "/config.json", reason: error.localizedDescription)
    }
  }

  /// Records the written dtype in a folder output's config.json (`withWrittenDType`).
  private func recordDType() throws {
    let path = "\(workPath)/config.json"
    guard InputFile.isRegularFile(path), let data = try withWrittenDType(Data(try InputFile.read(path))) else { return }
    try? FileManager.default.removeItem(atPath: path)
    try writeFileAtomically(Array(data), to: path)
  }

  private func writeIndex() throws {
    let total = shards.reduce(0) { $0 + $1.tensors.reduce(0) { $0 + $1.byteCount } }
    var map: [(key: String, value: JSON)] = []
    for shard in shards {
      let file = URL(fileURLWithPath: shard.file).lastPathComponent
      for t in shard.tensors { map.append((t.name, .string(file))) }
    }
    let index = JSON.object([
      ("metadata", .object([("total_size", .number(String(total)))])), ("weight_map", .object(map)),
    ])
    let out = try OutputFile(destination: "\(workPath)/model.\(options.format.fileExtension).index.json")
    try out.write(Array((index.prettyPrinted() + "\n").utf8))
    try out.publish()
  }

  /// Removes everything written so far (called automatically when the writer is dropped unfinished).
  public func abandon() {
    guard !done else { return }
    openShard?.writer.discard()
    openShard = nil
    if isFolder {
      try? FileManager.default.removeItem(atPath: workPath)
      TemporaryOutputs.unregister(workPath)
    }
    done = true
  }
}
