import Tensor

/// How `N` models' features at one merge point (`n` each, `N n` in all) become `n` merged
/// features: `merge` (`n x N n`, row k averages the members of merged feature k) and `unmerge`
/// (`N n x n`, one 1 per row: the merged feature each original feature comes back from). Model
/// `i`'s blocks are `M_i = merge[:, i n ..< (i+1) n]` and `U_i = unmerge[i n ..< (i+1) n, :]`.
public struct FeatureMatching: Sendable, Equatable {
  public let features: Int
  public let models: Int
  /// Merged feature of each original feature (`N n` entries, values in `0..<n`).
  public let groups: [Int]

  public init(features: Int, models: Int, groups: [Int]) {
    precondition(groups.count == features * models && groups.allSatisfy { (0..<features).contains($0) })
    self.features = features
    self.models = models
    self.groups = groups
  }

  /// Members of each merged feature, as original feature indices.
  public var members: [[Int]] {
    var out = [[Int]](repeating: [], count: features)
    for (j, g) in groups.enumerated() { out[g].append(j) }
    return out
  }

  /// `M_i` (`n x n`, row-major): merged feature k gets 1/|members(k)| of each member in model i.
  public func merge(model i: Int) -> [Double] {
    let sizes = members.map(\.count)
    var m = [Double](repeating: 0, count: features * features)
    for j in 0..<features {
      let k = groups[i * features + j]
      m[k * features + j] = 1 / Double(sizes[k])
    }
    return m
  }

  /// `U_i` (`n x n`, row-major): model i's feature j comes back from its merged feature.
  public func unmerge(model i: Int) -> [Double] {
    var u = [Double](repeating: 0, count: features * features)
    for j in 0..<features { u[j * features + groups[i * features + j]] = 1 }
    return u
  }
}

/// ZipIt's correlation of concatenated features: `R = C / max(sigma sigma^T, 1e-7)` from the
/// population covariance `C` (row-major `m x m`); zero-variance features correlate 0.
public func zipCorrelation(covariance c: [Double], width m: Int) -> [Double] {
  let sigma = (0..<m).map { max(c[$0 * m + $0], 0).squareRoot() }
  return (0..<(m * m)).map { k in
    let value = c[k] / max(sigma[k / m] * sigma[k % m], 1e-7)
    return value.isNaN ? 0 : value
  }
}

/// The three matchings of ZipIt's paper. All take the correlation matrix of the models'
/// concatenated features (`N n x N n`, row-major).
public enum Matching {
  /// ZipIt's greedy zip (Stoica et al., ICLR 2024): repeatedly merge the most correlated pair
  /// of current features (ties: first in row-major order), across models or within one, until
  /// `n` remain. A merged feature's similarity to others is the minimum of its two parts'
  /// times `alpha` (0: it is never matched again); each model may make `beta` of its share of
  /// merges within itself (the share is `(N n - n) / N`; the first within-model merge is always
  /// allowed).
  ///
  /// Each feature keeps its best partner (highest similarity, lowest index on ties), so a step
  /// scans the `N n` row maxima and rescans only the rows whose best partner changed: about
  /// `O((N n)^2)` in all instead of the literal `O(n (N n)^2)`, with the same result.
  public static func zip(correlation: [Double], features n: Int, models count: Int, alpha: Double, beta: Double)
    -> FeatureMatching
  {
    let total = n * count
    precondition(correlation.count == total * total && count >= 2)
    var s = correlation
    for i in 0..<total { s[i * total + i] = -.infinity }
    var active = [Bool](repeating: true, count: total)
    var remaining = total
    var members = (0..<total).map { [$0] }
    let origin = (0..<total).map { $0 / n }  // a merged feature keeps its lower member's model
    var budget = [Int](repeating: Int(Double((total - n) / count) * beta), count: count)
    // Best partner of every active feature: (similarity, index), -1 when every pair is -inf.
    var bestValue = [Double](repeating: -.infinity, count: total)
    var bestIndex = [Int](repeating: -1, count: total)
    func rescan(_ a: Int) {
      var (value, index) = (-Double.infinity, -1)
      let row = a * total
      for b in 0..<total where active[b] && s[row + b] > value { (value, index) = (s[row + b], b) }
      (bestValue[a], bestIndex[a]) = (value, index)
    }
    for a in 0..<total { rescan(a) }
    while remaining > n {
      var (value, a) = (-Double.infinity, -1)
      for r in 0..<total where active[r] && bestValue[r] > value { (value, a) = (bestValue[r], r) }
      var b: Int
      if a < 0 {  // only -inf left (every pair blocked): merge the first two to finish
        let first = active.indices.filter { active[$0] }.prefix(2)
        (a, b) = (first[first.startIndex], first[first.startIndex + 1])
      } else {
        b = bestIndex[a]
        (a, b) = (min(a, b), max(a, b))
      }
      members[a] += members[b]
      active[b] = false
      remaining -= 1
      var stale: [Int] = [a]
      for c in 0..<total where active[c] && c != a {
        let merged = alpha > 0 ? min(s[a * total + c], s[b * total + c]) * alpha : -Double.infinity
        s[a * total + c] = merged
        s[c * total + a] = merged
        if bestIndex[c] == a || bestIndex[c] == b {
          stale.append(c)
        } else if merged > bestValue[c] || (merged == bestValue[c] && merged > -.infinity && a < bestIndex[c]) {
          (bestValue[c], bestIndex[c]) = (merged, a)
        }
      }
      if origin[a] == origin[b] {
        let model = origin[a]
        budget[model] -= 1
        if budget[model] <= 0 {
          let own = (0..<total).filter { active[$0] && origin[$0] == model }
          for x in own {
            for y in own { s[x * total + y] = -.infinity }
            if bestIndex[x] >= 0, origin[bestIndex[x]] == model { stale.append(x) }
          }
        }
      }
      for c in stale { rescan(c) }
    }
    var groups = [Int](repeating: 0, count: total)
    for (k, head) in (0..<total).filter({ active[$0] }).enumerated() { for j in members[head] { groups[j] = k } }
    return FeatureMatching(features: n, models: count, groups: groups)
  }

  /// The permutation baseline: model 0 is kept; each other model's features are matched one to
  /// one with model 0's by the Hungarian method on their correlation, and each merged feature
  /// averages one feature of every model.
  public static func permute(correlation: [Double], features n: Int, models count: Int) -> FeatureMatching {
    let total = n * count
    precondition(correlation.count == total * total && count >= 2)
    var groups = Array(0..<n)
    for i in 1..<count {
      // model 0 feature k vs model i feature j
      let score = (0..<(n * n)).map { correlation[($0 / n) * total + i * n + $0 % n] }
      let assignment = LinearAssignment.maximumScore(score, n: n)
      var group = [Int](repeating: 0, count: n)
      for k in 0..<n { group[assignment[k]] = k }
      groups += group
    }
    return FeatureMatching(features: n, models: count, groups: groups)
  }

  /// Plain weight averaging: feature k of every model is merged with feature k of the others.
  public static func identity(features n: Int, models count: Int) -> FeatureMatching {
    FeatureMatching(features: n, models: count, groups: (0..<(n * count)).map { $0 % n })
  }
}
