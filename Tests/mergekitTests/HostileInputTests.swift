import Checkpoint
import Foundation
import Nets
import Tensor
import Testing

@testable import TestSupport

/// The hostile-input table (docs/security.md): one case per kind of attack on the command, each
/// run as a stranger's file would be. Every case must end with exit 1 or 64 and a message that
/// names the offending file or YAML path, never by a signal, never past the time limit, and
/// without touching the sentinel folder next to the output.
@Suite(.serialized) struct HostileInputTests {
  /// One tiny Llama model folder (2 layers, width 8) shared by the cases.
  static let fixture: TemporaryFolder = {
    let folder = TemporaryFolder.removedAtExit()
    let config = """
      {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
       "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
       "head_dim": 4, "tie_word_embeddings": false}
      """
    if let parsed = try? NetworkConfig(json: Data(config.utf8)) {
      let weights = Network<Float>.expectedShapes(parsed).enumerated().map { i, entry in
        (
          entry.name,
          Tensor(shape: entry.shape, scalars: (0..<entry.shape.reduce(1, *)).map { Float(($0 + i) % 7) / 7 })
        )
      }
      try? ModelFolder.write(
        weights, files: ["config.json": config], dtype: .f32, to: folder.file("model"), overwrite: true)
    }
    try? "[1, 2, 3, 4, 5]\n[6, 7, 8]\n".write(toFile: folder.file("tokens.jsonl"), atomically: true, encoding: .utf8)
    return folder
  }()

  static var model: String { fixture.file("model") }

  struct Outcome {
    var status: Int32
    var stderr: String
    var bySignal: Bool
    var timedOut: Bool
  }

  /// Runs the command, killing it after `limit` seconds (a hang).
  static func run(_ arguments: [String], limit: Double = 30) throws -> Outcome {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: CLI.binary)
    process.arguments = arguments
    let err = Pipe()
    process.standardError = err
    process.standardOutput = FileHandle.nullDevice
    try process.run()
    let killer = DispatchWorkItem { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
    DispatchQueue.global().asyncAfter(deadline: .now() + limit, execute: killer)
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    let timedOut =
      !killer.isCancelled && process.terminationReason == .uncaughtSignal
      && process.terminationStatus == SIGKILL
    killer.cancel()
    return Outcome(
      status: process.terminationStatus, stderr: String(decoding: stderr, as: UTF8.self),
      bySignal: process.terminationReason == .uncaughtSignal, timedOut: timedOut)
  }

  /// Runs a hostile case and checks the outcome: exit `status` (1 or 64), a message containing
  /// `names` (the file or YAML path), no signal, no hang.
  static func expectRefused(
    _ arguments: [String], status: Int32 = 1, names: String, sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    let outcome = try run(arguments)
    #expect(!outcome.timedOut, "hung: \(arguments)", sourceLocation: sourceLocation)
    #expect(!outcome.bySignal, "killed by signal \(outcome.status): \(arguments)", sourceLocation: sourceLocation)
    #expect(outcome.status == status, "\(arguments): \(outcome.stderr)", sourceLocation: sourceLocation)
    #expect(outcome.stderr.contains(names), "\(arguments): \(outcome.stderr)", sourceLocation: sourceLocation)
  }

