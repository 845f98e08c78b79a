import Synchronization
import Testing

@testable import Tensor

@Suite struct SelectionTests {
  /// Reference: sort indices by (|x| descending, index ascending), keep the first k.
  func referenceMask(_ x: [Float], _ k: Int) -> [Bool] {
    let order = x.indices.sorted { (abs(x[$0]), -$0) > (abs(x[$1]), -$1) }
    var mask = [Bool](repeating: false, count: x.count)
    for i in order.prefix(k) { mask[i] = true }
    return mask
  }

  @Test(arguments: [0, 1, 7, 500, 99_999, 100_000, 100_001])
  func largestMagnitudesMatchesASortOnRandomValues(_ k: Int) {
    let x = CounterRNG(seed: 1, stream: "sel").normalTensor([100_000]).scalars
    let mask = Selection.largestMagnitudes(x, keep: k)
    #expect(mask.filter { $0 }.count == min(k, x.count))
    #expect(mask == referenceMask(x, k))
  }

  @Test func tiesAreBrokenTowardTheLowerIndex() {
    // Many equal magnitudes of both signs, spread over several parallel blocks.
    let x: [Float] = (0..<200_000).map { (i: Int) -> Float in
      if i % 3 != 0 { return Float(i % 7) * 0.01 }
      return i % 2 == 0 ? 0.5 : -0.5
    }
    for k in [1, 1000, 66_667, 70_000] {
      #expect(Selection.largestMagnitudes(x, keep: k) == referenceMask(x, k))
    }
  }

  /// The ranker over consecutive ranges, as the streaming merge drives it.
  func streamedMask(_ x: [Float], keep k: Int, rangeSize: Int) -> (mask: [Bool], tieOrder: Bool) {
    let ranges = stride(from: 0, to: x.count, by: rangeSize).map { Array(x[$0..<min(x.count, $0 + rangeSize)]) }
    var ranker = MagnitudeRanker(keep: k, count: x.count)
    for r in ranges.reversed() { ranker.addHigh(MagnitudeRanker.highCounts(r)) }  // sums: any order
    ranker.finishHigh()
    for r in ranges { ranker.addLow(ranker.lowCounts(r)) }
    ranker.finishLow()
    var before = 0
    var mask: [Bool] = []
    for r in ranges {
      mask += ranker.mask(r, equalBefore: ranker.needsTieOrder ? before : 0)
      before += ranker.equalCount(r)
    }
    return (mask, ranker.needsTieOrder)
  }

  @Test func rankerOverRangesMatchesASortAndAsksForTieOrderOnlyWhenTiesAreCut() {
    let distinct = CounterRNG(seed: 3, stream: "ranges").normalTensor([50_000]).scalars
    let streamed = streamedMask(distinct, keep: 12_345, rangeSize: 4096)
    #expect(!streamed.tieOrder)
    #expect(zip(streamed.mask, referenceMask(distinct, 12_345)).filter { $0 != $1 }.count == 0)
    let tied = distinct.map { ($0 * 8).rounded() / 8 }  // few distinct magnitudes
    for k in [9_999, 30_000] {
      let result = streamedMask(tied, keep: k, rangeSize: 4096)
      #expect(result.tieOrder)
      #expect(zip(result.mask, referenceMask(tied, k)).filter { $0 != $1 }.count == 0)
    }
  }

  /// The one-pass bracketed selection, as `TaskVectorMerge` drives it: a strided sample, one
  /// summary per range, then masks by the ranker it returns (the kept keys as a band when ties
  /// need no order; the ranker's mask with the per-range tie counts otherwise).
  func bracketedMask(_ x: [Float], keep k: Int, rangeSize: Int, sample: [Float]) -> [Bool]? {
    let ranges = stride(from: 0, to: x.count, by: rangeSize).map { Array(x[$0..<min(x.count, $0 + rangeSize)]) }
    guard let bracket = MagnitudeBracket(keep: k, count: x.count, sample: sample, budget: x.count),
      let (ranker, before, _) = bracket.ranker(ranges.map { bracket.summarize($0) })
    else { return nil }
    if let kept = ranker.keptKeys {
      return x.map { kept.contains($0.bitPattern & 0x7FFF_FFFF) }
    }
    return zip(ranges, before).flatMap { ranker.mask($0, equalBefore: $1) }
  }

