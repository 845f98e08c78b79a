import Tensor

/// The MLP: hidden layers `linear -> [LayerNorm] -> activation`, then a linear output layer.
/// Points: `<layer>.input`/`.output` of every linear, `<layer>.hidden` after each activation,
/// where `<layer>` is `layers.{i}` (or `heads.{h}.layers.{i}` past the shared layers).
extension Network {
  static func mlpShapes(_ c: MLPConfig) -> [(name: String, shape: [Int])] {
    var shapes: [(String, [Int])] = []
    for i in 0..<c.layerCount {
      let (input, output) = (c.layerSizes[i], c.layerSizes[i + 1])
      for h in 0..<(i < c.sharedLayers ? 1 : c.heads) {
        let p = c.prefix(layer: i, head: h)
        shapes += [(p + ".weight", [output, input]), (p + ".bias", [output])]
        if c.layerNorm && i < c.layerCount - 1 {
          shapes += [(p + ".norm.weight", [output]), (p + ".norm.bias", [output])]
        }
      }
    }
    return shapes
  }

  @_specialize(where T == Float)
  func mlpForward(_ c: MLPConfig, _ tape: Tape<T>, _ x: Var, _ weight: WeightBinder, _ recorder: inout PointRecorder)
    -> Var
  {
    func layers(_ range: Range<Int>, head: Int, _ input: Var) -> Var {
      var h = input
      for i in range {
        let p = c.prefix(layer: i, head: head)
        h = tape.dense(h, p, bias: true, weight, &recorder)
        guard i < c.layerCount - 1 else { break }
        if c.layerNorm {
          h = tape.layerNorm(h, gamma: weight(p + ".norm.weight"), beta: weight(p + ".norm.bias"), epsilon: 1e-5)
        }
        h = tape.activation(c.activation, h)
        recorder.record(p + ".hidden", h)
      }
      return h
    }
    let trunk = layers(0..<c.sharedLayers, head: 0, x)
    guard c.heads > 1 else { return trunk }
    let heads = (0..<c.heads).map { layers(c.sharedLayers..<c.layerCount, head: $0, trunk) }
    return c.stackedHeads ? tape.stackedHeadScores(heads) : tape.bestHeadScores(heads)
  }
}

extension Network {
  /// A freshly initialised MLP, as PyTorch's `nn.Linear` does: weights and biases uniform in
  /// `±1/sqrt(fan_in)`; LayerNorm weights 1 and biases 0. Deterministic in `seed`.
  public static func initializedMLP(_ c: MLPConfig, seed: UInt64) -> Network<T> {
    var tensors: [String: Tensor] = [:]
    for (name, shape) in mlpShapes(c) {
      if name.contains(".norm.") {
        tensors[name] = Tensor(
          shape: shape, scalars: [Float](repeating: name.hasSuffix("weight") ? 1 : 0, count: shape[0]))
        continue
      }
      guard let index = name.split(separator: ".").dropLast().last, let layer = Int(index) else {
        preconditionFailure("MLP weight names are layers.N.weight")
      }
      let bound = 1 / Float(c.layerSizes[layer]).squareRoot()
      let rng = CounterRNG(seed: seed, stream: name)
      tensors[name] = Tensor(
        shape: shape, scalars: (0..<shape.reduce(1, *)).map { (2 * rng.uniform(UInt64($0)) - 1) * bound })
    }
    return Network(config: .mlp(c), weights: tensors.mapValues { Matrix($0) })
  }
}

extension Network {
  /// The weights as tensors with the checkpoint's names and shapes, in the architecture's order.
  public var tensors: [(name: String, tensor: Tensor)] {
    Self.expectedShapes(config, prefix: prefix, lowRank: lowRank, kvProjection: kvProjection != nil).compactMap {
      name, shape in
      weights[name].map { (name, $0.tensor(shape: shape)) }
    }
  }
}

extension Network {
  /// Checks that every weight the architecture reads is present (`weights` is public and may
  /// have been edited since the network was built). Throws `NetsError.missingTensors`.
  public func checkWeights() throws {
    let absent = Self.expectedShapes(config, prefix: prefix, lowRank: lowRank, kvProjection: kvProjection != nil).map(
      \.name
    ).filter { weights[$0] == nil }
    guard absent.isEmpty else { throw NetsError.missingTensors(absent) }
  }

  /// Weight `name`, which `checkWeights` (or building the network) has shown present.
  public func checkedWeight(_ name: String) -> Matrix<T> {
    guard let w = weights[name] else { preconditionFailure("weight '\(name)' is missing; call checkWeights() first") }
    return w
  }
}
