import Foundation
import Testing

@testable import Tensor

/// Arcee fusion's kernels against plain scalar references in `Double` with the C library's
/// `exp` and `log`: on row lengths and ranges that do and do not fill whole eight-element
/// lanes, and ranges that start inside a row.
@Suite struct ImportanceKernelsTests {
  private let rng = CounterRNG(seed: 23, stream: "importance-kernels")
  private func values(_ count: Int, _ stream: Int, scale: Float) -> [Float] {
    (0..<count).map { Float(Int32(bitPattern: rng.bits32(UInt64(stream << 32 | $0)))) * 0x1p-31 * scale }
  }

  private func referenceDivergence(_ model: [Float], _ base: [Float], epsilon: Double) -> Double {
    func softmax(_ row: [Float]) -> [Double] {
      let top = Double(row.max() ?? 0)
      let e = row.map { Foundation.exp(Double($0) - top) }
      let total = e.reduce(0, +)
      return e.map { $0 / total + epsilon }
    }
    return zip(softmax(model), softmax(base)).reduce(0) { $0 + $1.0 * Foundation.log($1.0 / $1.1) }
  }

  @Test func softmaxDivergenceIsTheSequentialSum() {
    var scratch: [Double] = []
    // Lengths around the lane width, then long rows (scratch reused, growing and shrinking).
    for (n, count) in [1, 2, 7, 8, 9, 15, 17, 100, 1_001, 4_096, 50_003, 3].enumerated() {
      let base = values(count, 2 * n, scale: 4)
      let model = zip(base, values(count, 2 * n + 1, scale: 0.5)).map { $0 + $1 }
      let got = Kernels.softmaxDivergence(model[...], base[...], epsilon: 1e-8, scratch: &scratch)
      let expected = referenceDivergence(model, base, epsilon: 1e-8)
      #expect(abs(got - expected) <= 1e-12 * abs(expected) + 1e-300, "row of \(count): \(got) vs \(expected)")
      #expect(count == 1 || got > 0)
    }
  }

  /// Rows of BF16 values take their exponentials from the table (`exp(x) * exp(-max)`, to the
  /// bit), others from the polynomial: both within two ulps of `exp(x - max)`, and the divergence
  /// within 1e-13 of the reference (relative, or absolute below 1), also where one value passes
  /// the table's bound (the whole row then takes the polynomial) or a row's length leaves a tail.
  @Test func bf16RowsTakeTheirExponentialsFromTheTable() {
    func bf16(_ x: [Float]) -> [Float] { x.map { Float(bitPattern: $0.bitPattern & 0xFFFF_0000) } }
    for (n, count) in [1, 7, 8, 13, 64, 2_051].enumerated() {
      let base = bf16(values(count, 40 + 2 * n, scale: 3))
      let model = bf16(zip(base, values(count, 41 + 2 * n, scale: 0.05)).map { $0 + $1 })
      var outside = model
      outside[count / 2] = 2 * Kernels.tableBound
      for row in [base, model, outside] {
        var out = [Double](repeating: .nan, count: (count + 7) & ~7)
        let top = Double(row.max() ?? 0)
        let total = row.withUnsafeBufferPointer { x in
          out.withUnsafeMutableBufferPointer { o in
            guard let x = x.baseAddress, let o = o.baseAddress else { return Double.nan }
            return Kernels.shiftedExponentials(x, count: count, into: o)
          }
        }
        let tabled = row != outside
        var sum = 0.0
        for i in 0..<count {
          let expected = Foundation.exp(Double(row[i]) - top)
          #expect(abs(out[i] - expected) <= 2 * expected.ulp, "row of \(count), element \(i)")
          let fromTable =
            Kernels.bf16Exponentials[Int(row[i].bitPattern >> 16)] * VectorMath.exp(.init(repeating: -top))[0]
          #expect(!tabled || out[i].bitPattern == fromTable.bitPattern)
          sum += expected
        }
        #expect(out[count...].allSatisfy { $0 == 0 })
        #expect(abs(total - sum) <= 1e-14 * sum)
      }
      var scratch: [Double] = []
      for (m, b) in [(model, base), (outside, base)] {
        let got = Kernels.softmaxDivergence(m[...], b[...], epsilon: 1e-8, scratch: &scratch)
        let expected = referenceDivergence(m, b, epsilon: 1e-8)
        // A probability's last bit moves log(p / q) by about an ulp of 1, and the weights p of
        // those terms sum to 1: the error is some ulps of 1 however small the divergence.
        #expect(abs(got - expected) <= 1e-13 * max(abs(expected), 1), "row of \(count): \(got) vs \(expected)")
      }
    }
    // The table itself: exp of each BF16 value within an ulp of the C library's, inf above
    // ln(Double.max), 0 far below, NaN for NaN.
    for bits in 0..<65536 {
      let x = Double(Float(bitPattern: UInt32(bits) << 16))
      let entry = Kernels.bf16Exponentials[bits]
      let expected = Foundation.exp(x)
      let agrees =
        entry == expected || (entry.isNaN && x.isNaN)
        || (expected.isNormal && abs(entry - expected) <= expected.ulp)
      #expect(agrees, "exp(\(x)): \(entry) against \(expected)")
      if !agrees { break }
    }
  }

