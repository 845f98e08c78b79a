import Foundation
import Tensor

#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// Opens any supported checkpoint: a `.safetensors`, `.mkz` or PyTorch (`.bin`, `.pt`) file, a
/// model with a LoRA adapter applied (`base+adapter`, mergekit's syntax), a
/// shard index (`*.index.json`), or a model folder holding one of `model.safetensors.index.json`,
/// `model.mkz.index.json`, `model.safetensors`, `model.mkz`, `pytorch_model.bin.index.json`,
/// `pytorch_model.bin` (or a single tensor file).
/// `base` is the checkpoint delta-stored `.mkz` tensors were written against.
///
/// ```swift
/// let model = try openCheckpoint("path/to/model")
/// print(model.tensors.count, model.totalByteCount)
/// ```
public func openCheckpoint(_ given: String, base: (any Checkpoint)? = nil) throws -> any Checkpoint {
  if let (model, adapter) = LoRAReference.split(given) {
    return try LoRAAppliedCheckpoint(base: openCheckpoint(model, base: base), adapterPath: adapter)
  }
  let path = try HubCache.resolve(given)
  var isDirectory: ObjCBool = false
  guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
    throw CheckpointError.cannotOpen(file: path, reason: "no such file or folder")
  }
  var file = path
  if isDirectory.boolValue {
    guard let chosen = ModelFolder.tensorFile(in: path) else {
      if let other = ["model.gguf"].first(where: { FileManager.default.fileExists(atPath: "\(path)/\($0)") }) {
        throw CheckpointError.unsupportedFormat(
          file: "\(path)/\(other)", format: "a GGUF checkpoint (the folder has no safetensors)",
          advice: "use the model's safetensors release, or convert it back with llama.cpp's tools")
      }
      throw CheckpointError.notACheckpoint(path: path)
    }
    file = chosen
  }
  try InputFile.checkRegular(file)
  if file.hasSuffix(".index.json") {
    return try FactoredCheckpoint.wrapping(ShardedCheckpoint(indexPath: file, base: base))
  }
  return try FactoredCheckpoint.wrapping(openTensorFile(file, base: base))
}

/// Opens one regular tensor file, `.mkz` (by its magic bytes), a PyTorch zip checkpoint (read
/// by `PyTorchFile`, which runs nothing) or safetensors; never an index or a folder, so that
/// nothing a file names can lead back to itself. Legacy PyTorch pickles and GGUF files are
/// recognised by their first bytes and refused by name (rather than misread as a safetensors
/// header of absurd length).
func openTensorFile(_ path: String, base: (any Checkpoint)?) throws -> any Checkpoint {
  let head = try ModelFolder.firstBytes(path, count: 9)
  if head.starts(with: MKZ.magic) { return try CompressedFile(path: path, base: base) }
  // A safetensors header length can begin with any bytes, but its JSON starts at byte 8.
  guard head.count < 9 || head[8] != UInt8(ascii: "{") else { return try SafetensorsFile(path: path) }
  let convert = "convert it to safetensors with transformers (save_pretrained(..., safe_serialization=True)) first"
  if head.starts(with: Array("PK\u{03}\u{04}".utf8)) { return try PyTorchFile(path: path) }
  if head.count > 2 && head[0] == 0x80 && (2...5).contains(head[1]) && head[2] != 0 {
    throw CheckpointError.unsupportedFormat(file: path, format: "a legacy PyTorch pickle", advice: convert)
  }
  if head.starts(with: Array("GGUF".utf8)) {
    throw CheckpointError.unsupportedFormat(
      file: path, format: "GGUF (llama.cpp)",
      advice: "use the model's safetensors release, or convert it back with llama.cpp's tools")
  }
  return try SafetensorsFile(path: path)
}

/// Helpers for Hugging Face style model folders.
public enum ModelFolder {
  static let weightExtensions: Set<String> = [
    "safetensors", MKZ.fileExtension, "bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "onnx",
  ]

