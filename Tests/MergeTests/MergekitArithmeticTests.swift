import Foundation
import Testing

@testable import Merge
@testable import Tensor

/// mergekit's arithmetic (`MergeArithmetic.rounded`): each torch operation rounded to the
/// compute dtype. The expected values are worked out by hand in bf16 (8 significant bits).
@Suite struct MergekitArithmeticTests {
  @Test func roundingToHalfTypes() {
    let bf16 = MergeArithmetic.rounded(.bf16)
    // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even significand.
    #expect(bf16.round(Float(1 + 0x1p-8)) == 1)
    #expect(bf16.round(Float(1 + 3 * 0x1p-8)) == 1 + 0x1p-6)
    #expect(bf16.round(Float(0.3)) == 0.30078125)
    #expect(MergeArithmetic.rounded(.f16).round(Float(0.3)) == 0.300048828125)
    #expect(MergeArithmetic.exact.round(Float(0.3)) == Float(0.3))
    // A Double rounds once: 1 + 2^-8 + 2^-40 is above the halfway point.
    #expect(bf16.round(1 + 0x1p-8 + 0x1p-40) == 1 + 0x1p-7)
  }

  /// Task arithmetic: the weight 0.3 becomes 0.30078125 in bf16 and the product by lambda 3 is
  /// rounded again, 0.90234375; exactly, 0.9 rounds once to 0.8984375.
  @Test func taskArithmeticRoundsEachOperation() throws {
    let method = TaskVectorMerge.taskArithmetic
    var p = try resolve(method, ["lambda": .number(3)], models: [["weight": .number(0.3)]])
    let inputs = MergeInputs(
      name: "w", base: Tensor(shape: [2], scalars: [0, 1]), models: [Tensor(shape: [2], scalars: [1, 2])])
    let exact = try method.merge(inputs, p).encoded(as: .bf16).decoded().scalars
    #expect(exact == [0.8984375, 1.8984375])
    p.arithmetic = .rounded(.bf16)
    // 1 + r(0.90234375) = 1.90234375, which needs 9 bits: rounds to 1.90625 (even).
    #expect(try method.merge(inputs, p).scalars == [0.90234375, 1.90625])
  }

  /// TIES: the weighted deltas elect the sign; the divisor is the bf16 sum of the agreeing
  /// models' bf16 weights; the quotient is rounded.
  @Test func tiesDividesByTheRoundedAgreeingWeights() throws {
    let method = TaskVectorMerge.ties
    var p = try resolve(method, models: [["weight": .number(0.3)], ["weight": .number(0.7)], ["weight": .number(0.1)]])
    p.arithmetic = .rounded(.bf16)
    let base = Tensor(shape: [1], scalars: [0])
    let models = [[1], [1], [-1]].map { Tensor(shape: [1], scalars: $0) }
    let merged = try method.merge(MergeInputs(name: "w", base: base, models: models), p).scalars
    // Weights in bf16: 0.30078125, 0.69921875, 0.10009765625. Weighted deltas: the same, the
    // last negative; the sum is positive, so models 1 and 2 agree. Kept sum 1.0 and divisor
    // r(0.30078125 + 0.69921875) = 1: the quotient is 1.
    #expect(merged == [1])
    let models2 = [[0.5], [0.25], [-1]].map { Tensor(shape: [1], scalars: $0) }
    let merged2 = try method.merge(MergeInputs(name: "w", base: base, models: models2), p).scalars
    // Weighted: r(0.5 * 0.30078125) = 0.150390625, r(0.25 * 0.69921875) = 0.1748046875,
    // -0.10009765625. The kept sum 0.3251953125 is 1.01001101b x 2^-2, halfway between two
    // bf16 values: it rounds to the even one, 0.32421875; the divisor is 1.
    #expect(merged2 == [0.32421875])
  }

  /// Linear, as mergekit computes it: float32 fused multiply-adds, then the division.
  @Test func linearAccumulatesInFloat32() throws {
    let method = LinearMerge()
    var p = try resolve(method, models: [["weight": .number(0.1)], ["weight": .number(0.2)]])
    p.arithmetic = .rounded(.f32)
    let a: Float = 0.7
    let b: Float = 1.3
    let inputs = MergeInputs(
      name: "w", base: nil, models: [Tensor(shape: [1], scalars: [a]), Tensor(shape: [1], scalars: [b])])
    let sum = (Float(0) + 0).addingProduct(a, Float(0.1)).addingProduct(b, Float(0.2))
    #expect(try method.merge(inputs, p).scalars == [sum / (Float(0.1) + Float(0.2))])
  }
}

