import Foundation
import Tensor

/// Multi-head attention, rotary position embeddings and pooling over sequences. Rows are
/// positions: row `b * sequence + s` is position `s` of sequence `b`.
extension Tape {
  /// Scaled dot-product attention, `softmax(q k^T / sqrt(d) + mask) v` per sequence and head.
  /// `q` is `rows x (heads * d)`; `k` and `v` are `rows x (kvHeads * d)`, and query head `h`
  /// reads key/value head `h / (heads / kvHeads)` (grouped-query attention). `causal` hides
  /// later positions; `keyMask` (one flag per row, false = padding) hides padded keys; `window`
  /// (sliding-window attention) lets query `i` see only keys `j > i - window`. `scale` replaces
  /// `1 / sqrt(d)` (Gemma's `query_pre_attn_scalar^-0.5`); `softcap` turns each scaled score `s`
  /// into `softcap * tanh(s / softcap)` before the mask and softmax (Gemma 2). A query that sees
  /// no key gets zeros.
  @_specialize(exported:true,where T == Float)
  public func attention(
    query q: Var, key k: Var, value v: Var, sequence: Int, heads: Int, kvHeads: Int, causal: Bool,
    keyMask: [Bool]? = nil, window: Int? = nil, scale customScale: Double? = nil, softcap: Double? = nil
  ) -> Var {
    let (qm, km, vm) = (value(q), value(k), value(v))
    let d = qm.columns / heads
    precondition(
      qm.columns == heads * d && km.columns == kvHeads * d && vm.columns == kvHeads * d && heads % kvHeads == 0,
      "attention shapes")
    precondition(
      qm.rows % sequence == 0 && km.rows == qm.rows && vm.rows == qm.rows && (keyMask?.count ?? qm.rows) == qm.rows,
      "attention rows")
    let batch = qm.rows / sequence
    let group = heads / kvHeads
    let scale = customScale.map { T($0) } ?? 1 / T(d).squareRoot()
    var out = Matrix<T>(zeros: qm.rows, qm.columns)
    // Every (sequence, head) is independent: they run on all cores, each product on one (BLAS's
    // own threads would only contend with the workers), and land in disjoint blocks.
    // With soft-capping, d score / d (q . k) per entry: scale (1 - tanh^2).
    let results = ResultSlots<(p: Matrix<T>, slope: Matrix<T>?, out: Matrix<T>)>(count: batch * heads)
    BLAS.singleThreaded {
      try? Parallel.forEach(batch * heads) { _, item in
        let (b, h) = (item / heads, item % heads)
        let kv = h / group
        let qh = block(qm, b, sequence, h, d)
        let kh = block(km, b, sequence, kv, d)
        var p = qh.matmul(kh, transposeB: true)
        var rowScale = scale
        var slope: Matrix<T>?
        if let softcap {
          let cap = T(softcap)
          var slopes = p
          for i in p.values.indices {
            let t = T.tanh(p.values[i] * scale / cap)
            p.values[i] = cap * t
            slopes.values[i] = scale * (1 - t * t)
          }
          slope = slopes
          rowScale = 1
        }
        let keys =
          keyMask.map { Array($0[(b * sequence)..<((b + 1) * sequence)]) } ?? [Bool](repeating: true, count: sequence)
        for i in 0..<sequence {
          softmaxRow(
            &p, i, scale: rowScale, visible: keys, from: window.map { max(0, i - $0 + 1) } ?? 0,
            through: causal ? i : sequence - 1)
        }
        results.set(item, (p, slope, p.matmul(block(vm, b, sequence, kv, d))))
      }
    }
    var probabilities: [Matrix<T>] = []
    var cappedSlopes: [Matrix<T>] = []
    for item in 0..<(batch * heads) {
      let r = results.get(item)
      addBlock(&out, r.out, item / heads, sequence, item % heads, d)
      probabilities.append(r.p)
      if let slope = r.slope { cappedSlopes.append(slope) }
    }
    return record(out, inputs: [q, k, v]) { [unowned self] g in
      // Every (sequence, key/value head) is independent, as in the forward pass: each runs its
      // query heads on one core with its products on that core, and adds their terms into its
      // own key and value gradients in head order (the order of one loop over the heads).
      let parts = ResultSlots<(dq: [Matrix<T>], dk: Matrix<T>, dv: Matrix<T>)>(count: batch * kvHeads)
      BLAS.singleThreaded {
        try? Parallel.forEach(batch * kvHeads) { _, item in
          let (b, kv) = (item / kvHeads, item % kvHeads)
          let (kh, vh) = (block(km, b, sequence, kv, d), block(vm, b, sequence, kv, d))
          var (dk, dv) = (Matrix<T>(zeros: sequence, d), Matrix<T>(zeros: sequence, d))
          var dqs: [Matrix<T>] = []
          for h in (kv * group)..<((kv + 1) * group) {
            let p = probabilities[b * heads + h]
            let go = block(g, b, sequence, h, d)
            dv.add(p.matmul(go, transposeSelf: true))
            var ds = go.matmul(vh, transposeB: true)
            for i in 0..<sequence {
              var dotted: T = 0
              for j in 0..<sequence { dotted += ds[i, j] * p[i, j] }
              if softcap != nil {
                let slope = cappedSlopes[b * heads + h]
                for j in 0..<sequence { ds[i, j] = p[i, j] * (ds[i, j] - dotted) * slope[i, j] }
              } else {
                for j in 0..<sequence { ds[i, j] = p[i, j] * (ds[i, j] - dotted) * scale }
              }
            }
            dqs.append(ds.matmul(kh))
            dk.add(ds.matmul(block(qm, b, sequence, h, d), transposeSelf: true))
          }
          parts.set(item, (dqs, dk, dv))
        }
      }
      var (dq, dk, dv) = (
        Matrix<T>(zeros: qm.rows, qm.columns), Matrix<T>(zeros: km.rows, km.columns),
        Matrix<T>(zeros: vm.rows, vm.columns)
      )
      for item in 0..<(batch * kvHeads) {
        let (b, kv) = (item / kvHeads, item % kvHeads)
        let part = parts.get(item)
        for (offset, block) in part.dq.enumerated() { addBlock(&dq, block, b, sequence, kv * group + offset, d) }
        addBlock(&dk, part.dk, b, sequence, kv, d)
        addBlock(&dv, part.dv, b, sequence, kv, d)
      }
      accumulate(q, dq)
      accumulate(k, dk)
      accumulate(v, dv)
    }
  }

