import CBLAS
import Foundation

/// The BLAS layer: the only file that calls CBLAS. Sizes cross into C as `Int32(exactly:)`
/// because Debian's OpenBLAS takes 32-bit integers.
public enum BLAS {
  /// Matrix product `op(a) * op(b)` of two 2-D tensors by `cblas_sgemm`, where `op` transposes
  /// when asked. Precondition: inner dimensions agree and every size fits in `Int32`.
  public static func matmul(_ a: Tensor, _ b: Tensor, transposeA: Bool = false, transposeB: Bool = false) -> Tensor {
    precondition(a.shape.count == 2 && b.shape.count == 2, "matmul needs 2-D tensors, got \(a.shape) x \(b.shape)")
    let (m, k) = transposeA ? (a.shape[1], a.shape[0]) : (a.shape[0], a.shape[1])
    let (k2, n) = transposeB ? (b.shape[1], b.shape[0]) : (b.shape[0], b.shape[1])
    precondition(k == k2, "matmul shapes \(a.shape)\(transposeA ? "ᵀ" : "") x \(b.shape)\(transposeB ? "ᵀ" : "")")
    var c = Tensor(zeros: [m, n])
    guard m > 0, n > 0, k > 0 else { return c }
    a.scalars.withUnsafeBufferPointer { pa in
      b.scalars.withUnsafeBufferPointer { pb in
        c.scalars.withUnsafeMutableBufferPointer { pc in
          cblas_sgemm(
            CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans, int32(m),
            int32(n), int32(k), 1,
            pa.baseAddress, int32(a.shape[1]), pb.baseAddress, int32(b.shape[1]), 0, pc.baseAddress, int32(n))
        }
      }
    }
    return c
  }

  /// Matrix product `op(a) * op(b)` in double precision (`cblas_dgemm`).
  public static func matmul(_ a: DoubleMatrix, _ b: DoubleMatrix, transposeA: Bool = false, transposeB: Bool = false)
    -> DoubleMatrix
  {
    let (m, k) = transposeA ? (a.columns, a.rows) : (a.rows, a.columns)
    let (k2, n) = transposeB ? (b.columns, b.rows) : (b.rows, b.columns)
    precondition(k == k2, "matmul shapes \(a.rows)x\(a.columns) x \(b.rows)x\(b.columns)")
    var c = DoubleMatrix(zeros: m, n)
    guard m > 0, n > 0, k > 0 else { return c }
    a.values.withUnsafeBufferPointer { pa in
      b.values.withUnsafeBufferPointer { pb in
        c.values.withUnsafeMutableBufferPointer { pc in
          cblas_dgemm(
            CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans, int32(m),
            int32(n), int32(k), 1,
            pa.baseAddress, int32(a.columns), pb.baseAddress, int32(b.columns), 0, pc.baseAddress, int32(n))
        }
      }
    }
    return c
  }

  /// The Gram matrix of the columns, `aᵀ a` (n x n for an m x n matrix), accumulated in double
  /// precision (`cblas_dsyrk` on the widened matrix), both triangles filled.
  public static func gram(_ a: DoubleMatrix) -> DoubleMatrix {
    DoubleMatrix(
      rows: a.columns, columns: a.columns, values: gram(a.values, rows: a.rows, columns: a.columns, ofRows: false))
  }

  /// The Gram matrix of a row-major `rows x columns` array in its own precision: of its columns
  /// (`aᵀ a`, columns x columns) or of its rows (`a aᵀ`, rows x rows), both triangles filled
  /// (`ssyrk`/`dsyrk`).
  @_specialize(exported:true,where T == Float)
  @_specialize(exported:true,where T == Double)
  public static func gram<T: BLASScalar>(_ a: [T], rows: Int, columns: Int, ofRows: Bool) -> [T] {
    precondition(a.count == rows * columns, "gram of a \(rows) x \(columns) matrix with \(a.count) values")
    let (n, k) = ofRows ? (rows, columns) : (columns, rows)
    var g = [T](repeating: 0, count: n * n)
    guard n > 0, k > 0 else { return g }
    a.withUnsafeBufferPointer { pa in
      g.withUnsafeMutableBufferPointer { pg in
        guard let a = pa.baseAddress, let c = pg.baseAddress else { return }
        T.syrk(!ofRows, n, k, a, columns, c, n)
      }
    }
    for i in 0..<n { for j in 0..<i { g[i * n + j] = g[j * n + i] } }
    return g
  }

  /// `aᵀ a` of a `Float` matrix, accumulated in double precision.
  public static func gram(_ a: Tensor) -> DoubleMatrix { gram(DoubleMatrix(a)) }

