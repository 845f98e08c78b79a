import Tensor

/// Encodes and decodes single `.mkz` chunks: byte transform, zstd, checksum, and the "store raw
/// when zstd saves < 1%" rule. The writer, the reader and the benchmarks all go through it. One
/// codec per worker thread (it owns zstd contexts and a scratch buffer).
public final class ChunkCodec {
  private lazy var compressor = Zstd.Compressor()
  private lazy var decompressor = Zstd.Decompressor()
  private var scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 64)

  /// A chunk as stored.
  public struct Encoded: Sendable, Equatable {
    /// Stored bytes (a zstd frame, or the transformed payload when `isRaw`).
    public var size: Int
    public var isRaw: Bool
    /// XXH64 of the transformed payload (what the reader checks after decompression).
    public var checksum: UInt64
  }

  /// Why a stored chunk did not decode.
  enum Failure: Error {
    case corruptFrame(String)
    case rawSize(actual: Int)
    case checksum
  }

  public init() {}

  deinit { scratch.deallocate() }

  /// The most bytes a chunk of `rawSize` bytes can take when stored.
  public static func maxStoredSize(_ rawSize: Int) -> Int { max(rawSize, Zstd.compressBound(rawSize)) }

  private func scratch(_ count: Int) -> UnsafeMutableRawBufferPointer {
    if scratch.count < count {
      scratch.deallocate()
      scratch = .allocate(byteCount: count, alignment: 64)
    }
    return UnsafeMutableRawBufferPointer(rebasing: scratch[0..<count])
  }

  /// Encodes one chunk of `dtype` elements into `stored` (at least `maxStoredSize(raw.count)` bytes).
  public func encode(_ raw: UnsafeRawBufferPointer, dtype: DType, into stored: UnsafeMutableRawBufferPointer) -> Encoded
  {
    encode(
      raw, base: nil, transform: .forDType(dtype.size, isFloatingPoint: dtype.isFloatingPoint), elementSize: dtype.size,
      into: stored)
  }

  /// Decodes one chunk stored by `encode(_:dtype:into:)`; `out.count` is the raw size. Throws
  /// `ChunkCodec.Failure` on a corrupt frame, a size mismatch or a checksum mismatch.
  public func decode(
    _ stored: UnsafeRawBufferPointer, _ encoded: Encoded, dtype: DType, into out: UnsafeMutableRawBufferPointer
  ) throws {
    try decode(
      stored, encoded, base: nil, transform: .forDType(dtype.size, isFloatingPoint: dtype.isFloatingPoint),
      elementSize: dtype.size, into: out)
  }

  func encode(
    _ raw: UnsafeRawBufferPointer, base: UnsafeRawBufferPointer?, transform: ByteTransform, elementSize: Int,
    into stored: UnsafeMutableRawBufferPointer
  ) -> Encoded {
    let payload = scratch(raw.count)
    transform.encode(raw, base: base, elementSize: elementSize, into: payload)
    let checksum = XXHash64.hash(UnsafeRawBufferPointer(payload))
    let compressed = compressor.compress(UnsafeRawBufferPointer(payload), into: stored)
    if Double(compressed) > Double(raw.count) * (1 - MKZ.minimumSaving) {
      stored.copyMemory(from: UnsafeRawBufferPointer(payload))
      return Encoded(size: raw.count, isRaw: true, checksum: checksum)
    }
    return Encoded(size: compressed, isRaw: false, checksum: checksum)
  }

  func decode(
    _ stored: UnsafeRawBufferPointer, _ encoded: Encoded, base: UnsafeRawBufferPointer?, transform: ByteTransform,
    elementSize: Int,
    into out: UnsafeMutableRawBufferPointer
  ) throws {
    let payload = scratch(out.count)
    if encoded.isRaw {
      guard stored.count == out.count else { throw Failure.rawSize(actual: stored.count) }
      payload.copyMemory(from: stored)
    } else {
      switch decompressor.decompress(stored, into: payload) {
      case .failure(let error): throw Failure.corruptFrame(error.message)
      case .success(let n) where n != out.count: throw Failure.rawSize(actual: n)
      case .success: break
      }
    }
    guard XXHash64.hash(UnsafeRawBufferPointer(payload)) == encoded.checksum else { throw Failure.checksum }
    transform.decode(UnsafeRawBufferPointer(payload), base: base, elementSize: elementSize, into: out)
  }
}
