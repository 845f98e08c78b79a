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
  ]

  /// The checked selection and cast.
  public struct Resolved: Sendable {
    public let selection: TensorSelection
    public let dtype: DType?
  }

  /// Checks the parameters (`renames` may hold several) and builds the selection. Throws
  /// `OperationError.invalidParameter` naming the parameter and its value.
  public static func resolve(select: String?, drop: String?, renames: [String], dtype: String?) throws -> Resolved {
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
    return Resolved(selection: try TensorSelection(select: select, drop: drop, renames: renames), dtype: type)
  }
}
