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
  /// minus the base in Double (or the model, without one), summed in four lanes.
  static func gramPart(_ range: RangeInputs) -> [Double] {
    let models = range.models.count
    let n = range.count
    let points = range.models.map { model in
      range.base.map { base in (0..<n).map { Double(model[$0]) - Double(base[$0]) } } ?? model.map(Double.init)
    }
    var part = [Double](repeating: 0, count: models * models)
    for s in 0..<models {
      for t in s..<models {
        let (x, y) = (points[s], points[t])
        var lanes = SIMD4<Double>(repeating: 0)
        var i = 0
        while i + 4 <= n {
          let left = SIMD4<Double>(x[i], x[i + 1], x[i + 2], x[i + 3])
          let right = SIMD4<Double>(y[i], y[i + 1], y[i + 2], y[i + 3])
          lanes += left * right
          i += 4
        }
        var total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
        while i < n {
          total += x[i] * y[i]
          i += 1
        }
        part[s * models + t] = total
      }
    }
    return part
  }

}
