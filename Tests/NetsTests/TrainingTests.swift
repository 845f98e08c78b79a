import Foundation
import Tensor
import Testing

@testable import Nets

@Suite struct TrainingTests {
  @Test func anMLPLearnsTheSyntheticTasks() throws {
    var options = SyntheticTasks.Options()
    options.tasks = 2
    options.classesPerTask = 4
    options.noise = 0.6
    let train = try SyntheticTasks.make(options, split: "train")
    let test = try SyntheticTasks.make(options, split: "test")
    #expect(train.count == 800 && train.classCount == 8 && train.taskIDs == [0, 1])
    #expect(train.features != test.features && train.labels == test.labels)
    var network = Network<Float>.initializedMLP(MLPConfig(layerSizes: [16, 64, 64, 8]), seed: 1)
    let before = try Training.evaluate(network, on: test)
    var training = TrainingOptions()
    training.epochs = 15
    let losses = try Training.classify(&network, on: train, options: training)
    let after = try Training.evaluate(network, on: test)
    #expect(losses.last! < losses.first! / 4)
    #expect(before.accuracy < 0.3)
    #expect(after.accuracy > 0.9)
    #expect(after.tasks.count == 2 && after.tasks.allSatisfy { $0.accuracyWithinTask >= $0.accuracy })
  }

  @Test func overlappingTasksShareClasses() throws {
    var options = SyntheticTasks.Options()
    options.tasks = 3
    options.classesPerTask = 4
    options.sharedClasses = 1
    options.samplesPerClass = 3
    let data = try SyntheticTasks.make(options, split: "train")
    #expect(data.classCount == 10)
    #expect(data.classesByTask[1] == [4, 5, 6] && data.classesByTask[2] == [7, 8, 9])
    #expect(throws: NetsError.self) {
      var bad = options
      bad.sharedClasses = 4
      _ = try SyntheticTasks.make(bad, split: "train")
    }
  }

  @Test func adamAndSGDMinimiseAQuadratic() {
    // f(p) = sum (p - target)^2 / 2, gradient p - target.
    let target = Matrix<Double>(rows: 1, columns: 3, values: [1, -2, 0.5])
    for kind in Optimizer<Double>.Kind.allCases {
      var parameters = ["p": Matrix<Double>(zeros: 1, 3)]
      var optimizer = Optimizer<Double>(kind, learningRate: kind == .adam ? 0.05 : 0.1)
      for _ in 0..<500 {
        let p = parameters["p"]!
        optimizer.step(
          &parameters, gradients: ["p": Matrix(rows: 1, columns: 3, values: zip(p.values, target.values).map(-))])
      }
      #expect(zip(parameters["p"]!.values, target.values).allSatisfy { abs($0 - $1) < 1e-3 })
    }
  }

  @Test func firstStepsFollowTheClosedForms() {
    // Adam's first step moves every coordinate by the learning rate against the gradient's sign.
    var parameters = ["p": Matrix<Double>(rows: 1, columns: 2, values: [1, 1])]
    var adam = Optimizer<Double>(.adam, learningRate: 0.1)
    adam.step(&parameters, gradients: ["p": Matrix(rows: 1, columns: 2, values: [3, -0.001])])
    #expect(abs(parameters["p"]!.values[0] - 0.9) < 1e-6 && abs(parameters["p"]!.values[1] - 1.1) < 1e-4)
    // SGD with momentum: v1 = g, v2 = m g + g; clipping scales the gradient to the norm.
    parameters = ["p": Matrix(rows: 1, columns: 2, values: [0, 0])]
    var sgd = Optimizer<Double>(.sgd, learningRate: 1, clipNorm: 1)
    let norm = sgd.step(&parameters, gradients: ["p": Matrix(rows: 1, columns: 2, values: [3, 4])])
    #expect(norm == 5 && abs(parameters["p"]!.values[0] + 0.6) < 1e-12 && abs(parameters["p"]!.values[1] + 0.8) < 1e-12)
    sgd.step(&parameters, gradients: ["p": Matrix(rows: 1, columns: 2, values: [0.3, 0.4])])
    #expect(abs(parameters["p"]!.values[0] + 0.6 - -(0.9 * 0.6 + 0.3)) < 1e-12)
  }

  @Test func statisticsEqualADirectFloat64Computation() {
    let a = randomMatrix(37, 5, "stats-a")
    let b = randomMatrix(37, 3, "stats-b")
    var streamed = FeatureStatistics(width: 8)
    var second = FeatureStatistics(width: 8)
    let joint = Matrix.concatenated(a, b)
    streamed.add(Matrix(rows: 20, columns: 8, values: Array(joint.values[0..<160])))
    second.add(Matrix(rows: 17, columns: 8, values: Array(joint.values[160...])))
    streamed.add(second)
    #expect(streamed.count == 37)
    let mean = (0..<8).map { c in (0..<37).reduce(0.0) { $0 + joint[$1, c] } / 37 }
    for i in 0..<8 {
      #expect(abs(streamed.mean[i] - mean[i]) < 1e-12)
      for j in 0..<8 {
        let covariance = (0..<37).reduce(0.0) { $0 + (joint[$1, i] - mean[i]) * (joint[$1, j] - mean[j]) } / 37
        #expect(abs(streamed.covariance[i * 8 + j] - covariance) < 1e-12)
      }
    }
    let correlation = streamed.correlation
    #expect((0..<8).allSatisfy { correlation[$0 * 8 + $0] == 1 } && correlation.allSatisfy { abs($0) <= 1 + 1e-12 })
  }

  @Test func miniBatchesCoverEveryRowOnceAndDependOnlyOnTheSeed() {
    let a = miniBatches(count: 103, size: 10, shuffleSeed: 4)
    #expect(a.count == 11 && a.flatMap { $0 }.sorted() == Array(0..<103))
    #expect(
      a == miniBatches(count: 103, size: 10, shuffleSeed: 4) && a != miniBatches(count: 103, size: 10, shuffleSeed: 5))
    #expect(miniBatches(count: 5, size: 2, shuffleSeed: nil) == [[0, 1], [2, 3], [4]])
  }

  /// A small decoder learns the synthetic token patterns: held-out perplexity falls below half
  /// the vocabulary size (a uniform guess scores the vocabulary size, 32).
  @Test func aDecoderLearnsSyntheticTokenPatterns() throws {
    let json = """
      {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
       "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}
      """
    let config = try NetworkConfig(json: Data(json.utf8))
    var network = try Network<Float>(config: config, tensors: randomWeights(config))
    var tokens = SyntheticTokens.Options()
    (tokens.sequences, tokens.length, tokens.vocabulary, tokens.noise) = (256, 12, 32, 0.1)
    let (train, test) = (
      try SyntheticTokens.make(tokens, split: "train"), try SyntheticTokens.make(tokens, split: "test")
    )
    #expect(train != test && train.allSatisfy { $0.count == 12 && $0.allSatisfy { (0..<32).contains($0) } })
    let before = try Training.perplexity(network, on: test).perplexity
    var options = TrainingOptions()
    (options.epochs, options.batchSize, options.learningRate) = (4, 8, 1e-2)
    let losses = try Training.languageModel(&network, on: train, options: options)
    let after = try Training.perplexity(network, on: test).perplexity
    #expect(losses.last! < losses.first!)
    #expect(after < 16 && after < 0.2 * before, "perplexity \(before) -> \(after), losses \(losses)")
  }
}
