#if canImport(CSystem) && os(Linux)
  import CSystem
#endif

/// Process-wide allocator settings (glibc), chosen per kind of work. Call one at program start.
public enum MemoryPolicy {
  /// For streaming I/O (convert, verify): blocks of 1 MiB and more come from mmap and go back to
  /// the system when freed. glibc's default raises this threshold as big blocks are freed, after
  /// which buffers come from a heap that fragments, and peak memory can creep to the model size.
  public static func returnLargeBlocksToSystem() {
    #if canImport(CSystem) && os(Linux)
      _ = mallopt(M_MMAP_THRESHOLD, 1 << 20)
    #endif
  }

  /// For tensor work (merges): tensors up to 1 GiB come from the heap and their memory is reused
  /// by the next tensors instead of being unmapped and faulted in again (which costs more than the
  /// arithmetic of a merge); up to 256 MiB stays free at the heap's top between tensors.
  public static func reuseTensorMemory() {
    #if canImport(CSystem) && os(Linux)
      _ = mallopt(M_MMAP_THRESHOLD, 1 << 30)
      _ = mallopt(M_TRIM_THRESHOLD, 1 << 28)
    #endif
  }
}
