import Foundation
import Nets
import Tensor

extension PELA {
  /// PELA's distillation stage ("intermediate pre-training"): the factored student learns from
  /// the frozen original (teacher) with
  /// `taskWeight CE + featureWeight mean_l MSE(S_l, T_l) + logitWeight MSE(logits) + perturbationWeight mean_L (max|B A - W| - epsilon)^2`,
  /// `l` the distilled points (an MLP's post-activation hidden layers, a decoder's block outputs),
  /// `L` the factored layers.
  public struct DistillationOptions: Sendable {
    public var epochs = 10
    public var batchSize = 64
    public var learningRate: Float = 1e-3
    /// AdamW weight decay (0.05, DeiT's default).
    public var weightDecay: Float = 0.05
    /// Cross-entropy on the data's labels (the original training loss); 0 for unlabelled data.
    public var taskWeight: Float = 1
    /// `kd_alpha`: feature distillation at every hidden point.
    public var featureWeight: Float = 1
    /// `kd_beta`: MSE between student and teacher logits (off by default, as in the paper).
    public var logitWeight: Float = 0
    /// The weight-perturbation regulariser's weight (`inf_norm_weight`; off in the DeiT scripts).
    public var perturbationWeight: Float = 0
    /// Its target `epsilon` (`inf_norm_eps`).
    public var perturbationEpsilon: Float = 1e-3
    /// Activation points distilled (a regular expression on point names); nil: every hidden
    /// layer of an MLP, every block output of a decoder (the paper's choice).
    public var points: String?
    /// Train every student weight (the official code) instead of the factors only (the default).
    public var trainEverything = false
    public var seed: UInt64 = 0
    public init() {}
  }

  /// One epoch's mean loss and its parts.
  public struct DistillationReport: Sendable {
    public let epoch: Int
    public let loss: Double
    public let features: Double
    public let perturbation: Double
  }

  /// What a model is distilled on: labelled feature rows (MLPs) or token sequences (decoders,
  /// whose labels are the next tokens; BERT encoders, features only).
  public enum DistillationData {
    case features(LabeledFeatures)
    case tokens([[Int]])

    var count: Int {
      switch self {
      case .features(let d): return d.count
      case .tokens(let t): return t.count
      }
    }

    func batch(_ rows: [Int]) -> (input: NetworkInput<Float>, labels: [Int]) {
      switch self {
      case .features(let d):
        let b = d.rows(rows)
        return (.features(b.features), b.labels)
      case .tokens(let t):
        let b = TokenBatch(rows.map { t[$0] })
        return (.tokens(b), Training.nextTokenLabels(b))
      }
    }
  }

  /// Trains `student` (factored by `factor`) against `teacher` on `data`, with a cosine learning
  /// rate schedule from `learningRate` to 0. Labels are used only when `taskWeight > 0`.
  public static func distill(
    _ student: inout Network<Float>, teacher: Network<Float>, data: LabeledFeatures, options: DistillationOptions,
    progress: ((DistillationReport) -> Void)? = nil
  ) throws -> [DistillationReport] {
    try distill(&student, teacher: teacher, on: .features(data), options: options, progress: progress)
  }