  @Test func softmaxDivergenceEdgeCases() {
    var scratch: [Double] = []
    let row: [Float] = [0.5, -2, 3, 1, 0, 7, -1, 2, 4]
    #expect(Kernels.softmaxDivergence(row[...], row[...], epsilon: 1e-8, scratch: &scratch) == 0)
    #expect(Kernels.softmaxDivergence([][...], [][...], epsilon: 1e-8, scratch: &scratch) == 0)
    var withNaN = row
    withNaN[8] = .nan
    #expect(Kernels.softmaxDivergence(withNaN[...], row[...], epsilon: 1e-8, scratch: &scratch).isNaN)
    // Slices that do not start at index 0.
    let long = values(40, 99, scale: 2)
    let other = values(40, 98, scale: 2)
    let got = Kernels.softmaxDivergence(long[13..<31], other[13..<31], epsilon: 1e-8, scratch: &scratch)
    let expected = referenceDivergence(Array(long[13..<31]), Array(other[13..<31]), epsilon: 1e-8)
    #expect(abs(got - expected) <= 1e-12 * expected)
  }

  @Test func orderKeyFollowsTheDoublesOrder() {
    let sorted: [Double] = [
      -.infinity, -.greatestFiniteMagnitude, -1, -.leastNormalMagnitude, -.leastNonzeroMagnitude, -0.0, 0,
      .leastNonzeroMagnitude, .leastNormalMagnitude, 1, 1.0000000000000002, .greatestFiniteMagnitude, .infinity,
    ]
    let keys = sorted.map(Kernels.orderKey)
    #expect(zip(keys, keys.dropFirst()).allSatisfy { $0 < $1 })
    // The key is a bijection: the double comes back from it.
    for x in sorted + [.nan, -.nan] {
      #expect(Kernels.orderedDouble(Kernels.orderKey(x)).bitPattern == x.bitPattern)
    }
  }

  /// A tensor's range: `count` elements from `offset`, in rows of `width`, with one factor
  /// per row of the whole tensor.
  private struct Case {
    let model: [Float]
    let base: [Float]
    let offset: Int
    let width: Int
    let factors: [Double]

    var importances: [Double] {
      model.indices.map { abs(Double(model[$0]) - Double(base[$0])) * factors[(offset + $0) / width] }
    }
  }

  private var cases: [Case] {
    // (offset, count, width): whole lanes, tails, ranges beginning and ending mid-row, rows
    // shorter than a lane, one element.
    [(0, 64, 16), (0, 61, 13), (5, 100, 7), (37, 250, 64), (3, 1, 5), (0, 29, 3), (1_000, 3_001, 1_013)].enumerated()
      .map { n, shape in
        let (offset, count, width) = shape
        let base = values(count, 100 + 2 * n, scale: 1)
        let model = zip(base, values(count, 101 + 2 * n, scale: 0.01)).map { $0 + $1 }
        // Repeats among the changes, so that prefixes are shared by several keys.
        let rows = (offset + count + width - 1) / width
        let factors = (0..<rows).map { Double($0 % 3 + 1) * 0.125 }
        return Case(
          model: model.enumerated().map { $0 % 5 == 0 ? base[$0] + 0.005 : $1 }, base: base, offset: offset,
          width: width, factors: factors)
      }
  }

  @Test func countImportanceKeysIsTheTopBitsHistogram() {
    for c in cases {
      // Counted onto what was there, in two halves whose sum is the histogram.
      var counts = [UInt32](repeating: 1, count: 2 * 65536)
      Kernels.countImportanceKeys(
        model: c.model, base: c.base, offset: c.offset, width: c.width, factors: c.factors, into: &counts)
      var expected = [UInt32](repeating: 2, count: 65536)
      for x in c.importances { expected[Int(Kernels.orderKey(x) >> 48)] += 1 }
      let histogram = (0..<65536).map { counts[$0] + counts[65536 + $0] }
      #expect(histogram == expected, "\(c.model.count) from \(c.offset) in rows of \(c.width)")
    }
  }

