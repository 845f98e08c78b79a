import Foundation
import Merge

/// A command of the suite as one type: what it reads, its parameters (declared once, typed, with
/// defaults and ranges), what it writes, and how it runs. The CLI (`mergekit NAME ...`) and
/// recipes (`method: NAME`) are generic shells over `OperationRegistry`: both turn what the user
/// wrote into an `OperationRequest` through `prepare`, which checks everything (inputs, every
/// parameter, cross-parameter rules) before anything is read or written.
///
/// To add one: a type conforming to `MergekitOperation` in its own file, and one line in
/// `OperationRegistry.operations`. See docs/architecture.md.
public protocol MergekitOperation: Sendable {
  init()
  /// The registry key and recipe name (`zip`, `atlas-learn`).
  var name: String { get }
  /// The CLI words (`["atlas", "learn"]`); by default the name.
  var commandPath: [String] { get }
  /// Other recipe names (kept when an operation is renamed).
  var aliases: [String] { get }
  /// One line for help and docs.
  var summary: String { get }
  /// The longer help: what it computes, the paper.
  var discussion: String { get }
  var inputs: OperationInputs { get }
  var parameters: [ParameterSpec] { get }
  var output: OutputKind { get }
  /// Rules between parameters and inputs that one spec cannot state (give one of keep, rank or
  /// energy; --distill needs data). Pure: no I/O. Throws `OperationError`.
  func check(_ request: OperationRequest) throws
  /// Whether this request must name an output (by default every kind but `report`; an
  /// operation that only prints in some modes says so here).
  func needsOutput(_ request: OperationRequest) -> Bool
  /// Does the work. Throws the lower layers' errors (files, maths) naming files and tensors.
  func run(_ request: OperationRequest, context: OperationContext) throws -> OperationResult
}

extension MergekitOperation {
  public var commandPath: [String] { [name] }
  public var aliases: [String] { [] }
  public func check(_ request: OperationRequest) throws {}
  public func needsOutput(_ request: OperationRequest) -> Bool { output != .report }
}

/// Whether an input role is needed.
public enum Requirement: Sendable, Equatable {
  case required, optional, unused
}

/// The inputs an operation reads besides its parameters: models (positional on the command line,
/// `models`/`model` in a recipe), a base (`--base`, `base:`) and a data set (`--data`, `data:`).
public struct OperationInputs: Sendable {
  public var models: ClosedRange<Int>
  public var modelHelp: String
  public var base: Requirement
  public var baseHelp: String
  public var data: Requirement
  public var dataHelp: String
  /// The command line takes the base as the first positional argument (`atlas learn BASE TV...`).
  public var baseIsFirstArgument: Bool

  public init(
    models: ClosedRange<Int>, modelHelp: String, base: Requirement = .unused, baseHelp: String = "",
    data: Requirement = .unused, dataHelp: String = "",
    baseIsFirstArgument: Bool = false
  ) {
    self.models = models
    self.modelHelp = modelHelp
    self.base = base
    self.baseHelp = baseHelp
    self.data = data
    self.dataHelp = dataHelp
    self.baseIsFirstArgument = baseIsFirstArgument
  }

  /// Labelled features or token sequences, as every data-driven operation reads them.
  public static let dataHelp =
    "labelled features (.safetensors with features/labels[/tasks], .csv, or .npy with labels) or token sequences (.jsonl, .safetensors input_ids)"
}

/// What an operation writes.
public enum OutputKind: Sendable, Equatable {
  /// A model folder (config.json and weights), or a tensor file where the operation allows it.
  case model
  /// One file with this extension (a data set, statistics).
  case file(extension: String)
  /// A JSON report; optional on the command line (the report is printed).
  case report
}

/// Progress of one stage of work, drawn by the CLI as a bar and ignored elsewhere.
public protocol ProgressMeter: AnyObject {
  func update(_ done: Int, _ total: Int, note: String?)
  func finish()
}

/// What a meter counts.
public enum ProgressUnit: Sendable {
  case bytes
  case items(String)
}

/// How a run reports: progress meters and whether outputs may be replaced.
public struct OperationContext {
  public var overwrite: Bool
  /// Makes a meter for a stage (`train`, `distill`).
  public var meter: (String, ProgressUnit) -> any ProgressMeter

  public init(overwrite: Bool, meter: @escaping (String, ProgressUnit) -> any ProgressMeter = { _, _ in SilentMeter() })
  {
    self.overwrite = overwrite
    self.meter = meter
  }
}

/// A meter that shows nothing.
public final class SilentMeter: ProgressMeter {
  public init() {}
  public func update(_ done: Int, _ total: Int, note: String?) {}
  public func finish() {}
}

/// What a run tells the user: lines (printed by the CLI, reported by recipes) and, for report
/// operations, the JSON written to the output (and printed with `--json`).
public struct OperationResult {
  public var lines: [String]
  public var json: [String: Any]?

  public init(lines: [String], json: [String: Any]? = nil) {
    self.lines = lines
    self.json = json
  }
}
