import Testing

@testable import Merge

@Suite struct MergeRangesTests {
  /// The batches released as ranges complete cover every element once, in order, each ending at
  /// a multiple of `inFlight` ranges or at the last range.
  @Test func completedBatchesCoverTheTensorOnceInOrder() {
    let size = MergeRanges.size
    let batch = MergeRanges.inFlight
    for count in [1, size - 1, size, batch * size, batch * size + 1, 3 * batch * size - 7] {
      let ranges = MergeRanges.ranges(count)
      var released: [Range<Int>] = []
      for j in ranges.indices {
        guard let done = MergeRanges.completedBatch(ranges, at: j) else { continue }
        #expect((j + 1) % batch == 0 || j == ranges.count - 1)
        #expect(done.upperBound == ranges[j].upperBound)
        released.append(done)
      }
      #expect(released.first?.lowerBound == 0 && released.last?.upperBound == count)
      #expect(zip(released, released.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound })
      #expect(released.count == (ranges.count + batch - 1) / batch)
    }
  }
}