  /// Converts a size for a BLAS call; sizes past `Int32.max` are a caller bug (tensors that large
  /// must be processed in blocks).
  static func int32(_ value: Int) -> Int32 {
    guard let v = Int32(exactly: value) else { preconditionFailure("size \(value) exceeds BLAS's 32-bit limit") }
    return v
  }

  /// `(m, n, k)` of `op(a) op(b)`, the operands' shapes checked (a caller bug otherwise).
  static func productShape(
    _ aCount: Int, _ aRows: Int, _ aColumns: Int, _ transposeA: Bool, _ bCount: Int, _ bRows: Int, _ bColumns: Int,
    _ transposeB: Bool
  ) -> (m: Int, n: Int, k: Int) {
    let (m, k) = transposeA ? (aColumns, aRows) : (aRows, aColumns)
    let (k2, n) = transposeB ? (bColumns, bRows) : (bRows, bColumns)
    precondition(
      k == k2 && aCount == aRows * aColumns && bCount == bRows * bColumns,
      "gemm shapes \(aRows)x\(aColumns) x \(bRows)x\(bColumns)")
    return (m, n, k)
  }

  /// `op(a) op(b)` as a new row-major array, written by gemm with beta 0, which sets every
  /// element of its output without reading it: the array is not zero-filled first (a pass over
  /// the output that a Nets forward made for each of its products).
  public static func product<T: BLASScalar>(
    _ a: [T], _ aRows: Int, _ aColumns: Int, transposeA: Bool = false, _ b: [T], _ bRows: Int, _ bColumns: Int,
    transposeB: Bool = false
  ) -> [T] {
    let (m, n, k) = productShape(a.count, aRows, aColumns, transposeA, b.count, bRows, bColumns, transposeB)
    guard m > 0, n > 0, k > 0 else { return [T](repeating: 0, count: m * n) }
    return [T](unsafeUninitializedCapacity: m * n) { pc, initialized in
      a.withUnsafeBufferPointer { pa in
        b.withUnsafeBufferPointer { pb in
          // Not empty (m, n, k > 0 and the counts checked above), so every base address exists.
          guard let a = pa.baseAddress, let b = pb.baseAddress, let c = pc.baseAddress else { return }
          T.gemm(transposeA, transposeB, m, n, k, 1, a, aColumns, b, bColumns, 0, c, n)
          initialized = m * n
        }
      }
    }
  }

  /// `c = alpha * op(a) * op(b) + beta * c` for row-major arrays of `Float` or `Double`, where
  /// `a` is `aRows x aColumns` as stored (before `op`), likewise `b`, and `c` is m x n.
  /// `beta = 1` accumulates into `c` (gradients). Precondition: the shapes agree.
  public static func gemm<T: BLASScalar>(
    _ a: [T], _ aRows: Int, _ aColumns: Int, transposeA: Bool = false, _ b: [T], _ bRows: Int, _ bColumns: Int,
    transposeB: Bool = false,
    into c: inout [T], alpha: T = 1, beta: T = 0
  ) {
    let (m, n, k) = productShape(a.count, aRows, aColumns, transposeA, b.count, bRows, bColumns, transposeB)
    precondition(c.count == m * n, "gemm output of \(c.count) elements for \(m)x\(n)")
    guard m > 0, n > 0 else { return }
    guard k > 0 else {
      for i in c.indices { c[i] = beta == 0 ? 0 : beta * c[i] }
      return
    }
    a.withUnsafeBufferPointer { pa in
      b.withUnsafeBufferPointer { pb in
        c.withUnsafeMutableBufferPointer { pc in
          // Not empty (m, n, k > 0 and the counts checked above), so every base address exists.
          guard let a = pa.baseAddress, let b = pb.baseAddress, let c = pc.baseAddress else { return }
          T.gemm(transposeA, transposeB, m, n, k, alpha, a, aColumns, b, bColumns, beta, c, n)
        }
      }
    }
  }
}

/// The element types BLAS multiplies: `Float` (sgemm) and `Double` (dgemm). Generic code (the
/// Nets runtime) runs in `Float`, and in `Double` for gradient checks and references.
public protocol BLASScalar: BinaryFloatingPoint, Sendable {
  static func gemm(
    _ transposeA: Bool, _ transposeB: Bool, _ m: Int, _ n: Int, _ k: Int, _ alpha: Self, _ a: UnsafePointer<Self>,
    _ lda: Int,
    _ b: UnsafePointer<Self>, _ ldb: Int, _ beta: Self, _ c: UnsafeMutablePointer<Self>, _ ldc: Int)
  /// `c = op(a) op(a)ᵀ`, upper triangle only (`ssyrk`/`dsyrk`, row-major): `op(a)` is n x k, and
  /// `a` is stored n x k, or k x n when `transpose` (then `c = aᵀ a`).
  static func syrk(
    _ transpose: Bool, _ n: Int, _ k: Int, _ a: UnsafePointer<Self>, _ lda: Int, _ c: UnsafeMutablePointer<Self>,
    _ ldc: Int)
}

