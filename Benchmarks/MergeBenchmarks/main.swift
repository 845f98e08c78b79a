// Merge benchmarks: prints figures, asserts nothing.
//
//   swift run -c release MergeBenchmarks [--gb 1] [--models 3] [--data DIR] [--methods linear,ties] [--kernels-only]
//
// First the element cost of each merge kernel on one streaming range. Then writes a Llama-shaped bf16 base of about --gb GB and --models fine-tunes of it (low-rank plus
// sparse changes) into DIR (default bench-data/merge-<gb>gb, reused when present), then times
// `mergekit merge` per method against reading the same bytes with no work, and against reading
// them and then writing the output's bytes with no work, with the merge's peak RSS against the
// largest tensor. Then randomized against full SVD at rank n/8.
import BenchmarkSupport
import Checkpoint
import Foundation
import Tensor

let gigabytes = Double(option("--gb") ?? "1") ?? 1
let modelCount = Int(option("--models") ?? "3") ?? 3
let data = option("--data") ?? "bench-data/merge-\(gigabytes.formatted())gb"
let methods = (option("--methods") ?? "linear,ties").split(separator: ",").map(String.init)
let binary = option("--mergekit") ?? siblingBinary()

/// Element throughput of the merge kernels on one streaming range of random data (3 models).
func kernelFigures() throws {
  let n = 1 << 18
  let rng = CounterRNG(seed: 7, stream: "kernels")
  let base = rng.normalTensor([n]).scalars
  let deltas = (0..<3).map { m in CounterRNG(seed: UInt64(m), stream: "delta").normalTensor([n]).scalars }
  let keep = deltas.map { Selection.largestMagnitudes($0, keep: n / 2) }
  let weights = [1.0, 0.8, 0.6]
  let repeats = 40
  func report(_ label: String, elements: Int, _ body: () -> Void) throws {
    let time = seconds { for _ in 0..<repeats { body() } }
    print(
      String(
        format: "%@ %6.2f ns per output element", label.padding(toLength: 44, withPad: " ", startingAt: 0),
        time / Double(repeats * elements) * 1e9))
    record("merge-kernels", label, time / Double(repeats * elements) * 1e9, unit: "ns per element")
  }
  print("\n== merge kernels, one range of \(n) elements, 3 models, \(Parallel.threadCount) threads")
  try report("difference", elements: n) { _ = Kernels.difference(deltas[0], base) }
  try report("masked (random half kept)", elements: n) { _ = Kernels.masked(deltas[0], keep: keep[0]) }
  try report("weightedSum of 3 with base", elements: n) {
    _ = Kernels.weightedSum(deltas, weights: weights, base: base)
  }
  let stored = ([base] + deltas).map { Tensor(shape: [n], scalars: $0).encoded(as: .bf16).bytes }
  var out = [UInt8](repeating: 0, count: 2 * n)
  let units = VectorUnit.allCases.reversed().filter { $0 <= .machine }
  for (label, subtracting) in [("weightedSum of 3 with base, bf16", false), ("task arithmetic of 3, bf16", true)] {
    for unit in units {
      try report("\(label), \(unit)", elements: n) {
        stored.withUnsafeBufferPointers { p in
          let elements = p.map { Kernels.StoredElements(start: $0, dtype: .bf16) }
          out.withUnsafeMutableBytes { o in
            Kernels.weightedSum(
              Array(elements.dropFirst()), weights: weights, scale: 1, base: elements[0], subtractingBase: subtracting,
              count: n, into: o, as: .bf16, unit: unit)
          }
        }
      }
    }
  }
  for unit in units {
    try report("SLERP sums (norms, dot), bf16, \(unit)", elements: n) {
      stored.withUnsafeBufferPointers { p in
        _ = Kernels.dotsOfPair(
          Kernels.StoredElements(start: p[0], dtype: .bf16), Kernels.StoredElements(start: p[1], dtype: .bf16),
          count: n, unit: unit)
      }
    }
  }
  try report("SLERP's weighted sum of 2, bf16 bytes", elements: n) {
    stored.withUnsafeBufferPointers { p in
      out.withUnsafeMutableBytes { o in
        Kernels.weightedSum(
          [Kernels.StoredElements(start: p[0], dtype: .bf16), Kernels.StoredElements(start: p[1], dtype: .bf16)],
          weights: [0.6, 0.4], scale: 1, base: nil, subtractingBase: false, count: n, into: o, as: .bf16)
      }
    }
  }
  let drawn = Kernels.randomKeepBits(n, offset: 0, rng: rng, density: 0.5)
  for unit in units {
    try report("DARE draws, \(unit)", elements: n) {
      _ = Kernels.randomKeepBits(n, offset: 0, rng: rng, density: 0.5, unit: unit)
    }
  }
  for unit in units {
    try report("L1 sums (all and kept) of drawn bits, \(unit)", elements: n) {
      _ = Kernels.absoluteSums(deltas[0], keepBits: drawn, unit: unit)
    }
  }
  for unit in units {
    try report("L1 sums of bf16 differences, \(unit)", elements: n) {
      stored.withUnsafeBufferPointers { p in
        _ = Kernels.absoluteSums(
          differenceOf: Kernels.StoredElements(start: p[1], dtype: .bf16),
          minus: Kernels.StoredElements(start: p[0], dtype: .bf16), count: n, keepBits: drawn, unit: unit)
      }
    }
  }
  try report("consensusMerge of 3 (TIES)", elements: n) {
    _ = Kernels.consensusMerge(base: base, deltas: deltas, weights: weights, lambda: 1, normalize: true)
  }
  // TIES's merge pass as the streamed runner calls it: the deltas formed from the stored bf16
  // bytes, each kept above a magnitude threshold (about half).
  let bands = deltas.map { d -> Kernels.KeepRule in
    let keys = d.map { $0.bitPattern & 0x7FFF_FFFF }.sorted()
    return .magnitudes(keys[n / 2]...0x7FFF_FFFF)
  }
  for unit in units {
    try report("TIES merge of 3 from bf16 bytes, \(unit)", elements: n) {
      stored.withUnsafeBufferPointers { p in
        let elements = p.map { Kernels.StoredElements(start: $0, dtype: .bf16) }
        _ = Kernels.sparseConsensusMerge(
          base: elements[0], models: Array(elements.dropFirst()), count: n, keep: bands, scales: [1, 1, 1],
          weights: weights, lambda: 1, normalize: true, unit: unit)
      }
    }
  }
  // TIES's statistics pass: one task vector's bracket summary from the stored bf16 bytes.
  let storedDifference = stored.withUnsafeBufferPointers { p in
    Kernels.differences(
      [Kernels.StoredElements(start: p[1], dtype: .bf16)],
      minus: Kernels.StoredElements(start: p[0], dtype: .bf16).decoded(count: n))[0]
  }
  if let bracket = MagnitudeBracket(keep: n / 2, count: n, sample: storedDifference, budget: n / 32) {
    for unit in units {
      try report("bracket summary, bf16 bytes, \(unit)", elements: n) {
        stored.withUnsafeBufferPointers { p in
          _ = bracket.summarize(
            differenceOf: Kernels.StoredElements(start: p[1], dtype: .bf16),
            minus: Kernels.StoredElements(start: p[0], dtype: .bf16), count: n, unit: unit)
        }
      }
    }
  }
  // RAM's merge and RAM+TL's counting pass from the stored bf16 bytes, as one range's producer
  // runs them: on the calling core.
  try report("RAM merge of 3 from bf16 bytes (one core)", elements: n) {
    stored.withUnsafeBufferPointers { p in
      out.withUnsafeMutableBytes { o in
        let elements = p.map { Kernels.StoredElements(start: $0, dtype: .bf16) }
        Kernels.changeMerge(
          base: elements[0], models: Array(elements.dropFirst()), count: n, epsilon: 1e-5, lambdas: [1, 1, 1],
          into: o, as: .bf16)
      }
    }
  }
  try report("RAM+TL counts of 3, bf16 bytes (one core)", elements: n) {
    stored.withUnsafeBufferPointers { p in
      let elements = p.map { Kernels.StoredElements(start: $0, dtype: .bf16) }
      _ = Kernels.changeCounts(base: elements[0], models: Array(elements.dropFirst()), count: n, epsilon: 1e-5)
    }
  }
  // Arcee fusion's key pass and merge from the stored bf16 bytes (the model's and the base's),
  // rows of 2048, on the calling core: keys under three 16-bit prefixes of the quartiles'.
  let width = 2048
  let factors = (0..<(n / width)).map { 0.5 + Double($0 % 7) * 0.1 }
  let decoded = stored.prefix(2).map { TensorData(dtype: .bf16, shape: [n], bytes: $0).decoded().scalars }
  var importanceKeys = (0..<n).map {
    Kernels.orderKey(abs(Double(decoded[1][$0]) - Double(decoded[0][$0])) * factors[$0 / width])
  }
  importanceKeys.sort()
  let prefixes = [n / 4, n / 2, 3 * n / 4].map { importanceKeys[$0] >> 48 }
  for unit in units {
    try report("arcee keys, bf16 bytes, \(unit) (one core)", elements: n) {
      stored.withUnsafeBufferPointers { p in
        _ = Kernels.importanceKeys(
          model: Kernels.StoredElements(start: p[1], dtype: .bf16),
          base: Kernels.StoredElements(start: p[0], dtype: .bf16),
          count: n, offset: 0, width: width, factors: factors, under: prefixes, knownBits: 16, unit: unit)
      }
    }
    try report("arcee merge, bf16 bytes, \(unit) (one core)", elements: n) {
      stored.withUnsafeBufferPointers { p in
        out.withUnsafeMutableBytes { o in
          Kernels.fuseByImportance(
            model: Kernels.StoredElements(start: p[1], dtype: .bf16),
            base: Kernels.StoredElements(start: p[0], dtype: .bf16),
            count: n, offset: 0, width: width, factors: factors,
            threshold: Kernels.orderedDouble(importanceKeys[n / 2]),
            into: o, as: .bf16, unit: unit)
        }
      }
    }
  }
  var ranker = MagnitudeRanker(keep: n / 2, count: n)
  try report("top-k histograms (high + low bits)", elements: n) {
    _ = MagnitudeRanker.highCounts(deltas[0]); _ = ranker.lowCounts(deltas[0])
  }
  ranker.addHigh(MagnitudeRanker.highCounts(deltas[0]))
  ranker.finishHigh()
  ranker.addLow(ranker.lowCounts(deltas[0]))
  ranker.finishLow()
  try report("top-k mask", elements: n) { _ = ranker.mask(deltas[0], equalBefore: 0) }
  // DELLA's ranking: rows of 2048 magnitudes of a fine-tune's bf16 differences from its base,
  // as Float keys, on one core.
  let fineTuned = Tensor(shape: [n], scalars: zip(base, deltas[0]).map { $0 + 0.01 * $1 }).encoded(as: .bf16)
  let rounded = (Tensor(shape: [n], scalars: base).encoded(as: .bf16), fineTuned)
  let magnitudeKeys = zip(rounded.0.decoded().scalars, rounded.1.decoded().scalars).map {
    Float(abs(Double($1) - Double($0))).bitPattern
  }
  var workspace = KeyOrder.Workspace()
  var rowRanks = [Int32](repeating: 0, count: 2048)
  try report("DELLA row ranks (rows of 2048, one core)", elements: n) {
    magnitudeKeys.withUnsafeBufferPointer { keys in
      rowRanks.withUnsafeMutableBufferPointer { ranks in
        for start in stride(from: 0, to: n, by: 2048) {
          workspace.ranks(of: UnsafeBufferPointer(rebasing: keys[start..<start + 2048]), into: ranks)
        }
      }
    }
  }
}

