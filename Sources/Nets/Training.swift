import Foundation

/// How to train: epochs, mini-batch size, optimiser and its settings, the seed of the
/// mini-batch order. Defaults suit the small MLPs of the examples.
public struct TrainingOptions: Sendable {
  public var epochs = 20
  public var batchSize = 64
  public var optimizer: Optimizer<Float>.Kind = .adam
  public var learningRate: Float = 1e-3
  public var momentum: Float = 0.9
  public var weightDecay: Float = 0
  public var clipNorm: Float? = nil
  public var seed: UInt64 = 0
  public init() {}
}

/// Progress of a training run, reported after every mini-batch.
public struct TrainingProgress: Sendable {
  public let epoch: Int
  public let epochs: Int
  public let batch: Int
  public let batches: Int
  /// Mean loss over the epoch's batches so far.
  public let loss: Double
}

/// Accuracy and loss of a classifier on labelled data: over all classes, and per task with the
/// prediction restricted to that task's classes (a task-specific head's view).
public struct Evaluation: Sendable {
  public struct Task: Sendable {
    public let task: Int
    public let count: Int
    public let accuracy: Double
    /// Accuracy when the prediction must come from the task's own classes.
    public let accuracyWithinTask: Double
  }

  public let count: Int
  public let loss: Double
  public let accuracy: Double
  /// With several tasks, ZipIt's joint accuracy: softmax within each task's classes, then the
  /// class with the highest of those probabilities (so tasks compete on confidence, not on raw
  /// logit scale); equal to `accuracy`'s argmax with one task.
  public let jointAccuracy: Double
  public let tasks: [Task]
}

/// Training and evaluation of networks on data, batch by batch (memory bounded by the batch).
public enum Training {
  /// Trains `network` as a classifier with cross-entropy on `data`, updating the weights for
  /// which `trainable` is true (all by default). Returns the mean loss of each epoch.
  public static func classify(
    _ network: inout Network<Float>, on data: LabeledFeatures, options: TrainingOptions,
    trainable: (String) -> Bool = { _ in true },
    progress: ((TrainingProgress) -> Void)? = nil
  ) throws -> [Double] {
    guard case .mlp(let config) = network.config else {
      throw NetsError.wrongModel(operation: "classification training", needs: "an MLP")
    }
    guard data.features.columns == config.layerSizes[0] else {
      throw NetsError.featureCount(model: config.layerSizes[0], data: data.features.columns)
    }
    let outputs = config.outputWidth
    guard data.classCount <= outputs else {
      throw NetsError.classCount(labels: data.classCount, outputs: outputs)
    }
    return try fit(&network, count: data.count, options: options, trainable: trainable, progress: progress) { rows in
      let batch = data.rows(rows)
      return (.features(batch.features), batch.labels)
    }
  }

  /// Mini-batch training with cross-entropy: `batch` gives the input and labels of some rows.
  static func fit(
    _ network: inout Network<Float>, count: Int, options: TrainingOptions, trainable: (String) -> Bool,
    progress: ((TrainingProgress) -> Void)?,
    batch: ([Int]) -> (input: NetworkInput<Float>, labels: [Int])
  ) throws -> [Double] {
    var optimizer = Optimizer<Float>(
      options.optimizer, learningRate: options.learningRate, weightDecay: options.weightDecay,
      clipNorm: options.clipNorm)
    optimizer.momentum = options.momentum
    var losses: [Double] = []
    for epoch in 0..<options.epochs {
      let batches = miniBatches(count: count, size: options.batchSize, shuffleSeed: options.seed &+ UInt64(epoch))
      var total = 0.0
      for (b, rows) in batches.enumerated() {
        let (input, labels) = batch(rows)
        let tape = Tape<Float>()
        let (out, parameters) = try network.forward(tape, input, trainable: trainable)
        let loss = tape.crossEntropy(out.output, labels: labels)
        tape.backward(from: loss)
        optimizer.step(&network.weights, gradients: parameters.compactMapValues { tape.gradient($0) })
        total += Double(tape.value(loss).values[0])
        progress?(
          TrainingProgress(
            epoch: epoch + 1, epochs: options.epochs, batch: b + 1, batches: batches.count, loss: total / Double(b + 1))
        )
      }
      losses.append(total / Double(max(batches.count, 1)))
    }
    return losses
  }

