import Checkpoint
import Foundation
import Merge
import Nets

/// `zip`: ZipIt! for MLPs (full or partial zipping) and Llama-style decoders.
public struct ZipOperation: MergekitOperation {
  public init() {}
  public let name = "zip"
  public let summary =
    "ZipIt!: merge MLPs trained on different tasks (and from different inits) by matching their features."
  public let discussion = """
    Runs every model over the data's features (labels unused) to correlate their hidden \
    features, matches them (zipit: greedy zip across and within models; permute: one-to-one \
    Hungarian matching to the first model; average: same-index units), and folds the matching \
    into the weights. stop_at K zips the first K hidden layers and keeps the rest of every \
    model as a head (partial zipping); keep_heads keeps separate output layers after zipping \
    every hidden layer. label_space says how the models' classes combine: stacked (each \
    model numbers its own classes; the result has all of them side by side, model i's class c \
    at i C + c), shared (one label space: the output layers are averaged; heads compete by \
    confidence) or auto (models whose config.json records trained_classes, as train writes, \
    share one label space and each class comes from the models trained on it; otherwise \
    stacked). Llama-style \
    decoders are zipped from token sequences: heads are aligned across the models, then the \
    residual stream (one merge point), every layer's MLP hidden units and each KV head's value \
    features are matched; queries and keys of aligned heads are averaged; stop_at K zips the \
    first K layers into a trunk and keeps each model's other layers, norm and head as a tail \
    (the output is the tails' mean next-token probability; mergekit runs it, transformers \
    cannot). BERT encoders too: \
    heads aligned, then the residual stream, MLP hidden units, and each head's query/key \
    features (jointly) and value features are matched. \
    Paper: Stoica, Bolya et al., ZipIt!, ICLR 2024 (arXiv:2305.03053).
    """
  public let inputs = OperationInputs(
    models: 2...Int.max, modelHelp: "two or more MLPs, Llama-style decoders or BERT encoders of one architecture",
    data: .optional,
    dataHelp: "features (.safetensors, .csv, .npy) for MLPs, token sequences (.jsonl) for transformers; labels unused")
  public let output = OutputKind.model
  public let parameters: [ParameterSpec] =
    ParameterSpec.labelledDataSpecs + [
      .path("stats", help: "statistics from `mergekit stats A B --at 'hidden$'` instead of data (MLPs)"),
      .choice(
        "method", ZipIt.Method.allCases.map(\.rawValue), default: "zipit", help: "matching: zipit, permute or average"),
      .number(
        "alpha", .global, in: ParameterSpec.nonNegative, default: 0.3,
        help: "ZipIt's alpha: how strongly a merged feature competes again (0 never)"),
      .number(
        "beta", .global, in: 0...1, default: 0.125,
        help: "ZipIt's beta: share of each model's merges allowed within itself"),
      .integer(
        "stop_at", in: 1...1 << 20, default: nil, optional: true,
        help:
          "zip only the first K hidden layers (MLPs) or layers (decoders), 1...; the rest of each model becomes "
          + "a head (a decoder's tail)"),
      .flag("keep_heads", default: false, help: "keep each model's output layer (a decoder's norm and head) as a head"),
      .choice(
        "label_space", ["auto", "stacked", "shared"], default: "auto",
        help:
          "MLP outputs: stacked (each model's own classes, side by side), shared (one label space, averaged), "
          + "auto (shared, class by class, when every model records its trained classes; else stacked)"),
    ]

  public func check(_ request: OperationRequest) throws {
    let hasStats = request.parameters.isGiven("stats")
    guard (request.data == nil) != !hasStats else {
      throw OperationError.conflict(
        operation: name, name: "stats", reason: "give the data or its statistics (stats), one of them")
    }
  }

