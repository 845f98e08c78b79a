import Foundation
import Tensor

/// Class labels of a data set's examples (feature rows or token sequences), optionally tagged
/// with the task each belongs to (several tasks over one input space).
public protocol Labelled {
  var labels: [Int] { get }
  var tasks: [Int]? { get }
}

extension Labelled {
  public var count: Int { labels.count }
  public var classCount: Int { (labels.max() ?? -1) + 1 }
  /// The distinct task ids, in order (one task, 0, when untagged).
  public var taskIDs: [Int] { Array(Set(tasks ?? [0])).sorted() }

  /// The classes that occur in each task's examples.
  public var classesByTask: [Int: [Int]] {
    var classes: [Int: Set<Int>] = [:]
    for i in labels.indices { classes[tasks?[i] ?? 0, default: []].insert(labels[i]) }
    return classes.mapValues { $0.sorted() }
  }

  /// Checks that `count` examples have as many labels and task ids, and no negative label.
  static func checkLabels(_ labels: [Int], _ tasks: [Int]?, examples: Int, what: String, source: String) throws {
    guard labels.count == examples else {
      throw NetsError.invalidData(file: source, reason: "\(examples) \(what) but \(labels.count) labels")
    }
    if let tasks, tasks.count != labels.count {
      throw NetsError.invalidData(file: source, reason: "\(labels.count) labels but \(tasks.count) task ids")
    }
    if let bad = labels.first(where: { $0 < 0 }) {
      throw NetsError.invalidData(file: source, reason: "negative label \(bad)")
    }
  }
}

/// Token sequences with a class label each (sequence classification), optionally tagged with
/// their task.
public struct LabeledTokens: Labelled, Sendable, Equatable {
  public var sequences: [[Int]]
  public var labels: [Int]
  public var tasks: [Int]?

  /// Throws `NetsError.invalidData` when the counts disagree or a label is negative.
  public init(sequences: [[Int]], labels: [Int], tasks: [Int]? = nil, source: String = "data") throws {
    try Self.checkLabels(labels, tasks, examples: sequences.count, what: "sequences", source: source)
    (self.sequences, self.labels, self.tasks) = (sequences, labels, tasks)
  }

  private init(checked sequences: [[Int]], _ labels: [Int], _ tasks: [Int]?) {
    (self.sequences, self.labels, self.tasks) = (sequences, labels, tasks)
  }

  /// The sequences at `indices`, in that order.
  public func rows(_ indices: [Int]) -> LabeledTokens {
    LabeledTokens(
      checked: indices.map { sequences[$0] }, indices.map { labels[$0] }, tasks.map { t in indices.map { t[$0] } })
  }
}

/// Dense feature rows with integer class labels, optionally tagged with the task each row
/// belongs to (several tasks over one input space).
public struct LabeledFeatures: Labelled, Sendable, Equatable {
  public var features: Matrix<Float>
  public var labels: [Int]
  public var tasks: [Int]?

  /// Throws `NetsError.invalidData` when the counts disagree or a label is negative.
  public init(features: Matrix<Float>, labels: [Int], tasks: [Int]? = nil, source: String = "data") throws {
    try Self.checkLabels(labels, tasks, examples: features.rows, what: "feature rows", source: source)
    self.init(checked: features, labels, tasks)
  }

  /// Rows already known to agree (a subset of checked data).
  private init(checked features: Matrix<Float>, _ labels: [Int], _ tasks: [Int]?) {
    self.features = features
    self.labels = labels
    self.tasks = tasks
  }

  /// The rows at `indices`, in that order.
  public func rows(_ indices: [Int]) -> LabeledFeatures {
    LabeledFeatures(
      checked: features.rows(indices), indices.map { labels[$0] }, tasks.map { t in indices.map { t[$0] } })
  }

  /// The rows of the given tasks.
  public func tasks(_ selected: Set<Int>) -> LabeledFeatures {
    rows(labels.indices.filter { selected.contains(tasks?[$0] ?? 0) })
  }

}

/// Mini-batches of `0..<count`: shuffled by `seed` (a counter-based generator, so the order is
/// the same on every machine) or in order.
public func miniBatches(count: Int, size: Int, shuffleSeed: UInt64?) -> [[Int]] {
  var order = Array(0..<count)
  if let seed = shuffleSeed {
    let rng = CounterRNG(seed: seed, stream: "minibatches")
    for i in stride(from: count - 1, to: 0, by: -1) {
      let j = Int(rng.bits(UInt64(i)) % UInt64(i + 1))
      order.swapAt(i, j)
    }
  }
  return stride(from: 0, to: count, by: max(size, 1)).map { Array(order[$0..<min(count, $0 + size)]) }
}

