import Foundation
import Tensor

/// A parameter value as a user writes it (CLI flag, recipe, mergekit YAML). As in mergekit, a
/// value may vary per tensor: a list of numbers is a gradient interpolated across layers, and a
/// list of `{filter, value}` entries picks the first entry whose filter is a substring of the
/// tensor name (an entry without filter is the fallback).
public indirect enum ParameterValue: Sendable, Equatable, CustomStringConvertible {
  case number(Double)
  case flag(Bool)
  case text(String)
  case gradient([Double])
  case filtered([FilteredValue])

  public struct FilteredValue: Sendable, Equatable {
    public var filter: String?
    public var value: ParameterValue
    public init(filter: String?, value: ParameterValue) {
      self.filter = filter
      self.value = value
    }
  }

  public var description: String {
    switch self {
    case .number(let x): return ParameterSpec.Kind.plain(x)
    case .flag(let b): return String(b)
    case .text(let s): return s
    case .gradient(let xs): return "[" + xs.map(ParameterSpec.Kind.plain).joined(separator: ", ") + "]"
    case .filtered(let entries):
      return "[" + entries.map { "{filter: \($0.filter ?? "*"), value: \($0.value)}" }.joined(separator: ", ") + "]"
    }
  }

  /// Parses a command-line spelling: a number, `true`/`false`, a comma-separated gradient
  /// (`0,0.5,1`), or any other word as text.
  public init(parsing text: String) {
    let trimmed = text.trimmingCharacters(in: .whitespaces)
    if let x = Double(trimmed) {
      self = .number(x)
    } else if trimmed == "true" || trimmed == "false" {
      self = .flag(trimmed == "true")
    } else if trimmed.contains(","),
      case let parts = trimmed.split(separator: ",").compactMap({ Double($0.trimmingCharacters(in: .whitespaces)) }),
      parts.count == trimmed.split(separator: ",").count
    {
      self = .gradient(parts)
    } else {
      self = .text(trimmed)
    }
  }
}

/// What a method accepts: name, whether it is one value for the merge or one per input model,
/// its kind and bounds, and its default (nil: required).
public struct ParameterSpec: Sendable {
  public enum Scope: Sendable { case global, perModel }
  public enum Kind: Sendable, Equatable {
    /// A number in `range`; `openBelow` excludes the lower bound (density is in (0, 1]).
    case number(range: ClosedRange<Double>, openBelow: Bool)
    /// A whole number in `range`.
    case integer(range: ClosedRange<Int>)
    /// A list of whole numbers in `range` (`64,64` on the command line, `[64, 64]` in YAML).
    case integers(range: ClosedRange<Int>)
    case flag
    case choice([String])
    /// Free text: a word whose meaning the operation checks.
    case text
    /// A regular expression (checked to compile).
    case pattern
    /// A file or folder the operation reads (checked to exist before anything runs).
    case inputPath
    /// A file the operation writes besides its output (checked like an output).
    case outputPath

