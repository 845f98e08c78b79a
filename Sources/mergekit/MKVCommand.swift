import Adapt
import ArgumentParser
import Checkpoint
import Foundation
import Nets
import Recipe

struct MKVCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "mkv",
    abstract: "MatryoshkaKV: orthogonal projections of a decoder's attention keys and values, ranked per head under a cache budget.",
    discussion: """
      PCA of every layer's keys (after rotary) and values per KV head on --data gives nested \
      orthogonal bases; the greedy search lowers the heads whose reduction changes the final \
      hidden states least until the average kept fraction is --budget (--ranks uniform: the \
      same rank everywhere). --train then trains the bases (U = U0 Cayley(X), model frozen) \
      with ranks sampled per head and step, distilling from the model without projections. \
      Writes a model folder: the model's files, kv_projections.safetensors and config.json's \
      kv_projection, which `mergekit eval` runs. Paper: Lin et al., MatryoshkaKV, ICLR 2025 \
      (arXiv:2410.14731). Layout: docs/matryoshka-kv.md.
      """)

  @Argument(help: "A Llama/Mistral/Qwen2 model folder.") var model: String
  @Option(help: "Calibration token sequences (.jsonl or .safetensors input_ids): PCA and the rank search.") var data: String?
  @Option(help: "Average kept fraction of the K/V dimensions, in (0, 1].") var budget = 0.5
  @Option(help: "Rank step (default: head dimension / 8).") var step: Int?
  @Option(help: "adaptive (greedy search) or uniform.") var ranks = "adaptive"
  @Option(help: "Heads lowered per search round (default: 3/4 of them).") var perRound: Int?
  @Flag(help: "Bases from the weights alone (no data; keys ignore rotary). Weaker than PCA.") var dataFree = false
  @Flag(help: "Train the bases after PCA.") var train = false
  @Option(help: "Training sequences (default: --data).") var trainData: String?
  @Option(help: "Training epochs.") var epochs = 1
  @Option(help: "Sequences per batch.") var batchSize = 4
  @Option(help: "Peak learning rate (AdamW, warm-up then cosine).") var lr: Float = 1e-3
  @Option(help: "Weight of KL(teacher || student).") var klWeight: Float = 0.25
  @Option(help: "Weight of the next-token cross-entropy.") var ceWeight: Float = 0.75
  @Option(help: "Held-out sequences to measure the result on (KL and hidden-state error against the model).") var validation: String?
  @Option(help: "Seed of the sampled ranks and the batch order.") var seed: UInt64 = 0
  @Option(name: .shortAndLong, help: "Output model folder.") var output: String
  @Flag(help: "Replace an existing output.") var overwrite = false
  @Flag(name: .shortAndLong, help: "No progress output.") var quiet = false

  func validate() throws {
    try requireExisting(model, "model")
    for (path, what) in [(data, "data"), (trainData, "training data"), (validation, "validation data")] { if let path { try requireExisting(path, what) } }
    guard budget > 0 && budget <= 1 else { throw ValidationError("--budget is the kept fraction of K/V dimensions, in (0, 1]") }
    guard KVProjectionFiles.RankSearch(rawValue: ranks) != nil else { throw ValidationError("unknown --ranks '\(ranks)' (use adaptive or uniform)") }
    if data == nil && !(dataFree && ranks == "uniform" && !train) {
      throw ValidationError("--data is needed (PCA, the adaptive search and training); without data use --data-free --ranks uniform")
    }
    guard epochs >= 1, batchSize >= 1 else { throw ValidationError("--epochs and --batch-size must be at least 1") }
    try requireNewOutput(output, overwrite: overwrite)
  }

  func run() throws {
    var run = KVProjectionFiles.Run()
    (run.budget, run.step, run.search, run.perRound, run.dataFree) = (budget, step, KVProjectionFiles.RankSearch(rawValue: ranks)!, perRound, dataFree)
    (run.data, run.trainingData, run.validation) = (data, trainData, validation)
    if train {
      var t = MatryoshkaKV.TrainingOptions()
      (t.epochs, t.batchSize, t.learningRate, t.klWeight, t.crossEntropyWeight, t.seed) = (epochs, batchSize, lr, klWeight, ceWeight, seed)
      run.training = t
    }
    let progress = Progress("mkv", quiet: quiet, unit: .items("steps"))
    let result = try KVProjectionFiles.run(model, to: output, run: run, overwrite: overwrite) { stage, done, total in progress.update(done, total, note: stage) }
    progress.finish()
    let d = result.headDimension
    for (layer, (k, v)) in zip(result.ranks.keyRanks, result.ranks.valueRanks).enumerated() {
      print("layer \(layer): key ranks \(k.map(String.init).joined(separator: " "))  value ranks \(v.map(String.init).joined(separator: " "))  (of \(d))")
    }
    let kept = result.ranks.keptFraction(dimension: d)
    let keys = Double(result.ranks.keyRanks.joined().reduce(0, +)) / Double(max(result.ranks.keyRanks.joined().count * d, 1))
    let values = Double(result.ranks.valueRanks.joined().reduce(0, +)) / Double(max(result.ranks.valueRanks.joined().count * d, 1))
    print(String(format: "%@: KV cache %.1f%% of the original (keys %.1f%%, values %.1f%%), %@ bases%@", output, kept * 100, keys * 100, values * 100,
      result.dataFree ? "data-free (from the weights, not activations)" : "PCA", result.trained ? ", trained" : ""))
    if let m = result.validation {
      print(String(format: "on %@: next-token KL %.4f, final hidden-state error %.4f", validation ?? "", m.kl, m.error) + (m.pcaKL.map { String(format: " (PCA bases at the same ranks: KL %.4f)", $0) } ?? ""))
    }
  }
}

struct SyntheticTokensCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "synthetic-tokens",
    abstract: "Write synthetic token sequences (JSON lines) with learnable structure, for language-model examples.",
    discussion: "Each sequence walks the vocabulary from its own start with its own stride; each token is replaced by a random one with probability --noise. Another --split gives fresh sequences.")

  @Option(name: .shortAndLong, help: "Output .jsonl file.") var output: String
  @Option(help: "Number of sequences.") var sequences = 64
  @Option(help: "Tokens per sequence.") var length = 32
  @Option(help: "Vocabulary size.") var vocabulary = 2048
  @Option(help: "Probability of a random token.") var noise = 0.2
  @Option(help: "Seed.") var seed: UInt64 = 0
  @Option(help: "Name of the split: sequences differ per split.") var split = "train"
  @Flag(help: "Replace an existing output.") var overwrite = false

  func validate() throws {
    try requireNewOutput(output, overwrite: overwrite)
  }

  func run() throws {
    var o = SyntheticTokens.Options()
    (o.sequences, o.length, o.vocabulary, o.noise, o.seed) = (sequences, length, vocabulary, noise, seed)
    try NetworkFiles.writeTokens(try SyntheticTokens.make(o, split: split), to: output)
    print("\(output): \(sequences) sequences of \(length) tokens")
  }
}
