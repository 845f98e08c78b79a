import Tensor

extension TensorScan {
  /// The Gram matrix (`models` x `models`, row-major, symmetric) of the points of a tensor, in
  /// Double: each model minus the base (or the model itself, without a base or with
  /// `ignoringBase`), summed range by range in order. Also whether the ranges carried a base.
  /// Multi-SLERP, NuSLERP and Karcher find their coefficients from it.
  func pointGram(models: Int, ignoringBase: Bool = false) throws -> (gram: [Double], hasBase: Bool) {
    var gram = [Double](repeating: 0, count: models * models)
    var hasBase = false
    try pass { range -> (part: [Double], hasBase: Bool) in
      let points = ignoringBase ? RangeInputs(offset: range.offset, base: nil, models: range.models) : range
      return (Self.gramPart(points), range.base != nil)
    } combine: { summary in
      hasBase = summary.hasBase
      for s in 0..<models { for t in s..<models { gram[s * models + t] += summary.part[s * models + t] } }
    }
    for s in 0..<models { for t in 0..<s { gram[s * models + t] = gram[t * models + s] } }
    return (gram, hasBase)
  }

  /// One range's part of the Gram matrix (upper triangle, row-major) of the points: each model
  /// minus the base in Double (or the model, without one), summed in four lanes (element i in
  /// lane i % 4, the lanes added as `(l0 + l1) + (l2 + l3)`, then the last `n % 4` products in
  /// order). The points are formed a block at a time into a scratch that stays in the
  /// first-level cache, and every pair's lanes run on through the blocks.
  static func gramPart(_ range: RangeInputs) -> [Double] {
    let models = range.models.count
    let n = range.count
    let block = 1024  // a multiple of 4: each block's lanes continue the last block's
    var points = [Double](repeating: 0, count: models * block)
    var lanes = [SIMD4<Double>](repeating: .zero, count: models * models)
    for start in stride(from: 0, to: n, by: block) {
      let length = min(block, n - start)
      let whole = length / 4 * 4
      points.withUnsafeMutableBufferPointer { points in
        for (m, model) in range.models.enumerated() {
          model.withUnsafeBufferPointer { model in
            if let base = range.base {
              base.withUnsafeBufferPointer { base in
                for j in 0..<length { points[m * block + j] = Double(model[start + j]) - Double(base[start + j]) }
              }
            } else {
              for j in 0..<length { points[m * block + j] = Double(model[start + j]) }
            }
          }
        }
        for s in 0..<models {
          for t in s..<models {
            let (x, y) = (s * block, t * block)
            var sum = lanes[s * models + t]
            var j = 0
            while j < whole {
              let left = SIMD4<Double>(points[x + j], points[x + j + 1], points[x + j + 2], points[x + j + 3])
              let right = SIMD4<Double>(points[y + j], points[y + j + 1], points[y + j + 2], points[y + j + 3])
              sum += left * right
              j += 4
            }
            lanes[s * models + t] = sum
          }
        }
      }
    }
    // The tail: the last `n % 4` products, still in the scratch from the last block.
    let last = n == 0 ? 0 : n - (n - 1) / block * block
    let tail = last / 4 * 4..<last
    var part = [Double](repeating: 0, count: models * models)
    for s in 0..<models {
      for t in s..<models {
        let sum = lanes[s * models + t]
        var total = (sum[0] + sum[1]) + (sum[2] + sum[3])
        for k in tail { total += points[s * block + k] * points[t * block + k] }
        part[s * models + t] = total
      }
    }
    return part
  }
}
