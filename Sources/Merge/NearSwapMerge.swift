import Foundation
import Tensor

/// mergekit's `nearswap`: per element, the base `a` moves towards the other model `b` where the
/// two are close: `w = clamp(t / max(|a - b|, 1e-6), 0, 1)`, result `w b + (1 - w) a`. Elements
/// that differ by at most `t` take `b`'s value; those far apart keep most of the base's.
public struct NearSwapMerge: StreamingMerge {
  public init() {}
  public var name: String { "nearswap" }
  public var summary: String { "the base, swapped towards the other model where they are within t" }
  public var reference: String { "alchemonaut, QuartetAnemoi-70B-t0.0001 (Hugging Face); mergekit's nearswap" }
  public var base: BaseRequirement { .required }
  public var modelCount: ClosedRange<Int> { 1...1 }
  public var parameters: [ParameterSpec] {
    [
      .number(
        "t", .global, in: 0...Double.greatestFiniteMagnitude, openBelow: true, default: nil,
        help: "sameness threshold: elements within t of each other take the other model's value")
    ]
  }

  public func merge(_ inputs: MergeInputs, _ p: ResolvedParameters) throws -> Tensor {
    try mergeThroughRanges(inputs, p)
  }

  public func prepare(tensor name: String, count: Int, _ p: ResolvedParameters, scan: TensorScan) throws -> RangeMerger?
  {
    let t = p.number("t")
    let r = p.arithmetic
    if r.isRounded {
      // mergekit's operations, each rounded to the compute dtype: the clamp's bound is cast to
      // it, and torch computes `t / x` as `reciprocal(x) * t`.
      let floor = r.round(Float(1e-6))
      return RangeMerger { range in
        guard let a = range.base else { throw MergeError.baseRequired(method: self.name) }
        return zip(a, range.models[0]).map { x, y in
          let distance = max(abs(r.round(x - y)), floor)
          let w = min(1, max(0, r.round(r.round(1 / distance) * Float(t))))
          return r.round(r.round(w * y) + r.round(r.round(1 - w) * x))
        }
      }
    }
    return RangeMerger { range in
      guard let a = range.base else { throw MergeError.baseRequired(method: self.name) }
      let b = range.models[0]
      precondition(b.count == a.count)
      // Over buffers, so that the loop runs in vectors.
      return [Float](unsafeUninitializedCapacity: a.count) { out, initialized in
        a.withUnsafeBufferPointer { a in
          b.withUnsafeBufferPointer { b in
            for i in 0..<a.count {
              let (x, y) = (Double(a[i]), Double(b[i]))
              let w = min(1, max(0, t / max(abs(x - y), 1e-6)))
              out[i] = Float(w * y + (1 - w) * x)
            }
          }
        }
        initialized = a.count
      }
    }
  }
}
