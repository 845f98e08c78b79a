import Testing

@testable import Tensor

/// Independent float64 reference for round-to-nearest-even onto a grid: the nearer of the two
/// neighbours `low` and `high` (given as Double) of `x`, ties to the one whose code is even.
private func nearestEven(_ x: Double, low: Double, lowCode: UInt32, high: Double, highCode: UInt32) -> UInt32 {
  let dl = x - low
  let dh = high - x
  if dl < dh { return lowCode }
  if dh < dl { return highCode }
  return lowCode % 2 == 0 ? lowCode : highCode
}

@Suite struct DTypeConversionTests {
  @Test func bf16WidensExactlyAndNarrowsBack() {
    for code in 0...0xFFFF {
      let h = UInt16(code)
      let f = DTypeConversion.bf16ToF32Bits(h)
      #expect(f == UInt32(h) << 16)
      let back = DTypeConversion.f32ToBF16Bits(f)
      let isNaN = (h & 0x7FFF) > 0x7F80
      if isNaN {
        #expect(back & 0x7FFF > 0x7F80, "NaN \(code) stays NaN")
        #expect(back & 0xFFBF == h & 0xFFBF, "NaN payload of \(code) kept")
      } else {
        #expect(back == h, "bf16 \(code) round trip")
      }
    }
  }

  @Test func f32ToBF16RoundsToNearestEvenLikeAFloat64Reference() {
    let rng = CounterRNG(seed: 1, stream: "bf16")
    for i in 0..<200_000 {
      let bits = UInt32(truncatingIfNeeded: rng.bits(UInt64(i)))
      let x = Float(bitPattern: bits)
      guard x.isFinite else { continue }
      let got = DTypeConversion.f32ToBF16Bits(bits)
      let truncated = bits >> 16
      // Neighbours by magnitude: the truncated code and the next code away from zero.
      let low = abs(Double(Float(bitPattern: truncated << 16)))
      // Past the largest finite value the next grid point is 2^128, which IEEE rounds to infinity.
      let next = abs(Double(Float(bitPattern: (truncated + 1) << 16)))
      let high = next.isInfinite ? 0x1p128 : next
      let expected = nearestEven(abs(Double(x)), low: low, lowCode: truncated, high: high, highCode: truncated + 1)
      #expect(UInt32(got) == expected, "bits \(bits)")
    }
  }

  @Test func f16MatchesTheCompilersConversionBothWays() {
    for code in 0...0xFFFF {
      let h = UInt16(code)
      let reference = Float(Float16(bitPattern: h))
      let got = Float(bitPattern: DTypeConversion.f16ToF32Bits(h))
      if reference.isNaN {
        #expect(got.isNaN)
        #expect(DTypeConversion.f32ToF16Bits(got.bitPattern) & 0x3FF == h & 0x3FF, "NaN payload of \(code)")
      } else {
        #expect(got.bitPattern == reference.bitPattern, "f16 \(code)")
        #expect(DTypeConversion.f32ToF16Bits(got.bitPattern) == h, "f16 \(code) round trip")
      }
    }
    let rng = CounterRNG(seed: 2, stream: "f16")
    for i in 0..<200_000 {
      // Concentrate exponents near F16's range, subnormals and overflow included.
      let raw = UInt32(truncatingIfNeeded: rng.bits(UInt64(i)))
      let bits = (raw & 0x807F_FFFF) | ((100 + (raw >> 23) % 50) << 23)
      let x = Float(bitPattern: bits)
      #expect(DTypeConversion.f32ToF16Bits(bits) == Float16(x).bitPattern, "f32 bits \(bits)")
    }
  }

  @Test func f64NarrowsOnceNotTwice() {
    // 1 + 2^-8 + 2^-30 lies just above the midpoint between BF16 neighbours 1 and 1 + 2^-7.
    // Through F32 (round to nearest) it would become the exact midpoint and round down to 1.
    let d = 1 + 0x1p-8 + 0x1p-30
    var source = d.bitPattern
    var out: UInt16 = 0
    withUnsafeBytes(of: &source) { s in
      withUnsafeMutableBytes(of: &out) { o in DTypeConversion.convert(s, from: .f64, to: .bf16, into: o) }
    }
    #expect(Float(bitPattern: UInt32(out) << 16) == 1 + 0x1p-7)
  }

