import Checkpoint
import Foundation
import Merge
import Nets
import Operations
import Recipe
import Tensor

/// One kind of input a stranger can hand the tool, with the valid files it starts from and the
/// parser run on each mutated input (in process, as the commands run it).
struct InputKind {
  let name: String
  /// The file name the mutated bytes are written to, inside the work folder.
  let file: String
  /// Valid inputs of this kind, mutated from.
  let seeds: [[UInt8]]
  /// Whether to favour text mutations (numbers, keywords, YAML aliases) over byte flips.
  let isText: Bool
  /// Parses the file at the given path the way the commands do; thrown errors are fine.
  let run: (String) throws -> Void
  /// Applied to half the mutants: makes a checksum match again, so that mutations reach the
  /// structure behind it (a `.mkz` table that lies with a valid checksum).
  var repair: ((inout [UInt8]) -> Void)? = nil
}

/// Recomputes a `.mkz` footer's checksum of the chunk index and tensor table, when the footer
/// still locates them.
func repairMKZChecksum(_ bytes: inout [UInt8]) {
  let footerSize = 48
  guard bytes.count >= footerSize + 16 else { return }
  let footer = bytes.count - footerSize
  func field(_ i: Int) -> Int? {
    let value = (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[footer + 8 * i + $1]) << (8 * UInt64($1)) }
    return Int(exactly: value)
  }
  guard let indexOffset = field(0), indexOffset >= 16, indexOffset <= footer else { return }
  let checksum = XXHash64.hash(Array(bytes[indexOffset..<footer]))
  for i in 0..<8 { bytes[footer + 32 + i] = UInt8(truncatingIfNeeded: checksum >> (8 * UInt64(i))) }
}

