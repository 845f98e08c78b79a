import ArgumentParser
import Checkpoint
import Foundation
import Merge
import Operations

/// The CLI command of a registered operation: a thin shell that turns the command line into an
/// `OperationRequest` (positional models, `--base`, `--data`, and one flag per declared
/// parameter, `batch_size` as `--batch-size`), checks the paths, then runs the operation and
/// prints its lines. Every check of values lives in the operation, so the CLI and recipes accept
/// and refuse the same things.
struct OperationCommand<Op: MergekitOperation>: ParsableCommand {
  static var configuration: CommandConfiguration {
    let operation = Op()
    return CommandConfiguration(
      commandName: operation.commandPath.last, abstract: operation.summary, discussion: OperationFlags.help(operation))
  }

  @Option(name: .shortAndLong, help: "Output path (see below).")
  var output: String?

  @Flag(help: "Replace existing outputs (each only after its new version is complete).")
  var overwrite = false

  @Flag(name: .customLong("dry-run"), help: "Check everything and print what would run, without running it.")
  var dryRun = false

  @Flag(help: "Print the report as JSON (operations that produce a report).")
  var json = false

  @Flag(name: .shortAndLong, help: "No progress output.")
  var quiet = false

  @Argument(
    parsing: .allUnrecognized,
    help: ArgumentHelp("Inputs and parameter flags (see below).", valueName: "inputs-and-flags"))
  var arguments: [String] = []

  func run() throws {
    let operation = Op()
    let flags = try OperationFlags(arguments, operation)
    let request = try operation.prepare(
      models: flags.models, base: flags.base, data: flags.data, output: output, parameters: flags.parameters)
    for (role, path) in request.inputPaths(operation.parameters) where !FileManager.default.fileExists(atPath: path) {
      throw OperationError.missingInput(operation: operation.name, role: role, path: path)
    }
    for path in (output.map { [$0] } ?? []) + request.extraOutputs(operation.parameters) {
      if !overwrite && !dryRun && FileManager.default.fileExists(atPath: path) {
        throw OperationError.outputExists(path: path)
      }
      try ModelFolder.checkOutput(path, isNotAmong: request.inputPaths(operation.parameters).map(\.path))
    }
    if dryRun {
      print("operation:     \(operation.name)")
      for (role, path) in request.inputPaths(operation.parameters) {
        print("\(role):".padding(toLength: 15, withPad: " ", startingAt: 0) + path)
      }
      print("output:        \(output ?? "(none: the report is printed)")")
      let shown = operation.parameters.compactMap { spec in
        request.parameters.values[spec.name].map { "\(spec.name)=\(OperationFlags.describe($0))" }
      }
      print("parameters:    \(shown.joined(separator: " "))")
      return
    }
    let quiet = self.quiet
    let context = OperationContext(overwrite: overwrite) { label, unit in Progress(label, quiet: quiet, unit: unit) }
    let result = try operation.run(request, context: context)
    if json, let report = result.json {
      try printJSON(report)
    } else {
      result.lines.forEach { print($0) }
    }
  }
}

/// The command type of an operation (opens the existential for the generic command).
func commandType<Op: MergekitOperation>(_ operation: Op) -> any ParsableCommand.Type { OperationCommand<Op>.self }

/// An operation's command line read against its declared inputs and parameters.
struct OperationFlags {
  var models: [String] = []
  var base: String?
  var data: String?
  var parameters: [String: ParameterValue] = [:]