    /// How the kind reads in help and errors.
    public var summary: String {
      switch self {
      case .number(let range, let openBelow):
        if range == ParameterSpec.anyNumber { return "a number" }
        if range.upperBound == .greatestFiniteMagnitude {
          return "a number \(openBelow ? ">" : ">=") \(Self.plain(range.lowerBound))"
        }
        return "a number in \(openBelow ? "(" : "[")\(Self.plain(range.lowerBound)), \(Self.plain(range.upperBound))]"
      case .integer(let range): return "an integer \(Self.describe(range))"
      case .integers(let range): return "integers \(Self.describe(range)), comma-separated"
      case .flag: return "true or false"
      case .choice(let options): return "one of \(options.joined(separator: ", "))"
      case .text: return "text"
      case .pattern: return "a regular expression"
      case .inputPath: return "a path to read"
      case .outputPath: return "a path to write"
      }
    }

    /// A bound as written in a config: `1e-3`, `0.5`, `1`.
    public static func plain(_ x: Double) -> String { x == x.rounded() && abs(x) < 1e15 ? String(Int(x)) : "\(x)" }

    private static func describe(_ range: ClosedRange<Int>) -> String {
      range.upperBound == Int.max ? ">= \(range.lowerBound)" : "in [\(range.lowerBound), \(range.upperBound)]"
    }
  }

  public let name: String
  public let scope: Scope
  public let kind: Kind
  public let defaultValue: ParameterValue?
  /// Without a default: true leaves the parameter out when not given (the method derives it),
  /// false makes it required.
  public let isOptional: Bool
  public let help: String

  public init(
    _ name: String, _ scope: Scope, _ kind: Kind, default defaultValue: ParameterValue?, optional: Bool = false,
    help: String
  ) {
    self.name = name
    self.scope = scope
    self.kind = kind
    self.defaultValue = defaultValue
    self.isOptional = optional
    self.help = help
  }

  public static let anyNumber = -Double.greatestFiniteMagnitude...Double.greatestFiniteMagnitude
  /// Zero or more (with `openBelow`: more than zero).
  public static let nonNegative = 0...Double.greatestFiniteMagnitude

  public static func number(
    _ name: String, _ scope: Scope, in range: ClosedRange<Double> = anyNumber, openBelow: Bool = false,
    default value: Double?, optional: Bool = false, help: String
  ) -> ParameterSpec {
    ParameterSpec(
      name, scope, .number(range: range, openBelow: openBelow), default: value.map(ParameterValue.number),
      optional: optional, help: help)
  }

  public static func flag(_ name: String, default value: Bool, help: String) -> ParameterSpec {
    ParameterSpec(name, .global, .flag, default: .flag(value), help: help)
  }

  public static func choice(_ name: String, _ options: [String], default value: String, help: String) -> ParameterSpec {
    ParameterSpec(name, .global, .choice(options), default: .text(value), help: help)
  }

  public static func integer(
    _ name: String, in range: ClosedRange<Int> = 1...Int.max, default value: Int?, optional: Bool = false, help: String
  ) -> ParameterSpec {
    ParameterSpec(
      name, .global, .integer(range: range), default: value.map { .number(Double($0)) }, optional: optional, help: help)
  }

  public static func integers(
    _ name: String, in range: ClosedRange<Int> = 0...Int.max, default value: [Int]? = nil, optional: Bool = false,
    help: String
  ) -> ParameterSpec {
    ParameterSpec(
      name, .global, .integers(range: range), default: value.map { .gradient($0.map(Double.init)) }, optional: optional,
      help: help)
  }

  public static func text(_ name: String, default value: String? = nil, help: String) -> ParameterSpec {
    ParameterSpec(name, .global, .text, default: value.map(ParameterValue.text), optional: value == nil, help: help)
  }

  public static func pattern(_ name: String, default value: String? = nil, help: String) -> ParameterSpec {
    ParameterSpec(name, .global, .pattern, default: value.map(ParameterValue.text), optional: value == nil, help: help)
  }

  public static func path(_ name: String, writes: Bool = false, help: String) -> ParameterSpec {
    ParameterSpec(name, .global, writes ? .outputPath : .inputPath, default: nil, optional: true, help: help)
  }

  /// The command-line spelling: `--batch-size` for `batch_size`.
  public var flagName: String { "--" + name.replacingOccurrences(of: "_", with: "-") }
}

/// One parameter's value for one tensor.
public enum ResolvedValue: Sendable, Equatable, CustomStringConvertible {
  case number(Double)
  case flag(Bool)
  case text(String)

  public var description: String {
    switch self {
    case .number(let x): return x.formatted()
    case .flag(let b): return String(b)
    case .text(let s): return s
    }
  }
}

/// A method's parameters resolved for one tensor: global values, and per-model values in input
/// order.
public struct ResolvedParameters: Sendable {
  public var global: [String: ResolvedValue]
  public var models: [[String: ResolvedValue]]
  /// How the merge rounds its arithmetic on this tensor (exact unless mergekit's is asked for).
  public var arithmetic: MergeArithmetic = .exact

  public init(global: [String: ResolvedValue] = [:], models: [[String: ResolvedValue]] = []) {
    self.global = global
    self.models = models
  }

  /// A global number that may be absent (an optional parameter not given).
  public func optionalNumber(_ name: String) -> Double? {
    if case .number(let x)? = global[name] { return x }
    return nil
  }

  /// A global number (the resolver guarantees presence and kind for declared parameters).
  public func number(_ name: String) -> Double {
    guard case .number(let x)? = global[name] else {
      preconditionFailure("parameter '\(name)' is not a resolved number")
    }
    return x
  }

  /// A per-model number.
  public func number(_ name: String, model: Int) -> Double {
    guard case .number(let x)? = models[model][name] else {
      preconditionFailure("parameter '\(name)' of model \(model) is not a resolved number")
    }
    return x
  }

  public func flag(_ name: String) -> Bool {
    guard case .flag(let b)? = global[name] else { preconditionFailure("parameter '\(name)' is not a resolved flag") }
    return b
  }

