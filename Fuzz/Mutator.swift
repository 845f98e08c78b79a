/// Seeded mutations of an input's bytes: generic byte edits for every kind, and for text kinds
/// edits that reach deeper into a parser (numbers swapped for extreme ones, keywords, YAML
/// anchors and aliases, path tricks).
struct Mutator {
  var random: SplitMix64

  static let interestingIntegers: [UInt64] = [
    0, 1, 7, 8, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1 << 62,
    0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF,
  ]
  static let tokens: [String] = [
    "0", "-1", "-5", "1e9", "1e300", "4611686018427387904", "9223372036854775807", "18446744073709551616",
    "0.5", "NaN", "null", "true", "\"\"", "[]", "{}", "[[[[[[[[", "{\"a\":", "\"..\"", "\"/etc/passwd\"",
    "\"model.safetensors.index.json\"",
    "&a [*a, *a, *a, *a]", "*a", "<<: *a", "!!binary", "..", "../..", "/", "\\u0000", "é", "e\u{301}", "\t", "\n", ",",
    ":",
    "- ", "~", "'", "\"", "#", "|", ">", "---", "...", "%YAML 1.1",
  ]

  init(seed: UInt64) { random = SplitMix64(seed: seed) }

  /// A mutation of `input` (1 to 4 edits), or a splice of it with `other`.
  mutating func mutate(_ input: [UInt8], text: Bool, other: [UInt8]) -> [UInt8] {
    var bytes = input
    for _ in 0..<(1 + random.below(4)) {
      switch random.below(text ? 12 : 8) {
      case 0: flipBit(&bytes)
      case 1: setByte(&bytes)
      case 2: deleteRange(&bytes)
      case 3: duplicateRange(&bytes)
      case 4: truncate(&bytes)
      case 5: overwriteInteger(&bytes)
      case 6: splice(&bytes, other)
      case 7: insertRandom(&bytes)
      case 8, 9: replaceNumber(&bytes)
      default: insertToken(&bytes)
      }
    }
    return bytes
  }

  mutating func flipBit(_ bytes: inout [UInt8]) {
    guard !bytes.isEmpty else { return }
    bytes[random.below(bytes.count)] ^= UInt8(1) << UInt8(random.below(8))
  }

  mutating func setByte(_ bytes: inout [UInt8]) {
    guard !bytes.isEmpty else { return }
    bytes[random.below(bytes.count)] = [0, 0xFF, 0x7F, 0x80, 0x22, 0x5C, 0x2F, 0x2E][random.below(8)]
  }

  mutating func deleteRange(_ bytes: inout [UInt8]) {
    guard !bytes.isEmpty else { return }
    let start = random.below(bytes.count)
    bytes.removeSubrange(start..<min(bytes.count, start + 1 + random.below(32)))
  }

  mutating func duplicateRange(_ bytes: inout [UInt8]) {
    guard !bytes.isEmpty, bytes.count < 1 << 20 else { return }
    let start = random.below(bytes.count)
    let piece = bytes[start..<min(bytes.count, start + 1 + random.below(64))]
    bytes.insert(contentsOf: piece, at: random.below(bytes.count + 1))
  }

  mutating func truncate(_ bytes: inout [UInt8]) {
    guard !bytes.isEmpty else { return }
    bytes.removeLast(1 + random.below(min(bytes.count, 64)))
  }

  /// Overwrites 1, 2, 4 or 8 bytes (little-endian) with an extreme value: lengths, offsets,
  /// counts and sizes in binary headers.
  mutating func overwriteInteger(_ bytes: inout [UInt8]) {
    let width = [1, 2, 4, 8][random.below(4)]
    guard bytes.count >= width else { return }
    var value = Self.interestingIntegers[random.below(Self.interestingIntegers.count)]
    if random.below(4) == 0 { value = value &+ UInt64(random.below(3)) &- 1 }
    let at = random.below(bytes.count - width + 1)
    for i in 0..<width { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
  }

  mutating func splice(_ bytes: inout [UInt8], _ other: [UInt8]) {
    guard !bytes.isEmpty, !other.isEmpty else { return }
    let cut = random.below(bytes.count)
    let from = random.below(other.count)
    bytes = Array(bytes[..<cut]) + Array(other[from...])
  }

  mutating func insertRandom(_ bytes: inout [UInt8]) {
    let count = 1 + random.below(8)
    let piece = (0..<count).map { _ in UInt8(truncatingIfNeeded: random.next()) }
    bytes.insert(contentsOf: piece, at: random.below(bytes.count + 1))
  }

  /// Replaces one decimal number in the text with an extreme one.
  mutating func replaceNumber(_ bytes: inout [UInt8]) {
    let isDigit: (UInt8) -> Bool = { $0 >= 0x30 && $0 <= 0x39 }
    let starts = bytes.indices.filter { isDigit(bytes[$0]) && ($0 == 0 || !isDigit(bytes[$0 - 1])) }
    guard !starts.isEmpty else { return insertToken(&bytes) }
    let start = starts[random.below(starts.count)]
    var end = start
    while end < bytes.count && (isDigit(bytes[end]) || bytes[end] == 0x2E) { end += 1 }
    let numbers = Array(Self.tokens.prefix(8))
    bytes.replaceSubrange(start..<end, with: Array(numbers[random.below(numbers.count)].utf8))
  }

  mutating func insertToken(_ bytes: inout [UInt8]) {
    let token = Array(Self.tokens[random.below(Self.tokens.count)].utf8)
    let at = random.below(bytes.count + 1)
    if random.below(2) == 0, at < bytes.count {
      bytes.replaceSubrange(at..<min(bytes.count, at + 1 + random.below(8)), with: token)
    } else {
      bytes.insert(contentsOf: token, at: at)
    }
  }
}
