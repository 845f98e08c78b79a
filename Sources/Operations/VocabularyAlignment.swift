import Checkpoint
import Foundation
import Tensor

/// mergekit's tokenizer settings for a merge (`tokenizer_source`, or the `tokenizer:` block):
/// which tokenizer the output has, tokens to add, where their rows come from, and padding.
public struct TokenizerSettings: Sendable, Equatable {
  /// Where the output's tokenizer comes from.
  public enum Source: Sendable, Equatable {
    /// The base model's (or, without a base, the first model's).
    case base
    /// The base's, with every token of the other models appended.
    case union
    /// A model's (a path or Hugging Face id; it need not be an input).
    case model(String)

    /// `base`, `union` or a model.
    public init(_ text: String) {
      switch text {
      case "base": self = .base
      case "union": self = .union
      default: self = .model(text)
      }
    }
  }

  /// Where a token's embedding row comes from (the `source` of an entry of `tokens`).
  public enum RowSource: Sendable, Equatable {
    /// The row the token has in that model.
    case model(String)
    /// A row of zeros.
    case zero
    /// The row of another token (by text or id) in that model.
    case modelToken(model: String, token: String?, id: Int?)
  }

  /// One entry of `tokens`: the token is added to the output vocabulary if missing, and its row
  /// taken from `source` where a model lacks it (or in every model when `force`).
  public struct Token: Sendable, Equatable {
    public var text: String
    public var source: RowSource?
    public var force: Bool
    public init(text: String, source: RowSource?, force: Bool) {
      (self.text, self.source, self.force) = (text, source, force)
    }
  }

  public var source: Source
  public var tokens: [Token]
  /// Pads the output's rows to a multiple of this (the padding rows are each model's mean row).
  public var padToMultipleOf: Int?

  public init(source: Source, tokens: [Token] = [], padToMultipleOf: Int? = nil) {
    (self.source, self.tokens, self.padToMultipleOf) = (source, tokens, padToMultipleOf)
  }
}

/// The output vocabulary of a merge and, for every input, where each output row of its
/// vocabulary tensors (embeddings, LM head) comes from, as mergekit aligns them: a token the
/// input has keeps the input's row; a token it lacks takes the only model's row that has it,
/// else the base's, else the mean of the models that have it (zero when none has it), unless
/// `tokens` says otherwise. The merge then sees inputs whose rows all mean the same tokens.
///
/// Nothing is materialised: `view(of:input:)` wraps an input checkpoint so that its vocabulary
/// tensors read, range by range, as the aligned rows, which streaming merges consume as usual.
public final class VocabularyAlignment: @unchecked Sendable {
  /// The output's tokens by id (before padding).
  public let tokens: [String]
  /// The output's rows: the tokens, padded to the multiple asked for.
  public let rows: Int
  /// The model folder the output's tokenizer files come from.
  public let tokenizerFolder: String
  /// Tokens appended to that tokenizer's (union and `tokens`), with their entries.
  public let appended: [TokenizerVocabulary.AddedToken]
  /// Tokens of that tokenizer dropped because the model has no row for them.
  public let dropped: [String]
  /// The inputs' paths, in input order (the base first when there is one).
  public let inputs: [String]
  /// Inputs without a tokenizer of their own, taken to have the base's (or first model's)
  /// vocabulary; a caller reports them.
  public let assumed: [String]
  /// Whether the output gets a tokenizer built here (false for `truncating`).
  public let buildsTokenizer: Bool
  /// Per input, per output id: the input's own row (>= 0), or -(k + 1) for `defaults[k]`.
  let table: [[Int32]]
  /// The rows of tokens some input lacks (or forced): shared by every input that takes them.
  let defaults: [DefaultRow]
  /// The inputs' own vocabulary rows (config.json `vocab_size`).
  let inputRows: [Int]
  private let open: (String) throws -> any Checkpoint
  private let lock = NSLock()
  private var opened: [Int: any Checkpoint] = [:]

  enum DefaultRow {
    case zero
    case row(input: Int, row: Int)
    case mean([(input: Int, row: Int)])
  }

