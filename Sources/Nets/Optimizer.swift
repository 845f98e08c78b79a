/// Optimisers over named parameters. `step` updates the parameters from their gradients; state
/// (momentum, Adam moments) is kept per name. Gradient clipping rescales all gradients together
/// when their global L2 norm exceeds `clipNorm`.
public struct Optimizer<T: NetScalar> {
  public enum Kind: String, Sendable, CaseIterable {
    /// SGD with (heavy-ball) momentum and L2 weight decay added to the gradient.
    case sgd
    /// Adam with decoupled weight decay (AdamW), bias-corrected moments.
    case adam
  }

  public var kind: Kind
  public var learningRate: T
  public var momentum: T = 0.9
  public var beta1: T = 0.9
  public var beta2: T = 0.999
  public var epsilon: T = 1e-8
  public var weightDecay: T = 0
  /// Clip gradients to this global L2 norm (nil: no clipping).
  public var clipNorm: T?
  private var first: [String: [T]] = [:]
  private var second: [String: [T]] = [:]
  public private(set) var steps = 0

  public init(_ kind: Kind, learningRate: T, weightDecay: T = 0, clipNorm: T? = nil) {
    self.kind = kind
    self.learningRate = learningRate
    self.weightDecay = weightDecay
    self.clipNorm = clipNorm
  }

  /// One update of every parameter that has a gradient. Returns the gradients' global norm
  /// before clipping.
  @discardableResult
  @_specialize(exported:true,where T == Float)
  public mutating func step(_ parameters: inout [String: Matrix<T>], gradients: [String: Matrix<T>]) -> T {
    var squares: T = 0
    for g in gradients.values { for x in g.values { squares += x * x } }
    let norm = squares.squareRoot()
    let clip: T = clipNorm.map { norm > $0 ? $0 / norm : 1 } ?? 1
    steps += 1
    for name in gradients.keys.sorted() {
      guard var p = parameters[name], let g = gradients[name] else { continue }
      switch kind {
      case .sgd:
        var velocity = first[name] ?? [T](repeating: 0, count: p.count)
        for i in p.values.indices {
          let grad = g.values[i] * clip + weightDecay * p.values[i]
          velocity[i] = momentum * velocity[i] + grad
          p.values[i] -= learningRate * velocity[i]
        }
        first[name] = velocity
      case .adam:
        var m = first[name] ?? [T](repeating: 0, count: p.count)
        var v = second[name] ?? [T](repeating: 0, count: p.count)
        let correction1 = 1 - T.pow(beta1, T(steps))
        let correction2 = 1 - T.pow(beta2, T(steps))
        for i in p.values.indices {
          let grad = g.values[i] * clip
          m[i] = beta1 * m[i] + (1 - beta1) * grad
          v[i] = beta2 * v[i] + (1 - beta2) * grad * grad
          let update = (m[i] / correction1) / ((v[i] / correction2).squareRoot() + epsilon)
          p.values[i] -= learningRate * (update + weightDecay * p.values[i])
        }
        first[name] = m
        second[name] = v
      }
      parameters[name] = p
    }
    return norm
  }
}
