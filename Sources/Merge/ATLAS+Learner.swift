import Foundation
import Nets
import Tensor

/// Task vectors as the aTLAS learner reads them: one block (a tensor, shaped like the base's
/// weight) at a time, when a step needs it.
public protocol TaskVectorSource {
  /// Number of task vectors.
  var count: Int { get }
  /// The shape of tensor `name` in task vector `i`, nil when it has none.
  func shape(of name: String, in i: Int) -> [Int]?
  /// Tensor `name` of task vector `i` as a matrix (1-D tensors as one row).
  func values(of name: String, in i: Int) throws -> Matrix<Float>
}

/// Task vectors held in memory.
public struct TaskVectorTensors: TaskVectorSource {
  let tensors: [[String: Tensor]]
  public init(_ tensors: [[String: Tensor]]) { self.tensors = tensors }
  public var count: Int { tensors.count }
  public func shape(of name: String, in i: Int) -> [Int]? { tensors[i][name]?.shape }
  public func values(of name: String, in i: Int) throws -> Matrix<Float> { Matrix(try tensors[i].required(name)) }
}

extension ATLAS {
  /// The training state: the coefficients as one flat row (trained by AdamW) and which of them
  /// train. A step forms every block's weights `theta_b = theta0_b + sum_i lambda tau_i`
  /// (per partition) as tape leaves, and after the backward pass turns their gradients into
  /// the coefficients' by `dL/dlambda_{i,b,k} = <dL/dtheta_b, mask_k . tau_{i,b}>`, reading
  /// the task vectors again rather than holding them.
  struct Learner {
    let problem: Problem
    let options: Options
    let partitions: Int
    /// Per block, the partition of every element (empty with one partition).
    let partitionOf: [[UInt32]]
    /// The coefficients as one row, flat index `index(task:block:partition:)`.
    var lambda: Matrix<Float>
    var trainable: [Bool]
    var optimizer: Optimizer<Float>

    init(problem: Problem, options: Options) {
      self.problem = problem
      self.options = options
      let k = options.isotropic ? 1 : max(1, options.partitions)
      partitions = k
      partitionOf = problem.blocks.map { block in
        guard k > 1, let count = problem.base.weights[block]?.count else { return [] }
        let rng = CounterRNG(seed: 0, stream: "atlas-partition-\(count)")  // ATLASCoefficients.partition
        return (0..<count).map { UInt32(rng.bits(UInt64($0)) % UInt64(k)) }
      }
      let tasks = problem.taskVectors.count
      let count = options.isotropic ? tasks : tasks * problem.blocks.count * k
      lambda = Matrix(zeros: 1, count)
      trainable = Array(repeating: true, count: count)
      optimizer = Optimizer(
        .adam, learningRate: options.learningRate, weightDecay: options.weightDecay, clipNorm: options.clipNorm)
    }

    func index(task i: Int, block b: Int, partition k: Int) -> Int {
      options.isotropic ? i : (i * problem.blocks.count + b) * partitions + k
    }

    /// The coefficient of element `e` of block `b` for task vector `i`.
    func coefficient(task i: Int, block b: Int, element e: Int) -> Float {
      lambda.values[index(task: i, block: b, partition: partitionOf[b].isEmpty ? 0 : Int(partitionOf[b][e]))]
    }

