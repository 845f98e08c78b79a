import Checkpoint
import Foundation
import Merge
import Nets
import Operations
import Tensor
import Testing

@testable import Recipe
@testable import TestSupport

/// The repository's `recipes/` folder.
let recipesFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
  .deletingLastPathComponent().appendingPathComponent("recipes").path

/// Example models under `folder/demo`, written once for the suite.
let exampleFolder: TemporaryFolder = {
  let folder = TemporaryFolder.removedAtExit()
  _ = try? ExampleModels.writeExamples(to: folder.file("demo"))
  return folder
}()

/// Smaller data and fewer epochs for the recipes that train decoders, so that the suite runs
/// every step of them in seconds (their figures come from full runs, in the docs); aTLAS on the
/// decoder runs two epochs instead of its small-data schedule.
let decoderDataShrink = [
  ("sequences: 256", "sequences: 8"), ("sequences: 128", "sequences: 4"), ("sequences: 32", "sequences: 2"),
  ("epochs: 2", "epochs: 1"),
]
let shrunkRecipes: [String: [(String, String)]] = [
  "atlas-decoder.yaml": decoderDataShrink + [
    ("sequences: 16", "sequences: 4"),
    (
      "{name: atlas, method: atlas, base: base, models: [tv-a, tv-b], data: validation}",
      "{name: atlas, method: atlas, base: base, models: [tv-a, tv-b], data: validation, parameters: {epochs: 2}}"
    ),
  ],
  "zipit-decoder.yaml": decoderDataShrink,
  "matryoshka-kv.yaml": [
    ("sequences: 256", "sequences: 8"), ("sequences: 32", "sequences: 4"), ("epochs: 4", "epochs: 1"),
  ],
]

/// A recipe file's text with its `demo/` paths moved into `folder` (and shrunk, see above).
func loadRecipe(_ name: String, in folder: String, output: String? = nil) throws -> Recipe {
  var text = try String(contentsOfFile: "\(recipesFolder)/\(name)", encoding: .utf8).replacingOccurrences(
    of: "demo/", with: "\(folder)/demo/")
  for (full, small) in shrunkRecipes[name] ?? [] {
    #expect(text.contains(full), "\(name) no longer has '\(full)'")
    text = text.replacingOccurrences(of: full, with: small)
  }
  return try Recipe.parse(text, file: name, output: output)
}

