import Testing

@testable import Tensor

@Suite struct ChangeKernelsTests {
  /// RAM's merge element by element with plain loops (the method's definition): the changed
  /// entries `|model - base| > epsilon` in `Double`, the one change of an element times its
  /// model's lambda, several changes each divided by their count, summed in model order.
  func referenceMerge(base: [Float], models: [[Float]], epsilon: Double, lambdas: [Double]) -> [Float] {
    base.indices.map { i in
      let taus = models.map { Double($0[i]) - Double(base[i]) }
      let changed = taus.map { abs($0) > epsilon }
      let c = changed.filter { $0 }.count
      var delta = 0.0
      for t in taus.indices where changed[t] {
        delta += c == 1 ? taus[t] * lambdas[t] : taus[t] / Double(c)
      }
      return Float(Double(base[i]) + delta)
    }
  }

  /// Inputs of `n` elements with every case the rule tells apart: entries unchanged, changed by
  /// less than, exactly and more than epsilon, by one model or several, NaN and infinite values
  /// in a model or the base, and ordinary differences of all sizes.
  func inputs(n: Int, models: Int) -> (base: [Float], models: [[Float]]) {
    let rng = CounterRNG(seed: 7, stream: "ram-kernel")
    var counter: UInt64 = 0
    func uniform() -> Float {
      counter += 1
      return rng.uniform(counter) * 2 - 1
    }
    let base = (0..<n).map { i -> Float in
      switch i % 97 {
      case 13: return .nan
      case 29: return .infinity
      default: return uniform() * 0.05
      }
    }
    let changes = (0..<models).map { t in
      (0..<n).map { i -> Float in
        let b = base[i]
        switch (i + 3 * t) % 11 {
        case 0: return b
        case 1: return b + 4e-6
        case 2: return Float(Double(b) + 1e-5)
        case 3 where i % 5 == t % 5: return -.infinity
        case 4 where i % 7 == 0: return .nan
        default: return b + uniform() * (t % 2 == 0 ? 1e-3 : 0.2)
        }
      }
    }
    return (base, changes)
  }

  /// The merge from stored BF16, F16 and F32 inputs (alike and mixed), encoded as BF16 and F32,
  /// is the plain loops' result on the decoded values, byte for byte, for one to five models,
  /// with and without lambdas, over several chunks and a tail that is not a multiple of eight.
  @Test(arguments: [1, 2, 3, 5])
  func mergeIsTheDefinitionByteForByte(_ count: Int) {
    let n = 3 * Kernels.chunk + 13
    let (base, models) = inputs(n: n, models: count)
    for pattern in [[DType.bf16], [.f32], [.f16, .bf16, .f32]] {
      let types = (0...count).map { pattern[$0 % pattern.count] }
      let decoded = zip([base] + models, types).map { values, type in
        Tensor(shape: [n], scalars: values).encoded(as: type).decoded().scalars
      }
      for lambdas in [[Double](repeating: 1, count: count), (0..<count).map { 1 + 0.01 * Double($0 + 1) }] {
        for epsilon in [1e-5, 0] {
          let expected = referenceMerge(
            base: decoded[0], models: Array(decoded.dropFirst()), epsilon: epsilon, lambdas: lambdas)
          for output in [DType.bf16, .f32] {
            let actual = withStoredElements([base] + models, types) { stored in
              [UInt8](unsafeUninitializedCapacity: n * output.size) { buffer, initialized in
                Kernels.changeMerge(
                  base: stored[0], models: Array(stored.dropFirst()), count: n, epsilon: epsilon, lambdas: lambdas,
                  into: UnsafeMutableRawBufferPointer(buffer), as: output)
                initialized = n * output.size
              }
            }
            let wanted = Tensor(shape: [n], scalars: expected).encoded(as: output).bytes
            let first = actual.indices.first { $0 >= wanted.count || actual[$0] != wanted[$0] }.map { $0 / output.size }
            #expect(
              actual.count == wanted.count && first == nil,
              "\(types) -> \(output), lambdas \(lambdas), epsilon \(epsilon): element \(first ?? -1) differs")
          }
          let floats = withStoredElements(decoded, [DType](repeating: .f32, count: count + 1)) { stored in
            Kernels.changeMerge(
              base: stored[0], models: Array(stored.dropFirst()), count: n, epsilon: epsilon, lambdas: lambdas)
          }
          let first = floats.indices.first { $0 >= n || floats[$0].bitPattern != expected[$0].bitPattern }
          #expect(floats.count == n && first == nil, "floats: element \(first ?? -1) differs")
        }
      }
    }
  }

  /// Each model's shared and unique changes are the definition's counts, over several chunks
  /// and a tail (whose padding must not count).
  @Test(arguments: [1, 3, 4])
  func countsAreTheDefinitionsCounts(_ count: Int) {
    let n = 2 * Kernels.chunk + 5
    let (base, models) = inputs(n: n, models: count)
    let epsilon = 1e-5
    let changed = models.map { m in (0..<n).map { abs(Double(m[$0]) - Double(base[$0])) > epsilon } }
    let contributors = (0..<n).map { i in changed.filter { $0[i] }.count }
    let shared = changed.map { c in (0..<n).filter { c[$0] && contributors[$0] > 1 }.count }
    let unique = changed.map { c in (0..<n).filter { c[$0] && contributors[$0] == 1 }.count }
    #expect(shared.reduce(0, +) + unique.reduce(0, +) > 0)
    let counts = withStoredElements([base] + models, [DType](repeating: .f32, count: count + 1)) { stored in
      Kernels.changeCounts(base: stored[0], models: Array(stored.dropFirst()), count: n, epsilon: epsilon)
    }
    #expect(counts.shared == shared)
    #expect(counts.unique == unique)
  }
}