  /// The file to open for a model folder, by preference: an index, then a single file.
  static func tensorFile(in folder: String) -> String? {
    let candidates = [
      "model.safetensors.index.json", "model.mkz.index.json", "model.safetensors", "model.mkz",
      "pytorch_model.bin.index.json", "pytorch_model.bin",
    ]
    for name in candidates where FileManager.default.fileExists(atPath: "\(folder)/\(name)") {
      return "\(folder)/\(name)"
    }
    let files = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
    let tensorFiles = files.filter {
      $0.hasSuffix(".safetensors") || $0.hasSuffix(".mkz") || $0.hasSuffix(".index.json")
    }
    return tensorFiles.count == 1 ? "\(folder)/\(tensorFiles[0])" : nil
  }

  /// The first `count` bytes of the regular file `path` (fewer when it is shorter), read
  /// without blocking.
  static func firstBytes(_ path: String, count: Int) throws -> [UInt8] {
    let (fd, size) = try InputFile.openRegular(path)
    defer { close(fd) }
    var head = [UInt8](repeating: 0, count: min(count, size))
    let n = head.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
    return Array(head.prefix(max(0, n)))
  }

  /// The path of shard `name` listed by the index `indexPath` in `folder`, after checking that
  /// it stays there: a plain file name (no `/`, not `.` or `..`, not hidden, not an index) whose
  /// real path, symbolic links resolved, is inside the folder's real path (or, for a Hugging Face
  /// cache snapshot `<repo>/snapshots/<revision>`, inside that repository's `blobs` folder).
  static func shardPath(_ name: String, folder: String, indexPath: String) throws -> String {
    func refuse(_ why: String) -> CheckpointError {
      .invalidIndex(file: indexPath, reason: "weight_map names the shard '\(name)', which \(why)")
    }
    guard !name.isEmpty, !name.contains("/"), !name.contains("\0"), !name.hasPrefix(".") else {
      throw refuse("is not a plain file name in this folder (no '/', no leading '.')")
    }
    guard !name.hasSuffix(".index.json") else { throw refuse("is an index; an index must list tensor files") }
    let path = "\(folder)/\(name)"
    guard FileManager.default.fileExists(atPath: path) else {
      throw CheckpointError.missingShard(index: indexPath, shard: name)
    }
    guard let realShard = realPath(path), allowedRoots(of: folder).contains(where: { realShard.hasPrefix($0) }) else {
      throw refuse("resolves (through a symbolic link) to a file outside the model folder")
    }
    return path
  }

  /// The real folders (each ending in `/`) that files of the model folder `folder` may resolve
  /// into: the folder itself and, in a Hugging Face cache snapshot, the repository's blobs.
  static func allowedRoots(of folder: String) -> [String] {
    guard let real = realPath(folder) else { return [] }
    var roots = [real.hasSuffix("/") ? real : real + "/"]
    let url = URL(fileURLWithPath: folder).standardizedFileURL
    if url.deletingLastPathComponent().lastPathComponent == "snapshots",
      let blobs = realPath(
        url.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("blobs").path)
    {
      roots.append(blobs + "/")
    }
    return roots
  }

  /// Throws `outputIsInput` when writing `output` would replace or write inside one of `inputs`
  /// (or replace a folder holding one): the same path, links resolved, or one inside the other.
  /// Outputs are published by a rename, so such a run would end by destroying what it read, and
  /// a later step of a recipe would read the new output instead of the input.
  public static func checkOutput(_ output: String, isNotAmong inputs: [String]) throws {
    let target = resolvedPath(output)
    for input in inputs {
      let source = resolvedPath(input)
      if target == source || target.hasPrefix(source + "/") || source.hasPrefix(target + "/") {
        throw CheckpointError.outputIsInput(output: output, input: input)
      }
    }
  }