  public func text(_ name: String) -> String {
    guard case .text(let s)? = global[name] else { preconditionFailure("parameter '\(name)' is not resolved text") }
    return s
  }
}

/// Where a tensor sits in the layer stack, for gradients: layer `l` of `L` at `l / (L - 1)`
/// (1 when L = 1); tensors outside the layers (embeddings, final norm, head) at 0.
public struct LayerPositions: Sendable {
  public let layerCount: Int
  /// The index of the first layer counted (a mergekit slice's first output layer).
  public let firstLayer: Int

  /// Counts the layers from the tensor names (`...layers.N...`, `h.N`, `blocks.N`, `layer.N`).
  public init(names: [String]) {
    layerCount = names.compactMap(Self.layerIndex).max().map { $0 + 1 } ?? 0
    firstLayer = 0
  }

  /// Positions over `layerCount` layers starting at `firstLayer` (one mergekit slice).
  public init(layerCount: Int, firstLayer: Int = 0) {
    self.layerCount = layerCount
    self.firstLayer = firstLayer
  }

  /// Whether a tensor outside the layers comes after them (final norm, LM head, classifier) as
  /// mergekit's architectures order them: everything but the embeddings. mergekit evaluates
  /// gradients at 0 for the tensors before the layers and at 1 for those after.
  public static func isAfterLayers(_ name: String) -> Bool {
    let lower = name.lowercased()
    return !["embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type"].contains {
      lower.contains($0)
    }
  }

  /// Replaces the layer index in `name` (as `layerIndex` finds it) by `index`.
  public static func renumbered(_ name: String, to index: Int) -> String {
    var parts = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
    for i in parts.indices
    where i + 1 < parts.count && ["layers", "layer", "h", "blocks", "block"].contains(parts[i])
      && Int(parts[i + 1]) != nil
    {
      parts[i + 1] = String(index)
      return parts.joined(separator: ".")
    }
    return name
  }

  public static func layerIndex(_ name: String) -> Int? {
    let parts = name.split(separator: ".")
    for (i, part) in parts.enumerated()
    where i + 1 < parts.count && ["layers", "layer", "h", "blocks", "block"].contains(part) {
      if let n = Int(parts[i + 1]) { return n }
    }
    return nil
  }

  public func position(of name: String) -> Double {
    guard let l = Self.layerIndex(name) else { return Self.isAfterLayers(name) ? 1 : 0 }
    return layerCount <= 1 ? 1 : Double(l - firstLayer) / Double(layerCount - 1)
  }
}

/// Resolves a method's parameters per tensor from what the user gave, checking names, kinds and
/// bounds. Errors name the parameter, the model and the tensor.
public struct ParameterResolver: Sendable {
  public let specs: [ParameterSpec]
  public let global: [String: ParameterValue]
  public let models: [[String: ParameterValue]]
  public let positions: LayerPositions
  public let method: String

  /// `global` holds global parameters and also per-model ones meant for every model (as mergekit
  /// allows); `models[i]` overrides for model i.
  public init(
    method: String, specs: [ParameterSpec], global: [String: ParameterValue], models: [[String: ParameterValue]],
    positions: LayerPositions
  ) throws {
    self.method = method
    self.specs = specs
    self.global = global
    self.models = models
    self.positions = positions
    let known = Set(specs.map(\.name))
    for name in global.keys where !known.contains(name) {
      throw MergeError.unknownParameter(method: method, name: name, known: specs.map(\.name))
    }
    for (i, values) in models.enumerated() {
      for name in values.keys where !known.contains(name) {
        throw MergeError.unknownParameter(method: method, name: "\(name) (model \(i + 1))", known: specs.map(\.name))
      }
      for name in values.keys where specs.first(where: { $0.name == name })?.scope == .global {
        throw MergeError.invalidParameter(
          method: method, name: name, tensor: nil, reason: "is a global parameter; give it once, not per model")
      }
    }
  }

