import Foundation
import Nets
import Tensor

/// aTLAS (Zhang et al., NeurIPS 2024): learns how much of each task vector to add, block by
/// block (one coefficient per task vector and parameter tensor, or per random partition of it),
/// by gradient descent with every model weight frozen:
/// `theta_b = theta0_b + sum_i sum_k lambda[i][b][k] * (mask_k . tau_{i,b})`, so
/// `dL/dlambda[i][b] = <dL/dtheta_b, tau_{i,b}>`. Starts from `Lambda = 0` (the base); AdamW with
/// weight decay pulls coefficients back toward the base.
public enum ATLAS {
  public enum Objective: String, Sendable, CaseIterable {
    /// Cross-entropy on labelled data of one or several tasks, each row scored within its own
    /// task's classes (task addition).
    case ce
    /// Cross-entropy on a few labelled samples of a target task (few-shot recognition), with the
    /// paper's schedule for it.
    case fewShot = "few-shot"
    /// Forgetting: `-CE(target tasks) + CE(control tasks)` (task negation).
    case negate
    /// Unsupervised: mean entropy of the predictions (test-time adaptation).
    case entropy
    /// Unsupervised FixMatch: trusted per-class pseudo-labels and confident weak-view predictions
    /// as targets for strongly augmented views.
    case ufm
  }

  public struct Options: Sendable {
    public var objective: Objective = .ce
    public var epochs = 20
    public var batchSize = 128
    public var learningRate: Float = 1e-3
    /// Cosine decay of the learning rate to 0 over all steps (no warm-up); else constant.
    public var cosine = false
    public var weightDecay: Float = 0.1
    public var clipNorm: Float = 1
    /// Random partitions of every tensor (aTLAS x K); 1: one coefficient per tensor.
    public var partitions = 1
    /// One coefficient per task vector for all blocks (the isotropic variant).
    public var isotropic = false
    /// Train only this fraction of the (task, block) coefficients: those with the largest
    /// gradient magnitude at `Lambda = 0`; the others stay 0.
    public var keepFraction: Double?
    /// Target tasks of `negate` (the other tasks are the control).
    public var negateTasks: Set<Int> = []
    /// Stop when the validation metric has not improved for this many epochs.
    public var patience: Int?
    /// Without validation data: choose the number of epochs on a held-out fifth of the data
    /// (every fifth example), then train on all of it for that many epochs.
    public var earlyStopping = false
    /// Select epochs by the validation loss (within each task's classes) rather than accuracy.
    public var selectByLoss = false
    public var seed: UInt64 = 0
    public init() {}

    /// The paper's defaults for an objective: task addition and negation 20 epochs at a constant
    /// 1e-3; few-shot 10 epochs from 0.1 with cosine decay; test-time adaptation (ufm, entropy)
    /// 10 epochs from 1e-3 with cosine decay. AdamW, weight decay 0.1, clip 1 throughout.
    public init(objective: Objective) {
      self.objective = objective
      switch objective {
      case .ce, .negate: (epochs, learningRate, cosine) = (20, 1e-3, false)
      case .fewShot: (epochs, learningRate, cosine) = (10, 0.1, true)
      case .ufm, .entropy: (epochs, learningRate, cosine) = (10, 1e-3, true)
      }
    }

