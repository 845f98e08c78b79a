/// Losses, each a `1 x 1` mean over rows (or elements).
extension Tape {
  /// Softmax cross-entropy of `logits` (`rows x classes`) against integer labels, averaged over
  /// the rows whose label is not negative (a negative label, like PyTorch's -100, is ignored).
  @_specialize(exported:true,where T == Float)
  public func crossEntropy(_ logits: Var, labels: [Int]) -> Var {
    let z = value(logits)
    precondition(labels.count == z.rows, "crossEntropy: \(labels.count) labels for \(z.rows) rows")
    let p = softmax(z)
    let counted = labels.filter { $0 >= 0 }.count
    var loss: T = 0
    for (r, label) in labels.enumerated() where label >= 0 {
      precondition(label < z.columns, "label \(label) outside \(z.columns) classes")
      loss -= T.log(max(p[r, label], T.leastNormalMagnitude))
    }
    let scale = counted == 0 ? 0 : 1 / T(counted)
    return record(Matrix(rows: 1, columns: 1, values: [loss * scale]), inputs: [logits]) { [unowned self] g in
      var dz = Matrix<T>(zeros: z.rows, z.columns)
      for (r, label) in labels.enumerated() where label >= 0 {
        for c in 0..<z.columns { dz[r, c] = p[r, c] * scale * g.values[0] }
        dz[r, label] -= scale * g.values[0]
      }
      accumulate(logits, dz)
    }
  }

  /// Cross-entropy against soft targets (rows of probabilities), weighted per row:
  /// `sum_r w_r * (-sum_c t_rc log softmax(z_r)_c) / sum_r w_r` (0 when every weight is 0).
  /// FixMatch's loss: confident weak-view predictions as targets for strong views.
  @_specialize(exported:true,where T == Float)
  public func softCrossEntropy(_ logits: Var, targets: Matrix<T>, weights: [T]) -> Var {
    let z = value(logits)
    precondition(
      targets.rows == z.rows && targets.columns == z.columns && weights.count == z.rows, "softCrossEntropy shapes")
    let p = softmax(z)
    let total = weights.reduce(0, +)
    let scale = total > 0 ? 1 / total : 0
    var loss: T = 0
    for r in 0..<z.rows where weights[r] != 0 {
      for c in 0..<z.columns where targets[r, c] != 0 {
        loss -= weights[r] * targets[r, c] * T.log(max(p[r, c], T.leastNormalMagnitude))
      }
    }
    return record(Matrix(rows: 1, columns: 1, values: [loss * scale]), inputs: [logits]) { [unowned self] g in
      var dz = Matrix<T>(zeros: z.rows, z.columns)
      for r in 0..<z.rows where weights[r] != 0 {
        let mass = (0..<z.columns).reduce(T(0)) { $0 + targets[r, $1] }
        for c in 0..<z.columns { dz[r, c] = weights[r] * (mass * p[r, c] - targets[r, c]) * scale * g.values[0] }
      }
      accumulate(logits, dz)
    }
  }

  /// Mean squared error over all elements, `mean((a - b)^2)` (feature distillation).
  @_specialize(exported:true,where T == Float)
  public func meanSquaredError(_ a: Var, _ b: Var) -> Var {
    let difference = subtract(a, b)
    return mean(multiply(difference, difference))
  }

  /// `KL(softmax(teacher / t) || softmax(student / t))` averaged over rows, times `t^2` (the
  /// usual distillation scaling, so gradients keep their size across temperatures).
  /// `teacher` is a constant matrix of logits.
  @_specialize(exported:true,where T == Float)
  public func klDivergence(teacher: Matrix<T>, student: Var, temperature: T = 1) -> Var {
    let s = value(student)
    precondition(teacher.rows == s.rows && teacher.columns == s.columns, "klDivergence shapes")
    let pt = softmax(teacher.map { $0 / temperature })
    let ps = softmax(s.map { $0 / temperature })
    var loss: T = 0
    for i in pt.values.indices where pt.values[i] > 0 {
      loss += pt.values[i] * (T.log(pt.values[i]) - T.log(max(ps.values[i], T.leastNormalMagnitude)))
    }
    let scale = temperature * temperature / T(s.rows)
    return record(Matrix(rows: 1, columns: 1, values: [loss * scale]), inputs: [student]) { [unowned self] g in
      var ds = Matrix<T>(zeros: s.rows, s.columns)
      for i in ds.values.indices { ds.values[i] = (ps.values[i] - pt.values[i]) * scale / temperature * g.values[0] }
      accumulate(student, ds)
    }
  }

