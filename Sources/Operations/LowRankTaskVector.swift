import Checkpoint
import Foundation
import Merge
import Nets
import Tensor

/// A task vector whose matrices are kept as their leading singular triplets (TSV-C, the
/// compression of Task Singular Vectors), in the layout of `LowRankLayout`. Every other tensor
/// (1-D, and matrices that factoring would not make smaller) is stored dense in f32. Each matrix
/// is factorised on its own (the exact SVD below 256 on its smaller side, else the Gram matrix
/// of that side in Double), so memory stays at one matrix.
public enum LowRankTaskVector {
  /// How many triplets a matrix keeps.
  public enum Rule: Sendable, Equatable {
    /// The rank at which the factors take this fraction of the dense matrix's size,
    /// `k = floor(f m n / (m + n + 1))` (at least 1): for a square matrix, about `f / 2` of its
    /// rank. At 0.1 the file is about a tenth of the dense f32 task vector.
    case sizeFraction(Double)
    /// The fewest triplets that keep this fraction of the matrix's energy (squared Frobenius norm).
    case energy(Double)
  }

  /// The rule a task-vector step's parameters ask for (`rank_fraction` or `energy`), or nil for
  /// a dense task vector. Throws `OperationError.inputs` when both are given; their ranges are
  /// checked with the other parameters (`TaskVectors.Difference.parameters`).
  public static func rule(_ global: [String: ParameterValue]) throws -> Rule? {
    func number(_ name: String) -> Double? {
      if case .number(let x)? = global[name] { return x }
      return nil
    }
    switch (number("rank_fraction"), number("energy")) {
    case (nil, nil): return nil
    case (let f?, nil): return .sizeFraction(f)
    case (nil, let e?): return .energy(e)
    default:
      throw OperationError.inputs(
        operation: "task-vector", reason: "give one of rank_fraction and energy (--rank-fraction, --energy), not both")
    }
  }

  /// What happened to one tensor.
  public struct Entry: Sendable {
    public let name: String
    public let shape: [Int]
    /// The kept rank, or nil when the tensor is stored dense.
    public let rank: Int?
    public let storedBytes: Int
    public let denseBytes: Int
    /// The fraction of the matrix's energy the kept triplets hold (1 for dense tensors).
    public let keptEnergy: Double
  }

  /// Writes `finetuned - base` to `destination`, its matrices factored by `rule`. Throws the
  /// plan's errors (missing tensors, shape mismatches) before writing anything.
  public static func write(
    finetuned: any Checkpoint, base: any Checkpoint, rule: Rule, to destination: String, options: WriteOptions,
    progress: ((Int, Int) -> Void)? = nil
  ) throws -> [Entry] {
    let plan = try MergePlan(
      method: TaskVectors.Difference(), base: base, models: [finetuned], global: [:], perModel: [[:]],
      outputType: .f32)
    let finetuned = plan.models[0]  // a task vector given as the fine-tune stands for base + tau
    // Pass 1: each matrix's rank (from its spectrum under the energy rule).
    var ranks: [Int?] = []
    for item in plan.items {
      guard item.action == .merge, item.shape.count == 2, min(item.shape[0], item.shape[1]) > 1 else {
        ranks.append(nil)
        continue
      }
      let (m, n) = (item.shape[0], item.shape[1])
      let k: Int
      switch rule {
      case .sizeFraction(let f): k = max(1, Int((f * Double(m * n) / Double(m + n + 1)).rounded(.down)))
      case .energy(let e): k = try rank(keeping: e, of: try difference(item.name, finetuned, base))
      }
      ranks.append(k * (m + n + 1) < m * n ? min(k, m, n) : nil)
    }
    var declared: [TensorInfo] = []
    var factoredShapes: [(name: String, shape: [Int])] = []
    for (item, rank) in zip(plan.items, ranks) {
      if let k = rank {
        let names = LowRankLayout.factorNames(of: item.name)
        declared += [
          TensorInfo(name: names.u, dtype: .f32, shape: [item.shape[0], k]),
          TensorInfo(name: names.s, dtype: .f32, shape: [k]),
          TensorInfo(name: names.vt, dtype: .f32, shape: [k, item.shape[1]]),
        ]
        factoredShapes.append((item.name, item.shape))
      } else {
        declared.append(TensorInfo(name: item.name, dtype: item.outputType, shape: item.shape))
      }
    }
    var options = options
    options.metadata[LowRankLayout.metadataKey] = LowRankLayout.metadataValue(factoredShapes)
    if options.metadata["format"] == nil { options.metadata["format"] = "pt" }
    let writer = try CheckpointWriter(destination: destination, tensors: declared, options: options)
    var entries: [Entry] = []
    var done = 0
    do {
      for (item, rank) in zip(plan.items, ranks) {
        let denseBytes = item.count * 4
        if let k = rank {
          let d = try difference(item.name, finetuned, base)
          let factors = try SingularFactors(truncating: d, rank: k)
          let names = LowRankLayout.factorNames(of: item.name)
          try writer.write(names.u, factors.u, as: .f32)
          try writer.write(names.s, Tensor(shape: [k], scalars: factors.s), as: .f32)
          try writer.write(names.vt, factors.vt, as: .f32)
          let total = d.values.reduce(0) { $0 + $1 * $1 }
          let kept = factors.s.reduce(0.0) { $0 + Double($1) * Double($1) }
          entries.append(
            Entry(
              name: item.name, shape: item.shape, rank: k, storedBytes: k * (item.shape[0] + item.shape[1] + 1) * 4,
              denseBytes: denseBytes, keptEnergy: total > 0 ? min(1, kept / total) : 1))
        } else {
          switch item.action {
          case .copy(let index):
            try writer.write(item.name, try (index == 0 ? base : finetuned).read(item.name))
          case .merge:
            let d = try finetuned.tensor(named: item.name)
            let b = try base.tensor(named: item.name)
            try writer.write(
              item.name, Tensor(shape: item.shape, scalars: zip(d.scalars, b.scalars).map { $0 - $1 }), as: .f32)
          }
          entries.append(
            Entry(
              name: item.name, shape: item.shape, rank: nil, storedBytes: item.count * item.outputType.size,
              denseBytes: denseBytes, keptEnergy: 1))
        }
        for input in [base, finetuned] { input.release(item.name, range: nil) }
        done += item.bytesRead
        progress?(done, plan.bytesRead)
      }
      try writer.finish()
    } catch {
      writer.abandon()
      throw error
    }
    return entries
  }

  /// `finetuned - base` of one matrix, in Double.
  static func difference(_ name: String, _ finetuned: any Checkpoint, _ base: any Checkpoint) throws -> Matrix<Double> {
    STFMerge.difference(try finetuned.tensor(named: name), try base.tensor(named: name))
  }

  /// The fewest triplets holding `fraction` of the energy of `d` (its squared singular values,
  /// from the Gram matrix of its smaller side).
  static func rank(keeping fraction: Double, of d: Matrix<Double>) throws -> Int {
    let wide = d.rows <= d.columns
    let side = min(d.rows, d.columns)
    let gram = DoubleMatrix(
      rows: side, columns: side, values: BLAS.gram(d.values, rows: d.rows, columns: d.columns, ofRows: wide))
    let energies = try LAPACK.symmetricEigenvalues(gram).reversed().map { max(0, $0) }
    let total = energies.reduce(0, +)
    guard total > 0 else { return 1 }
    var kept = 0.0
    for (i, e) in energies.enumerated() {
      kept += e
      if kept >= fraction * total * (1 - 1e-12) { return i + 1 }
    }
    return side
  }
}