@Suite(.serialized) struct RecipeRunnerTests {
  @Test func everyExampleRecipeRuns() throws {
    let names = try FileManager.default.contentsOfDirectory(atPath: recipesFolder).filter { $0.hasSuffix(".yaml") }
      .sorted()
    #expect(names.count >= 10)
    let work = exampleFolder.path
    for name in names {
      let recipe = try loadRecipe(
        name, in: work, output: name.hasPrefix("mergekit-") ? "\(work)/demo/out/\(name).out" : nil)
      try RecipeRunner(recipe).run(overwrite: true)
      for output in recipe.outputs {
        if name == "atlas.yaml" {
          // An MLP with its coefficients: 6 task vectors x 6 tensors, not all zero.
          let c = try ATLASCoefficients(
            json: try Data(contentsOf: URL(fileURLWithPath: output.path + "/atlas-coefficients.json")))
          #expect(
            c.tasks.count == 6 && c.blocks.count == 6 && c.values.flatMap { $0.flatMap { $0 } }.contains { $0 != 0 })
          #expect(try NetworkFiles.load(output.path).weights.count == 6)
          continue
        }
        if name == "svd-merging.yaml" || name == "svd-alpha.yaml" {
          // The TSV-M merge of six fine-tuned MLPs: an MLP of 6 weights (the figures are printed).
          let merged = try NetworkFiles.load(output.path)
          #expect(merged.weights.count == 6)
          continue
        }
        if name == "atlas-decoder.yaml" {
          // A decoder with its coefficients: 2 task vectors x every tensor of the example model.
          let c = try ATLASCoefficients(
            json: try Data(contentsOf: URL(fileURLWithPath: output.path + "/atlas-coefficients.json")))
          #expect(c.tasks.count == 2 && c.blocks.count == 39)
          guard case .decoder = try NetworkFiles.load(output.path).config else {
            Issue.record("atlas-decoder's output is not a decoder"); continue
          }
          continue
        }
        if name == "matryoshka-kv.yaml" {
          // The example model with projections: half of the K/V dimensions kept.
          let projected = try NetworkFiles.load(output.path)
          #expect(projected.kvProjection.map { $0.keptFraction(dimension: 32) } == 0.5)
          continue
        }
        if name == "pela.yaml" {
          // The distilled MLP: both hidden layers factored at rank floor(64 64 / 4 / 128) = 8.
          #expect(try NetworkFiles.load(output.path).lowRank == ["layers.0": 8, "layers.1": 8])
          continue
        }
        if name == "zipit.yaml" {
          // MLPs: one zipped model, and one with a shared first layer and a head per model.
          guard case .mlp(let config) = try NetworkFiles.load(output.path).config else {
            Issue.record("\(output.label) is not an MLP"); continue
          }
          #expect(
            config.heads == (output.label == "partial" ? 2 : 1) && config.layerSizes == [32, 64, 64, 10],
            "\(output.label)")
          continue
        }
        if name == "zipit-decoder.yaml" {
          // A decoder zipped whole, and one with a trunk of 1 layer and a tail per fine-tune.
          guard case .decoder(let c) = try NetworkFiles.load(output.path).config else {
            Issue.record("\(output.label) is not a decoder"); continue
          }
          #expect(
            c.tails == (output.label == "partial-1" ? 2 : 1) && c.sharedLayers == (output.label == "partial-1" ? 1 : 4),
            "\(output.label)")
          continue
        }
        let written = try openCheckpoint(output.path)
        // The passthrough example stacks 3 + 3 of the 4 layers (9 tensors each) around 3 others.
        #expect(written.tensors.count == (name == "mergekit-passthrough.yaml" ? 57 : 39), "\(name): \(output.label)")
      }
    }
    // No temporary folders are left next to the outputs.
    #expect(try FileManager.default.contentsOfDirectory(atPath: "\(work)/demo/out").allSatisfy { !$0.hasPrefix(".") })
  }

  @Test func aMergekitConfigGivesTheSameBytesAsTheSameMergeDoneDirectly() throws {
    let work = exampleFolder.path
    let viaConfig = "\(work)/demo/out/mk-direct-check.safetensors"
    try RecipeRunner(try loadRecipe("mergekit-ties.yaml", in: work, output: viaConfig)).run(overwrite: true)
    let base = try openCheckpoint("\(work)/demo/base")
    let models = try ["finetune-a", "finetune-b"].map { try openCheckpoint("\(work)/demo/\($0)") }
    let plan = try MergePlan(
      method: TaskVectorMerge.ties, base: base, models: models, global: ["normalize": .flag(true)],
      perModel: Array(repeating: ["density": .number(0.5), "weight": .number(0.5)], count: 2), outputType: .bf16)
    let direct = "\(work)/demo/out/direct.safetensors"
    try MergeRunner.run(plan, to: direct, options: WriteOptions(overwrite: true))
    #expect(readBytes(viaConfig) == readBytes(direct))
  }

  @Test func chainedTaskVectorsEditTheBaseAsWritten() throws {
    let work = exampleFolder.path
    let recipe = try loadRecipe("task-vectors.yaml", in: work)
    try RecipeRunner(recipe).run(overwrite: true)
    let edited = try openCheckpoint("\(work)/demo/out/edited")
    let name = "model.layers.2.self_attn.v_proj.weight"
    let (base, a, b) = try (
      openCheckpoint("\(work)/demo/base").tensor(named: name).scalars,
      openCheckpoint("\(work)/demo/finetune-a").tensor(named: name).scalars,
      openCheckpoint("\(work)/demo/finetune-b").tensor(named: name).scalars
    )
    let expected: [Double] = (0..<base.count).map { (i: Int) -> Double in
      let b0 = Double(base[i])
      return b0 + (Double(a[i]) - b0) - 0.5 * (Double(b[i]) - b0)
    }
    let got = try edited.tensor(named: name).scalars
    // one bf16 rounding
    for i in got.indices { #expect(abs(Double(got[i]) - expected[i]) <= abs(expected[i]) * 0x1p-8 + 1e-12) }
    #expect(try openCheckpoint("\(work)/demo/out/tau-a.mkz").tensors.allSatisfy { $0.dtype == .f32 })
  }

  func expectInvalid(_ yaml: String, path: String, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
      _ = try RecipeRunner(
        try Recipe.parse(yaml.replacingOccurrences(of: "DEMO", with: exampleFolder.file("demo")), file: "bad.yaml"))
      Issue.record("no error for a recipe that should fail at \(path)", sourceLocation: sourceLocation)
    } catch let error as RecipeError {
      guard case .invalid(let file, let at, _, _) = error else {
        Issue.record("\(error)", sourceLocation: sourceLocation); return
      }
      #expect(file == "bad.yaml" && at == path, "\(error)", sourceLocation: sourceLocation)
    } catch {
      Issue.record("\(error)", sourceLocation: sourceLocation)
    }
  }

  @Test func badRecipesNameTheYAMLPath() throws {
    let header = "inputs: {base: DEMO/base, a: DEMO/finetune-a}\n"
    expectInvalid(
      header + "steps:\n  - {name: m, method: frankenmerge, base: base, models: [a]}\noutputs: {m: x}\n",
      path: "steps[0].method")
    expectInvalid(
      header + "steps:\n  - {name: m, method: ties, base: base, models: [a, nowhere]}\noutputs: {m: x}\n",
      path: "steps[0].models[1]")
    expectInvalid(
      header + "steps:\n  - {name: m, method: ties, base: base, models: [a], colour: red}\noutputs: {m: x}\n",
      path: "steps[0].colour")
    expectInvalid(
      header + "steps:\n  - {name: a, method: linear, models: [base]}\noutputs: {a: x}\n", path: "steps[0].name")
    expectInvalid(header + "steps:\n  - {name: m, method: linear, models: [a]}\n", path: "")
    expectInvalid("merge_method: ties\nbase_model: DEMO/base\nslices: []\n", path: "slices")
    expectInvalid(
      header
        + "steps:\n  - {name: m, method: ties, base: base, models: [a], parameters: {density: [{filter: x}]}}\noutputs: {m: x}\n",
      path: "steps[0].parameters.density[0]")
  }

  @Test func cyclesAreRefusedNamingTheSteps() throws {
    let yaml = """
      inputs: {base: \(exampleFolder.file("demo/base"))}
      steps:
        - {name: x, method: linear, models: [y]}
        - {name: y, method: linear, models: [z]}
        - {name: z, method: linear, models: [x]}
      outputs: {x: out}
      """
    #expect(throws: RecipeError.cycle(file: "c.yaml", steps: ["x", "y", "z", "x"])) {
      try RecipeRunner(try Recipe.parse(yaml, file: "c.yaml"))
    }
  }

  @Test func aParameterOutOfRangeFailsNamingTheStepAndNothingIsWritten() throws {
    let out = exampleFolder.file("demo/out/never")
    let yaml = """
      inputs: {base: \(exampleFolder.file("demo/base")), a: \(exampleFolder.file("demo/finetune-a"))}
      steps:
        - {name: m, method: ties, base: base, models: [a], parameters: {density: 1.5}}
      outputs: {m: \(out)}
      """
    // Refused when the recipe is checked, before any step runs.
    #expect(
      throws: RecipeError.invalid(
        file: "d.yaml", path: "steps[0].parameters.density", line: 3, reason: "ties: 1.5 is not a number in (0, 1]")
    ) {
      try RecipeRunner(try Recipe.parse(yaml, file: "d.yaml"))
    }
    #expect(!FileManager.default.fileExists(atPath: out))
  }

  /// A chain of intermediates (task vectors, a soup of them, a bf16 copy) run with every
  /// intermediate in memory, none, and some: the same bytes, the config carried through.
  @Test func intermediatesInMemoryGiveTheSameBytesAsSpilledOnes() throws {
    let demo = exampleFolder.file("demo")
    func recipe(_ tag: String) throws -> Recipe {
      try Recipe.parse(
        """
        inputs: {base: \(demo)/base, a: \(demo)/finetune-a, b: \(demo)/finetune-b}
        steps:
          - {name: tau_a, method: task-vector, model: a, base: base}
          - {name: tau_b, method: task-vector, model: b, base: base}
          - {name: soup, method: linear, models: [tau_a, tau_b]}
          - {name: narrow, method: convert, model: soup, dtype: bf16}
          - {name: edited, method: apply, base: base, models: [narrow]}
          - {name: sum, method: task-arithmetic, base: narrow, models: [tau_a]}
        outputs: {edited: \(demo)/out/held-\(tag), sum: \(demo)/out/held-sum-\(tag)}
        """, file: "held.yaml")
    }
    let tauBytes = try openCheckpoint("\(demo)/base").tensors.reduce(0) { $0 + $1.count * 4 }
    var heldSteps: [String: [String]] = [:]
    for (tag, budget) in [("all", RecipeRunner.defaultMemoryBudget), ("none", 0), ("some", tauBytes + 1)] {
      var lines: [String] = []
      try RecipeRunner(try recipe(tag)).run(overwrite: true, memoryBudget: budget, report: { lines.append($0) })
      heldSteps[tag] = lines.filter { $0.hasSuffix("-> memory") }.map { String($0.prefix { $0 != ":" }) }
      #expect(
        FileManager.default.fileExists(atPath: "\(demo)/out/held-sum-\(tag)/config.json"),
        "\(tag): the config follows the intermediates")
    }
    #expect(heldSteps["all"] == ["tau_a", "tau_b", "soup", "narrow"])
    #expect(heldSteps["none"] == [])
    #expect(heldSteps["some"] == ["tau_a"], "tau_b no longer fits while tau_a is held")
    for output in ["held", "held-sum"] {
      let all = readBytes("\(demo)/out/\(output)-all/model.safetensors")
      #expect(
        all == readBytes("\(demo)/out/\(output)-none/model.safetensors")
          && all == readBytes("\(demo)/out/\(output)-some/model.safetensors"))
    }
    // edited = base + bf16(mean of the task vectors): one bf16 rounding of the soup, one of the sum.
    let name = "model.layers.1.mlp.up_proj.weight"
    let (base, a, b) = try (
      openCheckpoint("\(demo)/base").tensor(named: name).scalars,
      openCheckpoint("\(demo)/finetune-a").tensor(named: name).scalars,
      openCheckpoint("\(demo)/finetune-b").tensor(named: name).scalars
    )
    let got = try openCheckpoint("\(demo)/out/held-all").tensor(named: name).scalars
    for i in got.indices {
      let soup = 0.5 * (Double(a[i]) - Double(base[i])) + 0.5 * (Double(b[i]) - Double(base[i]))
      let expected = Double(base[i]) + soup
      #expect(abs(Double(got[i]) - expected) <= (abs(soup) + abs(expected)) * 0x1p-8 + 1e-12)
    }
    #expect(try FileManager.default.contentsOfDirectory(atPath: "\(demo)/out").allSatisfy { !$0.hasPrefix(".") })
  }

  /// Network steps read model folders, so an intermediate they read is spilled whatever the budget.
  @Test func anIntermediateReadByANetworkStepIsSpilled() throws {
    let demo = exampleFolder.file("demo")
    let yaml = """
      inputs: {a: \(demo)/finetune-a, b: \(demo)/finetune-b}
      steps:
        - {name: tokens, method: synthetic-tokens, parameters: {sequences: 2, length: 8}}
        - {name: soup, method: linear, models: [a, b]}
        - {name: scored, method: eval, model: soup, data: tokens}
      outputs: {scored: \(demo)/out/soup-eval.json}
      """
    var lines: [String] = []
    let results = try RecipeRunner(try Recipe.parse(yaml, file: "net.yaml")).run(
      overwrite: true, report: { lines.append($0) })
    let soup = try #require(lines.first { $0.hasPrefix("soup:") })
    #expect(!soup.hasSuffix("-> memory") && soup.contains(".recipe-steps.mergekit-tmp-"), "\(soup)")
    #expect(FileManager.default.fileExists(atPath: "\(demo)/out/soup-eval.json"))
    // Steps are reported by their labels, and the recipe ends with the table of its eval steps,
    // whose perplexity is the one the report file holds.
    #expect(lines.contains("scored: eval of tokens, soup -> \(demo)/out/soup-eval.json"), "\(lines)")
    let saved =
      try JSONSerialization.jsonObject(
        with: Data(contentsOf: URL(fileURLWithPath: "\(demo)/out/soup-eval.json"))) as? [String: Any]
    let perplexity = try #require(saved?["perplexity"] as? Double)
    #expect(results.first == "results:" && results[1].contains("perplexity"))
    #expect(
      results[2].hasPrefix("  scored  soup") && results[2].hasSuffix(String(format: "%.3f", perplexity)), "\(results)")
  }

  /// The runner computes weighted-sum merges (linear, task arithmetic, SLERP, Model Stock, apply)
  /// and the task vectors of TIES, DARE and breadcrumbs straight from the stored bytes; that
  /// must give the bits of each method's own in-memory merge of the decoded tensors, for bf16
  /// and f32 outputs and inputs of mixed dtypes.
  @Test func mergesFromStoredBytesMatchTheInMemoryMerge() throws {
    let demo = exampleFolder.file("demo")
    try FileManager.default.createDirectory(atPath: exampleFolder.file("demo/out"), withIntermediateDirectories: true)
    // The tensors of two layers (and the embeddings), b in f32.
    let selection = try TensorSelection(select: #"layers\.[01]\.|embed"#, drop: nil, renames: [])
    let (base, a, b) = try [("base", nil), ("finetune-a", nil), ("finetune-b", DType.f32)].map { name, type in
      let path = exampleFolder.file("demo/out/stored-\(name).safetensors")
      try copyCheckpoint(
        from: try openCheckpoint("\(demo)/\(name)"), to: path, selection: selection, castTo: type,
        options: WriteOptions(overwrite: true))
      return try openCheckpoint(path)
    }.triple
    let cases:
      [(method: any MergeMethod, base: (any Checkpoint)?, models: [any Checkpoint], global: [String: ParameterValue])] =
        [
          (LinearMerge(), nil, [a, b], ["weight": .number(0.3)]),
          (TaskVectorMerge.taskArithmetic, base, [a, b], ["lambda": .number(0.7)]),
          (SlerpMerge(), base, [b], ["t": .number(0.3)]),
          (ModelStockMerge(), base, [a, b], [:]),
          (TaskVectors.Sum(), base, [a, b], ["scale": .number(-0.4)]),
          (TaskVectorMerge.ties, base, [a, b], ["density": .number(0.3)]),
          (TaskVectorMerge.dareTies, base, [a, b], ["density": .number(0.5), "seed": .number(3)]),
          (TaskVectorMerge.breadcrumbs, base, [a, b], ["density": .number(0.5), "gamma": .number(0.05)]),
        ]
    for (method, base, models, global) in cases {
      // The task-vector methods read their inputs the same way for any output dtype: one is enough.
      for type in method is TaskVectorMerge && method.name != "task-arithmetic" ? [DType.bf16] : [.bf16, .f32] {
        let plan = try MergePlan(
          method: method, base: base, models: models, global: global, perModel: [], outputType: type)
        let out = exampleFolder.file("demo/out/stored-\(method.name)-\(type).safetensors")
        try MergeRunner.run(plan, to: out, options: WriteOptions(overwrite: true))
        let written = try openCheckpoint(out)
        var compared = 0
        for item in plan.items where item.action == .merge {
          let inputs = MergeInputs(
            name: item.name, base: try base?.tensor(named: item.name),
            models: try models.map { try $0.tensor(named: item.name) })
          let expected = try method.merge(inputs, try plan.resolver.resolve(tensor: item.name))
          #expect(try written.read(item.name) == expected.encoded(as: type), "\(method.name) \(type): \(item.name)")
          compared += 1
        }
        #expect(compared > 15)
      }
    }
  }
}