/// A Llama-like architecture of about `gigabytes` GB in bf16: hidden 2048, MLP 5632, 32k vocabulary.
func architecture(gigabytes: Double) -> ExampleModels.Architecture {
  var arch = ExampleModels.Architecture()
  arch.hiddenSize = 2048
  arch.intermediateSize = 5632
  arch.headCount = 16
  arch.keyValueHeadCount = 4
  arch.vocabularySize = 32000
  let perLayer: Double = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 5632 + 2 * 2048
  let embeddings: Double = 2 * 32000 * 2048
  let layers = ((gigabytes * 5e8 - embeddings) / perLayer).rounded()
  arch.layerCount = max(1, Int(layers))
  return arch
}

/// Writes base and fine-tunes tensor by tensor (memory: one tensor per model).
func writeModels(_ arch: ExampleModels.Architecture, to folder: String, count: Int) throws -> [String] {
  let names = ["base"] + (1...count).map { "finetune-\($0)" }
  let paths = names.map { "\(folder)/\($0)" }
  if paths.allSatisfy({ FileManager.default.fileExists(atPath: $0 + "/model.safetensors") }) { return paths }
  try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
  print("writing \(count + 1) models of \(arch.layerCount) layers to \(folder) ...")
  let infos = arch.tensors.map { TensorInfo(name: $0.name, dtype: .bf16, shape: $0.shape) }
  let writers = try paths.map {
    try CheckpointWriter(
      destination: $0, tensors: infos, options: WriteOptions(metadata: ["format": "pt"], overwrite: true))
  }
  for (name, shape) in arch.tensors {
    let rng = CounterRNG(seed: 0, stream: name)
    let base =
      shape.count == 1
      ? Tensor(shape: shape, scalars: [Float](repeating: 1, count: shape[0]))
      : Tensor(shape: shape, scalars: Elementwise.map(shape.reduce(1, *)) { rng.normal(UInt64($0)) * 0.02 })
    try writers[0].write(name, base.encoded(as: .bf16))
    for i in 1...count {
      try writers[i].write(name, ExampleModels.fineTune([(name, base)], seed: UInt64(i))[0].tensor.encoded(as: .bf16))
    }
  }
  for writer in writers { try writer.finish() }
  for path in paths { try arch.configJSON.write(toFile: path + "/config.json", atomically: true, encoding: .utf8) }
  return paths
}

