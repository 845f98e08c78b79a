import Foundation

/// A model's architecture and sizes, read from a Hugging Face `config.json` (or our MLP config).
public enum NetworkConfig: Equatable, Sendable {
  case mlp(MLPConfig)
  case decoder(DecoderConfig)
  case bert(BERTConfig)

  /// Parses config.json bytes. Throws `NetsError` naming the missing or bad key.
  public init(json: Data) throws {
    guard let object = try? JSONSerialization.jsonObject(with: json), let dictionary = object as? [String: Any] else {
      throw NetsError.invalidConfig(key: "(root)", reason: "not a JSON object")
    }
    let keys = ConfigKeys(dictionary)
    // A folder only mergekit runs keeps its own architecture aside (`markedAsOurs`).
    let named = (dictionary[Self.originalKey] as? [String: Any]) ?? dictionary
    let architecture =
      (named["architectures"] as? [String])?.first ?? (named["model_type"] as? String) ?? "(none given)"
    switch architecture.lowercased() {
    case "mlp":
      self = .mlp(try MLPConfig(keys))
    case let name where DecoderConfig.Family(architecture: name) != nil:
      self = .decoder(try DecoderConfig(keys, family: DecoderConfig.Family(architecture: name) ?? .llama))
    case "bertforsequenceclassification":
      var c = try BERTConfig(keys)
      c.classifierLabels = try BERTConfig.labelCount(keys)
      self = .bert(c)
    case "bertmodel", "bertformaskedlm", "bertforpretraining", "bert":
      self = .bert(try BERTConfig(keys))
    default:
      throw NetsError.unknownArchitecture(architecture)
    }
  }
}

extension NetworkConfig {
  /// The config without what training recorded (an MLP's trained classes), so that two models
  /// of one architecture compare equal.
  public var architecture: NetworkConfig {
    if case .mlp(let c) = self { return .mlp(c.architecture) }
    return self
  }

  /// What the config declares that is counted in tensor names: its layers (decoders, BERT), its
  /// heads (a multi-head MLP) or a partially zipped decoder's tails, each with the indices the
  /// names must hold, the config key and the tensor-name prefixes the index follows.
  var countedUnits: [(indices: Range<Int>, key: String, unit: String, prefixes: [String])] {
    switch self {
    case .mlp(let c): return c.heads > 1 ? [(0..<c.heads, "heads", "heads", ["heads."])] : []
    case .decoder(let c) where c.tails > 1:
      return [
        (0..<c.sharedLayers, "shared_layers", "shared layers", ["model.layers."]),
        (0..<c.tails, "tails", "tails", ["tails."]),
        (c.sharedLayers..<c.layerCount, "num_hidden_layers", "layers of tail 0", ["tails.0.model.layers."]),
      ]
    case .decoder(let c): return [(0..<c.layerCount, "num_hidden_layers", "layers", ["model.layers."])]
    case .bert(let c):
      return [(0..<c.layerCount, "num_hidden_layers", "layers", ["encoder.layer.", "bert.encoder.layer."])]
    }
  }

  /// Checks that a checkpoint with tensors `names` holds the layers (or heads, or tails) this
  /// config declares, before anything is sized by the config: a config.json claiming a billion
  /// layers fails here at once instead of building a billion tensor names. An MLP's layer sizes
  /// are listed in the file itself, so only its heads are counted.
  public func checkLayers(against names: [String]) throws {
    for (indices, key, unit, prefixes) in countedUnits {
      var present = Set<Int>()
      for name in names {
        for prefix in prefixes where name.hasPrefix(prefix) {
          let digits = name.dropFirst(prefix.count).prefix { $0.isASCII && $0.isNumber }
          if let index = Int(digits), indices.contains(index) { present.insert(index) }
        }
      }
      guard present.count == indices.count else {
        // The first index without tensors lies within indices.count + 1 of the start (pigeonhole).
        let missing =
          (indices.lowerBound...(indices.lowerBound + present.count)).first { !present.contains($0) }
          ?? indices.lowerBound
        throw NetsError.invalidConfig(
          key: key,
          reason:
            "declares \(indices.count) \(unit) but the checkpoint holds tensors for \(present.count) of them "
            + "(none for number \(missing)); the config does not describe this checkpoint")
      }
    }
  }

