import Foundation
import Nets
import Tensor

extension ATLAS {
  /// The training state: the coefficients as one flat row (trained by AdamW), which of them
  /// train, and the task vectors cut into partitions.
  struct Learner {
    let problem: Problem
    let options: Options
    let partitions: Int
    /// `pieces[i][b][k]`: task vector i's block b restricted to partition k.
    let pieces: [[[Matrix<Float>]]]
    /// The coefficients as one row, flat index `index(task:block:partition:)`.
    var lambda: Matrix<Float>
    var trainable: [Bool]
    var optimizer: Optimizer<Float>

    init(problem: Problem, options: Options) {
      self.problem = problem
      self.options = options
      partitions = options.isotropic ? 1 : max(1, options.partitions)
      let k = partitions
      pieces = problem.taskVectors.map { tv in
        problem.blocks.map { block in
          guard let whole = tv[block] else { preconditionFailure("Problem keeps only blocks every task vector has") }
          guard k > 1 else { return [whole] }
          return (0..<k).map { part in
            var piece = whole
            for e in piece.values.indices
            where ATLASCoefficients.partition(of: e, count: whole.count, partitions: k) != part { piece.values[e] = 0 }
            return piece
          }
        }
      }
      let count = options.isotropic ? problem.taskVectors.count : problem.taskVectors.count * problem.blocks.count * k
      lambda = Matrix(zeros: 1, count)
      trainable = Array(repeating: true, count: count)
      optimizer = Optimizer(
        .adam, learningRate: options.learningRate, weightDecay: options.weightDecay, clipNorm: options.clipNorm)
    }

    func index(task i: Int, block b: Int, partition k: Int) -> Int {
      options.isotropic ? i : (i * problem.blocks.count + b) * partitions + k
    }

    /// The forward pass with `theta_b = theta0_b + sum lambda tau`; trainable coefficients are
    /// tape parameters (returned by flat index) when `differentiable`.
    func forward(_ tape: Tape<Float>, _ x: Matrix<Float>, differentiable: Bool = true) throws -> (
      logits: Var, lambdas: [Int: Var]
    ) {
      var lambdas: [Int: Var] = [:]
      func coefficient(_ n: Int) -> Var {
        if let v = lambdas[n] { return v }
        let value = Matrix(rows: 1, columns: 1, values: [lambda.values[n]])
        let v = differentiable && trainable[n] ? tape.parameter(value) : tape.constant(value)
        lambdas[n] = v
        return v
      }
      let blockIndex = Dictionary(uniqueKeysWithValues: problem.blocks.enumerated().map { ($1, $0) })
      let out = try problem.base.forward(tape, .features(x)) { name, value in
        var theta = tape.constant(value)
        guard let b = blockIndex[name] else { return theta }
        for i in pieces.indices {
          for k in 0..<partitions where differentiable || lambda.values[index(task: i, block: b, partition: k)] != 0 {
            theta = tape.add(
              theta, tape.scale(tape.constant(pieces[i][b][k]), by: coefficient(index(task: i, block: b, partition: k)))
            )
          }
        }
        return theta
      }
      return (out.output, lambdas.filter { trainable[$0.key] && differentiable })
    }

    /// Logits with every row's classes outside its task pushed to -1e4 (its own head's view).
    func withinTask(_ tape: Tape<Float>, _ logits: Var, _ batch: LabeledFeatures, classes: [Int: [Int]]) -> Var {
      guard let tasks = batch.tasks, classes.count > 1 else { return logits }
      let z = tape.value(logits)
      var mask = Matrix<Float>(rows: z.rows, columns: z.columns, values: Array(repeating: -1e4, count: z.count))
      for r in 0..<z.rows { for c in classes[tasks[r]] ?? [] { mask[r, c] = 0 } }
      return tape.add(logits, tape.constant(mask))
    }

