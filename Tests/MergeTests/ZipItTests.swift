import Foundation
import Nets
import Tensor
import Testing

@testable import Merge

/// ZipIt's matching written literally from the spec, as the official code does it: a shrinking
/// similarity matrix with rows and columns deleted, a 0/1 membership matrix P whose columns are
/// merged, an origin list. Returns the members of each final column, as original indices.
func referenceZip(_ correlation: [Double], n: Int, models: Int, alpha: Double, beta: Double) -> [[Int]] {
  let total = n * models
  var s = (0..<total).map { i in (0..<total).map { j in i == j ? -Double.infinity : correlation[i * total + j] } }
  var p = (0..<total).map { i in (0..<total).map { $0 == i ? 1 : 0 } }  // total x columns
  var origin = (0..<total).map { $0 / n }
  var budget = [Int](repeating: Int(Double((total - n) / models) * beta), count: models)
  while p[0].count > n {
    var (best, a, b) = (-Double.infinity, 0, 1)
    for i in s.indices { for j in s.indices where s[i][j] > best { (best, a, b) = (s[i][j], i, j) } }
    if a > b { swap(&a, &b) }
    for r in p.indices { p[r][a] += p[r][b]; p[r].remove(at: b) }
    for c in s.indices where c != a && c != b {
      let merged = alpha > 0 ? min(s[c][a], s[c][b]) * alpha : -Double.infinity
      s[c][a] = merged
      s[a][c] = alpha > 0 ? min(s[a][c], s[b][c]) * alpha : -Double.infinity
    }
    s.remove(at: b)
    for r in s.indices { s[r].remove(at: b) }
    let within = origin[a] == origin[b]
    origin.remove(at: b)
    if within {
      budget[origin[a]] -= 1
      if budget[origin[a]] <= 0 {
        for i in s.indices where origin[i] == origin[a] {
          for j in s.indices where origin[j] == origin[a] { s[i][j] = -.infinity }
        }
      }
    }
  }
  return (0..<n).map { c in (0..<total).filter { p[$0][c] == 1 } }
}

/// A random symmetric correlation-like matrix with unit diagonal.
func randomCorrelation(_ m: Int, _ stream: String) -> [Double] {
  let rng = CounterRNG(seed: 9, stream: stream)
  var r = [Double](repeating: 1, count: m * m)
  for i in 0..<m {
    for j in (i + 1)..<m { r[i * m + j] = Double(2 * rng.uniform(UInt64(i * m + j)) - 1); r[j * m + i] = r[i * m + j] }
  }
  return r
}

/// An MLP whose hidden units are permuted (rows of each hidden layer, columns of the next).
func permutedCopy(_ network: Network<Float>, seed: UInt64) -> Network<Float> {
  guard case .mlp(let c) = network.config else { return network }
  var copy = network
  var previous: [Int]?
  for i in 0..<c.layerCount {
    let w = network.weights["layers.\(i).weight"]!
    let b = network.weights["layers.\(i).bias"]!
    let rng = CounterRNG(seed: seed, stream: "perm\(i)")
    let order =
      i < c.layerCount - 1
      ? Array(0..<w.rows).sorted { rng.bits(UInt64($0)) < rng.bits(UInt64($1)) } : Array(0..<w.rows)
    var nw = w
    var nb = b
    for (r, source) in order.enumerated() {
      for col in 0..<w.columns { nw[r, col] = w[source, previous.map { $0[col] } ?? col] }
      nb.values[r] = b.values[source]
    }
    copy.weights["layers.\(i).weight"] = nw
    copy.weights["layers.\(i).bias"] = nb
    // Input column `col` of the next layer reads old unit order[col].
    previous = order
  }
  return copy
}

/// Each row of a row-major `values` repeated `copies` times side by side.
func sideBySide(_ values: [Float], rows: Int, copies: Int) -> [Float] {
  let width = values.count / rows
  var out: [Float] = []
  for r in 0..<rows {
    let row = values[(r * width)..<((r + 1) * width)]
    for _ in 0..<copies { out += row }
  }
  return out
}

/// The network with `classes` recorded as its trained classes.
func recording(_ network: Network<Float>, _ classes: [Int]) throws -> Network<Float> {
  guard case .mlp(var c) = network.config else { return network }
  c.trainedClasses = classes
  return try Network(
    config: .mlp(c), tensors: Dictionary(uniqueKeysWithValues: network.tensors.map { ($0.name, $0.tensor) }))
}