  /// The factored linear layers a config.json declares (PELA): `"low_rank": {"ranks": {layer: r}}`;
  /// empty when there is no such key.
  public static func lowRankRanks(json: Data) throws -> [String: Int] {
    guard let object = try? JSONSerialization.jsonObject(with: json) as? [String: Any] else {
      throw NetsError.invalidConfig(key: "(root)", reason: "not a JSON object")
    }
    guard let section = object["low_rank"] else { return [:] }
    guard let ranks = (section as? [String: Any])?["ranks"] as? [String: Any] else {
      throw NetsError.invalidConfig(key: "low_rank", reason: "expected {\"ranks\": {layer: rank}}")
    }
    return try ranks.mapValues { raw in
      guard let number = raw as? NSNumber, let r = Int(exactly: number.doubleValue), r >= 1 else {
        throw NetsError.invalidConfig(key: "low_rank.ranks", reason: "ranks are positive integers, found \(raw)")
      }
      return r
    }
  }

  /// config.json bytes with `low_rank` set to `ranks` (and what made them), other keys kept.
  public static func addingLowRank(to json: Data, ranks: [String: Int], method: String) throws -> Data {
    guard var object = try? JSONSerialization.jsonObject(with: json) as? [String: Any] else {
      throw NetsError.invalidConfig(key: "(root)", reason: "not a JSON object")
    }
    object["low_rank"] = ["method": method, "ranks": ranks] as [String: Any]
    return try JSONSerialization.data(
      withJSONObject: markedAsOurs(object, format: "\(method)-factored"), options: [.prettyPrinted, .sortedKeys])
  }

  /// config.json bytes of a partially zipped decoder: the models' config with `tails` and
  /// `shared_layers` set, marked as ours (transformers cannot run a trunk with several tails).
  public static func addingTails(to json: Data, _ c: DecoderConfig) throws -> Data {
    guard var object = try? JSONSerialization.jsonObject(with: json) as? [String: Any] else {
      throw NetsError.invalidConfig(key: "(root)", reason: "not a JSON object")
    }
    object["tails"] = c.tails
    object["shared_layers"] = c.sharedLayers
    return try JSONSerialization.data(
      withJSONObject: markedAsOurs(object, format: "zipit-partial"), options: [.prettyPrinted, .sortedKeys])
  }

  /// Where a config marked by `markedAsOurs` keeps its own `model_type` and `architectures`.
  public static let originalKey = "mergekit_original"

  /// `config` marked as a model only mergekit runs (PELA's factored layers, MatryoshkaKV's
  /// projections): transformers would load such a folder as the plain architecture with the
  /// extra tensors ignored or missing, a wrong model without an error. With `model_type`
  /// `mergekit-<format>` it refuses the folder, naming that type; the original `model_type` and
  /// `architectures` move under `mergekit_original`, which `init(json:)` reads. An MLP config
  /// (no transformers model) is returned as it is.
  public static func markedAsOurs(_ config: [String: Any], format: String) -> [String: Any] {
    guard config["model_type"] as? String != "mlp", config[originalKey] == nil else { return config }
    var marked = config
    var original: [String: Any] = [:]
    for key in ["model_type", "architectures"] where config[key] != nil { original[key] = config[key] }
    marked[originalKey] = original
    marked["model_type"] = "mergekit-\(format)"
    marked["architectures"] = ["MergekitModel"]
    return marked
  }
}

