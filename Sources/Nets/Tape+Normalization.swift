import Tensor

/// Normalisation over the features of each row.
extension Tape {
  /// LayerNorm: `(x - mean) / sqrt(var + eps) * gamma + beta` per row, with the biased variance
  /// (as PyTorch); `gamma` and `beta` are `1 x columns`.
  @_specialize(exported:true,where T == Float)
  public func layerNorm(_ a: Var, gamma: Var, beta: Var, epsilon: Double) -> Var {
    let x = value(a)
    let (w, b) = (value(gamma), value(beta))
    let n = x.columns
    var normalized = x
    var inverseDeviation = [T](repeating: 0, count: x.rows)
    var out = x
    for r in 0..<x.rows {
      let row = r * n
      var mean: T = 0
      for c in 0..<n { mean += x.values[row + c] }
      mean /= T(n)
      var variance: T = 0
      for c in 0..<n { variance += (x.values[row + c] - mean) * (x.values[row + c] - mean) }
      let inverse = 1 / (variance / T(n) + T(epsilon)).squareRoot()
      inverseDeviation[r] = inverse
      for c in 0..<n {
        let h = (x.values[row + c] - mean) * inverse
        normalized.values[row + c] = h
        out.values[row + c] = h * w.values[c] + b.values[c]
      }
    }
    return record(out, inputs: [a, gamma, beta]) { [unowned self] g in
      var dw = Matrix<T>(zeros: 1, n)
      var dx = Matrix<T>(zeros: x.rows, n)
      for r in 0..<x.rows {
        let row = r * n
        var sum: T = 0
        var dotted: T = 0
        for c in 0..<n {
          let dh = g.values[row + c] * w.values[c]
          sum += dh
          dotted += dh * normalized.values[row + c]
          dw.values[c] += g.values[row + c] * normalized.values[row + c]
        }
        for c in 0..<n {
          let dh = g.values[row + c] * w.values[c]
          dx.values[row + c] = inverseDeviation[r] * (dh - sum / T(n) - normalized.values[row + c] * dotted / T(n))
        }
      }
      accumulate(a, dx)
      accumulate(gamma, dw)
      accumulate(beta, g.columnSums())
    }
  }

  /// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight` per row (Llama), `weight` `1 x columns`.
  @_specialize(exported:true,where T == Float)
  public func rmsNorm(_ a: Var, weight: Var, epsilon: Double) -> Var {
    let x = value(a)
    let w = value(weight)
    let n = x.columns
    // Row by row on all cores: each row's sum in order, so the bits do not depend on the split.
    let inverseRMS = Elementwise.map(x.rows) { r in
      var squares: T = 0
      for c in 0..<n { squares += x.values[r * n + c] * x.values[r * n + c] }
      return 1 / (squares / T(n) + T(epsilon)).squareRoot()
    }
    // Whole rows a block, without a division per element for its row and column.
    let values = x.values.withUnsafeBufferPointer { input in
      w.values.withUnsafeBufferPointer { gains in
        Elementwise.mapBlocks(x.values.count, unit: n) { (range, out: UnsafeMutableBufferPointer<T>) in
          for r in (range.lowerBound / max(n, 1))..<(range.upperBound / max(n, 1)) {
            let (row, local, inverse) = (r * n, r * n - range.lowerBound, inverseRMS[r])
            for c in 0..<n { out[local + c] = input[row + c] * inverse * gains[c] }
          }
        }
      }
    }
    let out = Matrix(rows: x.rows, columns: n, values: values)
    return record(out, inputs: [a, weight]) { [unowned self] g in
      var dw = Matrix<T>(zeros: 1, n)
      var dx = Matrix<T>(zeros: x.rows, n)
      for r in 0..<x.rows {
        let row = r * n
        let inverse = inverseRMS[r]
        var dotted: T = 0
        for c in 0..<n {
          let h = x.values[row + c] * inverse
          dotted += g.values[row + c] * w.values[c] * h
          dw.values[c] += g.values[row + c] * h
        }
        for c in 0..<n {
          let h = x.values[row + c] * inverse
          dx.values[row + c] = inverse * (g.values[row + c] * w.values[c] - h * dotted / T(n))
        }
      }
      accumulate(a, dx)
      accumulate(weight, dw)
    }
  }
}
