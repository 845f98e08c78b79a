import Foundation
import Nets
import Tensor
import Testing

@testable import Merge

/// `tuned - base` for every tensor of the base.
func taskVector(_ tuned: Network<Float>, minus base: Network<Float>) -> [String: Tensor] {
  Dictionary(
    uniqueKeysWithValues: base.tensors.map { name, tensor in
      (
        name,
        Tensor(
          shape: tensor.shape, scalars: zip(tuned.weights[name]!.values, base.weights[name]!.values).map { $0 - $1 })
      )
    })
}

/// Synthetic tasks, a briefly pre-trained base MLP and one fine-tune (task vector) per task.
struct ATLASFixture {
  let train: LabeledFeatures
  let validation: LabeledFeatures
  let test: LabeledFeatures
  let base: Network<Float>
  let taskVectors: [[String: Tensor]]

  init(tasks: Int, noise: Double = 2.5, features: Int = 32) throws {
    var o = SyntheticTasks.Options()
    (o.tasks, o.classesPerTask, o.features, o.noise, o.samplesPerClass) = (tasks, 3, features, noise, 120)
    train = try SyntheticTasks.make(o, split: "train")
    test = try SyntheticTasks.make(o, split: "test")
    o.samplesPerClass = 40
    validation = try SyntheticTasks.make(o, split: "val")
    var options = TrainingOptions()
    (options.epochs, options.seed) = (2, 1)
    let data = train
    var base = Network<Float>.initializedMLP(MLPConfig(layerSizes: [features, 64, 64, data.classCount]), seed: 1)
    _ = try Training.classify(&base, on: data, options: options)
    self.base = base
    options.epochs = 10
    let pretrained = base
    taskVectors = try (0..<tasks).map { t in
      var tuned = pretrained
      options.seed = UInt64(t + 5)
      _ = try Training.classify(&tuned, on: data.tasks([t]), options: options)
      return taskVector(tuned, minus: pretrained)
    }
  }

  var problem: ATLAS.Problem {
    get throws { try ATLAS.Problem(base: base, taskVectors: taskVectors, names: taskVectors.indices.map { "tv\($0)" }) }
  }

  /// Mean accuracy within each task's classes.
  func accuracy(_ network: Network<Float>, on data: LabeledFeatures? = nil) throws -> Double {
    let result = try Training.evaluate(network, on: data ?? test)
    return result.tasks.reduce(0.0) { $0 + $1.accuracyWithinTask } / Double(result.tasks.count)
  }
}