  /// Whether every input's rows are already the output's (same tokens on the same ids, no
  /// padding): then the merge reads the tensors as they are.
  public var isIdentity: Bool {
    table.indices.allSatisfy { isIdentity(input: $0) }
  }

  func isIdentity(input: Int) -> Bool {
    rows == tokens.count && inputRows[input] == rows && table[input].enumerated().allSatisfy { Int($1) == $0 }
  }

  /// Builds the alignment of `inputs` (paths; `base` among them when given) under `settings`.
  /// `open` opens an input's checkpoint when a row must be read from it. Throws
  /// `OperationError.vocabulary` for a missing or unreadable tokenizer, a token source that is
  /// not an input, or a token that a source lacks.
  public init(
    settings: TokenizerSettings, base: String?, inputs: [String], open: @escaping (String) throws -> any Checkpoint
  ) throws {
    guard let reference = base ?? inputs.first else {
      throw OperationError.vocabulary(file: "", reason: "there are no models")
    }
    self.inputs = inputs
    self.open = open
    func folder(_ path: String) throws -> String {
      guard let folder = ModelFolder.modelFolder(of: path) else {
        throw OperationError.vocabulary(
          file: path, reason: "is not a model folder, so it has no tokenizer to align vocabularies with")
      }
      return folder
    }
    let baseIndex = inputs.firstIndex(of: reference) ?? 0
    // An input without a tokenizer (a lone weights file, a folder without tokenizer.json) is
    // taken to have the reference's vocabulary, as mergekit assumes when it cannot load one.
    let referenceVocabulary = try TokenizerVocabulary.read(folder: folder(reference))
    var vocabularies: [TokenizerVocabulary] = []
    var assumed: [String] = []
    for path in inputs {
      if path == reference {
        vocabularies.append(referenceVocabulary)
      } else if let found = ModelFolder.modelFolder(of: path), InputFile.isRegularFile(found + "/tokenizer.json") {
        vocabularies.append(try TokenizerVocabulary.read(folder: found))
      } else {
        vocabularies.append(referenceVocabulary)
        assumed.append(path)
      }
    }
    self.assumed = assumed
    buildsTokenizer = true
    inputRows = vocabularies.map(\.rows)

    // The output tokenizer, before additions.
    let outputVocabulary: TokenizerVocabulary
    switch settings.source {
    case .base, .union: outputVocabulary = vocabularies[baseIndex]
    case .model(let path):
      let read =
        try inputs.firstIndex(of: path).map { vocabularies[$0] }
        ?? TokenizerVocabulary.read(folder: folder(path))
      outputVocabulary = read
    }
    tokenizerFolder = outputVocabulary.folder
    dropped = outputVocabulary.unusedTokens
    var tokens = try outputVocabulary.tokensByID()
    var known = outputVocabulary.ids
    var appended: [TokenizerVocabulary.AddedToken] = []
    func append(_ token: TokenizerVocabulary.AddedToken) {
      guard known[token.content] == nil else { return }
      var token = token
      token.id = tokens.count
      known[token.content] = token.id
      tokens.append(token.content)
      appended.append(token)
    }
    if settings.source == .union {
      let order = [baseIndex] + inputs.indices.filter { $0 != baseIndex }
      for i in order {
        let added = Set(vocabularies[i].added.map(\.content))
        for (token, id) in vocabularies[i].ids.sorted(by: { $0.value < $1.value }) where !added.contains(token) {
          append(.plain(token, id: id))
        }
      }
      for i in order { vocabularies[i].added.forEach(append) }
    }
    for token in settings.tokens { append(.plain(token.text, id: 0)) }
    self.tokens = tokens
    self.appended = appended
    let multiple = max(1, settings.padToMultipleOf ?? 1)
    rows = (tokens.count + multiple - 1) / multiple * multiple

    // Per input, the row of each output token, or -1.
    let own: [[Int32]] = vocabularies.map { vocabulary in tokens.map { Int32(vocabulary.ids[$0] ?? -1) } }
    let configured = Dictionary(settings.tokens.map { ($0.text, $0) }) { first, _ in first }
    func input(_ path: String, for token: String) throws -> Int {
      guard let index = inputs.firstIndex(of: path) else {
        throw OperationError.vocabulary(
          file: path, reason: "is the source of token \(jsonStringLiteral(token)) but not one of the merged models")
      }
      return index
    }
    var defaults: [DefaultRow] = []
    var defaultOf: [Int: Int] = [:]
    for (id, token) in tokens.enumerated() {
      let setting = configured[token]
      let holders = inputs.indices.filter { own[$0][id] >= 0 }
      guard setting?.force == true || holders.count < inputs.count else { continue }
      let row: DefaultRow
      switch setting?.source {
      case .zero?: row = .zero
      case .model(let path)?:
        let index = try input(path, for: token)
        guard own[index][id] >= 0 else {
          throw OperationError.vocabulary(
            file: path, reason: "has no token \(jsonStringLiteral(token)) to take its row from")
        }
        row = .row(input: index, row: Int(own[index][id]))
      case .modelToken(let path, let text, let sourceID)?:
        let index = try input(path, for: token)
        let found = sourceID ?? text.flatMap { vocabularies[index].ids[$0] }
        guard let found, found >= 0, found < vocabularies[index].rows else {
          throw OperationError.vocabulary(
            file: path,
            reason: "has no token \(text.map(jsonStringLiteral) ?? "id \(sourceID ?? -1)") to take the row of "
              + "\(jsonStringLiteral(token)) from")
        }
        row = .row(input: index, row: found)
      case nil:
        if holders.isEmpty {
          row = .zero
        } else if holders.count == 1 {
          row = .row(input: holders[0], row: Int(own[holders[0]][id]))
        } else if base != nil, holders.contains(baseIndex) {
          row = .row(input: baseIndex, row: Int(own[baseIndex][id]))
        } else {
          row = .mean(holders.map { (input: $0, row: Int(own[$0][id])) })
        }
      }
      defaultOf[id] = defaults.count
      defaults.append(row)
    }
    self.defaults = defaults
    table = own.map { rows in
      rows.enumerated().map { id, row in
        if let k = defaultOf[id], row < 0 || configured[tokens[id]]?.force == true { return Int32(-(k + 1)) }
        return row
      }
    }
  }

