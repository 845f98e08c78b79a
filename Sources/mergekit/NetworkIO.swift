import ArgumentParser
import Checkpoint
import Foundation
import Nets
import Tensor

/// Loading and saving runnable models and data sets for the data-driven commands.
enum NetworkIO {
  /// The config.json of a model: `config` when given, else the one in the model's folder.
  static func configPath(model: String, config: String?) throws -> String {
    if let config { return config }
    guard let folder = ModelFolder.modelFolder(of: model) else {
      throw ValidationError("'\(model)' is a lone tensor file; pass its config.json with --config")
    }
    return folder + "/config.json"
  }

  /// A model as a runnable network: its config and the tensors the architecture reads.
  static func load(_ model: String, config: String? = nil) throws -> Network<Float> {
    let path = try configPath(model: model, config: config)
    guard let json = FileManager.default.contents(atPath: path) else { throw DataFileError(file: path, reason: "cannot read the model's config.json") }
    let networkConfig: NetworkConfig
    do { networkConfig = try NetworkConfig(json: json) } catch let error as NetsError { throw DataFileError(file: path, reason: error.description) }
    let checkpoint = try openCheckpoint(model)
    let needed = Set(Network<Float>.expectedShapes(networkConfig).map(\.name) + Network<Float>.expectedShapes(networkConfig, prefix: "bert.").map(\.name))
    var tensors: [String: Tensor] = [:]
    for info in checkpoint.tensors where needed.contains(info.name) { tensors[info.name] = try checkpoint.tensor(named: info.name) }
    do { return try Network(config: networkConfig, tensors: tensors) } catch let error as NetsError { throw DataFileError(file: model, reason: error.description) }
  }

  /// Saves an MLP as a model folder (config.json and f32 safetensors).
  static func saveMLP(_ network: Network<Float>, to folder: String, overwrite: Bool) throws {
    guard case .mlp(let config) = network.config else { throw ValidationError("only MLPs are saved by this command") }
    try ModelFolder.write(network.tensors, files: ["config.json": config.json], dtype: .f32, to: folder, overwrite: overwrite)
  }

  /// Labelled features from a data file, optionally only some tasks.
  static func labeled(_ path: String, labels: String?, tasks: String?) throws -> LabeledFeatures {
    let table = try DataFiles.readLabeled(path, labels: labels)
    var data = try LabeledFeatures(features: Matrix(rows: table.rows, columns: table.columns, values: table.features), labels: table.labels, tasks: table.tasks, source: path)
    if let tasks {
      let selected = Set(try parseIntegers(tasks, "--tasks"))
      data = data.tasks(selected)
      guard data.count > 0 else { throw DataFileError(file: path, reason: "no rows belong to tasks \(tasks)") }
    }
    return data
  }

  /// `1,2,3` as integers (a usage error otherwise).
  static func parseIntegers(_ text: String, _ flag: String) throws -> [Int] {
    let values = text.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
    guard !values.isEmpty, values.allSatisfy({ $0 != nil }) else { throw ValidationError("\(flag) takes integers separated by commas, got '\(text)'") }
    return values.map { $0! }
  }
}
