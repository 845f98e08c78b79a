import Foundation

#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// A read-only memory map of a whole file. Pages are loaded on first touch and can be dropped
/// from this process's resident set after use (`release`), so streaming over a large file keeps
/// memory flat.
final class MappedFile: @unchecked Sendable {
  let path: String
  let size: Int
  private let base: UnsafeRawPointer?

  init(path: String) throws {
    self.path = path
    let (fd, size) = try InputFile.openRegular(path)
    defer { close(fd) }
    self.size = size
    if size == 0 {
      base = nil
      return
    }
    let mapped = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
    guard let mapped, mapped != MAP_FAILED else {
      throw CheckpointError.cannotOpen(file: path, reason: "mmap failed: \(String(cString: strerror(errno)))")
    }
    base = UnsafeRawPointer(mapped)
  }

  deinit {
    if let base { munmap(UnsafeMutableRawPointer(mutating: base), size) }
  }

  /// Bytes `range` of the file; the caller has checked that the range is inside the file.
  func bytes(_ range: Range<Int>) -> UnsafeRawBufferPointer {
    precondition(range.lowerBound >= 0 && range.upperBound <= size, "range \(range) outside \(path)")
    guard let base else { return UnsafeRawBufferPointer(start: nil, count: 0) }
    return UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count)
  }

  /// Tells the kernel that the pages of `range` are no longer needed by this process (they stay
  /// in the page cache); keeps the resident set flat while streaming.
  func release(_ range: Range<Int>) {
    guard let base, !range.isEmpty else { return }
    let page = Int(sysconf(Int32(_SC_PAGESIZE)))
    let start = (range.lowerBound + page - 1) / page * page
    let end = range.upperBound / page * page
    guard end > start else { return }
    madvise(UnsafeMutableRawPointer(mutating: base + start), end - start, Int32(MADV_DONTNEED))
  }
}

/// Tensors stored as plain byte ranges of one memory-mapped file (a safetensors file, the stored
/// entries of a PyTorch zip): lookups, reads and page releases by name, shared by the readers.
struct MappedTensors {
  let path: String
  let map: MappedFile
  let ranges: [ExactName: Range<Int>]
  let infos: [ExactName: TensorInfo]

  func lookup(_ name: String) -> TensorInfo? { infos[ExactName(name)] }

  /// Calls `body` with bytes `range` (default: all) of tensor `name`, straight from the mapping.
  func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
    guard let whole = ranges[ExactName(name)] else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    let part = range ?? 0..<whole.count
    precondition(part.lowerBound >= 0 && part.upperBound <= whole.count, "byte range \(part) outside tensor \(name)")
    return try body(map.bytes((whole.lowerBound + part.lowerBound)..<(whole.lowerBound + part.upperBound)))
  }

  /// Drops the pages of bytes `range` (default: all) of tensor `name`.
  func release(_ name: String, range: Range<Int>?) {
    guard let whole = ranges[ExactName(name)] else { return }
    let part = range ?? 0..<whole.count
    map.release((whole.lowerBound + part.lowerBound)..<(whole.lowerBound + part.upperBound))
  }
}