  @Test func bracketedSelectionMatchesASortWithAndWithoutTies() {
    let distinct = CounterRNG(seed: 4, stream: "bracket").normalTensor([60_000]).scalars
    let tied = distinct.map { ($0 * 8).rounded() / 8 }  // few distinct magnitudes
    let zeros = distinct.enumerated().map { $0.offset % 3 == 0 ? 0 : $0.element }  // a third exactly 0
    for (x, name) in [(distinct, "distinct"), (tied, "tied"), (zeros, "zeros")] {
      let sample = stride(from: 0, to: x.count, by: 7).map { x[$0] }
      // The reference order, sorted once: |x| descending, then index ascending.
      let order = x.indices.sorted { (abs(x[$0]), -$0) > (abs(x[$1]), -$1) }
      for k in [1, 5_000, 29_999, 30_000, 45_000, 59_999] {
        var want = [Bool](repeating: false, count: x.count)
        for i in order.prefix(k) { want[i] = true }
        // 4096 is whole blocks of 16 lanes; 1000 leaves a tail of 8 in every range.
        for rangeSize in [4096, 1000] {
          #expect(
            bracketedMask(x, keep: k, rangeSize: rangeSize, sample: sample) == want,
            "\(name), k = \(k), ranges of \(rangeSize)")
        }
      }
    }
  }

  /// Every summary loop (AVX-512 and AVX2 where the machine has them, the portable one
  /// everywhere) gives a
  /// plain filter's counts and inside keys, in order: lengths with and without a tail of fewer
  /// than 16, ties at both ends, zeros of both signs and a bracket of one key.
  @Test func bracketSummariesMatchAPlainFilter() {
    let normal = CounterRNG(seed: 8, stream: "summary").normalTensor([5_003]).scalars
    let tied = normal.map { ($0 * 4).rounded() / 4 }
    let zeros = normal.enumerated().map { $0.offset % 5 == 0 ? ($0.offset % 10 == 0 ? -0.0 : 0) : $0.element }
    for x in [normal, tied, zeros] {
      for length in [0, 7, 16, 1_000, 4_096, 5_003] {
        let values = Array(x.prefix(length))
        for keep in [1, 1_500, 2_500, 4_900] {
          guard let bracket = MagnitudeBracket(keep: keep, count: x.count, sample: x, budget: x.count) else { continue }
          for (low, high) in [(bracket.low, bracket.high), (bracket.low, bracket.low)] {
            let b = MagnitudeBracket(keep: keep, count: x.count, low: low, high: high, budget: x.count)
            let keys = values.map { $0.bitPattern & 0x7FFF_FFFF }
            for unit in VectorUnit.runnable {
              let summary = b.summarize(values, unit: unit)
              #expect(summary.above == keys.filter { $0 > high }.count)
              #expect(summary.atHigh == keys.filter { $0 == high }.count)
              #expect(summary.atLow == (low == high ? 0 : keys.filter { $0 == low }.count))
              #expect(summary.inner == keys.filter { $0 > low && $0 < high })
            }
          }
        }
      }
    }
  }

  /// The summary of stored differences `model - base` is the summary of `Kernels.differences`,
  /// by the fused AVX-512 and AVX2 loops on BF16 (where the machine has them) and by the portable path,
  /// with tails, equal elements (differences of zero of either sign), and mixed dtypes.
  @Test func bracketSummariesOfStoredDifferencesAreThoseOfTheDifferences() {
    let n = 5_003
    let base = CounterRNG(seed: 9, stream: "base").normalTensor([n])
    var model = CounterRNG(seed: 10, stream: "model").normalTensor([n]).scalars.map { $0 * 0.1 }
    for i in stride(from: 0, to: n, by: 7) { model[i] = 0 }
    let stepped = Tensor(
      shape: [n],
      scalars: zip(model, base.scalars).enumerated().map { i, pair in
        i % 11 == 0 ? pair.1 : pair.1 + pair.0  // every 11th equal to the base
      })
    for (modelType, baseType) in [(DType.bf16, DType.bf16), (.f32, .bf16), (.bf16, .f16)] {
      let (m, b) = (stepped.encoded(as: modelType), base.encoded(as: baseType))
      let decodedBase = b.decoded().scalars
      let wholeDifferences = zip(m.decoded().scalars, decodedBase).map { $0 - $1 }
      for length in [0, 15, 16, 4_096, n] {
        let expectedValues = m.bytes.withUnsafeBytes { mb in
          Kernels.differences(
            [Kernels.StoredElements(start: mb.baseAddress!, dtype: modelType)], minus: Array(decodedBase.prefix(length))
          )[0]
        }
        // The bracket from the whole tensor's differences, so that every length meets one.
        guard let bracket = MagnitudeBracket(keep: n / 2, count: n, sample: wholeDifferences, budget: n) else {
          Issue.record("no bracket")
          continue
        }
        let expected = bracket.summarizePortably(expectedValues)
        for unit in VectorUnit.runnable {
          let summary = m.bytes.withUnsafeBytes { mb in
            b.bytes.withUnsafeBytes { bb in
              bracket.summarize(
                differenceOf: Kernels.StoredElements(start: mb.baseAddress!, dtype: modelType),
                minus: Kernels.StoredElements(start: bb.baseAddress!, dtype: baseType), count: length,
                unit: unit)
            }
          }
          #expect(
            summary.above == expected.above && summary.atHigh == expected.atHigh && summary.atLow == expected.atLow
              && summary.inner == expected.inner, "\(modelType) \(baseType) \(length) \(unit)")
        }
      }
    }
  }

  /// The bracket's ends come from order statistics of the sample's keys, found by histograms:
  /// the same keys as indexing the sorted keys, with ties, zeros and the last index.
  @Test func descendingKeysMatchTheSortedKeys() {
    let distinct = CounterRNG(seed: 6, stream: "order").normalTensor([5_000]).scalars
    let tied = distinct.map { ($0 * 4).rounded() / 4 }
    for x in [distinct, tied, [Float](repeating: 0, count: 9), [-2.5]] {
      let sorted = x.map { $0.bitPattern & 0x7FFF_FFFF }.sorted(by: >)
      let indices = Array(
        Set([0, 1, x.count / 3, x.count / 2, x.count - 2, x.count - 1]).filter { x.indices.contains($0) })
      for (index, key) in zip(indices, MagnitudeBracket.descendingKeys(x, at: indices)) {
        #expect(key == sorted[index], "index \(index) of \(x.count)")
      }
    }
  }

  /// Order statistics of keys split into parts, against sorting them all: the key at each rank,
  /// how many keys are larger and equal, and the equal ones part by part. Keys with many ties,
  /// spread over few high-bit bins (so a bin is searched by its low-bit histogram), over many
  /// (so it is sorted), and empty parts.
  @Test func keyOrderStatisticsMatchASort() {
    let rng = CounterRNG(seed: 8, stream: "statistics")
    let narrow = rng.normalTensor([30_000]).scalars.map { 0x3F80_0000 + UInt32(abs($0) * 600) }
    let wide = rng.normalTensor([9_000]).scalars.map { ($0 * 16).rounded().bitPattern & 0x7FFF_FFFF }
    for keys in [narrow, wide, [7, 7, 7], [0x7FFF_FFFF, 0]] {
      let cuts = [0, keys.count / 5, keys.count / 5, keys.count / 2, keys.count]
      let parts = (0..<4).map { Array(keys[cuts[$0]..<cuts[$0 + 1]]) }
      let sorted = keys.sorted(by: >)
      let ranks = Array(Set([0, 1, keys.count / 3, keys.count / 2, keys.count - 1].filter { $0 < keys.count }))
      let statistics = KeyOrderStatistic.select(parts, ranks: ranks)
      for (rank, statistic) in zip(ranks, statistics) {
        let key = sorted[rank]
        let expected = KeyOrderStatistic(
          key: key, larger: keys.filter { $0 > key }.count, equal: keys.filter { $0 == key }.count,
          equalByPart: parts.map { $0.filter { $0 == key }.count })
        #expect(statistic == expected, "rank \(rank) of \(keys.count)")
      }
    }
    #expect(KeyOrderStatistic.select([[1, 2]], ranks: []).isEmpty)
  }

  /// A sample that misses the threshold (or a bracket over budget) is reported, not guessed.
  /// A bracket made for one count kept, asked for another (`keeping`, as SCE does once it knows
  /// its count): the exact mask where the new threshold still falls inside the bracket, nil
  /// where it falls outside.
  @Test func aBracketKeepsAnotherCountWhereItsThresholdFallsInside() throws {
    let x = CounterRNG(seed: 6, stream: "keeping").normalTensor([40_000]).scalars.map { ($0 * 64).rounded() / 64 }
    let sample = stride(from: 0, to: x.count, by: 5).map { x[$0] }
    let order = x.indices.sorted { (abs(x[$0]), -$0) > (abs(x[$1]), -$1) }
    let ranges = stride(from: 0, to: x.count, by: 4096).map { Array(x[$0..<min(x.count, $0 + 4096)]) }
    let bracket = try #require(MagnitudeBracket(keep: 20_000, count: x.count, sample: sample, budget: x.count))
    let summaries = ranges.map { bracket.summarize($0) }
    for k in [19_990, 20_000, 20_010] {
      let (ranker, before, _) = try #require(bracket.keeping(k).ranker(summaries), "k = \(k)")
      var want = [Bool](repeating: false, count: x.count)
      for i in order.prefix(k) { want[i] = true }
      #expect(zip(ranges, before).flatMap { ranker.mask($0, equalBefore: $1) } == want, "k = \(k)")
    }
    #expect(bracket.keeping(5_000).ranker(summaries) == nil)
    #expect(bracket.keeping(39_000).ranker(summaries) == nil)
  }

  @Test func bracketedSelectionReportsAMissedThreshold() {
    let x = CounterRNG(seed: 5, stream: "miss").normalTensor([20_000]).scalars
    let misleading = x.map { $0 * 100 }  // every sampled magnitude above every real one
    let ranges = stride(from: 0, to: x.count, by: 4096).map { Array(x[$0..<min(x.count, $0 + 4096)]) }
    let bracket = MagnitudeBracket(keep: 10_000, count: x.count, sample: misleading, budget: x.count)
    #expect(bracket.map { b in b.ranker(ranges.map { b.summarize($0) }) == nil } == true)
    let tight = MagnitudeBracket(keep: 10_000, count: x.count, sample: x, budget: 10)
    #expect(tight.map { b in b.ranker(ranges.map { b.summarize($0) }) == nil } == true)
    #expect(MagnitudeBracket(keep: 0, count: 10, sample: x, budget: 10) == nil)
  }

  @Test func thresholdSplitsTheHighHistogramBin() {
    // Values sharing their top 16 bits differ only in the low bits.
    let x: [Float] = (0..<1000).map { Float(bitPattern: 0x3F80_0000 | UInt32(($0 * 7919) % 1000)) }
    #expect(Selection.largestMagnitudes(x, keep: 333) == referenceMask(x, 333))
  }

  @Test func elementwiseSumIsIndependentOfThreadsAndMatchesDouble() {
    let x = CounterRNG(seed: 2, stream: "sum").normalTensor([300_001]).scalars
    let sum = Elementwise.sum(x.count) { Double(x[$0]) }
    var blocked = 0.0
    for start in stride(from: 0, to: x.count, by: Elementwise.blockSize) {
      // Four lanes (element i goes to lane i % 4), then the tail of fewer than four.
      let end = min(x.count, start + Elementwise.blockSize)
      let full = start + (end - start) / 4 * 4
      var lanes = [0.0, 0.0, 0.0, 0.0]
      for i in start..<full { lanes[(i - start) % 4] += Double(x[i]) }
      blocked += x[full..<end].reduce((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) { $0 + Double($1) }
    }
    #expect(sum == blocked)  // bit-identical: blocks are fixed and combined in order
    #expect(abs(sum - x.reduce(0.0) { $0 + Double($1) }) < 1e-9)
    #expect(Elementwise.map(x.count) { x[$0] * 2 } == x.map { $0 * 2 })
  }

  @Test func mapBlocksCoversEveryElementInWholeUnits() {
    // 100_003 elements in units of 7 (rows): every element set once from its own index, and
    // every block but the last a whole number of units.
    let (count, unit) = (100_003, 7)
    let starts = Mutex([Range<Int>]())
    let values: [Float] = Elementwise.mapBlocks(count, unit: unit) { range, out in
      starts.withLock { $0.append(range) }
      for k in out.indices { out[k] = Float(range.lowerBound + k) }
    }
    #expect(values == (0..<count).map { Float($0) })
    let ranges = starts.withLock { $0 }.sorted { $0.lowerBound < $1.lowerBound }
    #expect(ranges.count > 1 && ranges.first?.lowerBound == 0 && ranges.last?.upperBound == count)
    #expect(zip(ranges, ranges.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound })
    #expect(ranges.dropLast().allSatisfy { $0.count % unit == 0 && $0.lowerBound % unit == 0 })
    #expect(Elementwise.mapBlocks(0) { (_, _: UnsafeMutableBufferPointer<Float>) in }.isEmpty)
  }
}
