import Tensor

/// What a network reads: dense feature rows (MLP) or padded token sequences (transformers).
public enum NetworkInput<T: NetScalar> {
  case features(Matrix<T>)
  case tokens(TokenBatch)
  /// A decoder's residual stream entering layer `layer` (one row per token of `batch`, as the
  /// point `model.layers.{layer-1}.output` or `model.embed_tokens.output` records it): the
  /// model runs from that layer on and its output is the residual stream after the last block
  /// (no final norm, no head). For searches that change one layer: the ones before it need
  /// not run again.
  case residual(TokenBatch, layer: Int, hidden: Matrix<T>)
}

/// Token sequences padded to one length: row `b * sequence + s` is token `s` of sequence `b`;
/// `mask` is false on padding (right padding).
public struct TokenBatch: Sendable, Equatable {
  public let ids: [Int]
  public let mask: [Bool]
  public let sequence: Int
  public var batch: Int { ids.count / max(sequence, 1) }

  public init(_ sequences: [[Int]], padding: Int = 0) {
    let length = sequences.map(\.count).max() ?? 0
    var ids: [Int] = []
    var mask: [Bool] = []
    for s in sequences {
      ids += s + Array(repeating: padding, count: length - s.count)
      mask += Array(repeating: true, count: s.count) + Array(repeating: false, count: length - s.count)
    }
    self.ids = ids
    self.mask = mask
    sequence = length
  }

  /// Position of every row within its sequence.
  public var positions: [Int] { ids.indices.map { $0 % sequence } }
}

/// One forward pass: the output node (MLP: class logits; decoder: next-token logits per
/// position; BERT: mean-pooled sentence embeddings) and every named activation point, in
/// order, for capture (`Network.pointNames` lists what exists).
public struct NetworkOutput {
  public let output: Var
  public let points: [(name: String, value: Var)]

  /// The point called `name` (a missing one is `NetsError.missingTensors`).
  public func point(_ name: String) throws -> Var {
    guard let found = points.first(where: { $0.name == name }) else { throw NetsError.missingTensors([name]) }
    return found.value
  }

  /// The points whose names match `pattern` (a regular expression; nil: all).
  public func points(matching pattern: String?) throws -> [(name: String, value: Var)] {
    guard let pattern else { return points }
    let regex = try Regex(pattern)
    return points.filter { $0.name.contains(regex) }
  }
}

/// A model ready to run: its config and weights as matrices (1-D weights are one row).
/// Built from a checkpoint's tensors and config.json; every tensor the architecture needs is
/// checked for presence and shape first.
public struct Network<T: NetScalar> {
  public let config: NetworkConfig
  public var weights: [String: Matrix<T>]
  /// Linear layers stored as two low-rank factors (PELA), by layer name (`layers.0`,
  /// `model.layers.3.mlp.up_proj`), with their rank; empty for a dense model.
  public let lowRank: [String: Int]
  /// MatryoshkaKV projections of the attention keys and values (decoders), with their ranks;
  /// the bases and means are weights (`KVProjection.shapes`).
  public var kvProjection: KVProjection?
  /// Tensor name prefix of BERT checkpoints saved from a task model (`bert.`), else empty.
  let prefix: String
  /// The prefix of this model's tensor names (`bert.` for BERT saved from a task model).
  public var tensorPrefix: String { prefix }

  /// Builds the model. Throws `NetsError.missingTensors` listing every absent tensor, or
  /// `.shapeMismatch` for the first wrong shape. Tensors the architecture does not use are ignored.
  /// `lowRank` names the factored layers (config.json's `low_rank.ranks`, see `NetworkConfig.lowRankRanks`).
  @_specialize(exported:true,where T == Float)
  public init(
    config: NetworkConfig, tensors: [String: Tensor], lowRank: [String: Int] = [:], kvProjection: KVProjection? = nil
  ) throws {
    self.config = config
    self.lowRank = lowRank
    self.kvProjection = kvProjection
    if let kvProjection {
      guard case .decoder(let c) = config else {
        throw NetsError.invalidConfig(key: "kv_projection", reason: "K/V projections apply to decoders")
      }
      try kvProjection.check(c)
    }
    prefix = tensors["bert.embeddings.word_embeddings.weight"] != nil ? "bert." : ""
    let dense = Set(Self.expectedShapes(config, prefix: prefix).map(\.name))
    if let unknown = lowRank.keys.sorted().first(where: { !dense.contains($0 + ".weight") }) {
      throw NetsError.invalidConfig(
        key: "low_rank.ranks", reason: "'\(unknown)' is not a linear layer of this architecture")
    }
    let expected = Self.expectedShapes(config, prefix: prefix, lowRank: lowRank, kvProjection: kvProjection != nil)
    let missing = expected.map(\.name).filter { tensors[$0] == nil }
    guard missing.isEmpty else { throw NetsError.missingTensors(missing) }
    var weights: [String: Matrix<T>] = [:]
    for (name, shape) in expected {
      let tensor = try tensors.required(name)
      guard tensor.shape == shape else {
        throw NetsError.shapeMismatch(tensor: name, expected: shape, found: tensor.shape)
      }
      weights[name] = Matrix(tensor)
    }
    self.weights = weights
  }