    /// The defaults for `ce` on `examples` rows (or sequences): the paper's 20 epochs at 1e-3
    /// assume thousands of examples, hundreds of steps; on a small set they leave the
    /// coefficients near 0 (the base), yet a fixed longer schedule overfits some small sets.
    /// When the paper's epochs make fewer than `smallDataSteps` (1000) steps, the rate is 5e-2
    /// without decay and the length is validated: up to 1000 steps (at most 500 epochs),
    /// stopping after 10 epochs or 40 steps (whichever is more) without improvement, the number
    /// of epochs chosen on validation data or, without it, on a held-out fifth of the data
    /// (`earlyStopping`). A fifth of fewer than 40 examples is too few to choose by; then the
    /// schedule is fixed at the paper's epochs or 60 steps, whichever is more. Other
    /// objectives keep their defaults.
    public func adaptedToDataSize(examples: Int) -> Options {
      let batches = max(1, (examples + batchSize - 1) / max(batchSize, 1))
      guard objective == .ce, epochs * batches < ATLAS.smallDataSteps else { return self }
      var o = self
      (o.learningRate, o.cosine) = (5e-2, false)
      guard examples >= 40 else {
        o.epochs = max(epochs, (60 + batches - 1) / batches)
        return o
      }
      o.epochs = min(500, max(epochs, (ATLAS.smallDataSteps + batches - 1) / batches))
      o.earlyStopping = true
      o.patience = max(10, (40 + batches - 1) / batches)
      return o
    }
  }

  /// A data set is small for `ce` when the paper's schedule makes fewer steps than this; the
  /// small-data schedule then runs at most this many (`Options.adaptedToDataSize`).
  public static let smallDataSteps = 1000

  /// One epoch's figures: mean training loss, and the selection metric when there is one.
  public struct EpochReport: Sendable {
    public let epoch: Int
    /// Epochs this stage runs at most.
    public var epochs: Int = 0
    public let loss: Double
    public let metric: Double?
    /// True while the number of epochs is being chosen on a held-out part (`earlyStopping`).
    public var choosing = false
  }

  /// What the coefficients are learned on: labelled feature rows (MLPs; labels unused by the
  /// unsupervised objectives), or token sequences (decoders: next-token cross-entropy, or the
  /// entropy of the next-token distributions).
  public enum TrainingData {
    case features(LabeledFeatures)
    case tokens([[Int]])
    /// Labelled token sequences, for a BERT classifier (`BertForSequenceClassification`).
    case labelledTokens(LabeledTokens)

    /// Rows or sequences.
    public var count: Int {
      switch self {
      case .features(let d): return d.count
      case .tokens(let t): return t.count
      case .labelledTokens(let d): return d.count
      }
    }

    func rows(_ indices: [Int]) -> TrainingData {
      switch self {
      case .features(let d): return .features(d.rows(indices))
      case .tokens(let t): return .tokens(indices.map { t[$0] })
      case .labelledTokens(let d): return .labelledTokens(d.rows(indices))
      }
    }

    /// The labels and tasks, when the examples are labelled.
    var labelled: (any Labelled)? {
      switch self {
      case .features(let d): return d
      case .labelledTokens(let d): return d
      case .tokens: return nil
      }
    }
  }

  /// A base network, its task vectors and the blocks they are learned on. The task vectors are
  /// read block by block from their source whenever a step needs them (twice per step: to form
  /// the weights, and for the coefficients' gradients), so a mapped source keeps them on disk.
  public struct Problem {
    public let base: Network<Float>
    public let names: [String]
    public let taskVectors: any TaskVectorSource
    public let blocks: [String]

    /// Blocks are the base's weights in architecture order that every task vector holds, minus
    /// those matching `exclude`. Throws when a task vector's tensor does not fit the base.
    public init(base: Network<Float>, taskVectors: any TaskVectorSource, names: [String], exclude: String? = nil) throws
    {
      guard base.lowRank.isEmpty else { throw MergeError.factoredBase }
      let pattern = try exclude.map { try Regex($0) }
      var blocks: [String] = []
      let prefix = base.tensorPrefix
      for (name, shape) in Network<Float>.expectedShapes(base.config, prefix: prefix) {
        if let pattern, name.contains(pattern) { continue }
        guard (0..<taskVectors.count).allSatisfy({ taskVectors.shape(of: name, in: $0) != nil }) else { continue }
        for i in 0..<taskVectors.count {
          let found = taskVectors.shape(of: name, in: i) ?? []
          guard found == shape else {
            throw MergeError.taskVectorMismatch(
              taskVector: i, tensor: name, reason: "shape \(found), the base has \(shape)")
          }
        }
        blocks.append(name)
      }
      guard !blocks.isEmpty else { throw MergeError.noBlocks }
      self.base = base
      self.names = names
      self.taskVectors = taskVectors
      self.blocks = blocks
    }