  /// Rotary position embedding (Hugging Face's rotate-half layout): within each head of width
  /// `d`, features `i` and `i + d/2` turn by `position * theta^(-2i/d)`. `positions` has one
  /// entry per row.
  public func rotary(_ a: Var, positions: [Int], heads: Int, theta: Double) -> Var {
    let d = value(a).columns / max(heads, 1)
    return rotary(
      a, positions: positions, heads: heads,
      frequencies: Rotary(theta: theta).inverseFrequencies(dimension: d, length: 0))
  }

  /// Rotary position embedding with the given inverse frequency per feature pair (`Rotary`
  /// computes them for the scaled variants): features `i` and `i + d/2` turn by
  /// `position * frequencies[i]`, and both are multiplied by `scale` (yarn's attention factor).
  public func rotary(_ a: Var, positions: [Int], heads: Int, frequencies: [Double], scale: Double = 1) -> Var {
    rotary(a, positions: positions, heads: heads, rowFrequencies: { _ in frequencies }, scale: scale)
  }

  /// Rotary position embedding whose frequencies may differ from row to row (dynamic scaling,
  /// which depends on each sequence's length): `rowFrequencies(r)` gives row `r`'s, `d / 2` of them.
  @_specialize(exported:true,where T == Float)
  public func rotary(
    _ a: Var, positions: [Int], heads: Int, rowFrequencies: (Int) -> [Double], scale: Double = 1
  ) -> Var {
    let d = value(a).columns / max(heads, 1)
    return rotary(
      a, heads: heads,
      tables: RotaryTables(positions: positions, pairs: d / 2, rowFrequencies: rowFrequencies, scale: scale))
  }

  /// Rotary position embedding by precomputed `tables` (one row of angles per row of `a`), which
  /// a decoder builds once per batch for all its layers' queries and keys.
  @_specialize(exported:true,where T == Float)
  public func rotary(_ a: Var, heads: Int, tables: RotaryTables<T>) -> Var {
    let x = value(a)
    let d = x.columns / max(heads, 1)
    let half = d / 2
    precondition(
      x.columns == heads * d && d % 2 == 0 && tables.rows == x.rows && tables.pairs == half, "rotary shapes")
    // Row by row on all cores: feature i of a head pairs with i + d/2.
    func rotate(_ m: Matrix<T>, inverse: Bool) -> Matrix<T> {
      let columns = m.columns
      let values = m.values.withUnsafeBufferPointer { input in
        tables.cosines.withUnsafeBufferPointer { cosines in
          tables.sines.withUnsafeBufferPointer { sines in
            Elementwise.mapBlocks(m.values.count, unit: columns) { (range, out: UnsafeMutableBufferPointer<T>) in
              for r in (range.lowerBound / columns)..<(range.upperBound / columns) {
                let row = r * columns
                let local = row - range.lowerBound
                let angles = r * half
                for head in 0..<heads {
                  let at = head * d
                  for i in 0..<half {
                    let (c, s) = (cosines[angles + i], inverse ? -sines[angles + i] : sines[angles + i])
                    let (low, high) = (input[row + at + i], input[row + at + half + i])
                    out[local + at + i] = low * c - high * s
                    out[local + at + half + i] = high * c + low * s
                  }
                }
              }
            }
          }
        }
      }
      return Matrix(rows: m.rows, columns: columns, values: values)
    }
    return record(rotate(x, inverse: false), inputs: [a]) { [unowned self] g in accumulate(a, rotate(g, inverse: true))
    }
  }

