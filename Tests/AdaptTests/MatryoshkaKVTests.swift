import Foundation
import Nets
import Tensor
import Testing

@testable import Adapt

/// A small Llama-style decoder with grouped-query attention (4 heads of 16, 2 KV heads) and
/// random weights, and token sequences with structure (each continues a noisy pattern).
func smallDecoder(seed: UInt64 = 1) throws -> Network<Float> {
  let json = """
    {"architectures": ["LlamaForCausalLM"], "vocab_size": 48, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}
    """
  let config = try NetworkConfig(json: Data(json.utf8))
  var tensors = randomWeights(config, seed: seed)
  // Keys and values with decaying spectra in a random basis per head, as trained models have:
  // W_h <- O_h diag(0.75^i) W_h.
  for layer in 0..<2 {
    for projection in ["k_proj", "v_proj"] {
      let name = "model.layers.\(layer).self_attn.\(projection).weight"
      var w = tensors[name]!
      for h in 0..<2 {
        let o = LAPACK.qr(CounterRNG(seed: seed, stream: "\(name).\(h)").normalTensor([16, 16])).q
        var block = Tensor(shape: [16, 64], scalars: Array(w.scalars[(h * 16 * 64)..<((h + 1) * 16 * 64)]))
        for i in 0..<16 { for j in 0..<64 { block.scalars[i * 64 + j] *= Float(pow(0.75, Double(i))) * 2 } }
        let rotated = BLAS.matmul(o, block)
        for e in 0..<(16 * 64) { w.scalars[h * 16 * 64 + e] = rotated.scalars[e] }
      }
      tensors[name] = w
    }
  }
  return try Network<Float>(config: config, tensors: tensors)
}

func tokenSequences(_ count: Int, length: Int, seed: UInt64) -> [[Int]] {
  let rng = CounterRNG(seed: seed, stream: "tokens")
  return (0..<count).map { s in
    let start = Int(rng.bits(UInt64(s * 1000)) % 48)
    let stride = 1 + Int(rng.bits(UInt64(s * 1000 + 1)) % 5)
    return (0..<length).map { i in
      rng.uniform(UInt64(s * 1000 + 2 + i)) < 0.2
        ? Int(rng.bits(UInt64(s * 1000 + 500 + i)) % 48) : (start + i * stride) % 48
    }
  }
}

/// A random orthogonal `d x d` matrix and a random mean for every head.
func randomBases(_ c: DecoderConfig, seed: UInt64) -> MatryoshkaKV.Bases {
  func head(_ stream: String) -> MatryoshkaKV.HeadBasis {
    let rng = CounterRNG(seed: seed, stream: stream)
    let q = LAPACK.qr(rng.normalTensor([c.headDimension, c.headDimension])).q
    return MatryoshkaKV.HeadBasis(
      basis: Matrix(q),
      mean: Matrix(
        rows: 1, columns: c.headDimension, values: (0..<c.headDimension).map { rng.normal(UInt64(1 << 20 + $0)) }),
      variances: [])
  }
  let heads = { (kind: String) in
    (0..<c.layerCount).map { l in (0..<c.keyValueHeadCount).map { head("\(kind)\(l).\($0)") } }
  }
  return MatryoshkaKV.Bases(keys: heads("k"), values: heads("v"), dataFree: false)
}

