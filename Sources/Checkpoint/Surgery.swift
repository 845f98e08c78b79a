import Foundation
import Tensor

/// Which tensors a copy keeps and under what names: `select` keeps only names matching a regular
/// expression, `drop` removes matches, then each rename `pattern=replacement` rewrites names
/// (`$1`-style groups allowed), in order.
///
/// ```swift
/// let selection = try TensorSelection(select: "layers\\.[0-3]\\.", drop: "rotary", renames: ["^model\\.=backbone."])
/// let kept = try selection.apply(to: model.tensors.map(\.name), file: model.path)   // [(source, target)]
/// ```
public struct TensorSelection: Sendable {
  private let select: NSRegularExpression?
  private let drop: NSRegularExpression?
  private let renames: [(pattern: NSRegularExpression, template: String)]

  /// Throws `CheckpointError.invalidPattern` for an invalid regular expression or a rename without `=`.
  public init(select: String? = nil, drop: String? = nil, renames: [String] = []) throws {
    self.select = try select.map(Self.compile)
    self.drop = try drop.map(Self.compile)
    self.renames = try renames.map { rule in
      guard let equals = rule.firstIndex(of: "=") else { throw CheckpointError.invalidRename(rule) }
      return (try Self.compile(String(rule[..<equals])), String(rule[rule.index(after: equals)...]))
    }
  }

  static func compile(_ pattern: String) throws -> NSRegularExpression {
    do { return try NSRegularExpression(pattern: pattern) } catch { throw CheckpointError.invalidPattern(pattern) }
  }

  static func matches(_ regex: NSRegularExpression, _ name: String) -> Bool {
    regex.firstMatch(in: name, range: NSRange(name.startIndex..., in: name)) != nil
  }

  /// Whether `name` is kept.
  public func keeps(_ name: String) -> Bool {
    if let select, !Self.matches(select, name) { return false }
    if let drop, Self.matches(drop, name) { return false }
    return true
  }

  /// The name `name` gets after the renames.
  public func rename(_ name: String) -> String {
    renames.reduce(name) { current, rule in
      rule.pattern.stringByReplacingMatches(
        in: current, range: NSRange(current.startIndex..., in: current), withTemplate: rule.template)
    }
  }

  /// (source name, target name) for every kept tensor, in order. Throws when two tensors would
  /// get the same name or nothing is kept.
  public func apply(to names: [String], file: String) throws -> [(source: String, target: String)] {
    var seen: [ExactName: String] = [:]
    var result: [(source: String, target: String)] = []
    for name in names where keeps(name) {
      let target = rename(name)
      if let other = seen[ExactName(target)] {
        throw CheckpointError.nameCollision(file: file, first: other, second: name, target: target)
      }
      seen[ExactName(target)] = name
      result.append((name, target))
    }
    if result.isEmpty && !names.isEmpty { throw CheckpointError.nothingSelected(file: file) }
    return result
  }
}

/// Copies tensors from one checkpoint into a new one, streaming piece by piece: selection and
/// renaming, an optional cast of floating-point tensors, and any output format, sharding or
/// delta base. Peak memory is one piece per tensor plus the writer's batch, whatever the size.
///
/// ```swift
/// try copyCheckpoint(from: try openCheckpoint("model"), to: "model.mkz", options: WriteOptions(format: .mkz))
/// ```
public func copyCheckpoint(
  from source: any Checkpoint, to destination: String, selection: TensorSelection? = nil, castTo dtype: DType? = nil,
  options: WriteOptions, progress: ((Int, Int) -> Void)? = nil
) throws {
  try copyCheckpoint(from: source, selection: selection, castTo: dtype, progress: progress) { tensors, layout in
    var options = options
    if options.layout == nil { options.layout = layout }
    try options.takeEmbeddedFiles(of: source)
    return try CheckpointWriter(destination: destination, tensors: tensors, options: options)
  }
}

extension WriteOptions {
  /// Adds the model-folder files a `.mkz` input carries (config.json, tokenizer files ...) when
  /// no folder is copied from, so that `.mkz` -> folder restores a loadable model; files given
  /// already and skipped names keep precedence.
  public mutating func takeEmbeddedFiles(of source: any Checkpoint) throws {
    guard copyFilesFrom == nil, let file = source as? CompressedFile else { return }
    for name in file.embeddedFileNames where files[name] == nil && !skippedFiles.contains(name) {
      files[name] = try file.embeddedFile(name)
    }
  }
}

/// `copyCheckpoint` into the sink `makeSink(tensors, layout)` makes for the copied tensors
/// (`layout`: the source's files when the names are unchanged, so the copy can keep its sharding).
public func copyCheckpoint(
  from source: any Checkpoint, selection: TensorSelection? = nil, castTo dtype: DType? = nil,
  progress: ((Int, Int) -> Void)? = nil,
  into makeSink: (_ tensors: [TensorInfo], _ layout: [StoredFile]?) throws -> any TensorSink
) throws {
  let allNames = source.tensors.map(\.name)
  let names = try selection?.apply(to: allNames, file: source.path) ?? allNames.map { ($0, $0) }
  let plan: [(source: TensorInfo, target: TensorInfo)] = try names.map { pair in
    let info = try source.info(pair.source)
    let targetType = dtype.flatMap { info.dtype.isFloatingPoint ? $0 : nil } ?? info.dtype
    return (info, TensorInfo(name: pair.target, dtype: targetType, shape: info.shape))
  }
  let writer = try makeSink(plan.map(\.target), names.allSatisfy({ $0.source == $0.target }) ? source.files : nil)
  let total = plan.reduce(0) { $0 + $1.source.byteCount }
  var done = 0
  var scratch: [UInt8] = []
  for (from, to) in plan {
    try writer.beginTensor(to.name)
    try source.stream(from.name) { piece in
      if from.dtype == to.dtype {
        try writer.append(piece)
      } else {
        let count = piece.count / from.dtype.size
        if scratch.count < count * to.dtype.size { scratch = [UInt8](repeating: 0, count: count * to.dtype.size) }
        try scratch.withUnsafeMutableBytes { out in
          let target = UnsafeMutableRawBufferPointer(rebasing: out[0..<(count * to.dtype.size)])
          DTypeConversion.convert(piece, from: from.dtype, to: to.dtype, into: target)
          try writer.append(UnsafeRawBufferPointer(target))
        }
      }
      done += piece.count
      progress?(done, total)
    }
  }
  try writer.finish()
}
