import Foundation
import Tensor

/// A PyTorch checkpoint (`pytorch_model.bin`, `.pt`, `.pth`) in the zip format torch has written
/// since 1.6: `<name>/data.pkl`, a pickle of the state dict, and `<name>/data/<key>`, one stored
/// (uncompressed) entry per storage. The archive is memory-mapped; the pickle is read by
/// `Pickle`, which executes nothing and accepts only what a state dict needs. Each tensor is
/// a contiguous run of its storage, so it reads like a safetensors tensor, bit for bit.
public final class PyTorchFile: Checkpoint, @unchecked Sendable {
  public let path: String
  public let tensors: [TensorInfo]
  public let metadata: [String: String] = [:]
  public let files: [StoredFile]
  private let stored: MappedTensors
  /// The storage entries, for `verify`: byte range and the zip's CRC-32.
  private let entries: [(name: String, range: Range<Int>, crc: UInt32)]

  /// The pickle is read whole; a state dict's is small (names and shapes), so this is generous.
  static let maxPickleSize = 256 << 20

  /// Opens and validates `path`. Throws `CheckpointError.invalidPyTorch` naming what is wrong:
  /// a compressed or truncated entry, a global other than a state dict's, a tensor outside its
  /// storage or not stored contiguously.
  public init(path: String) throws {
    self.path = path
    let map = try MappedFile(path: path)
    func fail(_ reason: String) -> CheckpointError { .invalidPyTorch(file: path, reason: reason) }
    let zip = try ZipDirectory(map.bytes(0..<map.size), fail: fail)
    guard let pickleName = zip.entries.keys.filter({ $0 == "data.pkl" || $0.hasSuffix("/data.pkl") }).min() else {
      throw fail("the archive has no data.pkl")
    }
    let prefix = String(pickleName.dropLast("data.pkl".count))
    if let order = zip.entries[prefix + "byteorder"] {
      let text = String(decoding: map.bytes(order.range), as: UTF8.self)
      guard text == "little" else { throw fail("its tensors are stored \(text)-endian") }
    }
    guard let pickleEntry = zip.entries[pickleName], pickleEntry.range.count <= Self.maxPickleSize else {
      throw fail("data.pkl is larger than \(Self.maxPickleSize) bytes")
    }
    let root: Pickle.Value
    do { root = try Pickle.load(map.bytes(pickleEntry.range)) } catch Pickle.Failure.invalid(let reason) {
      throw fail("data.pkl \(reason)")
    }
    var ranges: [ExactName: Range<Int>] = [:]
    var infos: [ExactName: TensorInfo] = [:]
    var tensors: [TensorInfo] = []
    var used: [String: (name: String, range: Range<Int>, crc: UInt32)] = [:]
    for (name, reference) in try Self.stateDict(root, fail: fail) {
      guard let entry = zip.entries[prefix + "data/" + reference.storage] else {
        throw fail("tensor '\(name)' uses storage \(reference.storage), which the archive lacks")
      }
      let size = reference.dtype.size
      guard let count = checkedProduct(reference.shape), reference.offset >= 0,
        let end = Optional(reference.offset.addingReportingOverflow(count)), !end.overflow,
        end.partialValue <= reference.storageElements,
        let storageBytes = Optional(reference.storageElements.multipliedReportingOverflow(by: size)),
        !storageBytes.overflow, storageBytes.partialValue <= entry.range.count
      else {
        throw fail("tensor '\(name)' (shape \(reference.shape)) lies outside its storage \(reference.storage)")
      }
      guard Self.isContiguous(shape: reference.shape, strides: reference.strides) else {
        throw fail(
          "tensor '\(name)' is a strided view (stride \(reference.strides)); save it with contiguous tensors")
      }
      let start = entry.range.lowerBound + reference.offset * size
      let range = start..<(start + count * size)
      guard infos[ExactName(name)] == nil else { throw CheckpointError.duplicateTensor(file: path, tensor: name) }
      let info = TensorInfo(name: name, dtype: reference.dtype, shape: reference.shape)
      ranges[ExactName(name)] = range
      infos[ExactName(name)] = info
      tensors.append(info)
      used[reference.storage] = (prefix + "data/" + reference.storage, entry.range, entry.crc)
    }
    guard !tensors.isEmpty else { throw fail("data.pkl holds no tensors") }
    self.tensors = tensors
    stored = MappedTensors(path: path, map: map, ranges: ranges, infos: infos)
    entries = used.values.sorted { $0.range.lowerBound < $1.range.lowerBound }
    // Written out, the shards become safetensors: pytorch_model-00001-of-00002.bin ->
    // model-00001-of-00002.safetensors.
    let stem = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
    let renamed = stem.hasPrefix("pytorch_model") ? "model" + stem.dropFirst("pytorch_model".count) : Substring(stem)
    files = [StoredFile(name: renamed + ".safetensors", tensors: tensors.map(\.name))]
  }

