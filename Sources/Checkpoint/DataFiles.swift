import Foundation
import Tensor

/// Labelled feature rows as stored: `rows x columns` features, one label per row, and
/// optionally the task of each row.
public struct FeatureTable: Sendable, Equatable {
  public var features: [Float]
  public var columns: Int
  public var labels: [Int]
  public var tasks: [Int]?
  public var rows: Int { labels.count }

  public init(features: [Float], columns: Int, labels: [Int], tasks: [Int]? = nil) {
    self.features = features
    self.columns = columns
    self.labels = labels
    self.tasks = tasks
  }
}

/// Readers and writers of the data sets the data-driven commands take:
/// - labelled features: a safetensors file with `features` (rows x columns), `labels` (rows)
///   and optionally `tasks` (rows); a CSV file (numbers, the last column the label, or columns
///   named `label` and `task` in a header row); or a `.npy` array of features with its labels in
///   a second `.npy`;
/// - token sequences: JSON lines (each an array of ids or an object with `input_ids`), or a
///   safetensors file with an integer `input_ids` tensor (sequences x length; with an
///   `attention_mask`, masked positions are dropped).
public enum DataFiles {
  /// The largest class or task index a data file may hold: an index sizes a model's output
  /// layer, so a stray 10^11 must not become a 10^11-wide layer.
  public static let maxClassIndex = 1 << 20

  public static func readLabeled(_ path: String, labels labelsPath: String? = nil) throws -> FeatureTable {
    let table = try readLabeledTable(path, labels: labelsPath)
    guard table.rows > 0 else { throw CheckpointError.badDataFile(file: path, reason: "holds no rows") }
    guard table.columns > 0 else { throw CheckpointError.badDataFile(file: path, reason: "holds no feature columns") }
    guard table.features.count == table.rows * table.columns else {
      throw CheckpointError.badDataFile(
        file: path, reason: "holds \(table.features.count) features for \(table.rows) rows of \(table.columns)")
    }
    return table
  }

  /// Features alone (rows x columns), for commands that never look at labels (`zip`): a
  /// safetensors file needs only `features`, a `.npy` only itself; a CSV is read as labelled (its
  /// last column, or the one named `label`, is not a feature).
  public static func readFeatures(_ path: String) throws -> (rows: Int, columns: Int, values: [Float]) {
    let ext = URL(fileURLWithPath: path).pathExtension.lowercased()
    var shape: [Int]
    var values: [Float]
    switch ext {
    case "safetensors":
      let file = try SafetensorsFile(path: path)
      guard let info = file.lookup("features"), info.shape.count == 2 else {
        throw CheckpointError.badDataFile(file: path, reason: "needs a 2-D tensor 'features' (rows x columns)")
      }
      (shape, values) = (info.shape, try file.tensor(named: "features").scalars)
    case "npy":
      let (npyShape, npyValues) = try readNPY(path)
      guard npyShape.count == 2 else {
        throw CheckpointError.badDataFile(file: path, reason: "features must be a 2-D array, found shape \(npyShape)")
      }
      (shape, values) = (npyShape, npyValues.map { Float($0) })
    default:
      let table = try readLabeled(path)
      return (table.rows, table.columns, table.features)
    }
    guard shape[0] > 0 else { throw CheckpointError.badDataFile(file: path, reason: "holds no rows") }
    guard shape[1] > 0 else { throw CheckpointError.badDataFile(file: path, reason: "holds no feature columns") }
    return (shape[0], shape[1], values)
  }

  static func readLabeledTable(_ path: String, labels labelsPath: String?) throws -> FeatureTable {
    let ext = URL(fileURLWithPath: path).pathExtension.lowercased()
    switch ext {
    case "safetensors": return try readLabeledSafetensors(path)
    case "csv": return try readCSV(path)
    case "npy":
      guard let labelsPath else {
        throw CheckpointError.badDataFile(
          file: path, reason: "a .npy holds only the features; pass the labels as a second .npy (labels)")
      }
      let (shape, values) = try readNPY(path)
      guard shape.count == 2 else {
        throw CheckpointError.badDataFile(file: path, reason: "features must be a 2-D array, found shape \(shape)")
      }
      let (labelShape, labelValues) = try readNPY(labelsPath)
      guard labelShape.count == 1, labelShape[0] == shape[0] else {
        throw CheckpointError.badDataFile(
          file: labelsPath, reason: "labels must be a 1-D array of \(shape[0]) entries, found shape \(labelShape)")
      }
      return FeatureTable(
        features: values.map { Float($0) }, columns: shape[1], labels: try integers(labelValues, labelsPath, "labels"))
    default:
      throw CheckpointError.badDataFile(
        file: path, reason: "unknown data format '.\(ext)' (expected .safetensors, .csv or .npy)")
    }
  }