@Suite struct MatryoshkaKVTests {
  @Test func cayleyIsOrthogonal() {
    let tape = Tape<Float>()
    let rng = CounterRNG(seed: 3, stream: "x")
    let x = Matrix<Float>(rows: 16, columns: 16, values: (0..<256).map { rng.normal(UInt64($0)) })
    let u = tape.value(tape.cayley(tape.constant(x)))
    let product = u.matmul(u, transposeSelf: true)
    for i in 0..<16 { for j in 0..<16 { #expect(abs(product[i, j] - (i == j ? 1 : 0)) < 1e-5) } }
    #expect(
      tape.value(tape.cayley(tape.constant(Matrix(zeros: 4, 4)))).values
        == Matrix<Float>(rows: 4, columns: 4, values: (0..<16).map { $0 % 5 == 0 ? 1 : 0 }).values)
  }

  /// At full rank, any orthogonal bases and any means leave the model's outputs unchanged.
  @Test func fullRankProjectionsChangeNothing() throws {
    let network = try smallDecoder()
    guard case .decoder(let c) = network.config else { return }
    let projected = try MatryoshkaKV.apply(
      network, bases: randomBases(c, seed: 5), ranks: KVProjection(layers: 2, heads: 2, rank: 16))
    let batch = NetworkInput<Float>.tokens(TokenBatch([[3, 17, 42, 8, 0, 11], [5, 9, 33]]))
    #expect(maxRelativeDifference(try outputs(projected, batch), try outputs(network, batch)) < 1e-5)
    // Below full rank they do change.
    var lowered = projected
    lowered.kvProjection = KVProjection(layers: 2, heads: 2, rank: 8)
    #expect(maxRelativeDifference(try outputs(lowered, batch), try outputs(network, batch)) > 1e-3)
  }

  /// PCA bases are orthonormal, and their first r columns capture the r largest eigenvalues of a
  /// float64 eigendecomposition of the keys' covariance computed directly from the activations.
  @Test func pcaCapturesTheLargestEigenvalues() throws {
    let network = try smallDecoder()
    let sequences = tokenSequences(12, length: 10, seed: 1)
    let stats = try MatryoshkaKV.statistics(network, sequences: sequences, batchSize: 5)
    let bases = try MatryoshkaKV.pcaBases(network, statistics: stats)
    // Independent covariance of layer 1's keys, head 1, from the activations.
    var rows: [[Double]] = []
    for s in sequences {
      let tape = Tape<Float>()
      let keys = tape.value(
        try network.forward(tape, .tokens(TokenBatch([s]))).points.first { $0.name == "model.layers.1.self_attn.keys" }!
          .value)
      for r in 0..<keys.rows { rows.append((16..<32).map { Double(keys[r, $0]) }) }
    }
    let mean = (0..<16).map { j in rows.reduce(0.0) { $0 + $1[j] } / Double(rows.count) }
    var covariance = DoubleMatrix(zeros: 16, 16)
    for x in rows {
      for i in 0..<16 {
        for j in 0..<16 { covariance.values[i * 16 + j] += (x[i] - mean[i]) * (x[j] - mean[j]) / Double(rows.count) }
      }
    }
    let eigenvalues = try LAPACK.symmetricEigen(covariance).values.sorted(by: >)
    let u = bases.keys[1][1].basis
    let gram = u.matmul(u, transposeSelf: true)
    for i in 0..<16 { for j in 0..<16 { #expect(abs(gram[i, j] - (i == j ? 1 : 0)) < 1e-5) } }
    for r in [2, 8, 16] {
      var captured = 0.0
      for k in 0..<r {
        let column = (0..<16).map { Double(u[$0, k]) }
        for i in 0..<16 { for j in 0..<16 { captured += column[i] * covariance[i, j] * column[j] } }
      }
      let expected = eigenvalues.prefix(r).reduce(0, +)
      #expect(abs(captured - expected) <= 1e-4 * eigenvalues.reduce(0, +), "rank \(r): \(captured) against \(expected)")
    }
    #expect(zip(mean, bases.keys[1][1].mean.values).allSatisfy { abs($0 - Double($1)) < 1e-4 })
  }

  /// The shared setting of the qualitative checks: the small decoder trained briefly on
  /// patterned sequences, PCA bases from calibration sequences, and held-out sequences.
  static let trained: (network: Network<Float>, full: Network<Float>, calibration: [[Int]], heldOut: [[Int]])? = {
    guard var network = try? smallDecoder() else { return nil }
    var lm = TrainingOptions()
    (lm.epochs, lm.batchSize, lm.learningRate) = (8, 8, 3e-3)
    guard (try? Training.languageModel(&network, on: tokenSequences(96, length: 16, seed: 9), options: lm)) != nil
    else { return nil }
    let calibration = tokenSequences(24, length: 16, seed: 1)
    guard let stats = try? MatryoshkaKV.statistics(network, sequences: calibration),
      let bases = try? MatryoshkaKV.pcaBases(network, statistics: stats),
      let full = try? MatryoshkaKV.apply(network, bases: bases, ranks: KVProjection(layers: 2, heads: 2, rank: 16))
    else { return nil }
    return (network, full, calibration, tokenSequences(32, length: 16, seed: 2))
  }()

  /// At a 50% budget the greedy search's per-head ranks change the final hidden states (and the
  /// next-token distributions) less than uniform ranks do, on held-out sequences.
  @Test func adaptiveRanksBeatUniformRanksAtHalfTheCache() throws {
    let s = try #require(Self.trained)
    guard case .decoder(let c) = s.network.config else { return }
    let adaptive = try MatryoshkaKV.searchRanks(s.full, sequences: s.calibration, budget: 0.5, step: 4)
    #expect(adaptive.keptFraction(dimension: 16) <= 0.5 && adaptive.keptFraction(dimension: 16) > 0.45)
    var (uniformModel, adaptiveModel) = (s.full, s.full)
    uniformModel.kvProjection = MatryoshkaKV.uniformRanks(c, budget: 0.5, step: 4)
    adaptiveModel.kvProjection = adaptive
    let errors = (
      try MatryoshkaKV.outputError(uniformModel, reference: s.network, sequences: s.heldOut),
      try MatryoshkaKV.outputError(adaptiveModel, reference: s.network, sequences: s.heldOut)
    )
    #expect(errors.1 < errors.0, "adaptive \(adaptive): error \(errors.1), uniform \(errors.0)")
    let kl = (
      try MatryoshkaKV.logitKL(uniformModel, teacher: s.network, sequences: s.heldOut),
      try MatryoshkaKV.logitKL(adaptiveModel, teacher: s.network, sequences: s.heldOut)
    )
    #expect(kl.1 < kl.0)
    print(
      "MatryoshkaKV at half the cache, held-out: uniform error \(errors.0) KL \(kl.0); adaptive \(adaptive) error \(errors.1) KL \(kl.1)"
    )
  }

  /// The search with cached prefixes and parallel candidates picks what the literal search
  /// picks (the whole model run per candidate, as the official script); running from a layer's
  /// recorded residual stream gives the whole run's last block output.
  @Test func cachedSearchEqualsTheLiteralSearch() throws {
    let s = try #require(Self.trained)
    guard case .decoder(let c) = s.network.config else { return }
    let batch = TokenBatch(Array(s.calibration.prefix(8)))
    let tape = Tape<Float>()
    let whole = try s.network.forward(tape, .tokens(batch))
    let last = tape.value(try whole.point("model.layers.\(c.layerCount - 1).output"))
    let entering = tape.value(try whole.point("model.layers.0.output"))
    let rerun = Tape<Float>()
    let resumed = rerun.value(try s.network.forward(rerun, .residual(batch, layer: 1, hidden: entering)).output)
    #expect(zip(resumed.values, last.values).allSatisfy { abs($0 - $1) <= 1e-5 * max(1, abs($1)) })

    var literal = KVProjection(layers: c.layerCount, heads: c.keyValueHeadCount, rank: c.headDimension)
    var current = s.full
    while literal.keptFraction(dimension: c.headDimension) > 0.5 + 1e-12 {
      current.kvProjection = literal
      var scored: [(Double, Int, Int, Int)] = []
      for (k, kind) in KVProjection.Kind.allCases.enumerated() {
        for layer in 0..<c.layerCount {
          for head in 0..<c.keyValueHeadCount where literal.ranks(kind)[layer][head] > 4 {
            var trial = current
            var lowered = literal
            lowered.setRank(kind, layer: layer, head: head, literal.ranks(kind)[layer][head] - 4)
            trial.kvProjection = lowered
            let error = try MatryoshkaKV.outputError(trial, reference: current, sequences: s.calibration)
            scored.append((error, layer, head, k))
          }
        }
      }
      scored.sort { $0 < $1 }
      for (_, layer, head, k) in scored.prefix(max(1, 2 * c.layerCount * c.keyValueHeadCount * 3 / 4)) {
        let kind = KVProjection.Kind.allCases[k]
        literal.setRank(kind, layer: layer, head: head, literal.ranks(kind)[layer][head] - 4)
        if literal.keptFraction(dimension: c.headDimension) <= 0.5 + 1e-12 { break }
      }
    }
    let reports = ResultSlots<Int>(count: 1)
    reports.set(0, 0)
    let cached = try MatryoshkaKV.searchRanks(s.full, sequences: s.calibration, budget: 0.5, step: 4) { _ in
      reports.update(0) { $0 + 1 }
    }
    #expect(cached == literal)
    #expect(reports.get(0) > 8, "progress after every candidate")
  }

  /// Matryoshka training (ranks sampled per head and step, model frozen, distilled from the
  /// model without projections) beats PCA on held-out sequences at the 50% budget, and on
  /// average over the rank schedule; training at one fixed rank instead does worse at the other
  /// ranks; the trained bases stay orthonormal.
  @Test func trainedProjectionsBeatPCA() throws {
    let s = try #require(Self.trained)
    var start = s.full
    start.kvProjection = KVProjection(layers: 2, heads: 2, rank: 8)
    var options = MatryoshkaKV.TrainingOptions()
    (
      options.epochs, options.batchSize, options.step, options.learningRate, options.klWeight,
      options.crossEntropyWeight
    ) = (8, 8, 4, 1e-2, 1, 0)
    let (trained, losses) = try MatryoshkaKV.train(
      start, teacher: s.network, sequences: tokenSequences(128, length: 16, seed: 11), options: options)
    #expect(trained.kvProjection == start.kvProjection && losses.count == 8)
    var kl: [Int: (pca: Double, trained: Double)] = [:]
    for r in [4, 8, 12] {
      var (p, t) = (s.full, trained)
      p.kvProjection = KVProjection(layers: 2, heads: 2, rank: r)
      t.kvProjection = p.kvProjection
      kl[r] = (
        try MatryoshkaKV.logitKL(p, teacher: s.network, sequences: s.heldOut),
        try MatryoshkaKV.logitKL(t, teacher: s.network, sequences: s.heldOut)
      )
    }
    #expect(kl[8]!.trained < kl[8]!.pca, "\(kl)")
    #expect(kl.values.reduce(0) { $0 + $1.trained } < kl.values.reduce(0) { $0 + $1.pca }, "\(kl)")
    // The Matryoshka effect: trained at rank 8 alone, the other prefixes are worse than with
    // sampled ranks (the columns within and beyond the first 8 lose their order).
    options.fixedRank = 8
    let fixed = try MatryoshkaKV.train(
      start, teacher: s.network, sequences: tokenSequences(128, length: 16, seed: 11), options: options
    ).network
    for r in [4, 12] {
      var f = fixed
      f.kvProjection = KVProjection(layers: 2, heads: 2, rank: r)
      let fixedKL = try MatryoshkaKV.logitKL(f, teacher: s.network, sequences: s.heldOut)
      #expect(fixedKL > kl[r]!.trained, "rank \(r): fixed-rank training \(fixedKL), Matryoshka \(kl[r]!.trained)")
    }
    let u = trained.weights[KVProjection.basisName(layer: 1, .values, head: 0)]!
    let gram = u.matmul(u, transposeSelf: true)
    for i in 0..<16 { for j in 0..<16 { #expect(abs(gram[i, j] - (i == j ? 1 : 0)) < 1e-5) } }
    print("MatryoshkaKV held-out KL by rank (PCA, trained): \(kl.sorted { $0.key < $1.key })")
  }

  /// Grouped-query attention: one projection per KV head, shared by its query heads, computes
  /// what the same model with every KV head repeated per query head (plain multi-head attention)
  /// computes with the projections repeated likewise.
  @Test func sharedProjectionsOfAGroupEqualRepeatedOnes() throws {
    let network = try smallDecoder()
    guard case .decoder(let c) = network.config else { return }
    let bases = randomBases(c, seed: 8)
    let ranks = KVProjection(keyRanks: [[4, 12], [8, 16]], valueRanks: [[12, 4], [16, 8]])
    let grouped = try MatryoshkaKV.apply(network, bases: bases, ranks: ranks)

    var expanded = c
    expanded.keyValueHeadCount = c.headCount
    var tensors = Dictionary(uniqueKeysWithValues: network.tensors.map { ($0.name, $0.tensor) })
    for layer in 0..<2 {
      for projection in ["k_proj", "v_proj"] {
        let name = "model.layers.\(layer).self_attn.\(projection).weight"
        let w = tensors[name]!
        // Query head h reads KV head h / 2: its rows are that head's rows.
        tensors[name] = Tensor(
          shape: [64, 64],
          scalars: (0..<4).flatMap { h in Array(w.scalars[((h / 2) * 16 * 64)..<((h / 2 + 1) * 16 * 64)]) })
      }
    }
    let plain = try Network<Float>(config: .decoder(expanded), tensors: tensors)
    let repeated = MatryoshkaKV.Bases(
      keys: bases.keys.map { heads in (0..<4).map { heads[$0 / 2] } },
      values: bases.values.map { heads in (0..<4).map { heads[$0 / 2] } }, dataFree: false)
    let repeatedRanks = KVProjection(
      keyRanks: ranks.keyRanks.map { r in (0..<4).map { r[$0 / 2] } },
      valueRanks: ranks.valueRanks.map { r in (0..<4).map { r[$0 / 2] } })
    let multiHead = try MatryoshkaKV.apply(plain, bases: repeated, ranks: repeatedRanks)
    let batch = NetworkInput<Float>.tokens(TokenBatch([[3, 17, 42, 8, 0, 11, 5], [5, 9, 33]]))
    #expect(maxRelativeDifference(try outputs(grouped, batch), try outputs(multiHead, batch)) < 1e-5)
  }

  @Test func badBudgetsAndModelsAreRefused() throws {
    let network = try smallDecoder()
    guard case .decoder(let c) = network.config else { return }
    for (budget, step) in [(0.0, 4), (1.5, 4), (0.5, 5), (0.1, 4)] {
      #expect(throws: AdaptError.self) { try MatryoshkaKV.checkBudget(c, budget: budget, step: step) }
    }
    #expect(throws: AdaptError.self) {
      try MatryoshkaKV.statistics(
        Network<Float>.initializedMLP(MLPConfig(layerSizes: [4, 4, 2]), seed: 1), sequences: [[1, 2]])
    }
    #expect(throws: AdaptError.self) { try MatryoshkaKV.statistics(network, sequences: []) }
    #expect(throws: NetsError.self) {
      try MatryoshkaKV.apply(
        network, bases: randomBases(c, seed: 1), ranks: KVProjection(layers: 2, heads: 2, rank: 17))
    }
    // Ranks set on a network without bases, or out of range after the fact: an error, not a crash.
    var bare = network
    bare.kvProjection = KVProjection(layers: 2, heads: 2, rank: 8)
    #expect(throws: NetsError.self) { try outputs(bare, .tokens(TokenBatch([[1, 2, 3]]))) }
    var projected = try MatryoshkaKV.apply(
      network, bases: randomBases(c, seed: 1), ranks: KVProjection(layers: 2, heads: 2, rank: 8))
    projected.kvProjection = KVProjection(layers: 2, heads: 2, rank: 0)
    #expect(throws: NetsError.self) { try outputs(projected, .tokens(TokenBatch([[1, 2, 3]]))) }
  }
}
