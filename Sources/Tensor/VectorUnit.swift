import CKernels

/// The vector instructions an element loop may use. `CKernels` holds AVX-512 and AVX2 forms of
/// the hottest merge loops (compiled for those instructions inside their own functions and
/// chosen at run time); every other machine runs the portable Swift loops. Every unit gives the
/// same bits: the loops do the same operations in the same order.
///
/// The kernels take the unit to use as a parameter (default: `machine`), so that tests can hold
/// each form a machine can run to the portable one.
public enum VectorUnit: Int, Comparable, CaseIterable, Sendable {
  case portable
  case avx2
  case avx512

  /// The best unit this CPU and its OS run (the OS must save the wide registers).
  public static let machine: VectorUnit = {
    if mergekit_has_avx512() != 0 && mergekit_has_avx2() != 0 { return .avx512 }
    if mergekit_has_avx2() != 0 { return .avx2 }
    return .portable
  }()

  /// The unit a call asked for `self` runs: `self`, capped by what the machine has.
  public var available: VectorUnit { Swift.min(self, Self.machine) }

  public static func < (a: VectorUnit, b: VectorUnit) -> Bool { a.rawValue < b.rawValue }
}
