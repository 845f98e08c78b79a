import Foundation
import Merge
import Operations
import Testing

@testable import TestSupport

/// Every registered operation is reachable from the CLI and from a recipe with the same
/// parameter names and checks: for each parameter, a value its spec refuses is a usage error
/// (exit 64) in both, naming the flag or the YAML path, before any output exists.
@Suite struct OperationRegistryTests {
  /// A value the spec refuses, written for the command line, or nil where every value is
  /// accepted (free text, paths).
  static func refusedValue(_ spec: ParameterSpec) -> String? {
    switch spec.kind {
    case .number(let range, let openBelow):
      if range.lowerBound > -Double.greatestFiniteMagnitude {
        return openBelow ? "\(range.lowerBound)" : "\(range.lowerBound - 1)"
      }
      return range.upperBound < Double.greatestFiniteMagnitude ? "\(range.upperBound + 1)" : nil
    case .integer(let range), .integers(let range): return "\(range.lowerBound - 1)"
    case .flag: return "maybe"
    case .choice: return "no-such-choice"
    case .pattern: return "("
    case .text, .inputPath, .outputPath: return nil
    }
  }

  /// The output path an operation accepts.
  static func outputName(_ operation: any MergekitOperation) -> String {
    if case .file(let ext) = operation.output { return "out.\(ext)" }
    return "out"
  }

