/// Element types of stored tensors, spelled exactly as safetensors spells them.
///
/// A `DType` matters only at I/O: maths runs on `Float`. Narrowing conversions round to nearest
/// even and keep NaN (with its high payload bits), infinities and subnormals.
public enum DType: String, CaseIterable, Sendable, Codable {
  case f64 = "F64"
  case f32 = "F32"
  case f16 = "F16"
  case bf16 = "BF16"
  case f8E4M3 = "F8_E4M3"
  case f8E5M2 = "F8_E5M2"
  case i64 = "I64"
  case i32 = "I32"
  case i16 = "I16"
  case i8 = "I8"
  case u64 = "U64"
  case u32 = "U32"
  case u16 = "U16"
  case u8 = "U8"
  case bool = "BOOL"

  /// Bytes per element.
  public var size: Int {
    switch self {
    case .f64, .i64, .u64: return 8
    case .f32, .i32, .u32: return 4
    case .f16, .bf16, .i16, .u16: return 2
    case .f8E4M3, .f8E5M2, .i8, .u8, .bool: return 1
    }
  }

  /// True for the floating-point types (the ones `--dtype` casts and merges average).
  public var isFloatingPoint: Bool {
    switch self {
    case .f64, .f32, .f16, .bf16, .f8E4M3, .f8E5M2: return true
    default: return false
    }
  }

  /// Parses a user-facing spelling: `bf16`, `BF16`, `float16`, `fp32`, `bfloat16`, ...
  public init?(userSpelling text: String) {
    let key = text.lowercased()
    let aliases: [String: DType] = [
      "f32": .f32, "fp32": .f32, "float32": .f32, "float": .f32,
      "f16": .f16, "fp16": .f16, "float16": .f16, "half": .f16,
      "bf16": .bf16, "bfloat16": .bf16,
      "f64": .f64, "fp64": .f64, "float64": .f64, "double": .f64,
    ]
    if let known = aliases[key] {
      self = known
    } else if let exact = DType(rawValue: text.uppercased()) {
      self = exact
    } else {
      return nil
    }
  }
}

extension DType {
  /// PyTorch's name of the dtype, as config.json's `torch_dtype` spells it (nil for the 8-bit
  /// floats and types transformers does not record).
  public var torchName: String? {
    switch self {
    case .f64: return "float64"
    case .f32: return "float32"
    case .f16: return "float16"
    case .bf16: return "bfloat16"
    default: return nil
    }
  }
}
