import Checkpoint
import Foundation
import Testing

@testable import TestSupport

/// mergekit `slices:` configurations (layer-range merges and passthrough stacking), run as
/// `mergekit run CONFIG -o OUT` on the example Llama models (4 layers).
@Suite struct SlicesTests {
  static let examples: TemporaryFolder = {
    let folder = TemporaryFolder.removedAtExit()
    _ = try? CLI.run("example", folder.file("ex"))
    return folder
  }()

  static func model(_ name: String) -> String { examples.file("ex/\(name)") }

  func run(_ yaml: String, in folder: TemporaryFolder, name: String) throws -> CLI.Result {
    try yaml.write(toFile: folder.file("\(name).yml"), atomically: true, encoding: .utf8)
    return try CLI.run("run", folder.file("\(name).yml"), "-o", folder.file(name), "-q")
  }

  /// Tensor `name` of `path` as stored.
  func bytes(_ path: String, _ name: String) throws -> [UInt8] { try openCheckpoint(path).read(name).bytes }

  /// One slice over every layer is the `models:` form, bit for bit, gradients included.
  @Test func aSliceOverAllLayersIsTheModelsForm() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let a = Self.model("finetune-a")
    let b = Self.model("finetune-b")
    let sliced = try run(
      """
      slices:
        - sources:
            - {model: \(a), layer_range: [0, 4], parameters: {weight: 0.3}}
            - {model: \(b), layer_range: [0, 4], parameters: {weight: [0.2, 0.9]}}
      merge_method: linear
      dtype: bfloat16
      """, in: folder, name: "sliced")
    let plain = try run(
      """
      models:
        - {model: \(a), parameters: {weight: 0.3}}
        - {model: \(b), parameters: {weight: [0.2, 0.9]}}
      merge_method: linear
      dtype: bfloat16
      """, in: folder, name: "plain")
    #expect(sliced.status == 0 && plain.status == 0, "\(sliced.stderr) \(plain.stderr)")
    #expect(readBytes(folder.file("sliced/model.safetensors")) == readBytes(folder.file("plain/model.safetensors")))
  }

  /// A slice's own `base_model` replaces the configuration's for that slice: with task
  /// arithmetic (weight 1), `base + (model - base)` is the model, so layers 0-1 (base a) come out
  /// as b's and layers 2-3 (base b) as a's; the tensors before the layers follow the first slice,
  /// those after the last.
  @Test func aSliceBaseModelReplacesTheConfigurations() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let a = Self.model("finetune-a")
    let b = Self.model("finetune-b")
    let result = try run(
      """
      slices:
        - sources:
            - {model: \(a), layer_range: [0, 2]}
            - {model: \(b), layer_range: [0, 2]}
        - sources:
            - {model: \(a), layer_range: [2, 4]}
            - {model: \(b), layer_range: [2, 4]}
          base_model: \(b)
          residual_weight: 0.5
      merge_method: task_arithmetic
      base_model: \(a)
      parameters: {weight: 1.0}
      dtype: bfloat16
      """, in: folder, name: "bases")
    #expect(result.status == 0, "\(result.stderr)")
    let out = folder.file("bases")
    for (layer, source) in [(0, b), (1, b), (2, a), (3, a)] {
      let name = "model.layers.\(layer).mlp.up_proj.weight"
      #expect(try bytes(out, name) == bytes(source, name), "layer \(layer)")
    }
    #expect(try bytes(out, "model.embed_tokens.weight") == bytes(b, "model.embed_tokens.weight"))
    #expect(try bytes(out, "lm_head.weight") == bytes(a, "lm_head.weight"))
  }

  /// Passthrough stacks layer ranges: layers renumbered, embeddings from the first slice's
  /// source, final norm and head from the last's, config.json's layer count updated, and
  /// `scale` with filters zeroing the projections it names.
  @Test func passthroughStacksLayerRanges() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let a = Self.model("finetune-a")
    let b = Self.model("finetune-b")
    let result = try run(
      """
      slices:
        - sources: [{model: \(a), layer_range: [0, 3]}]
        - sources:
            - model: \(b)
              layer_range: [1, 4]
              parameters:
                scale: [{filter: o_proj, value: 0}, {value: 1}]
      merge_method: passthrough
      """, in: folder, name: "stacked")
    #expect(result.status == 0, "\(result.stderr)")
    let out = folder.file("stacked")
    let merged = try openCheckpoint(out)
    let layers = Set(merged.tensors.compactMap { $0.name.split(separator: ".").dropFirst(2).first.flatMap { Int($0) } })
    #expect(layers == Set(0..<6))
    let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/config.json")))
    #expect((config as? [String: Any])?["num_hidden_layers"] as? Int == 6)
    #expect(try bytes(out, "model.embed_tokens.weight") == bytes(a, "model.embed_tokens.weight"))
    #expect(try bytes(out, "lm_head.weight") == bytes(b, "lm_head.weight"))
    #expect(try bytes(out, "model.layers.2.mlp.up_proj.weight") == bytes(a, "model.layers.2.mlp.up_proj.weight"))
    #expect(try bytes(out, "model.layers.4.mlp.up_proj.weight") == bytes(b, "model.layers.2.mlp.up_proj.weight"))
    #expect(try merged.tensor(named: "model.layers.3.self_attn.o_proj.weight").scalars.allSatisfy { $0 == 0 })
    #expect(
      try bytes(out, "model.layers.2.self_attn.o_proj.weight") == bytes(a, "model.layers.2.self_attn.o_proj.weight"))
  }

  /// Gradients run over each slice (0 at its first layer, 1 at its last), not the whole model:
  /// with model A weighted [0, 1] and B weighted 1, each slice's first layer is B's exactly.
  @Test func gradientsAreEvaluatedPerSlice() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let a = Self.model("finetune-a")
    let b = Self.model("finetune-b")
    let result = try run(
      """
      slices:
        - sources:
            - {model: \(a), layer_range: [0, 2], parameters: {weight: [0, 1]}}
            - {model: \(b), layer_range: [0, 2], parameters: {weight: 1}}
        - sources:
            - {model: \(a), layer_range: [2, 4], parameters: {weight: [0, 1]}}
            - {model: \(b), layer_range: [2, 4], parameters: {weight: 1}}
      merge_method: linear
      """, in: folder, name: "graded")
    #expect(result.status == 0, "\(result.stderr)")
    let out = folder.file("graded")
    for layer in [0, 2] {
      let name = "model.layers.\(layer).self_attn.q_proj.weight"
      #expect(try bytes(out, name) == bytes(b, name), "layer \(layer)")
    }
    let name = "model.layers.1.self_attn.q_proj.weight"
    let average = zip(
      try openCheckpoint(a).tensor(named: name).scalars, try openCheckpoint(b).tensor(named: name).scalars
    )
    .map { (Double($0) + Double($1)) / 2 }
    let merged = try openCheckpoint(out).tensor(named: name).scalars
    #expect(zip(merged, average).allSatisfy { abs(Double($0) - $1) <= 1e-2 * max(1e-3, abs($1)) })
  }

  @Test func badSlicesAreRefusedBeforeWriting() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let a = Self.model("finetune-a")
    let b = Self.model("finetune-b")
    let uneven = try run(
      "slices:\n  - sources:\n      - {model: \(a), layer_range: [0, 2]}\n      - {model: \(b), layer_range: [0, 3]}\n"
        + "merge_method: linear\n", in: folder, name: "uneven")
    #expect(uneven.status == 64 && uneven.stderr.contains("every source must span the same number of layers"))
    let past = try run(
      "slices:\n  - sources:\n      - {model: \(a), layer_range: [2, 9]}\nmerge_method: passthrough\n", in: folder,
      name: "past")
    #expect(past.status == 1 && past.stderr.contains("has no layer 4"), "\(past.stderr)")
    let two = try run(
      "slices:\n  - sources:\n      - {model: \(a), layer_range: [0, 2]}\n      - {model: \(b), layer_range: [0, 2]}\n"
        + "merge_method: passthrough\n", in: folder, name: "two")
    #expect(two.status == 64 && two.stderr.contains("slice 0"), "\(two.stderr)")
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == [
        "past.yml", "two.yml", "uneven.yml",
      ])
  }

  /// `convert --layers` stacks layer ranges of one model: the same tensors as a passthrough
  /// slices config over that model, and config.json with the new layer count; the recipe step
  /// takes `layers` as a parameter.
  @Test func convertLayersStacksRangesOfOneModel() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let a = Self.model("finetune-a")
    let converted = try CLI.run("convert", a, folder.file("stacked"), "--layers", "0-3,1-4", "-q")
    #expect(converted.status == 0, "\(converted.stderr)")
    let sliced = try run(
      """
      slices:
        - sources: [{model: \(a), layer_range: [0, 3]}]
        - sources: [{model: \(a), layer_range: [1, 4]}]
      merge_method: passthrough
      """, in: folder, name: "sliced")
    #expect(sliced.status == 0, "\(sliced.stderr)")
    let (x, y) = (try openCheckpoint(folder.file("stacked")), try openCheckpoint(folder.file("sliced")))
    #expect(x.tensors.map(\.name).sorted() == y.tensors.map(\.name).sorted() && x.tensors.count == 57)
    for info in x.tensors { #expect(try x.read(info.name) == y.read(info.name), "\(info.name)") }
    let config =
      try JSONSerialization.jsonObject(
        with: Data(contentsOf: URL(fileURLWithPath: folder.file("stacked/config.json")))) as? [String: Any]
    #expect(config?["num_hidden_layers"] as? Int == 6)
    let recipe = """
      inputs: {a: \(a)}
      steps:
        - {name: deep, method: convert, model: a, parameters: {layers: "0-3,1-4"}}
        - {name: soup, method: linear, models: [deep, deep]}
      outputs: {soup: \(folder.file("soup"))}
      """
    try recipe.write(toFile: folder.file("r.yaml"), atomically: true, encoding: .utf8)
    let ran = try CLI.run("run", folder.file("r.yaml"), "-q")
    #expect(ran.status == 0, "\(ran.stderr)")
    let soupConfig =
      try JSONSerialization.jsonObject(
        with: Data(contentsOf: URL(fileURLWithPath: folder.file("soup/config.json")))) as? [String: Any]
    #expect(soupConfig?["num_hidden_layers"] as? Int == 6)
    let bad = try CLI.run("convert", a, folder.file("bad"), "--layers", "3-1")
    #expect(bad.status == 64 && bad.stderr.contains("--layers"), "\(bad.stderr)")
  }
}
