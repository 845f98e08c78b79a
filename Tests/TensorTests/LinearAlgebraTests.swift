import Testing

@testable import Tensor

@Suite struct LinearAlgebraTests {
  @Test func matmulMatchesAFloat64Loop() {
    let a = CounterRNG(seed: 1, stream: "a").normalTensor([7, 5])
    let b = CounterRNG(seed: 1, stream: "b").normalTensor([5, 3])
    let c = BLAS.matmul(a, b)
    #expect(c.shape == [7, 3])
    for i in 0..<7 {
      for j in 0..<3 {
        var reference = 0.0
        for k in 0..<5 { reference += Double(a.scalars[i * 5 + k]) * Double(b.scalars[k * 3 + j]) }
        #expect(abs(Double(c.scalars[i * 3 + j]) - reference) < 1e-5)
      }
    }
  }

  @Test func solveRecoversAKnownSolution() throws {
    // A well-conditioned matrix: identity * 4 plus small noise.
    var a = CounterRNG(seed: 2, stream: "A").normalTensor([6, 6], scale: 0.3)
    for i in 0..<6 { a.scalars[i * 6 + i] += 4 }
    let x = CounterRNG(seed: 2, stream: "x").normalTensor([6, 2])
    let b = BLAS.matmul(a, x)
    let solved = try LAPACK.solve(a, b)
    for (s, e) in zip(solved.scalars, x.scalars) { #expect(abs(s - e) < 1e-4) }
  }

  @Test func solveReportsASingularMatrix() {
    let a = Tensor(shape: [2, 2], scalars: [1, 2, 2, 4])
    let b = Tensor(shape: [2, 1], scalars: [1, 1])
    #expect(throws: LinearAlgebraError.self) { try LAPACK.solve(a, b) }
  }
}
