import Checkpoint
import Foundation
import Operations
import Tensor
import Testing

@testable import TestSupport

/// Vocabulary alignment (mergekit's tokenizer_source): each output token's row comes from the
/// model's own row, else the only model that has it, else the base, else the mean of those that
/// have it; rows are checked against those rules written out by hand for three small models.
@Suite struct VocabularyAlignmentTests {
  static let width = 3

  /// A model folder with a tokenizer.json (`tokens` in id order, the `added` ones as added
  /// tokens), config.json `vocab_size` = `rows`, and embedding rows `i * 10 + k + seed`.
  static func model(
    _ folder: TemporaryFolder, _ name: String, tokens: [String], added: [String: Bool] = [:], rows: Int, seed: Float
  ) throws -> String {
    let path = folder.file(name)
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    var vocab: [String: Int] = [:]
    var addedTokens: [[String: Any]] = []
    for (id, token) in tokens.enumerated() {
      if let special = added[token] {
        addedTokens.append([
          "id": id, "content": token, "special": special, "normalized": !special, "lstrip": false, "rstrip": false,
          "single_word": false,
        ])
      } else {
        vocab[token] = id
      }
    }
    let tokenizer: [String: Any] = [
      "version": "1.0", "model": ["type": "BPE", "vocab": vocab, "merges": [] as [String]],
      "added_tokens": addedTokens,
    ]
    try JSONSerialization.data(withJSONObject: tokenizer).write(to: URL(fileURLWithPath: path + "/tokenizer.json"))
    try JSONSerialization.data(withJSONObject: ["vocab_size": rows, "model_type": "llama"]).write(
      to: URL(fileURLWithPath: path + "/config.json"))
    let values = (0..<(rows * width)).map { Float($0 / width * 10 + $0 % width) + seed }
    let embed = Tensor(shape: [rows, width], scalars: values).encoded(as: .f32)
    let norm = Tensor(shape: [width], scalars: [1, 2, 3]).encoded(as: .f32)
    try writeCheckpoint(
      [("model.embed_tokens.weight", embed), ("model.norm.weight", norm)], to: path + "/model.safetensors")
    return path
  }

  /// base: a b c d g; m1: a b c d f <x> (special, added); m2: d c b a e f g, one padding row.
  static func models(_ folder: TemporaryFolder) throws -> [String] {
    [
      try model(folder, "base", tokens: ["a", "b", "c", "d", "g"], rows: 5, seed: 0.25),
      try model(folder, "m1", tokens: ["a", "b", "c", "d", "f", "<x>"], added: ["<x>": true], rows: 6, seed: 0.5),
      try model(folder, "m2", tokens: ["d", "c", "b", "a", "e", "f", "g"], rows: 8, seed: 0.75),
    ]
  }

  static func row(_ i: Int, seed: Float) -> [Float] { (0..<width).map { Float(i * 10 + $0) + seed } }