extension Array {
  /// The first three elements.
  var triple: (Element, Element, Element) { (self[0], self[1], self[2]) }
}

/// `alpha_search` in a recipe, and its checks (in the serialized suite: the recipes share the
/// example folder's outputs).
extension RecipeRunnerTests {
  /// Every candidate is scored and the best (the first of ties) is kept: the reported best is
  /// the argmax of the reported curve, for each SVD merge of recipes/svd-alpha.yaml.
  @Test func theBestAlphaIsTheArgmaxOfTheCurve() throws {
    let work = exampleFolder.path
    var lines: [String] = []
    try RecipeRunner(try loadRecipe("svd-alpha.yaml", in: work)).run(overwrite: true, report: { lines.append($0) })
    var curve: [(Double, Double)] = []
    var checked = 0
    for line in lines {
      let trimmed = line.trimmingCharacters(in: .whitespaces)
      let parts = trimmed.split(separator: " ")
      if trimmed.hasPrefix("alpha "), let alpha = Double(parts[1].dropLast()),
        let score = Double(parts.last!.dropLast())
      {
        curve.append((alpha, score))
      } else if trimmed.hasPrefix("best alpha "), let alpha = Double(parts[2].dropLast()) {
        let best = curve.max { $0.1 < $1.1 }!.1
        #expect(alpha == curve.first { $0.1 == best }!.0, "\(curve)")
        #expect(curve.count == 19)
        checked += 1
        curve = []
      }
    }
    #expect(checked == 3)
  }

