import Foundation
import Tensor

/// mergekit's `model+adapter` references: a base model with a PEFT LoRA adapter applied on the
/// fly. The adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or a
/// PyTorch `adapter_model.bin`); each targeted weight reads as `W + s B A` (transposed for
/// `fan_in_fan_out` layers), with `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA) and the
/// per-module `rank_pattern`/`alpha_pattern`; saved modules (`modules_to_save`, biases) replace
/// the base's tensors. Computed in Float, one tensor at a time, and stored in the base's dtype.
public enum LoRAReference {
  /// The base and adapter of `given` when it is not a path itself but `base+adapter` with both
  /// parts present (as paths or cached Hub ids); split at the last `+` that works.
  public static func split(_ given: String) -> (base: String, adapter: String)? {
    guard given.contains("+"), !FileManager.default.fileExists(atPath: given) else { return nil }
    var index = given.endIndex
    while let plus = given[..<index].lastIndex(of: "+") {
      let (base, adapter) = (String(given[..<plus]), String(given[given.index(after: plus)...]))
      if !base.isEmpty, !adapter.isEmpty, HubCache.exists(base), HubCache.exists(adapter) { return (base, adapter) }
      index = plus
    }
    return nil
  }
}

/// A base checkpoint with a LoRA adapter applied (see `LoRAReference`).
public final class LoRAAppliedCheckpoint: Checkpoint, @unchecked Sendable {
  struct Update {
    var a: String
    var b: String
    var scale: Float
  }

  public let path: String
  public var tensors: [TensorInfo] { base.tensors }
  public var metadata: [String: String] { base.metadata }
  public var files: [StoredFile] { base.files }
  let base: any Checkpoint
  let adapter: any Checkpoint
  let fanInFanOut: Bool
  /// Per base weight name: the factors that update it.
  let updates: [ExactName: Update]
  /// Per base tensor name: the adapter tensor that replaces it.
  let replacements: [ExactName: String]

  /// Applies the adapter in folder `adapterPath` to `base`. Throws `CheckpointError.invalidEntry`
  /// or `cannotOpen` naming the adapter for what PEFT does not save as plain LoRA (DoRA,
  /// embedding LoRA), a factor pair that does not fit its weight, or a module the base lacks.
  public init(base: any Checkpoint, adapterPath given: String) throws {
    let adapterPath = try HubCache.resolve(given)
    self.base = base
    path = base.path + "+" + adapterPath
    let configPath = adapterPath + "/adapter_config.json"
    guard let config = try InputFile.jsonObject(configPath) else {
      throw CheckpointError.cannotOpen(file: configPath, reason: "a LoRA adapter folder needs adapter_config.json")
    }
    func fail(_ reason: String) -> CheckpointError { .invalidEntry(file: configPath, tensor: "", reason: reason) }
    guard (config["peft_type"] as? String ?? "LORA") == "LORA" else {
      throw fail("peft_type \(config["peft_type"] ?? "") is not LORA")
    }
    if config["use_dora"] as? Bool == true { throw fail("DoRA adapters (use_dora) are not applied yet") }
    let weights = ["adapter_model.safetensors", "adapter_model.bin"].map { adapterPath + "/" + $0 }
    guard let file = weights.first(where: InputFile.isRegularFile) else {
      throw CheckpointError.cannotOpen(file: adapterPath, reason: "no adapter_model.safetensors or adapter_model.bin")
    }
    adapter = try openCheckpoint(file)
    fanInFanOut = config["fan_in_fan_out"] as? Bool ?? false
    let alpha = (config["lora_alpha"] as? NSNumber)?.doubleValue ?? 8
    let rsLoRA = config["use_rslora"] as? Bool ?? false
    let alphaPattern = (config["alpha_pattern"] as? [String: Any]) ?? [:]
    let prefix = "base_model.model."
    var updates: [ExactName: Update] = [:]
    var replacements: [ExactName: String] = [:]
    for info in adapter.tensors {
      guard info.name.hasPrefix(prefix) else {
        throw CheckpointError.invalidEntry(
          file: file, tensor: info.name, reason: "is not a PEFT adapter tensor (base_model.model.<module> ...)")
      }
      let inner = String(info.name.dropFirst(prefix.count))
      if inner.contains("lora_embedding_") || inner.contains("lora_magnitude") {
        throw CheckpointError.invalidEntry(
          file: file, tensor: info.name, reason: "embedding LoRA and DoRA are not applied yet")
      }
      guard inner.hasSuffix(".lora_A.weight") else {
        if !inner.hasSuffix(".lora_B.weight") {
          guard let target = base.lookup(inner), target.shape == info.shape else {
            throw CheckpointError.invalidEntry(
              file: file, tensor: info.name, reason: "replaces \(inner), which the base lacks or holds in another shape"
            )
          }
          replacements[ExactName(inner)] = info.name
        }
        continue
      }
      let module = String(inner.dropLast(".lora_A.weight".count))
      let bName = prefix + module + ".lora_B.weight"
      guard let b = adapter.lookup(bName), let target = base.lookup(module + ".weight"), target.shape.count == 2,
        info.shape.count == 2, b.shape.count == 2, b.shape[1] == info.shape[0]
      else {
        throw CheckpointError.invalidEntry(
          file: file, tensor: info.name,
          reason: "has no lora_B partner, or the base has no 2-D weight \(module).weight to apply it to")
      }
      let (out, input) = fanInFanOut ? (target.shape[1], target.shape[0]) : (target.shape[0], target.shape[1])
      guard b.shape[0] == out, info.shape[1] == input else {
        throw CheckpointError.invalidEntry(
          file: file, tensor: info.name,
          reason:
            "B \(b.shape) x A \(info.shape) does not fit \(module).weight \(target.shape)\(fanInFanOut ? " (fan_in_fan_out)" : "")"
        )
      }
      let rank = Double(info.shape[0])
      let moduleAlpha = Self.patternValue(alphaPattern, module: module) ?? alpha
      let scale = rsLoRA ? moduleAlpha / rank.squareRoot() : moduleAlpha / rank
      updates[ExactName(module + ".weight")] = Update(a: info.name, b: bName, scale: Float(scale))
    }
    guard !updates.isEmpty || !replacements.isEmpty else { throw fail("the adapter changes nothing") }
    self.updates = updates
    self.replacements = replacements
  }