@Suite struct ATLASTests {
  @Test func coefficientGradientsAreInnerProductsAndFiniteDifferences() throws {
    let base = Network<Float>.initializedMLP(MLPConfig(layerSizes: [5, 7, 3], activation: .tanh), seed: 2)
    let taus = (0..<2).map { i in
      Dictionary(
        uniqueKeysWithValues: base.tensors.map {
          ($0.name, CounterRNG(seed: UInt64(i), stream: $0.name).normalTensor($0.tensor.shape, scale: 0.3))
        })
    }
    let problem = try ATLAS.Problem(base: base, taskVectors: taus, names: ["a", "b"])
    let x = Matrix(rows: 9, columns: 5, values: CounterRNG(seed: 3, stream: "x").normalTensor([45]).scalars)
    let labels = (0..<9).map { $0 % 3 }
    // The learner's coefficient gradients at Lambda = 0 ...
    let learner = ATLAS.Learner(problem: problem, options: ATLAS.Options())
    let tape = Tape<Float>()
    let (logits, leaves) = try learner.forward(tape, .features(x))
    tape.backward(from: tape.crossEntropy(logits, labels: labels))
    let gradient = try learner.coefficientGradient(tape, leaves)
    // ... equal <dL/dtheta_b, tau_{i,b}> from a pass with the weights as parameters.
    let direct = Tape<Float>()
    var weights: [String: Var] = [:]
    let out = try base.forward(direct, .features(x)) { name, value in
      let v = direct.parameter(value)
      weights[name] = v
      return v
    }
    direct.backward(from: direct.crossEntropy(out.output, labels: labels))
    for (i, tau) in taus.enumerated() {
      for (b, block) in problem.blocks.enumerated() {
        let inner = zip(direct.gradient(weights[block]!)!.values, tau[block]!.scalars).reduce(0.0) {
          $0 + Double($1.0) * Double($1.1)
        }
        let learned = Double(gradient.values[learner.index(task: i, block: b, partition: 0)])
        #expect(abs(learned - inner) <= 1e-4 * max(1, abs(inner)), "\(block) of task \(i)")
      }
    }
    // With random partitions, each partition's coefficient gets the inner product over its elements.
    var partitioned = ATLAS.Options()
    partitioned.partitions = 3
    let split = ATLAS.Learner(problem: problem, options: partitioned)
    let splitTape = Tape<Float>()
    let (splitLogits, splitLeaves) = try split.forward(splitTape, .features(x))
    splitTape.backward(from: splitTape.crossEntropy(splitLogits, labels: labels))
    let splitGradient = try split.coefficientGradient(splitTape, splitLeaves)
    for (i, tau) in taus.enumerated() {
      for (b, block) in problem.blocks.enumerated() {
        let g = direct.gradient(weights[block]!)!.values
        for k in 0..<3 {
          let inner = g.indices.filter { ATLASCoefficients.partition(of: $0, count: g.count, partitions: 3) == k }
            .reduce(0.0) { $0 + Double(g[$1]) * Double(tau[block]!.scalars[$1]) }
          let learned = Double(splitGradient.values[split.index(task: i, block: b, partition: k)])
          #expect(abs(learned - inner) <= 1e-4 * max(1, abs(inner)), "\(block) of task \(i), partition \(k)")
        }
      }
    }
    // In float64, the same formulation against central finite differences of the loss.
    let base64 = try Network<Double>(
      config: base.config, tensors: Dictionary(uniqueKeysWithValues: base.tensors.map { ($0.name, $0.tensor) }))
    let x64 = Matrix(rows: 9, columns: 5, values: x.values.map(Double.init))
    func loss(_ lambda: [Double], gradients: Bool) throws -> (Double, [Double]) {
      let t = Tape<Double>()
      let vars = lambda.map { t.parameter(Matrix(rows: 1, columns: 1, values: [$0])) }
      let out = try base64.forward(t, .features(x64)) { name, value in
        guard let b = problem.blocks.firstIndex(of: name) else { return t.constant(value) }
        var theta = t.constant(value)
        for i in 0..<2 {
          let tau = Matrix<Double>(
            rows: value.rows, columns: value.columns, values: taus[i][name]!.scalars.map(Double.init))
          theta = t.add(theta, t.scale(t.constant(tau), by: vars[i * problem.blocks.count + b]))
        }
        return theta
      }
      let l = t.crossEntropy(out.output, labels: labels)
      if gradients { t.backward(from: l) }
      return (t.value(l).values[0], gradients ? vars.map { t.gradient($0)!.values[0] } : [])
    }
    let point = (0..<(2 * problem.blocks.count)).map { Double($0 % 5) * 0.1 - 0.2 }
    let analytic = try loss(point, gradients: true).1
    for n in point.indices {
      var (up, down) = (point, point)
      up[n] += 1e-6
      down[n] -= 1e-6
      let numeric = (try loss(up, gradients: false).0 - loss(down, gradients: false).0) / 2e-6
      #expect(abs(analytic[n] - numeric) <= 1e-4 * max(1, abs(numeric)))
    }
  }