    /// The forward pass with `theta_b = theta0_b + sum lambda tau`; with `differentiable`, every
    /// block is a tape leaf (returned by block index) whose gradient `coefficientGradient` reads.
    func forward(_ tape: Tape<Float>, _ input: NetworkInput<Float>, differentiable: Bool = true) throws -> (
      logits: Var, blocks: [Int: Var]
    ) {
      let blockIndex = Dictionary(uniqueKeysWithValues: problem.blocks.enumerated().map { ($1, $0) })
      var weights: [String: Matrix<Float>] = [:]
      for (b, block) in problem.blocks.enumerated() {
        guard var theta = problem.base.weights[block] else { continue }
        for i in 0..<problem.taskVectors.count {
          // At Lambda = 0 (every step's start) the block is the base's: nothing to read.
          guard (0..<partitions).contains(where: { lambda.values[index(task: i, block: b, partition: $0)] != 0 })
          else { continue }
          let tau = try problem.taskVectors.values(of: block, in: i)
          for e in theta.values.indices {
            theta.values[e] += coefficient(task: i, block: b, element: e) * tau.values[e]
          }
        }
        weights[block] = theta
      }
      var leaves: [Int: Var] = [:]
      let out = try problem.base.forward(tape, input) { name, value in
        guard let b = blockIndex[name], let theta = weights[name] else { return tape.constant(value) }
        guard differentiable else { return tape.constant(theta) }
        let leaf = tape.parameter(theta)
        leaves[b] = leaf
        return leaf
      }
      return (out.output, leaves)
    }

    /// The coefficients' gradient (one row) from the blocks' gradients after `backward`.
    func coefficientGradient(_ tape: Tape<Float>, _ leaves: [Int: Var]) throws -> Matrix<Float> {
      var gradient = [Double](repeating: 0, count: lambda.count)
      for (b, leaf) in leaves {
        guard let g = tape.gradient(leaf) else { continue }
        for i in 0..<problem.taskVectors.count {
          guard (0..<partitions).contains(where: { trainable[index(task: i, block: b, partition: $0)] }) else {
            continue
          }
          let tau = try problem.taskVectors.values(of: problem.blocks[b], in: i)
          if partitionOf[b].isEmpty {
            var sum = 0.0
            for e in g.values.indices { sum += Double(g.values[e]) * Double(tau.values[e]) }
            gradient[index(task: i, block: b, partition: 0)] += sum
          } else {
            var sums = [Double](repeating: 0, count: partitions)
            for e in g.values.indices { sums[Int(partitionOf[b][e])] += Double(g.values[e]) * Double(tau.values[e]) }
            for k in 0..<partitions { gradient[index(task: i, block: b, partition: k)] += sums[k] }
          }
        }
      }
      for n in gradient.indices where !trainable[n] { gradient[n] = 0 }
      return Matrix(rows: 1, columns: gradient.count, values: gradient.map(Float.init))
    }

    /// Logits with every row's classes outside its task pushed to -1e4 (its own head's view).
    func withinTask(_ tape: Tape<Float>, _ logits: Var, _ batch: some Labelled, classes: [Int: [Int]]) -> Var {
      guard let tasks = batch.tasks, classes.count > 1 else { return logits }
      let z = tape.value(logits)
      var mask = Matrix<Float>(rows: z.rows, columns: z.columns, values: Array(repeating: -1e4, count: z.count))
      for r in 0..<z.rows { for c in classes[tasks[r]] ?? [] { mask[r, c] = 0 } }
      return tape.add(logits, tape.constant(mask))
    }

    /// The objective on one batch of token sequences: next-token cross-entropy, or the entropy
    /// of the next-token distributions at the non-padding positions.
    func loss(_ tape: Tape<Float>, tokens sequences: [[Int]]) throws -> (Var, [Int: Var]) {
      let batch = TokenBatch(sequences)
      let (logits, leaves) = try forward(tape, .tokens(batch))
      if options.objective == .entropy { return (tape.entropy(logits, rows: batch.mask), leaves) }
      return (tape.crossEntropy(logits, labels: Training.nextTokenLabels(batch)), leaves)
    }

    /// The objective on one batch of labelled token sequences (a BERT classifier).
    func loss(_ tape: Tape<Float>, labelled batch: LabeledTokens, classes: [Int: [Int]]) throws -> (Var, [Int: Var]) {
      let (logits, leaves) = try forward(tape, .tokens(TokenBatch(batch.sequences)))
      return (supervised(tape, logits, batch, classes: classes), leaves)
    }

