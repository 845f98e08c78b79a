import Foundation
import Tensor

/// The scalar types the Nets runtime computes in: `Float` for real work, `Double` for gradient
/// checks and float64 references. Adds the elementary functions the layers need to BLAS's types.
public protocol NetScalar: BLASScalar, BitwiseCopyable {
  static func exp(_ x: Self) -> Self
  static func log(_ x: Self) -> Self
  static func tanh(_ x: Self) -> Self
  static func erf(_ x: Self) -> Self
  static func sin(_ x: Self) -> Self
  static func cos(_ x: Self) -> Self
  static func pow(_ x: Self, _ y: Self) -> Self
  /// Replaces every element of `values` by `exp` of it: the bulk form of `exp` for loops over
  /// many elements (SiLU, the attention softmax). `Float` runs `FloatMath.exponentiate`
  /// (sixteen lanes, within one ulp); `Double` keeps the C library's `exp`, so that float64
  /// references and gradient checks stay what they were.
  static func exponentiate(_ values: UnsafeMutableBufferPointer<Self>)
}

extension Float: NetScalar {
  @inline(__always) public static func exp(_ x: Float) -> Float { Foundation.exp(x) }
  @inline(__always) public static func log(_ x: Float) -> Float { Foundation.log(x) }
  @inline(__always) public static func tanh(_ x: Float) -> Float { Foundation.tanh(x) }
  @inline(__always) public static func erf(_ x: Float) -> Float { Foundation.erf(x) }
  @inline(__always) public static func sin(_ x: Float) -> Float { Foundation.sin(x) }
  @inline(__always) public static func cos(_ x: Float) -> Float { Foundation.cos(x) }
  @inline(__always) public static func pow(_ x: Float, _ y: Float) -> Float { Foundation.pow(x, y) }
  @inline(__always) public static func exponentiate(_ values: UnsafeMutableBufferPointer<Float>) {
    FloatMath.exponentiate(values)
  }
}

extension Double: NetScalar {
  @inline(__always) public static func exp(_ x: Double) -> Double { Foundation.exp(x) }
  @inline(__always) public static func log(_ x: Double) -> Double { Foundation.log(x) }
  @inline(__always) public static func tanh(_ x: Double) -> Double { Foundation.tanh(x) }
  @inline(__always) public static func erf(_ x: Double) -> Double { Foundation.erf(x) }
  @inline(__always) public static func sin(_ x: Double) -> Double { Foundation.sin(x) }
  @inline(__always) public static func cos(_ x: Double) -> Double { Foundation.cos(x) }
  @inline(__always) public static func pow(_ x: Double, _ y: Double) -> Double { Foundation.pow(x, y) }
  public static func exponentiate(_ values: UnsafeMutableBufferPointer<Double>) {
    for i in values.indices { values[i] = Foundation.exp(values[i]) }
  }
}