BLAS.restartWithTheCPUsKernels()
// As `mergekit` does: OpenBLAS's start-up threads would spin through the first kernel figures.
BLAS.shortenIdleSpin()
print("mergekit merge benchmarks (\(Parallel.threadCount) cores, OpenBLAS kernels \(BLAS.coreName))")
try kernelFigures()
if CommandLine.arguments.contains("--kernels-only") { exit(0) }

let arch = architecture(gigabytes: gigabytes)
let paths = try writeModels(arch, to: data, count: modelCount)
let models = try paths.map { try openCheckpoint($0) }
let largest = models[0].tensors.map(\.count).max() ?? 0
let inputBytes = models.dropFirst().reduce(0) { $0 + $1.totalByteCount }
let withBase = inputBytes + models[0].totalByteCount
print(
  "\n== \(modelCount) models of \(String(format: "%.2f", Double(models[0].totalByteCount) / 1e9)) GB bf16 (\(models[0].tensors.count) tensors, largest \(largest) values = \(String(format: "%.0f", Double(largest) * 4 / 1e6)) MB in f32)"
)
for model in models { _ = try plainRead(model) }  // warm the page cache
var read = 0.0
for model in models { read += try plainRead(model) }
print(String(format: "plain read of base + models (no work)   %.2f s  %@", read, gbps(withBase, read)))
record("merge", "plain read", Double(withBase) / read / 1e9, unit: "GB/s")
let scratch = NSTemporaryDirectory() + "mergekit-merge-bench-\(getpid())"
try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: scratch) }
// The I/O reference of a merge: reading every input, then writing the output's bytes, with no
// work in between. Dirty pages are flushed before each timed run so that the writeback of an
// earlier output does not count against the next.
// Every timed write and merge first writes and removes a scratch file a little larger than its
// output (`recycleMemory`): on a virtual machine whose free memory goes back to the host (free
// page reporting), a write onto memory the host took back waits on the host page by page, 15-25
// times the kernel's own copy; the figures below are the kernel's and the tools', and the line
// "onto memory returned to the host" shows that cost by itself. Both in 1 MiB pieces, as the
// checkpoint writer writes (see `plainWrite`); the plain write and dd take turns, twice each,
// and each keeps its best.
let blocks = (models[0].totalByteCount + (1 << 20) - 1) >> 20
let recycled = scratch + "/recycled"
func recycle(_ bytes: Int) throws {
  sync()
  try recycleMemory(bytes + bytes / 4 + (256 << 20), at: recycled)
}
var write = Double.infinity
var ddBest = Double.infinity
for _ in 0..<2 {
  try recycle(models[0].totalByteCount)
  write = min(write, try plainWrite(models[0].totalByteCount, to: scratch + "/write-baseline"))
  try recycle(models[0].totalByteCount)
  if let dd = try? runChild(
    "/bin/dd", ["if=/dev/zero", "of=\(scratch)/dd-baseline", "bs=1M", "count=\(blocks)", "status=none"])
  {
    ddBest = min(ddBest, dd.0)
  }
  try? FileManager.default.removeItem(atPath: scratch + "/dd-baseline")
}
print(
  String(format: "plain write of one model (no work)      %.2f s  %@", write, gbps(models[0].totalByteCount, write)))