  /// The absolute path `path` stands for, links resolved in the part of it that exists.
  static func resolvedPath(_ path: String) -> String {
    var url = URL(fileURLWithPath: path).standardizedFileURL
    var rest: [String] = []
    while url.path != "/" {
      if let real = realPath(url.path) { return ([real] + rest.reversed()).joined(separator: "/") }
      rest.append(url.lastPathComponent)
      url = url.deletingLastPathComponent()
    }
    return "/" + rest.reversed().joined(separator: "/")
  }

  /// `path` with every symbolic link and `.`/`..` resolved, or nil.
  static func realPath(_ path: String) -> String? {
    guard let resolved = realpath(path, nil) else { return nil }
    defer { free(resolved) }
    return String(cString: resolved)
  }

  /// The model folder a checkpoint path stands for: the path itself when it is a folder, the
  /// folder of a shard index; nil for a lone tensor file (its neighbours are not its files).
  public static func modelFolder(of given: String) -> String? {
    if let (model, _) = LoRAReference.split(given) { return modelFolder(of: model) }
    let path = (try? HubCache.resolve(given)) ?? given
    var isDirectory: ObjCBool = false
    if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue { return path }
    return path.hasSuffix(".index.json") ? URL(fileURLWithPath: path).deletingLastPathComponent().path : nil
  }

