import Checkpoint
import Foundation
import Nets
import Tensor
import Testing

@testable import Adapt

/// Random weights for every tensor `config` needs (norm gains near 1).
func randomWeights(_ config: NetworkConfig, seed: UInt64 = 1) -> [String: Tensor] {
  var out: [String: Tensor] = [:]
  for (name, shape) in Network<Float>.expectedShapes(config) {
    let rng = CounterRNG(seed: seed, stream: name)
    let count = shape.reduce(1, *)
    let isGain = name.hasSuffix("norm.weight") || name.hasSuffix("layernorm.weight")
    out[name] = Tensor(shape: shape, scalars: (0..<count).map { (isGain ? 1 : 0) + 0.3 * rng.normal(UInt64($0)) })
  }
  return out
}

func outputs(_ network: Network<Float>, _ input: NetworkInput<Float>) throws -> [Float] {
  let tape = Tape<Float>()
  return tape.value(try network.forward(tape, input).output).values
}

func maxRelativeDifference(_ a: [Float], _ b: [Float]) -> Float {
  let scale = max(b.map(abs).max() ?? 0, 1e-30)
  return zip(a, b).map { abs($0 - $1) }.max()! / scale
}

/// The UCI digits set (1797 8x8 images), fetched by `make digits` into bench-data/digits.
let digitsFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
  "../../bench-data/digits"
).standardized.path
let digitsPresent = FileManager.default.fileExists(atPath: digitsFolder + "/train.csv")

func digits(_ split: String) throws -> LabeledFeatures {
  let table = try DataFiles.readLabeled(digitsFolder + "/\(split).csv")
  return try LabeledFeatures(
    features: Matrix(rows: table.rows, columns: table.columns, values: table.features), labels: table.labels)
}

