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
}