    /// The supervised objectives on logits: `ce`/`few-shot` within each row's task, or `negate`'s
    /// `-CE(target) + CE(control)`; `entropy` needs no labels.
    func supervised(_ tape: Tape<Float>, _ logits: Var, _ batch: some Labelled, classes: [Int: [Int]]) -> Var {
      switch options.objective {
      case .entropy: return tape.entropy(logits)
      case .negate:
        let scoped = withinTask(tape, logits, batch, classes: classes)
        let tasks = batch.tasks ?? Array(repeating: 0, count: batch.count)
        let target = batch.labels.indices.map { options.negateTasks.contains(tasks[$0]) ? batch.labels[$0] : -1 }
        let control = batch.labels.indices.map { options.negateTasks.contains(tasks[$0]) ? -1 : batch.labels[$0] }
        return tape.add(
          tape.scale(tape.crossEntropy(scoped, labels: target), -1), tape.crossEntropy(scoped, labels: control))
      default: return tape.crossEntropy(withinTask(tape, logits, batch, classes: classes), labels: batch.labels)
      }
    }

    /// The objective on one batch of feature rows.
    func loss(
      _ tape: Tape<Float>, _ batch: LabeledFeatures, rows: [Int], epoch: Int, classes: [Int: [Int]],
      trusted: [Int: Int], scale: [Float]
    ) throws -> (Var, [Int: Var]) {
      switch options.objective {
      case .ce, .fewShot:
        let (logits, leaves) = try forward(tape, .features(batch.features))
        return (tape.crossEntropy(withinTask(tape, logits, batch, classes: classes), labels: batch.labels), leaves)
      case .negate:
        let (logits, leaves) = try forward(tape, .features(batch.features))
        let scoped = withinTask(tape, logits, batch, classes: classes)
        let tasks = batch.tasks ?? Array(repeating: 0, count: batch.count)
        let target = batch.labels.indices.map { options.negateTasks.contains(tasks[$0]) ? batch.labels[$0] : -1 }
        let control = batch.labels.indices.map { options.negateTasks.contains(tasks[$0]) ? -1 : batch.labels[$0] }
        return (
          tape.add(
            tape.scale(tape.crossEntropy(scoped, labels: target), -1), tape.crossEntropy(scoped, labels: control)),
          leaves
        )
      case .entropy:
        let (logits, leaves) = try forward(tape, .features(batch.features))
        return (tape.entropy(logits), leaves)
      case .ufm:
        let weakTape = Tape<Float>()
        let weak = softmax(
          weakTape.value(try forward(weakTape, .features(batch.features), differentiable: false).logits))
        var targets = Matrix<Float>(zeros: weak.rows, weak.columns)
        var weights = [Float](repeating: 0, count: weak.rows)
        for r in 0..<weak.rows {
          if let label = trusted[rows[r]] {
            targets[r, label] = 1
            weights[r] = 1
          } else {
            let top = (0..<weak.columns).map { weak[r, $0] }.max() ?? 0
            for c in 0..<weak.columns { targets[r, c] = weak[r, c] }
            weights[r] = top > 0.99 ? 1 : 0
          }
        }
        let (strong, leaves) = try forward(
          tape, .features(augmented(batch.features, rows: rows, epoch: epoch, scale: scale)))
        return (tape.softCrossEntropy(strong, targets: targets, weights: weights), leaves)
      }
    }

    /// The loss and block leaves of one batch of `data`.
    func loss(
      _ tape: Tape<Float>, _ data: TrainingData, rows: [Int], epoch: Int, context: BatchContext
    ) throws -> (Var, [Int: Var]) {
      switch data {
      case .tokens(let sequences): return try loss(tape, tokens: rows.map { sequences[$0] })
      case .labelledTokens(let d): return try loss(tape, labelled: d.rows(rows), classes: context.classes)
      case .features(let d):
        return try loss(
          tape, d.rows(rows), rows: rows, epoch: epoch, classes: context.classes, trusted: context.trusted,
          scale: context.scale)
      }
    }