  public func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult {
    let p = request.parameters
    let networks = try request.models.map { try NetworkFiles.load($0) }
    var options = ZipIt.Options()
    options.method = ZipIt.Method(rawValue: p.text("method")) ?? .zipit
    (options.alpha, options.beta, options.stop, options.keepHeads) = (
      p.double("alpha"), p.double("beta"), p.optionalInt("stop_at"), p.flag("keep_heads")
    )
    let output = try request.requireOutput()
    // Transformers are zipped whole from token sequences: what differs is the zipper and its points.
    let transformer:
      (kind: String, points: String, zip: ([Network<Float>], [[Int]], ZipIt.Options) throws -> Network<Float>)?
    switch networks[0].config {
    case .bert:
      transformer = (
        "BERT encoders", "residual stream, MLP hidden units, each head's query/key and value features",
        { try ZipIt.zipBERT($0, sequences: $1, options: $2) }
      )
    case .decoder:
      transformer = (
        "decoders", "residual stream, MLP hidden units and value features",
        { try ZipIt.zipDecoders($0, sequences: $1, options: $2) }
      )
    case .mlp: transformer = nil
    }
    if let transformer {
      let partial = options.stop != nil || options.keepHeads
      guard let data = request.data, !p.isGiven("label_space"), !partial || transformer.kind == "decoders" else {
        throw OperationError.conflict(
          operation: name, name: "stats",
          reason:
            "\(transformer.kind) are zipped from token data; stats and label_space are for MLPs, "
            + "stop_at and keep_heads for MLPs and decoders")
      }
      let zipped = try transformer.zip(networks, try DataFiles.readTokens(data), options)
      var tails: String?
      if case .decoder(let c) = zipped.config, c.tails > 1 {
        tails =
          "the first \(c.sharedLayers) of \(c.layerCount) layers zipped into a shared trunk, then one tail per model"
      }
      let card = ModelCard.adaptation(
        method: "zipit", title: "ZipIt! merge of \(request.models.count) \(transformer.kind)", models: request.models,
        description:
          "`mergekit zip` merged \(request.models.joined(separator: ", ")) by matching their features on token data "
          + "(ZipIt!, arXiv:2305.03053): \(transformer.points) zipped with \(options.method.rawValue). "
          + (tails.map {
            "Partially zipped: \($0) (its remaining layers, final norm and head, reading the trunk's residual stream "
              + "through its unmerge); the output is the tails' mean next-token probability."
          } ?? "The result has the models' architecture."),
        loadsInTransformers: tails == nil,
        howToRun: tails == nil
          ? ModelCard.transformersUsage
          : "`mergekit eval THIS_FOLDER --data TOKENS.jsonl` runs it (transformers has no layout for a trunk with tails)."
      )
      try NetworkFiles.save(zipped, like: request.models[0], to: output, overwrite: context.overwrite, card: card)
      return OperationResult(lines: [
        "\(output): \(options.method.rawValue) of \(networks.count) \(transformer.kind) (\(transformer.points) matched"
          + (tails.map { "; \($0)" } ?? "") + ")"
      ])
    }
    let statistics: [FeatureStatistics]
    if let stats = p.optionalText("stats") {
      statistics = try StatsFiles.mergePoints(
        stats, points: try ZipIt.commonConfig(networks).layerCount - 1, models: networks.count)
    } else {
      if p.isGiven("tasks") || p.isGiven("labels") {
        statistics = try ZipIt.statistics(networks, inputs: try request.labelledData().features)
      } else {
        // Labels are never used: without a task selection the data file need not have them.
        let features = try DataFiles.readFeatures(try request.requireData())
        statistics = try ZipIt.statistics(
          networks, inputs: Matrix(rows: features.rows, columns: features.columns, values: features.values))
      }
    }
    switch p.text("label_space") {
    case "stacked": options.labels = .stacked
    case "shared": options.labels = .shared
    default: options.labels = ZipIt.inferredLabelSpace(networks)
    }
    let zipped = try ZipIt.apply(
      networks, matchings: try ZipIt.matchings(statistics, networks: networks, options: options),
      keepHeads: options.keepHeads, labels: options.labels)
    let card = ModelCard.adaptation(
      method: "zipit", title: "ZipIt! merge of \(networks.count) models", models: request.models,
      description:
        "`mergekit zip` merged \(request.models.joined(separator: ", ")) by matching their features (ZipIt!, "
        + "arXiv:2305.03053) with \(options.method.rawValue).",
      loadsInTransformers: false,
      howToRun: "`mergekit eval THIS_FOLDER --data DATA` runs the zipped MLP (it is not a transformers model).")
    try NetworkFiles.saveMLP(
      zipped, to: output, overwrite: context.overwrite, files: ["README.md": String(decoding: card, as: UTF8.self)])
    guard case .mlp(let c) = zipped.config else { return OperationResult(lines: []) }
    let heads = c.heads > 1 ? ", \(c.heads) heads" : ""
    let classes: String
    switch options.labels {
    case .stacked: classes = "each model's classes stacked (\(c.outputWidth) outputs)"
    case .shared: classes = "one label space of \(c.outputWidth) classes"
    case .trainedClasses: classes = "one label space of \(c.outputWidth) classes, each from the models trained on it"
    }
    return OperationResult(lines: [
      "\(output): \(options.method.rawValue) of \(networks.count) models, \(c.sharedLayers) shared layer\(c.sharedLayers == 1 ? "" : "s")\(heads); \(classes)"
    ])
  }
}
