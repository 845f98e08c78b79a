import Checkpoint
import Foundation

/// A model's vocabulary as its Hugging Face `tokenizer.json` defines it, read without Python:
/// the model's own tokens (a `vocab` map for BPE, WordPiece and WordLevel, a list of pieces for
/// Unigram) and the `added_tokens`, each with its id. Only ids below the model's embedding rows
/// (config.json `vocab_size`) count, as in mergekit: tokens at or beyond them have no row.
public struct TokenizerVocabulary: Sendable {
  /// One entry of `added_tokens`: its id, text, and whether it is special, with the entry's
  /// JSON text (lstrip, rstrip, normalized ... kept as given).
  public struct AddedToken: Sendable, Equatable {
    public var id: Int
    public var content: String
    public var special: Bool
    /// The entry as JSON (without its id), so an output can carry it unchanged.
    var settings: Data

    /// A token that `tokenizer.add_tokens` would add: not special, normalized, no stripping.
    static func plain(_ content: String, id: Int) -> AddedToken {
      let entry: [String: Any] = [
        "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true,
        "special": false,
      ]
      return AddedToken(
        id: id, content: content, special: false,
        settings: (try? JSONSerialization.data(withJSONObject: entry, options: [.sortedKeys])) ?? Data())
    }

    /// The `added_tokens` entry of tokenizer.json (with the id) or, without, the
    /// `added_tokens_decoder` entry of tokenizer_config.json.
    func entry(withID: Bool) -> [String: Any] {
      var entry = ((try? JSONSerialization.jsonObject(with: settings)) as? [String: Any]) ?? [:]
      entry["content"] = content
      entry["special"] = special
      if withID { entry["id"] = id } else { entry["id"] = nil }
      return entry
    }
  }

  /// The model folder the tokenizer was read from.
  public let folder: String
  /// Every token with an embedding row, with its id.
  public let ids: [String: Int]
  /// The added tokens with an embedding row, in id order.
  public let added: [AddedToken]
  /// The model's embedding rows: config.json `vocab_size`, else the number of tokens.
  public let rows: Int
  /// The tokenizer's model type (`BPE`, `WordPiece`, `Unigram`, `WordLevel`).
  public let modelType: String
  /// Tokens of tokenizer.json dropped because their ids have no embedding row.
  public let unusedTokens: [String]

  /// The largest vocabulary accepted (config.json sizes are capped alike).
  public static let maxRows = 1 << 26

  /// The number of tokens with a row.
  public var count: Int { ids.count }

  /// Reads the tokenizer of model folder `folder`. Throws `OperationError.vocabulary` when the
  /// folder has no tokenizer.json (a SentencePiece-only folder cannot be aligned) or it is not
  /// a tokenizer.
  public static func read(folder: String) throws -> TokenizerVocabulary {
    let path = folder + "/tokenizer.json"
    guard InputFile.isRegularFile(path) else {
      throw OperationError.vocabulary(
        file: folder,
        reason:
          "has no tokenizer.json, which aligning vocabularies reads (save the tokenizer with a fast tokenizer, "
          + "or merge models whose tokenizer files are the same)")
    }
    guard let json = try InputFile.jsonObject(path), let model = json["model"] as? [String: Any] else {
      throw OperationError.vocabulary(file: path, reason: "is not a tokenizer (no 'model' object)")
    }
    let type = model["type"] as? String ?? (model["vocab"] is [Any] ? "Unigram" : "BPE")
    var ids: [String: Int] = [:]
    if let vocab = model["vocab"] as? [String: Any] {
      for (token, id) in vocab {
        guard let id = integer(id), id >= 0 else {
          throw OperationError.vocabulary(file: path, reason: "token \(jsonStringLiteral(token)) has no valid id")
        }
        ids[token] = id
      }
    } else if let pieces = model["vocab"] as? [Any] {
      for (id, piece) in pieces.enumerated() {
        guard let entry = piece as? [Any], let token = entry.first as? String else {
          throw OperationError.vocabulary(file: path, reason: "Unigram piece \(id) is not [token, score]")
        }
        if ids[token] == nil { ids[token] = id }
      }
    } else {
      throw OperationError.vocabulary(file: path, reason: "model.vocab is neither a map nor a list of pieces")
    }
    var added: [AddedToken] = []
    for (i, item) in ((json["added_tokens"] as? [Any]) ?? []).enumerated() {
      guard var entry = item as? [String: Any], let content = entry["content"] as? String,
        let id = integer(entry["id"]), id >= 0
      else {
        throw OperationError.vocabulary(file: path, reason: "added_tokens[\(i)] has no content or id")
      }
      let special = entry["special"] as? Bool ?? false
      entry["id"] = nil
      let settings = try JSONSerialization.data(withJSONObject: entry, options: [.sortedKeys])
      added.append(AddedToken(id: id, content: content, special: special, settings: settings))
      ids[content] = id
    }
    let config = try InputFile.jsonObject(folder + "/config.json")
    let declared = integer(config?["vocab_size"]) ?? integer((config?["text_config"] as? [String: Any])?["vocab_size"])
    let rows = declared ?? ((ids.values.max() ?? -1) + 1)
    guard rows >= 1, rows <= maxRows else {
      throw OperationError.vocabulary(
        file: folder + "/config.json", reason: "vocab_size \(rows) is not between 1 and \(maxRows)")
    }
    let unused = ids.filter { $0.value >= rows }.map(\.key).sorted()
    for token in unused { ids[token] = nil }
    return TokenizerVocabulary(
      folder: folder, ids: ids, added: added.filter { $0.id < rows }.sorted { $0.id < $1.id }, rows: rows,
      modelType: type, unusedTokens: unused)
  }

  /// The tokens in id order; throws when the ids are not 0 to count - 1 (a vocabulary with
  /// holes or two tokens on one id cannot be an output's).
  public func tokensByID() throws -> [String] {
    var tokens = [String?](repeating: nil, count: count)
    for (token, id) in ids {
      guard id < count, tokens[id] == nil else {
        throw OperationError.vocabulary(
          file: folder + "/tokenizer.json",
          reason: "token ids are not 0 to \(count - 1) without gaps (id \(id) of \(jsonStringLiteral(token)))")
      }
      tokens[id] = token
    }
    return tokens.map { $0 ?? "" }
  }

  static func integer(_ value: Any?) -> Int? {
    if let number = value as? NSNumber, let exact = Int(exactly: number.doubleValue) { return exact }
    return value as? Int
  }
}
