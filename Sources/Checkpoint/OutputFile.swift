import Foundation

#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// A file being written under a temporary name next to its destination. Nothing appears at the
/// destination until `publish()` renames it into place; `discard()` (or an error) removes it.
/// Every write error (a full disk included) is a `CheckpointError.cannotWrite` naming the file.
final class OutputFile {
  let destination: String
  let temporaryPath: String
  private var fd: Int32
  private(set) var bytesWritten = 0

  init(destination: String) throws {
    self.destination = destination
    let url = URL(fileURLWithPath: destination)
    temporaryPath = url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    fd = open(temporaryPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { throw CheckpointError.cannotWrite(file: destination, reason: String(cString: strerror(errno))) }
  }

  deinit { discard() }

  /// Appends bytes, retrying short writes.
  func write(_ buffer: UnsafeRawBufferPointer) throws {
    guard var p = buffer.baseAddress else { return }
    var left = buffer.count
    while left > 0 {
      let n = Glibc.write(fd, p, left)
      if n < 0 {
        if errno == EINTR { continue }
        throw CheckpointError.cannotWrite(file: destination, reason: String(cString: strerror(errno)))
      }
      p += n
      left -= n
      bytesWritten += n
    }
  }

  func write(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try write($0) } }

  /// Appends `count` zero bytes.
  func writeZeros(_ count: Int) throws { try write([UInt8](repeating: 0, count: count)) }

  /// Flushes to disk and renames onto the destination.
  func publish() throws {
    guard fd >= 0 else { throw CheckpointError.cannotWrite(file: destination, reason: "already closed") }
    if fsync(fd) != 0 { throw CheckpointError.cannotWrite(file: destination, reason: String(cString: strerror(errno))) }
    close(fd)
    fd = -1
    if rename(temporaryPath, destination) != 0 {
      let reason = String(cString: strerror(errno))
      unlink(temporaryPath)
      throw CheckpointError.cannotWrite(file: destination, reason: reason)
    }
  }

  /// Closes and deletes the temporary file (no-op after `publish`).
  func discard() {
    guard fd >= 0 else { return }
    close(fd)
    fd = -1
    unlink(temporaryPath)
  }
}