  @Test func importanceKeysAreTheKeysUnderThePrefixes() {
    for c in cases {
      let keys = c.importances.map(Kernels.orderKey)
      for knownBits in [16, 32, 48] {
        let shift = UInt64(64 - knownBits)
        // Prefixes of existing keys (one of them twice) and one that matches nothing.
        let prefixes = [keys[keys.count / 2] >> shift, keys[0] >> shift, keys[keys.count - 1] >> shift]
        for chosen in [[prefixes[0]], [prefixes[0], prefixes[0]], prefixes, [prefixes[1], 0x1234]] {
          let got = Kernels.importanceKeys(
            model: c.model, base: c.base, offset: c.offset, width: c.width, factors: c.factors, under: chosen,
            knownBits: knownBits)
          let expected = keys.filter { chosen.contains($0 >> shift) }
          #expect(got == expected, "\(c.model.count) from \(c.offset), \(knownBits) bits, \(chosen.count) prefixes")
          #expect(!got.isEmpty)
        }
      }
    }
  }

  @Test func fuseByImportanceTakesTheModelFromTheThreshold() {
    for c in cases {
      let importances = c.importances
      // The median importance as the threshold: ties at it take the model.
      let threshold = importances.sorted()[importances.count / 2]
      let got = Kernels.fuseByImportance(
        model: c.model, base: c.base, offset: c.offset, width: c.width, factors: c.factors, threshold: threshold)
      let expected = importances.indices.map { importances[$0] >= threshold ? c.model[$0] : c.base[$0] }
      #expect(got == expected, "\(c.model.count) from \(c.offset) in rows of \(c.width)")
    }
  }

  /// The cases with a NaN change in every range longer than a lane and a negative factor on
  /// every third row (the keys of negative importances have every bit flipped), their values
  /// rounded to `dtype` as a checkpoint of it would hold them.
  private func storedCases(_ dtype: DType) -> [Case] {
    cases.map { c in
      func rounded(_ x: [Float]) -> [Float] {
        Tensor(shape: [x.count], scalars: x).encoded(as: dtype).decoded().scalars
      }
      var model = c.model
      if model.count > 8 { model[model.count / 2] = .nan }
      return Case(
        model: rounded(model), base: rounded(c.base), offset: c.offset, width: c.width,
        factors: c.factors.enumerated().map { $0 % 3 == 2 ? -$1 : $1 })
    }
  }

  /// The kernels from stored elements (BF16 or F32 inputs: the `CKernels` loops where the unit
  /// has them; a model and base of different dtypes: decoded) give the definition's keys, and
  /// the definition's fused values encoded as BF16 and F32 byte for byte, on every unit.
  @Test(arguments: VectorUnit.allCases)
  func storedFormsAreTheDefinition(unit: VectorUnit) {
    for (dtypes, label) in [([DType.bf16, .bf16], "bf16"), ([.f32, .f32], "f32"), ([.bf16, .f32], "mixed")] {
      for c in storedCases(dtypes[0] == dtypes[1] ? dtypes[0] : .bf16) {
        let importances = c.importances
        let keys = importances.map(Kernels.orderKey)
        let context = "\(label) on \(unit): \(c.model.count) from \(c.offset) in rows of \(c.width)"
        withStoredElements([c.model, c.base], dtypes) { stored in
          for knownBits in [16, 48] {
            let shift = UInt64(64 - knownBits)
            let prefixes = [keys[keys.count / 2] >> shift, keys[0] >> shift, keys[keys.count - 1] >> shift]
            let got = Kernels.importanceKeys(
              model: stored[0], base: stored[1], count: c.model.count, offset: c.offset, width: c.width,
              factors: c.factors, under: prefixes, knownBits: knownBits, unit: unit)
            #expect(got == keys.filter { prefixes.contains($0 >> shift) }, "\(context), \(knownBits) bits")
          }
          let threshold = importances.filter { !$0.isNaN }.sorted()[importances.count / 3]
          let fused = importances.indices.map { importances[$0] >= threshold ? c.model[$0] : c.base[$0] }
          for output in [DType.bf16, .f32] {
            let expected = Tensor(shape: [fused.count], scalars: fused).encoded(as: output).bytes
            let got = [UInt8](unsafeUninitializedCapacity: fused.count * output.size) { buffer, initialized in
              Kernels.fuseByImportance(
                model: stored[0], base: stored[1], count: c.model.count, offset: c.offset, width: c.width,
                factors: c.factors, threshold: threshold, into: UnsafeMutableRawBufferPointer(buffer), as: output,
                unit: unit)
              initialized = fused.count * output.size
            }
            #expect(got == expected, "\(context), fused as \(output)")
          }
        }
      }
    }
  }
}