  @Test func uniformCoefficientsAreTaskArithmeticBitForBit() throws {
    let base = CounterRNG(seed: 1, stream: "b").normalTensor([300_001])
    let taus = (0..<3).map { CounterRNG(seed: UInt64($0), stream: "t").normalTensor([300_001], scale: 0.1) }
    let inputs = MergeInputs(name: "w", base: base, models: taus)
    let ta = try TaskVectors.Sum().merge(
      inputs,
      try ParameterResolver(
        method: "apply", specs: TaskVectors.Sum().parameters, global: ["scale": .number(0.7)], models: [[:], [:], [:]],
        positions: LayerPositions(names: ["w"])
      ).resolve(tensor: "w"))
    let resolved = try ParameterResolver(
      method: "atlas", specs: [], global: [:], models: [[:], [:], [:]], positions: LayerPositions(names: ["w"])
    ).resolve(tensor: "w")
    let uniform = try ATLASApply(ATLASCoefficients(tasks: ["a", "b", "c"], blocks: ["w"], value: 0.7)).merge(
      inputs, resolved)
    #expect(uniform.scalars == ta.scalars)
    #expect(
      try ATLASApply(ATLASCoefficients(tasks: ["a", "b", "c"], blocks: ["w"], value: 0)).merge(inputs, resolved).scalars
        == base.scalars)
    // Four partitions with equal coefficients are block-wise scaling.
    let partitioned = try ATLASApply(
      ATLASCoefficients(tasks: ["a", "b", "c"], blocks: ["w"], partitions: 4, value: 0.7)
    ).merge(inputs, resolved)
    #expect(partitioned.scalars == ta.scalars)
    // Different partitions scale different elements: about a quarter each.
    var split = ATLASCoefficients(tasks: ["a", "b", "c"], blocks: ["w"], partitions: 4)
    for i in 0..<3 { split.values[i][0][2] = 1 }
    let moved = zip(try ATLASApply(split).merge(inputs, resolved).scalars, base.scalars).filter { $0 != $1 }.count
    #expect(abs(Double(moved) / 300_001 - 0.25) < 0.01)
  }

  @Test func coefficientFilesRoundTripAndBadOnesAreRejected() throws {
    var c = ATLASCoefficients(tasks: ["a", "b"], blocks: ["layers.0.weight", "layers.0.bias"], partitions: 2)
    c.values[1][0][1] = -0.25
    #expect(try ATLASCoefficients(json: try c.json()) == c)
    #expect(throws: MergeError.unknownBlocks(["nope"])) {
      try ATLASCoefficients(tasks: ["a"], blocks: ["nope"]).check(
        baseShapes: ["layers.0.weight": [2, 2]], taskVectors: 1)
    }
    #expect(throws: MergeError.taskCount(file: 2, given: 3)) {
      try c.check(baseShapes: ["layers.0.weight": [2, 2], "layers.0.bias": [2]], taskVectors: 3)
    }
    #expect(throws: MergeError.self) {
      try ATLASCoefficients(
        json: Data(
          #"{"format": "atlas-coefficients", "tasks": ["a"], "blocks": ["x"], "partitions": 1, "coefficients": [[[1, 2]]]}"#
            .utf8))
    }
    let base = Network<Float>.initializedMLP(MLPConfig(layerSizes: [3, 4, 2]), seed: 1)
    var wrong = Dictionary(uniqueKeysWithValues: base.tensors.map { ($0.name, $0.tensor) })
    wrong["layers.0.weight"] = Tensor(zeros: [4, 5])
    #expect(
      throws: MergeError.taskVectorMismatch(
        taskVector: 0, tensor: "layers.0.weight", reason: "shape [4, 5], the base has [4, 3]")
    ) {
      try ATLAS.Problem(base: base, taskVectors: [wrong], names: ["x"])
    }
  }

  /// The paper's claim on a multi-task merge: learned block-wise coefficients beat the best
  /// single-lambda task arithmetic on held-out data, and beat one learned lambda per task vector.
  @Test func learnedBlockwiseCoefficientsBeatTaskArithmeticAndIsotropic() throws {
    let f = try ATLASFixture(tasks: 6)
    let problem = try f.problem
    let best = try [0.2, 0.4, 0.6, 0.8, 1.0].map { lambda in
      try f.accuracy(problem.network(ATLASCoefficients(tasks: problem.names, blocks: problem.blocks, value: lambda)))
    }.max()!
    var options = ATLAS.Options()
    (options.learningRate, options.epochs) = (0.01, 30)
    let learned = try f.accuracy(
      problem.network(try ATLAS.learn(problem, data: f.validation, options: options).coefficients))
    options.isotropic = true
    let isotropic = try f.accuracy(
      problem.network(try ATLAS.learn(problem, data: f.validation, options: options).coefficients))
    #expect(
      learned > best && learned > isotropic, "learned \(learned), isotropic \(isotropic), best task arithmetic \(best)")
    // The default schedule for a set this small (epochs chosen on a held-out fifth) also wins.
    let defaults = ATLAS.Options().adaptedToDataSize(examples: f.validation.count)
    #expect(defaults.earlyStopping && defaults.learningRate == 5e-2)
    let automatic = try f.accuracy(
      problem.network(try ATLAS.learn(problem, data: f.validation, options: defaults).coefficients))
    #expect(automatic > best, "default schedule \(automatic), best task arithmetic \(best)")
  }

  @Test func negationForgetsTheTargetWhileTheControlStays() throws {
    let f = try ATLASFixture(tasks: 3)
    let problem = try ATLAS.Problem(base: f.base, taskVectors: [f.taskVectors[0]], names: ["target"])
    var options = ATLAS.Options()
    (options.objective, options.negateTasks, options.learningRate, options.epochs) = (.negate, [0], 0.01, 20)
    let c = try ATLAS.learn(problem, data: f.train, validation: f.validation, options: options).coefficients
    // Selection keeps the control tasks at 95% of the base's on validation data; held-out data
    // follows within a few points, while the target task drops.
    func accuracies(_ network: Network<Float>, _ data: LabeledFeatures) throws -> (target: Double, control: Double) {
      let tasks = try Training.evaluate(network, on: data).tasks
      return (
        tasks[0].accuracyWithinTask,
        (tasks[1].accuracyWithinTask * Double(tasks[1].count) + tasks[2].accuracyWithinTask * Double(tasks[2].count))
          / Double(tasks[1].count + tasks[2].count)
      )
    }
    let (before, after) = (try accuracies(f.base, f.validation), try accuracies(problem.network(c), f.validation))
    #expect(
      after.control >= 0.95 * before.control && after.target < before.target - 0.1, "validation: \(before) -> \(after)")
    let (beforeTest, afterTest) = (try accuracies(f.base, f.test), try accuracies(problem.network(c), f.test))
    #expect(
      afterTest.control >= 0.9 * beforeTest.control && afterTest.target < beforeTest.target - 0.1,
      "test: \(beforeTest) -> \(afterTest)")
  }

  @Test(arguments: [ATLAS.Objective.entropy, .ufm])
  func unsupervisedAdaptationImprovesAShiftedTask(_ objective: ATLAS.Objective) throws {
    // A base trained on clean data; the target is the same tasks seen through a feature shift;
    // the pool holds the task vector of a fine-tune on a related (half as large) shift.
    let f = try ATLASFixture(tasks: 2, noise: 1.0)
    let shift = (0..<32).map { Float($0 % 2 == 0 ? 1.2 : -1.2) }
    func shifted(_ d: LabeledFeatures, by scale: Float) -> LabeledFeatures {
      var out = d
      for r in 0..<d.count { for c in 0..<32 { out.features[r, c] += scale * shift[c] } }
      return out
    }
    var tuned = f.base
    var training = TrainingOptions()
    training.epochs = 10
    _ = try Training.classify(&tuned, on: shifted(f.train, by: 0.5), options: training)
    let tau = taskVector(tuned, minus: f.base)
    let problem = try ATLAS.Problem(base: f.base, taskVectors: [tau], names: ["shift"])
    let target = shifted(f.train, by: 1)
    var options = ATLAS.Options()
    (options.objective, options.learningRate, options.epochs) = (objective, 0.01, 10)
    let c = try ATLAS.learn(problem, data: target, options: options).coefficients  // labels unused
    let before = try Training.evaluate(f.base, on: shifted(f.test, by: 1)).accuracy
    let after = try Training.evaluate(problem.network(c), on: shifted(f.test, by: 1)).accuracy
    #expect(after > before + 0.05, "\(objective): \(before) -> \(after)")
  }

  /// Few-shot recognition with the paper's schedule (lr 0.1, cosine, 10 epochs, the small set
  /// repeated): five labelled samples per class of a new target (task 0 seen through a feature
  /// shift), whose own task vector is not in the pool (the clean tasks' vectors are); the learned
  /// coefficients raise its held-out accuracy over the base's.
  @Test func fewShotCoefficientsImproveANewTarget() throws {
    let f = try ATLASFixture(tasks: 3)
    let shift = (0..<32).map { Float($0 % 3 == 0 ? 0.8 : -0.4) }
    func shifted(_ d: LabeledFeatures) -> LabeledFeatures {
      var out = d
      for r in 0..<d.count { for c in 0..<32 { out.features[r, c] += shift[c] } }
      return out
    }
    let problem = try f.problem
    let target = shifted(f.train.tasks([0]))
    let shots = target.rows(
      Set(target.labels).sorted().flatMap { c in target.labels.indices.filter { target.labels[$0] == c }.prefix(5) })
    let options = ATLAS.Options(objective: .fewShot)
    #expect(options.learningRate == 0.1 && options.epochs == 10 && options.cosine)
    let c = try ATLAS.learn(problem, data: shots, options: options).coefficients
    let test = shifted(f.test.tasks([0]))
    let (before, after) = (try f.accuracy(f.base, on: test), try f.accuracy(problem.network(c), on: test))
    #expect(after > before + 0.05, "\(before) -> \(after)")
  }

  @Test func blockSelectionTrainsOnlyTheKeptCoefficients() throws {
    let f = try ATLASFixture(tasks: 2)
    let problem = try f.problem
    var options = ATLAS.Options()
    (options.keepFraction, options.epochs, options.learningRate) = (0.25, 3, 0.01)
    let c = try ATLAS.learn(problem, data: f.validation, options: options).coefficients
    let nonzero = c.values.flatMap { $0.flatMap { $0 } }.filter { $0 != 0 }.count
    #expect(nonzero == 3)  // 25% of 2 task vectors x 6 blocks
  }
}

