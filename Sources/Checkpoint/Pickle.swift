import Foundation
import Tensor

/// A restricted reader of the pickles `torch.save` writes for a state dict. It runs a small
/// pickle machine that builds values and never executes anything: only the opcodes a state
/// dict uses are known, and only these globals may be named: `collections.OrderedDict`,
/// `torch._utils._rebuild_tensor_v2` (and `_rebuild_parameter` around it) and the typed
/// storage classes. Any other global is refused by name, before anything else is read.
/// Every length is checked against the bytes left, so a hostile pickle ends in an error.
enum Pickle {
  /// A tensor as the pickle describes it: a view into storage `key` of the archive.
  struct TensorReference: Equatable {
    var storage: String
    var dtype: DType
    var storageElements: Int
    var offset: Int
    var shape: [Int]
    var strides: [Int]
  }

  /// The values the machine builds.
  indirect enum Value {
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case bytes([UInt8])
    case tuple([Value])
    case list(Box<[Value]>)
    case dict(Box<[(key: Value, value: Value)]>)
    case global(module: String, name: String)
    case storage(key: String, dtype: DType, elements: Int)
    case tensor(TensorReference)
    case mark

    var text: String? { if case .string(let s) = self { return s } else { return nil } }
    var integer: Int? { if case .int(let n) = self { return n } else { return nil } }
  }

  /// A mutable container the machine appends to (lists and dicts are shared by reference).
  final class Box<T> {
    var value: T
    init(_ value: T) { self.value = value }
  }

  /// The typed storages of a state dict and their element types.
  static let storages: [String: DType] = [
    "FloatStorage": .f32, "HalfStorage": .f16, "BFloat16Storage": .bf16, "DoubleStorage": .f64,
    "LongStorage": .i64, "IntStorage": .i32, "ShortStorage": .i16, "CharStorage": .i8, "ByteStorage": .u8,
    "BoolStorage": .bool,
  ]

  /// The globals a state dict may name.
  static func isAllowed(module: String, name: String) -> Bool {
    switch (module, name) {
    case ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
      ("torch._utils", "_rebuild_parameter"):
      return true
    case ("torch", let storage): return storages[storage] != nil
    default: return false
    }
  }

  enum Failure: Error { case invalid(String) }

  /// Runs the pickle in `bytes` and returns its top-level value. Throws `Failure.invalid` with
  /// the reason for anything outside a state dict's pickles.
  static func load(_ bytes: UnsafeRawBufferPointer) throws -> Value {
    var machine = Machine(bytes: bytes)
    return try machine.run()
  }

  struct Machine {
    let bytes: UnsafeRawBufferPointer
    var position = 0
    var stack: [Value] = []
    var marks: [Int] = []
    var memo: [Int: Value] = [:]

