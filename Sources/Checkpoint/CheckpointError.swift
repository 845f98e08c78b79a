import Tensor

/// Everything that can go wrong reading or writing a checkpoint. Each case names the file (and the
/// tensor or chunk) and says what to do; none is a crash.
public enum CheckpointError: Error, CustomStringConvertible, Equatable {
  // I/O
  /// A file that cannot be opened or read.
  case cannotOpen(file: String, reason: String)
  /// An output that cannot be written (nothing is published).
  case cannotWrite(file: String, reason: String)
  /// The output exists and replacing it was not asked for.
  case outputExists(path: String)
  /// A path that is neither a checkpoint file nor a model folder.
  case notACheckpoint(path: String)
  /// A file of a format we do not read (a PyTorch pickle, a GGUF file), recognised by its first
  /// bytes: the format's name and what to do.
  case unsupportedFormat(file: String, format: String, advice: String)
  /// A PyTorch zip checkpoint that cannot be read safely, and why.
  case invalidPyTorch(file: String, reason: String)
  // safetensors
  /// A safetensors file shorter than its 8-byte header length.
  case fileTooShort(file: String, size: Int)
  /// A header length that runs past the end of the file.
  case headerLengthPastEnd(file: String, headerLength: UInt64, fileSize: Int)
  /// A header length above the 100 MB limit.
  case headerTooLarge(file: String, headerLength: UInt64)
  /// A header that is not UTF-8.
  case headerNotUTF8(file: String)
  /// A header that is not a JSON object.
  case headerNotJSON(file: String, reason: String)
  /// A tensor entry of the header that breaks a rule, and which.
  case invalidEntry(file: String, tensor: String, reason: String)
  /// A dtype the format does not define.
  case unknownDType(file: String, tensor: String, dtype: String)
  /// A tensor name given twice.
  case duplicateTensor(file: String, tensor: String)
  /// A shape with a negative or non-integer dimension.
  case invalidShape(file: String, tensor: String, shape: String)
  /// An element count or byte size past 64 bits.
  case sizeOverflow(file: String, tensor: String)
  /// Offsets that do not span the tensor's dtype and shape.
  case byteSizeMismatch(file: String, tensor: String, expected: Int, actual: Int)
  /// Two tensors whose bytes overlap.
  case overlappingTensors(file: String, tensor: String, previous: String)
  /// Unused bytes before a tensor.
  case gapBeforeTensor(file: String, tensor: String, gap: Int)
  /// A tensor ending past the data section.
  case tensorPastEnd(file: String, tensor: String, end: Int, dataSize: Int)
  /// Bytes after the last tensor.
  case trailingBytes(file: String, count: Int)
  /// A metadata value that is not a string.
  case metadataNotStrings(file: String, key: String)
  // folders and shards
  /// A shard index that breaks a rule, and which.
  case invalidIndex(file: String, reason: String)
  /// A shard the index lists that does not exist.
  case missingShard(index: String, shard: String)
  /// A tensor name the checkpoint does not have.
  case missingTensor(file: String, tensor: String)
  // compressed format
  /// A file without the .mkz magic bytes.
  case badMagic(file: String)
  /// An .mkz version this build does not read.
  case unsupportedVersion(file: String, version: UInt32)
  /// An .mkz footer missing or cut short.
  case truncatedFooter(file: String)
  /// An .mkz chunk index that breaks a rule, and which.
  case corruptChunkIndex(file: String, reason: String)
  /// A chunk whose bytes do not match its checksum.
  case chunkChecksumMismatch(file: String, tensor: String, chunk: Int)
  /// A zstd frame that does not decode.
  case corruptFrame(file: String, tensor: String, chunk: Int, reason: String)
  /// A chunk that decodes to the wrong number of bytes.
  case rawSizeMismatch(file: String, tensor: String, chunk: Int, expected: Int, actual: Int)
  /// A decoded tensor that does not match its digest.
  case tensorDigestMismatch(file: String, tensor: String)
  /// A delta-stored tensor read without its base.
  case deltaBaseMissing(file: String, tensor: String)
  /// A delta-stored tensor read with a base other than the one it was stored against.
  case deltaBaseMismatch(file: String, tensor: String, expected: String, actual: String)
  // requests
  /// Rows asked for past the tensor's end.
  case rowRangeOutOfBounds(file: String, tensor: String, rows: Range<Int>, available: Int)
  /// Tensors or bytes written out of the declared order or size.
  case writeOrder(file: String, reason: String)
  // surgery
  /// A selection or drop pattern that is not a regular expression.
  case invalidPattern(String)
  /// A rename that is not PATTERN=REPLACEMENT.
  case invalidRename(String)
  /// Two tensors renamed to the same name.
  case nameCollision(file: String, first: String, second: String, target: String)
  /// The selection keeps no tensor.
  case nothingSelected(file: String)
  // data files
  /// A data set (features, labels, token sequences) that cannot be used: the file and what is wrong.
  case badDataFile(file: String, reason: String)
  // hostile input
  /// An input that is a folder, FIFO, device or socket where a regular file is needed.
  case notARegularFile(file: String, kind: String)
  /// A file read whole that is larger than its kind ever needs to be.
  case fileTooLarge(file: String, size: Int, limit: Int)
  /// A text file (JSON, YAML, CSV) that is not valid UTF-8.
  case notUTF8(file: String)
  /// A Hugging Face id that is neither a local path nor in the local cache.
  case notCached(id: String, cache: String)
  /// An output that is, holds or lies inside one of the run's inputs.
  case outputIsInput(output: String, input: String)