/// Writes the fixed files the inputs refer to (a tiny decoder model, shards, labels) into
/// `work` and returns every input kind.
func makeInputKinds(work: String) throws -> [InputKind] {
  let fm = FileManager.default
  try fm.createDirectory(atPath: work, withIntermediateDirectories: true)

  // A tiny decoder model folder: config.json and weights of the shapes it implies.
  let config = """
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
     "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
     "head_dim": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}
    """
  // The same decoder with keys that change its maths but not its tensors (rotary variants,
  // sliding windows), so that mutations explore their parsing too.
  let llama = #""architectures": ["LlamaForCausalLM"], "model_type": "llama","#
  let configVariants = [
    #"\#(llama) "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},"#,
    #"\#(llama) "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},"#,
    #"\#(llama) "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 4,"#,
    #""architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 3,"#,
  ].map { config.replacingOccurrences(of: llama, with: $0) }
  let model = work + "/model"
  let shapes = Network<Float>.expectedShapes(try NetworkConfig(json: Data(config.utf8)))
  var random = SplitMix64(seed: 7)
  let weights = shapes.map { entry in
    (entry.name, Tensor(shape: entry.shape, scalars: (0..<entry.shape.reduce(1, *)).map { _ in random.float() }))
  }
  let tokenizer = ExampleModels.tokenizerFiles(vocabularySize: 16, addedTokens: [], chatTemplate: nil)
  try ModelFolder.write(
    weights, files: tokenizer.merging(["config.json": config]) { $1 }, dtype: .f32, to: model, overwrite: true)

  // The same weights as a two-shard folder (the index is what gets mutated) and as a .mkz file.
  let sharded = work + "/sharded"
  try? fm.removeItem(atPath: sharded)
  let source = try openCheckpoint(model)
  let shardWriter = try CheckpointWriter(
    destination: work + "/sharded-seed", tensors: source.tensors,
    options: WriteOptions(format: .safetensors, shardSize: source.totalByteCount / 2, overwrite: true))
  for info in source.tensors { try shardWriter.write(info.name, try source.read(info.name)) }
  try shardWriter.finish()
  try fm.moveItem(atPath: work + "/sharded-seed", toPath: sharded)
  let indexSeed = try readAll(sharded + "/model.safetensors.index.json")
  let mkzWriter = try CheckpointWriter(
    destination: work + "/seed.mkz", tensors: source.tensors,
    options: WriteOptions(format: .mkz, copyFilesFrom: model, overwrite: true))
  for info in source.tensors { try mkzWriter.write(info.name, try source.read(info.name)) }
  try mkzWriter.finish()

  // A second model folder for mutated config.json files, sharing the weights.
  let configured = work + "/configured"
  try fm.createDirectory(atPath: configured, withIntermediateDirectories: true)
  try? fm.removeItem(atPath: configured + "/model.safetensors")
  try fm.linkItem(atPath: model + "/model.safetensors", toPath: configured + "/model.safetensors")

  // A third folder for mutated tokenizer.json files (two more tokens than the model's), sharing
  // the weights; aligned to the model's tokenizer by a union.
  let tokenized = work + "/tokenized"
  try fm.createDirectory(atPath: tokenized, withIntermediateDirectories: true)
  try? fm.removeItem(atPath: tokenized + "/model.safetensors")
  try fm.linkItem(atPath: model + "/model.safetensors", toPath: tokenized + "/model.safetensors")
  try Data(config.utf8).write(to: URL(fileURLWithPath: tokenized + "/config.json"))
  let tokenizerSeed = ExampleModels.tokenizerFiles(vocabularySize: 16, addedTokens: ["<a>", "<b>"], chatTemplate: nil)
  let alignment = TokenizerSettings(
    source: .union,
    tokens: [.init(text: "<c>", source: .modelToken(model: tokenized, token: "<a>", id: nil), force: false)],
    padToMultipleOf: 8)

  // Labels for .npy features.
  try Data(npy(descr: "<i8", shape: [4], body: (0..<4).flatMap { littleEndian(Int64($0 % 2)) }))
    .write(to: URL(fileURLWithPath: work + "/labels.npy"))

  let recipe = """
    inputs:
      a: \(model)
      b: \(model)
    steps:
      - name: soup
        method: linear
        models: [a, b]
      - name: merged
        method: ties
        base: a
        models:
          - model: soup
            parameters: {weight: 0.5, density: 0.4}
          - b
        parameters: {normalize: true}
        dtype: bf16
    outputs:
      merged: \(work)/out/merged
      soup: {path: \(work)/out/soup.mkz, format: mkz, shard_size: 1MB}

    """
  let config2 = """
    merge_method: dare_ties
    base_model: \(model)
    models:
      - model: \(model)/model.safetensors
        parameters:
          weight: [0.2, 0.8]
          density: 0.5
      - model: \(work)/seed.mkz
        parameters: {weight: 0.3, density: 0.7}
    parameters:
      int8_mask: true
      normalize: false
    dtype: float16
    tokenizer:
      source: union
      tokens:
        <x>: {source: {kind: zero}}
        w4: {source: \(model), force: true}
      pad_to_multiple_of: 32

    """
  let slices = """
    slices:
      - sources:
          - model: \(model)
            layer_range: [0, 2]
            parameters: {weight: [0.2, 0.8]}
          - model: \(work)/seed.mkz
            layer_range: [0, 2]
        parameters: {normalize: true}
      - sources:
          - model: \(model)
            layer_range: [1, 2]
    merge_method: linear
    chat_template: chatml
    tokenizer_source: base
    dtype: bfloat16

    """
  // A low-rank task vector: one matrix as its triplets, listed in the metadata, and a dense tensor.
  let lowRank = work + "/low-rank-seed.safetensors"
  let names = LowRankLayout.factorNames(of: "w")
  let lowRankTensors = [
    TensorInfo(name: "bias", dtype: .f32, shape: [5]), TensorInfo(name: names.u, dtype: .f32, shape: [6, 2]),
    TensorInfo(name: names.s, dtype: .f32, shape: [2]), TensorInfo(name: names.vt, dtype: .f32, shape: [2, 5]),
  ]
  let lowRankWriter = try CheckpointWriter(
    destination: lowRank, tensors: lowRankTensors,
    options: WriteOptions(
      metadata: [
        LowRankLayout.metadataKey: LowRankLayout.metadataValue([("w", [6, 5])]), "mergekit.kind": "task-vector",
      ],
      overwrite: true))
  for info in lowRankTensors {
    try lowRankWriter.write(
      info.name, Tensor(shape: info.shape, scalars: (0..<info.shape.reduce(1, *)).map { _ in random.float() }),
      as: .f32)
  }
  try lowRankWriter.finish()
  let shapesByName = Dictionary(source.tensors.map { ($0.name, $0.shape) }, uniquingKeysWith: { a, _ in a })
  let coefficients = try ATLASCoefficients(
    tasks: ["a", "b"], blocks: Array(source.tensors.prefix(3).map(\.name)), partitions: 2, value: 0.3
  ).json()
  let features = (0..<8).flatMap { littleEndian(Float(Double($0) * 0.25).bitPattern) }
  return [
    InputKind(
      name: "safetensors", file: "input.safetensors", seeds: [try readAll(model + "/model.safetensors")],
      isText: true, run: readEverything),
    InputKind(
      name: "low-rank", file: "low-rank.safetensors", seeds: [try readAll(lowRank)], isText: true,
      run: readEverything),
    InputKind(
      name: "pytorch", file: "input.pt", seeds: try pytorchSeeds(), isText: false, run: readEverything),
    InputKind(
      name: "index", file: "sharded/model.safetensors.index.json", seeds: [indexSeed], isText: true,
      run: { _ in try readEverything(sharded) }),
    InputKind(
      name: "mkz", file: "input.mkz", seeds: [try readAll(work + "/seed.mkz")], isText: true, run: readEverything,
      repair: repairMKZChecksum),
    InputKind(
      name: "recipe", file: "recipe.yaml", seeds: [Array(recipe.utf8)], isText: true,
      run: { path in try checkRecipe(path, output: nil) }),
    InputKind(
      name: "mergekit-config", file: "config.yml", seeds: [Array(config2.utf8)], isText: true,
      run: { path in try checkRecipe(path, output: work + "/out/config-merge") }),
    InputKind(
      name: "mergekit-slices", file: "slices.yml", seeds: [Array(slices.utf8)], isText: true,
      run: { path in try checkRecipe(path, output: work + "/out/slices-merge") }),
    InputKind(
      name: "tokenizer", file: "tokenized/tokenizer.json", seeds: [Array((tokenizerSeed["tokenizer.json"] ?? "").utf8)],
      isText: true,
      run: { _ in
        let aligned = try VocabularyAlignment(settings: alignment, base: model, inputs: [model, tokenized]) {
          try openCheckpoint($0)
        }
        for (i, path) in aligned.inputs.enumerated() {
          try readEverything(aligned.view(of: openCheckpoint(path), input: i))
        }
        _ = try aligned.tokenizerFiles()
      }),
    InputKind(
      name: "config.json", file: "configured/config.json", seeds: ([config] + configVariants).map { Array($0.utf8) },
      isText: true,
      run: { _ in _ = try loadNetwork(configured) }),
    InputKind(
      name: "coefficients", file: "coefficients.json", seeds: [[UInt8](coefficients)], isText: true,
      run: { path in
        try ATLASCoefficients(json: Data(InputFile.read(path))).check(baseShapes: shapesByName, taskVectors: 2)
      }),
    InputKind(
      name: "npy", file: "features.npy", seeds: [npy(descr: "<f4", shape: [4, 2], body: features)], isText: false,
      run: { path in _ = try DataFiles.readLabeled(path, labels: work + "/labels.npy") }),
    InputKind(
      name: "csv", file: "data.csv", seeds: [Array("x,y,label,task\n0.5,1,0,0\n-2,3e-2,1,1\n4,5,2,0\n".utf8)],
      isText: true, run: { path in _ = try DataFiles.readLabeled(path) }),
    InputKind(
      name: "jsonl", file: "tokens.jsonl", seeds: [Array("[1, 2, 3, 4]\n{\"input_ids\": [5, 6, 7]}\n\n[15]\n".utf8)],
      isText: true, run: { path in _ = try DataFiles.readTokens(path) }),
    InputKind(
      name: "labelled-jsonl", file: "labelled.jsonl",
      seeds: [
        Array(
          "{\"input_ids\": [1, 2, 3], \"label\": 4, \"task\": 0}\n{\"input_ids\": [5, 6], \"label\": 0, \"task\": 1}\n"
            .utf8)
      ],
      isText: true, run: { path in _ = try DataFiles.readLabelledTokens(path) }),
  ]
}

