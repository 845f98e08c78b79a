import Foundation
import Merge
import Operations
import Testing

/// `prepare` checks a request before anything runs: names, kinds, ranges, defaults, inputs and
/// the operations' own rules.
@Suite struct OperationTests {
  func prepare(
    _ name: String, models: [String] = [], base: String? = nil, data: String? = nil, output: String? = "out",
    _ parameters: [String: ParameterValue] = [:]
  ) throws
    -> OperationRequest
  {
    guard let operation = OperationRegistry.operation(named: name) else {
      throw OperationError.unknownOperation(name, known: [])
    }
    return try operation.prepare(models: models, base: base, data: data, output: output, parameters: parameters)
  }

  @Test func defaultsFillWhatIsNotGivenAndGivenValuesAreTyped() throws {
    let request = try prepare("train", data: "d", ["hidden": .gradient([32, 16]), "lr": .number(0.01)])
    #expect(request.parameters.optionalIntegers("hidden") == [32, 16])
    #expect(request.parameters.double("lr") == 0.01)
    #expect(request.parameters.int("epochs") == 20 && request.parameters.text("optimizer") == "adam")
    #expect(request.parameters.isGiven("lr") && !request.parameters.isGiven("epochs"))
    #expect(request.parameters.optionalInt("classes") == nil)
  }

  @Test func everyOperationAcceptsItsOwnDefaults() throws {
    for operation in OperationRegistry.operations {
      let required = Dictionary(
        uniqueKeysWithValues: operation.parameters.filter { $0.defaultValue == nil && !$0.isOptional }.map {
          ($0.name, ParameterValue.text("."))
        })
      do {
        _ = try operation.prepare(
          models: Array(repeating: "m", count: operation.inputs.models.lowerBound),
          base: operation.inputs.base == .unused ? nil : "b",
          data: operation.inputs.data == .unused ? nil : "d",
          output: "out" + (operation.output == .file(extension: "jsonl") ? ".jsonl" : ".safetensors"),
          parameters: required)
      } catch let error as OperationError {
        // Rules between parameters (one of keep, rank or energy) may still want a choice; a default never fails its own check.
        guard case .conflict = error else { Issue.record("\(operation.name): \(error)"); continue }
      }
    }
  }

  @Test func badValuesNameTheParameterAndWhatItTakes() throws {
    #expect(
      throws: OperationError.invalidParameter(
        operation: "zip", name: "alpha", value: "-3", reason: "is not a number >= 0")
    ) {
      try prepare("zip", models: ["a", "b"], data: "d", ["alpha": .number(-3)])
    }
    #expect(
      throws: OperationError.invalidParameter(
        operation: "train", name: "epochs", value: "2.5", reason: "is not an integer in [1, 1000000]")
    ) {
      try prepare("train", data: "d", ["epochs": .number(2.5)])
    }
    #expect(
      throws: OperationError.invalidParameter(
        operation: "train", name: "freeze", value: "(", reason: "is not a valid regular expression")
    ) {
      try prepare("train", data: "d", ["freeze": .text("(")])
    }
    #expect(
      throws: OperationError.unknownParameter(operation: "eval", name: "epochs", known: ["labels", "tasks", "config"])
    ) {
      try prepare("eval", models: ["m"], data: "d", ["epochs": .number(1)])
    }
    #expect(
      throws: OperationError.missingParameter(
        operation: "stats", name: "at",
        help: "regular expression selecting activation points (e.g. 'hidden$' or 'self_attn\\.keys')")
    ) {
      try prepare("stats", models: ["m"], data: "d")
    }
  }

  @Test func inputsAndRulesBetweenParametersAreChecked() throws {
    #expect(throws: OperationError.self) { try prepare("zip", models: ["a"], data: "d") }  // one model
    #expect(throws: OperationError.self) { try prepare("zip", models: ["a", "b"]) }  // neither data nor stats
    // both
    #expect(throws: OperationError.self) { try prepare("zip", models: ["a", "b"], data: "d", ["stats": .text("s")]) }
    #expect(throws: OperationError.self) {
      try prepare("pela", models: ["m"], ["keep": .number(0.5), "rank": .number(3)])
    }
    #expect(throws: OperationError.self) { try prepare("pela", models: ["m"], ["distill": .flag(true)]) }  // no data
    #expect(throws: OperationError.self) { try prepare("extract-lora", models: ["m"], base: "b") }  // no rank rule
    #expect(throws: OperationError.self) {
      try prepare("atlas", models: ["tv"], base: "b", data: "d", ["objective": .text("negate")])
    }
    #expect(throws: OperationError.self) { try prepare("synthetic-data", output: "data.csv") }  // writes .safetensors
    // fine-tune keeps its shape
    #expect(throws: OperationError.self) { try prepare("train", models: ["m"], data: "d", ["hidden": .gradient([8])]) }
    // eval reads no base
    #expect(throws: OperationError.self) { try prepare("eval", models: ["m"], base: "b", data: "d") }
    _ = try prepare("pela", models: ["m"], ["rank": .number(3)])
    _ = try prepare(
      "atlas", models: ["tv"], base: "b", data: "d", ["objective": .text("negate"), "negate_tasks": .number(0)])
  }

  @Test func namesAndAliasesAreUnique() {
    let names = OperationRegistry.operations.flatMap { [$0.name] + $0.aliases }
    #expect(Set(names).count == names.count)
    #expect(Set(names).isDisjoint(with: MergeRegistry.methods.map(\.name)))
    #expect(OperationRegistry.operation(named: "atlas")?.name == "atlas-learn")
    #expect(OperationRegistry.operation(named: "synthetic_data")?.name == "synthetic-data")
  }
}
