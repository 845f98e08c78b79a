import CBLAS
import Foundation
import Testing

@testable import Tensor

/// Float64 reference product `op(a) op(b)` by plain loops.
func referenceProduct(_ a: Tensor, _ b: Tensor, transposeA: Bool = false, transposeB: Bool = false) -> [Double] {
  let (m, k) = transposeA ? (a.shape[1], a.shape[0]) : (a.shape[0], a.shape[1])
  let n = transposeB ? b.shape[0] : b.shape[1]
  func at(_ t: Tensor, _ i: Int, _ j: Int, _ transposed: Bool) -> Double {
    Double(transposed ? t.scalars[j * t.shape[1] + i] : t.scalars[i * t.shape[1] + j])
  }
  var c = [Double](repeating: 0, count: m * n)
  for i in 0..<m {
    for j in 0..<n { for p in 0..<k { c[i * n + j] += at(a, i, p, transposeA) * at(b, p, j, transposeB) } }
  }
  return c
}

/// Largest |aᵀa - I| over the columns of `a`.
func orthonormalityError(_ a: Tensor) -> Double {
  let g = referenceProduct(a, a, transposeA: true)
  let k = a.shape[1]
  var worst = 0.0
  for i in 0..<k { for j in 0..<k { worst = max(worst, abs(g[i * k + j] - (i == j ? 1 : 0))) } }
  return worst
}

func maxRelativeDifference(_ a: [Float], _ b: [Double]) -> Double {
  let scale = b.map(abs).max() ?? 1
  return zip(a, b).map { abs(Double($0) - $1) }.max()! / max(scale, 1e-30)
}

/// A matrix with the given singular values: orthonormal factors from QR of Gaussian matrices.
func matrixWithSingularValues(_ values: [Float], rows: Int, columns: Int, seed: UInt64) -> Tensor {
  let k = values.count
  var u = LAPACK.qr(CounterRNG(seed: seed, stream: "U").normalTensor([rows, k])).q
  let v = LAPACK.qr(CounterRNG(seed: seed, stream: "V").normalTensor([columns, k])).q
  for i in 0..<rows { for j in 0..<k { u.scalars[i * k + j] *= values[j] } }
  return BLAS.matmul(u, v, transposeB: true)
}

