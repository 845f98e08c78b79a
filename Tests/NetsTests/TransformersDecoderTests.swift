import Checkpoint
import Foundation
import Tensor
import Testing

@testable import Nets

/// Tiny decoders written and run by Hugging Face transformers (5.24, in float64) with the
/// config.json fields that change the maths: q/k/v/o and MLP biases, a head size other than
/// hidden / heads, `rope_parameters` and `rope_scaling` (default, linear, dynamic beyond
/// `max_position_embeddings`, yarn, llama3), Mistral's and Qwen2's sliding windows, tied
/// embeddings, Qwen3's query/key norms, Gemma 2 (offset norms around each sublayer, scaled
/// embeddings, `query_pre_attn_scalar`, soft-capped scores and logits, alternating windows).
/// `scripts/make-decoder-fixtures.py` made them.
@Suite struct TransformersDecoderTests {
  static let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
    "Fixtures/transformers-decoders"
  ).path
  static let cases = [
    "llama-biases", "llama-linear", "llama-dynamic", "llama-yarn", "llama3", "mistral-window", "qwen2-window", "qwen3",
    "gemma2",
  ]

  static func network(_ name: String) throws -> Network<Float> {
    let folder = Self.folder + "/" + name
    let config = try NetworkConfig(json: Data(contentsOf: URL(fileURLWithPath: folder + "/config.json")))
    let checkpoint = try openCheckpoint(folder + "/model.safetensors")
    return try Network<Float>(
      config: config,
      tensors: Dictionary(
        uniqueKeysWithValues: try checkpoint.tensors.map { ($0.name, try checkpoint.tensor(named: $0.name)) }))
  }

  /// Dynamic scaling follows each sequence's own length, so a short sequence (6 tokens, within
  /// `max_position_embeddings` 8) gets the same logits alone and padded next to a long one (12).
  @Test func dynamicScalingIsPerSequence() throws {
    let network = try Self.network("llama-dynamic")
    let (long, short) = (Array(0..<12), [3, 17, 22, 8, 0, 19])
    func logits(_ sequences: [[Int]]) throws -> Matrix<Float> {
      let tape = Tape<Float>()
      return tape.value(try network.forward(tape, .tokens(TokenBatch(sequences))).output)
    }
    let (together, alone) = (try logits([long, short]), try logits([short]))
    let width = alone.columns
    let worst = (0..<(6 * width)).map { abs(together.values[12 * width + $0] - alone.values[$0]) }.max() ?? 1
    #expect(worst < 1e-5, "max difference \(worst)")
  }

  @Test(arguments: cases)
  func logitsMatchTransformers(_ name: String) throws {
    let folder = Self.folder + "/" + name
    let reference =
      try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: folder + "/reference.json")))
      as! [String: Any]
    let sequences = (reference["sequences"] as! [[NSNumber]]).map { $0.map(\.intValue) }
    let expected = (reference["logits"] as! [[[NSNumber]]]).map { $0.flatMap { $0.map(\.doubleValue) } }
    let network = try Self.network(name)
    let tape = Tape<Float>()
    let logits = tape.value(try network.forward(tape, .tokens(TokenBatch(sequences))).output)
    for (b, want) in expected.enumerated() {
      let got = (0..<(want.count)).map { Double(logits.values[b * want.count + $0]) }
      let error = relativeError(got, want)
      #expect(error < 1e-5, "\(name), sequence \(b): relative error \(error)")
    }
  }
}
