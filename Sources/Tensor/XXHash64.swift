/// XXH64 (Yann Collet's xxHash, 64-bit variant): the checksum of the compressed checkpoint format
/// and the stable string hash that keys random streams. Same value on every machine; reads input
/// unaligned in little-endian order.
public enum XXHash64 {
  static let p1: UInt64 = 0x9E37_79B1_85EB_CA87
  static let p2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
  static let p3: UInt64 = 0x1656_67B1_9E37_79F9
  static let p4: UInt64 = 0x85EB_CA77_C2B2_AE63
  static let p5: UInt64 = 0x27D4_EB2F_1656_67C5

  @inline(__always) static func round(_ acc: UInt64, _ input: UInt64) -> UInt64 {
    var a = acc &+ input &* p2
    a = (a << 31) | (a >> 33)
    return a &* p1
  }

  @inline(__always) static func merge(_ acc: UInt64, _ value: UInt64) -> UInt64 {
    (acc ^ round(0, value)) &* p1 &+ p4
  }

  /// The hash of `bytes` with `seed`.
  public static func hash(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
    let n = bytes.count
    guard let p = bytes.baseAddress else { return finish(seed &+ p5, p: Kernels.noElements, from: 0, to: 0) }
    var h: UInt64
    var i = 0
    if n >= 32 {
      var v1 = seed &+ p1 &+ p2
      var v2 = seed &+ p2
      var v3 = seed
      var v4 = seed &- p1
      while i + 32 <= n {
        v1 = round(v1, p.loadUnaligned(fromByteOffset: i, as: UInt64.self).littleEndian)
        v2 = round(v2, p.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self).littleEndian)
        v3 = round(v3, p.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self).littleEndian)
        v4 = round(v4, p.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self).littleEndian)
        i += 32
      }
      h = ((v1 << 1) | (v1 >> 63)) &+ ((v2 << 7) | (v2 >> 57)) &+ ((v3 << 12) | (v3 >> 52)) &+ ((v4 << 18) | (v4 >> 46))
      h = merge(h, v1)
      h = merge(h, v2)
      h = merge(h, v3)
      h = merge(h, v4)
    } else {
      h = seed &+ p5
    }
    h = h &+ UInt64(n)
    return finish(h, p: p, from: i, to: n)
  }

  @inline(__always) static func finish(_ start: UInt64, p: UnsafeRawPointer, from: Int, to n: Int) -> UInt64 {
    var h = start
    var i = from
    while i + 8 <= n {
      h ^= round(0, p.loadUnaligned(fromByteOffset: i, as: UInt64.self).littleEndian)
      h = ((h << 27) | (h >> 37)) &* p1 &+ p4
      i += 8
    }
    if i + 4 <= n {
      h ^= UInt64(p.loadUnaligned(fromByteOffset: i, as: UInt32.self).littleEndian) &* p1
      h = ((h << 23) | (h >> 41)) &* p2 &+ p3
      i += 4
    }
    while i < n {
      h ^= UInt64(p.load(fromByteOffset: i, as: UInt8.self)) &* p5
      h = ((h << 11) | (h >> 53)) &* p1
      i += 1
    }
    h ^= h >> 33
    h = h &* p2
    h ^= h >> 29
    h = h &* p3
    h ^= h >> 32
    return h
  }

  /// The hash of a byte array.
  public static func hash(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
    bytes.withUnsafeBytes { hash($0, seed: seed) }
  }

  /// The hash of a string's UTF-8 bytes.
  public static func hash(_ text: String, seed: UInt64 = 0) -> UInt64 {
    hash(Array(text.utf8), seed: seed)
  }
}