    init(bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    func fail(_ reason: String) -> Failure { .invalid(reason) }

    mutating func take(_ count: Int) throws -> UnsafeRawBufferPointer {
      guard count >= 0, count <= bytes.count - position else {
        throw fail("ends inside an instruction at byte \(position)")
      }
      defer { position += count }
      return UnsafeRawBufferPointer(rebasing: bytes[position..<(position + count)])
    }

    mutating func byte() throws -> UInt8 { try take(1)[0] }

    mutating func unsigned(_ count: Int) throws -> Int {
      let raw = try take(count)
      var value: UInt64 = 0
      for i in (0..<count).reversed() { value = value << 8 | UInt64(raw[i]) }
      guard let result = Int(exactly: value) else { throw fail("a length of \(value) at byte \(position)") }
      return result
    }

    mutating func text(_ count: Int) throws -> String {
      let raw = try take(count)
      guard let text = String(validating: raw, as: UTF8.self) else { throw fail("a string that is not UTF-8") }
      return text
    }

    mutating func line() throws -> String {
      var end = position
      while end < bytes.count, bytes[end] != 0x0A { end += 1 }
      guard end < bytes.count, end - position <= 256 else { throw fail("a global name that does not end") }
      let value = try text(end - position)
      position += 1
      return value
    }

    mutating func pop() throws -> Value {
      guard let value = stack.popLast() else { throw fail("pops an empty stack at byte \(position)") }
      if case .mark = value { throw fail("pops a mark at byte \(position)") }
      return value
    }

    /// The values above the last mark, removing them and the mark.
    mutating func popToMark() throws -> [Value] {
      guard let mark = marks.popLast(), mark <= stack.count else { throw fail("no mark at byte \(position)") }
      let items = Array(stack[(mark + 1)...])
      stack.removeSubrange(mark...)
      return items
    }

    mutating func memoize(_ index: Int) throws {
      guard let top = stack.last else { throw fail("memoizes an empty stack") }
      guard index >= 0, index < 1 << 24 else { throw fail("memo index \(index) out of range") }
      memo[index] = top
    }

    mutating func run() throws -> Value {
      while true {
        let opcode = try byte()
        switch opcode {
        case 0x80: _ = try byte()  // PROTO
        case 0x95: _ = try take(8)  // FRAME
        case 0x2E:  // STOP
          guard stack.count == 1 else { throw fail("ends with \(stack.count) values on the stack") }
          return stack[0]
        case 0x28:  // MARK
          marks.append(stack.count)
          stack.append(.mark)
        case 0x7D: stack.append(.dict(Box([])))  // EMPTY_DICT
        case 0x5D: stack.append(.list(Box([])))  // EMPTY_LIST
        case 0x29: stack.append(.tuple([]))  // EMPTY_TUPLE
        case 0x4E: stack.append(.none)
        case 0x88: stack.append(.bool(true))
        case 0x89: stack.append(.bool(false))
        case 0x4B: stack.append(.int(Int(try byte())))  // BININT1
        case 0x4D: stack.append(.int(try unsigned(2)))  // BININT2
        case 0x4A: stack.append(.int(Int(Int32(truncatingIfNeeded: try unsigned(4)))))  // BININT
        case 0x8A:  // LONG1
          let count = Int(try byte())
          guard count <= 8 else { throw fail("an integer of \(count) bytes") }
          let raw = try take(count)
          var value: Int64 = 0
          for i in (0..<count).reversed() { value = value << 8 | Int64(raw[i]) }
          if count > 0 && count < 8 && raw[count - 1] & 0x80 != 0 { value -= Int64(1) << (8 * Int64(count)) }
          stack.append(.int(Int(value)))
        case 0x47:  // BINFLOAT
          let raw = try take(8)
          var bits: UInt64 = 0
          for i in 0..<8 { bits = bits << 8 | UInt64(raw[i]) }
          stack.append(.float(Double(bitPattern: bits)))
        case 0x58: stack.append(.string(try text(try unsigned(4))))  // BINUNICODE
        case 0x8C: stack.append(.string(try text(Int(try byte()))))  // SHORT_BINUNICODE
        case 0x8D: stack.append(.string(try text(try unsigned(8))))  // BINUNICODE8
        case 0x54: stack.append(.string(try text(try unsigned(4))))  // BINSTRING
        case 0x55: stack.append(.string(try text(Int(try byte()))))  // SHORT_BINSTRING
        case 0x42: stack.append(.bytes(Array(try take(try unsigned(4)))))  // BINBYTES
        case 0x43: stack.append(.bytes(Array(try take(Int(try byte())))))  // SHORT_BINBYTES
        case 0x71: try memoize(Int(try byte()))  // BINPUT
        case 0x72: try memoize(try unsigned(4))  // LONG_BINPUT
        case 0x94: try memoize(memo.count)  // MEMOIZE
        case 0x68, 0x6A:  // BINGET, LONG_BINGET
          let index = opcode == 0x68 ? Int(try byte()) : try unsigned(4)
          guard let value = memo[index] else { throw fail("reads memo \(index), which was never stored") }
          stack.append(value)
        case 0x63:  // GLOBAL
          let module = try line()
          let name = try line()
          try pushGlobal(module, name)
        case 0x93:  // STACK_GLOBAL
          let name = try pop()
          let module = try pop()
          guard let m = module.text, let n = name.text else { throw fail("a global named by non-strings") }
          try pushGlobal(m, n)
        case 0x74: stack.append(.tuple(try popToMark()))  // TUPLE
        case 0x85: stack.append(.tuple([try pop()]))
        case 0x86:
          let b = try pop()
          stack.append(.tuple([try pop(), b]))
        case 0x87:
          let c = try pop()
          let b = try pop()
          stack.append(.tuple([try pop(), b, c]))
        case 0x51: stack.append(try persistent(try pop()))  // BINPERSID
        case 0x52:  // REDUCE
          let arguments = try pop()
          let callable = try pop()
          stack.append(try reduce(callable, arguments))
        case 0x62:  // BUILD: a state dict's `_metadata`, which is not needed, is dropped.
          _ = try pop()
          guard stack.last != nil else { throw fail("builds nothing") }
        case 0x73:  // SETITEM
          let value = try pop()
          let key = try pop()
          try insert([(key, value)])
        case 0x75:  // SETITEMS
          let items = try popToMark()
          guard items.count % 2 == 0 else { throw fail("SETITEMS with an odd number of values") }
          try insert(stride(from: 0, to: items.count, by: 2).map { (items[$0], items[$0 + 1]) })
        case 0x61:  // APPEND
          let value = try pop()
          try append([value])
        case 0x65: try append(try popToMark())  // APPENDS
        default:
          throw fail(
            "uses pickle instruction 0x\(String(opcode, radix: 16)) at byte \(position - 1), which a state dict never needs"
          )
        }
      }
    }

    mutating func pushGlobal(_ module: String, _ name: String) throws {
      guard isAllowed(module: module, name: name) else {
        throw fail("names the global \(module).\(name), which a state dict never needs; nothing was run")
      }
      stack.append(.global(module: module, name: name))
    }

    mutating func insert(_ pairs: [(Value, Value)]) throws {
      guard case .dict(let box)? = stack.last else { throw fail("sets an item on something that is not a dict") }
      box.value += pairs.map { (key: $0.0, value: $0.1) }
    }

    mutating func append(_ values: [Value]) throws {
      guard case .list(let box)? = stack.last else { throw fail("appends to something that is not a list") }
      box.value += values
    }

    /// A persistent id: `('storage', torch.<Type>Storage, key, location, elements)`.
    func persistent(_ id: Value) throws -> Value {
      guard case .tuple(let parts) = id, parts.count == 5, parts[0].text == "storage",
        case .global("torch", let type) = parts[1], let dtype = storages[type], let key = parts[2].text,
        let elements = parts[4].integer, elements >= 0
      else { throw fail("a persistent id that is not a tensor storage") }
      guard !key.isEmpty, key.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 || $0 >= 0x61 && $0 <= 0x7A }) else {
        throw fail("a storage key '\(key)' that is not a plain name")
      }
      return .storage(key: key, dtype: dtype, elements: elements)
    }

