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
  }

  /// One epoch's figures: mean training loss, and the selection metric when there is one.
  public struct EpochReport: Sendable {
    public let epoch: Int
    public let loss: Double
    public let metric: Double?
  }

  /// A base network, its task vectors and the blocks they are learned on.
  public struct Problem {
    public let base: Network<Float>
    public let names: [String]
    /// Per task vector, the values of every block, shaped like the base's weights.
    public let taskVectors: [[String: Matrix<Float>]]
    public let blocks: [String]

    /// Blocks are the base's weights in architecture order that every task vector holds, minus
    /// those matching `exclude`. Throws when a task vector's tensor does not fit the base.
    public init(base: Network<Float>, taskVectors: [[String: Tensor]], names: [String], exclude: String? = nil) throws {
      guard base.lowRank.isEmpty else { throw MergeError.factoredBase }
      let pattern = try exclude.map { try Regex($0) }
      var blocks: [String] = []
      var vectors = [[String: Matrix<Float>]](repeating: [:], count: taskVectors.count)
      for (name, shape) in Network<Float>.expectedShapes(base.config) {
        if let pattern, name.contains(pattern) { continue }
        guard taskVectors.allSatisfy({ $0[name] != nil }) else { continue }
        for (i, tv) in taskVectors.enumerated() {
          let vector = try tv.required(name)
          guard vector.shape == shape else {
            throw MergeError.taskVectorMismatch(
              taskVector: i, tensor: name, reason: "shape \(vector.shape), the base has \(shape)")
          }
          vectors[i][name] = Matrix(vector)
        }
        blocks.append(name)
      }
      guard !blocks.isEmpty else { throw MergeError.noBlocks }
      self.base = base
      self.names = names
      self.taskVectors = vectors
      self.blocks = blocks
    }

    /// `theta(Lambda)` as a runnable network, computed by `ATLASApply` (what `atlas apply`
    /// writes for the same coefficients, bit for bit).
    public func network(_ c: ATLASCoefficients) throws -> Network<Float> {
      var out = base
      let apply = ATLASApply(c)
      let parameters = try ParameterResolver(
        method: apply.name, specs: [], global: [:], models: taskVectors.map { _ in [:] },
        positions: LayerPositions(names: c.blocks)
      ).resolve(tensor: c.blocks.first ?? "")
      for block in c.blocks {
        guard let w = out.weights[block] else { continue }
        let inputs = MergeInputs(
          name: block, base: w.tensor(), models: try taskVectors.map { try $0.required(block).tensor() })
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
    if options.objective == .negate {
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
        }
      }
      let report = EpochReport(epoch: epoch + 1, loss: loss, metric: metric)
      reports.append(report)
      progress?(report)
    }
    return (best?.coefficients ?? learner.coefficients(), reports)
  }
}
