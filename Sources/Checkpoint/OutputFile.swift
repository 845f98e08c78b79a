import Foundation
import Tensor

#if canImport(CSystem) && os(Linux)
  import CSystem
#endif
#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// A file being written under a temporary name next to its destination. Nothing appears at the
/// destination until `publish()` renames it into place; `discard()` (or an error) removes it.
/// Every write error (a full disk included) is a `CheckpointError.cannotWrite` naming the file.
///
/// Writes are staged: bytes are copied into one of four 1 MiB buffers and written by a background
/// queue, so the kernel's copy into the page cache overlaps the caller's compression or decoding;
/// arrays handed over (`write(owned:)`) are queued as they are, without the copy. A write error
/// surfaces at the next `write` or at `publish`.
///
/// Why 1 MiB: where the page cache uses large folios (ext4 on Linux 6.x), a write of 2 MiB or
/// more gets 2 MiB folios, and copying into those was 4-12x slower in most runs (0.5-1.2 CPU-s
/// per GB written during a TIES merge of 3 x 1 GB, against 0.09-0.14 s with writes of 256 KiB
/// to 1 MiB in every run).
final class OutputFile: @unchecked Sendable {
  let destination: String
  let temporaryPath: String
  private var fd: Int32
  /// Bytes accepted so far (the file offset the next write lands at).
  private(set) var bytesWritten = 0
  /// The size `reserve` gave the file; `publish` cuts the file to `bytesWritten` if less came.
  private var reserved = 0

  private static let stagingSize = 1 << 20
  private static let stagingCount = 4
  private let queue = DispatchQueue(label: "mergekit.output")
  private let free = DispatchSemaphore(value: OutputFile.stagingCount)
  private var staging: [UnsafeMutableRawBufferPointer] = []
  private var nextStaging = 0
  private var current: (buffer: UnsafeMutableRawBufferPointer, filled: Int)?
  /// Handed-over arrays not yet queued (`write(owned:)`), and their bytes.
  private var gathered: [[UInt8]] = []
  private var gatheredBytes = 0
  private let errorLock = NSLock()
  private var failure: CheckpointError?

  init(destination: String) throws {
    self.destination = destination
    temporaryPath = TemporaryOutputs.path(for: destination, tag: String(UInt32.random(in: 0...UInt32.max)))
    fd = open(temporaryPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else {
      throw CheckpointError.cannotWrite(file: destination, reason: String(cString: strerror(errno)))
    }
    TemporaryOutputs.register(temporaryPath)
    staging = (0..<Self.stagingCount).map { _ in .allocate(byteCount: Self.stagingSize, alignment: 64) }
  }

  deinit {
    discard()
    // A staging buffer taken but never submitted still holds a semaphore count; libdispatch
    // refuses to destroy a semaphore below its initial value.
    if current != nil {
      current = nil
      free.signal()
    }
    queue.sync {}
    staging.forEach { $0.deallocate() }
  }

  /// Allocates the disk blocks of the whole file before it is written, when its size is known
  /// (a safetensors file): the page-cache writes then skip ext4's per-page block reservation
  /// (1 GB written in 0.09-0.12 s instead of 0.16-0.17 s), and a disk too small for the output
  /// fails here, before any work, with `cannotWrite`. Where the file system cannot preallocate,
  /// the file is written as usual.
  func reserve(_ size: Int) throws {
    #if canImport(CSystem) && os(Linux)
      guard size > 0, bytesWritten == 0, fd >= 0 else { return }
      if mergekit_preallocate(fd, Int64(size)) == 0 {
        reserved = size
      } else if errno == ENOSPC || errno == EDQUOT || errno == EFBIG {
        throw CheckpointError.cannotWrite(
          file: destination, reason: "\(String(cString: strerror(errno))) (the file needs \(size) bytes)")
      }
    #endif
  }

  /// Appends bytes (copied; the caller may reuse its buffer at once).
  func write(_ buffer: UnsafeRawBufferPointer) throws {
    try throwIfFailed()
    if !buffer.isEmpty { submitGathered() }
    var remaining = buffer
    while !remaining.isEmpty {
      if current == nil {
        // Writes finish in submission order, so the buffer after the last submitted one is the
        // first to come free.
        free.wait()
        current = (staging[nextStaging], 0)
        nextStaging = (nextStaging + 1) % Self.stagingCount
      }
      guard let (target, filled) = current else { break }
      let n = min(Self.stagingSize - filled, remaining.count)
      UnsafeMutableRawBufferPointer(rebasing: target[filled..<(filled + n)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: remaining[0..<n]))
      current = (target, filled + n)
      bytesWritten += n
      remaining = UnsafeRawBufferPointer(rebasing: remaining[n...])
      if filled + n == Self.stagingSize { submit() }
    }
  }

  func write(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try write($0) } }