  public static func distill(
    _ student: inout Network<Float>, teacher: Network<Float>, on data: DistillationData, options: DistillationOptions,
    progress: ((DistillationReport) -> Void)? = nil
  ) throws -> [DistillationReport] {
    guard !student.lowRank.isEmpty else {
      throw AdaptError.nothingToDo(
        method: "PELA distillation", reason: "the student has no factored layer; factor the model first")
    }
    guard student.config.architecture == teacher.config.architecture else {
      throw AdaptError.unsupportedModel(
        method: "PELA distillation", reason: "the teacher must have the student's architecture")
    }
    let defaultPoints: String
    switch (student.config, data) {
    case (.mlp, .features): defaultPoints = #"\.hidden$"#
    case (.decoder, .tokens): defaultPoints = #"^model\.layers\.\d+\.output$"#
    case (.bert, .tokens): defaultPoints = #"^encoder\.layer\.\d+\.output$"#
    default:
      throw AdaptError.unsupportedModel(
        method: "PELA distillation",
        reason: "it takes an MLP with feature rows, or a decoder or BERT encoder with token sequences")
    }
    // An encoder has no labels of its own (its output is a sentence embedding): features only.
    var encoder: Bool {
      if case .bert = student.config { return true }
      return false
    }
    guard options.epochs >= 1 else {
      throw AdaptError.invalidOption(name: "epochs", value: "\(options.epochs)", reason: "must be at least 1")
    }
    guard options.batchSize >= 1 else {
      throw AdaptError.invalidOption(name: "batch_size", value: "\(options.batchSize)", reason: "must be at least 1")
    }
    let points: Regex<AnyRegexOutput>
    do { points = try Regex(options.points ?? defaultPoints) } catch {
      throw AdaptError.badPattern(options.points ?? "", reason: "\(error)")
    }
    let factorNames = Set(student.lowRank.keys.flatMap { [$0 + ".0.weight", $0 + ".1.weight"] })
    let trainable: (String) -> Bool = { options.trainEverything || factorNames.contains($0) }
    var optimizer = Optimizer<Float>(.adam, learningRate: options.learningRate, weightDecay: options.weightDecay)
    let batchesPerEpoch = (data.count + options.batchSize - 1) / options.batchSize
    let totalSteps = max(1, options.epochs * batchesPerEpoch)
    var reports: [DistillationReport] = []
    for epoch in 0..<options.epochs {
      var sums = (loss: 0.0, features: 0.0, perturbation: 0.0)
      let batches = miniBatches(count: data.count, size: options.batchSize, shuffleSeed: options.seed &+ UInt64(epoch))
      for (b, rows) in batches.enumerated() {
        let (input, labels) = data.batch(rows)
        let teacherTape = Tape<Float>()
        let taught = try teacher.forward(teacherTape, input)
        let teacherPoints = Dictionary(
          taught.points.filter { $0.name.contains(points) }.map { ($0.name, teacherTape.value($0.value)) }
        ) { a, _ in a }

        let tape = Tape<Float>()
        let (out, parameters) = try student.forward(tape, input, trainable: trainable)
        var terms: [Var] = []
        if options.taskWeight > 0 && !encoder && labels.contains(where: { $0 >= 0 }) {
          terms.append(tape.scale(tape.crossEntropy(out.output, labels: labels), options.taskWeight))
        }
        var featureLoss: Var?
        let distilled = out.points.filter { teacherPoints[$0.name] != nil }
        if options.featureWeight > 0, !distilled.isEmpty {
          var sum: Var?
          for point in distilled {
            let mse = tape.meanSquaredError(point.value, tape.constant(try teacherPoints.required(point.name)))
            sum = sum.map { tape.add($0, mse) } ?? mse
          }
          if let sum {
            let mean = tape.scale(sum, 1 / Float(distilled.count))
            featureLoss = mean
            terms.append(tape.scale(mean, options.featureWeight))
          }
        }
        if options.logitWeight > 0 {
          terms.append(
            tape.scale(
              tape.meanSquaredError(out.output, tape.constant(teacherTape.value(taught.output))), options.logitWeight))
        }
        var perturbation: Var?
        if options.perturbationWeight > 0 {
          var sum: Var?
          for layer in student.lowRank.keys.sorted() {
            let a = try parameters[layer + ".0.weight"] ?? tape.constant(student.weights.required(layer + ".0.weight"))
            let bMatrix =
              try parameters[layer + ".1.weight"] ?? tape.constant(student.weights.required(layer + ".1.weight"))
            let error = tape.maxAbs(
              tape.subtract(tape.matmul(bMatrix, a), tape.constant(try teacher.weights.required(layer + ".weight"))))
            let shifted = tape.subtract(
              error, tape.constant(Matrix(rows: 1, columns: 1, values: [options.perturbationEpsilon])))
            let term = tape.multiply(shifted, shifted)
            sum = sum.map { tape.add($0, term) } ?? term
          }
          if let sum {
            let mean = tape.scale(sum, 1 / Float(student.lowRank.count))
            perturbation = mean
            terms.append(tape.scale(mean, options.perturbationWeight))
          }
        }
        guard var loss = terms.first else {
          throw AdaptError.nothingToDo(method: "PELA distillation", reason: "every loss weight is 0: nothing to train")
        }
        for term in terms.dropFirst() { loss = tape.add(loss, term) }
        tape.backward(from: loss)
        let step = epoch * batchesPerEpoch + b
        optimizer.learningRate =
          options.learningRate * Float(0.5 * (1 + cos(Double.pi * Double(step) / Double(totalSteps))))
        optimizer.step(&student.weights, gradients: parameters.compactMapValues { tape.gradient($0) })
        sums.loss += Double(tape.value(loss).values[0])
        sums.features += featureLoss.map { Double(tape.value($0).values[0]) } ?? 0
        sums.perturbation += perturbation.map { Double(tape.value($0).values[0]) } ?? 0
      }
      let n = Double(max(batches.count, 1))
      let report = DistillationReport(
        epoch: epoch + 1, loss: sums.loss / n, features: sums.features / n, perturbation: sums.perturbation / n)
      reports.append(report)
      progress?(report)
    }
    return reports
  }
}