  @Test func alphaSearchChecks() throws {
    let head = """
      inputs: {base: DEMO/base, a: DEMO/finetune-a, b: DEMO/finetune-b}
      steps:
        - {name: data, method: synthetic-data, parameters: {task_count: 2, classes_per_task: 2, features: 8, samples_per_class: 4}}

      """
    func expectInvalid(_ step: String, _ path: String, _ reason: String) {
      let yaml = (head + "  - " + step + "\noutputs: {m: DEMO/out/m}\n").replacingOccurrences(
        of: "DEMO", with: exampleFolder.file("demo"))
      do {
        try RecipeRunner(try Recipe.parse(yaml, file: "bad.yaml")).run(dryRun: true)
        Issue.record("\(step) was accepted")
      } catch {
        #expect("\(error)".contains(path) && "\(error)".contains(reason), "\(error)")
      }
    }
    expectInvalid(
      "{name: m, method: iso-c, base: base, models: [a, b], alpha_search: '0.5:2:0.1'}", "steps[1].alpha_search",
      "needs 'data'")
    expectInvalid(
      "{name: m, method: iso-c, base: base, models: [a, b], data: data, alpha_search: '2:1:0.1'}",
      "steps[1].alpha_search", "start <= end")
    expectInvalid(
      "{name: m, method: ties, base: base, models: [a, b], data: data, alpha_search: '0.5:2:0.1'}",
      "steps[1].alpha_search", "no alpha parameter")
    expectInvalid(
      "{name: m, method: iso-c, base: base, models: [a, b], data: data, alpha_search: '0.5:2:0.1', parameters: {alpha: 1}}",
      "steps[1].parameters.alpha", "not both")
    expectInvalid("{name: m, method: iso-c, base: base, models: [a, b], data: data}", "steps[1].data", "alpha_search")
  }
}
