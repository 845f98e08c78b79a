import ArgumentParser

@main
struct MergekitCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "mergekit",
    abstract: "Merge, compress and inspect neural-network checkpoints (safetensors and .mkz).",
    discussion: """
      Every subcommand reads a checkpoint (a .safetensors or .mkz file, or a Hugging Face model
      folder, sharded or not) and writes one, so the output of one command is the input of the
      next. Exit status: 0 success, 1 run error, 64 bad usage.
      """,
    version: "0.1.0",
    subcommands: [InspectCommand.self, ConvertCommand.self, VerifyCommand.self, DiffCommand.self, ExampleCommand.self]
  )
}
