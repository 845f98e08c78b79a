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

  /// For merges of whole tensors in flight (STF, the SVD merges): every thread allocates from
  /// the one main heap, so the matrices one worker frees serve the next tensor of any worker.
  /// With a heap per thread (glibc's default), a worker's large blocks live in heaps of at most
  /// 64 MiB that are unmapped once empty and faulted in again: STF on 3 x 0.5 GB spent 5 s
  /// instead of 2.5 s in the kernel (20.2 s against 18.7 s). Not for streamed merges: their
  /// workers allocate every range and wait on the shared heap's lock (DARE-TIES on 3 x 1 GB:
  /// 1.8 s against 2.4-2.8 s). Takes effect for threads that have not allocated yet.
  public static func shareOneHeap() {
    #if canImport(CSystem) && os(Linux)
      _ = mallopt(M_ARENA_MAX, 1)
    #endif
  }
}