  static func readLabeledSafetensors(_ path: String) throws -> FeatureTable {
    let file = try SafetensorsFile(path: path)
    guard let info = file.lookup("features"), info.shape.count == 2 else {
      throw CheckpointError.badDataFile(file: path, reason: "needs a 2-D tensor 'features' (rows x columns)")
    }
    guard let labelInfo = file.lookup("labels"), labelInfo.shape == [info.shape[0]] else {
      throw CheckpointError.badDataFile(
        file: path, reason: "needs a 1-D tensor 'labels' with one entry per feature row (\(info.shape[0]))")
    }
    let features = try file.tensor(named: "features").scalars
    let labels = try integers(try file.tensor(named: "labels").scalars.map(Double.init), path, "labels")
    var tasks: [Int]?
    if let taskInfo = file.lookup("tasks") {
      guard taskInfo.shape == [info.shape[0]] else {
        throw CheckpointError.badDataFile(file: path, reason: "'tasks' must have one entry per row")
      }
      tasks = try integers(try file.tensor(named: "tasks").scalars.map(Double.init), path, "tasks")
    }
    return FeatureTable(features: features, columns: info.shape[1], labels: labels, tasks: tasks)
  }

  /// Writes labelled features as safetensors (`features` f32, `labels` and `tasks` i64).
  public static func writeLabeled(_ table: FeatureTable, to path: String, overwrite: Bool) throws {
    var tensors: [(TensorInfo, TensorData)] = [
      (
        TensorInfo(name: "features", dtype: .f32, shape: [table.rows, table.columns]),
        Tensor(shape: [table.rows, table.columns], scalars: table.features).encoded(as: .f32)
      ),
      (TensorInfo(name: "labels", dtype: .i64, shape: [table.rows]), integerData(table.labels)),
    ]
    if let tasks = table.tasks {
      tensors.append((TensorInfo(name: "tasks", dtype: .i64, shape: [table.rows]), integerData(tasks)))
    }
    let writer = try CheckpointWriter(
      destination: path, tensors: tensors.map(\.0), options: WriteOptions(format: .safetensors, overwrite: overwrite))
    for (info, data) in tensors { try writer.write(info.name, data) }
    try writer.finish()
  }

  static func integerData(_ values: [Int]) -> TensorData {
    TensorData(
      dtype: .i64, shape: [values.count], bytes: values.map { Int64($0).littleEndian }.withUnsafeBytes { Array($0) })
  }

  static func integers(_ values: [Double], _ file: String, _ what: String) throws -> [Int] {
    try values.enumerated().map { i, v in
      guard let n = Int(exactly: v), n >= 0, n <= maxClassIndex else {
        throw CheckpointError.badDataFile(
          file: file,
          reason: "\(what)\(values.count == 1 ? "" : "[\(i)]") = \(v) is not an integer between 0 and \(maxClassIndex)")
      }
      return n
    }
  }