  @Test func everyParameterIsCheckedAlikeOnTheCommandLineAndInRecipes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let input = folder.file("input.txt")
    try Data("an input that exists".utf8).write(to: URL(fileURLWithPath: input))
    var checked = 0
    for operation in OperationRegistry.operations {
      let specNames = Set(operation.parameters.map(\.name))
      #expect(specNames.count == operation.parameters.count, "\(operation.name) declares a parameter twice")
      for spec in operation.parameters {
        #expect(
          spec.name == spec.name.lowercased() && !spec.name.contains("-"),
          "\(operation.name).\(spec.name) is not snake_case")
        guard let value = Self.refusedValue(spec) else { continue }
        let output = folder.file(Self.outputName(operation))
        // The command line: --flag=value, with the inputs the operation requires.
        // Required parameters other than this one get a valid value (only regular expressions have none today).
        let required = operation.parameters.filter { $0.name != spec.name && $0.defaultValue == nil && !$0.isOptional }
        #expect(
          required.allSatisfy { $0.kind == .pattern },
          "\(operation.name): give the test a valid value for \(required.map(\.name))")
        var arguments =
          operation.commandPath + ["\(spec.flagName)=\(value)", "-o", output] + required.flatMap { [$0.flagName, "."] }
        arguments += Array(repeating: input, count: operation.inputs.models.lowerBound)
        if operation.inputs.base == .required { arguments += ["--base", input] }
        if operation.inputs.data == .required { arguments += ["--data", input] }
        let cli = try CLI.run(arguments, environment: [:])
        #expect(
          cli.status == 64 && cli.stderr.contains(spec.flagName),
          "\(arguments.joined(separator: " ")): \(cli.status) \(cli.stderr)")
        // The recipe: the same value under parameters, the same inputs as step keys.
        let quoted = Double(value) == nil ? "\"\(value)\"" : value
        var step = [
          "name: s", "method: \(operation.name)",
          "models: [\(Array(repeating: "m", count: operation.inputs.models.lowerBound).joined(separator: ", "))]",
        ]
        if operation.inputs.base == .required { step.append("base: m") }
        if operation.inputs.data == .required { step.append("data: m") }
        step.append(
          "parameters: {\((["\(spec.name): \(quoted)"] + required.map { "\($0.name): \".\"" }).joined(separator: ", "))}"
        )
        let yaml = "inputs: {m: \(input)}\nsteps:\n  - {\(step.joined(separator: ", "))}\noutputs: {s: \(output)}\n"
        let recipe = folder.file("recipe.yaml")
        try Data(yaml.utf8).write(to: URL(fileURLWithPath: recipe))
        let run = try CLI.run(["run", recipe], environment: [:])
        let path = "steps[0].parameters.\(spec.name)"
        #expect(
          run.status == 64 && run.stderr.contains(path),
          "\(operation.name) recipe with \(spec.name): \(value): \(run.status) \(run.stderr)")
        #expect(!FileManager.default.fileExists(atPath: output), "\(output) was written")
        checked += 1
      }
    }
    #expect(checked >= 60, "only \(checked) parameters were checked")
    // Nothing but the input and the recipe: no output, no temporary folder.
    #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == ["input.txt", "recipe.yaml"])
  }

  @Test func everyMergeParameterIsCheckedAlikeOnTheCommandLineAndInRecipes() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    #expect(try CLI.run("example", folder.file("ex")).status == 0)
    let (base, models) = (folder.file("ex/base"), [folder.file("ex/finetune-a"), folder.file("ex/finetune-b")])
    let output = folder.file("out")
    var checked = 0
    for operation in OperationRegistry.streamed
    where MergeRegistry.methods.contains(where: { $0.name == operation.name }) {
      let count = min(max(operation.modelCount.lowerBound, 1), 2)
      for spec in operation.parameters {
        guard let value = Self.refusedValue(spec) else { continue }
        var arguments =
          ["merge"] + models.prefix(count) + ["--method", operation.name, "\(spec.flagName)=\(value)", "-o", output]
        if operation.base == .required { arguments += ["--base", base] }
        let cli = try CLI.run(arguments, environment: [:])
        #expect(
          cli.status == 64 && cli.stderr.contains(spec.flagName),
          "\(arguments.joined(separator: " ")): \(cli.status) \(cli.stderr)")
        let quoted = Double(value) == nil ? "\"\(value)\"" : value
        let labels = ["a", "b"].prefix(count).joined(separator: ", ")
        let yaml = """
          inputs: {base: \(base), a: \(models[0]), b: \(models[1])}
          steps:
            - {name: s, method: \(operation.name), \(operation.base == .required ? "base: base, " : "")models: [\(labels)], parameters: {\(spec.name): \(quoted)}}
          outputs: {s: \(output)}

          """
        let recipe = folder.file("recipe.yaml")
        try Data(yaml.utf8).write(to: URL(fileURLWithPath: recipe))
        let run = try CLI.run(["run", recipe], environment: [:])
        #expect(
          run.status == 64 && run.stderr.contains("steps[0].parameters.\(spec.name)"),
          "\(operation.name) recipe with \(spec.name): \(value): \(run.stderr)")
        #expect(!FileManager.default.fileExists(atPath: output))
        checked += 1
      }
    }
    #expect(checked >= 15, "only \(checked) merge parameters were checked")
    // convert: its parameters are flags and recipe parameters (or step keys) with one check.
    let refused = ["select": "(", "drop": "[", "rename": "no-equals-sign", "dtype": "f7", "layers": "4-2"]
    #expect(Set(refused.keys) == Set(ConvertOperation.parameters.map(\.name)))
    for spec in ConvertOperation.parameters {
      guard let value = refused[spec.name] else { continue }
      let cli = try CLI.run(["convert", models[0], output, "\(spec.flagName)=\(value)"], environment: [:])
      #expect(
        cli.status == 64 && cli.stderr.contains(spec.flagName), "convert \(spec.flagName)=\(value): \(cli.stderr)")
      for form in ["parameters: {\(spec.name): \"\(value)\"}", "\(spec.name): \"\(value)\""] {
        let yaml =
          "inputs: {a: \(models[0])}\nsteps:\n  - {name: s, method: convert, model: a, \(form)}\noutputs: {s: \(output)}\n"
        try Data(yaml.utf8).write(to: URL(fileURLWithPath: folder.file("recipe.yaml")))
        let run = try CLI.run(["run", folder.file("recipe.yaml")], environment: [:])
        let path = form.hasPrefix("parameters") ? "steps[0].parameters.\(spec.name)" : "steps[0].\(spec.name)"
        #expect(run.status == 64 && run.stderr.contains(path), "convert recipe \(form): \(run.stderr)")
        #expect(!FileManager.default.fileExists(atPath: output))
      }
    }
  }

  @Test func everyOperationHasACommandWithItsParametersInTheHelp() throws {
    for operation in OperationRegistry.operations {
      let help = try CLI.run(operation.commandPath + ["--help"], environment: [:])
      #expect(help.status == 0, "\(operation.commandPath): \(help.stderr)")
      for spec in operation.parameters {
        #expect(help.stdout.contains(spec.flagName + " ("), "\(operation.name) help lacks \(spec.flagName)")
      }
    }
  }
}