  init(_ arguments: [String], _ operation: any MergekitOperation) throws {
    var positional: [String] = []
    var i = 0
    while i < arguments.count {
      let argument = arguments[i]
      i += 1
      guard argument.hasPrefix("--") else {
        if argument.hasPrefix("-"), argument.count > 1, Double(argument) == nil {
          throw ValidationError("unknown option '\(argument)'")
        }
        positional.append(argument)
        continue
      }
      var name = String(argument.dropFirst(2))
      var inline: String?
      if let equals = name.firstIndex(of: "=") {
        inline = String(name[name.index(after: equals)...])
        name = String(name[..<equals])
      }
      let key = name.replacingOccurrences(of: "-", with: "_")
      let spec = operation.parameters.first { $0.name == key }
      let isRole =
        (key == "base" && operation.inputs.base != .unused) || (key == "data" && operation.inputs.data != .unused)
      guard spec != nil || isRole else {
        let known =
          (operation.inputs.base != .unused ? ["--base"] : []) + (operation.inputs.data != .unused ? ["--data"] : [])
          + operation.parameters.map(\.flagName)
        throw ValidationError("\(operation.name) has no option --\(name); it takes \(known.joined(separator: ", "))")
      }
      var value: String
      if let inline {
        value = inline
      } else if spec?.kind == .flag {
        value = "true"
        if i < arguments.count, ["true", "false"].contains(arguments[i]) {
          value = arguments[i]
          i += 1
        }
      } else {
        guard i < arguments.count else { throw ValidationError("--\(name) needs a value") }
        value = arguments[i]
        i += 1
      }
      let given = key == "base" ? base : key == "data" ? data : parameters[key].map { "\($0)" }
      guard given == nil else { throw ValidationError("--\(name) is given twice") }
      switch (key, spec?.kind) {
      case ("base", _) where isRole: base = value
      case ("data", _) where isRole: data = value
      case (_, .text?), (_, .pattern?), (_, .inputPath?), (_, .outputPath?): parameters[key] = .text(value)
      default: parameters[key] = ParameterValue(parsing: value)
      }
    }
    if operation.inputs.baseIsFirstArgument, base == nil, !positional.isEmpty { base = positional.removeFirst() }
    models = positional
  }

  static func describe(_ value: OperationValue) -> String {
    switch value {
    case .number(let x): return x.formatted()
    case .integer(let n): return String(n)
    case .integers(let ns): return ns.map(String.init).joined(separator: ",")
    case .flag(let b): return String(b)
    case .text(let s): return s
    }
  }

  /// The help after the flags: inputs, then every parameter with its kind and default, and the
  /// recipe form.
  static func help(_ operation: any MergekitOperation) -> String {
    let inputs = operation.inputs
    var lines = [operation.discussion, ""]
    let usage =
      (inputs.baseIsFirstArgument ? ["BASE"] : [])
      + (inputs.models.upperBound == 0
        ? [] : inputs.models.lowerBound == 0 ? ["[MODEL]"] : inputs.models.upperBound > 1 ? ["MODEL..."] : ["MODEL"])
    if !usage.isEmpty {
      lines.append(
        "Arguments: \(usage.joined(separator: " ")): \(inputs.modelHelp)\(inputs.baseIsFirstArgument ? " (BASE: \(inputs.baseHelp); or --base)" : "")."
      )
    }
    if inputs.base != .unused && !inputs.baseIsFirstArgument {
      lines.append("  --base PATH\(inputs.base == .required ? " [required]" : ""): \(inputs.baseHelp)")
    }
    if inputs.data != .unused {
      lines.append("  --data PATH\(inputs.data == .required ? " [required]" : ""): \(inputs.dataHelp)")
    }
    if operation.output == .report { lines.append("  -o PATH: write the report as JSON (it is printed either way)") }
    lines.append("")
    lines.append("Parameters:")
    for spec in operation.parameters {
      let value = spec.defaultValue.map { " [default: \($0)]" } ?? (spec.isOptional ? "" : " [required]")
      lines.append("  \(spec.flagName) (\(spec.kind.summary))\(value): \(spec.help)")
    }
    lines.append("")
    lines.append(
      "In a recipe: method: \(operation.name), with models/model, base and data as step keys and the parameters under parameters: (batch_size for --batch-size)."
    )
    return lines.joined(separator: "\n")
  }
}
