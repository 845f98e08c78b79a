import Foundation
import Merge

/// One parameter's checked value.
public enum OperationValue: Sendable, Equatable {
  case number(Double)
  case integer(Int)
  case integers([Int])
  case flag(Bool)
  case text(String)
}

/// An operation's parameters, resolved from what the user gave and the declared defaults, every
/// value checked against its spec. Accessors take declared names; asking for an undeclared name
/// or the wrong kind is a programming error (the registry test walks every operation).
public struct OperationParameters: Sendable {
  public let values: [String: OperationValue]
  /// Names the user gave (not defaults), for rules such as "give one of keep, rank or energy".
  public let given: Set<String>

  public func isGiven(_ name: String) -> Bool { given.contains(name) }

  public func optionalDouble(_ name: String) -> Double? {
    switch values[name] {
    case .number(let x)?: return x
    case .integer(let n)?: return Double(n)
    default: return nil
    }
  }

  public func double(_ name: String) -> Double {
    guard let x = optionalDouble(name) else { preconditionFailure("parameter '\(name)' is not a resolved number") }
    return x
  }

  public func float(_ name: String) -> Float { Float(double(name)) }

  public func optionalInt(_ name: String) -> Int? {
    if case .integer(let n)? = values[name] { return n }
    return nil
  }

  public func int(_ name: String) -> Int {
    guard let n = optionalInt(name) else { preconditionFailure("parameter '\(name)' is not a resolved integer") }
    return n
  }

  /// A seed: a non-negative integer as the RNGs take it.
  public func seed(_ name: String = "seed") -> UInt64 { UInt64(clamping: int(name)) }

  public func optionalIntegers(_ name: String) -> [Int]? {
    if case .integers(let xs)? = values[name] { return xs }
    return nil
  }

  public func flag(_ name: String) -> Bool {
    guard case .flag(let b)? = values[name] else { preconditionFailure("parameter '\(name)' is not a resolved flag") }
    return b
  }

  public func optionalText(_ name: String) -> String? {
    if case .text(let s)? = values[name] { return s }
    return nil
  }

  public func text(_ name: String) -> String {
    guard let s = optionalText(name) else { preconditionFailure("parameter '\(name)' is not resolved text") }
    return s
  }
}

/// A checked request to run one operation: its inputs (paths), output and parameters.
public struct OperationRequest: Sendable {
  public let operation: String
  public var models: [String]
  public var base: String?
  public var data: String?
  public var output: String?
  public let parameters: OperationParameters
  /// The models as the user named them (recipe labels, or the paths given), for reports and
  /// files that record them.
  public var modelNames: [String]

  /// Every path the request reads, with its role, for existence checks and recipe references.
  public func inputPaths(_ specs: [ParameterSpec]) -> [(role: String, path: String)] {
    var paths: [(String, String)] = models.map { ("model", $0) }
    if let base { paths.append(("base", base)) }
    if let data { paths.append(("data", data)) }
    for spec in specs where spec.kind == .inputPath {
      if let path = parameters.optionalText(spec.name) { paths.append((spec.name, path)) }
    }
    return paths
  }

  /// Paths written besides the output (path parameters of kind `outputPath`).
  public func extraOutputs(_ specs: [ParameterSpec]) -> [String] {
    specs.filter { $0.kind == .outputPath }.compactMap { parameters.optionalText($0.name) }
  }
}