/// aTLAS on a decoder: two token domains (walks over ids 0-15 and 16-31), a small decoder
/// trained briefly on both, one fine-tune per domain (each forgets the other).
struct DecoderATLASFixture {
  let base: Network<Float>
  let taskVectors: [[String: Tensor]]
  let validation: [[Int]]
  let test: [[[Int]]]

  static func domain(_ offset: Int, count: Int, split: String) throws -> [[Int]] {
    var o = SyntheticTokens.Options()
    (o.sequences, o.length, o.vocabulary, o.noise, o.seed) = (count, 12, 16, 0.1, 3)
    return try SyntheticTokens.make(o, split: split).map { $0.map { $0 + offset } }
  }

  init() throws {
    let json = """
      {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
       "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "hidden_act": "silu"}
      """
    let config = try NetworkConfig(json: Data(json.utf8))
    var tensors: [String: Tensor] = [:]
    for (name, shape) in Network<Float>.expectedShapes(config) {
      let rng = CounterRNG(seed: 11, stream: name)
      let gain: Float = name.hasSuffix("norm.weight") ? 1 : 0
      tensors[name] = Tensor(
        shape: shape, scalars: (0..<shape.reduce(1, *)).map { gain + 0.1 * rng.normal(UInt64($0)) })
    }
    var base = try Network<Float>(config: config, tensors: tensors)
    let (a, b) = (try Self.domain(0, count: 48, split: "train"), try Self.domain(16, count: 48, split: "train"))
    var options = TrainingOptions()
    (options.epochs, options.batchSize, options.learningRate) = (1, 8, 1e-2)
    _ = try Training.languageModel(&base, on: zip(a, b).flatMap { [$0, $1] }, options: options)
    options.epochs = 2
    let pretrained = base
    taskVectors = try [a, b].map { domain in
      var tuned = pretrained
      _ = try Training.languageModel(&tuned, on: domain, options: options)
      return taskVector(tuned, minus: pretrained)
    }
    self.base = base
    validation = try Self.domain(0, count: 24, split: "val") + Self.domain(16, count: 24, split: "val")
    test = [try Self.domain(0, count: 24, split: "test"), try Self.domain(16, count: 24, split: "test")]
  }
}