  /// The files a Hugging Face tokenizer is saved as (any of them).
  public static let tokenizerFiles: Set<String> = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
  ]

  /// Names of a folder's non-tensor entries (config.json, tokenizer files, subfolders such as
  /// `1_Pooling`): everything but weight files, shard indexes and hidden files.
  public static func auxiliaryFiles(in folder: String) -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
    return names.filter { name in
      !name.hasPrefix(".") && !name.hasSuffix(".index.json")
        && !weightExtensions.contains(URL(fileURLWithPath: name).pathExtension.lowercased())
    }.sorted()
  }

  /// The small files of `folder` (config.json, tokenizer files, generation config ...) read for
  /// embedding in a single-file `.mkz`: regular files with plain names only (subfolders are not
  /// carried), each under the same link rules as a copy (`copyEntry`), at most 256 MiB each.
  public static func smallFiles(in folder: String, skipping: Set<String>) throws -> [String: Data] {
    var files: [String: Data] = [:]
    for name in auxiliaryFiles(in: folder) where !skipping.contains(name) && MKZ.isFileName(name) {
      let path = "\(folder)/\(name)"
      guard InputFile.isRegularFile(path) else { continue }
      guard let real = realPath(path), allowedRoots(of: folder).contains(where: { real.hasPrefix($0) }) else {
        throw CheckpointError.cannotOpen(
          file: path, reason: "links outside the model folder \(folder); copy the file in or remove the link")
      }
      files[name] = Data(try InputFile.read(path, limit: MKZ.maxEmbeddedFileSize))
    }
    return files
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
    let staging = TemporaryOutputs.path(for: destination, tag: "staging")
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
  public static func copyAuxiliaryFiles(from source: String, to destination: String, skipping: Set<String> = [])
    throws
  {
    guard let folder = modelFolder(of: source) else { return }
    for name in auxiliaryFiles(in: folder) where !skipping.contains(name) {
      let target = "\(destination)/\(name)"
      if FileManager.default.fileExists(atPath: target) { continue }
      try copyEntry("\(folder)/\(name)", to: target, from: folder)
    }
  }

  /// Copies a regular file or a folder of them to `target`, following symbolic links (a Hugging
  /// Face cache links its files to blobs) so that the copy stands alone. A FIFO, device or
  /// socket anywhere is refused (`notARegularFile`) instead of being read forever; folders
  /// nest at most `depth` levels, which also ends a link that loops back to its folder. A link
  /// must stay inside the model folder `folder` (or its Hugging Face cache blobs): a link to `/`
  /// or `~/.ssh` is refused, never copied. With `hardLink`, a file is linked rather than copied
  /// where the file system allows (weights of many gigabytes that the output shares unchanged).
  public static func copyEntry(
    _ source: String, to target: String, from folder: String, hardLink: Bool = false, depth: Int = 8
  ) throws {
    let fm = FileManager.default
    guard let real = realPath(source) else {
      throw CheckpointError.cannotOpen(file: source, reason: "no such file (a broken link?)")
    }
    guard allowedRoots(of: folder).contains(where: { real.hasPrefix($0) }) else {
      throw CheckpointError.cannotOpen(
        file: source, reason: "links outside the model folder \(folder); copy the file in or remove the link")
    }
    var info = stat()
    guard stat(source, &info) == 0 else {
      throw CheckpointError.cannotOpen(file: source, reason: String(cString: strerror(errno)))
    }
    do {
      if info.st_mode & S_IFMT == S_IFDIR {
        guard depth > 0 else {
          throw CheckpointError.cannotOpen(file: source, reason: "folders nest too deep (a link loop?)")
        }
        try fm.createDirectory(atPath: target, withIntermediateDirectories: false)
        for name in try fm.contentsOfDirectory(atPath: source).sorted() {
          try copyEntry(
            "\(source)/\(name)", to: "\(target)/\(name)", from: folder, hardLink: hardLink, depth: depth - 1)
        }
      } else {
        try InputFile.checkRegular(info, path: source)
        let file = realPath(source) ?? source
        if !hardLink || (try? fm.linkItem(atPath: file, toPath: target)) == nil {
          try fm.copyItem(atPath: file, toPath: target)
        }
      }
    } catch let error as CheckpointError {
      throw error
    } catch {
      throw CheckpointError.cannotWrite(file: target, reason: "copying \(source): \(error.localizedDescription)")
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
  private let shardOf: [ExactName: Int]

  public init(indexPath: String, base: (any Checkpoint)? = nil) throws {
    path = indexPath
    let folder = URL(fileURLWithPath: indexPath).deletingLastPathComponent().path
    let data = try InputFile.read(indexPath)
    let json: JSON
    do { json = try JSON.parse(data) } catch {
      throw CheckpointError.invalidIndex(file: indexPath, reason: "not valid JSON")
    }
    guard let map = json["weight_map"]?.objectPairs else {
      throw CheckpointError.invalidIndex(file: indexPath, reason: "no 'weight_map' object")
    }
    var fileNames: [String] = []
    var fileOf: [ExactName: String] = [:]
    for (tensor, value) in map {
      guard let file = value.stringValue else {
        throw CheckpointError.invalidIndex(
          file: indexPath, reason: "weight_map entry '\(tensor)' is not a file name in this folder")
      }
      if !fileNames.contains(file) { fileNames.append(file) }
      guard fileOf.updateValue(file, forKey: ExactName(tensor)) == nil else {
        throw CheckpointError.invalidIndex(file: indexPath, reason: "weight_map lists tensor '\(tensor)' twice")
      }
    }
    var shards: [any Checkpoint] = []
    var shardOf: [ExactName: Int] = [:]
    var tensors: [TensorInfo] = []
    for (i, file) in fileNames.enumerated() {
      let shardPath = try ModelFolder.shardPath(file, folder: folder, indexPath: indexPath)
      let shard = try openTensorFile(shardPath, base: base)
      for info in shard.tensors {
        guard fileOf[ExactName(info.name)] == file else {
          throw CheckpointError.invalidIndex(
            file: indexPath,
            reason:
              "tensor '\(info.name)' is in \(file) but the weight_map says \(fileOf[ExactName(info.name)] ?? "nothing")"
          )
        }
        shardOf[ExactName(info.name)] = i
        tensors.append(info)
      }
      shards.append(shard)
    }
    for (tensor, file) in fileOf where shardOf[tensor] == nil {
      throw CheckpointError.missingTensor(file: "\(folder)/\(file)", tensor: tensor.name)
    }
    self.shards = shards
    self.shardOf = shardOf
    self.tensors = tensors
    metadata = shards.first?.metadata ?? [:]
  }

  public func lookup(_ name: String) -> TensorInfo? { shardOf[ExactName(name)].flatMap { shards[$0].lookup(name) } }

  public func file(of name: String) -> String? { shardOf[ExactName(name)].map { shards[$0].path } }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  {
    guard let i = shardOf[ExactName(name)] else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    return try shards[i].withBytes(of: name, range: range, body)
  }

  public func copyBytes(of name: String, parts: [Range<Int>], into destination: UnsafeMutableRawBufferPointer) throws {
    guard let i = shardOf[ExactName(name)] else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    try shards[i].copyBytes(of: name, parts: parts, into: destination)
  }

  public func release(_ name: String, range: Range<Int>?) {
    shardOf[ExactName(name)].map { shards[$0].release(name, range: range) }
  }

  /// The shard that holds tensor `name`.
  public func shard(of name: String) -> (any Checkpoint)? { shardOf[ExactName(name)].map { shards[$0] } }

  public func verify(progress: ((Int, Int) -> Void)?) throws {
    let total = totalByteCount
    var before = 0
    for shard in shards {
      try shard.verify { done, _ in progress?(before + done, total) }
      before += shard.totalByteCount
    }
  }
}

/// Models named by Hugging Face id (`org/name`, optionally `@revision`), as published configs
/// name them, found in the local Hugging Face cache without any network access:
/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, in its layout
/// `models--org--name/refs/<revision>` (a commit hash) -> `snapshots/<hash>/`.
public enum HubCache {
  /// The cache folder the environment selects.
  public static var root: String {
    let environment = ProcessInfo.processInfo.environment
    if let hub = environment["HF_HUB_CACHE"], !hub.isEmpty { return hub }
    if let home = environment["HF_HOME"], !home.isEmpty { return home + "/hub" }
    return (environment["HOME"] ?? NSHomeDirectory()) + "/.cache/huggingface/hub"
  }

  /// `(org/name, revision)` when `text` has the form of a Hub id, else nil.
  public static func parse(_ text: String) -> (id: String, revision: String)? {
    let parts = text.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
    let id = parts[0]
    let names = id.split(separator: "/", omittingEmptySubsequences: false)
    func plain(_ s: Substring) -> Bool {
      !s.isEmpty && !s.hasPrefix(".") && s.count <= 96
        && s.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || "._-".unicodeScalars.contains($0) }
    }
    guard names.count == 2, names.allSatisfy(plain) else { return nil }
    let revision = parts.count == 2 ? parts[1] : "main"
    guard !revision.isEmpty, !revision.contains(".."), !revision.hasPrefix("/"), revision.count <= 256 else {
      return nil
    }
    return (id, revision)
  }

  /// `path` itself when it exists; for a Hub id that is not a local path, its snapshot folder in
  /// the cache; anything else unchanged (the caller reports it missing). Throws `notCached` for
  /// a Hub id the cache does not hold, saying how to download it.
  public static func resolve(_ path: String) throws -> String {
    if FileManager.default.fileExists(atPath: path) { return path }
    guard let (id, revision) = parse(path) else { return path }
    let repo = "\(root)/models--" + id.replacingOccurrences(of: "/", with: "--")
    var commit = revision
    if InputFile.isRegularFile("\(repo)/refs/\(revision)"),
      let text = try? InputFile.readText("\(repo)/refs/\(revision)", limit: 4096)
    {
      commit = text.trimmingCharacters(in: .whitespacesAndNewlines)
    }
    let snapshot = "\(repo)/snapshots/\(commit)"
    var isDirectory: ObjCBool = false
    guard !commit.contains("/"), FileManager.default.fileExists(atPath: snapshot, isDirectory: &isDirectory),
      isDirectory.boolValue
    else {
      throw CheckpointError.notCached(id: path, cache: root)
    }
    return snapshot
  }

  /// Whether `path` exists, or names a model the cache holds.
  public static func exists(_ path: String) -> Bool {
    FileManager.default.fileExists(atPath: path) || ((try? resolve(path)).map { $0 != path } ?? false)
      || LoRAReference.split(path) != nil
  }
}