  /// The tensors of a state dict (or of the state dict under `state_dict`, `model` or
  /// `module`), in its order; entries that are not tensors (an epoch number) are skipped.
  static func stateDict(_ root: Pickle.Value, fail: (String) -> CheckpointError) throws -> [(
    String, Pickle.TensorReference
  )] {
    guard case .dict(let box) = root else { throw fail("data.pkl does not hold a dict of tensors") }
    var result: [(String, Pickle.TensorReference)] = []
    for (key, value) in box.value {
      guard let name = key.text else { throw fail("data.pkl has a key that is not a string") }
      if case .tensor(let reference) = value { result.append((name, reference)) }
    }
    if result.isEmpty {
      for (key, value) in box.value where ["state_dict", "model", "module"].contains(key.text ?? "") {
        if case .dict = value { return try stateDict(value, fail: fail) }
      }
    }
    return result
  }

  /// Whether strides describe the row-major layout of `shape` (dimensions of size 1 aside).
  static func isContiguous(shape: [Int], strides: [Int]) -> Bool {
    var expected = 1
    for (size, stride) in zip(shape, strides).reversed() {
      if size != 1 && stride != expected { return false }
      let (next, overflow) = expected.multipliedReportingOverflow(by: max(size, 1))
      if overflow { return false }
      expected = next
    }
    return true
  }

  public func lookup(_ name: String) -> TensorInfo? { stored.lookup(name) }

  /// Where tensor `name`'s bytes lie in the archive.
  func byteRange(of name: String) -> Range<Int>? { stored.ranges[ExactName(name)] }

  public func file(of name: String) -> String? { stored.lookup(name) == nil ? nil : path }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  { try stored.withBytes(of: name, range: range, body) }

  public func copyBytes(of name: String, parts: [Range<Int>], into destination: UnsafeMutableRawBufferPointer) throws {
    try stored.copyBytes(of: name, parts: parts, into: destination)
  }

  public func release(_ name: String, range: Range<Int>?) { stored.release(name, range: range) }

  /// Checks every storage entry against the CRC-32 the archive records for it.
  public func verify(progress: ((Int, Int) -> Void)?) throws {
    let total = entries.reduce(0) { $0 + $1.range.count }
    var done = 0
    for entry in entries {
      var crc = CRC32()
      var start = entry.range.lowerBound
      while start < entry.range.upperBound {
        let end = min(entry.range.upperBound, start + (8 << 20))
        crc.update(stored.map.bytes(start..<end))
        stored.map.release(start..<end)
        done += end - start
        progress?(done, total)
        start = end
      }
      guard crc.value == entry.crc else {
        throw CheckpointError.invalidPyTorch(
          file: path, reason: "entry \(entry.name) does not match its CRC-32 (the file is damaged)")
      }
    }
  }
}

/// The central directory of a zip archive: each stored entry's data range and CRC-32 (ZIP64
/// sizes and offsets included). Entries must be stored, not compressed, as torch writes them.
struct ZipDirectory {
  struct Entry {
    var range: Range<Int>
    var crc: UInt32
  }

  var entries: [String: Entry] = [:]