extension Float: BLASScalar {
  public static func gemm(
    _ transposeA: Bool, _ transposeB: Bool, _ m: Int, _ n: Int, _ k: Int, _ alpha: Float, _ a: UnsafePointer<Float>,
    _ lda: Int,
    _ b: UnsafePointer<Float>, _ ldb: Int, _ beta: Float, _ c: UnsafeMutablePointer<Float>, _ ldc: Int
  ) {
    cblas_sgemm(
      CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans, BLAS.int32(m),
      BLAS.int32(n), BLAS.int32(k),
      alpha, a, BLAS.int32(lda), b, BLAS.int32(ldb), beta, c, BLAS.int32(ldc))
  }

  public static func syrk(
    _ transpose: Bool, _ n: Int, _ k: Int, _ a: UnsafePointer<Float>, _ lda: Int, _ c: UnsafeMutablePointer<Float>,
    _ ldc: Int
  ) {
    cblas_ssyrk(
      CblasRowMajor, CblasUpper, transpose ? CblasTrans : CblasNoTrans, BLAS.int32(n), BLAS.int32(k), 1, a,
      BLAS.int32(lda), 0, c, BLAS.int32(ldc))
  }
}

extension Double: BLASScalar {
  public static func gemm(
    _ transposeA: Bool, _ transposeB: Bool, _ m: Int, _ n: Int, _ k: Int, _ alpha: Double, _ a: UnsafePointer<Double>,
    _ lda: Int,
    _ b: UnsafePointer<Double>, _ ldb: Int, _ beta: Double, _ c: UnsafeMutablePointer<Double>, _ ldc: Int
  ) {
    cblas_dgemm(
      CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans, BLAS.int32(m),
      BLAS.int32(n), BLAS.int32(k),
      alpha, a, BLAS.int32(lda), b, BLAS.int32(ldb), beta, c, BLAS.int32(ldc))
  }

  public static func syrk(
    _ transpose: Bool, _ n: Int, _ k: Int, _ a: UnsafePointer<Double>, _ lda: Int, _ c: UnsafeMutablePointer<Double>,
    _ ldc: Int
  ) {
    cblas_dsyrk(
      CblasRowMajor, CblasUpper, transpose ? CblasTrans : CblasNoTrans, BLAS.int32(n), BLAS.int32(k), 1, a,
      BLAS.int32(lda), 0, c, BLAS.int32(ldc))
  }
}

extension BLAS {
  /// Runs `body` with OpenBLAS on one thread, then restores its thread count: for work that is
  /// itself spread over the cores (`Parallel.forEach` over many small products), where BLAS's
  /// own threads would only contend with the workers (measured: a fifth of the time spent
  /// yielding). The thread count is process-wide: scopes may overlap (tensors merged side by
  /// side each open one), and the count comes back when the last one closes. Meanwhile every
  /// BLAS call in the process runs on one thread.
  public static func singleThreaded<R>(_ body: () throws -> R) rethrows -> R {
    SingleThreadedScopes.shared.enter()
    defer { SingleThreadedScopes.shared.leave() }
    return try body()
  }

  /// The open `singleThreaded` scopes and the thread count to restore when they close.
  final class SingleThreadedScopes: @unchecked Sendable {
    static let shared = SingleThreadedScopes()
    private let lock = NSLock()
    private var open = 0
    private var saved: Int32 = 1

    func enter() {
      lock.withLock {
        if open == 0 {
          saved = openblas_get_num_threads()
          openblas_set_num_threads(1)
        }
        open += 1
      }
    }

    func leave() {
      lock.withLock {
        open -= 1
        if open == 0 { openblas_set_num_threads(saved) }
      }
    }
  }

  /// Stops OpenBLAS's worker threads until the next threaded BLAS call starts them again.
  /// OpenBLAS starts them when it loads, and each waits for work by spinning on `sched_yield` for
  /// 2^28 clock ticks (about a tenth of a second) before it sleeps: on two cores a streaming merge
  /// that calls no BLAS lost that much of a core at its start (8% of the samples of a 0.55 s SLERP).
  /// The function is OpenBLAS's own (`blas_thread_shutdown_`, not in its `cblas.h`), looked up
  /// when called: a single-threaded OpenBLAS build has none, and then there is nothing to stop.
  public static func stopIdleThreads() {
    typealias Shutdown = @convention(c) () -> Int32
    guard let symbol = dlsym(nil, "blas_thread_shutdown_") else { return }
    _ = unsafeBitCast(symbol, to: Shutdown.self)()
  }