func outputs(_ network: Network<Float>, _ x: Matrix<Float>) throws -> [Float] {
  let tape = Tape<Float>()
  return tape.value(try network.forward(tape, .features(x)).output).values
}

@Suite struct ZipItTests {
  @Test func hungarianAssignmentIsOptimal() {
    for trial in 0..<5 {
      let n = 6
      let rng = CounterRNG(seed: UInt64(trial), stream: "cost")
      let cost = (0..<(n * n)).map { Double(rng.uniform(UInt64($0))) }
      let found = LinearAssignment.minimumCost(cost, n: n)
      #expect(Set(found).count == n)
      var best = Double.infinity
      func search(_ row: Int, _ used: Set<Int>, _ total: Double) {
        if row == n { best = min(best, total); return }
        for j in 0..<n where !used.contains(j) { search(row + 1, used.union([j]), total + cost[row * n + j]) }
      }
      search(0, [], 0)
      #expect(abs(found.enumerated().reduce(0) { $0 + cost[$1.0 * n + $1.1] } - best) < 1e-12)
    }
  }

  /// Ties (a correlation rounded to a few levels), alpha above 1 (merged similarities grow) and
  /// fully blocked finishes: the cached best partners pick what the literal scan picks.
  @Test(arguments: [(0.3, 0.125, 2), (2.0, 0.5, 2), (0.0, 0.0, 2), (1.0, 0.25, 3), (0.3, 1.0, 4)])
  func zipBreaksTiesAsTheLiteralImplementation(_ config: (Double, Double, Int)) {
    let (alpha, beta, models) = config
    let n = 10
    let r = randomCorrelation(n * models, "ties\(alpha)\(beta)\(models)").map { ($0 * 3).rounded() / 3 }
    let matching = Matching.zip(correlation: r, features: n, models: models, alpha: alpha, beta: beta)
    #expect(matching.members.map { $0.sorted() } == referenceZip(r, n: n, models: models, alpha: alpha, beta: beta))
  }

  @Test(arguments: [(0.3, 0.125, 2), (0.0, 1.0, 2), (1.0, 0.0, 2), (0.5, 0.25, 3), (0.3, 1.0, 3)])
  func zipMatchesTheLiteralImplementation(_ config: (Double, Double, Int)) {
    let (alpha, beta, models) = config
    let n = 12
    let r = randomCorrelation(n * models, "zip\(alpha)\(beta)\(models)")
    let matching = Matching.zip(correlation: r, features: n, models: models, alpha: alpha, beta: beta)
    #expect(matching.members.map { $0.sorted() } == referenceZip(r, n: n, models: models, alpha: alpha, beta: beta))
    for m in 0..<models {
      let unmerge = matching.unmerge(model: m)
      #expect((0..<n).allSatisfy { j in (0..<n).reduce(0.0) { $0 + unmerge[j * n + $1] } == 1 })  // U rows one-hot
    }
    // M rows over all models sum to 1 (a mean of the members).
    let rowSums = (0..<n).map { k in
      (0..<models).reduce(0.0) { total, m in total + (0..<n).reduce(0.0) { $0 + matching.merge(model: m)[k * n + $1] } }
    }
    #expect(rowSums.allSatisfy { abs($0 - 1) < 1e-12 })
  }

  @Test func budgetsAndAlphaZeroFollowTheRules() {
    let n = 16
    let r = randomCorrelation(2 * n, "budget")
    let strict = Matching.zip(correlation: r, features: n, models: 2, alpha: 0.3, beta: 0)
    for model in 0..<2 {
      // Within-model merges: groups with two members of the same model.
      let within = strict.members.filter { g in g.count == 2 && g.allSatisfy { $0 / n == model } }.count
      #expect(within <= 1)
    }
    let pairs = Matching.zip(correlation: r, features: n, models: 2, alpha: 0, beta: 1)
    #expect(pairs.members.allSatisfy { $0.count == 2 })
    let permutation = Matching.permute(correlation: r, features: n, models: 2)
    #expect(permutation.members.allSatisfy { g in g.count == 2 && g[0] < n && g[1] >= n })
  }