/// Model Stock at its singularity: two opposed task vectors give cos = -1, so
/// `1 + (N - 1) cos = 0`; mergekit keeps the base there (t = 0) rather than dividing by zero.
/// In bf16 mergekit never reaches it: the norms round to 1.734375 each and their product to
/// 3.015625, so cos = r(-3 / 3.015625) = -0.99609375, the denominator 0.00390625, t = -510 and
/// 1 - t = 511 rounds to 512; the average of the models is the base here, so each element is
/// r(-510 b + 512 b) = 2 b.
@Test func modelStockAtItsSingularity() throws {
  let method = ModelStockMerge()
  let base = Tensor(shape: [3], scalars: [0.5, -1, 2])
  let up = Tensor(shape: [3], scalars: [1.5, 0, 3])
  let down = Tensor(shape: [3], scalars: [-0.5, -2, 1])
  var p = try resolve(method, models: [[:], [:]])
  #expect(try method.merge(MergeInputs(name: "w", base: base, models: [up, down]), p).scalars == base.scalars)
  p.arithmetic = .rounded(.bf16)
  #expect(try method.merge(MergeInputs(name: "w", base: base, models: [up, down]), p).scalars == [1, -2, 4])
}

/// RAM compares |tau| with epsilon as torch does, the scalar cast to the tensor's dtype: a task
/// vector entry of exactly bf16(1e-5) = 1.0013580322265625e-5 exceeds 1e-5, but not bf16(1e-5).
@Test func ramComparesWithEpsilonInTheComputeDType() throws {
  let method = RAMMerge.ram
  let tiny: Float = 1.0013580322265625e-5
  let inputs = MergeInputs(
    name: "w", base: Tensor(shape: [2], scalars: [0, 0]), models: [Tensor(shape: [2], scalars: [tiny, 0.5])])
  var p = try resolve(method, models: [[:]])
  #expect(try method.merge(inputs, p).scalars == [tiny, 0.5])
  p.arithmetic = .rounded(.bf16)
  #expect(try method.merge(inputs, p).scalars == [0, 0.5])
}

/// RAM and RAM+TL under bf16 rounding, streamed over several ranges (RAM+TL's counts spanning
/// them), give the whole-tensor construction of mergekit's torch operations: task vectors
/// rounded, epsilon cast, each shared entry's division rounded, the sum rounded (RAM) or left in
/// float32 (RAM+TL, whose lambdas are float32), and the addition to the base rounded.
@Test(arguments: [false, true])
func ramRoundedStreamedIsTheWholeTensorConstruction(_ plus: Bool) throws {
  let method = plus ? RAMMerge.ramPlus : RAMMerge.ram
  let r = MergeArithmetic.rounded(.bf16)
  let n = MergeRanges.size + 5_000
  let base = r.round(random([n], "ram-rounded-base").scalars)
  let models = (0..<3).map { t in
    r.round(
      zip(base, random([n], "ram-rounded-\(t)", scale: 0.01).scalars).enumerated().map { i, pair in
        (i >> (2 * t)) & 3 == 0 ? pair.0 : pair.0 + pair.1
      })
  }
  var p = try resolve(method, [:], models: [[:], [:], [:]])
  p.arithmetic = r
  let out = try method.merge(
    MergeInputs(
      name: "w", base: Tensor(shape: [n], scalars: base), models: models.map { Tensor(shape: [n], scalars: $0) }),
    p)
  let threshold = r.round(Float(1e-5))
  let tvs = models.map { m in (0..<n).map { r.round(m[$0] - base[$0]) } }
  let changed = tvs.map { tv in tv.map { abs($0) > threshold } }
  let contributors = (0..<n).map { i in changed.filter { $0[i] }.count }
  #expect(contributors.contains(1) && contributors.contains(2) && contributors.contains(3))
  let lambdas = (0..<3).map { m -> Float in
    guard plus else { return 1 }
    let shared = (0..<n).filter { changed[m][$0] && contributors[$0] > 1 }.count
    let unique = (0..<n).filter { changed[m][$0] && contributors[$0] == 1 }.count
    return 1 + 0.1 * min(0.2, max(0, Float(shared) / max(Float(unique), Float(1e-5))))
  }
  let expected = (0..<n).map { i -> Float in
    var sum: Float = 0
    for m in 0..<3 where changed[m][i] {
      sum += contributors[i] == 1 ? tvs[m][i] * lambdas[m] : r.round(tvs[m][i] / Float(contributors[i]))
    }
    return plus ? r.round(base[i] + sum) : r.round(base[i] + r.round(sum))
  }
  #expect(out.scalars == expected)
}
