import Foundation

/// A decoder's rotary position embedding, as transformers computes it from config.json
/// (`rope_parameters` in transformers 5, `rope_scaling` with a top-level `rope_theta` in 4):
/// the inverse frequency of every feature pair of a head, and a factor on cos and sin (yarn's
/// attention factor, 1 otherwise).
public struct Rotary: Equatable, Sendable {
  public enum Kind: String, Sendable, CaseIterable {
    /// `theta^(-2i/d)`.
    case `default`
    /// Every frequency divided by `factor` (position interpolation).
    case linear
    /// NTK-aware scaling whose base grows with the batch's length beyond `max_position_embeddings`.
    case dynamic
    /// YaRN: interpolation for low frequencies, extrapolation for high ones, a linear ramp between,
    /// and an attention factor on cos and sin.
    case yarn
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, smoothed between.
    case llama3
  }

  public var kind: Kind
  /// The base (`rope_theta`).
  public var theta: Double
  public var factor: Double
  /// `max_position_embeddings` (dynamic scaling's reference length).
  public var maxPositions: Int
  /// `original_max_position_embeddings` (yarn, llama3).
  public var originalMaxPositions: Int
  /// llama3's `low_freq_factor` and `high_freq_factor`.
  public var lowFrequencyFactor: Double
  public var highFrequencyFactor: Double
  /// yarn's `beta_fast`, `beta_slow`, `truncate`.
  public var betaFast: Double
  public var betaSlow: Double
  public var truncate: Bool
  /// The factor on cos and sin (yarn; 1 for the others).
  public var attentionFactor: Double

  /// The default rotary embedding with base `theta`.
  public init(theta: Double) {
    (kind, self.theta, factor, maxPositions, originalMaxPositions) = (.default, theta, 1, 2048, 2048)
    (lowFrequencyFactor, highFrequencyFactor, betaFast, betaSlow, truncate, attentionFactor) = (1, 4, 32, 1, true, 1)
  }

  /// Reads the rotary keys of a decoder config. `rope_scaling` takes precedence over
  /// `rope_parameters` (as in transformers); the base comes from the object's `rope_theta`,
  /// else the top-level one, else 10000. Types other than the five supported ones, per-layer-type
  /// parameters and `partial_rotary_factor` below 1 with a scaled type are refused, naming the key.
  init(_ keys: ConfigKeys, maxPositions: Int) throws {
    let parameters = try keys.object("rope_scaling") ?? keys.object("rope_parameters")
    let topTheta = try keys.double("rope_theta", default: 10_000, exclusive: true)
    self.init(theta: try parameters?.double("rope_theta", default: topTheta, exclusive: true) ?? topTheta)
    self.maxPositions = maxPositions
    guard let p = parameters else { return }
    if let nested = p.values.first(where: { $0.value is [String: Any] }) {
      throw NetsError.invalidConfig(
        key: p.name(nested.key),
        reason: "rotary parameters per layer type are not supported (they belong to Gemma-style models)")
    }
    let typeName = try p.string("rope_type") ?? p.string("type") ?? "default"
    guard let kind = Kind(rawValue: typeName) else {
      throw NetsError.invalidConfig(
        key: p.name(p.present("rope_type") != nil ? "rope_type" : "type"),
        reason:
          "rotary type '\(typeName)' is not supported (supported: \(Kind.allCases.map(\.rawValue).joined(separator: ", ")))"
      )
    }
    self.kind = kind
    guard kind != .default else { return }
    let partial = try p.optionalDouble("partial_rotary_factor") ?? keys.optionalDouble("partial_rotary_factor") ?? 1
    guard partial == 1 else {
      throw NetsError.invalidConfig(
        key: "partial_rotary_factor",
        reason: "a rotary fraction of \(partial) with '\(typeName)' scaling is not supported")
    }
    // transformers sets original_max_position_embeddings from the top-level key when there is one.
    originalMaxPositions =
      try keys.optionalInt("original_max_position_embeddings") ?? p.optionalInt("original_max_position_embeddings")
      ?? maxPositions
    let given = try p.optionalDouble("factor", minimum: 0, exclusive: true)
    switch kind {
    case .default: return
    case .linear, .dynamic, .llama3:
      guard let given else { throw NetsError.missingConfigKey(p.name("factor")) }
      factor = given
    case .yarn:
      factor = given ?? Double(maxPositions) / Double(originalMaxPositions)
    }
    if kind == .llama3 {
      guard let low = try p.optionalDouble("low_freq_factor", exclusive: true) else {
        throw NetsError.missingConfigKey(p.name("low_freq_factor"))
      }
      guard let high = try p.optionalDouble("high_freq_factor", exclusive: true) else {
        throw NetsError.missingConfigKey(p.name("high_freq_factor"))
      }
      (lowFrequencyFactor, highFrequencyFactor) = (low, high)
      guard highFrequencyFactor != lowFrequencyFactor else {
        throw NetsError.invalidConfig(key: p.name("high_freq_factor"), reason: "equals low_freq_factor")
      }
    }
    if kind == .yarn {
      // `or 32` / `or 1` in transformers: 0 and null take the default.
      betaFast = try p.optionalDouble("beta_fast").flatMap { $0 == 0 ? nil : $0 } ?? 32
      betaSlow = try p.optionalDouble("beta_slow").flatMap { $0 == 0 ? nil : $0 } ?? 1
      truncate = try p.flag("truncate", default: true)
      func mscale(_ scale: Double, _ m: Double = 1) -> Double { scale <= 1 ? 1 : 0.1 * m * Foundation.log(scale) + 1 }
      if let given = try p.optionalDouble("attention_factor") {
        attentionFactor = given
      } else if let m = try p.optionalDouble("mscale"), let all = try p.optionalDouble("mscale_all_dim"), m != 0,
        all != 0
      {
        attentionFactor = mscale(factor, m) / mscale(factor, all)
      } else {
        attentionFactor = mscale(factor)
      }
    }
  }

