import Foundation
import Nets
import Tensor

extension MatryoshkaKV {
  public struct TrainingOptions: Sendable {
    public var epochs = 1
    public var batchSize = 4
    /// AdamW on the rotations and means (the official script's 1e-3), weight decay 0,
    /// gradient norm clipped to 1, linear warm-up (a tenth of the steps, at most 100), then cosine.
    public var learningRate: Float = 1e-3
    /// Ranks are sampled from `step, 2 step, ..., d` per layer, head and kind at every step (the
    /// Matryoshka strategy), so every prefix of the bases stays good.
    public var step = 8
    /// Train at this one rank instead (the ablation that loses the nesting).
    public var fixedRank: Int?
    /// `KL(teacher || student)` and next-token cross-entropy weights (0.25 and 0.75 in the paper).
    public var klWeight: Float = 0.25
    public var crossEntropyWeight: Float = 0.75
    public var seed: UInt64 = 0
    public init() {}
  }

  /// Trains the bases and means of `network` (which carries its initial, e.g. PCA, bases) with
  /// every model weight frozen, distilling from `teacher` (the model without projections). Each
  /// basis is parametrised as `U = U0 Cayley(X)`, `X` starting at 0, so it stays orthogonal and
  /// starts at `U0`. Returns the trained network (at `network`'s ranks) and the mean loss of each epoch.
  public static func train(
    _ network: Network<Float>, teacher: Network<Float>, sequences: [[Int]], options: TrainingOptions,
    progress: ((Int, Int, Double) -> Void)? = nil
  ) throws -> (network: Network<Float>, losses: [Double]) {
    let c = try decoder(network)
    guard let finalRanks = network.kvProjection else {
      throw AdaptError.nothingToDo(method: "MatryoshkaKV training", reason: "the model has no K/V projections to train")
    }
    guard options.step >= 1, c.headDimension % options.step == 0 else {
      throw AdaptError.invalidOption(
        name: "step", value: "\(options.step)",
        reason: "the rank step must divide the head dimension \(c.headDimension)")
    }
    if let r = options.fixedRank, !(1...c.headDimension).contains(r) {
      throw AdaptError.invalidOption(name: "fixed rank", value: "\(r)", reason: "must be within 1...\(c.headDimension)")
    }
    guard !sequences.isEmpty else {
      throw AdaptError.missingData(method: "MatryoshkaKV training", needed: "token sequences to train on")
    }
    let d = c.headDimension
    let names = KVProjection.Kind.allCases.flatMap { kind in
      (0..<c.layerCount).flatMap { l in
        (0..<c.keyValueHeadCount).map {
          (KVProjection.basisName(layer: l, kind, head: $0), KVProjection.meanName(layer: l, kind, head: $0))
        }
      }
    }
    let initial = Dictionary(uniqueKeysWithValues: try names.map { ($0.0, try network.weights.required($0.0)) })
    var parameters: [String: Matrix<Float>] = [:]
    for (basis, mean) in names {
      parameters[basis] = Matrix(zeros: d, d)  // X: U = U0 Cayley(X)
      parameters[mean] = try network.weights.required(mean)
    }
    var optimizer = Optimizer<Float>(.adam, learningRate: options.learningRate, weightDecay: 0, clipNorm: 1)
    let batches = (sequences.count + options.batchSize - 1) / options.batchSize
    let total = max(1, batches * options.epochs)
    let warmup = min(100, max(1, total / 10))
    var student = network
    var losses: [Double] = []
    var stepIndex = 0
    for epoch in 0..<options.epochs {
      var sum = 0.0
      for (b, rows) in miniBatches(
        count: sequences.count, size: options.batchSize, shuffleSeed: options.seed &+ UInt64(epoch)
      ).enumerated() {
        let batch = TokenBatch(rows.map { sequences[$0] })
        student.kvProjection = sampledRanks(c, options: options, step: stepIndex)
        let teacherTape = Tape<Float>()
        let target = teacherTape.value(try teacher.forward(teacherTape, .tokens(batch)).output)
        let tape = Tape<Float>()
        var bound: [String: Var] = [:]
        let out = try student.forward(tape, .tokens(batch)) { name, value in
          if let u0 = initial[name], let rotation = parameters[name] {
            let x = tape.parameter(rotation)
            bound[name] = x
            return tape.matmul(tape.constant(u0), tape.cayley(x))
          }
          if let mean = parameters[name] {
            let v = tape.parameter(mean)
            bound[name] = v
            return v
          }
          return tape.constant(value)
        }
        let labels = Training.nextTokenLabels(batch)
        var loss = tape.scale(tape.klDivergence(teacher: target, student: out.output), options.klWeight)
        if labels.contains(where: { $0 >= 0 }) {
          loss = tape.add(loss, tape.scale(tape.crossEntropy(out.output, labels: labels), options.crossEntropyWeight))
        }
        tape.backward(from: loss)
        let progressFraction = Double(stepIndex) / Double(total)
        let schedule =
          stepIndex < warmup ? Double(stepIndex + 1) / Double(warmup) : 0.5 * (1 + cos(Double.pi * progressFraction))
        optimizer.learningRate = options.learningRate * Float(schedule)
        optimizer.step(&parameters, gradients: bound.compactMapValues { tape.gradient($0) })
        sum += Double(tape.value(loss).values[0])
        stepIndex += 1
        progress?(epoch * batches + b + 1, total, sum / Double(b + 1))
      }
      losses.append(sum / Double(max(batches, 1)))
    }
    // Materialise U = U0 Cayley(X) and the trained means.
    var tensors = Dictionary(uniqueKeysWithValues: network.tensors.map { ($0.name, $0.tensor) })
    for (basis, mean) in names {
      let tape = Tape<Float>()
      let u = tape.value(
        tape.matmul(
          tape.constant(try initial.required(basis)), tape.cayley(tape.constant(try parameters.required(basis)))))
      tensors[basis] = u.tensor()
      tensors[mean] = try parameters.required(mean).tensor(shape: [d])
    }
    return (
      try Network(config: network.config, tensors: tensors, lowRank: network.lowRank, kvProjection: finalRanks), losses
    )
  }

  /// The ranks of one training step: one draw from `step, 2 step, ..., d` per layer, head and
  /// kind (or the fixed rank), keyed by seed and step.
  static func sampledRanks(_ c: DecoderConfig, options: TrainingOptions, step: Int) -> KVProjection {
    if let r = options.fixedRank { return KVProjection(layers: c.layerCount, heads: c.keyValueHeadCount, rank: r) }
    let choices = c.headDimension / options.step
    let rng = CounterRNG(seed: options.seed, stream: "matryoshka-ranks-\(step)")
    var ranks = KVProjection(layers: c.layerCount, heads: c.keyValueHeadCount, rank: c.headDimension)
    var draw: UInt64 = 0
    for kind in KVProjection.Kind.allCases {
      for l in 0..<c.layerCount {
        for h in 0..<c.keyValueHeadCount {
          ranks.setRank(kind, layer: l, head: h, options.step * (1 + Int(rng.bits(draw) % UInt64(choices))))
          draw += 1
        }
      }
    }
    return ranks
  }
}