  init(_ bytes: UnsafeRawBufferPointer, fail: (String) -> CheckpointError) throws {
    func u16(_ at: Int) -> Int { Int(bytes[at]) | Int(bytes[at + 1]) << 8 }
    func u32(_ at: Int) -> Int { u16(at) | u16(at + 2) << 16 }
    func u64(_ at: Int) throws -> Int {
      let value = UInt64(u32(at)) | UInt64(u32(at + 4)) << 32
      guard let result = Int(exactly: value), result <= bytes.count else { throw fail("a ZIP64 field past the end") }
      return result
    }
    let size = bytes.count
    guard size >= 22 else { throw fail("too short to be a zip archive") }
    // The end-of-central-directory record, within the last 64 KiB + 22 bytes.
    var eocd = -1
    var at = size - 22
    while at >= max(0, size - 22 - 65535) {
      if u32(at) == 0x0605_4B50 {
        eocd = at
        break
      }
      at -= 1
    }
    guard eocd >= 0 else { throw fail("no end of central directory (truncated?)") }
    var count = u16(eocd + 10)
    var directorySize = u32(eocd + 12)
    var directoryStart = u32(eocd + 16)
    if count == 0xFFFF || directorySize == 0xFFFF_FFFF || directoryStart == 0xFFFF_FFFF {
      let locator = eocd - 20
      guard locator >= 0, u32(locator) == 0x0706_4B50 else { throw fail("a ZIP64 archive without its locator") }
      let record = try u64(locator + 8)
      guard record + 56 <= size, u32(record) == 0x0606_4B50 else { throw fail("a ZIP64 record out of place") }
      count = try u64(record + 32)
      directorySize = try u64(record + 40)
      directoryStart = try u64(record + 48)
    }
    guard directoryStart <= size, directorySize <= size - directoryStart, count <= directorySize / 46 + 1 else {
      throw fail("a central directory outside the file")
    }
    var position = directoryStart
    for _ in 0..<count {
      guard position + 46 <= size, u32(position) == 0x0201_4B50 else { throw fail("a damaged central directory") }
      let method = u16(position + 10)
      let crc = UInt32(u32(position + 16))
      var compressed = u32(position + 20)
      var uncompressed = u32(position + 24)
      let nameLength = u16(position + 28)
      let extraLength = u16(position + 30)
      let commentLength = u16(position + 32)
      var local = u32(position + 42)
      let nameStart = position + 46
      guard nameStart + nameLength + extraLength + commentLength <= size else {
        throw fail("a central directory entry past the end")
      }
      let name = String(
        decoding: UnsafeRawBufferPointer(rebasing: bytes[nameStart..<(nameStart + nameLength)]), as: UTF8.self)
      // ZIP64: the extra field 0x0001 holds the 64-bit values that are 0xFFFFFFFF above.
      var extra = nameStart + nameLength
      let extraEnd = extra + extraLength
      while extra + 4 <= extraEnd {
        let (id, length) = (u16(extra), u16(extra + 2))
        var field = extra + 4
        if id == 0x0001 {
          if uncompressed == 0xFFFF_FFFF, field + 8 <= extraEnd {
            uncompressed = try u64(field)
            field += 8
          }
          if compressed == 0xFFFF_FFFF, field + 8 <= extraEnd {
            compressed = try u64(field)
            field += 8
          }
          if local == 0xFFFF_FFFF, field + 8 <= extraEnd { local = try u64(field) }
        }
        extra += 4 + length
      }
      guard method == 0, compressed == uncompressed else {
        throw fail("entry \(name) is compressed (method \(method)); torch.save writes stored entries")
      }
      guard local + 30 <= size, u32(local) == 0x0403_4B50 else { throw fail("entry \(name) has no local header") }
      let dataStart = local + 30 + u16(local + 26) + u16(local + 28)
      guard dataStart <= size, uncompressed <= size - dataStart else {
        throw fail("entry \(name) runs past the end of the file (truncated?)")
      }
      entries[name] = Entry(range: dataStart..<(dataStart + uncompressed), crc: crc)
      position = extraEnd + commentLength
    }
  }
}

/// CRC-32 (IEEE 802.3, as zip uses it).
struct CRC32 {
  static let table: [UInt32] = (0..<256).map { n in
    var c = UInt32(n)
    for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
    return c
  }

  private var state: UInt32 = 0xFFFF_FFFF

  mutating func update(_ bytes: UnsafeRawBufferPointer) {
    var c = state
    for byte in bytes { c = Self.table[Int((c ^ UInt32(byte)) & 0xFF)] ^ (c >> 8) }
    state = c
  }

  var value: UInt32 { state ^ 0xFFFF_FFFF }
}