  /// The inverse frequency of each of the `d / 2` feature pairs of a head of width `d`, for a
  /// batch whose positions run below `length` (only dynamic scaling depends on it).
  public func inverseFrequencies(dimension d: Int, length: Int) -> [Double] {
    let half = d / 2
    func plain(_ base: Double) -> [Double] { (0..<half).map { 1 / Foundation.pow(base, Double(2 * $0) / Double(d)) } }
    switch kind {
    case .default:
      return plain(theta)
    case .linear:
      return plain(theta).map { $0 / factor }
    case .dynamic:
      let length = Double(max(length, maxPositions))
      let base =
        theta * Foundation.pow(factor * length / Double(maxPositions) - (factor - 1), Double(d) / Double(d - 2))
      return plain(base)
    case .llama3:
      let old = Double(originalMaxPositions)
      let (lowWavelength, highWavelength) = (old / lowFrequencyFactor, old / highFrequencyFactor)
      return plain(theta).map { f in
        let wavelength = 2 * Double.pi / f
        if wavelength < highWavelength { return f }
        if wavelength > lowWavelength { return f / factor }
        let smooth = (old / wavelength - lowFrequencyFactor) / (highFrequencyFactor - lowFrequencyFactor)
        return (1 - smooth) * f / factor + smooth * f
      }
    case .yarn:
      func correction(_ rotations: Double) -> Double {
        Double(d) * Foundation.log(Double(originalMaxPositions) / (rotations * 2 * Double.pi))
          / (2 * Foundation.log(theta))
      }
      var (low, high) = (correction(betaFast), correction(betaSlow))
      if truncate { (low, high) = (low.rounded(.down), high.rounded(.up)) }
      (low, high) = (max(low, 0), min(high, Double(d - 1)))
      if low == high { high += 0.001 }
      return plain(theta).enumerated().map { i, f in
        let ramp = min(max((Double(i) - low) / (high - low), 0), 1)
        let extrapolation = 1 - ramp
        return f / factor * (1 - extrapolation) + f * extrapolation
      }
    }
  }
}
