import Foundation
import Testing

@testable import Merge
@testable import Tensor

@Suite struct SlerpMergeTests {
  func slerp(_ v0: Tensor, _ v1: Tensor, t: Double) throws -> Tensor {
    try SlerpMerge().merge(
      MergeInputs(name: "w", base: v0, models: [v1]), try resolve(SlerpMerge(), ["t": .number(t)], models: [[:]]))
  }

  @Test func endsAreReturnedExactly() throws {
    let v0 = random([20, 10], "s0")
    let v1 = random([20, 10], "s1")
    #expect(try slerp(v0, v1, t: 0) == v0)
    #expect(try slerp(v0, v1, t: 1) == v1)
  }

  @Test func orthonormalInputsMeetHalfwayOnTheCircle() throws {
    let v0 = Tensor(shape: [4], scalars: [1, 0, 0, 0])
    let v1 = Tensor(shape: [4], scalars: [0, 1, 0, 0])
    let mid = try slerp(v0, v1, t: 0.5)
    expectClose(mid.scalars, [(0.5).squareRoot(), (0.5).squareRoot(), 0, 0], relative: 1e-7)
    // At t = 1/3 of a right angle: (cos 30°, sin 30°).
    expectClose(try slerp(v0, v1, t: 1.0 / 3).scalars, [cos(Double.pi / 6), sin(Double.pi / 6), 0, 0], relative: 1e-7)
  }

  @Test func generalTensorsMatchTheFloat64Formula() throws {
    let v0 = random([30, 20], "g0")
    let v1 = random([30, 20], "g1", scale: 2)
    let t = 0.3
    let a = v0.scalars.map(Double.init)
    let b = v1.scalars.map(Double.init)
    let na = a.reduce(0) { $0 + $1 * $1 }.squareRoot()
    let nb = b.reduce(0) { $0 + $1 * $1 }.squareRoot()
    let theta = acos(zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } / na / nb)
    let s0 = sin((1 - t) * theta) / sin(theta)
    let s1 = sin(t * theta) / sin(theta)
    expectClose(try slerp(v0, v1, t: t).scalars, zip(a, b).map { s0 * $0 + s1 * $1 })
  }

  @Test func colinearTensorsFallBackToLinearInterpolation() throws {
    let v0 = random([50], "c")
    let v1 = Tensor(shape: [50], scalars: v0.scalars.map { $0 * 3 })
    expectClose(try slerp(v0, v1, t: 0.25).scalars, v0.scalars.map { 0.75 * Double($0) + 0.25 * 3 * Double($0) })
  }
}
