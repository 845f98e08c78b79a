import Foundation

#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// Reading files that a stranger may have made: only regular files are opened (a FIFO, a
/// device or a socket would block or never end), and whole-file reads are capped so that a
/// "config" of many gigabytes is refused rather than loaded.
public enum InputFile {
  /// The largest JSON, YAML or text file read whole (config.json, an index, a recipe): 256 MiB.
  public static let textLimit = 256 << 20

  /// Throws `notARegularFile` unless `path` (after following symbolic links) is a regular
  /// file, and `cannotOpen` when it does not exist.
  public static func checkRegular(_ path: String) throws {
    var info = stat()
    guard stat(path, &info) == 0 else {
      throw CheckpointError.cannotOpen(file: path, reason: String(cString: strerror(errno)))
    }
    try checkRegular(info, path: path)
  }

  static func checkRegular(_ info: stat, path: String) throws {
    let kind = info.st_mode & S_IFMT
    guard kind == S_IFREG else { throw CheckpointError.notARegularFile(file: path, kind: describe(kind)) }
  }

  /// Opens `path` for reading without blocking (a FIFO opened for reading would wait for a
  /// writer) and checks that it is a regular file. Returns the descriptor and the file size.
  static func openRegular(_ path: String) throws -> (descriptor: Int32, size: Int) {
    let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
    guard fd >= 0 else { throw CheckpointError.cannotOpen(file: path, reason: String(cString: strerror(errno))) }
    var info = stat()
    guard fstat(fd, &info) == 0 else {
      let reason = String(cString: strerror(errno))
      close(fd)
      throw CheckpointError.cannotOpen(file: path, reason: reason)
    }
    do { try checkRegular(info, path: path) } catch {
      close(fd)
      throw error
    }
    return (fd, Int(info.st_size))
  }

  /// The whole content of the regular file `path`, at most `limit` bytes (else `fileTooLarge`).
  public static func read(_ path: String, limit: Int = textLimit) throws -> [UInt8] {
    let (fd, size) = try openRegular(path)
    defer { close(fd) }
    guard size <= limit else { throw CheckpointError.fileTooLarge(file: path, size: size, limit: limit) }
    var bytes = [UInt8](repeating: 0, count: size)
    var filled = 0
    while filled < size {
      let n = bytes.withUnsafeMutableBytes { buffer in
        // Safe: `filled < size == buffer.count`.
        Glibc.read(fd, buffer.baseAddress.map { $0 + filled }, size - filled)
      }
      if n < 0 && errno == EINTR { continue }
      guard n >= 0 else { throw CheckpointError.cannotOpen(file: path, reason: String(cString: strerror(errno))) }
      if n == 0 { break }  // the file shrank while being read
      filled += n
    }
    return Array(bytes[0..<filled])
  }

  /// The content of the regular file `path` as UTF-8 text (else `badText`), capped like `read`.
  public static func readText(_ path: String, limit: Int = textLimit) throws -> String {
    let bytes = try read(path, limit: limit)
    guard let text = String(validating: bytes, as: UTF8.self) else { throw CheckpointError.notUTF8(file: path) }
    return text
  }

  /// Whether `path` exists and is a regular file (following links); for optional files such
  /// as config.json, where a missing file is fine but a FIFO must not be opened.
  public static func isRegularFile(_ path: String) -> Bool {
    var info = stat()
    return stat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFREG
  }

  /// The JSON object in the regular file `path` (config.json, tokenizer files), or nil when
  /// there is no such file or it is not a JSON object. Throws only for a file that is there but
  /// cannot be read (too large, not a regular file).
  public static func jsonObject(_ path: String) throws -> [String: Any]? {
    guard isRegularFile(path) else { return nil }
    return (try? JSONSerialization.jsonObject(with: Data(try read(path)))) as? [String: Any]
  }

  static func describe(_ kind: mode_t) -> String {
    switch kind {
    case S_IFDIR: return "a folder"
    case S_IFIFO: return "a FIFO (named pipe)"
    case S_IFCHR: return "a character device"
    case S_IFBLK: return "a block device"
    case S_IFSOCK: return "a socket"
    case S_IFLNK: return "a symbolic link"
    default: return "not a regular file"
    }
  }
}