    /// Task vectors held in memory, by tensor name.
    public init(base: Network<Float>, taskVectors: [[String: Tensor]], names: [String], exclude: String? = nil) throws {
      try self.init(base: base, taskVectors: TaskVectorTensors(taskVectors), names: names, exclude: exclude)
    }

    /// `theta(Lambda)` as a runnable network, computed by `ATLASApply` (what `atlas apply`
    /// writes for the same coefficients, bit for bit).
    public func network(_ c: ATLASCoefficients) throws -> Network<Float> {
      var out = base
      let apply = ATLASApply(c)
      let parameters = try ParameterResolver(
        method: apply.name, specs: [], global: [:], models: (0..<taskVectors.count).map { _ in [:] },
        positions: LayerPositions(names: c.blocks)
      ).resolve(tensor: c.blocks.first ?? "")
      for block in c.blocks {
        guard let w = out.weights[block] else { continue }
        let inputs = MergeInputs(
          name: block, base: w.tensor(),
          models: try (0..<taskVectors.count).map { try taskVectors.values(of: block, in: $0).tensor() })
        out.weights[block] = Matrix(try apply.merge(inputs, parameters))
      }
      return out
    }
  }

  /// Learns the coefficients on `data` (labelled for `ce` and `negate`; labels unused by
  /// `entropy` and `ufm`). With `validation` (labelled), keeps the epoch whose coefficients do
  /// best on it (`negate`: the lowest target accuracy whose control accuracy stays at 95% of the
  /// base's); else the last epoch.
  public static func learn(
    _ problem: Problem, data: LabeledFeatures, validation: LabeledFeatures? = nil, options: Options,
    progress: ((EpochReport) -> Void)? = nil
  ) throws -> (coefficients: ATLASCoefficients, epochs: [EpochReport]) {
    try learn(
      problem, on: .features(data), validation: validation.map { .features($0) }, options: options, progress: progress)
  }

