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
