import Foundation
import Tensor

/// The layout of low-rank matrices in a checkpoint (docs/format.md): a matrix `NAME` of shape
/// m x n kept at rank k is stored as three f32 tensors, `NAME.lowrank.u` [m, k] (orthonormal
/// columns), `NAME.lowrank.s` [k] (descending) and `NAME.lowrank.vt` [k, n] (orthonormal rows),
/// and listed with its shape in the metadata entry `mergekit.low_rank`, a JSON object
/// `{"NAME": [m, n], ...}`. Any format that keeps metadata (safetensors, `.mkz`) can hold it.
public enum LowRankLayout {
  public static let metadataKey = "mergekit.low_rank"

  /// The names of the three factor tensors of matrix `name`.
  public static func factorNames(of name: String) -> (u: String, s: String, vt: String) {
    (name + ".lowrank.u", name + ".lowrank.s", name + ".lowrank.vt")
  }

  /// The metadata entry for factored matrices of these shapes.
  public static func metadataValue(_ shapes: [(name: String, shape: [Int])]) -> String {
    let object = Dictionary(shapes.map { ($0.name, $0.shape) }) { a, _ in a }
    guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]),
      let text = String(data: data, encoding: .utf8)
    else { return "{}" }
    return text
  }
}

/// Reads low-rank matrices as the dense matrices they stand for, so that every command takes a
/// low-rank task vector as it would the dense one. A read of a byte range forms only the rows
/// that hold it (`u[rows] diag(s) vt`); `factors(of:)` hands the SVD-based merges the triplets
/// themselves. The dense tensors are f32, in the place of their `.lowrank.u` tensor; the
/// metadata entry is not passed on, so a densified copy is a plain checkpoint.
public final class FactoredCheckpoint: Checkpoint, @unchecked Sendable {
  let inner: any Checkpoint
  /// Factored matrices by name: dense shape and rank.
  let factored: [ExactName: (shape: [Int], rank: Int)]
  public let tensors: [TensorInfo]
  private let byName: [ExactName: TensorInfo]

  public var path: String { inner.path }
  public var files: [StoredFile] { inner.files }
  public var metadata: [String: String] { inner.metadata.filter { $0.key != LowRankLayout.metadataKey } }

  /// Wraps `inner` when its metadata lists factored matrices; returns it unchanged otherwise.
  /// Throws `invalidEntry` naming the file and matrix for an entry that is not a name with a
  /// positive `[m, n]`, a missing or non-f32 factor, or factors whose shapes do not fit.
  public static func wrapping(_ inner: any Checkpoint) throws -> any Checkpoint {
    guard let text = inner.metadata[LowRankLayout.metadataKey] else { return inner }
    return try FactoredCheckpoint(inner, entry: text)
  }

