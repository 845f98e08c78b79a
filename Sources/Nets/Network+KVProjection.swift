import Foundation

/// MatryoshkaKV's projections of a decoder's attention keys (after rotary) and values: per layer,
/// KV head and kind, an orthogonal basis `U` (`d x d`, columns in order of importance) and a mean
/// `mu`, of which the first `r` columns are kept. The cache would hold `(x - mu) U_r` (r numbers
/// per token and head); attention then sees `x~ = (x - mu) U_r U_r^T + mu`, which gives exactly
/// the cached computation's logits and outputs (`q . x~ = (q U_r) . ((x - mu) U_r) + q . mu`, and
/// attention weights sum to 1), so Nets runs it in that form. Grouped-query attention: one
/// projection per KV head, shared by its query heads.
public struct KVProjection: Sendable, Equatable {
  public enum Kind: String, Sendable, CaseIterable {
    case keys = "k"
    case values = "v"
  }

  /// `keyRanks[layer][kvHead]`, each in `1...d`.
  public var keyRanks: [[Int]]
  public var valueRanks: [[Int]]

  public init(keyRanks: [[Int]], valueRanks: [[Int]]) {
    self.keyRanks = keyRanks
    self.valueRanks = valueRanks
  }

  /// Every rank `rank` (full when it is `d`).
  public init(layers: Int, heads: Int, rank: Int) {
    keyRanks = Array(repeating: Array(repeating: rank, count: heads), count: layers)
    valueRanks = keyRanks
  }

  public func ranks(_ kind: Kind) -> [[Int]] { kind == .keys ? keyRanks : valueRanks }

  public mutating func setRank(_ kind: Kind, layer: Int, head: Int, _ rank: Int) {
    if kind == .keys { keyRanks[layer][head] = rank } else { valueRanks[layer][head] = rank }
  }

  /// The average kept fraction of the K and V dimensions (the cache size relative to the original).
  public func keptFraction(dimension d: Int) -> Double {
    let all = Array(keyRanks.joined()) + Array(valueRanks.joined())
    return Double(all.reduce(0, +)) / Double(max(all.count * d, 1))
  }

  public static func basisName(layer: Int, _ kind: Kind, head: Int) -> String {
    "model.layers.\(layer).self_attn.\(kind.rawValue)_basis.\(head)"
  }
  public static func meanName(layer: Int, _ kind: Kind, head: Int) -> String {
    "model.layers.\(layer).self_attn.\(kind.rawValue)_mean.\(head)"
  }

  /// The tensors a decoder with these projections reads besides its own: bases `[d, d]` and means `[d]`.
  public static func shapes(_ c: DecoderConfig) -> [(name: String, shape: [Int])] {
    var out: [(name: String, shape: [Int])] = []
    for layer in 0..<c.layerCount {
      for kind in Kind.allCases {
        for head in 0..<c.keyValueHeadCount {
          out += [
            (basisName(layer: layer, kind, head: head), [c.headDimension, c.headDimension]),
            (meanName(layer: layer, kind, head: head), [c.headDimension]),
          ]
        }
      }
    }
    return out
  }

  /// Checks the ranks against the architecture.
  public func check(_ c: DecoderConfig) throws {
    guard c.tails == 1 else {
      throw NetsError.invalidConfig(
        key: "tails", reason: "K/V projections apply to plain decoders, not a partially zipped one (\(c.tails) tails)")
    }
    for (kind, ranks) in [("key", keyRanks), ("value", valueRanks)] {
      guard ranks.count == c.layerCount, ranks.allSatisfy({ $0.count == c.keyValueHeadCount }) else {
        throw NetsError.invalidConfig(
          key: "kv_projection.\(kind)_ranks",
          reason: "expected \(c.layerCount) layers x \(c.keyValueHeadCount) KV heads")
      }
      if let bad = ranks.joined().first(where: { !(1...c.headDimension).contains($0) }) {
        throw NetsError.invalidConfig(
          key: "kv_projection.\(kind)_ranks", reason: "rank \(bad) is outside 1...\(c.headDimension)")
      }
    }
  }

  /// The `kv_projection` object of a config.json: `{"key_ranks": [[...]], "value_ranks": [[...]], "file": ...}`.
  public var json: [String: Any] { ["key_ranks": keyRanks, "value_ranks": valueRanks] }

  /// Reads config.json's `kv_projection`, nil when absent.
  public static func fromConfig(json: Data) throws -> KVProjection? {
    guard let object = try? JSONSerialization.jsonObject(with: json) as? [String: Any] else {
      throw NetsError.invalidConfig(key: "(root)", reason: "not a JSON object")
    }
    guard let section = object["kv_projection"] else { return nil }
    guard let s = section as? [String: Any], let k = s["key_ranks"] as? [[Int]], let v = s["value_ranks"] as? [[Int]]
    else {
      throw NetsError.invalidConfig(
        key: "kv_projection", reason: "expected key_ranks and value_ranks (layers x KV heads of integers)")
    }
    return KVProjection(keyRanks: k, valueRanks: v)
  }
}

extension Tape {
  /// `x~ = (x - mu) U_r U_r^T + mu` for every head of a packed `rows x (heads d)` matrix. Its
  /// `Float` specialization is asked for in debug builds only, as `decoderForward`'s is (why:
  /// there).
  #if DEBUG
    @_specialize(exported:true,where T == Float)
  #endif
  func projectHeads(
    _ x: Var, layer: Int, _ kind: KVProjection.Kind, ranks: [Int], dimension d: Int, _ weight: WeightBinder
  ) -> Var {
    let parts = ranks.enumerated().map { head, r -> Var in
      let u = weight(KVProjection.basisName(layer: layer, kind, head: head))
      let mu = weight(KVProjection.meanName(layer: layer, kind, head: head))
      let basis = r == d ? u : columns(u, 0..<r)
      let centered = subtract(columns(x, (head * d)..<((head + 1) * d)), mu)
      return add(matmul(matmul(centered, basis), basis, transposeB: true), mu)
    }
    return parts.count == 1 ? parts[0] : concatenateColumns(parts)
  }
}
