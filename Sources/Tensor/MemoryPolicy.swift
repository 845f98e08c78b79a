#if canImport(CSystem) && os(Linux)
  import CSystem
#endif

/// Process-wide allocator settings for streaming work.
public enum MemoryPolicy {
  /// Makes blocks of 1 MiB and more come from mmap and go back to the system when freed. glibc
  /// raises this threshold as big blocks are freed, after which tensor-sized buffers come from
  /// the heap, fragment it, and peak memory can creep up to the size of a whole model. Call once,
  /// at program start (the `mergekit` command does).
  public static func returnLargeBlocksToSystem() {
    #if canImport(CSystem) && os(Linux)
      _ = mallopt(M_MMAP_THRESHOLD, 1 << 20)
    #endif
  }
}