  /// mergekit's `--unsafe-truncate-embeddings`: every input's vocabulary tensors keep their
  /// first rows, as many as the smallest vocabulary has, assuming the same token ids; no
  /// tokenizer is built. Throws when an input has no vocabulary tensor.
  public static func truncating(inputs: [String], open: @escaping (String) throws -> any Checkpoint) throws
    -> VocabularyAlignment
  {
    let rows = try inputs.map { path -> Int in
      let checkpoint = try open(path)
      guard let info = checkpoint.tensors.first(where: { isVocabularyTensor($0.name) }) else {
        throw OperationError.vocabulary(file: path, reason: "has no embedding or LM-head tensor to truncate")
      }
      return info.rowCount
    }
    return VocabularyAlignment(truncatingTo: rows.min() ?? 0, inputs: inputs, inputRows: rows, open: open)
  }

  private init(
    truncatingTo rows: Int, inputs: [String], inputRows: [Int], open: @escaping (String) throws -> any Checkpoint
  ) {
    tokens = Array(repeating: "", count: rows)
    self.rows = rows
    tokenizerFolder = ""
    appended = []
    dropped = []
    self.inputs = inputs
    assumed = []
    buildsTokenizer = false
    table = inputs.map { _ in (0..<Int32(rows)).map { $0 } }
    defaults = []
    self.inputRows = inputRows
    self.open = open
  }

  /// Whether `name` is a tensor indexed by token on its first dimension, as mergekit's
  /// architectures mark them: embeddings and LM heads (and their biases).
  public static func isVocabularyTensor(_ name: String) -> Bool {
    let parts = name.split(separator: ".")
    guard parts.count >= 2 else { return false }
    let tail = parts.suffix(2).joined(separator: ".")
    return vocabularyTensorTails.contains(tail) || name == "output.weight"
      || name == "cls.predictions.bias" || name == "vocab_projector.weight" || name == "vocab_projector.bias"
  }

