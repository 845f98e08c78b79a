// The complete example of docs/library.md, verbatim (keep the two in step), and checks of what it wrote.
import Checkpoint
import Foundation
import Tensor
import Testing

@testable import TestSupport

func libraryExample(in folder: String) throws {
  // Three small Llama-style models: base, finetune-a, finetune-b.
  _ = try ExampleModels.writeExamples(to: folder, overwrite: true)
  let model = try openCheckpoint(folder + "/finetune-a")

  // List tensors.
  for info in model.tensors.prefix(3) {
    print(info.name, info.dtype, info.shape, info.byteCount)
  }

  // Read: whole tensor as floats, a row range as stored bytes.
  let embedding = try model.tensor(named: "model.embed_tokens.weight")
  let firstRows = try model.readRows("model.embed_tokens.weight", 0..<16)
  print(embedding.shape, firstRows.shape, firstRows.dtype)  // [2048, 256] [16, 256] bf16

  // Write a new model: every norm weight scaled by 1.1, everything else copied bit for bit.
  let writer = try CheckpointWriter(
    destination: folder + "/scaled", tensors: model.tensors,
    options: WriteOptions(copyFilesFrom: folder + "/finetune-a", overwrite: true))
  for info in model.tensors {
    if info.name.hasSuffix("norm.weight") {
      var t = try model.tensor(named: info.name)
      t.scalars = t.scalars.map { $0 * 1.1 }
      try writer.write(info.name, t.encoded(as: info.dtype))
    } else {
      try writer.write(info.name, try model.read(info.name))
    }
  }
  try writer.finish()

  // Surgery: layer 0's attention only, renamed, cast to f32, stored compressed.
  let selection = try TensorSelection(
    select: #"layers\.0\.self_attn"#, renames: [#"^model\.layers\.0\.(.*)$=block0.$1"#])
  try copyCheckpoint(
    from: model, to: folder + "/layer0-attn.mkz", selection: selection, castTo: .f32,
    options: WriteOptions(format: .mkz, overwrite: true))
  let layer0 = try openCheckpoint(folder + "/layer0-attn.mkz")
  print(layer0.tensors.map(\.name))  // ["block0.self_attn.q_proj.weight", ...]

  // Delta storage against the base: lossless, and much smaller for a fine-tune.
  let base = try openCheckpoint(folder + "/base")
  try copyCheckpoint(
    from: model, to: folder + "/finetune-a.mkz",
    options: WriteOptions(format: .mkz, deltaBase: base, overwrite: true))
  let delta = try openCheckpoint(folder + "/finetune-a.mkz", base: base)
  try delta.verify(progress: nil)  // every chunk checksum and tensor digest
}

@Suite struct LibraryExampleTests {
  @Test func theDocumentedExampleRunsAndDoesWhatItSays() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try libraryExample(in: folder.path)

    let original = try openCheckpoint(folder.file("finetune-a"))
    let scaled = try openCheckpoint(folder.file("scaled"))
    #expect(scaled.tensors == original.tensors)
    #expect(FileManager.default.fileExists(atPath: folder.file("scaled/config.json")))
    for info in original.tensors {
      if info.name.hasSuffix("norm.weight") {
        // bf16 keeps 8 significant bits: the scaled value is 1.1 x within one rounding.
        for (s, o) in zip(try scaled.tensor(named: info.name).scalars, try original.tensor(named: info.name).scalars) {
          #expect(abs(s - 1.1 * o) <= abs(1.1 * o) * 0x1p-8)
        }
      } else {
        #expect(try scaled.read(info.name) == original.read(info.name))
      }
    }

    let layer0 = try openCheckpoint(folder.file("layer0-attn.mkz"))
    #expect(
      layer0.tensors.map(\.name) == ["q_proj", "k_proj", "v_proj", "o_proj"].map { "block0.self_attn.\($0).weight" })
    #expect(layer0.tensors.allSatisfy { $0.dtype == .f32 })
    let q = try layer0.tensor(named: "block0.self_attn.q_proj.weight")
    #expect(q == (try original.tensor(named: "model.layers.0.self_attn.q_proj.weight")))  // bf16 -> f32 is exact

    let base = try openCheckpoint(folder.file("base"))
    let delta = try openCheckpoint(folder.file("finetune-a.mkz"), base: base)
    for info in original.tensors { #expect(try delta.read(info.name) == original.read(info.name)) }
  }

  @Test func theDocumentCarriesThisExactCode() throws {
    let here = URL(fileURLWithPath: #filePath)
    let root = here.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let document = try String(contentsOf: root.appendingPathComponent("docs/library.md"), encoding: .utf8)
    let source = try String(contentsOf: here, encoding: .utf8)
    func example(_ text: String) -> Substring? {
      guard let start = text.range(of: "func libraryExample("),
        let end = text.range(of: "\n}\n", range: start.upperBound..<text.endIndex)
      else { return nil }
      return text[start.lowerBound..<end.upperBound]
    }
    #expect(example(document) != nil)
    #expect(example(document) == example(source))
  }
}
