import ArgumentParser
import Checkpoint
import Foundation
import Merge
import Operations
import Tensor

struct ATLASCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "atlas",
    abstract: "aTLAS: task vectors scaled block by block with learned coefficients.",
    discussion: """
      `learn` fits one coefficient per task vector and parameter tensor (or per random partition \
      of it) by gradient descent with every weight frozen; `apply` adds the task vectors to the \
      base with a coefficient file, streamed like a merge. Paper: Zhang et al., NeurIPS 2024 \
      (arXiv:2407.02880).
      """,
    subcommands: [commandType(ATLASLearnOperation()), ATLASApplyCommand.self])
}

struct ATLASApplyCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "apply", abstract: "theta = base + sum over tasks and blocks of lambda * tau, from a coefficient file."
  )

  @Argument(help: "The base model.") var base: String
  @Argument(help: "Task vectors, in the coefficient file's order.") var vectors: [String] = []
  @Option(help: "Coefficient file (from `atlas learn`, or written by hand).") var coefficients: String
  @OptionGroup var output: OutputOptions

  func validate() throws {
    try requireExisting(base, "base")
    guard !vectors.isEmpty else { throw ValidationError("give at least one task vector") }
    for v in vectors { try requireExisting(v, "task vector") }
    try requireExisting(coefficients, "coefficient file")
  }

  func run() throws {
    let operation = StreamedOperation.atlasApply
    let method = try operation.method(
      files: ["coefficients": coefficients], base: try openCheckpoint(base), models: vectors.count)
    try output.execute(
      "atlas", method: method, base: base, models: vectors, global: [:], perModel: vectors.map { _ in [:] },
      defaultFormat: operation.defaultFormat,
      metadata: ["mergekit.kind": operation.kind ?? operation.name, "mergekit.coefficients": coefficients])
  }
}