  static let vocabularyTensorTails: Set<String> = [
    "embed_tokens.weight", "lm_head.weight", "lm_head.bias", "wte.weight", "word_embeddings.weight",
    "embed_in.weight", "embed_out.weight", "tok_embeddings.weight", "shared.weight", "decoder.weight",
    "output_layer.weight",
  ]

  /// The checkpoint of input `index` read as aligned; `checkpoint` is that input as opened.
  /// Throws `OperationError.vocabulary` when a vocabulary tensor's rows are not the model's
  /// vocabulary size.
  public func view(of checkpoint: any Checkpoint, input index: Int) throws -> any Checkpoint {
    lock.withLock { if opened[index] == nil { opened[index] = checkpoint } }
    return try AlignedVocabularyView(checkpoint, input: index, alignment: self)
  }

  func checkpoint(_ index: Int) throws -> any Checkpoint {
    if let found = lock.withLock({ opened[index] }) { return found }
    let checkpoint = try open(inputs[index])
    lock.withLock { opened[index] = checkpoint }
    return checkpoint
  }

  /// Output rows `rows` (below `tokens.count`) of tensor `name` for input `index`, as Double.
  func values(_ name: String, input index: Int, rows range: Range<Int>, rowLength: Int) throws -> [Double] {
    var out = [Double](repeating: 0, count: range.count * rowLength)
    var j = range.lowerBound
    while j < range.upperBound {
      let entry = Int(table[index][j])
      if entry >= 0 {
        // A run of consecutive own rows is read in one go.
        var end = j + 1
        while end < range.upperBound, Int(table[index][end]) == entry + (end - j) { end += 1 }
        let run = try read(name, input: index, rows: entry..<(entry + end - j), rowLength: rowLength)
        out.replaceSubrange(((j - range.lowerBound) * rowLength)..<((end - range.lowerBound) * rowLength), with: run)
        j = end
        continue
      }
      let values: [Double]
      switch defaults[-entry - 1] {
      case .zero: values = [Double](repeating: 0, count: rowLength)
      case .row(let input, let row): values = try read(name, input: input, rows: row..<(row + 1), rowLength: rowLength)
      case .mean(let sources):
        var sum = [Double](repeating: 0, count: rowLength)
        for source in sources {
          let row = try read(name, input: source.input, rows: source.row..<(source.row + 1), rowLength: rowLength)
          for k in 0..<rowLength { sum[k] += row[k] }
        }
        values = sum.map { $0 / Double(sources.count) }
      }
      out.replaceSubrange(((j - range.lowerBound) * rowLength)..<((j + 1 - range.lowerBound) * rowLength), with: values)
      j += 1
    }
    return out
  }

  private func read(_ name: String, input: Int, rows: Range<Int>, rowLength: Int) throws -> [Double] {
    let checkpoint = try checkpoint(input)
    let info = try checkpoint.info(name)
    guard rows.upperBound <= info.rowCount, info.rowByteCount == rowLength * info.dtype.size else {
      throw OperationError.vocabulary(
        file: checkpoint.path, reason: "tensor '\(name)' has \(info.shape), which does not fit its vocabulary rows")
    }
    return try checkpoint.readRows(name, rows).doubles()
  }
}

/// An input checkpoint whose vocabulary tensors read as the output vocabulary's rows (see
/// `VocabularyAlignment`); every other tensor reads as stored.
final class AlignedVocabularyView: Checkpoint, @unchecked Sendable {
  let source: any Checkpoint
  let input: Int
  let alignment: VocabularyAlignment
  let tensors: [TensorInfo]
  private let aligned: Set<ExactName>
  private let lock = NSLock()
  /// Per tensor, the mean of its token rows (the padding rows), once computed.
  private var means: [ExactName: [Double]] = [:]

