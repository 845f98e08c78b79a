import Tensor

/// The MLP: hidden layers `linear -> [LayerNorm] -> activation`, then a linear output layer.
/// Points: `layers.{i}.input`/`.output` of every linear, `layers.{i}.hidden` after each activation.
extension Network {
  static func mlpShapes(_ c: MLPConfig) -> [(name: String, shape: [Int])] {
    var shapes: [(String, [Int])] = []
    for i in 0..<(c.layerSizes.count - 1) {
      let (input, output) = (c.layerSizes[i], c.layerSizes[i + 1])
      shapes += [("layers.\(i).weight", [output, input]), ("layers.\(i).bias", [output])]
      if c.layerNorm && i < c.layerSizes.count - 2 {
        shapes += [("layers.\(i).norm.weight", [output]), ("layers.\(i).norm.bias", [output])]
      }
    }
    return shapes
  }

  func mlpForward(_ c: MLPConfig, _ tape: Tape<T>, _ x: Var, _ weight: (String) -> Var, _ recorder: inout PointRecorder) -> Var {
    var h = x
    let layers = c.layerSizes.count - 1
    for i in 0..<layers {
      h = tape.dense(h, "layers.\(i)", bias: true, weight, &recorder)
      guard i < layers - 1 else { break }
      if c.layerNorm {
        h = tape.layerNorm(h, gamma: weight("layers.\(i).norm.weight"), beta: weight("layers.\(i).norm.bias"), epsilon: 1e-5)
      }
      h = tape.activation(c.activation, h)
      recorder.record("layers.\(i).hidden", h)
    }
    return h
  }
}

extension Network {
  /// A freshly initialised MLP, as PyTorch's `nn.Linear` does: weights and biases uniform in
  /// `±1/sqrt(fan_in)`; LayerNorm weights 1 and biases 0. Deterministic in `seed`.
  public static func initializedMLP(_ c: MLPConfig, seed: UInt64) -> Network<T> {
    var tensors: [String: Tensor] = [:]
    for (name, shape) in mlpShapes(c) {
      if name.contains(".norm.") {
        tensors[name] = Tensor(shape: shape, scalars: [Float](repeating: name.hasSuffix("weight") ? 1 : 0, count: shape[0]))
        continue
      }
      let layer = Int(name.split(separator: ".")[1])!
      let bound = 1 / Float(c.layerSizes[layer]).squareRoot()
      let rng = CounterRNG(seed: seed, stream: name)
      tensors[name] = Tensor(shape: shape, scalars: (0..<shape.reduce(1, *)).map { (2 * rng.uniform(UInt64($0)) - 1) * bound })
    }
    return Network(config: .mlp(c), weights: tensors.mapValues { Matrix($0) })
  }
}

extension Network {
  /// The weights as tensors with the checkpoint's names and shapes, in the architecture's order.
  public var tensors: [(name: String, tensor: Tensor)] {
    Self.expectedShapes(config, prefix: prefix).map { name, shape in (name, weights[name]!.tensor(shape: shape)) }
  }
}
