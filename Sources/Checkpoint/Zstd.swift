import CZstd

/// The zstd layer: the only file of Checkpoint that imports CZstd. One context per worker.
enum Zstd {
  /// Upper bound of a compressed frame's size for `count` input bytes.
  static func compressBound(_ count: Int) -> Int { ZSTD_compressBound(count) }

  /// Compressor tuned for weights: level 1 with a tiny match table (`hashLog` 6, `minMatch` 7).
  /// Weight bytes have almost no repeats, so the cheap match search loses nothing and the
  /// entropy stage (Huffman per 128 KiB block) does the work.
  final class Compressor {
    private let context: OpaquePointer

    init(level: Int32 = 1, hashLog: Int32 = 6, minMatch: Int32 = 7) {
      guard let context = ZSTD_createCCtx() else { preconditionFailure("ZSTD_createCCtx failed: out of memory") }
      self.context = context
      ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level)
      ZSTD_CCtx_setParameter(context, ZSTD_c_hashLog, hashLog)
      ZSTD_CCtx_setParameter(context, ZSTD_c_minMatch, minMatch)
      ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 0)
    }

    deinit { ZSTD_freeCCtx(context) }

    /// Compresses `source` into `destination` (at least `compressBound(source.count)` bytes);
    /// returns the frame size.
    func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Int {
      let written = ZSTD_compress2(
        context, destination.baseAddress, destination.count, source.baseAddress, source.count)
      precondition(
        ZSTD_isError(written) == 0, "zstd compression failed: \(String(cString: ZSTD_getErrorName(written)))")
      return written
    }
  }

  final class Decompressor {
    private let context: OpaquePointer

    init() {
      guard let context = ZSTD_createDCtx() else { preconditionFailure("ZSTD_createDCtx failed: out of memory") }
      self.context = context
    }

    deinit { ZSTD_freeDCtx(context) }

    /// Decompresses one frame into `destination`; returns the decoded size or zstd's error text.
    func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Result<
      Int, FrameError
    > {
      let n = ZSTD_decompressDCtx(context, destination.baseAddress, destination.count, source.baseAddress, source.count)
      if ZSTD_isError(n) != 0 { return .failure(FrameError(message: String(cString: ZSTD_getErrorName(n)))) }
      return .success(n)
    }
  }

  struct FrameError: Error { let message: String }
}
