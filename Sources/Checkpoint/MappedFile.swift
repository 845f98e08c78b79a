import Foundation

#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// A read-only memory map of a whole file. Pages are loaded on first touch and can be dropped
/// from this process's resident set after use (`release`), so streaming over a large file keeps
/// memory flat. Small reads (`copiedReads`) are copied out with `pread` instead (`withBytes`).
final class MappedFile: @unchecked Sendable {
  let path: String
  let size: Int
  private let base: UnsafeRawPointer?
  /// Kept open for `pread`; -1 when `ReadDescriptors` has none to spare (reads then go
  /// through the mapping).
  private let descriptor: Int32

  /// Byte counts that `withBytes` copies into a pooled buffer with `pread` rather than reading
  /// through the mapping: reads under 256 KiB. A small read on its own through the mapping costs
  /// a fault and a release later; when TIES's threshold sample read its blocks one at a time
  /// through here (about a thousand reads of 64 elements per tensor and input), `pread` took its
  /// merge from 1.72 to 1.49 s on 1 GB (the sample now copies its blocks in batches, through
  /// `MappedTensors.copyBytes`). A streamed merge's ranges (256 Ki
  /// elements) are read through the mapping: the kernel maps the page cache's large folios a
  /// batch of pages per fault, so reading them costs about what reading memory costs (one core,
  /// 1 GB: 0.04 s mapped against 0.065-0.08 s through `pread`, whose copy writes every byte once
  /// more); on 3 x 1 GB merges this took 10-12% off every method's time (TIES 2.38 to 2.10
  /// CPU-s, linear 0.70 to 0.59) for 10-20 MB more resident pages. Files cached in 4 KiB pages
  /// read at the same speed either way (0.11 s a GB).
  static let copiedReads = 1..<(256 << 10)

  init(path: String) throws {
    self.path = path
    let (fd, size) = try InputFile.openRegular(path)
    self.size = size
    if size == 0 {
      close(fd)
      base = nil
      descriptor = -1
      return
    }
    let mapped = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
    guard let mapped, mapped != MAP_FAILED else {
      close(fd)
      throw CheckpointError.cannotOpen(file: path, reason: "mmap failed: \(String(cString: strerror(errno)))")
    }
    base = UnsafeRawPointer(mapped)
    if ReadDescriptors.shared.hold() {
      descriptor = fd
    } else {
      close(fd)
      descriptor = -1
    }
  }

  /// Whether reads of `copiedReads`'s sizes are copied with `pread` (a descriptor was kept).
  var copiesReads: Bool { descriptor >= 0 }

  deinit {
    if let base { munmap(UnsafeMutableRawPointer(mutating: base), size) }
    if descriptor >= 0 {
      close(descriptor)
      ReadDescriptors.shared.letGo()
    }
  }

  /// Calls `body` with bytes `range` of the file (valid only inside `body`): copied into a
  /// pooled buffer when the count is in `copiedReads`, else straight from the mapping (also the
  /// fallback when `pread` fails; the mapping then reports the problem as it always did). The
  /// caller has checked that the range is inside the file.
  func withBytes<R>(_ range: Range<Int>, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
    guard descriptor >= 0, Self.copiedReads.contains(range.count) else { return try body(bytes(range)) }
    let buffer = ReadBuffers.shared.take(range.count)
    defer { ReadBuffers.shared.give(buffer) }
    guard let start = buffer.baseAddress, read(range, into: start) else { return try body(bytes(range)) }
    return try body(UnsafeRawBufferPointer(start: start, count: range.count))
  }

  /// Copies bytes `range` of the file to `destination` with `pread`, which leaves this
  /// process's page tables alone; false (having copied some or none) when no descriptor was
  /// kept or a read fails, for the caller to copy from the mapping, which reports the problem
  /// as it always did. The caller has checked that the range is inside the file.
  func read(_ range: Range<Int>, into destination: UnsafeMutableRawPointer) -> Bool {
    guard descriptor >= 0 else { return false }
    var filled = 0
    while filled < range.count {
      let n = pread(descriptor, destination + filled, range.count - filled, off_t(range.lowerBound + filled))
      if n > 0 {
        filled += n
      } else if !(n < 0 && errno == EINTR) {
        return false
      }
    }
    return true
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
    return try map.withBytes((whole.lowerBound + part.lowerBound)..<(whole.lowerBound + part.upperBound), body)
  }

