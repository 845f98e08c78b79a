import Testing

@testable import Merge

@Suite struct ParametersTests {
  let positions = LayerPositions(
    names: (0..<5).map { "model.layers.\($0).mlp.up_proj.weight" } + ["model.embed_tokens.weight"])

  func resolver(
    _ global: [String: ParameterValue], models: [[String: ParameterValue]] = [[:], [:]],
    method: any MergeMethod = TaskVectorMerge.ties
  ) throws -> ParameterResolver {
    try ParameterResolver(
      method: method.name, specs: method.parameters, global: global, models: models, positions: positions)
  }

  @Test func layersAreCountedAndPlacedOnZeroToOne() {
    #expect(positions.layerCount == 5)
    #expect(positions.position(of: "model.layers.0.self_attn.q_proj.weight") == 0)
    #expect(positions.position(of: "model.layers.2.mlp.up_proj.weight") == 0.5)
    #expect(positions.position(of: "model.layers.4.input_layernorm.weight") == 1)
    // mergekit evaluates gradients at 0 before the layers and at 1 after them.
    #expect(positions.position(of: "model.embed_tokens.weight") == 0)
    #expect(positions.position(of: "lm_head.weight") == 1)
    #expect(positions.position(of: "model.norm.weight") == 1)
    #expect(LayerPositions(layerCount: 3, firstLayer: 4).position(of: "model.layers.5.mlp.up_proj.weight") == 0.5)
    #expect(
      LayerPositions.renumbered("model.layers.12.mlp.up_proj.weight", to: 3) == "model.layers.3.mlp.up_proj.weight")
    #expect(LayerPositions.layerIndex("transformer.h.11.attn.c_attn.weight") == 11)
  }

  @Test func gradientsInterpolateAcrossLayers() throws {
    let r = try resolver(["lambda": .gradient([0, 1, 0.5])])
    #expect(try r.resolve(tensor: "model.layers.0.mlp.up_proj.weight").number("lambda") == 0)
    #expect(try r.resolve(tensor: "model.layers.1.mlp.up_proj.weight").number("lambda") == 0.5)
    #expect(try r.resolve(tensor: "model.layers.2.mlp.up_proj.weight").number("lambda") == 1)
    #expect(try r.resolve(tensor: "model.layers.3.mlp.up_proj.weight").number("lambda") == 0.75)
    #expect(try r.resolve(tensor: "model.layers.4.mlp.up_proj.weight").number("lambda") == 0.5)
    #expect(try r.resolve(tensor: "model.embed_tokens.weight").number("lambda") == 0)
  }

  @Test func filtersPickTheFirstMatchingEntryThenTheFallback() throws {
    let density: ParameterValue = .filtered([
      .init(filter: "self_attn", value: .number(0.3)), .init(filter: "mlp", value: .gradient([0.2, 0.6])),
      .init(filter: nil, value: .number(0.9)),
    ])
    let r = try resolver([:], models: [["density": density], [:]])
    #expect(try r.resolve(tensor: "model.layers.1.self_attn.q_proj.weight").number("density", model: 0) == 0.3)
    #expect(try r.resolve(tensor: "model.layers.4.mlp.up_proj.weight").number("density", model: 0) == 0.6)
    #expect(try r.resolve(tensor: "model.norm.weight").number("density", model: 0) == 0.9)
    #expect(try r.resolve(tensor: "model.norm.weight").number("density", model: 1) == 1)  // the method's default
  }

  @Test func badValuesAndNamesAreErrorsNamingTheParameter() throws {
    #expect(
      throws: MergeError.invalidParameter(
        method: "ties", name: "density (model 1)", tensor: "w", reason: "0 is not a number in (0, 1]")
    ) {
      try resolver([:], models: [["density": .number(0)], [:]]).resolve(tensor: "w")
    }
    #expect(
      throws: MergeError.invalidParameter(
        method: "ties", name: "density (model 2)", tensor: "w", reason: "1.5 is not a number in (0, 1]")
    ) {
      try resolver([:], models: [[:], ["density": .number(1.5)]]).resolve(tensor: "w")
    }
    #expect(throws: MergeError.self) { try resolver(["densty": .number(0.5)]) }
    // global given per model
    #expect(throws: MergeError.self) { try resolver([:], models: [["lambda": .number(1)], [:]]) }
    #expect(
      throws: MergeError.missingParameter(
        method: "slerp", name: "t", help: "interpolation factor: 0 gives the base, 1 the other model")
    ) {
      try resolver([:], models: [[:]], method: SlerpMerge()).resolve(tensor: "w")
    }
    #expect(throws: MergeError.self) { try resolver(["mode": .text("both")], method: STFMerge()).resolve(tensor: "w") }
  }

  @Test func commandLineSpellingsParse() {
    #expect(ParameterValue(parsing: "0.5") == .number(0.5))
    #expect(ParameterValue(parsing: "true") == .flag(true))
    #expect(ParameterValue(parsing: "0, 0.5,1") == .gradient([0, 0.5, 1]))
    #expect(ParameterValue(parsing: "outputs") == .text("outputs"))
  }

  @Test func registryFindsMergekitSpellings() throws {
    #expect(try MergeRegistry.method(named: "dare_ties").name == "dare-ties")
    #expect(try MergeRegistry.method(named: "TASK_ARITHMETIC").name == "task-arithmetic")
    #expect(throws: MergeError.self) { try MergeRegistry.method(named: "frankenmerge") }
    #expect(Set(MergeRegistry.methods.map(\.name)).count == MergeRegistry.methods.count)
  }
}
