import Tensor

/// A node of a `Tape`: one recorded matrix value.
public struct Var: Hashable, Sendable {
  public let id: Int
}

/// Sets the allocator for tensor work once per process (a static is initialised once).
private enum MemoryUse {
  static let reused: Void = MemoryPolicy.reuseTensorMemory()
}

/// Reverse-mode automatic differentiation. Each operation (the `Tape+*.swift` extensions)
/// computes its value at once and records how to send an output gradient back to its inputs;
/// `backward(from:)` replays the records in reverse, accumulating gradients. Only nodes that
/// depend on a `parameter` get gradients, so frozen weights (`constant`) cost nothing.
///
/// Everything recorded stays in memory until the tape is dropped: one tape per mini-batch
/// keeps memory bounded by the batch, not the data set.
public final class Tape<T: NetScalar> {
  private var values: [Matrix<T>] = []
  private var gradients: [Matrix<T>?] = []
  private var tracked: [Bool] = []
  private var backwards: [((Matrix<T>) -> Void)?] = []

  /// A tape's work allocates and frees matrices of the same few sizes over and over (every
  /// mini-batch, every forward): the first tape of a process has their memory reused from the
  /// heap (`MemoryPolicy.reuseTensorMemory`) instead of mapped, zero-filled by page faults and
  /// unmapped each time (a tenth of a decoder forward's samples were page faults).
  public init() { _ = MemoryUse.reused }

  /// A value that gets no gradient (data, frozen weights).
  public func constant(_ value: Matrix<T>) -> Var { append(value, tracked: false, backward: nil) }

  /// A value whose gradient `backward` computes (trainable weights, inputs under test).
  public func parameter(_ value: Matrix<T>) -> Var { append(value, tracked: true, backward: nil) }

  public func value(_ v: Var) -> Matrix<T> { values[v.id] }

  /// Whether `v` depends on some parameter (so it will get a gradient).
  public func isTracked(_ v: Var) -> Bool { tracked[v.id] }

  /// The gradient of the last `backward` loss with respect to `v` (zeros if `v` did not
  /// contribute; nil if it depends on no parameter).
  public func gradient(_ v: Var) -> Matrix<T>? {
    guard tracked[v.id] else { return nil }
    return gradients[v.id] ?? Matrix(zeros: values[v.id].rows, values[v.id].columns)
  }

  /// Records an operation's result. `backward` receives the gradient of the result and adds
  /// its inputs' gradients with `accumulate`; it is kept only when some input is tracked.
  func record(_ value: Matrix<T>, inputs: [Var], backward: @escaping (Matrix<T>) -> Void) -> Var {
    let isTracked = inputs.contains { tracked[$0.id] }
    return append(value, tracked: isTracked, backward: isTracked ? backward : nil)
  }

  private func append(_ value: Matrix<T>, tracked isTracked: Bool, backward: ((Matrix<T>) -> Void)?) -> Var {
    values.append(value)
    gradients.append(nil)
    tracked.append(isTracked)
    backwards.append(backward)
    return Var(id: values.count - 1)
  }

  /// Adds `gradient` to `v`'s (ignored when `v` is not tracked).
  @_specialize(where T == Float)
  func accumulate(_ v: Var, _ gradient: @autoclosure () -> Matrix<T>) {
    guard tracked[v.id] else { return }
    if gradients[v.id] == nil {
      gradients[v.id] = gradient()
    } else {
      gradients[v.id]?.add(gradient())
    }
  }

  /// Back-propagates from a `1 x 1` loss: afterwards `gradient(p)` is d loss / d p. Gradients
  /// of an earlier `backward` are cleared first.
  @_specialize(exported:true,where T == Float)
  public func backward(from loss: Var) {
    precondition(
      values[loss.id].count == 1,
      "backward needs a scalar loss, got \(values[loss.id].rows) x \(values[loss.id].columns)")
    for i in gradients.indices { gradients[i] = nil }
    guard tracked[loss.id] else { return }
    gradients[loss.id] = Matrix(rows: 1, columns: 1, values: [1])
    for id in stride(from: loss.id, through: 0, by: -1) {
      guard let backward = backwards[id], let g = gradients[id] else { continue }
      backward(g)
    }
  }
}