/// Small synthetic classification tasks over one input space, so that examples and tests need
/// no download: every class is a Gaussian cluster around a random centre, seen through a fixed
/// random non-linear map (so a linear model is not enough). Task `t` owns classes
/// `t * (k - shared) ..< t * (k - shared) + k` for `k` classes per task: disjoint label sets
/// when `shared` is 0, overlapping ones otherwise. Centres and map depend only on `seed`;
/// samples on `seed` and `split`, so train and test sets are different draws of the same tasks.
public enum SyntheticTasks {
  public struct Options: Sendable {
    public var tasks = 2
    public var classesPerTask = 5
    public var sharedClasses = 0
    public var features = 16
    public var samplesPerClass = 100
    /// Noise around each centre, relative to the spread of the centres.
    public var noise = 1.0
    public var seed: UInt64 = 0
    public init() {}
  }

  public static func make(_ o: Options, split: String) throws -> LabeledFeatures {
    guard o.tasks >= 1, o.classesPerTask >= 2, o.sharedClasses >= 0, o.sharedClasses < o.classesPerTask,
      o.features >= 2, o.samplesPerClass >= 1
    else {
      throw NetsError.invalidData(
        file: "synthetic",
        reason: "needs tasks >= 1, classes per task >= 2, 0 <= shared < classes per task, features >= 2, samples >= 1")
    }
    let stride = o.classesPerTask - o.sharedClasses
    let classCount = (o.tasks - 1) * stride + o.classesPerTask
    let centres = CounterRNG(seed: o.seed, stream: "synthetic-centres").normalTensor([classCount, o.features]).scalars
    let mixing = CounterRNG(seed: o.seed, stream: "synthetic-map").normalTensor(
      [o.features, o.features], scale: 1 / Float(o.features).squareRoot()
    ).scalars
    let noise = CounterRNG(seed: o.seed, stream: "synthetic-noise-" + split)
    var values: [Float] = []
    var labels: [Int] = []
    var tasks: [Int] = []
    var draw: UInt64 = 0
    for t in 0..<o.tasks {
      for c in (t * stride)..<(t * stride + o.classesPerTask) {
        // A shared class belongs to the lower task; the higher one sees it too but does not repeat its samples.
        if t > 0 && c < (t - 1) * stride + o.classesPerTask { continue }
        for _ in 0..<o.samplesPerClass {
          let point = (0..<o.features).map { f -> Float in
            defer { draw += 1 }
            return centres[c * o.features + f] + Float(o.noise) * noise.normal(draw)
          }
          // x -> point + tanh(M point): a fixed smooth warp of the input space.
          values += (0..<o.features).map { f in
            point[f]
              + Foundation.tanh((0..<o.features).reduce(Float(0)) { $0 + mixing[f * o.features + $1] * point[$1] } * 2)
          }
          labels.append(c)
          tasks.append(t)
        }
      }
    }
    return try LabeledFeatures(
      features: Matrix(rows: labels.count, columns: o.features, values: values), labels: labels, tasks: tasks,
      source: "synthetic")
  }
}

/// Token sequences with learnable structure, so language-model examples and tests need no
/// download: each sequence walks the vocabulary with its own start and stride
/// (`(start + i * stride) % vocabulary`), and each token is replaced by a random one with
/// probability `noise`. The same seed with another split gives fresh sequences.
public enum SyntheticTokens {
  public struct Options: Sendable {
    public var sequences = 64
    public var length = 32
    public var vocabulary = 2048
    public var noise = 0.2
    public var seed: UInt64 = 0
    public init() {}
  }

  public static func make(_ o: Options, split: String) throws -> [[Int]] {
    try walks(o, split: split).map(\.tokens)
  }

  /// Strides a walk may take (1 ... this).
  public static func strideCount(_ o: Options) -> Int { max(1, min(7, o.vocabulary - 1)) }

  /// The sequences with the stride each walks by (1 ... `strideCount`): a label a sequence
  /// classifier can learn from the tokens.
  public static func walks(_ o: Options, split: String) throws -> [(tokens: [Int], stride: Int)] {
    guard o.sequences >= 1, o.length >= 2, o.vocabulary >= 2, (0...1).contains(o.noise) else {
      throw NetsError.invalidData(
        file: "synthetic", reason: "needs sequences >= 1, length >= 2, vocabulary >= 2 and noise in [0, 1]")
    }
    let rng = CounterRNG(seed: o.seed, stream: "synthetic-tokens-" + split)
    let strides = strideCount(o)
    return (0..<o.sequences).map { s in
      let base = UInt64(s) << 32
      let start = Int(rng.bits(base) % UInt64(o.vocabulary))
      let stride = 1 + Int(rng.bits(base + 1) % UInt64(strides))
      let tokens = (0..<o.length).map { i in
        rng.uniform(base + 2 + UInt64(2 * i)) < Float(o.noise)
          ? Int(rng.bits(base + 3 + UInt64(2 * i)) % UInt64(o.vocabulary)) : (start + i * stride) % o.vocabulary
      }
      return (tokens, stride)
    }
  }
}
