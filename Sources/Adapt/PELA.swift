import Foundation
import Nets
import Tensor

/// PELA (Guo et al., CVPR 2024): every selected linear layer `y = W x + b` becomes two,
/// `y = B (A x) + b`, from the truncated SVD of W (singular values split evenly), then the
/// factored model is distilled from the original (`PELA+Distillation.swift`).
public enum PELA {
  public struct Options: Sendable {
    public var rule: RankRule = .keep(0.5)
    /// A regular expression on layer names (a weight's name without `.weight`); nil: the
    /// architecture's attention and MLP projections (`defaultLayers`).
    public var select: String?
    public var solver: LowRank.Solver = .automatic
    /// Layers with fewer outputs stay dense (as in the official code).
    public var minimumOutputs = 10
    public var seed: UInt64 = 0
    public init(rule: RankRule = .keep(0.5)) { self.rule = rule }
  }

  /// What happened to one candidate layer.
  public struct LayerReport: Sendable {
    public let layer: String
    public let rows: Int
    public let columns: Int
    /// nil: left dense (see `reason`).
    public let rank: Int?
    public let reason: String?
    /// `|W - B A|_F / |W|_F`.
    public let relativeError: Double?

    /// A factored layer, with its error from the factors.
    public init(layer: String, rows: Int, columns: Int, factors: LowRankFactors) {
      (self.layer, self.rows, self.columns, rank, reason) = (layer, rows, columns, factors.rank, nil)
      relativeError = factors.totalEnergy > 0 ? (factors.discardedEnergy / factors.totalEnergy).squareRoot() : 0
    }

    /// A layer left dense, and why.
    public init(layer: String, rows: Int, columns: Int, denseBecause reason: String?) {
      (self.layer, self.rows, self.columns, rank, self.reason, relativeError) = (layer, rows, columns, nil, reason, nil)
    }

    public var parametersBefore: Int { rows * columns }
    public var parametersAfter: Int { rank.map { $0 * (rows + columns) } ?? rows * columns }
  }

  /// Layer names of the attention and MLP projections of the architectures Hugging Face names
  /// this way (Llama, Mistral, Qwen2, BERT, GPT-2, ViT-style `fc1`/`fc2`): never embeddings,
  /// norms, poolers or heads.
  public static let defaultLayerPattern =
    #"(\.|^)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense|fc1|fc2|c_attn|c_proj|c_fc|qkv|proj)$"#
  static let neverFactored = #"(norm|embed|head|pooler|classifier|patch|lm_head)"#

  /// The candidate layers among a checkpoint's 2-D weights (name to `[out, in]`), in the order
  /// given. `config`, when known, refines the default: an MLP's hidden layers, not its output layer.
  public static func candidateLayers(
    _ weights: [(name: String, shape: [Int])], config: NetworkConfig? = nil, options: Options
  ) throws -> [String] {
    let chosen: Regex<AnyRegexOutput>
    do { chosen = try Regex(options.select ?? defaultLayerPattern) } catch {
      throw AdaptError.badPattern(options.select ?? "", reason: "\(error)")
    }
    let excluded = try Regex(neverFactored)
    var mlpHidden: Set<String>?
    if options.select == nil, case .mlp(let c)? = config, c.heads == 1 {
      mlpHidden = Set((0..<(c.layerCount - 1)).map { c.prefix(layer: $0, head: 0) })
    }
    return weights.compactMap { name, shape in
      guard name.hasSuffix(".weight"), shape.count == 2 else { return nil }
      let layer = String(name.dropLast(7))
      if let mlpHidden { return mlpHidden.contains(layer) ? layer : nil }
      guard layer.contains(chosen) else { return nil }
      if options.select == nil && layer.contains(excluded) { return nil }
      return layer
    }
  }

  /// Factors one layer's weight, or says why it stays dense.
  public static func factor(layer: String, weight: Tensor, options: Options) throws -> (
    factors: LowRankFactors?, report: LayerReport
  ) {
    let (rows, columns) = (weight.shape[0], weight.shape[1])
    let spectrum = options.rule.needsSpectrum && rows >= options.minimumOutputs ? try LAPACK.svd(weight) : nil
    let planned = plannedRank(
      rows: rows, columns: columns, options: options, singularValues: spectrum?.s.map(Double.init) ?? [])
    guard let rank = planned.rank else {
      return (nil, LayerReport(layer: layer, rows: rows, columns: columns, denseBecause: planned.reason))
    }
    let factors = try LowRank.factor(weight, rank: rank, solver: options.solver, seed: options.seed, spectrum: spectrum)
    return (factors, LayerReport(layer: layer, rows: rows, columns: columns, factors: factors))
  }

