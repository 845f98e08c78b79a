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
    commandName: "apply", abstract: "theta = base + sum over tasks and blocks of lambda * tau, from a coefficient file.")

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
    let c = try ATLASCoefficients(json: try Data(contentsOf: URL(fileURLWithPath: coefficients)))
    let baseCheckpoint = try openCheckpoint(base)
    try c.check(baseShapes: Dictionary(uniqueKeysWithValues: baseCheckpoint.tensors.map { ($0.name, $0.shape) }), taskVectors: vectors.count)
    try output.execute(
      "atlas", method: ATLASApply(c), base: base, models: vectors, global: [:], perModel: vectors.map { _ in [:] }, defaultFormat: .safetensors,
      metadata: ["mergekit.kind": "atlas", "mergekit.coefficients": coefficients])
  }
}