  init(_ source: any Checkpoint, input: Int, alignment: VocabularyAlignment) throws {
    self.source = source
    self.input = input
    self.alignment = alignment
    var aligned = Set<ExactName>()
    let identity = alignment.isIdentity(input: input)
    tensors = try source.tensors.map { info in
      guard !identity, VocabularyAlignment.isVocabularyTensor(info.name), info.dtype.isFloatingPoint else {
        return info
      }
      guard info.rowCount == alignment.inputRows[input] else {
        throw OperationError.vocabulary(
          file: source.path,
          reason:
            "tensor '\(info.name)' has \(info.rowCount) rows but the model's vocab_size is \(alignment.inputRows[input])"
        )
      }
      aligned.insert(ExactName(info.name))
      return TensorInfo(name: info.name, dtype: info.dtype, shape: [alignment.rows] + info.shape.dropFirst())
    }
    self.aligned = aligned
  }

  var path: String { source.path }
  var metadata: [String: String] { source.metadata }
  var files: [StoredFile] { source.files }
  func file(of name: String) -> String? { source.file(of: name) }
  func verify(progress: ((Int, Int) -> Void)?) throws { try source.verify(progress: progress) }

  func lookup(_ name: String) -> TensorInfo? {
    guard aligned.contains(ExactName(name)), let info = source.lookup(name) else { return source.lookup(name) }
    return TensorInfo(name: name, dtype: info.dtype, shape: [alignment.rows] + info.shape.dropFirst())
  }

  func release(_ name: String, range: Range<Int>?) {
    source.release(name, range: aligned.contains(ExactName(name)) ? nil : range)
  }

  func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
    guard aligned.contains(ExactName(name)), let info = lookup(name) else {
      return try source.withBytes(of: name, range: range, body)
    }
    let rowBytes = info.rowByteCount
    let rowLength = rowBytes / info.dtype.size
    let bytes = range ?? 0..<(info.rowCount * rowBytes)
    guard bytes.lowerBound >= 0, bytes.upperBound <= info.rowCount * rowBytes else {
      throw CheckpointError.missingTensor(file: path, tensor: name)
    }
    let rows = (bytes.lowerBound / rowBytes)..<((bytes.upperBound + rowBytes - 1) / rowBytes)
    let tokenRows = rows.clamped(to: 0..<alignment.tokens.count)
    var values = try alignment.values(name, input: input, rows: tokenRows, rowLength: rowLength)
    if rows.upperBound > alignment.tokens.count {
      let mean = try paddingRow(name, rowLength: rowLength)
      for _ in max(rows.lowerBound, alignment.tokens.count)..<rows.upperBound { values += mean }
    }
    let encoded = TensorData(doubles: values, shape: [values.count]).cast(to: info.dtype).bytes
    let start = bytes.lowerBound - rows.lowerBound * rowBytes
    return try encoded.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[start..<(start + bytes.count)])) }
  }

  /// The padding row of tensor `name`: the mean of its token rows, as mergekit fills rows
  /// added by `pad_to_multiple_of`.
  private func paddingRow(_ name: String, rowLength: Int) throws -> [Double] {
    if let mean = lock.withLock({ means[ExactName(name)] }) { return mean }
    var sum = [Double](repeating: 0, count: rowLength)
    let count = alignment.tokens.count
    let block = max(1, (1 << 20) / max(1, rowLength))
    var start = 0
    while start < count {
      let end = min(count, start + block)
      let values = try alignment.values(name, input: input, rows: start..<end, rowLength: rowLength)
      for r in 0..<(end - start) { for k in 0..<rowLength { sum[k] += values[r * rowLength + k] } }
      start = end
    }
    let mean = sum.map { $0 / Double(count) }
    lock.withLock { means[ExactName(name)] = mean }
    return mean
  }
}

