import Checkpoint
import Foundation
import Merge
import Tensor

/// `convert`: copies a checkpoint, selecting, dropping, renaming and casting tensors, streamed
/// by `copyCheckpoint` (recipes may hold the copy in memory). Its parameters are declared once
/// here; `mergekit convert` (flags) and the recipe step `convert` (step keys or parameters)
/// both resolve them through `resolve`, so they accept and refuse the same values.
public enum ConvertOperation {
  public static let name = "convert"
  public static let summary =
    "Copy a checkpoint to another format, dtype or sharding, optionally selecting, dropping or renaming tensors."
  public static let parameters: [ParameterSpec] = [
    .pattern("select", help: "keep only tensors whose name matches this regular expression"),
    .pattern("drop", help: "drop tensors whose name matches this regular expression"),
    .text("rename", help: "PATTERN=REPLACEMENT (regular expression, $1 for groups); several apply in order"),
    .text("dtype", help: "cast floating-point tensors to bf16, f16, f32 or f64 (round to nearest even)"),
    .text(
      "layers",
      help:
        "keep these layer ranges, stacked and renumbered: START-END (END excluded, as mergekit's layer_range), comma-separated, e.g. 0-8,4-12"
    ),
  ]

  /// The checked selection and cast.
  public struct Resolved: Sendable {
    public let selection: TensorSelection
    public let dtype: DType?
    /// Layer ranges to stack, when given.
    public var layers: [Range<Int>]? = nil
  }

  /// `0-8,4-12` as ranges (end excluded), or nil when the text is not such a list.
  public static func layerRanges(_ text: String) -> [Range<Int>]? {
    let ranges = text.split(separator: ",").map { part -> Range<Int>? in
      let bounds = part.trimmingCharacters(in: .whitespaces).split(separator: "-").compactMap { Int($0) }
      guard bounds.count == 2, bounds[0] >= 0, bounds[0] < bounds[1], bounds[1] <= 1 << 20 else { return nil }
      return bounds[0]..<bounds[1]
    }
    guard !ranges.isEmpty, ranges.allSatisfy({ $0 != nil }) else { return nil }
    return ranges.compactMap { $0 }
  }

  /// Checks the parameters (`renames` may hold several) and builds the selection. Throws
  /// `OperationError.invalidParameter` naming the parameter and its value.
  public static func resolve(
    select: String?, drop: String?, renames: [String], dtype: String?, layers: String? = nil
  ) throws -> Resolved {
    func fail(_ parameter: String, _ value: String, _ reason: String) -> OperationError {
      .invalidParameter(operation: name, name: parameter, value: value, reason: reason)
    }
    for (parameter, pattern) in [("select", select), ("drop", drop)] {
      if let pattern, (try? Regex(pattern)) == nil {
        throw fail(parameter, pattern, "is not a valid regular expression")
      }
    }
    for rename in renames {
      guard let equals = rename.firstIndex(of: "="), (try? Regex(String(rename[..<equals]))) != nil else {
        throw fail("rename", rename, "is not PATTERN=REPLACEMENT with a valid regular expression")
      }
    }
    let type = try dtype.map { text -> DType in
      guard let type = DType(userSpelling: text), type.isFloatingPoint else {
        throw fail("dtype", text, "is not bf16, f16, f32 or f64")
      }
      return type
    }
    let ranges = try layers.map { text -> [Range<Int>] in
      guard let ranges = layerRanges(text) else {
        throw fail("layers", text, "is not a list of START-END layer ranges (END excluded), e.g. 0-8,4-12")
      }
      return ranges
    }
    return Resolved(
      selection: try TensorSelection(select: select, drop: drop, renames: renames), dtype: type, layers: ranges)
  }

  /// `source` with only the layers of `ranges`, stacked in that order and renumbered from 0;
  /// the tensors before and after the layers (embeddings, final norm, head) stay.
  public static func stackingLayers(_ source: any Checkpoint, _ ranges: [Range<Int>]) throws -> any Checkpoint {
    var parts = [try LayerView(source, part: .before, layers: 0..<0, firstOutputLayer: 0)]
    var next = 0
    for range in ranges {
      parts.append(try LayerView(source, part: .layers, layers: range, firstOutputLayer: next))
      next += range.count
    }
    parts.append(try LayerView(source, part: .after, layers: 0..<0, firstOutputLayer: 0))
    return LayerStack(parts)
  }

  /// A model folder's config.json with `num_hidden_layers` and `layer_types` following `ranges`
  /// (nil when there is none): the config of the passthrough slices that stack the same ranges.
  public static func stackedConfig(of folder: String?, _ ranges: [Range<Int>]) throws -> Data? {
    guard let folder else { return nil }
    let slices = ranges.map { SlicedMerge.Slice(sources: [SlicedMerge.Source(model: folder, layers: $0)]) }
    return try SlicedMerge(method: PassthroughMerge(), base: nil, slices: slices, global: [:]).outputConfig { _ in
      try InputFile.jsonObject(folder + "/config.json")
    }
  }
}