/// Opens a checkpoint and reads and verifies every tensor (bounded: the seeds are small, so a
/// mutated table that claims more is what must fail).
func readEverything(_ path: String) throws { try readEverything(try openCheckpoint(path)) }

/// Reads and verifies every tensor of an open checkpoint.
func readEverything(_ checkpoint: any Checkpoint) throws {
  for info in checkpoint.tensors.prefix(64) {
    _ = try checkpoint.withBytes(of: info.name, range: nil) { $0.count }
  }
  try checkpoint.verify(progress: nil)
}

/// PyTorch checkpoints written by torch (the test fixtures): a state dict with views, a
/// Parameter, half types and integers, and a shard.
func pytorchSeeds() throws -> [[UInt8]] {
  let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Tests/CheckpointTests/Fixtures/pytorch").path
  return try ["state.pt", "nested.pt", "sharded/pytorch_model-00001-of-00002.bin"].map {
    try readAll(fixtures + "/" + $0)
  }
}

func readAll(_ path: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }

func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }

/// A `.npy` file (format 1.0, C order) with a raw little-endian body.
func npy(descr: String, shape: [Int], body: [UInt8]) -> [UInt8] {
  let shapeText = shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
  var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shapeText), }"
  while (10 + header.utf8.count + 1) % 64 != 0 { header += " " }
  header += "\n"
  return [0x93] + Array("NUMPY".utf8) + [1, 0] + littleEndian(UInt16(header.utf8.count)) + Array(header.utf8) + body
}

/// A small, fast, seeded generator (SplitMix64): the same seed replays the same inputs.
struct SplitMix64 {
  var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
  mutating func below(_ n: Int) -> Int { n <= 1 ? 0 : Int(next() % UInt64(n)) }
  mutating func float() -> Float { Float(next() >> 40) / Float(1 << 24) - 0.5 }
}

/// Reads a recipe or mergekit configuration, validates it and plans it without writing.
func checkRecipe(_ path: String, output: String?) throws {
  let recipe = try Recipe.load(path, output: output)
  try RecipeRunner(recipe).run(dryRun: true)
}

/// Loads a model folder as a runnable network (config.json checked against the weights).
func loadNetwork(_ folder: String) throws -> Network<Float> { try NetworkFiles.load(folder) }