@Suite struct DecoderATLASTests {
  /// Learned on 32 validation sequences with the default schedule (small data: 1e-2, epochs
  /// chosen on a held-out fifth), aTLAS's coefficients give a lower held-out next-token loss,
  /// averaged over the two domains, than task arithmetic at its best lambda on the same
  /// validation sequences (measured: base 2.887, task arithmetic 2.507, aTLAS 2.383).
  @Test func decoderCoefficientsBeatTaskArithmeticAtItsBestLambda() throws {
    let f = try DecoderATLASFixture()
    let problem = try ATLAS.Problem(base: f.base, taskVectors: f.taskVectors, names: ["a", "b"])
    func testLoss(_ network: Network<Float>) throws -> Double {
      try f.test.reduce(0.0) { $0 + (try Training.perplexity(network, on: $1).loss) } / 2
    }
    let grid = try [0.2, 0.4, 0.6, 0.8, 1.0].map { lambda in
      let network = try problem.network(ATLASCoefficients(tasks: problem.names, blocks: problem.blocks, value: lambda))
      return (validation: try Training.perplexity(network, on: f.validation).loss, test: try testLoss(network))
    }
    let bestLambda = try #require(grid.min { $0.validation < $1.validation })
    var options = ATLAS.Options()
    options.batchSize = 8
    options = options.adaptedToDataSize(examples: f.validation.count)
    // 6 batches of 8 sequences: at most 1000 steps, 167 epochs, chosen on a held-out fifth.
    #expect(options.learningRate == 5e-2 && options.earlyStopping && options.epochs == 167)
    let learned = try ATLAS.learn(problem, on: .tokens(f.validation), options: options).coefficients
    let atlas = try testLoss(problem.network(learned))
    let base = try testLoss(f.base)
    print("decoder aTLAS: held-out loss base \(base), best task arithmetic \(bestLambda.test), aTLAS \(atlas)")
    #expect(atlas < bestLambda.test && atlas < base, "aTLAS \(atlas), task arithmetic \(bestLambda.test), base \(base)")
    #expect(throws: MergeError.self) {
      var negate = ATLAS.Options(objective: .negate)
      negate.negateTasks = [0]
      _ = try ATLAS.learn(problem, on: .tokens(f.validation), options: negate)
    }
  }
}