    /// What feature batches need from the whole data set.
    struct BatchContext {
      var classes: [Int: [Int]] = [:]
      var trusted: [Int: Int] = [:]
      var scale: [Float] = []
    }

    func context(_ data: TrainingData, trusted: [Int: Int]) -> BatchContext {
      switch data {
      case .features(let d):
        return BatchContext(classes: d.classesByTask, trusted: trusted, scale: featureSpread(d.features))
      case .labelledTokens(let d): return BatchContext(classes: d.classesByTask)
      case .tokens: return BatchContext()
      }
    }

    /// A strong view of feature rows: each feature dropped with probability 0.1, plus Gaussian
    /// noise of 0.1 times the feature's spread (`scale`); draws keyed by seed, epoch and row.
    func augmented(_ x: Matrix<Float>, rows: [Int], epoch: Int, scale: [Float]) -> Matrix<Float> {
      var out = x
      let rng = CounterRNG(seed: options.seed, stream: "atlas-ufm-\(epoch)")
      for (r, row) in rows.enumerated() {
        for c in 0..<x.columns {
          let draw = UInt64(row * x.columns + c)
          out[r, c] = rng.uniform(2 * draw) < 0.1 ? 0 : x[r, c] + 0.1 * scale[c] * rng.normal(2 * draw + 1)
        }
      }
      return out
    }

    /// One pass over the data; returns the mean loss.
    mutating func epoch(_ data: TrainingData, epoch: Int, trusted: [Int: Int]) throws -> Double {
      let context = self.context(data, trusted: trusted)
      let batches = miniBatches(count: data.count, size: options.batchSize, shuffleSeed: options.seed &+ UInt64(epoch))
      var total = 0.0
      for (b, rows) in batches.enumerated() {
        if options.cosine {
          let step = Double(epoch * batches.count + b), total = Double(max(1, options.epochs * batches.count))
          optimizer.learningRate = options.learningRate * Float(0.5 * (1 + cos(Double.pi * step / total)))
        }
        let tape = Tape<Float>()
        let (loss, leaves) = try self.loss(tape, data, rows: rows, epoch: epoch, context: context)
        tape.backward(from: loss)
        let gradient = try coefficientGradient(tape, leaves)
        var state = ["lambda": lambda]
        optimizer.step(&state, gradients: ["lambda": gradient])
        lambda = state["lambda"] ?? lambda
        // Coefficients left out by block selection stay exactly 0 (no decay or momentum moves them).
        for n in trainable.indices where !trainable[n] { lambda.values[n] = 0 }
        total += Double(tape.value(loss).values[0])
      }
      return total / Double(max(batches.count, 1))
    }

    /// Keeps the `keep` fraction of (task, block) coefficients with the largest summed gradient
    /// magnitude at `Lambda = 0` over the data.
    mutating func selectBlocks(_ data: TrainingData, keep: Double, trusted: [Int: Int]) throws {
      let context = self.context(data, trusted: trusted)
      var magnitude = [Double](repeating: 0, count: trainable.count)
      for rows in miniBatches(count: data.count, size: options.batchSize, shuffleSeed: nil) {
        let tape = Tape<Float>()
        let (loss, leaves) = try self.loss(tape, data, rows: rows, epoch: 0, context: context)
        tape.backward(from: loss)
        let gradient = try coefficientGradient(tape, leaves)
        for n in magnitude.indices { magnitude[n] += Double(abs(gradient.values[n])) }
      }
      let kept = max(1, Int((Double(trainable.count) * keep).rounded()))
      let order = magnitude.indices.sorted { (magnitude[$0], -$0) > (magnitude[$1], -$1) }
      trainable = Array(repeating: false, count: trainable.count)
      for n in order.prefix(kept) { trainable[n] = true }
    }