  /// Appends bytes the caller hands over, without copying them. Arrays are gathered until they
  /// hold a staging buffer's worth (never twice that), then queued after everything accepted
  /// before and written with `writev`, a staging buffer's worth a call: the page cache sizes its
  /// folios by the write, and writes of 512 KiB cost more system time than writes of 1 MiB (see the note on write sizes
  /// above). A group takes one of the staging buffers' turns, so at most `stagingCount` writes
  /// of either kind wait; writes still finish in submission order, so a staging buffer is free
  /// whenever a turn is.
  func write(owned bytes: [UInt8]) throws {
    try throwIfFailed()
    guard !bytes.isEmpty else { return }
    submit()
    if gatheredBytes > 0 && gatheredBytes + bytes.count >= 2 * Self.stagingSize { submitGathered() }
    gathered.append(bytes)
    gatheredBytes += bytes.count
    bytesWritten += bytes.count
    if gatheredBytes >= Self.stagingSize { submitGathered() }
  }

  /// Hands the gathered arrays to the background queue as one write.
  private func submitGathered() {
    guard !gathered.isEmpty else { return }
    let group = gathered
    gathered = []
    gatheredBytes = 0
    free.wait()
    let fd = self.fd
    queue.async { [self] in
      if errorLock.withLock({ failure == nil }) {
        Kernels.withBytes(of: group) { pieces in
          if let reason = Self.writeAll(fd, pieces) {
            errorLock.withLock { failure = .cannotWrite(file: destination, reason: reason) }
          }
        }
      }
      free.signal()
    }
  }

  /// Writes every piece in order with `writev`, at most `stagingSize` bytes a call (a larger
  /// piece in parts), resuming after partial writes; returns the error's text if one fails.
  private static func writeAll(_ fd: Int32, _ pieces: [UnsafeRawBufferPointer]) -> String? {
    var vectors = pieces.filter { $0.count > 0 }.map {
      iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
    }
    var first = 0
    while first < vectors.count {
      // The next call: whole pieces while they fit, else the first piece's next part.
      var (count, total) = (0, 0)
      while first + count < vectors.count && count < 512 && total + vectors[first + count].iov_len <= stagingSize {
        total += vectors[first + count].iov_len
        count += 1
      }
      let written = vectors.withUnsafeMutableBufferPointer { v -> Int in
        guard let start = v.baseAddress else { return 0 }
        if count > 0 { return writev(fd, start + first, Int32(count)) }
        var part = v[first]
        part.iov_len = stagingSize
        return writev(fd, &part, 1)
      }
      if written < 0 {
        if errno == EINTR { continue }
        return String(cString: strerror(errno))
      }
      if written == 0 { return "the write made no progress" }
      var left = written
      while left > 0 && first < vectors.count {
        if left >= vectors[first].iov_len {
          left -= vectors[first].iov_len
          first += 1
        } else {
          vectors[first].iov_base = vectors[first].iov_base.map { $0 + left }
          vectors[first].iov_len -= left
          left = 0
        }
      }
    }
    return nil
  }

  /// Hands the current staging buffer to the background queue.
  private func submit() {
    guard let (buffer, filled) = current, let start = buffer.baseAddress else { return }
    current = nil
    let fd = self.fd
    let staged = StagedBytes(start: UnsafeRawPointer(start))
    queue.async { [self] in
      if errorLock.withLock({ failure == nil }) {
        var p = staged.start
        var left = filled
        while left > 0 {
          let n = Glibc.write(fd, p, left)
          if n < 0 {
            if errno == EINTR { continue }
            let reason = String(cString: strerror(errno))
            errorLock.withLock { failure = .cannotWrite(file: destination, reason: reason) }
            break
          }
          p += n
          left -= n
        }
      }
      free.signal()
    }
  }

  private func throwIfFailed() throws {
    if let failure = errorLock.withLock({ failure }) { throw failure }
  }

  /// Waits until everything accepted so far is written; throws the first write error.
  private func drain() throws {
    submitGathered()
    submit()
    queue.sync {}
    try throwIfFailed()
  }

  /// Whether `publish` flushes to disk first (`MERGEKIT_FSYNC=1`): survives power loss, at the
  /// disk's write speed. Without it the rename still guarantees that a failed or interrupted run
  /// never leaves a partial file at the destination.
  static let syncsToDisk = ProcessInfo.processInfo.environment["MERGEKIT_FSYNC"] == "1"