record("merge", "plain write", Double(models[0].totalByteCount) / write / 1e9, unit: "GB/s")
// dd writing the same bytes, the system's own reference for a sequential write to the page cache.
if ddBest.isFinite {
  print(String(format: "dd of the same bytes (bs=1M)            %.2f s  %@", ddBest, gbps(blocks << 20, ddBest)))
  record("merge", "dd write", Double(blocks << 20) / ddBest / 1e9, unit: "GB/s")
}
if hostTakesFreeMemory() {
  // The same write after the host has taken back the memory freed before it: the first write
  // to each page waits on the host. Every tool pays it alike (mergekit's gigabytes of tensors
  // too); it is the machine's cost, not the writer's.
  sync()
  try recycleMemory(models[0].totalByteCount, at: recycled)
  Thread.sleep(forTimeInterval: 5)
  let cold = try plainWrite(models[0].totalByteCount, to: scratch + "/write-cold")
  print(
    String(
      format: "plain write onto memory returned to the host %.2f s  %@  (%.1f x the write above)", cold,
      gbps(models[0].totalByteCount, cold), cold / write))
  record("merge", "plain write onto returned memory", Double(models[0].totalByteCount) / cold / 1e9, unit: "GB/s")
}
// mergekit's own write path with no merge work: `convert` copies the base through the same
// checkpoint writer a merge uses (reading it is the 0.03 s above).
var copyBest = Double.infinity
for _ in 0..<2 {
  try recycle(models[0].totalByteCount)
  if let copy = try? runChild(binary, ["convert", paths[0], scratch + "/copy.safetensors", "--overwrite", "-q"]) {
    copyBest = min(copyBest, copy.0)
  }
  try? FileManager.default.removeItem(atPath: scratch + "/copy.safetensors")
}
if copyBest.isFinite {
  print(
    String(
      format: "mergekit convert (copy through the writer) %.2f s  %@  (%.2f x dd's time)", copyBest,
      gbps(models[0].totalByteCount, copyBest), copyBest / ddBest))
  record("merge", "writer copy", Double(models[0].totalByteCount) / copyBest / 1e9, unit: "GB/s")
}
for method in methods {
  let usesBase = method != "linear"
  let merged = method == "slerp" ? [paths[1]] : Array(paths.dropFirst())
  var arguments = ["merge"] + merged + ["--method", method, "-o", scratch + "/out.safetensors", "--overwrite", "-q"]
  if usesBase { arguments += ["--base", paths[0]] }
  if method == "slerp" { arguments += ["--t", "0.5"] }
  if method.contains("ties") || method.contains("dare") || method.contains("breadcrumbs") {
    arguments += ["--density", "0.5"]
  }
  let bytes = method == "slerp" ? 2 * models[0].totalByteCount : usesBase ? withBase : inputBytes
  try recycle(models[0].totalByteCount)
  let (time, rss) = try runChild(binary, arguments)
  let readTime = read * Double(bytes) / Double(withBase)
  print(
    String(
      format:
        "merge --method %-12@ %6.2f s  %@ of input  (%.2f of plain read speed, %.2f of plain read + write)  peak RSS %.0f MB = %.1f x the largest tensor in f32",
      method, time, gbps(bytes, time), readTime / time, (readTime + write) / time, rss,
      rss * 1e6 / (Double(largest) * 4)))
  record(
    "merge", method, time, unit: "s",
    [
      "input_bytes": bytes, "peak_rss_mb": rss, "models": modelCount, "gigabytes": gigabytes,
      "of_plain_read": readTime / time,
    ])
  try? FileManager.default.removeItem(atPath: scratch + "/out.safetensors")
}