  @Test func integersRoundAndSaturate() {
    let values: [Float] = [2.5, 3.5, -2.5, 1e10, -1e10, .nan, 127.4]
    let encoded = Tensor(shape: [values.count], scalars: values).encoded(as: .i8)
    #expect(encoded.bytes.map { Int8(bitPattern: $0) } == [2, 4, -2, 127, -128, 0, 127])
    let wide = Tensor(shape: [2], scalars: [-1, 70000]).encoded(as: .u16)
    #expect(wide.decoded().scalars == [0, 65535])
    let big = TensorData(dtype: .i64, shape: [1], bytes: withUnsafeBytes(of: Int64(1 << 40)) { Array($0) })
    #expect(big.cast(to: .f64).decoded().scalars == [Float(1 << 40)])
  }

  @Test func fp8DecodesKnownValuesAndRoundTrips() {
    #expect(MiniFloat.e4m3.maxFinite == 448)
    #expect(MiniFloat.e5m2.maxFinite == 57344)
    #expect(MiniFloat.e4m3Table[1] == 0x1p-9)
    #expect(MiniFloat.e5m2Table[1] == 0x1p-16)
    #expect(MiniFloat.e4m3Table[0x7F].isNaN && MiniFloat.e5m2Table[0x7C] == .infinity)
    for code in 0...255 {
      for format in [MiniFloat.e4m3, MiniFloat.e5m2] {
        let value = format.decode(UInt8(code))
        if value.isNaN {
          #expect(format.encode(value).isNaNCode(format))
        } else {
          #expect(format.encode(value) == UInt8(code), "code \(code)")
        }
      }
    }
    // Midpoint between 1.0 (mantissa 000) and 1.125 (001) rounds to the even code, 1.0.
    #expect(MiniFloat.e4m3.encode(1.0625) == MiniFloat.e4m3.encode(1.0))
    #expect(MiniFloat.e4m3.encode(1000) == 0x7F)  // no infinity in E4M3FN: NaN
    #expect(MiniFloat.e5m2.encode(1e6) == 0x7C)
  }

  @Test func conversionThroughBuffersMatchesScalarPaths() {
    let rng = CounterRNG(seed: 3, stream: "buffers")
    let values = (0..<10_000).map { rng.normal(UInt64($0)) * 3 }
    let tensor = Tensor(shape: [100, 100], scalars: values)
    for dtype in [DType.bf16, .f16, .f32, .f64] {
      let data = tensor.encoded(as: dtype)
      let viaCast = tensor.encoded(as: .f32).cast(to: dtype)
      #expect(data == viaCast, "\(dtype)")
    }
    #expect(tensor.encoded(as: .f32).decoded() == tensor)
  }

  /// Rounding an array to BF16 or F16 (one loop for the dtype) gives each element's scalar
  /// rounding, bit for bit, on ties, subnormals, overflow, infinities, NaNs with and without
  /// payload, and ordinary values; exact and F32 arithmetic leave the array as it is.
  @Test func arrayRoundingIsTheScalarRounding() {
    let rng = CounterRNG(seed: 5, stream: "round")
    let special: [Float] = [
      0, -0, 1 + 0x1p-8, 1 + 3 * 0x1p-8, 0x1p-130, -0x1p-140, 65520, 70000, 3.4e38, .infinity, -.infinity, .nan,
      Float(bitPattern: 0x7F80_0001), Float(bitPattern: 0xFFC1_2345), 0x1p-24, 0x1p-25, 0x1.8p-25,
    ]
    let values = special + (0..<5_000).map { rng.normal(UInt64($0)) * 100 }
    for arithmetic in [MergeArithmetic.rounded(.bf16), .rounded(.f16), .rounded(.f32), .exact] {
      let rounded = arithmetic.round(values)
      #expect(rounded.map(\.bitPattern) == values.map { arithmetic.round($0).bitPattern }, "\(arithmetic)")
    }
    #expect(MergeArithmetic.rounded(.bf16).round([Float]()) == [])
  }
}

extension UInt8 {
  fileprivate func isNaNCode(_ format: MiniFloat) -> Bool { format.decode(self).isNaN }
}
