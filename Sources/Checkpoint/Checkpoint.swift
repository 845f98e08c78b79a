import Tensor

/// Name, dtype and shape of one stored tensor.
public struct TensorInfo: Sendable, Equatable, Hashable {
  public var name: String
  public var dtype: DType
  public var shape: [Int]

  public init(name: String, dtype: DType, shape: [Int]) {
    self.name = name
    self.dtype = dtype
    self.shape = shape
  }

  /// Number of elements.
  public var count: Int { shape.reduce(1, *) }
  /// Stored size in bytes.
  public var byteCount: Int { count * dtype.size }
  /// Bytes per row (`shape[0]` rows; a scalar or vector has rows of one element).
  public var rowByteCount: Int { (shape.count >= 2 ? shape.dropFirst().reduce(1, *) : 1) * dtype.size }
  /// Number of rows (`shape[0]`, or 1 for a scalar).
  public var rowCount: Int { shape.first ?? 1 }
}

/// One physical file of a checkpoint: its name, its tensors in data order and, when known, the
/// safetensors header it was read from (kept so that safetensors -> .mkz -> safetensors is
/// bit-identical, header bytes included).
public struct StoredFile: Sendable, Equatable {
  public var name: String
  public var tensors: [String]
  public var safetensorsHeader: [UInt8]?

  public init(name: String, tensors: [String], safetensorsHeader: [UInt8]? = nil) {
    self.name = name
    self.tensors = tensors
    self.safetensorsHeader = safetensorsHeader
  }
}

/// A checkpoint opened for reading: its tensor table is parsed and validated on open, and tensor
/// bytes are read on demand (memory-mapped, or decoded chunk by chunk).
///
/// ```swift
/// let model = try openCheckpoint("models/base")           // file or folder, any format
/// for info in model.tensors { print(info.name, info.dtype, info.shape) }
/// let embedding = try model.read("model.embed_tokens.weight").decoded()   // a Float Tensor
/// ```
public protocol Checkpoint: AnyObject, Sendable {
  /// The file or folder this checkpoint was opened from (used in messages).
  var path: String { get }
  /// Every tensor, in storage order.
  var tensors: [TensorInfo] { get }
  /// The string metadata (`__metadata__` for safetensors).
  var metadata: [String: String] { get }
  /// The files the tensors are stored in (one, or one per shard).
  var files: [StoredFile] { get }
  /// The entry for tensor `name`, or nil (a dictionary lookup).
  func lookup(_ name: String) -> TensorInfo?
  /// The file that holds tensor `name` (for messages), or nil when there is none.
  func file(of name: String) -> String?
  /// Calls `body` with bytes `range` (default: all) of tensor `name`. The buffer is valid only
  /// inside `body`. Throws `missingTensor`, or a decoding error naming the chunk.
  func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R
  /// Copies bytes `parts` (ranges inside the tensor's bytes) of tensor `name` to `destination`,
  /// back to back in the order given, for reads of many short pieces (a statistics sample reads
  /// thousands a tensor): a memory-mapped file finds the tensor once and copies each piece
  /// straight from the page cache. Traps when `destination` has too little room. Throws as
  /// `withBytes` does.
  func copyBytes(of name: String, parts: [Range<Int>], into destination: UnsafeMutableRawBufferPointer) throws
  /// Drops the pages of bytes `range` (default: all) of tensor `name` from this process's memory
  /// after a streaming pass; a hint that may do nothing.
  func release(_ name: String, range: Range<Int>?)
  /// Checks everything that can be checked without another file: structure (already done on
  /// open) and every checksum. `progress` receives (bytes done, bytes total).
  func verify(progress: ((Int, Int) -> Void)?) throws
}

extension Checkpoint {
  /// The entry for `name`, or `missingTensor`.
  public func info(_ name: String) throws -> TensorInfo {
    guard let info = lookup(name) else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    return info
  }

  /// `copyBytes` through `withBytes`, a part at a time (checkpoints that decode their pieces).
  public func copyBytes(of name: String, parts: [Range<Int>], into destination: UnsafeMutableRawBufferPointer) throws {
    var offset = 0
    for part in parts {
      precondition(offset + part.count <= destination.count, "copyBytes: \(destination.count) bytes of room is too few")
      try withBytes(of: name, range: part) { bytes in
        UnsafeMutableRawBufferPointer(rebasing: destination[offset..<(offset + bytes.count)]).copyMemory(from: bytes)
      }
      offset += part.count
    }
  }

  /// Total stored bytes of all tensors.
  public var totalByteCount: Int { tensors.reduce(0) { $0 + $1.byteCount } }

  /// The whole tensor as stored (bit-exact bytes).
  public func read(_ name: String) throws -> TensorData {
    let info = try info(name)
    let bytes = try withBytes(of: name, range: nil) { Array($0) }
    return TensorData(dtype: info.dtype, shape: info.shape, bytes: bytes)
  }

  /// Rows `rows` of a tensor (along its first dimension), as stored. Only the chunks that hold
  /// those rows are decoded.
  public func readRows(_ name: String, _ rows: Range<Int>) throws -> TensorData {
    let info = try info(name)
    guard rows.lowerBound >= 0, rows.upperBound <= info.rowCount else {
      throw CheckpointError.rowRangeOutOfBounds(file: path, tensor: name, rows: rows, available: info.rowCount)
    }
    let byteRange = (rows.lowerBound * info.rowByteCount)..<(rows.upperBound * info.rowByteCount)
    let bytes = try withBytes(of: name, range: byteRange) { Array($0) }
    var shape = info.shape
    if shape.isEmpty { shape = [rows.count] } else { shape[0] = rows.count }
    return TensorData(dtype: info.dtype, shape: shape, bytes: bytes)
  }

  /// The tensor decoded to `Float`.
  public func tensor(named name: String) throws -> Tensor {
    let info = try info(name)
    return try withBytes(of: name, range: nil) { Tensor(decoding: $0, dtype: info.dtype, shape: info.shape) }
  }

  /// Streams tensor `name` in pieces of at most `pieceSize` bytes (a multiple of 8, so pieces
  /// hold whole elements), releasing each piece's pages after use: memory stays at one piece.
  public func stream(_ name: String, pieceSize: Int = 8 << 20, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
    precondition(pieceSize > 0 && pieceSize % 8 == 0)
    let total = try info(name).byteCount
    var start = 0
    repeat {
      let end = min(total, start + pieceSize)
      try withBytes(of: name, range: start..<end, body)
      release(name, range: start..<end)
      start = end
    } while start < total
  }
}

/// A tensor name compared by its exact UTF-8 bytes. Swift's `String` equality treats
/// canonically equivalent texts as equal ("é" precomposed and "e" plus a combining accent), but
/// tensor names are byte strings in every format: two names that differ in a byte are two
/// tensors. Lookups and duplicate checks key by this.
public struct ExactName: Hashable, Sendable {
  public let name: String
  public init(_ name: String) { self.name = name }

  /// Compares the contiguous UTF-8 bytes (the generic `utf8.elementsEqual` walked them a byte
  /// at a time through the string's index machinery: a streamed merge looks names up for
  /// every range read).
  public static func == (a: ExactName, b: ExactName) -> Bool {
    guard a.name.utf8.count == b.name.utf8.count else { return false }
    var (x, y) = (a.name, b.name)  // share storage; made contiguous only if bridged
    return x.withUTF8 { p in y.withUTF8 { q in p.elementsEqual(q) } }
  }

  public func hash(into hasher: inout Hasher) {
    var contiguous = name  // shares storage; made contiguous only if bridged
    contiguous.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
  }
}