  /// The classifier's logits on every row of `features`, batch by batch.
  public static func logits(_ network: Network<Float>, _ features: Matrix<Float>, batchSize: Int = 512) throws
    -> Matrix<Float>
  {
    var values: [Float] = []
    var columns = 0
    for start in stride(from: 0, to: features.rows, by: batchSize) {
      let end = min(features.rows, start + batchSize)
      let batch = Matrix(
        rows: end - start, columns: features.columns,
        values: Array(features.values[(start * features.columns)..<(end * features.columns)]))
      let tape = Tape<Float>()
      let out = tape.value(try network.forward(tape, .features(batch)).output)
      columns = out.columns
      values += out.values
    }
    return Matrix(rows: features.rows, columns: columns, values: values)
  }

  /// Accuracy and cross-entropy on `data`, overall and per task.
  public static func evaluate(_ network: Network<Float>, on data: LabeledFeatures) throws -> Evaluation {
    try evaluate(logits: try logits(network, data.features), data)
  }

  /// A sequence classifier's (BERT with a head) accuracy and loss on labelled token sequences.
  public static func evaluate(_ network: Network<Float>, on data: LabeledTokens, batchSize: Int = 16) throws
    -> Evaluation
  {
    try evaluate(logits: try logits(network, data.sequences, batchSize: batchSize), data)
  }