  /// How long OpenBLAS's idle workers spin before they sleep, as a power of two of clock ticks
  /// (`OPENBLAS_THREAD_TIMEOUT`, 4 to 30): 2^22, about a millisecond, where OpenBLAS's own 2^28
  /// is about a tenth of a second. Products a little apart still find their workers awake: with
  /// 2^20 or less, sgemm 1024^3 ran 5-10% slower on this virtual machine, where waking a worker
  /// that slept takes a large part of a millisecond.
  public static let idleSpinExponent = 22

  /// For a program's start: OpenBLAS's workers spin on `sched_yield` after each threaded call
  /// for `idleSpinExponent` (unless the user set `OPENBLAS_THREAD_TIMEOUT`) instead of about a
  /// tenth of a second, then sleep until the next call wakes them. Between products, Nets's
  /// element-wise work runs on every core; with the long spin a core went to the spinning
  /// worker instead (a sixth of a decoder forward's samples were in the scheduler; 1.5% with
  /// the short spin). OpenBLAS reads the variable when it starts its threads, so this sets it,
  /// has OpenBLAS read its environment again and stops the threads (`stopIdleThreads`); the
  /// next threaded call starts them with the new spin. Looked up when called, as there.
  public static func shortenIdleSpin() {
    if let timeout = idleSpinSetting(environment: ProcessInfo.processInfo.environment) {
      setenv("OPENBLAS_THREAD_TIMEOUT", timeout, 1)
      typealias ReadEnvironment = @convention(c) () -> Void
      if let symbol = dlsym(nil, "openblas_read_env") { unsafeBitCast(symbol, to: ReadEnvironment.self)() }
    }
    stopIdleThreads()
  }

  /// The `OPENBLAS_THREAD_TIMEOUT` value `shortenIdleSpin` sets in this environment: nil when the
  /// user set one (theirs stands), else `idleSpinExponent`.
  public static func idleSpinSetting(environment: [String: String]) -> String? {
    environment["OPENBLAS_THREAD_TIMEOUT"] == nil ? String(idleSpinExponent) : nil
  }

  /// The kernel set OpenBLAS chose when it loaded (`Haswell`, `SkylakeX`, `Prescott` ...).
  public static var coreName: String { openblas_get_corename().map { String(cString: $0) } ?? "unknown" }

  /// OpenBLAS picks its kernels once, when the library loads, from the CPU model. A model newer
  /// than the library (Intel's Sapphire and Emerald Rapids under Debian's OpenBLAS 0.3.21) falls
  /// back to the generic `Prescott` kernels, four to five times slower than the CPU allows. This
  /// is the kernel set its features do allow (`SkylakeX` with AVX-512, `Haswell` with AVX2 and
  /// FMA), for `OPENBLAS_CORETYPE`; nil when the library's choice stands or was set by the user.
  public static var betterCoreType: String? {
    guard ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] == nil, coreName.lowercased() == "prescott" else {
      return nil
    }
    return coreType(cpuFlags: cpuFlags())
  }

  /// For a program's first line: when OpenBLAS fell back to its generic kernels on a CPU it does
  /// not know (`betterCoreType`), runs the program again at once with `OPENBLAS_CORETYPE` naming
  /// the kernels the CPU supports, since OpenBLAS reads it only when it loads. Linear algebra
  /// (STF, PELA, ZipIt!, training) is then four to five times faster. Goes on as is if that fails.
  public static func restartWithTheCPUsKernels() {
    #if os(Linux)
      guard let core = betterCoreType else { return }
      setenv("OPENBLAS_CORETYPE", core, 1)
      execv("/proc/self/exe", CommandLine.unsafeArgv)
      unsetenv("OPENBLAS_CORETYPE")
    #endif
  }

  /// The OpenBLAS core type for a CPU with these feature flags (as /proc/cpuinfo names them).
  public static func coreType(cpuFlags flags: Set<String>) -> String? {
    if flags.isSuperset(of: ["avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"]) { return "SkylakeX" }
    if flags.isSuperset(of: ["avx2", "fma"]) { return "Haswell" }
    return nil
  }

  /// The CPU's feature flags from /proc/cpuinfo (empty where there is none).
  public static func cpuFlags() -> Set<String> {
    guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
      let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") })
    else { return [] }
    return Set(line.split(separator: ":").dropFirst().joined().split(separator: " ").map(String.init))
  }
}
