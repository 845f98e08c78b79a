import Foundation

/// `text` as a JSON string literal: quotes, backslashes and control characters escaped.
public func jsonStringLiteral(_ text: String) -> String { JSON.quote(text) }

/// A small strict JSON reader and writer for checkpoint headers. Unlike Foundation's parser it
/// keeps object keys in order, reports duplicate keys, and keeps numbers as text so that 64-bit
/// offsets are parsed exactly with overflow checks.
enum JSON: Equatable {
  case object([(key: String, value: JSON)])
  case array([JSON])
  case string(String)
  case number(String)
  case bool(Bool)
  case null

  static func == (a: JSON, b: JSON) -> Bool {
    switch (a, b) {
    case (.object(let x), .object(let y)):
      return x.count == y.count && zip(x, y).allSatisfy { $0.key == $1.key && $0.value == $1.value }
    case (.array(let x), .array(let y)): return x == y
    case (.string(let x), .string(let y)), (.number(let x), .number(let y)): return x == y
    case (.bool(let x), .bool(let y)): return x == y
    case (.null, .null): return true
    default: return false
    }
  }

  struct ParseError: Error { let message: String }

  /// Parses a JSON object, handing each member to `visit` as it is read instead of building the
  /// whole tree: a safetensors header of a million tensors never exists as a million parsed
  /// objects at once. Throws `ParseError`, `DuplicateKey` (depth 0 for a member's key), or what
  /// `visit` throws; `notAnObject` when the text is valid JSON of another kind.
  static func parseObject(_ bytes: some Collection<UInt8>, visit: (String, JSON) throws -> Void) throws {
    var parser = Parser(bytes: Array(bytes))
    guard String(validating: parser.bytes, as: UTF8.self) != nil else { throw ParseError(message: "not valid UTF-8") }
    parser.skipWhitespace()
    guard parser.position < parser.bytes.count, parser.bytes[parser.position] == UInt8(ascii: "{") else {
      _ = try parser.value(depth: 0)
      throw ParseError(message: "the top level is not an object")
    }
    try parser.object(depth: 0, visit: visit)
    parser.skipWhitespace()
    guard parser.position == parser.bytes.count else {
      throw ParseError(message: "unexpected data at byte \(parser.position)")
    }
  }

  /// Parses one JSON value that may be followed only by whitespace.
  static func parse(_ bytes: some Collection<UInt8>) throws -> JSON {
    var parser = Parser(bytes: Array(bytes))
    // Strings are decoded without repair below, so invalid UTF-8 is refused here, once.
    guard String(validating: parser.bytes, as: UTF8.self) != nil else { throw ParseError(message: "not valid UTF-8") }
    let value = try parser.value(depth: 0)
    parser.skipWhitespace()
    guard parser.position == parser.bytes.count else {
      throw ParseError(message: "unexpected data at byte \(parser.position)")
    }
    return value
  }