  /// The rank a `rows x columns` layer gets, or nil and why it stays dense: fewer outputs than
  /// `minimumOutputs`, or a rank whose two factors would not hold fewer parameters. The energy
  /// rule needs the layer's singular values (descending).
  public static func plannedRank(rows: Int, columns: Int, options: Options, singularValues: [Double] = []) -> (
    rank: Int?, reason: String?
  ) {
    guard rows >= options.minimumOutputs else { return (nil, "fewer than \(options.minimumOutputs) outputs") }
    let r = options.rule.rank(rows: rows, columns: columns, singularValues: singularValues)
    return RankRule.saves(rank: r, rows: rows, columns: columns)
      ? (r, nil) : (nil, "rank \(r) would not save parameters")
  }

  /// The factored network: every candidate layer that saves parameters becomes `L.0.weight` (A),
  /// `L.1.weight` (B) and `L.1.bias`, and `lowRank` records its rank. Throws when no layer is selected.
  public static func factor(_ network: Network<Float>, options: Options, progress: ((Int, Int) -> Void)? = nil) throws
    -> (network: Network<Float>, layers: [LayerReport])
  {
    guard network.lowRank.isEmpty else { throw AdaptError.alreadyFactored }
    let tensors = network.tensors
    let layers = try candidateLayers(
      tensors.map { ($0.name, $0.tensor.shape) }, config: network.config, options: options)
    guard !layers.isEmpty else { throw AdaptError.noLayers(options.select ?? "the default layers") }
    var out = Dictionary(uniqueKeysWithValues: tensors.map { ($0.name, $0.tensor) })
    var ranks: [String: Int] = [:]
    var reports: [LayerReport] = []
    for (i, layer) in layers.enumerated() {
      let (factors, report) = try factor(layer: layer, weight: try out.required(layer + ".weight"), options: options)
      reports.append(report)
      progress?(i + 1, layers.count)
      guard let factors else { continue }
      out[layer + ".weight"] = nil
      out[layer + ".0.weight"] = factors.a
      out[layer + ".1.weight"] = factors.b
      if let bias = out.removeValue(forKey: layer + ".bias") { out[layer + ".1.bias"] = bias }
      ranks[layer] = factors.rank
    }
    return (try Network(config: network.config, tensors: out, lowRank: ranks), reports)
  }

  /// The dense equivalent of a factored network (`W = B A`), runnable by any tool.
  public static func densified(_ network: Network<Float>) throws -> Network<Float> {
    var out = Dictionary(uniqueKeysWithValues: network.tensors.map { ($0.name, $0.tensor) })
    for layer in network.lowRank.keys {
      let (b, a) = (try out.required(layer + ".1.weight"), try out.required(layer + ".0.weight"))
      (out[layer + ".1.weight"], out[layer + ".0.weight"]) = (nil, nil)
      out[layer + ".weight"] = BLAS.matmul(b, a)
      if let bias = out.removeValue(forKey: layer + ".1.bias") { out[layer + ".bias"] = bias }
    }
    return try Network(config: network.config, tensors: out)
  }

  /// Total parameters of the linear layers considered and of the whole network.
  public static func parameterCount(_ network: Network<Float>) -> Int {
    network.weights.values.reduce(0) { $0 + $1.count }
  }
}

/// Errors of the adaptation methods, naming the layer, pattern or value at fault.
public enum AdaptError: Error, CustomStringConvertible, Equatable {
  /// A layer pattern that is not a regular expression.
  case badPattern(String, reason: String)
  /// No linear layer matches the selection.
  case noLayers(String)
  /// PELA on a model that is already factored.
  case alreadyFactored
  /// An option's value does not suit the model: the option (by its parameter name), the value
  /// and what it must be.
  case invalidOption(name: String, value: String, reason: String)
  /// The model is not one the method works on.
  case unsupportedModel(method: String, reason: String)
  /// The method needs data it was not given (or the data is empty).
  case missingData(method: String, needed: String)
  /// The inputs leave the method nothing to do.
  case nothingToDo(method: String, reason: String)

  public var description: String {
    switch self {
    case .badPattern(let p, let reason): return "'\(p)' is not a valid regular expression: \(reason)"
    case .noLayers(let what):
      return
        "no linear layer matches \(what); give select, a pattern of layer names (a weight's name without .weight)"
    case .alreadyFactored:
      return "the model is already factored (its config.json has low_rank); factor the original model"
    case .invalidOption(let name, let value, let reason): return "\(name) \(value): \(reason)"
    case .unsupportedModel(let method, let reason): return "\(method): \(reason)"
    case .missingData(let method, let needed): return "\(method) needs \(needed)"
    case .nothingToDo(let method, let reason): return "\(method): \(reason)"
    }
  }
}