extension MergekitOperation {
  /// Checks a request as the user gave it and resolves its parameters: known names, kinds,
  /// ranges and defaults, the number and roles of inputs, the output, then the operation's own
  /// rules. Reads no file. Throws `OperationError`.
  public func prepare(
    models: [String], base: String?, data: String?, output: String?, parameters given: [String: ParameterValue],
    modelNames: [String]? = nil
  ) throws -> OperationRequest {
    let known = parameters.map(\.name)
    if let unknown = given.keys.sorted().first(where: { !known.contains($0) }) {
      throw OperationError.unknownParameter(operation: name, name: unknown, known: known)
    }
    var values: [String: OperationValue] = [:]
    for spec in parameters {
      guard let value = given[spec.name] ?? spec.defaultValue else {
        if spec.isOptional { continue }
        throw OperationError.missingParameter(operation: name, name: spec.name, help: spec.help)
      }
      values[spec.name] = try resolve(value, spec)
    }
    guard inputs.models.contains(models.count) else {
      let range = inputs.models
      let wanted: String
      switch (range.lowerBound, range.upperBound) {
      case (0, 0): wanted = "no models"
      case (1, 1): wanted = "one model"
      case (let n, let m) where n == m: wanted = "\(n) models"
      case (1, Int.max): wanted = "at least one model"
      case (let n, Int.max): wanted = "at least \(n) models"
      case (let n, let m): wanted = "\(n) to \(m) models"
      }
      throw OperationError.inputs(operation: name, reason: "takes \(wanted) (\(inputs.modelHelp)); got \(models.count)")
    }
    try checkRole("base", base, inputs.base, help: inputs.baseHelp)
    try checkRole("data", data, inputs.data, help: inputs.dataHelp)
    let request = OperationRequest(
      operation: name, models: models, base: base, data: data, output: output,
      parameters: OperationParameters(values: values, given: Set(given.keys)), modelNames: modelNames ?? models)
    try checkOutput(request)
    try check(request)
    return request
  }

  private func checkRole(_ role: String, _ value: String?, _ requirement: Requirement, help: String) throws {
    switch (requirement, value) {
    case (.required, nil): throw OperationError.inputs(operation: name, reason: "needs \(role) (\(help))")
    case (.unused, _?): throw OperationError.inputs(operation: name, reason: "does not read \(role); drop it")
    default: break
    }
  }

  private func checkOutput(_ request: OperationRequest) throws {
    guard let path = request.output else {
      if needsOutput(request) {
        throw OperationError.badOutput(operation: name, reason: "needs an output (-o PATH, or an output in the recipe)")
      }
      return
    }
    if case .file(let ext) = output, !path.hasSuffix("." + ext) {
      throw OperationError.badOutput(
        operation: name, reason: "writes a .\(ext) file; '\(path)' does not end in .\(ext)")
    }
  }

  /// One value checked against its spec.
  private func resolve(_ value: ParameterValue, _ spec: ParameterSpec) throws -> OperationValue {
    func fail(_ reason: String) -> OperationError {
      .invalidParameter(operation: name, name: spec.name, value: "\(value)", reason: reason)
    }
    switch (spec.kind, value) {
    case (.number(let range, let openBelow), .number(let x)):
      guard x.isFinite, range.contains(x), !(openBelow && x == range.lowerBound) else {
        throw fail("is not \(spec.kind.summary)")
      }
      return .number(x)
    case (.integer(let range), .number(let x)):
      guard let n = Int(exactly: x), range.contains(n) else { throw fail("is not \(spec.kind.summary)") }
      return .integer(n)
    case (.integers(let range), .number(let x)):
      guard let n = Int(exactly: x), range.contains(n) else { throw fail("is not \(spec.kind.summary)") }
      return .integers([n])
    case (.integers(let range), .gradient(let xs)):
      let ns = xs.compactMap { Int(exactly: $0) }
      guard !xs.isEmpty, ns.count == xs.count, ns.allSatisfy(range.contains) else {
        throw fail("is not \(spec.kind.summary)")
      }
      return .integers(ns)
    case (.flag, .flag(let b)): return .flag(b)
    case (.flag, .number(let x)) where x == 0 || x == 1: return .flag(x == 1)
    case (.choice(let options), .text(let s)):
      guard options.contains(s) else { throw fail("is not \(spec.kind.summary)") }
      return .text(s)
    case (.text, .text(let s)), (.inputPath, .text(let s)), (.outputPath, .text(let s)), (.pattern, .text(let s)):
      guard !s.isEmpty else { throw fail("is empty") }
      if spec.kind == .pattern, (try? Regex(s)) == nil { throw fail("is not a valid regular expression") }
      return .text(s)
    case (.text, .number(let x)), (.inputPath, .number(let x)), (.outputPath, .number(let x)),
      (.pattern, .number(let x)):
      return .text(x.formatted())
    default:
      throw fail("is not \(spec.kind.summary)")
    }
  }
}