  /// Per-sequence mean of the rows whose `mask` flag is set (all rows when nil): `batch x columns`.
  @_specialize(exported:true,where T == Float)
  public func meanPool(_ a: Var, sequence: Int, mask: [Bool]? = nil) -> Var {
    let x = value(a)
    let batch = x.rows / sequence
    var weights = [T](repeating: 0, count: x.rows)
    for b in 0..<batch {
      let kept = (0..<sequence).filter { mask?[b * sequence + $0] ?? true }
      for s in kept { weights[b * sequence + s] = 1 / T(kept.count) }
    }
    var out = Matrix<T>(zeros: batch, x.columns)
    for r in 0..<x.rows where weights[r] != 0 {
      for c in 0..<x.columns { out.values[(r / sequence) * x.columns + c] += weights[r] * x.values[r * x.columns + c] }
    }
    return record(out, inputs: [a]) { [unowned self] g in
      var dx = Matrix<T>(zeros: x.rows, x.columns)
      for r in 0..<x.rows where weights[r] != 0 {
        for c in 0..<x.columns { dx.values[r * x.columns + c] = weights[r] * g.values[(r / sequence) * x.columns + c] }
      }
      accumulate(a, dx)
    }
  }

  /// The `sequence x d` block of head `head` of sequence `b`.
  private func block(_ m: Matrix<T>, _ b: Int, _ sequence: Int, _ head: Int, _ d: Int) -> Matrix<T> {
    var out = Matrix<T>(zeros: sequence, d)
    for s in 0..<sequence {
      for c in 0..<d { out.values[s * d + c] = m.values[(b * sequence + s) * m.columns + head * d + c] }
    }
    return out
  }

  private func addBlock(_ m: inout Matrix<T>, _ part: Matrix<T>, _ b: Int, _ sequence: Int, _ head: Int, _ d: Int) {
    for s in 0..<sequence {
      for c in 0..<d { m.values[(b * sequence + s) * m.columns + head * d + c] += part.values[s * d + c] }
    }
  }

  /// Row `i` of `scores` becomes `softmax(scale * scores)` over the columns `first <= j <= last`
  /// with `visible[j]` (zeros elsewhere).
  private func softmaxRow(
    _ scores: inout Matrix<T>, _ i: Int, scale: T, visible: [Bool], from first: Int, through last: Int
  ) {
    let n = scores.columns
    scores.values.withUnsafeMutableBufferPointer { all in
      let row = UnsafeMutableBufferPointer(rebasing: all[(i * n)..<((i + 1) * n)])
      var largest = -T.infinity
      for j in first...last where visible[j] { largest = max(largest, row[j] * scale) }
      guard largest > -T.infinity else {
        for j in 0..<n { row[j] = 0 }
        return
      }
      // The span's exponentials in one vector sweep (`NetScalar.exponentiate`); hidden keys
      // enter it as -infinity, whose exponential is 0.
      for j in 0..<first { row[j] = 0 }
      for j in (last + 1)..<n { row[j] = 0 }
      for j in first...last { row[j] = visible[j] ? row[j] * scale - largest : -T.infinity }
      T.exponentiate(UnsafeMutableBufferPointer(rebasing: row[first...last]))
      var total: T = 0
      for j in first...last { total += row[j] }
      let inverse = 1 / total
      for j in first...last { row[j] *= inverse }
    }
  }
}

/// Rotary position embedding's angles for one batch: `scale` times the cosine and the sine of
/// `position * frequency` for every row and feature pair (computed in `Double`). Built once per
/// batch and shared by every layer's queries and keys, which all turn by the same angles.
public struct RotaryTables<T: NetScalar>: Sendable {
  /// Rows of the batch, and feature pairs per head (half the head dimension).
  public let rows: Int
  public let pairs: Int
  /// Row `r`, pair `i` at `r * pairs + i`.
  let cosines: [T]
  let sines: [T]

  /// The tables for rows at `positions` (one per row), where row `r` turns its feature pairs by
  /// `rowFrequencies(r)` (`pairs` of them) times its position.
  public init(positions: [Int], pairs: Int, rowFrequencies: (Int) -> [Double], scale: Double = 1) {
    let frequencies = positions.indices.map(rowFrequencies)
    for f in frequencies { precondition(f.count == pairs, "one rotary frequency per feature pair") }
    let angle = { (k: Int) in Double(positions[k / pairs]) * frequencies[k / pairs][k % pairs] }
    rows = positions.count
    self.pairs = pairs
    cosines = Elementwise.map(positions.count * pairs) { T(scale * Foundation.cos(angle($0))) }
    sines = Elementwise.map(positions.count * pairs) { T(scale * Foundation.sin(angle($0))) }
  }
}