  /// Checks every given value and every required parameter without looking at tensors, so a
  /// bad value is refused before anything is read or written. This is complete for ranges:
  /// a gradient interpolates between its points, so when each point is in a (convex) range,
  /// every interpolated value is too; each filtered entry is checked on its own.
  public func checkValues() throws {
    for spec in specs {
      var checked: [(label: String, value: ParameterValue)] = []
      if let value = global[spec.name] { checked.append((spec.name, value)) }
      if spec.scope == .perModel {
        for (i, values) in models.enumerated() {
          if let value = values[spec.name] { checked.append(("\(spec.name) (model \(i + 1))", value)) }
        }
      }
      for (label, value) in checked { try Self.check(value, spec: spec, label: label, method: method) }
      guard spec.defaultValue == nil, !spec.isOptional, global[spec.name] == nil else { continue }
      if spec.scope == .global || models.isEmpty {
        throw MergeError.missingParameter(method: method, name: spec.name, help: spec.help)
      }
      let lacking = models.indices.filter { models[$0][spec.name] == nil }
      if lacking.count == models.count {
        throw MergeError.missingParameter(method: method, name: spec.name, help: spec.help)
      }
      if let first = lacking.first {
        throw MergeError.missingParameter(method: method, name: "\(spec.name) (model \(first + 1))", help: spec.help)
      }
    }
  }

  private static func check(_ value: ParameterValue, spec: ParameterSpec, label: String, method: String) throws {
    switch value {
    case .gradient(let points):
      guard !points.isEmpty else {
        throw MergeError.invalidParameter(method: method, name: label, tensor: nil, reason: "is an empty list")
      }
      for x in points { try check(.number(x), spec: spec, label: label, method: method) }
    case .filtered(let entries):
      for entry in entries { try check(entry.value, spec: spec, label: label, method: method) }
    default:
      _ = try Self.value(spec, given: value, method: method, tensor: nil, position: 0, label: label)
    }
  }

  /// The parameters for tensor `name`.
  public func resolve(tensor name: String) throws -> ResolvedParameters {
    var result = ResolvedParameters(models: Array(repeating: [:], count: models.count))
    let position = positions.position(of: name)
    for spec in specs {
      switch spec.scope {
      case .global:
        if spec.isOptional, global[spec.name] == nil { continue }
        result.global[spec.name] = try Self.value(
          spec, given: global[spec.name], method: method, tensor: name, position: position, label: spec.name)
      case .perModel:
        for i in models.indices {
          result.models[i][spec.name] = try Self.value(
            spec, given: models[i][spec.name] ?? global[spec.name], method: method, tensor: name, position: position,
            label: "\(spec.name) (model \(i + 1))")
        }
      }
    }
    return result
  }

  /// One parameter's value for a tensor (nil: checked without one), named `label` in errors.
  private static func value(
    _ spec: ParameterSpec, given: ParameterValue?, method: String, tensor: String?, position: Double, label: String
  ) throws -> ResolvedValue {
    func fail(_ reason: String) -> MergeError {
      .invalidParameter(method: method, name: label, tensor: tensor, reason: reason)
    }
    guard
      let given = try Self.select(given, tensor: tensor ?? "", position: position)
        ?? Self.select(spec.defaultValue, tensor: tensor ?? "", position: position)
    else {
      throw MergeError.missingParameter(method: method, name: label, help: spec.help)
    }
    switch (spec.kind, given) {
    case (.number(let range, let openBelow), .number(let x)):
      guard x.isFinite else { throw fail("\(x) is not a finite number") }
      guard range.contains(x), !(openBelow && x == range.lowerBound) else {
        throw fail("\(x.formatted()) is not \(spec.kind.summary)")
      }
      return .number(x)
    case (.flag, .flag(let b)): return .flag(b)
    case (.flag, .number(let x)) where x == 0 || x == 1: return .flag(x == 1)
    case (.choice(let options), .text(let s)):
      guard options.contains(s) else { throw fail("'\(s)' is not one of \(options.joined(separator: ", "))") }
      return .text(s)
    case (.pattern, .text(let s)):
      guard (try? Regex(s)) != nil else { throw fail("'\(s)' is not a valid regular expression") }
      return .text(s)
    default:
      throw fail("'\(given)' is not a valid \(spec.kind == .flag ? "true/false" : "value")")
    }
  }

  /// Picks the entry for `tensor` and interpolates gradients: a plain value.
  static func select(_ value: ParameterValue?, tensor: String, position: Double) throws -> ParameterValue? {
    switch value {
    case nil: return nil
    case .gradient(let xs):
      guard !xs.isEmpty else { return nil }
      if xs.count == 1 { return .number(xs[0]) }
      let x = position * Double(xs.count - 1)
      let i = min(Int(x.rounded(.down)), xs.count - 2)
      let fraction = x - Double(i)
      return .number(xs[i] * (1 - fraction) + xs[i + 1] * fraction)
    case .filtered(let entries):
      let match = entries.first { $0.filter.map { tensor.contains($0) } ?? false } ?? entries.first { $0.filter == nil }
      return try select(match?.value, tensor: tensor, position: position)
    case let plain?: return plain
    }
  }
}