  var objectPairs: [(key: String, value: JSON)]? { if case .object(let p) = self { return p } else { return nil } }
  var arrayValue: [JSON]? { if case .array(let a) = self { return a } else { return nil } }
  var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
  /// A non-negative integer that fits in `Int`, or nil (not a number, fractional, negative, too big).
  var intValue: Int? {
    guard case .number(let text) = self, !text.isEmpty, text.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) else {
      return nil
    }
    return Int(text)
  }

  subscript(key: String) -> JSON? { objectPairs?.first { $0.key == key }?.value }

  /// Compact serialisation (keys in stored order).
  var serialized: String {
    switch self {
    case .object(let pairs):
      return "{" + pairs.map { JSON.quote($0.key) + ":" + $0.value.serialized }.joined(separator: ",") + "}"
    case .array(let items): return "[" + items.map(\.serialized).joined(separator: ",") + "]"
    case .string(let s): return JSON.quote(s)
    case .number(let n): return n
    case .bool(let b): return b ? "true" : "false"
    case .null: return "null"
    }
  }

  /// Indented serialisation with sorted keys and non-ASCII escaped: byte-for-byte what Python's
  /// `json.dumps(value, indent=2, sort_keys=True)` writes (the shard indexes of transformers).
  func prettyPrinted(level: Int = 0) -> String {
    let pad = String(repeating: "  ", count: level + 1)
    let end = String(repeating: "  ", count: level)
    switch self {
    case .object(let pairs) where !pairs.isEmpty:
      let items = pairs.sorted { Array($0.key.utf16).lexicographicallyPrecedes(Array($1.key.utf16)) }
        .map { pad + JSON.quote($0.key, asciiOnly: true) + ": " + $0.value.prettyPrinted(level: level + 1) }
      return "{\n" + items.joined(separator: ",\n") + "\n" + end + "}"
    case .array(let items) where !items.isEmpty:
      return "[\n" + items.map { pad + $0.prettyPrinted(level: level + 1) }.joined(separator: ",\n") + "\n" + end + "]"
    case .string(let s): return JSON.quote(s, asciiOnly: true)
    default: return serialized
    }
  }

  static func quote(_ s: String, asciiOnly: Bool) -> String {
    guard asciiOnly else { return quote(s) }
    var out = ""
    for unit in quote(s).utf16 {
      if unit < 0x80 {
        out.unicodeScalars.append(Unicode.Scalar(UInt8(unit)))
      } else {
        out += String(format: "\\u%04x", unit)
      }
    }
    return out
  }

  static func quote(_ s: String) -> String {
    var out = "\""
    for scalar in s.unicodeScalars {
      switch scalar {
      case "\"": out += "\\\""
      case "\\": out += "\\\\"
      case "\n": out += "\\n"
      case "\r": out += "\\r"
      case "\t": out += "\\t"
      case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
      default: out.unicodeScalars.append(scalar)
      }
    }
    return out + "\""
  }

  private struct Parser {
    let bytes: [UInt8]
    var position = 0

    mutating func skipWhitespace() {
      while position < bytes.count {
        switch bytes[position] {
        case 0x20, 0x09, 0x0A, 0x0D: position += 1
        default: return
        }
      }
    }

    func fail(_ message: String) -> ParseError { ParseError(message: "\(message) at byte \(position)") }

    mutating func value(depth: Int) throws -> JSON {
      guard depth < 64 else { throw fail("nesting too deep") }
      skipWhitespace()
      guard position < bytes.count else { throw fail("unexpected end") }
      switch bytes[position] {
      case UInt8(ascii: "{"): return try object(depth: depth)
      case UInt8(ascii: "["): return try array(depth: depth)
      case UInt8(ascii: "\""): return .string(try string())
      case UInt8(ascii: "t"): try literal("true"); return .bool(true)
      case UInt8(ascii: "f"): try literal("false"); return .bool(false)
      case UInt8(ascii: "n"): try literal("null"); return .null
      default: return .number(try number())
      }
    }

    mutating func literal(_ word: String) throws {
      let w = Array(word.utf8)
      guard position + w.count <= bytes.count, Array(bytes[position..<position + w.count]) == w else {
        throw fail("invalid literal")
      }
      position += w.count
    }

    mutating func object(depth: Int) throws -> JSON {
      var pairs: [(key: String, value: JSON)] = []
      try object(depth: depth) { pairs.append(($0, $1)) }
      return .object(pairs)
    }

    /// Reads an object member by member, handing each to `visit`.
    mutating func object(depth: Int, visit: (String, JSON) throws -> Void) throws {
      position += 1
      var seen = Set<ExactName>()
      skipWhitespace()
      if position < bytes.count, bytes[position] == UInt8(ascii: "}") { position += 1; return }
      while true {
        skipWhitespace()
        guard position < bytes.count, bytes[position] == UInt8(ascii: "\"") else { throw fail("expected a string key") }
        let key = try string()
        guard seen.insert(ExactName(key)).inserted else { throw DuplicateKey(key: key, depth: depth) }
        skipWhitespace()
        guard position < bytes.count, bytes[position] == UInt8(ascii: ":") else { throw fail("expected ':'") }
        position += 1
        try visit(key, try value(depth: depth + 1))
        skipWhitespace()
        guard position < bytes.count else { throw fail("unterminated object") }
        if bytes[position] == UInt8(ascii: ",") { position += 1; continue }
        if bytes[position] == UInt8(ascii: "}") { position += 1; return }
        throw fail("expected ',' or '}'")
      }
    }

    mutating func array(depth: Int) throws -> JSON {
      position += 1
      var items: [JSON] = []
      skipWhitespace()
      if position < bytes.count, bytes[position] == UInt8(ascii: "]") { position += 1; return .array(items) }
      while true {
        items.append(try value(depth: depth + 1))
        skipWhitespace()
        guard position < bytes.count else { throw fail("unterminated array") }
        if bytes[position] == UInt8(ascii: ",") { position += 1; continue }
        if bytes[position] == UInt8(ascii: "]") { position += 1; return .array(items) }
        throw fail("expected ',' or ']'")
      }
    }

    mutating func number() throws -> String {
      let start = position
      scan: while position < bytes.count {
        switch bytes[position] {
        case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."),
          UInt8(ascii: "e"), UInt8(ascii: "E"):
          position += 1
        default: break scan
        }
      }
      let text = String(decoding: bytes[start..<position], as: UTF8.self)  // ASCII by the scan
      let isInteger = bytes[start..<position].allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
      guard position > start, isInteger || Double(text) != nil else {
        throw fail("invalid value")
      }
      return text
    }

    mutating func string() throws -> String {
      position += 1
      // Fast path: no escape before the closing quote (nearly every key and value).
      let start = position
      while position < bytes.count, bytes[position] != UInt8(ascii: "\""), bytes[position] != UInt8(ascii: "\\"),
        bytes[position] >= 0x20
      {
        position += 1
      }
      if position < bytes.count, bytes[position] == UInt8(ascii: "\"") {
        position += 1
        return String(decoding: bytes[start..<(position - 1)], as: UTF8.self)
      }
      position = start
      var scalars = String.UnicodeScalarView()
      var runStart = position
      func flush(_ end: Int) {
        scalars.append(contentsOf: String(decoding: bytes[runStart..<end], as: UTF8.self).unicodeScalars)
      }
      while position < bytes.count {
        let c = bytes[position]
        if c == UInt8(ascii: "\"") {
          flush(position)
          position += 1
          return String(scalars)
        }
        if c < 0x20 { throw fail("control character in string") }
        if c == UInt8(ascii: "\\") {
          flush(position)
          position += 1
          guard position < bytes.count else { break }
          let e = bytes[position]
          position += 1
          switch e {
          case UInt8(ascii: "\""): scalars.append("\"")
          case UInt8(ascii: "\\"): scalars.append("\\")
          case UInt8(ascii: "/"): scalars.append("/")
          case UInt8(ascii: "b"): scalars.append("\u{08}")
          case UInt8(ascii: "f"): scalars.append("\u{0C}")
          case UInt8(ascii: "n"): scalars.append("\n")
          case UInt8(ascii: "r"): scalars.append("\r")
          case UInt8(ascii: "t"): scalars.append("\t")
          case UInt8(ascii: "u"): scalars.append(try unicodeEscape())
          default: throw fail("invalid escape")
          }
          runStart = position
          continue
        }
        position += 1
      }
      throw fail("unterminated string")
    }

    mutating func hex4() throws -> UInt32 {
      guard position + 4 <= bytes.count,
        let v = UInt32(String(decoding: bytes[position..<position + 4], as: UTF8.self), radix: 16)
      else {
        throw fail("invalid \\u escape")
      }
      position += 4
      return v
    }

    mutating func unicodeEscape() throws -> Unicode.Scalar {
      let high = try hex4()
      if (0xD800..<0xDC00).contains(high) {
        guard position + 2 <= bytes.count, bytes[position] == UInt8(ascii: "\\"),
          bytes[position + 1] == UInt8(ascii: "u")
        else {
          throw fail("unpaired surrogate")
        }
        position += 2
        let low = try hex4()
        guard (0xDC00..<0xE000).contains(low),
          let s = Unicode.Scalar(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
        else {
          throw fail("invalid surrogate pair")
        }
        return s
      }
      guard let s = Unicode.Scalar(high) else { throw fail("invalid code point") }
      return s
    }
  }

  /// Thrown when an object repeats a key (safetensors: a duplicate tensor name).
  struct DuplicateKey: Error {
    let key: String
    /// 0 for a key of the outermost object.
    let depth: Int
  }
}
