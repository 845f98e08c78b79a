import Foundation
import Nets
import Tensor

/// MatryoshkaKV (Lin et al., ICLR 2025): orthogonal projections of the attention keys (after
/// rotary) and values per layer and KV head, from PCA of their activations, so that keeping the
/// first r columns of each basis shrinks the KV cache to r / d; ranks per head are chosen under
/// a budget by a greedy search, and the bases can be trained (`MatryoshkaKV+Training.swift`).
public enum MatryoshkaKV {
  /// One head's basis (`d x d`, orthonormal columns by decreasing variance), mean, and the
  /// variance along each column (the covariance's eigenvalues, descending).
  public struct HeadBasis: Sendable, Equatable {
    public var basis: Matrix<Float>
    public var mean: Matrix<Float>
    public var variances: [Double]
  }

  /// `keys[layer][kvHead]` and `values[layer][kvHead]`.
  public struct Bases: Sendable, Equatable {
    public var keys: [[HeadBasis]]
    public var values: [[HeadBasis]]
    /// True when they come from the weights alone (no data).
    public var dataFree: Bool

    public func heads(_ kind: KVProjection.Kind) -> [[HeadBasis]] { kind == .keys ? keys : values }
  }

  static func decoder(_ network: Network<Float>) throws -> DecoderConfig {
    guard case .decoder(let c) = network.config else {
      throw AdaptError.unsupportedModel(
        method: "MatryoshkaKV",
        reason: "it projects the keys and values of decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 2)")
    }
    guard c.tails == 1 else {
      throw AdaptError.unsupportedModel(
        method: "MatryoshkaKV",
        reason: "it is a partially zipped decoder (\(c.tails) tails); project a plain decoder's keys and values")
    }
    return c
  }