    func reduce(_ callable: Value, _ arguments: Value) throws -> Value {
      guard case .global(let module, let name) = callable, case .tuple(let args) = arguments else {
        throw fail("calls something that is not an allowed global")
      }
      switch (module, name) {
      case ("collections", "OrderedDict"):
        guard args.isEmpty else { throw fail("an OrderedDict built from arguments") }
        return .dict(Box([]))
      case ("torch._utils", "_rebuild_tensor_v2"):
        guard args.count >= 4, case .storage(let key, let dtype, let elements) = args[0],
          let offset = args[1].integer, case .tuple(let size) = args[2], case .tuple(let stride) = args[3]
        else { throw fail("_rebuild_tensor_v2 with arguments it never takes") }
        let shape = size.compactMap(\.integer)
        let strides = stride.compactMap(\.integer)
        guard shape.count == size.count, strides.count == stride.count, shape.count == strides.count else {
          throw fail("a tensor whose size or stride is not a tuple of integers")
        }
        return .tensor(
          TensorReference(
            storage: key, dtype: dtype, storageElements: elements, offset: offset, shape: shape, strides: strides))
      case ("torch._utils", "_rebuild_parameter"):
        guard let first = args.first, case .tensor = first else { throw fail("a parameter without a tensor") }
        return first
      default:
        throw fail("calls \(module).\(name)")
      }
    }
  }
}