/// Typed reads of config keys, with errors naming the key (with `path`, the object it sits in:
/// `rope_parameters.factor`).
struct ConfigKeys {
  /// The largest size or count a config key may hold (2^26: above every real vocabulary,
  /// width, layer count and context length), so products of two sizes never overflow.
  static let maxSize = 1 << 26
  let values: [String: Any]
  let path: String
  init(_ values: [String: Any], path: String = "") {
    self.values = values
    self.path = path
  }

  /// The full name of `key` for messages.
  func name(_ key: String) -> String { path + key }

  /// The value of `key`, nil when absent or JSON null.
  func present(_ key: String) -> Any? {
    guard let raw = values[key], !(raw is NSNull) else { return nil }
    return raw
  }

  func int(_ key: String, default value: Int? = nil) throws -> Int {
    guard let raw = present(key) else {
      if let value { return value }
      throw NetsError.missingConfigKey(name(key))
    }
    guard let number = raw as? NSNumber, !Self.isBoolean(number), let exact = Int(exactly: number.doubleValue),
      exact > 0,
      exact <= ConfigKeys.maxSize
    else {
      throw NetsError.invalidConfig(
        key: name(key), reason: "expected a positive integer up to \(ConfigKeys.maxSize), found \(raw)")
    }
    return exact
  }

  /// `key` as a positive integer, nil when absent or null.
  func optionalInt(_ key: String) throws -> Int? { present(key) == nil ? nil : try int(key) }

  /// A finite number at least `minimum` (above it with `exclusive`): an epsilon of -1 or a rotary
  /// base of 0 would give NaN or meaningless outputs without any error.
  func double(_ key: String, default value: Double, minimum: Double = 0, exclusive: Bool = false) throws -> Double {
    try optionalDouble(key, minimum: minimum, exclusive: exclusive) ?? value
  }

  /// `double` without a default: nil when absent or null.
  func optionalDouble(_ key: String, minimum: Double = 0, exclusive: Bool = false) throws -> Double? {
    guard let raw = present(key) else { return nil }
    guard let number = raw as? NSNumber, !Self.isBoolean(number), number.doubleValue.isFinite,
      exclusive ? number.doubleValue > minimum : number.doubleValue >= minimum
    else {
      throw NetsError.invalidConfig(
        key: name(key), reason: "expected a finite number \(exclusive ? ">" : ">=") \(minimum), found \(raw)")
    }
    return number.doubleValue
  }

  func bool(_ key: String, default value: Bool) -> Bool { (values[key] as? Bool) ?? value }

  /// `key` as true or false; anything else present (a string "true", a number) is an error,
  /// since guessing would silently change the model.
  func flag(_ key: String, default value: Bool) throws -> Bool {
    guard let raw = present(key) else { return value }
    guard let number = raw as? NSNumber, Self.isBoolean(number) else {
      throw NetsError.invalidConfig(key: name(key), reason: "expected true or false, found \(raw)")
    }
    return number.boolValue
  }

  /// Whether JSON gave `true`/`false` (Foundation's booleans are `char` numbers) rather than a number.
  static func isBoolean(_ number: NSNumber) -> Bool {
    let type = String(cString: number.objCType)
    return type == "c" || type == "B"
  }

  /// `key` as a string, nil when absent or null.
  func string(_ key: String) throws -> String? {
    guard let raw = present(key) else { return nil }
    guard let text = raw as? String else {
      throw NetsError.invalidConfig(key: name(key), reason: "expected a string, found \(raw)")
    }
    return text
  }

  /// `key` as a JSON object, nil when absent or null.
  func object(_ key: String) throws -> ConfigKeys? {
    guard let raw = present(key) else { return nil }
    guard let object = raw as? [String: Any] else {
      throw NetsError.invalidConfig(key: name(key), reason: "expected an object, found \(raw)")
    }
    return ConfigKeys(object, path: name(key) + ".")
  }

  func activation(_ key: String, default value: String) throws -> Activation {
    let name = (values[key] as? String) ?? value
    guard let activation = Activation(configName: name) else {
      throw NetsError.invalidConfig(key: self.name(key), reason: "unknown activation '\(name)'")
    }
    return activation
  }
}

