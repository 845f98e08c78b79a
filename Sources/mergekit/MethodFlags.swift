import ArgumentParser
import Merge

/// Turns a method's parameter flags (`--density 0.5`, `--weight 0.3 --weight 0.7`, `--t 0,0.5,1`)
/// into parameter values, using the method's own parameter list: every registered method's
/// parameters are flags with no change here. A per-model parameter given once applies to every
/// model; given once per model, each value goes to its model in order.
struct MethodFlags {
  var global: [String: ParameterValue] = [:]
  var perModel: [[String: ParameterValue]]

  init(_ arguments: [String], method: any MergeMethod, modelCount: Int) throws {
    perModel = Array(repeating: [:], count: modelCount)
    var values: [String: [String]] = [:]
    var order: [String] = []
    var i = 0
    while i < arguments.count {
      let argument = arguments[i]
      guard argument.hasPrefix("--") else { throw ValidationError("unexpected argument '\(argument)'") }
      var flag = String(argument.dropFirst(2))
      var value: String
      if let equals = flag.firstIndex(of: "=") {
        value = String(flag[flag.index(after: equals)...])
        flag = String(flag[..<equals])
      } else {
        let spec = method.parameters.first { $0.name == flag.replacingOccurrences(of: "-", with: "_") }
        if spec?.kind == .flag && (i + 1 == arguments.count || arguments[i + 1].hasPrefix("--")) {
          value = "true"  // a bare boolean flag
        } else {
          guard i + 1 < arguments.count else { throw ValidationError("\(argument) needs a value") }
          i += 1
          value = arguments[i]
        }
      }
      let name = flag.replacingOccurrences(of: "-", with: "_")
      guard method.parameters.contains(where: { $0.name == name }) else {
        let known = method.parameters.map { "--" + $0.name.replacingOccurrences(of: "_", with: "-") }
        throw ValidationError(
          "\(method.name) has no parameter --\(flag); it takes \(known.isEmpty ? "none" : known.joined(separator: ", "))"
        )
      }
      if values[name] == nil { order.append(name) }
      values[name, default: []].append(value)
      i += 1
    }
    for name in order {
      let given = (values[name] ?? []).map(ParameterValue.init(parsing:))
      guard let spec = method.parameters.first(where: { $0.name == name }) else { continue }  // checked above
      switch (spec.scope, given.count) {
      case (_, 1): global[name] = given[0]
      case (.perModel, modelCount): for m in 0..<modelCount { perModel[m][name] = given[m] }
      case (.perModel, _):
        throw ValidationError(
          "--\(flag(name)) given \(given.count) times; give it once (all models) or once per model (\(modelCount))")
      case (.global, _):
        throw ValidationError("--\(flag(name)) is one value for the whole merge; it was given \(given.count) times")
      }
    }
  }

  /// Separates positional arguments (models) from `--flag value` pairs. A flag takes the next
  /// argument as its value unless it is written `--flag=value`, or the next argument is another
  /// flag (a bare boolean flag).
  static func split(_ arguments: [String]) -> (models: [String], flags: [String]) {
    var models: [String] = []
    var flags: [String] = []
    var i = 0
    while i < arguments.count {
      let argument = arguments[i]
      if argument.hasPrefix("--") {
        flags.append(argument)
        if !argument.contains("="), i + 1 < arguments.count, !arguments[i + 1].hasPrefix("--") {
          flags.append(arguments[i + 1])
          i += 1
        }
      } else {
        models.append(argument)
      }
      i += 1
    }
    return (models, flags)
  }

  private func flag(_ name: String) -> String { name.replacingOccurrences(of: "_", with: "-") }

  /// The methods and their parameters, for `--help`.
  static func reference(_ methods: [any MergeMethod]) -> String {
    methods.map { method in
      let parameters = method.parameters.map { spec -> String in
        let scope = spec.scope == .perModel ? " (per model)" : ""
        let value = spec.defaultValue.map { " [default: \($0)]" } ?? (spec.isOptional ? "" : " [required]")
        return "    --\(spec.name.replacingOccurrences(of: "_", with: "-"))\(scope)\(value): \(spec.help)"
      }
      let base = method.base == .required ? " Needs --base." : method.base == .unused ? " No base." : ""
      return (["  \(method.name): \(method.summary).\(base)"] + parameters).joined(separator: "\n")
    }.joined(separator: "\n")
  }
}