  /// Renames the finished file onto the destination (flushing it to disk first if asked).
  func publish() throws {
    guard fd >= 0 else { throw CheckpointError.cannotWrite(file: destination, reason: "already closed") }
    try drain()
    if reserved > bytesWritten && ftruncate(fd, off_t(bytesWritten)) != 0 {
      throw CheckpointError.cannotWrite(file: destination, reason: String(cString: strerror(errno)))
    }
    if Self.syncsToDisk && fsync(fd) != 0 {
      throw CheckpointError.cannotWrite(file: destination, reason: String(cString: strerror(errno)))
    }
    close(fd)
    fd = -1
    defer { TemporaryOutputs.unregister(temporaryPath) }
    if rename(temporaryPath, destination) != 0 {
      let reason = String(cString: strerror(errno))
      unlink(temporaryPath)
      throw CheckpointError.cannotWrite(file: destination, reason: reason)
    }
  }

  /// Closes and deletes the temporary file (no-op after `publish`).
  func discard() {
    guard fd >= 0 else { return }
    queue.sync {}
    close(fd)
    fd = -1
    unlink(temporaryPath)
    TemporaryOutputs.unregister(temporaryPath)
  }
}

/// Writes a small file (a report, token sequences, coefficients) the way checkpoints are
/// written: under a recognisable temporary name, removed on interrupt, renamed into place when
/// complete. Throws `cannotWrite` naming the file.
public func writeFileAtomically(_ bytes: [UInt8], to path: String) throws {
  let file = try OutputFile(destination: path)
  try file.write(bytes)
  try file.publish()
}

/// A staging buffer handed to the writer queue; the semaphore guarantees nobody else touches it
/// until the write is done.
private struct StagedBytes: @unchecked Sendable {
  let start: UnsafeRawPointer
}

/// The temporary files and work folders of outputs still being written, so that an interrupted
/// command (Ctrl-C, `kill`, a closed terminal) can delete them instead of leaving hidden
/// multi-gigabyte files behind, and so that a later run can recognise and delete the ones a
/// killed or crashed process could not.
///
/// Every temporary is named `.<destination name>.mergekit-tmp-<pid>[-<tag>]` (hidden, next to
/// its destination). Before the first temporary of a process is created in a folder, the folder
/// is swept: temporaries whose process no longer exists are removed, and each is reported.
public enum TemporaryOutputs {
  nonisolated(unsafe) private static var paths = Set<String>()
  nonisolated(unsafe) private static var sweptFolders = Set<String>()
  private static let lock = NSLock()
  static let marker = ".mergekit-tmp-"

  /// Where removals of stale temporaries are reported (standard error by default).
  nonisolated(unsafe) public static var report: @Sendable (String) -> Void = { line in
    FileHandle.standardError.write(Data((line + "\n").utf8))
  }

  /// A temporary path for `destination` owned by this process, in the same folder (so that
  /// publishing is a rename); `tag` tells several temporaries of one destination apart. The
  /// folder is swept of stale temporaries first.
  public static func path(for destination: String, tag: String? = nil) -> String {
    let url = URL(fileURLWithPath: destination)
    let folder = url.deletingLastPathComponent().path
    removeStale(in: folder)
    let name = ".\(url.lastPathComponent)\(marker)\(getpid())" + (tag.map { "-" + $0 } ?? "")
    return folder == "/" ? "/" + name : folder + "/" + name
  }

  /// The process id a temporary's name carries, or nil for any other name.
  static func owner(ofTemporary name: String) -> pid_t? {
    guard name.hasPrefix("."), let range = name.range(of: marker, options: .backwards) else { return nil }
    let digits = name[range.upperBound...].prefix { $0.isASCII && $0.isNumber }
    let rest = name[range.upperBound...].dropFirst(digits.count)
    guard !digits.isEmpty, digits.count <= 10, rest.isEmpty || rest.hasPrefix("-") || rest.hasPrefix(".") else {
      return nil
    }
    return pid_t(digits)
  }

  /// Removes, once per folder and process, the temporaries in `folder` whose owning process no
  /// longer runs (killed with SIGKILL, crashed, or the machine restarted), reporting each.
  public static func removeStale(in folder: String) {
    let key = URL(fileURLWithPath: folder).standardizedFileURL.path
    guard lock.withLock({ sweptFolders.insert(key).inserted }) else { return }
    let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
    for name in names {
      guard let pid = owner(ofTemporary: name), pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else { continue }
      let path = "\(folder)/\(name)"
      if (try? FileManager.default.removeItem(atPath: path)) != nil {
        report("mergekit: removed \(path), left behind by process \(pid), which no longer runs")
      }
    }
  }

  /// Marks a temporary file or folder for deletion if the process is interrupted.
  public static func register(_ path: String) { _ = lock.withLock { paths.insert(path) } }
  public static func unregister(_ path: String) { _ = lock.withLock { paths.remove(path) } }

  /// Deletes every unfinished output's temporary file or folder (for signal handlers;
  /// destinations are untouched).
  public static func removeAll() {
    for path in lock.withLock({ paths }) { try? FileManager.default.removeItem(atPath: path) }
  }
}