@Suite struct PELATests {
  /// Factoring an MLP's hidden layers at half their parameters: ranks by the rule, the output
  /// layer kept, parameter counts within one rank step of the target, and the factored model
  /// computing exactly what its dense form `B A` computes.
  @Test func factoredMLPRunsLikeItsDenseForm() throws {
    let config = MLPConfig(layerSizes: [16, 64, 48, 5])
    let network = Network<Float>.initializedMLP(config, seed: 3)
    let (factored, layers) = try PELA.factor(network, options: PELA.Options(rule: .keep(0.5)))
    #expect(factored.lowRank == ["layers.0": 6, "layers.1": 13])  // floor(16 64 / (2 80)), floor(64 48 / (2 112))
    #expect(layers.map(\.layer) == ["layers.0", "layers.1"])
    for layer in layers {
      let target = 0.5 * Double(layer.parametersBefore)
      #expect(
        Double(layer.parametersAfter) <= target
          && Double(layer.parametersAfter) > target - Double(layer.rows + layer.columns))
    }
    #expect(
      factored.weights["layers.0.0.weight"].map { [$0.rows, $0.columns] } == [6, 16]
        && factored.weights["layers.0.1.weight"].map { [$0.rows, $0.columns] } == [64, 6])
    #expect(
      factored.weights["layers.0.1.bias"] == network.weights["layers.0.bias"]
        && factored.weights["layers.2.weight"] == network.weights["layers.2.weight"])
    let dense = try PELA.densified(factored)
    #expect(dense.lowRank.isEmpty && PELA.parameterCount(dense) == PELA.parameterCount(network))
    let x = Matrix<Float>(rows: 7, columns: 16, values: (0..<112).map { Float(sin(Double($0))) })
    #expect(maxRelativeDifference(try outputs(factored, .features(x)), try outputs(dense, .features(x))) < 1e-5)
    // Each dense product is the layer's best rank-r approximation.
    for (layer, report) in zip(layers.map(\.layer), layers) {
      let w = network.weights[layer + ".weight"]!.tensor()
      let error =
        (zip(w.scalars, dense.weights[layer + ".weight"]!.values).reduce(0.0) {
          $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1)
        }).squareRoot()
      let norm = (w.scalars.reduce(0.0) { $0 + Double($1) * Double($1) }).squareRoot()
      #expect(abs(error / norm - report.relativeError!) < 1e-4)
    }
  }

  /// A Qwen2-style decoder (q/k/v biases): the default layers are its projections; narrow
  /// ones (8 outputs) stay dense; factored and dense outputs agree.
  @Test func decoderProjectionsFactor() throws {
    let json = """
      {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500.0, "hidden_act": "silu"}
      """
    let config = try NetworkConfig(json: Data(json.utf8))
    let network = try Network<Float>(config: config, tensors: randomWeights(config))
    let (factored, layers) = try PELA.factor(network, options: PELA.Options(rule: .keep(0.5)))
    #expect(
      Set(factored.lowRank.keys)
        == Set(
          (0..<2).flatMap { l in
            ["q_proj", "o_proj"].map { "model.layers.\(l).self_attn.\($0)" }
              + ["gate_proj", "up_proj", "down_proj"].map { "model.layers.\(l).mlp.\($0)" }
          }))
    #expect(
      layers.filter { $0.rank == nil }.allSatisfy { $0.layer.hasSuffix("k_proj") || $0.layer.hasSuffix("v_proj") })
    #expect(
      factored.weights["model.layers.0.self_attn.q_proj.1.bias"] != nil
        && factored.weights["model.embed_tokens.weight"] != nil)
    let tokens = NetworkInput<Float>.tokens(TokenBatch([[3, 17, 42, 8], [5, 9]]))
    #expect(
      maxRelativeDifference(try outputs(factored, tokens), try outputs(try PELA.densified(factored), tokens)) < 1e-5)
  }

  @Test func badRequestsAreRefused() throws {
    let network = Network<Float>.initializedMLP(MLPConfig(layerSizes: [16, 64, 5]), seed: 1)
    var options = PELA.Options()
    options.select = "nothing-like-this"
    #expect(throws: AdaptError.noLayers("nothing-like-this")) { try PELA.factor(network, options: options) }
    options.select = "(unclosed"
    #expect(throws: AdaptError.self) { try PELA.factor(network, options: options) }
    let (factored, _) = try PELA.factor(network, options: PELA.Options())
    #expect(throws: AdaptError.alreadyFactored) { try PELA.factor(factored, options: PELA.Options()) }
    var student = network
    #expect(throws: AdaptError.self) {
      try PELA.distill(
        &student, teacher: network, data: try LabeledFeatures(features: Matrix(zeros: 2, 16), labels: [0, 1]),
        options: .init())
    }
  }

  /// Distillation trains only the factors by default; the weight-perturbation regulariser alone
  /// pulls `max |B A - W|` down toward epsilon (40 epochs of 2 batches).
  @Test func distillationTrainsTheFactorsAndTheRegulariserShrinksThePerturbation() throws {
    var tasks = SyntheticTasks.Options()
    (tasks.tasks, tasks.classesPerTask, tasks.features, tasks.samplesPerClass) = (1, 4, 12, 30)
    let data = try SyntheticTasks.make(tasks, split: "train")
    var teacher = Network<Float>.initializedMLP(MLPConfig(layerSizes: [12, 32, 4]), seed: 2)
    var training = TrainingOptions()
    training.epochs = 5
    _ = try Training.classify(&teacher, on: data, options: training)
    var (student, _) = try PELA.factor(teacher, options: PELA.Options(rule: .keep(0.3)))
    let before = student
    var options = PELA.DistillationOptions()
    (
      options.taskWeight, options.featureWeight, options.perturbationWeight, options.epochs, options.learningRate,
      options.weightDecay
    ) = (0, 0, 1, 40, 1e-2, 0)
    let reports = try PELA.distill(&student, teacher: teacher, data: data, options: options)
    // A subgradient of a max moves one entry at a time: slow, but steadily down.
    #expect(reports.last!.perturbation < 0.85 * reports.first!.perturbation, "\(reports.map(\.perturbation))")
    for name in ["layers.1.weight", "layers.1.bias", "layers.0.1.bias"] {
      #expect(student.weights[name] == before.weights[name], "\(name)")
    }
    #expect(student.weights["layers.0.0.weight"] != before.weights["layers.0.0.weight"])
  }

  /// A decoder (the paper's setting: transformer blocks) distilled on token sequences with the
  /// block outputs' MSE alone moves its next-token distributions toward the original's.
  @Test func decodersDistilOnTokenSequences() throws {
    let s = try #require(MatryoshkaKVTests.trained)
    var (student, _) = try PELA.factor(s.network, options: PELA.Options(rule: .keep(0.25)))
    let before = try MatryoshkaKV.logitKL(student, teacher: s.network, sequences: s.heldOut)
    var options = PELA.DistillationOptions()
    (options.epochs, options.batchSize, options.taskWeight, options.learningRate) = (4, 8, 0, 1e-2)
    let reports = try PELA.distill(
      &student, teacher: s.network, on: .tokens(tokenSequences(64, length: 16, seed: 21)), options: options)
    let after = try MatryoshkaKV.logitKL(student, teacher: s.network, sequences: s.heldOut)
    #expect(
      reports.last!.features < reports.first!.features && after < 0.8 * before,
      "KL \(before) -> \(after); \(reports.map(\.features))")
    #expect(throws: AdaptError.self) {
      try PELA.distill(
        &student, teacher: s.network, on: .features(try LabeledFeatures(features: Matrix(zeros: 1, 64), labels: [0])),
        options: options)
    }
  }

  /// A BERT encoder distilled on token sequences (feature MSE at every layer output; the task
  /// loss does not apply to an encoder): its last hidden states move toward the original's on
  /// held-out sequences.
  @Test func bertEncodersDistilOnTokenSequences() throws {
    let c = try NetworkConfig(
      json: Data(
        """
        {"architectures": ["BertModel"], "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16, "type_vocab_size": 2,
         "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
        """.utf8))
    var weights = randomWeights(c, seed: 5)
    for (name, tensor) in weights where !name.contains("LayerNorm") {
      weights[name] = Tensor(shape: tensor.shape, scalars: tensor.scalars.map { $0 * 0.5 })
    }
    let teacher = try Network<Float>(config: c, tensors: weights)
    var (student, _) = try PELA.factor(teacher, options: PELA.Options(rule: .keep(0.25)))
    let heldOut = tokenSequences(16, length: 12, seed: 4).map { $0.map { $0 % 40 } }
    let before = try Training.hiddenStateError(student, reference: teacher, on: heldOut)
    var options = PELA.DistillationOptions()
    (options.epochs, options.batchSize, options.learningRate) = (6, 8, 1e-2)
    let reports = try PELA.distill(
      &student, teacher: teacher, on: .tokens(tokenSequences(64, length: 12, seed: 3).map { $0.map { $0 % 40 } }),
      options: options)
    let after = try Training.hiddenStateError(student, reference: teacher, on: heldOut)
    #expect(
      reports.last!.features < reports.first!.features && after < 0.8 * before,
      "hidden-state error \(before) -> \(after); \(reports.map(\.features))")
    #expect(try Training.hiddenStateError(teacher, reference: teacher, on: heldOut) == 0)
    print("PELA BERT distillation: hidden-state error \(before) -> \(after)")
  }

  /// The paper's claim on a real small data set: MLPs 64-32-32-10 trained on UCI digits (three
  /// seeds), their hidden layers factored to half and to a third of their parameters.
  /// Distillation (CE plus feature MSE against the frozen original, 10 epochs) recovers what
  /// plain truncation loses, and at a third it beats the same factored architecture trained
  /// from scratch for as many steps.
  @Test(.enabled(if: digitsPresent, "run `make digits` to fetch the UCI digits set (9 MB scikit-learn wheel)"))
  func distillationRecoversTruncationLoss() throws {
    let (train, test) = (try digits("train"), try digits("test"))
    let seeds: [UInt64] = [1, 2, 3]
    var sums = [String: Double]()
    for seed in seeds {
      var options = TrainingOptions()
      (options.epochs, options.learningRate, options.seed) = (40, 2e-3, seed)
      let config = MLPConfig(layerSizes: [64, 32, 32, 10])
      var teacher = Network<Float>.initializedMLP(config, seed: seed)
      _ = try Training.classify(&teacher, on: train, options: options)
      let dense = try Training.evaluate(teacher, on: test)
      sums["dense", default: 0] += dense.accuracy
      for (name, keep) in [("half", 0.5), ("third", 1.0 / 3)] {
        var (student, _) = try PELA.factor(teacher, options: PELA.Options(rule: .keep(keep)))
        let truncated = try Training.evaluate(student, on: test)
        var distillation = PELA.DistillationOptions()
        distillation.seed = seed
        _ = try PELA.distill(&student, teacher: teacher, data: train, options: distillation)
        let distilled = try Training.evaluate(student, on: test)
        sums[name + " truncated", default: 0] += truncated.accuracy
        sums[name + " distilled", default: 0] += distilled.accuracy
        sums[name + " truncated loss", default: 0] += truncated.loss
        sums[name + " distilled loss", default: 0] += distilled.loss
        guard name == "third" else { continue }
        var scratch = try PELA.factor(
          Network<Float>.initializedMLP(config, seed: seed + 100), options: PELA.Options(rule: .keep(keep))
        ).network
        var scratchOptions = options
        scratchOptions.epochs = distillation.epochs
        _ = try Training.classify(&scratch, on: train, options: scratchOptions)
        sums["third scratch", default: 0] += try Training.evaluate(scratch, on: test).accuracy
      }
    }
    let mean = sums.mapValues { $0 / Double(seeds.count) }
    let table = mean.keys.sorted().map { "\($0) \(String(format: "%.4f", mean[$0]!))" }.joined(separator: ", ")
    #expect(
      mean["half distilled"]! >= mean["dense"]! - 0.005 && mean["half distilled"]! >= mean["half truncated"]!,
      "\(table)")
    #expect(mean["half distilled loss"]! < mean["half truncated loss"]!, "\(table)")
    #expect(
      mean["third distilled"]! > mean["third truncated"]! + 0.05 && mean["third distilled"]! > mean["third scratch"]!,
      "\(table)")
    print("PELA on digits (mean of \(seeds.count) seeds): \(table)")
  }
}