@Suite struct LinearAlgebraTests {
  @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
  func matmulMatchesAFloat64Loop(_ transposes: (Bool, Bool)) {
    let (ta, tb) = transposes
    let a = CounterRNG(seed: 1, stream: "a").normalTensor(ta ? [5, 7] : [7, 5])
    let b = CounterRNG(seed: 1, stream: "b").normalTensor(tb ? [3, 5] : [5, 3])
    let c = BLAS.matmul(a, b, transposeA: ta, transposeB: tb)
    #expect(c.shape == [7, 3])
    #expect(maxRelativeDifference(c.scalars, referenceProduct(a, b, transposeA: ta, transposeB: tb)) < 1e-6)
    let d = BLAS.matmul(DoubleMatrix(a), DoubleMatrix(b), transposeA: ta, transposeB: tb)
    for (x, y) in zip(d.values, referenceProduct(a, b, transposeA: ta, transposeB: tb)) { #expect(abs(x - y) < 1e-12) }
  }

  /// `BLAS.product` writes a fresh, never zero-filled array: every element must come from the
  /// product (freed memory of NaNs beforehand must not show through), and a zero inner size
  /// gives zeros.
  @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
  func productIntoAFreshArrayMatchesAFloat64Loop(_ transposes: (Bool, Bool)) {
    let (ta, tb) = transposes
    let a = CounterRNG(seed: 5, stream: "a").normalTensor(ta ? [64, 96] : [96, 64])
    let b = CounterRNG(seed: 5, stream: "b").normalTensor(tb ? [80, 64] : [64, 80])
    for _ in 0..<4 { _ = [Float](repeating: .nan, count: 96 * 80) }
    let c = BLAS.product(
      a.scalars, a.shape[0], a.shape[1], transposeA: ta, b.scalars, b.shape[0], b.shape[1], transposeB: tb)
    #expect(c.count == 96 * 80 && c.allSatisfy(\.isFinite))
    #expect(maxRelativeDifference(c, referenceProduct(a, b, transposeA: ta, transposeB: tb)) < 1e-5)
    #expect(BLAS.product([Float](), 3, 0, [Float](), 0, 2) == [Float](repeating: 0, count: 6))
  }

  @Test func gramIsATransposeAInDouble() {
    let a = CounterRNG(seed: 3, stream: "g").normalTensor([11, 4])
    let g = BLAS.gram(a)
    let reference = referenceProduct(a, a, transposeA: true)
    for (x, y) in zip(g.values, reference) { #expect(abs(x - y) < 1e-12) }
    #expect(g == g.transposed)
  }

  @Test func solveRecoversAKnownSolution() throws {
    var a = CounterRNG(seed: 2, stream: "A").normalTensor([6, 6], scale: 0.3)
    for i in 0..<6 { a.scalars[i * 6 + i] += 4 }
    let x = CounterRNG(seed: 2, stream: "x").normalTensor([6, 2])
    let b = BLAS.matmul(a, x)
    let solved = try LAPACK.solve(a, b)
    for (s, e) in zip(solved.scalars, x.scalars) { #expect(abs(s - e) < 1e-4) }
    let solved64 = try LAPACK.solve(DoubleMatrix(a), DoubleMatrix(rows: 6, columns: 2, values: referenceProduct(a, x)))
    for (s, e) in zip(solved64.values, x.scalars) { #expect(abs(s - Double(e)) < 1e-10) }
  }

  @Test func singularAndIndefiniteMatricesAreErrors() {
    let a = Tensor(shape: [2, 2], scalars: [1, 2, 2, 4])
    let b = Tensor(shape: [2, 1], scalars: [1, 1])
    #expect(throws: LinearAlgebraError.singular(pivot: 2)) { try LAPACK.solve(a, b) }
    let indefinite = DoubleMatrix(rows: 2, columns: 2, values: [1, 2, 2, 1])  // eigenvalues 3 and -1
    #expect(throws: LinearAlgebraError.notPositiveDefinite(order: 2)) {
      try LAPACK.choleskySolve(indefinite, DoubleMatrix(rows: 2, columns: 1, values: [1, 1]))
    }
  }

  @Test func choleskySolvesAPositiveDefiniteSystem() throws {
    let m = DoubleMatrix(CounterRNG(seed: 4, stream: "m").normalTensor([9, 5]))
    var spd = BLAS.gram(m)
    for i in 0..<5 { spd[i, i] += 0.5 }
    let x = DoubleMatrix(CounterRNG(seed: 4, stream: "x").normalTensor([5, 3]))
    let solved = try LAPACK.choleskySolve(spd, BLAS.matmul(spd, x))
    for (s, e) in zip(solved.values, x.values) { #expect(abs(s - e) < 1e-10) }
  }

  @Test(arguments: [[9, 5], [4, 7], [6, 6]])
  func qrIsOrthonormalTimesUpperTriangular(_ shape: [Int]) {
    let a = CounterRNG(seed: 5, stream: "qr\(shape)").normalTensor(shape)
    let (q, r) = LAPACK.qr(a)
    let k = min(shape[0], shape[1])
    #expect(q.shape == [shape[0], k] && r.shape == [k, shape[1]])
    #expect(orthonormalityError(q) < 1e-5)
    for i in 0..<k { for j in 0..<min(i, shape[1]) { #expect(r.scalars[i * shape[1] + j] == 0) } }
    #expect(maxRelativeDifference(a.scalars, referenceProduct(q, r)) < 1e-5)
  }

  @Test(arguments: [[12, 7], [5, 9]])
  func svdReconstructsAndRecoversKnownSingularValues(_ shape: [Int]) throws {
    let k = min(shape[0], shape[1])
    let values: [Float] = (0..<k).map { Float(10 - $0) * 0.7 }
    let a = matrixWithSingularValues(values, rows: shape[0], columns: shape[1], seed: 6)
    let f = try LAPACK.svd(a)
    for (s, e) in zip(f.s, values) { #expect(abs(s - e) < 1e-4 * values[0]) }
    #expect(orthonormalityError(f.u) < 1e-5)
    #expect(
      orthonormalityError(
        Tensor(shape: [f.vt.shape[1], f.vt.shape[0]], scalars: DoubleMatrix(f.vt).transposed.values.map(Float.init)))
        < 1e-5)
    #expect(maxRelativeDifference(f.reconstructed.scalars, a.scalars.map(Double.init)) < 1e-5)

    let d = try LAPACK.svd(DoubleMatrix(a))
    for (s, e) in zip(d.s, values) { #expect(abs(s - Double(e)) < 1e-5) }
    var us = d.u
    for i in 0..<us.rows { for j in 0..<k { us[i, j] *= d.s[j] } }
    for (x, y) in zip(BLAS.matmul(us, d.vt).values, a.scalars) { #expect(abs(x - Double(y)) < 1e-12) }
  }

  @Test func symmetricEigenMatchesClosedFormAndDefinition() throws {
    let (values, vectors) = try LAPACK.symmetricEigen(DoubleMatrix(rows: 2, columns: 2, values: [2, 1, 1, 2]))
    #expect(abs(values[0] - 1) < 1e-14 && abs(values[1] - 3) < 1e-14)
    #expect(abs(abs(vectors[0, 1]) - 0.5.squareRoot()) < 1e-14)

    let a = BLAS.gram(DoubleMatrix(CounterRNG(seed: 7, stream: "e").normalTensor([8, 6])))
    let eig = try LAPACK.symmetricEigen(a)
    #expect(eig.values == eig.values.sorted())
    let av = BLAS.matmul(a, eig.vectors)
    for i in 0..<6 { for j in 0..<6 { #expect(abs(av[i, j] - eig.values[j] * eig.vectors[i, j]) < 1e-10) } }
  }

  /// The values alone: the closed form of [[2, 1], [1, 2]], the vector route's values on a Gram
  /// matrix of 300 x 200 (to 1e-10 of the largest), and their sum is the trace.
  @Test func symmetricEigenvaluesAreTheEigendecompositionsValues() throws {
    let small = try LAPACK.symmetricEigenvalues(DoubleMatrix(rows: 2, columns: 2, values: [2, 1, 1, 2]))
    #expect(abs(small[0] - 1) < 1e-14 && abs(small[1] - 3) < 1e-14)
    let a = BLAS.gram(DoubleMatrix(CounterRNG(seed: 9, stream: "values").normalTensor([300, 200])))
    let values = try LAPACK.symmetricEigenvalues(a)
    let reference = try LAPACK.symmetricEigen(a).values
    let largest = reference.map(abs).max() ?? 1
    #expect(values.count == 200 && values == values.sorted())
    for (x, y) in zip(values, reference) { #expect(abs(x - y) <= 1e-10 * largest) }
    let trace = (0..<200).reduce(0.0) { $0 + a[$1, $1] }
    #expect(abs(values.reduce(0, +) - trace) <= 1e-10 * trace)
    #expect(try LAPACK.symmetricEigenvalues(DoubleMatrix(rows: 0, columns: 0, values: [])).isEmpty)
  }

  @Test func leastSquaresSolvesOverdeterminedAndRankDeficientSystems() throws {
    let a = CounterRNG(seed: 8, stream: "ls").normalTensor([10, 4])
    let x = CounterRNG(seed: 8, stream: "x").normalTensor([4, 2])
    let b = DoubleMatrix(rows: 10, columns: 2, values: referenceProduct(a, x))
    let (solution, rank) = try LAPACK.leastSquares(DoubleMatrix(a), b)
    #expect(rank == 4)
    for (s, e) in zip(solution.values, x.scalars) { #expect(abs(s - Double(e)) < 1e-10) }

    // Rank 1: every x with x0 + x1 = 2 fits; the minimum-norm one is (1, 1).
    let deficient = DoubleMatrix(rows: 2, columns: 2, values: [1, 1, 1, 1])
    let (minimum, rank1) = try LAPACK.leastSquares(
      deficient, DoubleMatrix(rows: 2, columns: 1, values: [2, 2]), rcond: 1e-12)
    #expect(rank1 == 1)
    #expect(abs(minimum.values[0] - 1) < 1e-12 && abs(minimum.values[1] - 1) < 1e-12)
  }

  @Test func randomizedSVDRecoversALowRankMatrixExactly() throws {
    let a = matrixWithSingularValues([9, 7, 5, 3, 1], rows: 200, columns: 120, seed: 9)
    let f = try LAPACK.randomizedSVD(a, rank: 5, seed: 1)
    #expect(f.s.count == 5)
    for (s, e) in zip(f.s, [Float(9), 7, 5, 3, 1]) { #expect(abs(s - e) < 1e-4) }
    #expect(maxRelativeDifference(f.reconstructed.scalars, a.scalars.map(Double.init)) < 1e-4)
  }

  @Test func randomizedSVDIsNearOptimalOnADecayingSpectrum() throws {
    // Singular values 0.8^i: the best rank-r error is sqrt(sum of the squares after r).
    let values: [Float] = (0..<60).map { Float(pow(0.8, Double($0))) }
    let a = matrixWithSingularValues(values, rows: 150, columns: 90, seed: 10)
    let r = 12
    let f = try LAPACK.randomizedSVD(a, rank: r, seed: 2)
    let optimal = values[r...].reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
    let residual = zip(a.scalars, f.reconstructed.scalars).reduce(0.0) {
      $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1)
    }.squareRoot()
    #expect(residual <= optimal * 1.01)
    #expect(residual >= optimal * 0.999)  // nobody beats Eckart-Young
    let same = try LAPACK.randomizedSVD(a, rank: r, seed: 2)
    #expect(same.s == f.s && same.u == f.u)  // deterministic in the seed
  }

  /// `gram(ofRows:)` in each precision equals the loop product `a aᵀ` or `aᵀ a`.
  @Test func gramInItsOwnPrecisionMatchesTheDefinition() {
    let a = CounterRNG(seed: 9, stream: "g").normalTensor([7, 5])
    for ofRows in [false, true] {
      let expected = referenceProduct(a, a, transposeA: !ofRows, transposeB: ofRows)
      let single = BLAS.gram(a.scalars, rows: 7, columns: 5, ofRows: ofRows)
      let double = BLAS.gram(a.scalars.map(Double.init), rows: 7, columns: 5, ofRows: ofRows)
      #expect(single.count == (ofRows ? 49 : 25))
      for (x, e) in zip(single, expected) { #expect(abs(Double(x) - e) < 1e-5 * max(1, abs(e))) }
      for (x, e) in zip(double, expected) { #expect(abs(x - e) < 1e-12 * max(1, abs(e))) }
    }
  }

  /// The kept eigenpairs are the full decomposition's largest, largest first, in both precisions,
  /// by both routes: inverse iteration for a few (3 of 40), divide and conquer for many (4 of 12).
  @Test(arguments: [(12, 4), (40, 3)])
  func largestEigenpairsAreTheTopOfTheFullDecomposition(_ shape: (Int, Int)) throws {
    let (n, count) = shape
    #expect((count * LAPACK.divideAndConquerShare >= n) == (n == 12))
    let a = BLAS.gram(DoubleMatrix(CounterRNG(seed: 10, stream: "top").normalTensor([n + 8, n])))
    let full = try LAPACK.symmetricEigen(a)
    let top = try LAPACK.largestEigenpairs(a.values, order: n, count: count)
    let topSingle = try LAPACK.largestEigenpairs(a.values.map { Float($0) }, order: n, count: count)
    #expect(top.values.count == count && top.vectorRows.count == count * n)
    for j in 0..<count {
      let k = n - 1 - j
      #expect(abs(top.values[j] - full.values[k]) < 1e-10 * full.values[n - 1])
      #expect(abs(Double(topSingle.values[j]) - full.values[k]) < 1e-5 * full.values[n - 1])
      // Same vector up to sign.
      let dot = (0..<n).reduce(0.0) { $0 + top.vectorRows[j * n + $1] * full.vectors[$1, k] }
      let dotSingle = (0..<n).reduce(0.0) { $0 + Double(topSingle.vectorRows[j * n + $1]) * full.vectors[$1, k] }
      #expect(abs(abs(dot) - 1) < 1e-10 && abs(abs(dotSingle) - 1) < 1e-4)
    }
    #expect(try LAPACK.largestEigenpairs(a.values, order: n, count: 0).values.isEmpty)
  }

  /// A spectrum like a task matrix's Gram matrix: a few large eigenvalues over a bulk packed
  /// within 1e-3 of the largest, where eigenvectors are only defined as a subspace. Both routes
  /// return orthonormal vectors with residuals `|A v - l v|` at the precision's rounding, and
  /// the divide-and-conquer route handles every pair (count = n).
  @Test(arguments: [4, 10, 60])
  func largestEigenpairsOfAClusteredSpectrum(_ count: Int) throws {
    let n = 60
    // An orthogonal basis: the eigenvectors of a random Gram matrix.
    let q = try LAPACK.symmetricEigen(
      BLAS.gram(DoubleMatrix(CounterRNG(seed: 12, stream: "cluster").normalTensor([n + 5, n])))
    ).vectors
    let spectrum = (0..<n).map { i in i < 3 ? 3.0 - Double(i) : 1e-3 * (1 + Double(i) / Double(n)) }
    var a = DoubleMatrix(zeros: n, n)
    for i in 0..<n {
      for j in 0..<n { a[i, j] = (0..<n).reduce(0) { $0 + q[i, $1] * spectrum[$1] * q[j, $1] } }
    }
    for single in [false, true] {
      let (values, rows): ([Double], [Double])
      if single {
        let top = try LAPACK.largestEigenpairs(a.values.map { Float($0) }, order: n, count: count)
        (values, rows) = (top.values.map(Double.init), top.vectorRows.map(Double.init))
      } else {
        (values, rows) = try LAPACK.largestEigenpairs(a.values, order: n, count: count)
      }
      let tolerance = single ? 1e-5 : 1e-12
      for j in 0..<count {
        #expect(abs(values[j] - spectrum.sorted(by: >)[j]) < tolerance * 3)
        let residual = (0..<n).map { i in
          (0..<n).reduce(0) { $0 + a[i, $1] * rows[j * n + $1] } - values[j] * rows[j * n + i]
        }
        #expect(residual.map(abs).max() ?? 0 < tolerance * 3, "residual of pair \(j), float: \(single)")
        for k in j..<count {
          let dot = (0..<n).reduce(0) { $0 + rows[j * n + $1] * rows[k * n + $1] }
          #expect(abs(dot - (j == k ? 1 : 0)) < tolerance * 10, "pairs \(j), \(k), float: \(single)")
        }
      }
    }
  }

  /// Overlapping single-threaded scopes from several workers leave BLAS's thread count as it
  /// was once the last one closes.
  @Test func overlappingSingleThreadedScopesRestoreTheThreadCount() throws {
    let before = openblas_get_num_threads()
    try Parallel.forEach(8, workers: 4) { _, _ in
      BLAS.singleThreaded { #expect(openblas_get_num_threads() == 1) }
    }
    #expect(openblas_get_num_threads() == before)
  }

  /// OpenBLAS's idle spin is shortened to 2^22 ticks, within the 4...30 OpenBLAS accepts,
  /// unless the user chose one.
  @Test func theIdleSpinIsShortenedUnlessTheUserChoseOne() {
    #expect(BLAS.idleSpinSetting(environment: ["PATH": "/usr/bin"]) == "22")
    #expect((4...30).contains(BLAS.idleSpinExponent))
    #expect(BLAS.idleSpinSetting(environment: ["OPENBLAS_THREAD_TIMEOUT": "28"]) == nil)
  }

  @Test func takingTurnsRunsEveryItemOnceAndRethrowsTheFirstError() throws {
    let seen = ResultSlots<Int>(count: 50)
    try Parallel.forEachTakingTurns(50, workers: 3) { seen.set($0, $0 * $0) }
    #expect((0..<50).map(seen.get) == (0..<50).map { $0 * $0 })
    struct Failure: Error, Equatable { let item: Int }
    #expect(throws: Failure(item: 7)) {
      try Parallel.forEachTakingTurns(20, workers: 3) { if $0 == 7 || $0 == 12 { throw Failure(item: $0) } }
    }
  }

  /// `Parallel.map` gives every item's value in item order, and rethrows the first error.
  @Test func parallelMapKeepsItemOrder() throws {
    #expect(try Parallel.map(37, workers: 3) { $0 * 3 + 1 } == (0..<37).map { $0 * 3 + 1 })
    #expect(try Parallel.map(0) { $0 }.isEmpty)
    struct Failure: Error, Equatable { let item: Int }
    #expect(throws: Failure(item: 4)) {
      _ = try Parallel.map(9, workers: 2) { item -> Int in
        if item == 4 || item == 6 { throw Failure(item: item) }
        return item
      }
    }
  }

  /// Items are produced side by side but consumed in order, never more than the budget ahead of
  /// the consumer; the flight's budget also admits an item larger than it, alone.
  @Test func inOrderConsumesEveryResultInOrderWithinTheBudget() throws {
    let produced = ResultSlots<Int>(count: 1)
    produced.set(0, 0)
    var consumed: [Int] = []
    var mostAhead = 0
    try Parallel.inOrder(
      200, workers: 4, budget: 3,
      produce: { i -> Int in
        produced.update(0) { $0 + 1 }
        return i * i
      },
      consume: { i, square in
        #expect(square == i * i)
        // Produced and not yet consumed (i is, 0..<i are not): within the budget of 3.
        mostAhead = max(mostAhead, produced.get(0) - i)
        consumed.append(i)
      })
    #expect(consumed == Array(0..<200))
    #expect((1...3).contains(mostAhead))
    let flight = InOrderFlight<Int>(sizes: [5, 5, 20], budget: 10)
    #expect(flight.take() == 0 && flight.take() == 1)
    var written: [Int] = []
    flight.finish(1, 1)
    flight.consumeReady { j, _ in written.append(j) }
    #expect(written.isEmpty)  // 1 waits for 0
    flight.finish(0, 0)
    flight.consumeReady { j, _ in written.append(j) }
    #expect(written == [0, 1])
    #expect(flight.take() == 2)  // larger than the budget: taken once nothing is held
  }

  /// A failure stops the flight: the lowest-numbered failing item's error is thrown, whether it
  /// came from producing or consuming, and nothing after it is consumed.
  @Test func inOrderStopsAtTheFirstFailure() {
    struct Failure: Error, Equatable { let item: Int }
    var consumed: [Int] = []
    #expect(throws: Failure(item: 9)) {
      try Parallel.inOrder(
        40, workers: 3, budget: 4,
        produce: { i -> Int in
          if i == 30 { throw Failure(item: 30) }
          return i
        },
        consume: { i, _ in
          if i == 9 { throw Failure(item: 9) }
          consumed.append(i)
        })
    }
    #expect(consumed == Array(0..<9))
    #expect(throws: Failure(item: 5)) {
      try Parallel.inOrder(
        40, workers: 3, budget: 4, produce: { i -> Int in if i == 5 { throw Failure(item: 5) } else { return i } },
        consume: { _, _ in })
    }
  }
}