  init(_ inner: any Checkpoint, entry text: String) throws {
    self.inner = inner
    func fail(_ name: String, _ reason: String) -> CheckpointError {
      .invalidEntry(file: inner.path, tensor: name, reason: reason)
    }
    guard let data = text.data(using: .utf8),
      let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
    else {
      throw fail("", "metadata \(LowRankLayout.metadataKey) is not a JSON object of matrix names and shapes")
    }
    var factored: [ExactName: (shape: [Int], rank: Int)] = [:]
    var hidden = Set<ExactName>()
    for (name, value) in object {
      guard let pair = value as? [NSNumber], pair.count == 2,
        let m = Int(exactly: pair[0].doubleValue), let n = Int(exactly: pair[1].doubleValue), m > 0, n > 0,
        case (let elements, false) = m.multipliedReportingOverflow(by: n), elements <= Int.max / 4
      else { throw fail(name, "its \(LowRankLayout.metadataKey) shape is not [rows, columns] of positive sizes") }
      guard inner.lookup(name) == nil else { throw fail(name, "is stored both dense and as low-rank factors") }
      let names = LowRankLayout.factorNames(of: name)
      guard let u = inner.lookup(names.u), let s = inner.lookup(names.s), let vt = inner.lookup(names.vt) else {
        throw fail(name, "lacks one of its factors \(names.u), \(names.s), \(names.vt)")
      }
      guard [u, s, vt].allSatisfy({ $0.dtype == .f32 }) else { throw fail(name, "has factors that are not f32") }
      guard s.shape.count == 1, u.shape == [m, s.shape[0]], vt.shape == [s.shape[0], n] else {
        throw fail(name, "has factors \(u.shape), \(s.shape), \(vt.shape) that do not make a \(m) x \(n) matrix")
      }
      // As .mkz bounds a chunk's raw size by its stored size: a few stored bytes cannot stand for
      // a huge dense tensor (a rank-1 matrix of 65,536 x 65,536 is about the largest this allows).
      let stored = 4 * (s.shape[0] * (m + n + 1))
      guard s.shape[0] >= 1, elements / 16_384 <= stored else {
        throw fail(
          name, "stands for \(m) x \(n) values with factors of rank \(s.shape[0]): too large for what it stores")
      }
      factored[ExactName(name)] = ([m, n], s.shape[0])
      hidden.formUnion([ExactName(names.s), ExactName(names.vt)])
    }
    self.factored = factored
    var tensors: [TensorInfo] = []
    let byFactor = Dictionary(factored.map { (ExactName(LowRankLayout.factorNames(of: $0.key.name).u), $0.key.name) }) {
      a, _ in a
    }
    for info in inner.tensors where !hidden.contains(ExactName(info.name)) {
      if let name = byFactor[ExactName(info.name)], let entry = factored[ExactName(name)] {
        tensors.append(TensorInfo(name: name, dtype: .f32, shape: entry.shape))
      } else {
        tensors.append(info)
      }
    }
    self.tensors = tensors
    byName = Dictionary(tensors.map { (ExactName($0.name), $0) }) { a, _ in a }
  }

  public func lookup(_ name: String) -> TensorInfo? { byName[ExactName(name)] }

  /// The stored rank of matrix `name`, or nil for a tensor stored dense.
  public func rank(of name: String) -> Int? { factored[ExactName(name)]?.rank }

  public func file(of name: String) -> String? {
    factored[ExactName(name)] == nil ? inner.file(of: name) : inner.file(of: LowRankLayout.factorNames(of: name).u)
  }

  /// The triplets of factored matrix `name`, or nil for a tensor stored dense.
  public func factors(of name: String) throws -> SingularFactors? {
    guard factored[ExactName(name)] != nil else { return nil }
    let names = LowRankLayout.factorNames(of: name)
    return SingularFactors(
      u: try inner.tensor(named: names.u), s: try inner.tensor(named: names.s).scalars,
      vt: try inner.tensor(named: names.vt))
  }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  {
    guard let entry = factored[ExactName(name)] else { return try inner.withBytes(of: name, range: range, body) }
    let (m, n) = (entry.shape[0], entry.shape[1])
    let bytes = range ?? 0..<(m * n * 4)
    guard bytes.lowerBound >= 0, bytes.upperBound <= m * n * 4 else {
      throw CheckpointError.invalidEntry(
        file: path, tensor: name, reason: "byte range \(bytes) is outside its \(m * n * 4) bytes")
    }
    guard !bytes.isEmpty else { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
    let rows = (bytes.lowerBound / 4 / n)..<((bytes.upperBound - 1) / 4 / n + 1)
    let names = LowRankLayout.factorNames(of: name)
    let factors = SingularFactors(
      u: try inner.readRows(names.u, rows).decoded(), s: try inner.tensor(named: names.s).scalars,
      vt: try inner.tensor(named: names.vt))
    let values = factors.rows(0..<rows.count)
    return try values.withUnsafeBytes { raw in
      let start = bytes.lowerBound - rows.lowerBound * n * 4
      return try body(UnsafeRawBufferPointer(rebasing: raw[start..<(start + bytes.count)]))
    }
  }

  public func release(_ name: String, range: Range<Int>?) {
    guard factored[ExactName(name)] != nil else { return inner.release(name, range: range) }
    let names = LowRankLayout.factorNames(of: name)
    for factor in [names.u, names.s, names.vt] { inner.release(factor, range: nil) }
  }

  public func verify(progress: ((Int, Int) -> Void)?) throws { try inner.verify(progress: progress) }
}