  /// The logits of a sequence classifier for every sequence, batch by batch.
  public static func logits(_ network: Network<Float>, _ sequences: [[Int]], batchSize: Int = 16) throws -> Matrix<
    Float
  > {
    var values: [Float] = []
    var columns = 0
    for start in stride(from: 0, to: sequences.count, by: batchSize) {
      let tape = Tape<Float>()
      let z = tape.value(
        try network.forward(
          tape, .tokens(TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)])))
        )
        .output)
      values += z.values
      columns = z.columns
    }
    return Matrix(rows: sequences.count, columns: columns, values: values)
  }

  /// Trains a sequence classifier (BERT with a head) with cross-entropy on labelled token
  /// sequences. Returns the mean loss of each epoch.
  public static func classify(
    _ network: inout Network<Float>, on data: LabeledTokens, options: TrainingOptions,
    trainable: (String) -> Bool = { _ in true }, progress: ((TrainingProgress) -> Void)? = nil
  ) throws -> [Double] {
    guard case .bert(let c) = network.config, let outputs = c.classifierLabels else {
      throw NetsError.wrongModel(operation: "sequence classification training", needs: "a BERT classifier")
    }
    guard data.classCount <= outputs else { throw NetsError.classCount(labels: data.classCount, outputs: outputs) }
    return try fit(&network, count: data.count, options: options, trainable: trainable, progress: progress) { rows in
      (.tokens(TokenBatch(rows.map { data.sequences[$0] })), rows.map { data.labels[$0] })
    }
  }

  /// Accuracy, loss and per-task figures from a classifier's logits for `data`'s examples.
  static func evaluate(logits z: Matrix<Float>, _ data: some Labelled) throws -> Evaluation {
    guard data.classCount <= z.columns else {
      throw NetsError.classCount(labels: data.classCount, outputs: z.columns)
    }
    let p = softmax(z)
    var loss = 0.0
    var correct = 0
    for r in 0..<data.count {
      loss -= Foundation.log(max(Double(p[r, data.labels[r]]), 1e-300))
      if argmax(z, r, among: 0..<z.columns) == data.labels[r] { correct += 1 }
    }
    let classes = data.classesByTask
    var jointCorrect = 0
    for r in 0..<data.count {
      var best = (score: -1.0, label: 0)
      for own in classes.values {
        let top = own.map { Double(z[r, $0]) }.max() ?? 0
        let total = own.reduce(0.0) { $0 + Foundation.exp(Double(z[r, $1]) - top) }
        for c in own where Foundation.exp(Double(z[r, c]) - top) / total > best.score {
          best = (Foundation.exp(Double(z[r, c]) - top) / total, c)
        }
      }
      if best.label == data.labels[r] { jointCorrect += 1 }
    }
    let tasks = data.taskIDs.map { task -> Evaluation.Task in
      let rows = data.labels.indices.filter { (data.tasks?[$0] ?? 0) == task }
      let own = classes[task] ?? []
      let right = rows.filter { argmax(z, $0, among: 0..<z.columns) == data.labels[$0] }.count
      let rightWithin = rows.filter { argmax(z, $0, among: own) == data.labels[$0] }.count
      return Evaluation.Task(
        task: task, count: rows.count, accuracy: Double(right) / Double(max(rows.count, 1)),
        accuracyWithinTask: Double(rightWithin) / Double(max(rows.count, 1)))
    }
    let rows = Double(max(data.count, 1))
    return Evaluation(
      count: data.count, loss: loss / rows, accuracy: Double(correct) / rows,
      jointAccuracy: classes.count > 1 ? Double(jointCorrect) / rows : Double(correct) / rows, tasks: tasks)
  }

  /// Trains a decoder on token sequences with next-token cross-entropy, updating the weights
  /// for which `trainable` is true. Returns the mean loss of each epoch.
  public static func languageModel(
    _ network: inout Network<Float>, on sequences: [[Int]], options: TrainingOptions,
    trainable: (String) -> Bool = { _ in true },
    progress: ((TrainingProgress) -> Void)? = nil
  ) throws -> [Double] {
    guard case .decoder = network.config else {
      throw NetsError.wrongModel(operation: "language-model training", needs: "a decoder")
    }
    return try fit(&network, count: sequences.count, options: options, trainable: trainable, progress: progress) {
      rows in
      let batch = TokenBatch(rows.map { sequences[$0] })
      return (.tokens(batch), nextTokenLabels(batch))
    }
  }

  /// `|S - T|_F / |T|_F` of an encoder's last hidden states (`last_hidden_state`, padding
  /// excluded) against a reference model's, over token sequences: how far a compressed encoder
  /// is from its original.
  public static func hiddenStateError(
    _ network: Network<Float>, reference: Network<Float>, on sequences: [[Int]], batchSize: Int = 8
  ) throws -> Double {
    var (difference, norm) = (0.0, 0.0)
    for start in stride(from: 0, to: sequences.count, by: batchSize) {
      let batch = TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)]))
      let (a, b) = (Tape<Float>(), Tape<Float>())
      let s = a.value(try network.forward(a, .tokens(batch)).point("last_hidden_state"))
      let t = b.value(try reference.forward(b, .tokens(batch)).point("last_hidden_state"))
      let sums = squaredDifference(s, t, rows: batch.mask)
      (difference, norm) = (difference + sums.difference, norm + sums.norm)
    }
    return (difference / max(norm, 1e-300)).squareRoot()
  }

  /// `sum |a - b|^2` and `sum |b|^2` over the rows where `rows` is true, in float64: the parts
  /// of a relative error over a token batch's non-padding positions.
  public static func squaredDifference(_ a: Matrix<Float>, _ b: Matrix<Float>, rows: [Bool]) -> (
    difference: Double, norm: Double
  ) {
    var (difference, norm) = (0.0, 0.0)
    for r in rows.indices where rows[r] {
      for c in 0..<a.columns {
        let (x, y) = (Double(a[r, c]), Double(b[r, c]))
        difference += (x - y) * (x - y)
        norm += y * y
      }
    }
    return (difference, norm)
  }

  /// Mean next-token cross-entropy and perplexity of a decoder on token sequences; for a
  /// partially zipped decoder also each tail's own mean cross-entropy (`tailLosses`, empty
  /// otherwise): the model's output is the tails' ensemble, a tail alone is its model's view
  /// through the shared trunk (how a task-aware evaluation reads it).
  public static func perplexity(_ network: Network<Float>, on sequences: [[Int]], batchSize: Int = 8) throws -> (
    loss: Double, perplexity: Double, tokens: Int, tailLosses: [Double]
  ) {
    let tails: Int
    if case .decoder(let c) = network.config, c.tails > 1 { tails = c.tails } else { tails = 0 }
    var total = 0.0
    var tailTotals = [Double](repeating: 0, count: tails)
    var tokens = 0
    for start in stride(from: 0, to: sequences.count, by: batchSize) {
      let batch = TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)]))
      let tape = Tape<Float>()
      let out = try network.forward(tape, .tokens(batch))
      let labels = nextTokenLabels(batch)
      let counted = labels.filter { $0 >= 0 }.count
      guard counted > 0 else { continue }
      func loss(_ logits: Var) -> Double { Double(tape.value(tape.crossEntropy(logits, labels: labels)).values[0]) }
      total += loss(out.output) * Double(counted)
      for t in 0..<tails {
        tailTotals[t] += loss(try out.point(DecoderConfig.tailPrefix(t) + "lm_head.output")) * Double(counted)
      }
      tokens += counted
    }
    let loss = total / Double(max(tokens, 1))
    return (loss, Foundation.exp(loss), tokens, tailTotals.map { $0 / Double(max(tokens, 1)) })
  }

  /// Row `b * S + s` predicts token `s + 1` of sequence `b`; -1 where there is none.
  public static func nextTokenLabels(_ batch: TokenBatch) -> [Int] {
    batch.ids.indices.map { r in
      let s = r % batch.sequence
      return s + 1 < batch.sequence && batch.mask[r + 1] ? batch.ids[r + 1] : -1
    }
  }

  public static func argmax(_ z: Matrix<Float>, _ row: Int, among classes: some Collection<Int>) -> Int {
    var best = classes.first ?? 0
    for c in classes where z[row, c] > z[row, best] { best = c }
    return best
  }
}