  /// Weights already in the architecture's shapes (a freshly initialised model).
  init(config: NetworkConfig, weights: [String: Matrix<T>], lowRank: [String: Int] = [:]) {
    self.config = config
    self.weights = weights
    self.lowRank = lowRank
    prefix = ""
  }

  /// Every tensor the architecture reads, with its shape (the Hugging Face layout). A factored
  /// layer `L` of rank r reads `L.0.weight` (r x in), `L.1.weight` (out x r) and `L.1.bias`
  /// instead of `L.weight` and `L.bias` (the layout of PyTorch's `nn.Sequential` of two linears).
  /// With `kvProjection`, a decoder also reads its K/V projection bases and means.
  public static func expectedShapes(
    _ config: NetworkConfig, prefix: String = "", lowRank: [String: Int] = [:], kvProjection: Bool = false
  ) -> [(name: String, shape: [Int])] {
    let dense: [(name: String, shape: [Int])]
    switch config {
    case .mlp(let c): dense = mlpShapes(c)
    case .decoder(let c): dense = decoderShapes(c) + (kvProjection ? KVProjection.shapes(c) : [])
    case .bert(let c): dense = bertShapes(c, prefix: prefix)
    }
    guard !lowRank.isEmpty else { return dense }
    return dense.flatMap { factoredLayout($0.name, shape: $0.shape, lowRank: lowRank) }
  }

  /// The tensors that stand for tensor `name` when the layers in `lowRank` are factored: a
  /// factored layer's weight becomes `L.0.weight` (r x in) and `L.1.weight` (out x r), its bias
  /// `L.1.bias`; any other tensor stays as it is.
  public static func factoredLayout(_ name: String, shape: [Int], lowRank: [String: Int]) -> [(
    name: String, shape: [Int]
  )] {
    if name.hasSuffix(".weight"), shape.count == 2, let r = lowRank[String(name.dropLast(7))] {
      let layer = name.dropLast(7)
      return [(layer + ".0.weight", [r, shape[1]]), (layer + ".1.weight", [shape[0], r])]
    }
    if name.hasSuffix(".bias"), lowRank[String(name.dropLast(5))] != nil {
      return [(name.dropLast(5) + ".1.bias", shape)]
    }
    return [(name, shape)]
  }

  /// Runs the model on `input`. `bind` turns each weight into a tape node (constant, parameter,
  /// or a computed expression such as aTLAS's base plus scaled task vectors); it is called once
  /// per weight name, so tied weights share one node.
  @_specialize(exported:true,where T == Float)
  public func forward(_ tape: Tape<T>, _ input: NetworkInput<T>, bind: (String, Matrix<T>) -> Var) throws
    -> NetworkOutput
  {
    try withoutActuallyEscaping(bind) { try run(tape, input, bind: $0) }
  }