  /// Mean entropy of the predicted distributions, `-sum p log p` per row (unsupervised
  /// test-time adaptation minimises it); with `rows`, over the rows where it is true only
  /// (a token batch's non-padding positions).
  @_specialize(exported:true,where T == Float)
  public func entropy(_ logits: Var, rows counted: [Bool]? = nil) -> Var {
    let z = value(logits)
    let p = softmax(z)
    let included = counted ?? Array(repeating: true, count: z.rows)
    var rowEntropy = [T](repeating: 0, count: z.rows)
    for r in 0..<z.rows where included[r] {
      for c in 0..<z.columns where p[r, c] > 0 { rowEntropy[r] -= p[r, c] * T.log(p[r, c]) }
    }
    let scale = 1 / T(max(included.filter { $0 }.count, 1))
    return record(Matrix(rows: 1, columns: 1, values: [rowEntropy.reduce(0, +) * scale]), inputs: [logits]) {
      [unowned self] g in
      var dz = Matrix<T>(zeros: z.rows, z.columns)
      for r in 0..<z.rows where included[r] {
        for c in 0..<z.columns where p[r, c] > 0 {
          dz[r, c] = -p[r, c] * (T.log(p[r, c]) + rowEntropy[r]) * scale * g.values[0]
        }
      }
      accumulate(logits, dz)
    }
  }
}

extension Tape {
  /// Row-wise `log softmax(z)`. Backward: `dz_j = g_j - p_j sum_c g_c`.
  public func logSoftmax(_ logits: Var) -> Var {
    let z = value(logits)
    let p = softmax(z)
    var out = p
    for i in out.values.indices { out.values[i] = T.log(max(p.values[i], T.leastNormalMagnitude)) }
    return record(out, inputs: [logits]) { [unowned self] g in
      var dz = g
      for r in 0..<z.rows {
        var total: T = 0
        for c in 0..<z.columns { total += g[r, c] }
        for c in 0..<z.columns { dz[r, c] -= p[r, c] * total }
      }
      accumulate(logits, dz)
    }
  }

  /// Scores of a multi-head model whose heads each have their own classes: every head's
  /// log-softmax, side by side (head h's class c at column `h * classes + c`).
  public func stackedHeadScores(_ heads: [Var]) -> Var { concatenateColumns(heads.map { logSoftmax($0) }) }
  /// Scores of an ensemble of heads over one label space (a partially zipped decoder's
  /// tails): `log((1/H) sum_h softmax(z_h))`, a normalised distribution per row.
  public func meanProbabilityScores(_ heads: [Var]) -> Var { logMeanExp(heads.map { logSoftmax($0) }) }

  /// Element-wise `log((1/H) sum_h exp(x_h))` of equally shaped nodes, computed stably
  /// (shifted by the largest). Backward: `dx_h = g * exp(x_h - out) / H`.
  @_specialize(exported:true,where T == Float)
  public func logMeanExp(_ parts: [Var]) -> Var {
    let values = parts.map { value($0) }
    var out = values[0]
    let scale = T(values.count)
    for i in out.values.indices {
      let top = values.reduce(-T.infinity) { max($0, $1.values[i]) }
      guard top.isFinite else {
        out.values[i] = top
        continue
      }
      let total = values.reduce(T(0)) { $0 + T.exp($1.values[i] - top) }
      out.values[i] = top + T.log(total / scale)
    }
    return record(out, inputs: parts) { [unowned self] g in
      for (h, part) in parts.enumerated() {
        var dx = g
        for i in dx.values.indices {
          dx.values[i] = out.values[i].isFinite ? g.values[i] * T.exp(values[h].values[i] - out.values[i]) / scale : 0
        }
        accumulate(part, dx)
      }
    }
  }

  /// Scores of a multi-head model: per row and class, `log p` of the head that gives the class
  /// the highest probability (each head's `p` a softmax over its logits). The gradient follows
  /// that head's log-softmax.
  @_specialize(exported:true,where T == Float)
  public func bestHeadScores(_ heads: [Var]) -> Var {
    let logits = heads.map { value($0) }
    let probabilities = logits.map { softmax($0) }
    let (rows, columns) = (logits[0].rows, logits[0].columns)
    var best = [Int](repeating: 0, count: rows * columns)
    var out = Matrix<T>(zeros: rows, columns)
    for i in 0..<(rows * columns) {
      for h in 1..<heads.count where probabilities[h].values[i] > probabilities[best[i]].values[i] { best[i] = h }
      out.values[i] = T.log(max(probabilities[best[i]].values[i], T.leastNormalMagnitude))
    }
    return record(out, inputs: heads) { [unowned self] g in
      for (h, head) in heads.enumerated() {
        // d log p_c / d z_j = [c == j] - p_j, summed over the classes c this head wins.
        var dz = Matrix<T>(zeros: rows, columns)
        for r in 0..<rows {
          var total: T = 0
          for c in 0..<columns where best[r * columns + c] == h {
            dz[r, c] += g[r, c]
            total += g[r, c]
          }
          for j in 0..<columns { dz[r, j] -= total * probabilities[h][r, j] }
        }
        accumulate(head, dz)
      }
    }
  }
}

/// Row-wise softmax, stable (the row maximum is subtracted first).
public func softmax<T: NetScalar>(_ z: Matrix<T>) -> Matrix<T> {
  var p = z
  for r in 0..<z.rows {
    var largest = -T.infinity
    for c in 0..<z.columns { largest = max(largest, z[r, c]) }
    var total: T = 0
    for c in 0..<z.columns {
      let e = T.exp(z[r, c] - largest)
      p[r, c] = e
      total += e
    }
    for c in 0..<z.columns { p[r, c] /= total }
  }
  return p
}
