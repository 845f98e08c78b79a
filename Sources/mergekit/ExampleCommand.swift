import ArgumentParser
import Checkpoint

struct ExampleCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "example",
    abstract:
      "Write small Llama-style example models (a base, two fine-tunes and a chat fine-tune with two more tokens) to try every command offline.",
    discussion: """
      Writes OUTDIR/base, OUTDIR/finetune-a and OUTDIR/finetune-b: bf16 safetensors plus config.json \
      of a 4-layer LlamaForCausalLM (hidden 256, 8 heads, 4 KV heads, vocabulary 2048, 3.4M \
      parameters). The fine-tunes differ from the base by a rank-4 plus a sparse change per matrix.
      """)

  @Argument(help: "Folder to write the example models into.")
  var outdir: String

  @Flag(help: "Replace existing example folders.")
  var overwrite = false

  func validate() throws {
    for name in ["base", "finetune-a", "finetune-b", "finetune-chat"] {
      try requireNewOutput("\(outdir)/\(name)", overwrite: overwrite)
    }
  }

  func run() throws {
    let paths = try ExampleModels.writeExamples(to: outdir, overwrite: overwrite)
    for path in paths { print(path) }
  }
}
