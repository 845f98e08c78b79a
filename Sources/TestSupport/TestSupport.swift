import Checkpoint
import Foundation
import Tensor

/// A fresh temporary folder for one test, removed by `remove()`.
public struct TemporaryFolder {
  public let path: String

  public init() {
    path = NSTemporaryDirectory() + "mergekit-test-" + UUID().uuidString
    try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
  }

  /// A path inside the folder.
  public func file(_ name: String) -> String { path + "/" + name }

  public func remove() { try? FileManager.default.removeItem(atPath: path) }

  /// A folder for a fixture that a whole suite shares (a `static let`, built once), which no
  /// test can remove: it is removed when the test process exits. The suites' shared example
  /// models once left about 570 MB in the temporary folder at every run.
  public static func removedAtExit() -> TemporaryFolder {
    let folder = TemporaryFolder()
    SharedFolders.register(folder.path)
    return folder
  }
}

/// The shared fixtures' folders, removed by one `atexit` handler.
enum SharedFolders {
  private static let lock = NSLock()
  nonisolated(unsafe) private static var paths: [String] = []
  nonisolated(unsafe) private static var handlerInstalled = false

  static func register(_ path: String) {
    lock.withLock {
      paths.append(path)
      if !handlerInstalled {
        handlerInstalled = true
        atexit { SharedFolders.removeAll() }
      }
    }
  }

  static func removeAll() {
    for path in lock.withLock({ paths }) { try? FileManager.default.removeItem(atPath: path) }
  }
}

/// The largest absolute difference between two float arrays and the first index where
/// |a - b| > tolerance (nil when all are within it).
public func compareClose(_ a: [Float], _ b: [Float], tolerance: Float) -> (maxDifference: Float, firstFailure: Int?) {
  precondition(a.count == b.count, "lengths differ: \(a.count) vs \(b.count)")
  var worst: Float = 0
  var first: Int?
  for i in a.indices {
    let d = abs(a[i] - b[i])
    if d > worst || d.isNaN { worst = d }
    if (d > tolerance || d.isNaN) && first == nil { first = i }
  }
  return (worst, first)
}

/// Builds safetensors files byte by byte (for the bad-file tables): a header JSON text and the
/// data section, with the 8-byte length prefix written as given or computed.
public func safetensorsBytes(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
  let json = Array(header.utf8)
  let length = declaredLength ?? UInt64(json.count)
  return withUnsafeBytes(of: length.littleEndian) { Array($0) } + json + data
}

/// Writes bytes to a file (test fixtures).
public func writeBytes(_ bytes: [UInt8], to path: String) {
  _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
}

/// Reads a whole file (test assertions).
public func readBytes(_ path: String) -> [UInt8] {
  [UInt8](FileManager.default.contents(atPath: path) ?? Data())
}

/// Random tensor data of any dtype: floating types get normal values (scaled by `scale`),
/// integer types random bit patterns. Deterministic in `seed`.
public func randomTensorData(_ dtype: DType, shape: [Int], seed: UInt64, scale: Float = 0.02) -> TensorData {
  let count = shape.reduce(1, *)
  if dtype.isFloatingPoint {
    let rng = CounterRNG(seed: seed, stream: "fixture")
    return Tensor(shape: shape, scalars: (0..<count).map { rng.normal(UInt64($0)) * scale }).encoded(as: dtype)
  }
  let rng = CounterRNG(seed: seed, stream: "bits")
  var bytes = (0..<(count * dtype.size)).map { UInt8(truncatingIfNeeded: rng.bits(UInt64($0))) }
  if dtype == .bool { bytes = bytes.map { $0 & 1 } }
  return TensorData(dtype: dtype, shape: shape, bytes: bytes)
}

/// Writes a small checkpoint with the given tensors (in order) and returns its path.
@discardableResult
public func writeCheckpoint(_ tensors: [(String, TensorData)], to path: String, options: WriteOptions = WriteOptions())
  throws -> String
{
  let infos = tensors.map { TensorInfo(name: $0.0, dtype: $0.1.dtype, shape: $0.1.shape) }
  let writer = try CheckpointWriter(destination: path, tensors: infos, options: options)
  for (name, data) in tensors { try writer.write(name, data) }
  try writer.finish()
  return path
}