extension VocabularyAlignment {
  /// The output's tokenizer files: those of `tokenizerFolder`, with tokenizer.json and
  /// tokenizer_config.json rewritten when tokens were appended or dropped (added_tokens.json,
  /// which would contradict them, is then left out). Throws `OperationError.vocabulary` when
  /// tokens must be dropped from a tokenizer that is not BPE (as mergekit does).
  public func tokenizerFiles() throws -> [String: Data] {
    var files: [String: Data] = [:]
    for name in ModelFolder.tokenizerFiles where InputFile.isRegularFile(tokenizerFolder + "/" + name) {
      files[name] = Data(try InputFile.read(tokenizerFolder + "/" + name, limit: Int.max))
    }
    guard !appended.isEmpty || !dropped.isEmpty else { return files }
    files["added_tokens.json"] = nil
    let path = tokenizerFolder + "/tokenizer.json"
    guard var tokenizer = try InputFile.jsonObject(path) else {
      throw OperationError.vocabulary(file: path, reason: "cannot be read")
    }
    let removed = Set(dropped)
    if !removed.isEmpty {
      guard var model = tokenizer["model"] as? [String: Any], model["type"] as? String == "BPE",
        var vocab = model["vocab"] as? [String: Any]
      else {
        throw OperationError.vocabulary(
          file: path,
          reason:
            "has \(dropped.count) tokens beyond the model's vocab_size, which can be dropped only from a BPE tokenizer")
      }
      for token in dropped { vocab[token] = nil }
      model["vocab"] = vocab
      if let merges = model["merges"] as? [Any] {
        model["merges"] = merges.filter { merge in
          let parts = (merge as? [String]) ?? ((merge as? String)?.split(separator: " ").map(String.init) ?? [])
          return !parts.contains(where: removed.contains)
        }
      }
      tokenizer["model"] = model
    }
    var added = ((tokenizer["added_tokens"] as? [[String: Any]]) ?? []).filter {
      !removed.contains($0["content"] as? String ?? "")
    }
    added += appended.map { $0.entry(withID: true) }
    tokenizer["added_tokens"] = added
    files["tokenizer.json"] = try Self.json(tokenizer)
    if var config = try InputFile.jsonObject(tokenizerFolder + "/tokenizer_config.json") {
      // transformers 5 keeps added tokens in tokenizer.json only; an older config that lists
      // them gets the new ones too.
      if var decoder = config["added_tokens_decoder"] as? [String: Any] {
        decoder = decoder.filter { !removed.contains(($0.value as? [String: Any])?["content"] as? String ?? "") }
        for token in appended { decoder[String(token.id)] = token.entry(withID: false) }
        config["added_tokens_decoder"] = decoder
      }
      files["tokenizer_config.json"] = try Self.json(Self.withoutSpecialTokens(removed, in: config))
    }
    if !removed.isEmpty, let map = try InputFile.jsonObject(tokenizerFolder + "/special_tokens_map.json") {
      files["special_tokens_map.json"] = try Self.json(Self.withoutSpecialTokens(removed, in: map))
    }
    return files
  }

  /// `config` without the dropped tokens in its lists of extra special tokens: transformers
  /// would add them back on load, past the embedding rows.
  static func withoutSpecialTokens(_ removed: Set<String>, in config: [String: Any]) -> [String: Any] {
    guard !removed.isEmpty else { return config }
    var config = config
    func content(_ entry: Any) -> String? { entry as? String ?? (entry as? [String: Any])?["content"] as? String }
    for key in ["additional_special_tokens", "extra_special_tokens"] {
      if let list = config[key] as? [Any] {
        config[key] = list.filter { content($0).map { !removed.contains($0) } ?? true }
      } else if let named = config[key] as? [String: Any] {
        config[key] = named.filter { content($0.value).map { !removed.contains($0) } ?? true }
      }
    }
    return config
  }

  /// config.json `config` with the output's vocabulary size (`vocab_size`, and the text
  /// model's in a multimodal config).
  public func outputConfig(_ config: [String: Any]) -> [String: Any] {
    var config = config
    if var text = config["text_config"] as? [String: Any], text["vocab_size"] != nil {
      text["vocab_size"] = rows
      config["text_config"] = text
    } else {
      config["vocab_size"] = rows
    }
    return config
  }

  /// JSON text as Hugging Face writes it (indented), with keys sorted so that the same
  /// inputs give the same bytes.
  public static func json(_ object: Any) throws -> Data {
    try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
  }
}