    /// The objective on one batch.
    func loss(
      _ tape: Tape<Float>, _ batch: LabeledFeatures, rows: [Int], epoch: Int, classes: [Int: [Int]],
      trusted: [Int: Int], scale: [Float]
    ) throws -> (Var, [Int: Var]) {
      switch options.objective {
      case .ce, .fewShot:
        let (logits, lambdas) = try forward(tape, batch.features)
        return (tape.crossEntropy(withinTask(tape, logits, batch, classes: classes), labels: batch.labels), lambdas)
      case .negate:
        let (logits, lambdas) = try forward(tape, batch.features)
        let scoped = withinTask(tape, logits, batch, classes: classes)
        let tasks = batch.tasks ?? Array(repeating: 0, count: batch.count)
        let target = batch.labels.indices.map { options.negateTasks.contains(tasks[$0]) ? batch.labels[$0] : -1 }
        let control = batch.labels.indices.map { options.negateTasks.contains(tasks[$0]) ? -1 : batch.labels[$0] }
        return (
          tape.add(
            tape.scale(tape.crossEntropy(scoped, labels: target), -1), tape.crossEntropy(scoped, labels: control)),
          lambdas
        )
      case .entropy:
        let (logits, lambdas) = try forward(tape, batch.features)
        return (tape.entropy(logits), lambdas)
      case .ufm:
        let weakTape = Tape<Float>()
        let weak = softmax(weakTape.value(try forward(weakTape, batch.features, differentiable: false).logits))
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
        let (strong, lambdas) = try forward(tape, augmented(batch.features, rows: rows, epoch: epoch, scale: scale))
        return (tape.softCrossEntropy(strong, targets: targets, weights: weights), lambdas)
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
    mutating func epoch(_ data: LabeledFeatures, epoch: Int, trusted: [Int: Int]) throws -> Double {
      let classes = data.classesByTask
      let scale = featureSpread(data.features)
      let batches = miniBatches(count: data.count, size: options.batchSize, shuffleSeed: options.seed &+ UInt64(epoch))
      var total = 0.0
      for (b, rows) in batches.enumerated() {
        if options.cosine {
          let step = Double(epoch * batches.count + b), total = Double(max(1, options.epochs * batches.count))
          optimizer.learningRate = options.learningRate * Float(0.5 * (1 + cos(Double.pi * step / total)))
        }
        let tape = Tape<Float>()
        let (loss, lambdas) = try self.loss(
          tape, data.rows(rows), rows: rows, epoch: epoch, classes: classes, trusted: trusted, scale: scale)
        tape.backward(from: loss)
        var gradient = Matrix<Float>(zeros: 1, lambda.count)
        for (n, v) in lambdas { gradient.values[n] = tape.gradient(v)?.values[0] ?? 0 }
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
    mutating func selectBlocks(_ data: LabeledFeatures, keep: Double, trusted: [Int: Int]) throws {
      let classes = data.classesByTask
      let scale = featureSpread(data.features)
      var magnitude = [Double](repeating: 0, count: trainable.count)
      for rows in miniBatches(count: data.count, size: options.batchSize, shuffleSeed: nil) {
        let tape = Tape<Float>()
        let (loss, lambdas) = try self.loss(
          tape, data.rows(rows), rows: rows, epoch: 0, classes: classes, trusted: trusted, scale: scale)
        tape.backward(from: loss)
        for (n, v) in lambdas { magnitude[n] += Double(abs(tape.gradient(v)?.values[0] ?? 0)) }
      }
      let kept = max(1, Int((Double(trainable.count) * keep).rounded()))
      let order = magnitude.indices.sorted { (magnitude[$0], -$0) > (magnitude[$1], -$1) }
      trainable = Array(repeating: false, count: trainable.count)
      for n in order.prefix(kept) { trainable[n] = true }
    }

    /// Rows the base predicts most confidently for each class, with their predicted label:
    /// `min(N / (10 C), 100)` per class.
    func trustedPseudoLabels(_ data: LabeledFeatures) throws -> [Int: Int] {
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

    /// Mean within-task accuracy, and the target and control tasks' (for negation).
    func scores(_ data: LabeledFeatures) throws -> (mean: Double, target: Double, control: Double) {
      let result = try Training.evaluate(problem.network(coefficients()), on: data)
      let mean = result.tasks.reduce(0.0) { $0 + $1.accuracyWithinTask } / Double(max(result.tasks.count, 1))
      func average(_ tasks: [Evaluation.Task]) -> Double {
        tasks.reduce(0.0) { $0 + $1.accuracyWithinTask * Double($1.count) }
          / Double(max(tasks.reduce(0) { $0 + $1.count }, 1))
      }
      let target = result.tasks.filter { options.negateTasks.contains($0.task) }
      let control = result.tasks.filter { !options.negateTasks.contains($0.task) }
      return (mean, average(target), average(control))
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