/// Our MLP: `layer_sizes` [input, hidden..., output]; each hidden layer is linear, optional
/// LayerNorm, activation. Tensors `layers.{i}.weight` (out x in), `layers.{i}.bias`, and
/// `layers.{i}.norm.weight`/`.bias` with `layer_norm`.
///
/// A multi-head MLP (partial zipping) shares its first `shared_layers` linear layers and gives
/// each of its `heads` its own copy of the rest, named `heads.{h}.layers.{i}...` (the global
/// layer index `i`). Its heads either share one label space (`head_outputs: best`, the
/// default: every class is scored by its most confident head) or each has its own classes
/// (`head_outputs: stacked`: the output is the heads' log-softmax side by side, head h's class
/// c at `h * classes + c`).
///
/// `trained_classes` (written by `train`) lists the labels the model was trained on, so that
/// `zip` can tell models that share one label space from models with their own labels.
public struct MLPConfig: Equatable, Sendable {
  public var layerSizes: [Int]
  public var activation: Activation
  public var layerNorm: Bool
  public var heads: Int
  /// Linear layers shared by all heads (all of them when there is one head).
  public var sharedLayers: Int
  /// Whether a multi-head MLP's heads each have their own classes (outputs side by side).
  public var stackedHeads: Bool
  /// The labels seen in training (sorted), when known.
  public var trainedClasses: [Int]?

  public init(
    layerSizes: [Int], activation: Activation = .relu, layerNorm: Bool = false, heads: Int = 1,
    sharedLayers: Int? = nil,
    stackedHeads: Bool = false, trainedClasses: [Int]? = nil
  ) {
    self.layerSizes = layerSizes
    self.activation = activation
    self.layerNorm = layerNorm
    self.heads = heads
    self.sharedLayers = heads == 1 ? layerSizes.count - 1 : (sharedLayers ?? layerSizes.count - 1)
    self.stackedHeads = heads > 1 && stackedHeads
    self.trainedClasses = trainedClasses
  }

  /// Linear layers in all (per head).
  public var layerCount: Int { layerSizes.count - 1 }

  /// Classes the model scores: the output layer's width, times the heads when they are stacked.
  public var outputWidth: Int { (layerSizes.last ?? 0) * (stackedHeads ? heads : 1) }

  /// The architecture alone (what training recorded left out), to compare models' shapes.
  public var architecture: MLPConfig {
    var a = self
    a.trainedClasses = nil
    return a
  }

  /// Tensor name prefix of linear layer `i` for head `h`.
  public func prefix(layer i: Int, head h: Int) -> String {
    i < sharedLayers ? "layers.\(i)" : "heads.\(h).layers.\(i)"
  }

  init(_ keys: ConfigKeys) throws {
    guard let sizes = keys.values["layer_sizes"] as? [Int] else { throw NetsError.missingConfigKey("layer_sizes") }
    guard sizes.count >= 2, sizes.allSatisfy({ $0 > 0 && $0 <= ConfigKeys.maxSize }) else {
      throw NetsError.invalidConfig(
        key: "layer_sizes", reason: "needs at least an input and an output size, all positive (up to 2^26)")
    }
    let heads = try keys.int("heads", default: 1)
    let shared = keys.values["shared_layers"] == nil ? sizes.count - 1 : (keys.values["shared_layers"] as? Int ?? -1)
    guard heads == 1 || (0..<(sizes.count - 1)).contains(shared) else {
      throw NetsError.invalidConfig(
        key: "shared_layers",
        reason: "a multi-head MLP shares between 0 and \(sizes.count - 2) of its \(sizes.count - 1) layers")
    }
    let headOutputs = keys.values["head_outputs"] as? String ?? "best"
    guard ["best", "stacked"].contains(headOutputs) else {
      throw NetsError.invalidConfig(key: "head_outputs", reason: "is '\(headOutputs)'; expected best or stacked")
    }
    var trained: [Int]?
    if let value = keys.values["trained_classes"] {
      guard let classes = value as? [Int], classes.allSatisfy({ (0..<ConfigKeys.maxSize).contains($0) }) else {
        throw NetsError.invalidConfig(key: "trained_classes", reason: "is not a list of class indices")
      }
      trained = Array(Set(classes)).sorted()
    }
    self.init(
      layerSizes: sizes, activation: try keys.activation("hidden_act", default: "relu"),
      layerNorm: keys.bool("layer_norm", default: false), heads: heads, sharedLayers: shared,
      stackedHeads: headOutputs == "stacked", trainedClasses: trained)
  }

