// Nets benchmarks: prints figures, asserts nothing.
//
//   swift run -c release NetsBenchmarks
//
// The machine's sgemm rate (one large square product), then the forward throughput of a
// mid-sized MLP and a small Llama-style decoder on one batch, as GFLOP/s of their matrix
// products and as a fraction of the sgemm rate (the best rate of the run: sgemm runs again
// before each measured pass); and the cost of a backward pass.
import BenchmarkSupport
import Foundation
import Nets
import Tensor

func gflops(_ flops: Double, _ seconds: Double) -> Double { flops / seconds / 1e9 }

func best(_ repeats: Int, _ body: () throws -> Void) throws -> Double {
  var times: [Double] = []
  for _ in 0..<repeats { times.append(try seconds(body)) }
  return times.min() ?? 0
}

BLAS.restartWithTheCPUsKernels()
BLAS.shortenIdleSpin()  // as mergekit does
print("Nets benchmarks (\(ProcessInfo.processInfo.activeProcessorCount) cores, OpenBLAS kernels \(BLAS.coreName))")
let n = 1024
let a = Matrix<Float>(rows: n, columns: n, values: CounterRNG(seed: 1, stream: "a").normalTensor([n * n]).scalars)
var sgemm = gflops(2 * Double(n * n * n), try best(5) { _ = a.matmul(a) })
print(String(format: "sgemm %d x %d x %d: %.1f GFLOP/s", n, n, n, sgemm))

/// The best time of `repeats` runs of `body`, each right after one more sgemm, which raises
/// `sgemm` when faster: on a shared machine the rate moves by half within a minute, and a
/// fraction of it should compare figures from the same stretch of time, never a network's good
/// minute against the product's bad one.
func bestAlongsideSgemm(_ repeats: Int, _ body: () throws -> Void) throws -> Double {
  var times: [Double] = []
  for _ in 0..<repeats {
    sgemm = max(sgemm, gflops(2 * Double(n * n * n), seconds { _ = a.matmul(a) }))
    times.append(try seconds(body))
  }
  return times.min() ?? 0
}

// MLP [1024, 4096, 4096, 1024], batch 512.
let sizes = [1024, 4096, 4096, 1024]
let mlp = Network<Float>.initializedMLP(MLPConfig(layerSizes: sizes, activation: .gelu), seed: 0)
let batch = Matrix<Float>(
  rows: 512, columns: 1024, values: CounterRNG(seed: 2, stream: "x").normalTensor([512 * 1024]).scalars)
let mlpFlops = 2 * 512 * Double(zip(sizes, sizes.dropFirst()).reduce(0) { $0 + $1.0 * $1.1 })
let forward = try bestAlongsideSgemm(3) {
  let tape = Tape<Float>(); _ = try mlp.forward(tape, .features(batch))
}
print(
  String(
    format: "MLP %@ forward, batch 512: %.3f s, %.1f GFLOP/s = %.2f of sgemm", sizes.description, forward,
    gflops(mlpFlops, forward), gflops(mlpFlops, forward) / sgemm))
record("nets", "mlp forward", gflops(mlpFlops, forward) / sgemm, unit: "of sgemm", ["seconds": forward])
let training = try bestAlongsideSgemm(2) {
  let tape = Tape<Float>()
  let out = try mlp.forward(tape, .features(batch)) { tape.parameter($1) }
  tape.backward(from: tape.crossEntropy(out.output, labels: (0..<512).map { $0 % 1024 }))
}
print(
  String(
    format: "MLP forward + backward: %.3f s, %.1f GFLOP/s (3x the forward products) = %.2f of sgemm", training,
    gflops(3 * mlpFlops, training), gflops(3 * mlpFlops, training) / sgemm))
record("nets", "mlp forward+backward", gflops(3 * mlpFlops, training) / sgemm, unit: "of sgemm", ["seconds": training])

// Decoder: hidden 512, 4 layers, 8 heads (4 KV), MLP 1536, vocabulary 8000; 4 sequences of 256.
let decoderJSON = """
  {"architectures": ["LlamaForCausalLM"], "vocab_size": 8000, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
   "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-5}
  """
let config = try NetworkConfig(json: Data(decoderJSON.utf8))
var tensors: [String: Tensor] = [:]
for (name, shape) in Network<Float>.expectedShapes(config) {
  tensors[name] = CounterRNG(seed: 3, stream: name).normalTensor(shape, scale: 0.02)
}
let decoder = try Network<Float>(config: config, tensors: tensors)
let (sequences, length) = (4, 256)
let tokens = TokenBatch((0..<sequences).map { s in (0..<length).map { ($0 * 31 + s * 7) % 8000 } })
let rows = Double(sequences * length)
let projections = 2 * rows * Double(4 * (512 * 512 * 2 + 512 * 256 * 2 + 3 * 512 * 1536) + 512 * 8000)
let attentionFlops = 4 * 8 * Double(sequences) * 2 * 2 * Double(length * length * 64)
let decoderTime = try bestAlongsideSgemm(3) {
  let tape = Tape<Float>(); _ = try decoder.forward(tape, .tokens(tokens))
}
let decoderFlops = projections + attentionFlops
print(
  String(
    format: "decoder forward (%d x %d tokens): %.3f s, %.1f GFLOP/s = %.2f of sgemm", sequences, length, decoderTime,
    gflops(decoderFlops, decoderTime), gflops(decoderFlops, decoderTime) / sgemm))
record(
  "nets", "decoder forward", gflops(decoderFlops, decoderTime) / sgemm, unit: "of sgemm", ["seconds": decoderTime])
// The decoder's training step (as PELA's distillation and MatryoshkaKV's training run it): the
// forward with every weight a parameter, cross-entropy, and the backward pass.
let decoderTraining = try bestAlongsideSgemm(3) {
  let tape = Tape<Float>()
  let out = try decoder.forward(tape, .tokens(tokens)) { tape.parameter($1) }
  tape.backward(from: tape.crossEntropy(out.output, labels: (0..<(sequences * length)).map { $0 % 8000 }))
}
print(
  String(
    format: "decoder forward + backward: %.3f s, %.1f GFLOP/s (3x the forward products) = %.2f of sgemm",
    decoderTraining, gflops(3 * decoderFlops, decoderTraining), gflops(3 * decoderFlops, decoderTraining) / sgemm))
record(
  "nets", "decoder forward+backward", gflops(3 * decoderFlops, decoderTraining) / sgemm, unit: "of sgemm",
  ["seconds": decoderTraining])
print(String(format: "sgemm best over the run: %.1f GFLOP/s", sgemm))
record("nets", "sgemm", sgemm, unit: "GFLOP/s", ["n": n])
