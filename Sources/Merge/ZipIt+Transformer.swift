import Nets
import Tensor

/// What ZipIt! does the same way for every transformer: joint statistics of the models'
/// activation points over token batches, and folding the matchings into the weights.
extension ZipIt {
  /// One merge point's source: activation points whose rows (one per non-padding token) are
  /// pooled, optionally restricted to some columns (one attention head).
  struct PointSource {
    let points: [String]
    let columns: Range<Int>?
  }

  /// The config all the models share, as `config` reads it (nil: not of this kind), checked:
  /// at least two models, dense (no factored layers or K/V projections), equal configs.
  static func commonTransformerConfig<Config: Equatable>(
    _ models: [Network<Float>], kind: String, _ config: (Network<Float>) -> Config?
  ) throws -> Config {
    guard models.count >= 2 else { throw MergeError.tooFewModels }
    var first: Config?
    for (m, model) in models.enumerated() {
      guard let c = config(model) else {
        throw MergeError.notZippable(model: m, reason: "it is not \(kind) like the first")
      }
      guard model.lowRank.isEmpty, model.kvProjection == nil else {
        throw MergeError.notZippable(
          model: m, reason: "it has factored layers or K/V projections; zip the dense models")
      }
      if let first, first != c {
        throw MergeError.differentArchitectures(model: m, detail: "its config.json sizes differ from the first's")
      }
      first = first ?? c
    }
    guard let first else { throw MergeError.tooFewModels }
    return first
  }

  /// Joint statistics per merge point over `sequences` in batches: every model runs once per
  /// batch, and each point's features of the models sit side by side.
  static func tokenStatistics(
    _ models: [Network<Float>], sequences: [[Int]], sources: [PointSource], widths: [Int], batchSize: Int
  ) throws -> [FeatureStatistics] {
    var stats = widths.map { FeatureStatistics(width: $0 * models.count) }
    let wanted = Set(sources.flatMap(\.points))
    for start in stride(from: 0, to: sequences.count, by: batchSize) {
      let batch = TokenBatch(Array(sequences[start..<min(sequences.count, start + batchSize)]))
      let rows = batch.mask.indices.filter { batch.mask[$0] }
      let outputs = try models.map { model -> [String: Matrix<Float>] in
        let tape = Tape<Float>()
        let points = try model.forward(tape, .tokens(batch)).points.filter { wanted.contains($0.name) }
        return Dictionary(points.map { ($0.name, tape.value($0.value)) }) { a, _ in a }
      }
      for (k, source) in sources.enumerated() {
        for point in source.points {
          let parts = try outputs.map { out -> Matrix<Float> in
            let m = try out.required(point).rows(rows)
            guard let columns = source.columns else { return m }
            return Matrix(
              rows: m.rows, columns: columns.count, values: (0..<m.rows).flatMap { r in columns.map { m[r, $0] } })
          }
          stats[k].add(parts.dropFirst().reduce(parts[0]) { Matrix.concatenated($0, $1) })
        }
      }
    }
    return stats
  }
}

/// The products that fold matchings into N models' weights, in float64.
struct Zipper {
  let models: [Network<Float>]
  let matchings: [FeatureMatching]

  init(_ models: [Network<Float>], _ matchings: [FeatureMatching]) throws {
    for model in models { try model.checkWeights() }
    self.models = models
    self.matchings = matchings
  }

  /// `M_m` of merge point `point`.
  func merge(_ point: Int, _ m: Int) -> Matrix<Double> {
    Matrix(
      rows: matchings[point].features, columns: matchings[point].features, values: matchings[point].merge(model: m))
  }

  /// `U_m` of merge point `point`.
  func unmerge(_ point: Int, _ m: Int) -> Matrix<Double> {
    Matrix(
      rows: matchings[point].features, columns: matchings[point].features, values: matchings[point].unmerge(model: m))
  }

  /// The block-diagonal matrix of `parts` (per-head matchings of one layer).
  static func blocks(_ parts: [Matrix<Double>]) -> Matrix<Double> {
    let size = parts.reduce(0) { $0 + $1.rows }
    var out = Matrix<Double>(zeros: size, size)
    var offset = 0
    for p in parts {
      for i in 0..<p.rows { for j in 0..<p.columns { out[offset + i, offset + j] = p[i, j] } }
      offset += p.rows
    }
    return out
  }

  func weight(_ m: Int, _ name: String) -> Matrix<Double> {
    let w = models[m].checkedWeight(name)
    return Matrix(rows: w.rows, columns: w.columns, values: w.values.map(Double.init))
  }

  /// `sum_i L_i W_i R_i`; a nil right side is the identity, a nil left side averages the
  /// output rows over the models (`1/N`) unless `sumRows`.
  func zipped(
    _ name: String, left: ((Int) -> Matrix<Double>)?, right: ((Int) -> Matrix<Double>)?, sumRows: Bool = false
  ) -> Matrix<Float> {
    let count = models.count
    func term(_ m: Int) -> Matrix<Double> {
      var w = weight(m, name)
      if let right { w = w.matmul(right(m)) }
      return left.map { $0(m).matmul(w) } ?? (sumRows ? w : w.map { $0 / Double(count) })
    }
    var total = term(0)
    for m in 1..<max(count, 1) { total.add(term(m)) }
    return Matrix(rows: total.rows, columns: total.columns, values: total.values.map(Float.init))
  }

  /// A gain or bias vector (stored as one row) merged like an output side: `sum_i L_i b_i`.
  func zippedVector(_ name: String, left: (Int) -> Matrix<Double>) -> Matrix<Float> {
    var total = [Double](repeating: 0, count: left(0).rows)
    for m in 0..<models.count {
      let merged = left(m).matmul(weight(m, name), transposeB: true)
      for i in total.indices { total[i] += merged.values[i] }
    }
    return Matrix(rows: 1, columns: total.count, values: total.map(Float.init))
  }
}