  public var description: String {
    switch self {
    case .cannotOpen(let f, let r): return "\(f): cannot open: \(r)"
    case .cannotWrite(let f, let r): return "\(f): cannot write: \(r); nothing was published"
    case .outputExists(let p): return "\(p) already exists; choose another output or allow replacing it (overwrite)"
    case .notACheckpoint(let p):
      return
        "\(p): not a checkpoint (expected a .safetensors, .mkz or PyTorch .bin file, or a folder with model.safetensors, model.mkz, pytorch_model.bin or a *.index.json)"
    case .unsupportedFormat(let f, let format, let advice): return "\(f): \(format) is not supported yet; \(advice)"
    case .invalidPyTorch(let f, let reason): return "\(f): not a PyTorch state dict that can be read safely: \(reason)"
    case .fileTooShort(let f, let s):
      return "\(f): file is \(s) bytes, too short for a safetensors header (needs at least 8)"
    case .headerLengthPastEnd(let f, let n, let s):
      return "\(f): header length \(n) runs past the end of the \(s)-byte file (truncated or not safetensors)"
    case .headerTooLarge(let f, let n): return "\(f): header length \(n) exceeds the 100,000,000-byte limit"
    case .headerNotUTF8(let f): return "\(f): header is not valid UTF-8"
    case .headerNotJSON(let f, let r): return "\(f): header is not a JSON object: \(r)"
    case .invalidEntry(let f, let t, let r): return "\(f): tensor '\(t)': \(r)"
    case .unknownDType(let f, let t, let d):
      return
        "\(f): tensor '\(t)' has unknown dtype '\(d)' (known: \(DType.allCases.map(\.rawValue).joined(separator: ", ")))"
    case .duplicateTensor(let f, let t): return "\(f): tensor '\(t)' appears more than once"
    case .invalidShape(let f, let t, let s):
      return "\(f): tensor '\(t)' has an invalid shape \(s) (dimensions must be non-negative integers)"
    case .sizeOverflow(let f, let t):
      return "\(f): tensor '\(t)': element count or byte size overflows a 64-bit integer"
    case .byteSizeMismatch(let f, let t, let e, let a):
      return "\(f): tensor '\(t)' needs \(e) bytes for its dtype and shape but its offsets span \(a)"
    case .overlappingTensors(let f, let t, let p): return "\(f): tensor '\(t)' overlaps tensor '\(p)'"
    case .gapBeforeTensor(let f, let t, let g):
      return "\(f): \(g) unused bytes before tensor '\(t)' (offsets must be contiguous from 0)"
    case .tensorPastEnd(let f, let t, let e, let s):
      return "\(f): tensor '\(t)' ends at byte \(e) of a \(s)-byte data section (file truncated?)"
    case .trailingBytes(let f, let n):
      return "\(f): \(n) bytes after the last tensor (data must end exactly at the end of the file)"
    case .metadataNotStrings(let f, let k):
      return "\(f): __metadata__ entry '\(k)' is not a string (safetensors metadata maps strings to strings)"
    case .invalidIndex(let f, let r): return "\(f): invalid shard index: \(r)"
    case .missingShard(let i, let s): return "\(i): shard '\(s)' listed in the index does not exist"
    case .missingTensor(let f, let t): return "\(f): no tensor named '\(t)'"
    case .badMagic(let f): return "\(f): not a mergekit compressed checkpoint (bad magic bytes)"
    case .unsupportedVersion(let f, let v):
      return "\(f): format version \(v) is not supported by this mergekit (supports 1); upgrade mergekit"
    case .truncatedFooter(let f): return "\(f): footer missing or truncated (the file is incomplete)"
    case .corruptChunkIndex(let f, let r): return "\(f): chunk index is corrupt: \(r)"
    case .chunkChecksumMismatch(let f, let t, let c):
      return "\(f): tensor '\(t)' chunk \(c): checksum mismatch (data corrupted)"
    case .corruptFrame(let f, let t, let c, let r): return "\(f): tensor '\(t)' chunk \(c): zstd frame is corrupt: \(r)"
    case .rawSizeMismatch(let f, let t, let c, let e, let a):
      return "\(f): tensor '\(t)' chunk \(c): decoded to \(a) bytes, expected \(e)"
    case .tensorDigestMismatch(let f, let t): return "\(f): tensor '\(t)': decoded bytes do not match the stored digest"
    case .deltaBaseMissing(let f, let t):
      return "\(f): tensor '\(t)' is stored as a delta against a base checkpoint; give that base checkpoint (base)"
    case .deltaBaseMismatch(let f, let t, let e, let a):
      return
        "\(f): tensor '\(t)' was stored against a base tensor with digest \(e), but the given base has \(a); pass the original base"
    case .rowRangeOutOfBounds(let f, let t, let r, let n):
      return "\(f): tensor '\(t)': rows \(r.lowerBound)..<\(r.upperBound) out of bounds (it has \(n) rows)"
    case .writeOrder(let f, let r): return "\(f): \(r)"
    case .invalidPattern(let p): return "'\(p)' is not a valid regular expression"
    case .invalidRename(let r): return "rename '\(r)' must have the form PATTERN=REPLACEMENT"
    case .nameCollision(let f, let a, let b, let t):
      return "\(f): tensors '\(a)' and '\(b)' would both be named '\(t)'; adjust the renames"
    case .nothingSelected(let f): return "\(f): the selection keeps no tensor; check select and drop"
    case .badDataFile(let f, let r): return "\(f): \(r)"
    case .notARegularFile(let f, let k): return "\(f): is \(k), not a regular file; pass the file itself"
    case .fileTooLarge(let f, let s, let l):
      return "\(f): \(s) bytes is more than the \(l)-byte limit for this kind of file"
    case .notUTF8(let f): return "\(f): not valid UTF-8 text"
    case .notCached(let id, let cache):
      return
        "'\(id)' is not a local path and the Hugging Face cache (\(cache)) does not hold it; download it first "
        + "(`hf download \(id)` or `huggingface-cli download \(id)`), or give the model's folder; nothing is fetched from the network"
    case .outputIsInput(let o, let i):
      return o == i
        ? "the output '\(o)' is also an input; write it elsewhere (an output replaces its path when it is done)"
        : "the output '\(o)' overlaps the input '\(i)'; write it elsewhere (an output replaces its path when it is done)"
    }
  }
}