  /// Learns the coefficients on feature rows or token sequences (see `TrainingData`). With
  /// token sequences the objective is `ce` (next-token cross-entropy) or `entropy`, and
  /// validation keeps the epoch with the lowest next-token loss.
  public static func learn(
    _ problem: Problem, on data: TrainingData, validation: TrainingData? = nil, options: Options,
    progress: ((EpochReport) -> Void)? = nil
  ) throws -> (coefficients: ATLASCoefficients, epochs: [EpochReport]) {
    switch (problem.base.config, data) {
    case (.mlp, .features): break
    case (.bert(let c), .labelledTokens) where c.classifierLabels != nil:
      guard options.objective != .ufm else {
        throw MergeError.invalidParameter(
          method: "atlas", name: "objective", tensor: nil,
          reason: "ufm augments feature rows; a BERT classifier learns with ce, few-shot, negate or entropy")
      }
    case (.decoder, .tokens):
      guard [.ce, .fewShot, .entropy].contains(options.objective) else {
        throw MergeError.invalidParameter(
          method: "atlas", name: "objective", tensor: nil,
          reason:
            "\(options.objective.rawValue) needs labelled feature rows with tasks; a decoder learns with ce "
            + "(next-token cross-entropy) or entropy")
      }
    default:
      throw MergeError.invalidParameter(
        method: "atlas", name: "data", tensor: nil,
        reason:
          "aTLAS learns an MLP's coefficients on feature rows, a decoder's on token sequences and a BERT "
          + "classifier's on labelled token sequences")
    }
    if options.objective == .negate, let data = data.labelled {
      guard !options.negateTasks.isEmpty, Set(data.taskIDs).subtracting(options.negateTasks).count > 0 else {
        throw MergeError.invalidParameter(
          method: "atlas", name: "negate_tasks", tensor: nil,
          reason: "\(options.negateTasks.sorted()) leaves no target or no control task in the data: negate needs both")
      }
    }
    if let keep = options.keepFraction, !(keep > 0 && keep <= 1) {
      throw MergeError.invalidParameter(
        method: "atlas", name: "keep", tensor: nil, reason: "\(keep) is not a fraction in (0, 1]")
    }
    guard options.epochs >= 1 else {
      throw MergeError.invalidParameter(
        method: "atlas", name: "epochs", tensor: nil, reason: "\(options.epochs) is not at least 1")
    }
    guard options.batchSize >= 1 else {
      throw MergeError.invalidParameter(
        method: "atlas", name: "batch_size", tensor: nil, reason: "\(options.batchSize) is not at least 1")
    }
    if options.earlyStopping, validation == nil, data.count >= 40 {
      // Choose the epochs on a held-out fifth, then train on everything for that many.
      let held = (0..<data.count).filter { $0 % 5 == 4 }
      let kept = (0..<data.count).filter { $0 % 5 != 4 }
      var search = options
      search.earlyStopping = false
      search.selectByLoss = true  // a continuous signal: a fifth of a small set ties on accuracy
      let trial = try learn(problem, on: data.rows(kept), validation: data.rows(held), options: search) { report in
        var report = report
        report.choosing = true
        progress?(report)
      }
      // The last of equally good epochs (accuracy plateaus: later is no worse, and trained more).
      let metrics = trial.epochs.map { $0.metric ?? -.infinity }
      let top = metrics.max() ?? -.infinity
      search.epochs = (metrics.lastIndex(of: top) ?? 0) + 1
      (search.patience, search.selectByLoss) = (nil, false)
      return try learn(problem, on: data, options: search, progress: progress)
    }
    var data = data
    if options.objective == .fewShot, data.count < 10 * options.batchSize {
      // As the paper does: a small set is repeated so that an epoch has at least 10 batches.
      let copies = (10 * options.batchSize + data.count - 1) / max(data.count, 1)
      data = data.rows(Array((0..<copies).flatMap { _ in 0..<data.count }))
    }
    var learner = Learner(problem: problem, options: options)
    let trusted = options.objective == .ufm ? try learner.trustedPseudoLabels(data) : [:]
    if let fraction = options.keepFraction { try learner.selectBlocks(data, keep: fraction, trusted: trusted) }
    let check = validation ?? (options.objective == .negate ? data : nil)
    let baseline = try check.map { try learner.scores($0) }
    var best: (coefficients: ATLASCoefficients, metric: Double)?
    // Negation falls back to the base (Lambda = 0) when no epoch keeps the control task's accuracy.
    if options.objective == .negate, let baseline { best = (learner.coefficients(), -baseline.target) }
    var reports: [EpochReport] = []
    var bestEpoch = -1
    for epoch in 0..<options.epochs {
      let loss = try learner.epoch(data, epoch: epoch, trusted: trusted)
      var metric: Double?
      if let check, let baseline {
        let s = try learner.scores(check)
        if options.objective == .negate {
          if s.control < 0.95 * baseline.control { break }
          metric = -s.target
        } else {
          metric = s.mean
        }
        if let metric, metric > best?.metric ?? -Double.infinity || best == nil {
          best = (learner.coefficients(), metric)
          bestEpoch = epoch
        }
      }
      let report = EpochReport(epoch: epoch + 1, epochs: options.epochs, loss: loss, metric: metric)
      reports.append(report)
      progress?(report)
      if let patience = options.patience, check != nil, epoch - bestEpoch >= patience { break }
    }
    return (best?.coefficients ?? learner.coefficients(), reports)
  }
}