  /// Copies bytes `parts` of tensor `name` to `destination`, back to back (`Checkpoint.copyBytes`):
  /// one lookup, and each part read with `pread` (from the mapping where the file has no
  /// descriptor). A statistics sample reads a part every few KiB, so through the mapping each
  /// fault mapped a whole batch of the page cache's pages (a 2 MiB folio, or 64 KiB around it):
  /// the sample mapped, and later released, nearly every page of the tensor, which the next pass
  /// faulted in again. A part costs more by `pread` (0.73 us for 128 bytes against 0.27 us
  /// through the mapping, one core), but TIES's sample on 3 x 1 GB took 0.085-0.089 s of wall
  /// time against 0.22-0.48 s, and the whole merge 1.08-1.13 s against 1.26-1.59 s.
  func copyBytes(of name: String, parts: [Range<Int>], into destination: UnsafeMutableRawBufferPointer) throws {
    guard let whole = ranges[ExactName(name)] else { throw CheckpointError.missingTensor(file: path, tensor: name) }
    var offset = 0
    for part in parts {
      precondition(part.lowerBound >= 0 && part.upperBound <= whole.count, "byte range \(part) outside tensor \(name)")
      precondition(offset + part.count <= destination.count, "copyBytes: \(destination.count) bytes of room is too few")
      if let start = destination.baseAddress, !part.isEmpty {
        let fileRange = (whole.lowerBound + part.lowerBound)..<(whole.lowerBound + part.upperBound)
        if !map.read(fileRange, into: start + offset) {
          let source = map.bytes(fileRange)
          if let from = source.baseAddress { (start + offset).copyMemory(from: from, byteCount: source.count) }
        }
      }
      offset += part.count
    }
  }

  /// Drops the pages of bytes `range` (default: all) of tensor `name`.
  func release(_ name: String, range: Range<Int>?) {
    guard let whole = ranges[ExactName(name)] else { return }
    let part = range ?? 0..<whole.count
    map.release((whole.lowerBound + part.lowerBound)..<(whole.lowerBound + part.upperBound))
  }
}

/// Reusable buffers for `MappedFile.withBytes`'s copies, so that each streamed range does not
/// allocate (glibc would map and unmap a fresh region, faulting its pages in every time). A
/// buffer is taken for the length of one read; at most `kept` bytes wait in the pool.
final class ReadBuffers: @unchecked Sendable {
  static let shared = ReadBuffers()
  private let lock = NSLock()
  private var free: [UnsafeMutableRawBufferPointer] = []
  private var freeBytes = 0
  private let kept = 64 << 20

  /// A buffer of at least `count` bytes (64-byte aligned), from the pool when one fits.
  func take(_ count: Int) -> UnsafeMutableRawBufferPointer {
    let pooled: UnsafeMutableRawBufferPointer? = lock.withLock {
      guard let index = free.firstIndex(where: { $0.count >= count }) else { return nil }
      freeBytes -= free[index].count
      return free.remove(at: index)
    }
    if let pooled { return pooled }
    // Whole powers of two from 64 KiB, so that buffers fit the next read of a similar size.
    let capacity = max(64 << 10, 1 << (Int.bitWidth - (count - 1).leadingZeroBitCount))
    return UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 64)
  }

  /// Returns `buffer` to the pool, or frees it when the pool is full.
  func give(_ buffer: UnsafeMutableRawBufferPointer) {
    let pooled = lock.withLock {
      guard freeBytes + buffer.count <= kept else { return false }
      free.append(buffer)
      freeBytes += buffer.count
      return true
    }
    if !pooled { buffer.deallocate() }
  }
}

/// How many files `MappedFile` keeps open for `pread`: at most half the process's limit on open
/// files, so that inputs of many shards never run a merge out of descriptors (a file past the
/// cap is read through its mapping, as before `pread`; the mapping needs no descriptor).
final class ReadDescriptors: @unchecked Sendable {
  static let shared = ReadDescriptors()
  private let lock = NSLock()
  private var held = 0
  let cap: Int = {
    var limits = rlimit()
    #if os(Linux)
      let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
    #else
      let resource = RLIMIT_NOFILE
    #endif
    guard getrlimit(resource, &limits) == 0 else { return 0 }
    return Int(min(limits.rlim_cur, 1 << 20)) / 2
  }()

  /// Takes one of the descriptors the cap allows; false when none is left.
  func hold() -> Bool {
    lock.withLock {
      guard held < cap else { return false }
      held += 1
      return true
    }
  }

  func letGo() { lock.withLock { held -= 1 } }
}