  private func run(_ tape: Tape<T>, _ input: NetworkInput<T>, bind: @escaping (String, Matrix<T>) -> Var) throws
    -> NetworkOutput
  {
    if let kvProjection {
      // Ranks may be changed on a built network (rank search, Matryoshka training): check them here.
      guard case .decoder(let c) = config else {
        throw NetsError.invalidConfig(key: "kv_projection", reason: "K/V projections apply to decoders")
      }
      try kvProjection.check(c)
      let missing = KVProjection.shapes(c).map(\.name).filter { weights[$0] == nil }
      guard missing.isEmpty else { throw NetsError.missingTensors(missing) }
    }
    try checkWeights()
    var bound: [String: Var] = [:]
    let weight = WeightBinder(
      bind: { name in
        if let v = bound[name] { return v }
        guard let value = self.weights[name] else { preconditionFailure("weight '\(name)' was checked present above") }
        let v = bind(name, value)
        bound[name] = v
        return v
      }, lowRank: lowRank, kvProjection: kvProjection)
    var recorder = PointRecorder()
    let output: Var
    switch (config, input) {
    case (.mlp(let c), .features(let x)):
      guard x.columns == c.layerSizes[0] else {
        throw NetsError.featureCount(model: c.layerSizes[0], data: x.columns)
      }
      output = mlpForward(c, tape, tape.constant(x), weight, &recorder)
    case (.decoder(let c), .tokens(let batch)):
      try checkTokens(batch, vocabulary: c.vocabularySize)
      output = decoderForward(c, tape, batch, weight, &recorder)
    case (.decoder(let c), .residual(let batch, let layer, let hidden)):
      guard c.tails == 1, (0..<c.layerCount).contains(layer), hidden.rows == batch.ids.count,
        hidden.columns == c.hiddenSize
      else {
        throw NetsError.wrongInput(
          model:
            "a decoder of \(c.layerCount) layers and width \(c.hiddenSize)\(c.tails > 1 ? " with \(c.tails) tails" : "")",
          takes: "a residual stream of one row per token entering one of its layers (one tail only)")
      }
      output = decoderForward(c, tape, batch, weight, &recorder, from: (layer, tape.constant(hidden)))
    case (.bert(let c), .tokens(let batch)):
      try checkTokens(batch, vocabulary: c.vocabularySize)
      guard batch.sequence <= c.maxPositions else {
        throw NetsError.sequenceTooLong(tokens: batch.sequence, positions: c.maxPositions)
      }
      output = bertForward(c, tape, batch, weight, &recorder)
    case (.mlp, .tokens):
      throw NetsError.wrongInput(model: "an MLP", takes: "feature rows, not token sequences")
    case (_, .features):
      throw NetsError.wrongInput(model: "a transformer", takes: "token sequences, not feature rows")
    case (_, .residual):
      throw NetsError.wrongInput(model: "this model", takes: "token sequences or features, not a residual stream")
    }
    return NetworkOutput(output: output, points: recorder.points)
  }

  /// Runs with the weights for which `trainable` is true as tape parameters (the rest frozen),
  /// and returns those parameters by name, for an optimiser step after `backward`.
  @_specialize(exported:true,where T == Float)
  public func forward(_ tape: Tape<T>, _ input: NetworkInput<T>, trainable: (String) -> Bool) throws -> (
    output: NetworkOutput, parameters: [String: Var]
  ) {
    var parameters: [String: Var] = [:]
    let out = try forward(tape, input) { name, value in
      guard trainable(name) else { return tape.constant(value) }
      let v = tape.parameter(value)
      parameters[name] = v
      return v
    }
    return (out, parameters)
  }

  /// Runs with every weight frozen.
  @_specialize(exported:true,where T == Float)
  public func forward(_ tape: Tape<T>, _ input: NetworkInput<T>) throws -> NetworkOutput {
    try forward(tape, input) { tape.constant($1) }
  }

  private func checkTokens(_ batch: TokenBatch, vocabulary: Int) throws {
    if let bad = batch.ids.first(where: { $0 < 0 || $0 >= vocabulary }) {
      throw NetsError.tokenOutOfVocabulary(token: bad, vocabulary: vocabulary)
    }
  }
}

/// Collects named activation points during a forward pass.
struct PointRecorder {
  var points: [(name: String, value: Var)] = []
  mutating func record(_ name: String, _ value: Var) { points.append((name, value)) }
}

extension Tape {
  /// A linear layer named by its weight's prefix (`model.layers.0.mlp.up_proj`), recording its
  /// input and output as points `<prefix>.input` and `<prefix>.output`.
  /// A factored layer (`weight.lowRank[name] != nil`) runs as `B (A x) + b` with `A = <name>.0.weight`
  /// (r x in, no bias) and `B = <name>.1.weight` (out x r) carrying the bias `<name>.1.bias`.
  @_specialize(where T == Float)
  func dense(_ x: Var, _ name: String, bias: Bool, _ weight: WeightBinder, _ recorder: inout PointRecorder) -> Var {
    recorder.record(name + ".input", x)
    let y: Var
    if weight.lowRank[name] != nil {
      let inner = linear(x, weight: weight(name + ".0.weight"))
      y = linear(inner, weight: weight(name + ".1.weight"), bias: bias ? weight(name + ".1.bias") : nil)
    } else {
      y = linear(x, weight: weight(name + ".weight"), bias: bias ? weight(name + ".bias") : nil)
    }
    recorder.record(name + ".output", y)
    return y
  }
}

/// Turns weight names into tape nodes during one forward pass, and says which linear layers are
/// factored (layer name to rank).
struct WeightBinder {
  let bind: (String) -> Var
  let lowRank: [String: Int]
  let kvProjection: KVProjection?
  func callAsFunction(_ name: String) -> Var { bind(name) }
}
