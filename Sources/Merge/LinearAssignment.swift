/// The linear assignment problem: a one-to-one matching of rows to columns of a square cost
/// matrix with the least total cost, by the Hungarian method with potentials (Kuhn-Munkres,
/// O(n^3)). ZipIt's `permute` baseline (as weight matching / Git Re-Basin) maximises total
/// correlation with it.
public enum LinearAssignment {
  /// `assignment[row]` is the column given to `row`; `cost` is row-major `n x n`, finite.
  public static func minimumCost(_ cost: [Double], n: Int) -> [Int] {
    precondition(
      cost.count == n * n && cost.allSatisfy(\.isFinite), "assignment needs a finite \(n) x \(n) cost matrix")
    guard n > 0 else { return [] }
    // 1-based arrays; column 0 is a virtual start. u, v: row and column potentials; owner[j]:
    // the row holding column j; way[j]: the previous column on the augmenting path.
    var u = [Double](repeating: 0, count: n + 1)
    var v = [Double](repeating: 0, count: n + 1)
    var owner = [Int](repeating: 0, count: n + 1)
    var way = [Int](repeating: 0, count: n + 1)
    for row in 1...n {
      owner[0] = row
      var column = 0
      var slack = [Double](repeating: .infinity, count: n + 1)
      var used = [Bool](repeating: false, count: n + 1)
      repeat {
        used[column] = true
        let current = owner[column]
        var delta = Double.infinity
        var next = 0
        for j in 1...n where !used[j] {
          let reduced = cost[(current - 1) * n + (j - 1)] - u[current] - v[j]
          if reduced < slack[j] {
            slack[j] = reduced
            way[j] = column
          }
          if slack[j] < delta {
            delta = slack[j]
            next = j
          }
        }
        for j in 0...n {
          if used[j] {
            u[owner[j]] += delta
            v[j] -= delta
          } else {
            slack[j] -= delta
          }
        }
        column = next
      } while owner[column] != 0
      repeat {
        let previous = way[column]
        owner[column] = owner[previous]
        column = previous
      } while column != 0
    }
    var assignment = [Int](repeating: 0, count: n)
    for j in 1...n { assignment[owner[j] - 1] = j - 1 }
    return assignment
  }

  /// The assignment with the largest total `score` (row-major `n x n`).
  public static func maximumScore(_ score: [Double], n: Int) -> [Int] { minimumCost(score.map { -$0 }, n: n) }
}