  @Test(arguments: [ZipIt.Method.zipit, .permute])
  func zippingAModelWithAPermutedCopyRecoversIt(_ method: ZipIt.Method) throws {
    let a = Network<Float>.initializedMLP(MLPConfig(layerSizes: [8, 24, 20, 5], activation: .gelu), seed: 3)
    let b = permutedCopy(a, seed: 4)
    let x = Matrix(rows: 300, columns: 8, values: CounterRNG(seed: 5, stream: "x").normalTensor([2400]).scalars)
    #expect(try outputs(b, x).elementsEqual(try outputs(a, x)) { abs($0 - $1) < 1e-5 })
    var options = ZipIt.Options()
    (options.method, options.labels) = (method, .shared)
    let zipped = try ZipIt.zip([a, b], inputs: x, options: options)
    let (got, want) = (try outputs(zipped, x), try outputs(a, x))
    #expect(zip(got, want).allSatisfy { abs($0 - $1) < 1e-5 })
    // Stacked labels: both models' classes side by side, each the model's own logits.
    options.labels = .stacked
    let stacked = try outputs(try ZipIt.zip([a, b], inputs: x, options: options), x)
    let twice = sideBySide(want, rows: x.rows, copies: 2)
    #expect(stacked.count == twice.count && zip(stacked, twice).allSatisfy { abs($0 - $1) < 1e-5 })
    options.labels = .shared
    // Averaging same-index units of the two (different orders) does not recover it.
    options.method = .average
    #expect(
      try !zip(outputs(try ZipIt.zip([a, b], inputs: x, options: options), x), want).allSatisfy { abs($0 - $1) < 1e-3 })
  }

  @Test func averagingIdenticalModelsAndPartialZipsReproduceTheModel() throws {
    let a = Network<Float>.initializedMLP(
      MLPConfig(layerSizes: [6, 10, 10, 10, 4], activation: .tanh, layerNorm: true), seed: 8)
    let x = Matrix(rows: 100, columns: 6, values: CounterRNG(seed: 6, stream: "x").normalTensor([600]).scalars)
    var options = ZipIt.Options()
    (options.method, options.labels) = (.average, .shared)
    #expect(
      zip(try outputs(try ZipIt.zip([a, a], inputs: x, options: options), x), try outputs(a, x)).allSatisfy {
        abs($0 - $1) < 1e-5
      })
    // Partial: one shared layer, two heads of the same model; the best-head score is then log softmax.
    options.stop = 1
    let partial = try ZipIt.zip([a, a], inputs: x, options: options)
    guard case .mlp(let c) = partial.config else { Issue.record("not an MLP"); return }
    #expect(c.heads == 2 && c.sharedLayers == 1)
    let logits = Matrix(rows: 100, columns: 4, values: try outputs(a, x))
    let expected = softmax(logits).values.map { log($0) }
    #expect(zip(try outputs(partial, x), expected).allSatisfy { abs($0 - $1) < 1e-5 })
    // Stacked heads: each head's log-softmax side by side.
    options.labels = .stacked
    let stackedHeads = try ZipIt.zip([a, a], inputs: x, options: options)
    guard case .mlp(let s) = stackedHeads.config else { Issue.record("not an MLP"); return }
    #expect(s.stackedHeads && s.outputWidth == 8)
    let twice = sideBySide(expected, rows: 100, copies: 2)
    #expect(zip(try outputs(stackedHeads, x), twice).allSatisfy { abs($0 - $1) < 1e-5 })
  }

  /// Units that never fire on the data correlate 0 with everything; they are matched by their
  /// weights, so a model with dead units zipped with a permuted copy of itself comes back, also
  /// on inputs where those units fire.
  @Test(arguments: [ZipIt.Method.zipit, .permute])
  func deadUnitsAreMatchedByTheirWeights(_ method: ZipIt.Method) throws {
    var a = Network<Float>.initializedMLP(MLPConfig(layerSizes: [8, 24, 20, 5]), seed: 3)
    for (layer, units) in [(0, [1, 5, 6, 7, 12, 20]), (1, [0, 3, 4, 9, 19])] {
      for unit in units { a.weights["layers.\(layer).bias"]?.values[unit] = -6 }  // silent on x
    }
    let b = permutedCopy(a, seed: 4)
    let x = Matrix(rows: 300, columns: 8, values: CounterRNG(seed: 5, stream: "x").normalTensor([2400]).scalars)
    let wide = Matrix(
      rows: 300, columns: 8, values: CounterRNG(seed: 6, stream: "x").normalTensor([2400]).scalars.map { $0 * 8 })
    let stats = try ZipIt.statistics([a, b], inputs: x)
    let dead = (0..<48).filter { stats[0].covariance[$0 * 48 + $0] == 0 }.count
    #expect(dead == 12, "both models' silent first-layer units")
    var options = ZipIt.Options()
    (options.method, options.labels) = (method, .shared)
    let want = try outputs(a, wide)
    let zipped = try ZipIt.apply(
      [a, b], matchings: try ZipIt.matchings(stats, networks: [a, b], options: options), labels: .shared)
    #expect((zip(try outputs(zipped, wide), want).map { abs($0 - $1) }.max() ?? .infinity) < 1e-5)
    // Matched on the data alone, the dead units pair arbitrarily and the model is not recovered.
    let blind = try ZipIt.apply(
      [a, b], matchings: try ZipIt.matchings(stats, models: 2, options: options), labels: .shared)
    #expect((zip(try outputs(blind, wide), want).map { abs($0 - $1) }.max() ?? 0) > 1e-3)
  }

  /// Models trained on some classes of one label space: each class's output row comes from the
  /// models trained on it, so what a model never learnt does not dilute the others.
  @Test func classesComeFromTheModelsTrainedOnThem() throws {
    let a = Network<Float>.initializedMLP(MLPConfig(layerSizes: [8, 24, 20, 5]), seed: 3)
    var b = permutedCopy(a, seed: 4)
    for row in 0..<2 { for column in 0..<20 { b.weights["layers.2.weight"]?[row, column] = 7 } }  // untrained rows
    let x = Matrix(rows: 300, columns: 8, values: CounterRNG(seed: 5, stream: "x").normalTensor([2400]).scalars)
    var options = ZipIt.Options()
    options.labels = .trainedClasses([[0, 1], [2, 3, 4]])
    let zipped = try ZipIt.zip([a, b], inputs: x, options: options)
    let want = try outputs(a, x)
    #expect(zip(try outputs(zipped, x), want).allSatisfy { abs($0 - $1) < 1e-5 })
    guard case .mlp(let c) = zipped.config else { Issue.record("not an MLP"); return }
    #expect(c.trainedClasses == [0, 1, 2, 3, 4])
    options.labels = .shared
    #expect(
      try !zip(outputs(try ZipIt.zip([a, b], inputs: x, options: options), x), want).allSatisfy { abs($0 - $1) < 1e-3 })
    // What the configs record decides: classes written by training, else stacked.
    #expect(ZipIt.inferredLabelSpace([a, b]) == .stacked)
    let (ta, tb) = (try recording(a, [0, 1]), try recording(b, [2, 3, 4]))
    #expect(ZipIt.inferredLabelSpace([ta, tb]) == .trainedClasses([[0, 1], [2, 3, 4]]))
  }

  @Test func badInputsAreRefused() throws {
    let a = Network<Float>.initializedMLP(MLPConfig(layerSizes: [4, 8, 3]), seed: 1)
    let wide = Network<Float>.initializedMLP(MLPConfig(layerSizes: [4, 9, 3]), seed: 1)
    let x = Matrix<Float>(zeros: 10, 4)
    #expect(throws: MergeError.differentArchitectures(model: 1, detail: "layer sizes [4, 9, 3] against [4, 8, 3]")) {
      try ZipIt.zip([a, wide], inputs: x)
    }
    // Classifiers of different label sets: the message says why and what to do.
    let fewer = Network<Float>.initializedMLP(MLPConfig(layerSizes: [4, 8, 2]), seed: 1)
    do {
      _ = try ZipIt.zip([a, fewer], inputs: x)
      Issue.record("zipped models with 3 and 2 classes")
    } catch let error as MergeError {
      #expect(
        "\(error)".contains("2 classes where the first has 3") && "\(error)".contains("train --tasks keeps"))
    }
    #expect(throws: MergeError.tooFewModels) { try ZipIt.zip([a], inputs: x) }
    var options = ZipIt.Options()
    options.stop = 2
    #expect(throws: MergeError.stopLayerOutOfRange(stop: 2, points: 1)) {
      try ZipIt.zip([a, a], inputs: x, options: options)
    }
    #expect(throws: NetsError.self) { try ZipIt.zip([a, a], inputs: Matrix<Float>(zeros: 10, 5)) }
  }
}
