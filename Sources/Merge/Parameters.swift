import Foundation

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
    case .number(let x): return x.formatted()
    case .flag(let b): return String(b)
    case .text(let s): return s
    case .gradient(let xs): return "[" + xs.map { $0.formatted() }.joined(separator: ", ") + "]"
    case .filtered(let entries): return "[" + entries.map { "{filter: \($0.filter ?? "*"), value: \($0.value)}" }.joined(separator: ", ") + "]"
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
    } else if trimmed.contains(","), case let parts = trimmed.split(separator: ",").compactMap({ Double($0.trimmingCharacters(in: .whitespaces)) }),
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
    case flag
    case choice([String])
  }

  public let name: String
  public let scope: Scope
  public let kind: Kind
  public let defaultValue: ParameterValue?
  /// Without a default: true leaves the parameter out when not given (the method derives it),
  /// false makes it required.
  public let isOptional: Bool
  public let help: String

  public init(_ name: String, _ scope: Scope, _ kind: Kind, default defaultValue: ParameterValue?, optional: Bool = false, help: String) {
    self.name = name
    self.scope = scope
    self.kind = kind
    self.defaultValue = defaultValue
    self.isOptional = optional
    self.help = help
  }

  public static let anyNumber = -Double.greatestFiniteMagnitude...Double.greatestFiniteMagnitude

  public static func number(_ name: String, _ scope: Scope, in range: ClosedRange<Double> = anyNumber, openBelow: Bool = false, default value: Double?, optional: Bool = false, help: String) -> ParameterSpec {
    ParameterSpec(name, scope, .number(range: range, openBelow: openBelow), default: value.map(ParameterValue.number), optional: optional, help: help)
  }

  public static func flag(_ name: String, default value: Bool, help: String) -> ParameterSpec {
    ParameterSpec(name, .global, .flag, default: .flag(value), help: help)
  }

  public static func choice(_ name: String, _ options: [String], default value: String, help: String) -> ParameterSpec {
    ParameterSpec(name, .global, .choice(options), default: .text(value), help: help)
  }
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
    guard case .number(let x)? = global[name] else { preconditionFailure("parameter '\(name)' is not a resolved number") }
    return x
  }

  /// A per-model number.
  public func number(_ name: String, model: Int) -> Double {
    guard case .number(let x)? = models[model][name] else { preconditionFailure("parameter '\(name)' of model \(model) is not a resolved number") }
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

  /// Counts the layers from the tensor names (`...layers.N...`, `h.N`, `blocks.N`, `layer.N`).
  public init(names: [String]) {
    layerCount = names.compactMap(Self.layerIndex).max().map { $0 + 1 } ?? 0
  }

  public init(layerCount: Int) { self.layerCount = layerCount }

  public static func layerIndex(_ name: String) -> Int? {
    let parts = name.split(separator: ".")
    for (i, part) in parts.enumerated() where i + 1 < parts.count && ["layers", "layer", "h", "blocks", "block"].contains(part) {
      if let n = Int(parts[i + 1]) { return n }
    }
    return nil
  }

  public func position(of name: String) -> Double {
    guard let l = Self.layerIndex(name) else { return 0 }
    return layerCount <= 1 ? 1 : Double(l) / Double(layerCount - 1)
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
  public init(method: String, specs: [ParameterSpec], global: [String: ParameterValue], models: [[String: ParameterValue]], positions: LayerPositions) throws {
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
        throw MergeError.invalidParameter(method: method, name: name, tensor: nil, reason: "is a global parameter; give it once, not per model")
      }
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
        result.global[spec.name] = try value(spec, given: global[spec.name], model: nil, tensor: name, position: position)
      case .perModel:
        for i in models.indices {
          result.models[i][spec.name] = try value(spec, given: models[i][spec.name] ?? global[spec.name], model: i, tensor: name, position: position)
        }
      }
    }
    return result
  }

  private func value(_ spec: ParameterSpec, given: ParameterValue?, model: Int?, tensor: String, position: Double) throws -> ResolvedValue {
    let label = model.map { "\(spec.name) (model \($0 + 1))" } ?? spec.name
    func fail(_ reason: String) -> MergeError { .invalidParameter(method: method, name: label, tensor: tensor, reason: reason) }
    guard let given = try Self.select(given, tensor: tensor, position: position) ?? Self.select(spec.defaultValue, tensor: tensor, position: position) else {
      throw MergeError.missingParameter(method: method, name: label, help: spec.help)
    }
    switch (spec.kind, given) {
    case (.number(let range, let openBelow), .number(let x)):
      guard x.isFinite, range.contains(x), !(openBelow && x == range.lowerBound) else {
        throw fail("\(x.formatted()) is outside \(openBelow ? "(" : "[")\(range.lowerBound.formatted()), \(range.upperBound.formatted())]")
      }
      return .number(x)
    case (.flag, .flag(let b)): return .flag(b)
    case (.flag, .number(let x)) where x == 0 || x == 1: return .flag(x == 1)
    case (.choice(let options), .text(let s)):
      guard options.contains(s) else { throw fail("'\(s)' is not one of \(options.joined(separator: ", "))") }
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