  /// A folder with a sentinel file beside the outputs of a case; checked untouched at the end.
  static func withSentinel(_ body: (TemporaryFolder) throws -> Void) throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try FileManager.default.createDirectory(atPath: folder.file("keep"), withIntermediateDirectories: true)
    try "precious".write(toFile: folder.file("keep/sentinel"), atomically: true, encoding: .utf8)
    try body(folder)
    #expect(
      (try? String(contentsOfFile: folder.file("keep/sentinel"), encoding: .utf8)) == "precious",
      "the sentinel next to the output was touched")
  }

  // 1. Paths: step names and labels are names, never paths.
  @Test(arguments: ["../keep", "../../x", ".hidden", "a/b", "x y"])
  func stepNamesAreNotPaths(_ name: String) throws {
    try Self.withSentinel { folder in
      let yaml = """
        inputs: {a: \(Self.model), b: \(Self.model)}
        steps:
          - {name: "\(name)", method: linear, models: [a, b]}
          - {name: out, method: ties, base: a, models: ["\(name)", b], parameters: {density: 0.5}}
        outputs: {out: \(folder.file("out"))}
        """
      try yaml.write(toFile: folder.file("r.yaml"), atomically: true, encoding: .utf8)
      try Self.expectRefused(["run", folder.file("r.yaml"), "--overwrite"], status: 64, names: "steps[0].name")
      try "inputs: {\"../keep\": \(Self.model)}\nsteps: []\noutputs: {\"../keep\": \(folder.file("o"))}\n".write(
        toFile: folder.file("label.yaml"), atomically: true, encoding: .utf8)
      try Self.expectRefused(["run", folder.file("label.yaml")], status: 64, names: "inputs.../keep")
      #expect(!FileManager.default.fileExists(atPath: folder.file("out")))
    }
  }

  // 2. Shard indexes: a weight_map entry that is the index itself, empty, `..`, another index
  // (a cycle), an absolute path, or a link out of the folder.
  @Test(arguments: [
    "model.safetensors.index.json", "", "..", ".", "other.index.json", "/etc/passwd", "../model/model.safetensors",
    "link.safetensors",
  ])
  func indexEntriesStayInTheirFolder(_ shard: String) throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let index = folder.file("m/model.safetensors.index.json")
    try FileManager.default.createDirectory(atPath: folder.file("m"), withIntermediateDirectories: true)
    let entry = #"{"weight_map": {"model.embed_tokens.weight": "\#(shard)"}}"#
    try entry.write(toFile: index, atomically: true, encoding: .utf8)
    try #"{"weight_map": {"x": "model.safetensors.index.json"}}"#.write(
      toFile: folder.file("m/other.index.json"), atomically: true, encoding: .utf8)
    try FileManager.default.createSymbolicLink(
      atPath: folder.file("m/link.safetensors"), withDestinationPath: Self.model + "/model.safetensors")
    for command in ["inspect", "verify"] { try Self.expectRefused([command, folder.file("m")], names: index) }
    try Self.expectRefused(["convert", folder.file("m"), folder.file("out.mkz")], names: index)
    #expect(!FileManager.default.fileExists(atPath: folder.file("out.mkz")))
  }

  // 3. Outputs: an output that is also an input, and two outputs on one path, are refused
  // before anything runs, with --overwrite too.
  @Test func outputsNeverOverwriteInputsOrEachOther() throws {
    try Self.withSentinel { folder in
      let copy = folder.file("copy")
      try FileManager.default.copyItem(atPath: Self.model, toPath: copy)
      let before = try Data(contentsOf: URL(fileURLWithPath: copy + "/model.safetensors"))
      let onInput = """
        inputs: {a: \(copy), b: \(Self.model)}
        steps: [{name: soup, method: linear, models: [a, b]}]
        outputs: {soup: \(copy)}
        """
      try onInput.write(toFile: folder.file("r1.yaml"), atomically: true, encoding: .utf8)
      try Self.expectRefused(["run", folder.file("r1.yaml"), "--overwrite"], status: 64, names: "r1.yaml")
      #expect(try Data(contentsOf: URL(fileURLWithPath: copy + "/model.safetensors")) == before)
      let twice = """
        inputs: {a: \(copy), b: \(Self.model)}
        steps: [{name: soup, method: linear, models: [a, b]}, {name: other, method: linear, models: [b, a]}]
        outputs: {soup: \(folder.file("same")), other: \(folder.file("same"))}
        """
      try twice.write(toFile: folder.file("r2.yaml"), atomically: true, encoding: .utf8)
      try Self.expectRefused(["run", folder.file("r2.yaml"), "--overwrite"], status: 64, names: "r2.yaml")
      #expect(!FileManager.default.fileExists(atPath: folder.file("same")))
    }
  }

  // 4. Arithmetic: .npy shapes whose byte count overflows, or with negative dimensions.
  @Test(arguments: ["(4611686018427387904, 1)", "(0, -5)", "(3, 2, 1, 4611686018427387904)", "(2, x)"])
  func npyShapesAreChecked(_ shape: String) throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    writeBytes(Self.npy(descr: "<f4", shape: shape), to: folder.file("f.npy"))
    writeBytes(Self.npy(descr: "<i8", shape: "(0,)"), to: folder.file("l.npy"))
    try Self.expectRefused(
      ["train", "--data", folder.file("f.npy"), "--labels", folder.file("l.npy"), "-o", folder.file("out")],
      names: folder.file("f.npy"))
  }

  // 5. Allocation: a 24 KB .mkz whose (checksummed) table claims a 32 GiB tensor.
  @Test func aSmallMKZCannotClaimAHugeTensor() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    try FileManager.default.createDirectory(atPath: folder.file("m"), withIntermediateDirectories: true)
    writeBytes(Self.lyingMKZ(), to: folder.file("m/model.mkz"))
    try FileManager.default.copyItem(atPath: Self.model + "/config.json", toPath: folder.file("m/config.json"))
    try Self.expectRefused(["pela", folder.file("m"), "-o", folder.file("p")], names: folder.file("m/model.mkz"))
    try Self.expectRefused(
      ["extract-lora", folder.file("m"), "--base", Self.model, "--rank", "2", "-o", folder.file("l")],
      names: folder.file("m/model.mkz"))
    try Self.expectRefused(["verify", folder.file("m/model.mkz")], names: "chunk record")
  }

  // 6. Hangs: an absurd layer count, degenerate .npy shapes, a YAML alias bomb, FIFOs.
  @Test func absurdConfigsFailAtOnce() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let big = folder.file("big")
    try FileManager.default.createDirectory(atPath: big, withIntermediateDirectories: true)
    try FileManager.default.linkItem(atPath: Self.model + "/model.safetensors", toPath: big + "/model.safetensors")
    var config = try #require(
      try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Self.model + "/config.json")))
        as? [String: Any])
    config["num_hidden_layers"] = 1e9
    try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: big + "/config.json"))
    let data = Self.fixture.file("tokens.jsonl")
    try Self.expectRefused(["eval", big, "--data", data], names: big + "/config.json")
    try Self.expectRefused(
      ["zip", big, Self.model, "--data", data, "-o", folder.file("z")], names: big + "/config.json")
    try Self.expectRefused(["mkv", big, "--data", data, "-o", folder.file("k")], names: big + "/config.json")
    try Self.expectRefused(
      ["pela", big, "--distill", "--data", data, "-o", folder.file("p")], names: big + "/config.json")
  }

  @Test func aYAMLAliasBombIsRefused() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    var lines = ["merge_method: linear", "x0: &x0 [a, a, a, a, a, a, a, a, a, a]"]
    for i in 1..<12 {
      lines.append("x\(i): &x\(i) [" + Array(repeating: "*x\(i - 1)", count: 10).joined(separator: ", ") + "]")
    }
    try lines.joined(separator: "\n").write(toFile: folder.file("bomb.yaml"), atomically: true, encoding: .utf8)
    try Self.expectRefused(["run", folder.file("bomb.yaml"), "-o", folder.file("o")], status: 64, names: "bomb.yaml")
  }

  @Test func fifosAreRefusedWithoutBlocking() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    #expect(mkfifo(folder.file("pipe.safetensors"), 0o600) == 0)
    try Self.expectRefused(["inspect", folder.file("pipe.safetensors")], names: "FIFO")
    // A shard that is a FIFO.
    try FileManager.default.createDirectory(atPath: folder.file("m"), withIntermediateDirectories: true)
    #expect(mkfifo(folder.file("m/shard.safetensors"), 0o600) == 0)
    try #"{"weight_map": {"w": "shard.safetensors"}}"#.write(
      toFile: folder.file("m/model.safetensors.index.json"), atomically: true, encoding: .utf8)
    try Self.expectRefused(["verify", folder.file("m")], names: "FIFO")
    // A model folder whose tokenizer file is a FIFO: the copy is refused, nothing published.
    let withPipe = folder.file("withpipe")
    try FileManager.default.copyItem(atPath: Self.model, toPath: withPipe)
    #expect(mkfifo(withPipe + "/tokenizer.json", 0o600) == 0)
    try Self.expectRefused(["convert", withPipe, folder.file("out")], names: withPipe + "/tokenizer.json")
    #expect(!FileManager.default.fileExists(atPath: folder.file("out")))
    // A recipe and a data file that are FIFOs.
    #expect(mkfifo(folder.file("r.yaml"), 0o600) == 0)
    try Self.expectRefused(["run", folder.file("r.yaml")], status: 64, names: folder.file("r.yaml"))
    #expect(mkfifo(folder.file("t.jsonl"), 0o600) == 0)
    try Self.expectRefused(["eval", Self.model, "--data", folder.file("t.jsonl")], names: folder.file("t.jsonl"))
  }

  // 1. Links: a model folder's link to `/` (or anything outside it) is refused, never copied; a
  // Hugging Face cache snapshot's links into its repository's blobs are followed.
  @Test func linksOutOfTheModelFolderAreNotFollowed() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let evil = folder.file("evil")
    try FileManager.default.copyItem(atPath: Self.model, toPath: evil)
    try FileManager.default.createSymbolicLink(atPath: evil + "/root", withDestinationPath: "/")
    try Self.expectRefused(["convert", evil, folder.file("out")], names: evil + "/root")
    #expect(!FileManager.default.fileExists(atPath: folder.file("out")))

    let repo = folder.file("models--org--tiny")
    let snapshot = repo + "/snapshots/abc123"
    try FileManager.default.createDirectory(atPath: repo + "/blobs", withIntermediateDirectories: true)
    try FileManager.default.createDirectory(atPath: snapshot, withIntermediateDirectories: true)
    for (name, blob) in [("config.json", "c0ffee"), ("model.safetensors", "beef")] {
      try FileManager.default.copyItem(atPath: Self.model + "/" + name, toPath: repo + "/blobs/" + blob)
      try FileManager.default.createSymbolicLink(
        atPath: snapshot + "/" + name, withDestinationPath: "../../blobs/" + blob)
    }
    let copied = try CLI.run("convert", snapshot, folder.file("copy"), "-q")
    #expect(copied.status == 0, "\(copied.stderr)")
    let attributes = try FileManager.default.attributesOfItem(atPath: folder.file("copy/config.json"))
    #expect(attributes[.type] as? FileAttributeType == .typeRegular)  // a copy, not a dangling link
  }

  // Formats we do not read are named, not misread as safetensors with an absurd header (a zip
  // that is no PyTorch checkpoint gets PyTorchFile's message); a safetensors file whose header
  // length happens to start like a pickle still opens.
  @Test func foreignFormatsAreNamed() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let cases: [(String, [UInt8], String)] = [
      ("m.bin", Array("PK\u{03}\u{04}".utf8) + [UInt8](repeating: 1, count: 12), "PyTorch state dict"),
      ("old.pt", [0x80, 0x02, 0x63] + [UInt8](repeating: 1, count: 12), "legacy PyTorch pickle"),
      ("m.gguf", Array("GGUF".utf8) + [3, 0, 0, 0] + [UInt8](repeating: 1, count: 8), "GGUF"),
    ]
    for (name, bytes, format) in cases {
      writeBytes(bytes, to: folder.file(name))
      try Self.expectRefused(["inspect", folder.file(name)], names: format)
    }
    try FileManager.default.createDirectory(atPath: folder.file("pt"), withIntermediateDirectories: true)
    writeBytes(cases[0].1, to: folder.file("pt/pytorch_model.bin"))
    try Self.expectRefused(["inspect", folder.file("pt")], names: folder.file("pt/pytorch_model.bin"))
    var header = #"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#
    header += String(repeating: " ", count: 640 - header.utf8.count)  // length 640: bytes 80 02 00 ...
    writeBytes(safetensorsBytes(header: header, data: [7]), to: folder.file("st.safetensors"))
    #expect(try openCheckpoint(folder.file("st.safetensors")).read("x").bytes == [7])
  }

  // 8. Names: byte-different tensor names are different tensors, even when Unicode calls them
  // equivalent ("é" precomposed and "e" + combining accent).
  @Test func tensorNamesAreExactBytes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let composed = "caf\u{E9}.weight"
    let decomposed = "cafe\u{301}.weight"
    #expect(composed == decomposed)  // Swift's String equality, which must not be used for names
    let value = TensorData(dtype: .f32, shape: [1], bytes: [0, 0, 128, 63])
    _ = try writeCheckpoint([(composed, value), (decomposed, value)], to: folder.file("both.safetensors"))
    let both = try openCheckpoint(folder.file("both.safetensors"))
    #expect(both.tensors.count == 2)
    #expect(both.lookup(decomposed)?.name.utf8.elementsEqual(decomposed.utf8) == true)
    _ = try writeCheckpoint([(composed, value)], to: folder.file("a.safetensors"))
    _ = try writeCheckpoint([(decomposed, value)], to: folder.file("b.safetensors"))
    try Self.expectRefused(
      ["merge", folder.file("a.safetensors"), folder.file("b.safetensors"), "-o", folder.file("m.safetensors")],
      names: folder.file("b.safetensors"))
    let converted = try Self.run(["convert", folder.file("both.safetensors"), folder.file("c.mkz")])
    #expect(converted.status == 0, "\(converted.stderr)")
    #expect(
      try openCheckpoint(folder.file("c.mkz")).tensors.map { Array($0.name.utf8) }.sorted { $0.count < $1.count } == [
        Array(composed.utf8), Array(decomposed.utf8),
      ])
  }

  // 8. Names with quotes, backslashes and control characters stay exact through `inspect --json`.
  @Test func inspectJSONEscapesNames() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let name = "a\"b\\c\n\u{1}\u{E9}"
    _ = try writeCheckpoint(
      [(name, TensorData(dtype: .f32, shape: [1], bytes: [0, 0, 0, 0]))], to: folder.file("n.safetensors"))
    let result = try CLI.run("inspect", folder.file("n.safetensors"), "--json")
    let parsed = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
    let tensors = parsed?["tensors"] as? [[String: Any]]
    #expect((tensors?.first?["name"] as? String).map { Array($0.utf8) } == Array(name.utf8), "\(result.stdout)")
    #expect(parsed?["total_parameters"] as? Int == 1)
  }

  // 8. Counts above 2^31 print as they are (a sparse 3 GB file).
  @Test func inspectPrintsLargeCounts() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let count = 3_000_000_000
    var header = #"{"big":{"dtype":"I8","shape":[\#(count)],"data_offsets":[0,\#(count)]}}"#
    while header.utf8.count % 8 != 0 { header += " " }
    writeBytes(safetensorsBytes(header: header), to: folder.file("big.safetensors"))
    #expect(truncate(folder.file("big.safetensors"), off_t(8 + header.utf8.count + count)) == 0)
    let result = try CLI.run("inspect", folder.file("big.safetensors"))
    #expect(result.status == 0, "\(result.stderr)")
    #expect(result.stdout.contains("  3000000000     3000000000"), "\(result.stdout)")
    #expect(!result.stdout.contains("-"))
  }

  /// A `.npy` (format 1.0) header with the given shape text and no data.
  static func npy(descr: String, shape: String) -> [UInt8] {
    var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shape), }"
    while (10 + header.utf8.count + 1) % 64 != 0 { header += " " }
    header += "\n"
    return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(header.utf8.count & 0xFF), UInt8(header.utf8.count >> 8)]
      + Array(header.utf8)
  }

  /// A `.mkz` with consistent checksums whose table claims `chunks` chunks of 64 MiB for one
  /// tensor, each stored in 16 bytes: 32 GiB claimed by 24 KB.
  static func lyingMKZ(chunks: Int = 512) -> [UInt8] {
    var bytes: [UInt8] = [0x89, 0x4D, 0x4B, 0x5A, 0x0D, 0x0A, 0x1A, 0x0A, 1, 0, 0, 0, 0, 0, 0, 0]
    func put<T: FixedWidthInteger>(_ v: T, into out: inout [UInt8]) {
      withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) }
    }
    let stored = 16
    let chunkSize = 64 << 20
    bytes += [UInt8](repeating: 0, count: chunks * stored)
    var index: [UInt8] = []
    for i in 0..<chunks {
      put(UInt64(16 + i * stored), into: &index)
      put(UInt32(stored), into: &index)
      put(UInt32(chunkSize), into: &index)
      put(UInt64(0), into: &index)
      put(UInt32(0), into: &index)
      put(UInt32(0), into: &index)
    }
    let table = Array(
      (#"{"chunk_size":\#(chunkSize),"metadata":{},"tensors":[{"name":"model.embed_tokens.weight","dtype":"U8","#
        + #""shape":[\#(chunks * chunkSize)],"transform":"planes","first_chunk":0,"chunk_count":\#(chunks),"#
        + #""digest":"0000000000000000"}]}"#).utf8)
    let indexOffset = bytes.count
    bytes += index + table
    put(UInt64(indexOffset), into: &bytes)
    put(UInt64(chunks), into: &bytes)
    put(UInt64(indexOffset + index.count), into: &bytes)
    put(UInt64(table.count), into: &bytes)
    put(XXHash64.hash(index + table), into: &bytes)
    put(UInt32(1), into: &bytes)
    bytes += Array("MKZF".utf8)
    return bytes
  }
}