    /// Rows the base predicts most confidently for each class, with their predicted label:
    /// `min(N / (10 C), 100)` per class.
    func trustedPseudoLabels(_ data: TrainingData) throws -> [Int: Int] {
      guard case .features(let data) = data else { return [:] }
      let p = softmax(try Training.logits(problem.base, data.features))
      let perClass = max(1, min(data.count / (10 * max(p.columns, 1)), 100))
      var trusted: [Int: Int] = [:]
      for c in 0..<p.columns {
        let rows = (0..<p.rows).sorted { (p[$0, c], -$0) > (p[$1, c], -$1) }.prefix(perClass)
        for r in rows { trusted[r] = Training.argmax(p, r, among: 0..<p.columns) }
      }
      return trusted
    }

    func featureSpread(_ x: Matrix<Float>) -> [Float] {
      (0..<x.columns).map { c in
        let mean = (0..<x.rows).reduce(0.0) { $0 + Double(x[$1, c]) } / Double(max(x.rows, 1))
        return Float(
          ((0..<x.rows).reduce(0.0) { $0 + (Double(x[$1, c]) - mean) * (Double(x[$1, c]) - mean) }
            / Double(max(x.rows, 1))).squareRoot())
      }
    }

    /// The selection metric (higher is better): mean within-task accuracy on feature rows,
    /// minus the mean next-token loss on token sequences; and the target and control tasks'
    /// accuracies (for negation).
    func scores(_ data: TrainingData) throws -> (mean: Double, target: Double, control: Double) {
      let network = try problem.network(coefficients())
      let result: Evaluation
      switch data {
      case .tokens(let sequences): return (-(try Training.perplexity(network, on: sequences).loss), 0, 0)
      case .features(let d):
        if options.selectByLoss { return (-withinTaskLoss(try Training.logits(network, d.features), d), 0, 0) }
        result = try Training.evaluate(network, on: d)
      case .labelledTokens(let d):
        if options.selectByLoss { return (-withinTaskLoss(try Training.logits(network, d.sequences), d), 0, 0) }
        result = try Training.evaluate(network, on: d)
      }
      let mean = result.tasks.reduce(0.0) { $0 + $1.accuracyWithinTask } / Double(max(result.tasks.count, 1))
      func average(_ tasks: [Evaluation.Task]) -> Double {
        tasks.reduce(0.0) { $0 + $1.accuracyWithinTask * Double($1.count) }
          / Double(max(tasks.reduce(0) { $0 + $1.count }, 1))
      }
      let target = result.tasks.filter { options.negateTasks.contains($0.task) }
      let control = result.tasks.filter { !options.negateTasks.contains($0.task) }
      return (mean, average(target), average(control))
    }

    /// Mean cross-entropy of each example within its own task's classes (what `ce` minimises).
    func withinTaskLoss(_ logits: Matrix<Float>, _ data: some Labelled) -> Double {
      let classes = data.classesByTask
      var total = 0.0
      for r in 0..<data.count {
        let own = classes[data.tasks?[r] ?? 0] ?? Array(0..<logits.columns)
        let top = own.map { Double(logits[r, $0]) }.max() ?? 0
        let sum = own.reduce(0.0) { $0 + exp(Double(logits[r, $1]) - top) }
        total += top + log(sum) - Double(logits[r, data.labels[r]])
      }
      return total / Double(max(data.count, 1))
    }

    func coefficients() -> ATLASCoefficients {
      let (t, b, k) = (problem.taskVectors.count, problem.blocks.count, partitions)
      let flat = lambda.values
      let values = (0..<t).map { i in
        (0..<b).map { j in (0..<k).map { Double(flat[index(task: i, block: j, partition: $0)]) } }
      }
      var c = ATLASCoefficients(tasks: problem.names, blocks: problem.blocks, partitions: k)
      c.values = values  // tasks x blocks x partitions by construction
      return c
    }
  }
}