  /// The config.json text for this MLP.
  public var json: String {
    var heads = self.heads == 1 ? "" : ",\n  \"heads\": \(self.heads),\n  \"shared_layers\": \(sharedLayers)"
    if stackedHeads { heads += ",\n  \"head_outputs\": \"stacked\"" }
    if let trainedClasses {
      heads += ",\n  \"trained_classes\": [\(trainedClasses.map(String.init).joined(separator: ", "))]"
    }
    return """
      {
        "architectures": ["MLP"],
        "model_type": "mlp",
        "layer_sizes": [\(layerSizes.map(String.init).joined(separator: ", "))],
        "hidden_act": "\(activation.rawValue)",
        "layer_norm": \(layerNorm)\(heads)
      }

      """
  }
}

/// BERT encoders: sizes, LayerNorm epsilon, activation, position and token-type tables; for
/// `BertForSequenceClassification`, the number of labels of its head.
public struct BERTConfig: Equatable, Sendable {
  public var vocabularySize, hiddenSize, intermediateSize, layerCount, headCount, maxPositions, typeVocabularySize: Int
  public var epsilon: Double
  public var activation: Activation
  /// Labels of the classification head (pooler on the first token, then `classifier`); nil:
  /// an encoder whose output is the mean of its last hidden states.
  public var classifierLabels: Int?
  /// `is_decoder`: attention sees only earlier tokens (transformers' BERT as a decoder).
  public var causal: Bool

  /// `num_labels`, else the size of `id2label`, else 2 (transformers' default).
  static func labelCount(_ keys: ConfigKeys) throws -> Int {
    if keys.values["num_labels"] != nil { return try keys.int("num_labels") }
    if let map = keys.values["id2label"] as? [String: Any], !map.isEmpty {
      guard map.count <= ConfigKeys.maxSize else {
        throw NetsError.invalidConfig(key: "id2label", reason: "has \(map.count) labels")
      }
      return map.count
    }
    return 2
  }

  init(_ keys: ConfigKeys) throws {
    vocabularySize = try keys.int("vocab_size")
    hiddenSize = try keys.int("hidden_size")
    intermediateSize = try keys.int("intermediate_size")
    layerCount = try keys.int("num_hidden_layers")
    headCount = try keys.int("num_attention_heads")
    maxPositions = try keys.int("max_position_embeddings", default: 512)
    typeVocabularySize = try keys.int("type_vocab_size", default: 2)
    epsilon = try keys.double("layer_norm_eps", default: 1e-12)
    activation = try keys.activation("hidden_act", default: "gelu")
    causal = try keys.flag("is_decoder", default: false)
    // transformers 4 reads it (relative position scores); 5 dropped everything but absolute.
    if let kind = try keys.string("position_embedding_type"), kind != "absolute" {
      throw NetsError.invalidConfig(
        key: "position_embedding_type", reason: "'\(kind)' position embeddings are not supported (only absolute)")
    }
    guard hiddenSize % headCount == 0 else {
      throw NetsError.invalidConfig(
        key: "num_attention_heads", reason: "\(headCount) does not divide hidden_size \(hiddenSize)")
    }
  }
}
