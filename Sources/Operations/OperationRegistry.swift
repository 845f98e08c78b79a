import Merge

/// Every operation that is not a tensor-wise merge, registered once (`convert`, a streamed copy
/// rather than a merge, declares its parameters in `ConvertOperation`). The CLI makes one command
/// per entry (flags and help from its specs) and recipes find steps here; merge methods are in
/// `MergeRegistry` and run through `MergeRunner` (`mergekit merge`, recipe `method: ties`).
public enum OperationRegistry {
  public static let operations: [any MergekitOperation] = [
    SyntheticDataOperation(),
    SyntheticTokensOperation(),
    TrainOperation(),
    EvalOperation(),
    StatsOperation(),
    ZipOperation(),
    ATLASLearnOperation(),
    PELAOperation(),
    ExtractLoRAOperation(),
    MKVOperation(),
  ]

  /// The operations that stream checkpoints through `MergeRunner`: task-vector, apply,
  /// atlas-apply, and every merge method of `MergeRegistry`.
  public static let streamed: [StreamedOperation] =
    [.taskVector, .apply, .atlasApply] + MergeRegistry.methods.map(StreamedOperation.merge)

  /// The streamed operation called `name` (mergekit's spellings such as `dare_ties` too).
  public static func streamed(named name: String) -> StreamedOperation? {
    let key = name.lowercased().replacingOccurrences(of: "_", with: "-")
    return streamed.first { $0.name == key }
  }

  /// The operation called `name` (or one of its aliases); nil when there is none.
  public static func operation(named name: String) -> (any MergekitOperation)? {
    let key = name.lowercased().replacingOccurrences(of: "_", with: "-")
    return operations.first { $0.name == key || $0.aliases.contains(key) }
  }
}