  @Test func unionRowsFollowMergekitsRules() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let paths = try Self.models(folder)
    let alignment = try VocabularyAlignment(
      settings: TokenizerSettings(source: .union, padToMultipleOf: 5), base: paths[0], inputs: paths
    ) { try openCheckpoint($0) }
    // The base's tokens, then m1's new plain tokens, m2's, then the added tokens.
    #expect(alignment.tokens == ["a", "b", "c", "d", "g", "f", "e", "<x>"])
    #expect(alignment.rows == 10)
    #expect(!alignment.isIdentity)
    let (base, m1, m2) = (
      { Self.row($0, seed: 0.25) }, { Self.row($0, seed: 0.5) }, { Self.row($0, seed: 0.75) }
    )
    let fMean = zip(m1(4), m2(5)).map { ($0 + $1) / 2 }
    let expected: [[[Float]]] = [
      // base: own a-d, g; f (m1 and m2, no base) the mean; e only m2's; <x> only m1's.
      [base(0), base(1), base(2), base(3), base(4), fMean, m2(4), m1(5)],
      // m1: own a-d, f, <x>; g from the base (the base has it); e only m2's.
      [m1(0), m1(1), m1(2), m1(3), base(4), m1(4), m2(4), m1(5)],
      // m2: its permuted rows; <x> only m1's.
      [m2(3), m2(2), m2(1), m2(0), m2(6), m2(5), m2(4), m1(5)],
    ]
    for (i, path) in paths.enumerated() {
      let view = try alignment.view(of: try openCheckpoint(path), input: i)
      let tensor = try view.tensor(named: "model.embed_tokens.weight")
      #expect(tensor.shape == [10, Self.width])
      let rows = expected[i]
      #expect(Array(tensor.scalars.prefix(8 * Self.width)) == rows.flatMap { $0 }, "input \(i)")
      // Padding rows: the mean of the token rows.
      let mean = (0..<Self.width).map { k in Double(rows.map { Double($0[k]) }.reduce(0, +)) / 8 }
      for r in 8..<10 {
        let padding = tensor.scalars[(r * Self.width)..<((r + 1) * Self.width)].map(Double.init)
        #expect(zip(padding, mean).allSatisfy { abs($0 - $1) < 1e-5 }, "input \(i) row \(r)")
      }
      // A range read gives the same bytes as the whole tensor.
      let part = try view.withBytes(of: "model.embed_tokens.weight", range: 20..<64) { Array($0) }
      let whole = try view.read("model.embed_tokens.weight").bytes
      #expect(part == Array(whole[20..<64]))
      #expect(try view.tensor(named: "model.norm.weight").scalars == [1, 2, 3])
    }
    let files = try alignment.tokenizerFiles()
    let text = try #require(files["tokenizer.json"])
    let tokenizer = try #require(try JSONSerialization.jsonObject(with: text) as? [String: Any])
    let added = try #require(tokenizer["added_tokens"] as? [[String: Any]])
    #expect(added.map { $0["content"] as? String } == ["f", "e", "<x>"])
    #expect(added.map { $0["id"] as? Int } == [5, 6, 7])
    #expect(added.map { $0["special"] as? Bool } == [false, false, true])
    #expect(alignment.outputConfig(["vocab_size": 5])["vocab_size"] as? Int == 10)
  }

  /// `tokens`: a token added with the row of another token, one forced to zero in every model;
  /// `base` keeps the base's tokenizer and drops rows the base lacks.
  @Test func tokenSettingsAndBaseSource() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let paths = try Self.models(folder)
    let settings = TokenizerSettings(
      source: .base,
      tokens: [
        .init(text: "<new>", source: .modelToken(model: paths[1], token: "b", id: nil), force: false),
        .init(text: "a", source: .zero, force: true),
      ])
    let alignment = try VocabularyAlignment(settings: settings, base: paths[0], inputs: paths) {
      try openCheckpoint($0)
    }
    #expect(alignment.tokens == ["a", "b", "c", "d", "g", "<new>"])
    let m2 = try alignment.view(of: try openCheckpoint(paths[2]), input: 2).tensor(named: "model.embed_tokens.weight")
    let expected =
      [[Float](repeating: 0, count: Self.width)] + [2, 1, 0, 6].map { Self.row($0, seed: 0.75) } + [
        Self.row(1, seed: 0.5)
      ]
    #expect(m2.scalars == expected.flatMap { $0 })
    let bad = TokenizerSettings(
      source: .base, tokens: [.init(text: "q", source: .model(folder.file("elsewhere")), force: false)])
    #expect(throws: OperationError.self) {
      try VocabularyAlignment(settings: bad, base: paths[0], inputs: paths) { try openCheckpoint($0) }
    }
  }

  /// Inputs that share one vocabulary, with rows for every token, are read as they are.
  @Test func equalVocabulariesAreTheIdentity() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let a = try Self.model(folder, "a", tokens: ["x", "y"], rows: 2, seed: 0)
    let b = try Self.model(folder, "b", tokens: ["x", "y"], rows: 2, seed: 1)
    let alignment = try VocabularyAlignment(settings: .init(source: .union), base: nil, inputs: [a, b]) {
      try openCheckpoint($0)
    }
    #expect(alignment.isIdentity)
    #expect(try alignment.tokenizerFiles()["tokenizer.json"] == Data(try InputFile.read(a + "/tokenizer.json")))
  }
}