  /// The value a PEFT pattern map gives `module`: a key matches the module's full name or a
  /// dotted suffix of it (PEFT's `(.*\.)?key$`).
  static func patternValue(_ pattern: [String: Any], module: String) -> Double? {
    for (key, value) in pattern.sorted(by: { $0.key.count > $1.key.count })
    where module == key || module.hasSuffix("." + key) {
      return (value as? NSNumber)?.doubleValue
    }
    return nil
  }

  public func lookup(_ name: String) -> TensorInfo? { base.lookup(name) }
  public func file(of name: String) -> String? { base.file(of: name) }
  public func release(_ name: String, range: Range<Int>?) { base.release(name, range: range) }
  public func verify(progress: ((Int, Int) -> Void)?) throws {
    try base.verify(progress: progress)
    try adapter.verify(progress: nil)
  }

  public func withBytes<R>(of name: String, range: Range<Int>?, _ body: (UnsafeRawBufferPointer) throws -> R) throws
    -> R
  {
    let key = ExactName(name)
    if let replacement = replacements[key] {
      let info = try base.info(name)
      let data = try adapter.read(replacement)
      let bytes = data.dtype == info.dtype ? data.bytes : data.cast(to: info.dtype).bytes
      return try bytes.withUnsafeBytes { raw in
        guard let range else { return try body(raw) }
        return try body(UnsafeRawBufferPointer(rebasing: raw[range]))
      }
    }
    guard let update = updates[key] else { return try base.withBytes(of: name, range: range, body) }
    let info = try base.info(name)
    // Only the rows that hold the range: base rows plus scale times the same rows of B A (of
    // (B A)ᵀ with fan_in_fan_out), so a streaming merge forms each row once, not the whole
    // product for every range.
    let columns = info.shape.count == 2 ? info.shape[1] : 1
    let rowBytes = columns * info.dtype.size
    let bytes = range ?? 0..<info.byteCount
    guard !bytes.isEmpty, rowBytes > 0 else { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
    let rows = (bytes.lowerBound / rowBytes)..<((bytes.upperBound - 1) / rowBytes + 1)
    var weight = try base.readRows(name, rows).decoded()
    let (a, b) = (try adapter.tensor(named: update.a), try adapter.tensor(named: update.b))
    // B A is out x in; with fan_in_fan_out the weight is its transpose, rows of Aᵀ Bᵀ.
    let product =
      fanInFanOut
      ? BLAS.matmul(a.columns(rows), b, transposeA: true, transposeB: true)
      : BLAS.matmul(b.rows(rows), a)
    for i in weight.scalars.indices { weight.scalars[i] += update.scale * product.scalars[i] }
    let encoded = weight.encoded(as: info.dtype).bytes
    return try encoded.withUnsafeBytes { raw in
      let start = bytes.lowerBound - rows.lowerBound * rowBytes
      return try body(UnsafeRawBufferPointer(rebasing: raw[start..<(start + bytes.count)]))
    }
  }
}