  /// Float64 statistics of every layer's keys (after rotary) and values over the non-padding
  /// tokens of `sequences`, all KV heads side by side (`kvHeads * d` wide).
  public static func statistics(
    _ network: Network<Float>, sequences: [[Int]], batchSize: Int = 8, progress: ((Int, Int) -> Void)? = nil
  ) throws -> (keys: [FeatureStatistics], values: [FeatureStatistics]) {
    let c = try decoder(network)
    guard !sequences.isEmpty, sequences.allSatisfy({ !$0.isEmpty }) else {
      throw AdaptError.missingData(
        method: "MatryoshkaKV", needed: "non-empty token sequences to gather statistics from")
    }
    let width = c.keyValueHeadCount * c.headDimension
    var keys = Array(repeating: FeatureStatistics(width: width), count: c.layerCount)
    var values = keys
    var plain = network
    plain.kvProjection = nil
    let starts = Array(stride(from: 0, to: sequences.count, by: batchSize))
    for (n, start) in starts.enumerated() {
      let batch = TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)]))
      let rows = batch.mask.indices.filter { batch.mask[$0] }
      let tape = Tape<Float>()
      let points = try plain.forward(tape, .tokens(batch)).points
      let byName = Dictionary(points.map { ($0.name, $0.value) }) { a, _ in a }
      for layer in 0..<c.layerCount {
        for (kind, name) in [(0, "keys"), (1, "values")] {
          let kept = tape.value(try byName.required("model.layers.\(layer).self_attn.\(name)")).rows(rows)
          if kind == 0 { keys[layer].add(kept) } else { values[layer].add(kept) }
        }
      }
      progress?(n + 1, starts.count)
    }
    return (keys, values)
  }

  /// PCA of one head's block of the statistics: eigenvectors of the covariance by decreasing
  /// eigenvalue (float64 `dsyevd`), and the mean.
  public static func pca(_ statistics: FeatureStatistics, head: Int, dimension d: Int) throws -> HeadBasis {
    let full = statistics.covariance
    let width = statistics.width
    var block = DoubleMatrix(zeros: d, d)
    for i in 0..<d { for j in 0..<d { block.values[i * d + j] = full[(head * d + i) * width + head * d + j] } }
    let mean = Array(statistics.mean[(head * d)..<((head + 1) * d)])
    return try basis(covariance: block, mean: mean)
  }

  /// Eigenvectors of a covariance as columns, by decreasing eigenvalue.
  static func basis(covariance: DoubleMatrix, mean: [Double]) throws -> HeadBasis {
    let d = covariance.rows
    let (ascending, vectors) = try LAPACK.symmetricEigen(covariance)
    var basis = Matrix<Float>(zeros: d, d)
    for i in 0..<d { for j in 0..<d { basis.values[i * d + j] = Float(vectors.values[i * d + (d - 1 - j)]) } }
    return HeadBasis(
      basis: basis, mean: Matrix(rows: 1, columns: d, values: mean.map(Float.init)),
      variances: ascending.reversed().map { max($0, 0) })
  }

  /// PCA bases of every layer and KV head from gathered statistics.
  public static func pcaBases(
    _ network: Network<Float>, statistics: (keys: [FeatureStatistics], values: [FeatureStatistics])
  ) throws -> Bases {
    let c = try decoder(network)
    func heads(_ stats: [FeatureStatistics]) throws -> [[HeadBasis]] {
      try stats.map { s in try (0..<c.keyValueHeadCount).map { try pca(s, head: $0, dimension: c.headDimension) } }
    }
    return Bases(keys: try heads(statistics.keys), values: try heads(statistics.values), dataFree: false)
  }

  /// Bases from the weights alone (no data): for an input of identity covariance, head h's
  /// keys and values have covariance `W_h W_h^T` (`W_h` its rows of k_proj or v_proj; rotary
  /// is ignored) and mean the projection's bias. A fallback, weaker than PCA on real activations.
  public static func dataFreeBases(_ network: Network<Float>) throws -> Bases {
    let c = try decoder(network)
    let d = c.headDimension
    func heads(_ projection: String, layer: Int) throws -> [HeadBasis] {
      let w = try network.weights.required("model.layers.\(layer).self_attn.\(projection).weight")
      let bias = network.weights["model.layers.\(layer).self_attn.\(projection).bias"]
      return try (0..<c.keyValueHeadCount).map { h in
        var block = DoubleMatrix(zeros: d, w.columns)
        for i in 0..<d { for j in 0..<w.columns { block.values[i * w.columns + j] = Double(w[h * d + i, j]) } }
        let mean = (0..<d).map { i in bias.map { Double($0.values[h * d + i]) } ?? 0 }
        return try basis(
          covariance: BLAS.gram(DoubleMatrix(rows: w.columns, columns: d, values: transpose(block).values)), mean: mean)
      }
    }
    return Bases(
      keys: try (0..<c.layerCount).map { try heads("k_proj", layer: $0) },
      values: try (0..<c.layerCount).map { try heads("v_proj", layer: $0) },
      dataFree: true)
  }

  static func transpose(_ m: DoubleMatrix) -> DoubleMatrix {
    var t = DoubleMatrix(zeros: m.columns, m.rows)
    for i in 0..<m.rows { for j in 0..<m.columns { t.values[j * m.rows + i] = m.values[i * m.columns + j] } }
    return t
  }

  /// The network with these bases and ranks (its weights untouched).
  public static func apply(_ network: Network<Float>, bases: Bases, ranks: KVProjection) throws -> Network<Float> {
    let c = try decoder(network)
    try ranks.check(c)
    var tensors = Dictionary(uniqueKeysWithValues: network.tensors.map { ($0.name, $0.tensor) })
    for kind in KVProjection.Kind.allCases {
      for (layer, heads) in bases.heads(kind).enumerated() {
        for (h, b) in heads.enumerated() {
          tensors[KVProjection.basisName(layer: layer, kind, head: h)] = b.basis.tensor()
          tensors[KVProjection.meanName(layer: layer, kind, head: h)] = b.mean.tensor(shape: [c.headDimension])
        }
      }
    }
    return try Network(config: network.config, tensors: tensors, lowRank: network.lowRank, kvProjection: ranks)
  }

  /// The bases a projected network holds.
  public static func bases(of network: Network<Float>, dataFree: Bool = false) throws -> Bases {
    let c = try decoder(network)
    func heads(_ kind: KVProjection.Kind) throws -> [[HeadBasis]] {
      try (0..<c.layerCount).map { layer in
        try (0..<c.keyValueHeadCount).map { h in
          HeadBasis(
            basis: try network.weights.required(KVProjection.basisName(layer: layer, kind, head: h)),
            mean: try network.weights.required(KVProjection.meanName(layer: layer, kind, head: h)), variances: [])
        }
      }
    }
    guard network.kvProjection != nil else {
      throw AdaptError.nothingToDo(method: "MatryoshkaKV", reason: "the model has no K/V projections")
    }
    return Bases(keys: try heads(.keys), values: try heads(.values), dataFree: dataFree)
  }

  /// Every head at the same rank: the multiple of `step` nearest `budget * d` (at least `step`).
  public static func uniformRanks(_ c: DecoderConfig, budget: Double, step: Int) -> KVProjection {
    let r = min(c.headDimension, max(step, Int((budget * Double(c.headDimension) / Double(step)).rounded()) * step))
    return KVProjection(layers: c.layerCount, heads: c.keyValueHeadCount, rank: r)
  }

  /// Checks a budget and rank step against the head dimension.
  public static func checkBudget(_ c: DecoderConfig, budget: Double, step: Int) throws {
    guard budget > 0 && budget <= 1 else {
      throw AdaptError.invalidOption(
        name: "budget", value: "\(budget)", reason: "the kept fraction of K/V dimensions is in (0, 1]")
    }
    guard step >= 1, c.headDimension % step == 0 else {
      throw AdaptError.invalidOption(
        name: "step", value: "\(step)", reason: "the rank step must divide the head dimension \(c.headDimension)")
    }
    guard budget * Double(c.headDimension) >= Double(step) - 1e-9 else {
      throw AdaptError.invalidOption(
        name: "budget", value: "\(budget)",
        reason: "keeps fewer than \(step) of \(c.headDimension) dimensions per head; lower the rank step (step)")
    }
  }

  /// `|a - b|_F / |b|_F` of the final hidden states (the last block's output) over `sequences`.
  public static func outputError(
    _ network: Network<Float>, reference: Network<Float>, sequences: [[Int]], batchSize: Int = 8
  ) throws -> Double {
    try outputError(
      network, reference: try finalHidden(reference, sequences: sequences, batchSize: batchSize), sequences: sequences,
      batchSize: batchSize)
  }

  /// The final hidden states of every batch of `sequences`.
  static func finalHidden(_ network: Network<Float>, sequences: [[Int]], batchSize: Int) throws -> [Matrix<Float>] {
    let layer = "model.layers.\(try decoder(network).layerCount - 1).output"
    return try stride(from: 0, to: sequences.count, by: batchSize).map { start in
      try finalHidden(network, TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)])), layer)
    }
  }

  static func outputError(_ network: Network<Float>, reference: [Matrix<Float>], sequences: [[Int]], batchSize: Int)
    throws -> Double
  {
    let layer = "model.layers.\(try decoder(network).layerCount - 1).output"
    var (difference, norm) = (0.0, 0.0)
    for (n, start) in stride(from: 0, to: sequences.count, by: batchSize).enumerated() {
      let batch = TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)]))
      let sums = Training.squaredDifference(try finalHidden(network, batch, layer), reference[n], rows: batch.mask)
      (difference, norm) = (difference + sums.difference, norm + sums.norm)
    }
    return (difference / max(norm, 1e-300)).squareRoot()
  }

  static func finalHidden(_ network: Network<Float>, _ batch: TokenBatch, _ point: String) throws -> Matrix<Float> {
    let tape = Tape<Float>()
    let out = try network.forward(tape, .tokens(batch))
    return tape.value(try out.point(point))
  }

  /// Mean per-token `KL(teacher || student)` of the next-token distributions over `sequences`.
  public static func logitKL(_ student: Network<Float>, teacher: Network<Float>, sequences: [[Int]], batchSize: Int = 8)
    throws -> Double
  {
    var (total, tokens) = (0.0, 0)
    for start in stride(from: 0, to: sequences.count, by: batchSize) {
      let batch = TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)]))
      let (ts, ss) = (Tape<Float>(), Tape<Float>())
      let t = softmax(ts.value(try teacher.forward(ts, .tokens(batch)).output))
      let s = softmax(ss.value(try student.forward(ss, .tokens(batch)).output))
      for r in batch.mask.indices where batch.mask[r] {
        for c in 0..<t.columns where t[r, c] > 0 {
          total += Double(t[r, c]) * (log(Double(t[r, c])) - log(max(Double(s[r, c]), 1e-30)))
        }
        tokens += 1
      }
    }
    return total / Double(max(tokens, 1))
  }

  /// Where the rank search stands, for progress: evaluations done and an estimate of all of
  /// them (rounds left at the current pace), the round, and the kept fraction.
  public struct SearchProgress: Sendable {
    public let evaluations: Int
    public let estimatedEvaluations: Int
    public let round: Int
    public let keptFraction: Double
  }

  /// The greedy rank search: from full ranks, each round lowers by `step` the heads (keys and
  /// values separately) whose lowering alone changes the final hidden states least (relative to
  /// the current ranks' output), at most `perRound` of them, until the average kept fraction is
  /// at most `budget`. `network` must carry the bases (at any ranks).
  ///
  /// Each round runs the model once at the current ranks and keeps the residual stream entering
  /// every layer; a candidate in layer l then runs only layers l... from there (what comes
  /// before is unchanged), without the final norm and head, and the candidates run in parallel.
  /// Same ranks as running the whole model per candidate, at about `(L + 1) / 2L` of its cost.
  public static func searchRanks(
    _ network: Network<Float>, sequences: [[Int]], budget: Double, step: Int, perRound: Int? = nil,
    batchSize: Int = 8, progress: ((SearchProgress) -> Void)? = nil
  ) throws -> KVProjection {
    let c = try decoder(network)
    try checkBudget(c, budget: budget, step: step)
    var current = network
    var ranks = KVProjection(layers: c.layerCount, heads: c.keyValueHeadCount, rank: c.headDimension)
    let candidates = KVProjection.Kind.allCases.flatMap { kind in
      (0..<c.layerCount).flatMap { l in (0..<c.keyValueHeadCount).map { (kind, l, $0) } }
    }
    let limit = perRound ?? max(1, candidates.count * 3 / 4)
    let batches = stride(from: 0, to: sequences.count, by: batchSize).map {
      TokenBatch(Array(sequences[$0..<min(sequences.count, $0 + batchSize)]))
    }
    let dimensions = Double(candidates.count * c.headDimension)
    var (round, evaluations) = (0, 0)
    while ranks.keptFraction(dimension: c.headDimension) > budget + 1e-12 {
      round += 1
      current.kvProjection = ranks
      // The residual stream entering each layer, and after the last, per batch.
      let streams = try batches.map { batch -> [Matrix<Float>] in
        let tape = Tape<Float>()
        let out = try current.forward(tape, .tokens(batch))
        return try (["model.embed_tokens.output"] + (0..<c.layerCount).map { "model.layers.\($0).output" }).map {
          tape.value(try out.point($0))
        }
      }
      let open = candidates.filter { ranks.ranks($0.0)[$0.1][$0.2] > step }
      guard !open.isEmpty else { break }
      let kept = ranks.keptFraction(dimension: c.headDimension)
      let lowerings = Int(((kept - budget) * dimensions / Double(step)).rounded(.up))
      let estimate = evaluations + open.count * max(1, (lowerings + limit - 1) / limit)
      let errors = ResultSlots<Double>(count: open.count)
      let finished = ResultSlots<Int>(count: 1)
      finished.set(0, 0)
      try BLAS.singleThreaded {
        try Parallel.forEach(open.count) { _, index in
          let (kind, layer, head) = open[index]
          var trial = current
          var lowered = ranks
          lowered.setRank(kind, layer: layer, head: head, ranks.ranks(kind)[layer][head] - step)
          trial.kvProjection = lowered
          var (difference, norm) = (0.0, 0.0)
          for (b, batch) in batches.enumerated() {
            let tape = Tape<Float>()
            let output = tape.value(
              try trial.forward(tape, .residual(batch, layer: layer, hidden: streams[b][layer])).output)
            let sums = Training.squaredDifference(output, streams[b][c.layerCount], rows: batch.mask)
            (difference, norm) = (difference + sums.difference, norm + sums.norm)
          }
          errors.set(index, (difference / max(norm, 1e-300)).squareRoot())
          let done = finished.update(0) { $0 + 1 }
          progress?(
            SearchProgress(
              evaluations: evaluations + done, estimatedEvaluations: estimate, round: round, keptFraction: kept))
        }
      }
      evaluations += open.count
      var scored = open.indices.map { (error: errors.get($0), kind: open[$0].0, layer: open[$0].1, head: open[$0].2) }
      scored.sort {
        ($0.error, $0.layer, $0.head, $0.kind == .keys ? 0 : 1) < (
          $1.error, $1.layer, $1.head, $1.kind == .keys ? 0 : 1
        )
      }
      for s in scored.prefix(limit) {
        ranks.setRank(s.kind, layer: s.layer, head: s.head, ranks.ranks(s.kind)[s.layer][s.head] - step)
        if ranks.keptFraction(dimension: c.headDimension) <= budget + 1e-12 { break }
      }
    }
    progress?(
      SearchProgress(
        evaluations: evaluations, estimatedEvaluations: evaluations, round: round,
        keptFraction: ranks.keptFraction(dimension: c.headDimension)))
    return ranks
  }
}