print("\n== truncated SVD at rank n/8, one matrix with singular values 0.98^i")
for n in [512, 1024, 2048] {
  let r = n / 8
  let u = LAPACK.qr(CounterRNG(seed: 1, stream: "u").normalTensor([n, n])).q
  var v = LAPACK.qr(CounterRNG(seed: 1, stream: "v").normalTensor([n, n])).q
  let values = (0..<n).map { Float(pow(0.98, Double($0))) }
  for i in 0..<n { for j in 0..<n { v.scalars[i * n + j] *= values[j] } }
  let a = BLAS.matmul(v, u, transposeB: true)
  var full: SVD?
  let fullTime = try seconds { full = try LAPACK.svd(a) }
  var fast: SVD?
  let fastTime = try seconds { fast = try LAPACK.randomizedSVD(a, rank: r) }
  let optimal = values[r...].reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
  func residual(_ f: SVD) -> Double {
    let t = LAPACK.truncated(f, to: r).reconstructed
    return zip(a.scalars, t.scalars).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) }.squareRoot()
  }
  print(
    String(
      format:
        "n = %4d, r = %3d: full SVD %6.3f s (error %.4f x optimal), randomized %6.3f s (error %.4f x optimal), %.1fx faster",
      n, r, fullTime, (full.map(residual) ?? .nan) / optimal, fastTime, (fast.map(residual) ?? .nan) / optimal,
      fullTime / fastTime))
}

extension Array where Element == [UInt8] {
  /// Calls `body` with a raw pointer to each array's bytes.
  func withUnsafeBufferPointers<R>(_ body: ([UnsafeRawPointer]) throws -> R) rethrows -> R {
    func nest(_ i: Int, _ held: [UnsafeRawPointer]) throws -> R {
      guard i < count else { return try body(held) }
      return try self[i].withUnsafeBytes { try nest(i + 1, held + [$0.baseAddress ?? Kernels.noElements]) }
    }
    return try nest(0, [])
  }
}