  static func readCSV(_ path: String) throws -> FeatureTable {
    let text = try InputFile.readText(path, limit: Int.max)
    var lines = text.split(whereSeparator: \.isNewline).map {
      $0.split(separator: ",", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
    }
    guard let first = lines.first else { throw CheckpointError.badDataFile(file: path, reason: "empty file") }
    var labelColumn = first.count - 1
    var taskColumn: Int?
    if first.contains(where: { Double($0) == nil }) {
      labelColumn = first.firstIndex(of: "label") ?? first.count - 1
      taskColumn = first.firstIndex(of: "task")
      lines.removeFirst()
    }
    let width = first.count
    var table = FeatureTable(
      features: [], columns: width - 1 - (taskColumn == nil ? 0 : 1), labels: [], tasks: taskColumn == nil ? nil : [])
    guard table.columns >= 1 else {
      throw CheckpointError.badDataFile(file: path, reason: "needs at least one feature column besides the label")
    }
    for (n, fields) in lines.enumerated() {
      let line = n + (table.tasks == nil && Double(first[0]) != nil ? 1 : 2)
      guard fields.count == width else {
        throw CheckpointError.badDataFile(
          file: path, reason: "line \(line) has \(fields.count) fields, expected \(width)")
      }
      for (c, field) in fields.enumerated() {
        guard let value = Double(field) else {
          throw CheckpointError.badDataFile(
            file: path, reason: "line \(line), field \(c + 1): '\(field)' is not a number")
        }
        if c == labelColumn {
          table.labels += try integers([value], path, "label on line \(line)")
        } else if c == taskColumn {
          let task = try integers([value], path, "task on line \(line)")
          table.tasks?.append(contentsOf: task)
        } else {
          table.features.append(Float(value))
        }
      }
    }
    return table
  }

  /// A NumPy `.npy` array (format 1.0-3.0, little-endian f4/f8/i4/i8/u1, C order) as doubles.
  static func readNPY(_ path: String) throws -> (shape: [Int], values: [Double]) {
    let bytes = try InputFile.read(path, limit: Int.max)
    guard bytes.count >= 10, bytes[0] == 0x93, Array(bytes[1..<6]) == Array("NUMPY".utf8) else {
      throw CheckpointError.badDataFile(file: path, reason: "not a .npy file (bad magic)")
    }
    let major = bytes[6]
    guard major >= 1 && major <= 3 else {
      throw CheckpointError.badDataFile(file: path, reason: ".npy format version \(major) is not supported (1 to 3)")
    }
    let headerLength =
      major == 1
      ? Int(bytes[8]) | Int(bytes[9]) << 8
      : (bytes.count >= 12 ? Int(bytes[8]) | Int(bytes[9]) << 8 | Int(bytes[10]) << 16 | Int(bytes[11]) << 24 : -1)
    let start = major == 1 ? 10 : 12
    guard headerLength >= 0, headerLength <= bytes.count - start,
      let header = String(bytes: bytes[start..<(start + headerLength)], encoding: .utf8)
    else {
      throw CheckpointError.badDataFile(file: path, reason: "truncated .npy header")
    }
    func field(_ key: String) -> String? {
      guard let range = header.range(of: "'\(key)':") else { return nil }
      return String(header[range.upperBound...]).trimmingCharacters(in: .whitespaces)
    }
    guard let descr = field("descr"), descr.count >= 2, let quote = descr.dropFirst().firstIndex(of: "'") else {
      throw CheckpointError.badDataFile(file: path, reason: "no dtype in the header")
    }
    let type = String(descr[descr.index(after: descr.startIndex)..<quote])
    guard field("fortran_order")?.hasPrefix("False") ?? false else {
      throw CheckpointError.badDataFile(file: path, reason: "Fortran-order arrays are not supported; save with C order")
    }
    guard let shapeText = field("shape"), let open = shapeText.firstIndex(of: "("),
      let close = shapeText.firstIndex(of: ")"), open < close
    else {
      throw CheckpointError.badDataFile(file: path, reason: "no shape in the header")
    }
    let shapeItems = shapeText[shapeText.index(after: open)..<close].split(separator: ",")
      .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    let shape = shapeItems.compactMap { Int($0) }
    guard shape.count == shapeItems.count, shape.allSatisfy({ $0 >= 0 }) else {
      throw CheckpointError.badDataFile(
        file: path, reason: "shape (\(shapeItems.joined(separator: ", "))) is not a tuple of non-negative integers")
    }
    let sizes: [String: Int] = ["<f4": 4, "<f8": 8, "<i4": 4, "<i8": 8, "|u1": 1, "<u1": 1, "|i1": 1]
    guard let size = sizes[type] else {
      throw CheckpointError.badDataFile(
        file: path,
        reason: "dtype '\(type)' is not supported (use float32, float64, int32, int64 or uint8, little-endian)")
    }
    let offset = start + headerLength
    guard let byteCount = checkedProduct(shape + [size]) else {
      throw CheckpointError.badDataFile(file: path, reason: "shape \(shape) is too large to exist")
    }
    let count = byteCount / size
    guard bytes.count - offset == byteCount else {
      throw CheckpointError.badDataFile(
        file: path,
        reason: "data holds \(bytes.count - offset) bytes, the shape \(shape) of '\(type)' needs \(byteCount)")
    }
    let values: [Double] = bytes.withUnsafeBytes { raw in
      guard let start = raw.baseAddress else { return [] }
      let p = start + offset
      return (0..<count).map { i in
        switch type {
        case "<f4": return Double(Float(bitPattern: p.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)))
        case "<f8": return Double(bitPattern: p.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
        case "<i4": return Double(p.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))
        case "<i8": return Double(p.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))
        case "|i1": return Double(p.load(fromByteOffset: i, as: Int8.self))
        default: return Double(p.load(fromByteOffset: i, as: UInt8.self))
        }
      }
    }
    return (shape, values)
  }

  /// Token-id sequences from JSON lines or a safetensors `input_ids` tensor.
  public static func readTokens(_ path: String) throws -> [[Int]] {
    let ext = URL(fileURLWithPath: path).pathExtension.lowercased()
    if ext == "safetensors" {
      let file = try SafetensorsFile(path: path)
      guard let info = file.lookup("input_ids"), info.shape.count == 2, !info.dtype.isFloatingPoint else {
        throw CheckpointError.badDataFile(
          file: path, reason: "needs an integer tensor 'input_ids' of shape (sequences, length)")
      }
      let ids = try integers(try file.tensor(named: "input_ids").scalars.map(Double.init), path, "input_ids")
      let mask = try file.lookup("attention_mask").map { _ in try file.tensor(named: "attention_mask").scalars }
      let length = info.shape[1]
      return (0..<info.shape[0]).map { s in
        (0..<length).compactMap { j in mask.map { $0[s * length + j] != 0 } ?? true ? ids[s * length + j] : nil }
      }
    }
    let text = try InputFile.readText(path, limit: Int.max)
    return try text.split(whereSeparator: \.isNewline).enumerated().compactMap { n, line in
      guard !line.trimmingCharacters(in: .whitespaces).isEmpty else { return nil }
      let object = try? JSONSerialization.jsonObject(with: Data(line.utf8))
      let array = (object as? [Any]) ?? ((object as? [String: Any])?["input_ids"] as? [Any])
      guard let ids = array?.compactMap({ ($0 as? NSNumber).flatMap { Int(exactly: $0.doubleValue) } }),
        ids.count == array?.count, !ids.isEmpty,
        ids.allSatisfy({ $0 >= 0 && $0 <= maxClassIndex })
      else {
        throw CheckpointError.badDataFile(
          file: path, reason: "line \(n + 1) is not a JSON array of token ids (or an object with 'input_ids')")
      }
      return ids
    }
  }

  /// Labelled token sequences from JSON lines, one object per line: `input_ids` (token ids),
  /// `label` (a class index) and optionally `task` (a task id), as sequence classification
  /// data (`synthetic-tokens --labelled` writes them). Throws naming the line.
  public static func readLabelledTokens(_ path: String) throws -> (sequences: [[Int]], labels: [Int], tasks: [Int]?) {
    let text = try InputFile.readText(path, limit: Int.max)
    var (sequences, labels, tasks) = ([[Int]](), [Int](), [Int]())
    var withTasks = 0
    func integer(_ value: Any?) -> Int? {
      (value as? NSNumber).flatMap { Int(exactly: $0.doubleValue) }.flatMap {
        (0...maxClassIndex).contains($0) ? $0 : nil
      }
    }
    for (n, line) in text.split(whereSeparator: \.isNewline).enumerated() {
      guard !line.trimmingCharacters(in: .whitespaces).isEmpty else { continue }
      let object = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
      let array = object?["input_ids"] as? [Any]
      guard let array, let ids = Optional(array.compactMap(integer)), ids.count == array.count, !ids.isEmpty,
        let label = integer(object?["label"])
      else {
        throw CheckpointError.badDataFile(
          file: path,
          reason: "line \(n + 1) is not an object with 'input_ids' (token ids) and 'label' (a class index)")
      }
      if object?["task"] != nil {
        guard let task = integer(object?["task"]) else {
          throw CheckpointError.badDataFile(file: path, reason: "line \(n + 1): 'task' is not a task id")
        }
        tasks.append(task)
        withTasks += 1
      } else {
        tasks.append(0)
      }
      sequences.append(ids)
      labels.append(label)
    }
    guard withTasks == 0 || withTasks == sequences.count else {
      throw CheckpointError.badDataFile(file: path, reason: "some lines have a 'task' and others do not")
    }
    return (sequences, labels, withTasks == 0 ? nil : tasks)
  }
}
