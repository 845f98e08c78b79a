import Checkpoint
import Foundation
import Testing

@testable import TestSupport

/// A recipe is checked whole before its first step runs: a bad value in any step, a step name
/// that is a path, or two outputs on one path write nothing and exit 64 naming the YAML path.
@Suite struct RecipeValidationTests {
  static let examples: TemporaryFolder = {
    let folder = TemporaryFolder.removedAtExit()
    _ = try? CLI.run("example", folder.file("ex"))
    return folder
  }()

  func recipe(
    _ folder: TemporaryFolder, method: String = "ties", models: String = "[soup, b]", secondStep: String,
    outputs: String? = nil
  ) throws -> String {
    let ex = Self.examples.file("ex")
    let yaml = """
      inputs: {base: \(ex)/base, a: \(ex)/finetune-a, b: \(ex)/finetune-b}
      steps:
        - {name: soup, method: linear, models: [a, b]}
        - name: merged
          method: \(method)
          base: base
          models: \(models)
          \(secondStep)
      outputs:
        \(outputs ?? "soup: \(folder.file("soup"))\n  merged: \(folder.file("merged"))")

      """
    let path = folder.file("recipe.yaml")
    try Data(yaml.utf8).write(to: URL(fileURLWithPath: path))
    return path
  }

  @Test func aBadValueInTheLastStepWritesNothing() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let path = try recipe(folder, secondStep: "parameters: {density: 1.5}")
    for dryRun in [[], ["--dry-run"]] {
      let run = try CLI.run(["run", path] + dryRun, environment: [:])
      #expect(run.status == 64, "\(run.stderr)")
      #expect(run.stderr.contains("recipe.yaml:8: steps[1].parameters.density"), "\(run.stderr)")
      #expect(run.stderr.contains("1.5 is not a number in (0, 1]"), "\(run.stderr)")
      #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path) == ["recipe.yaml"])
    }
    let missing = try CLI.run(
      "run", try recipe(folder, method: "slerp", models: "[soup]", secondStep: "parameters: {}"), "--dry-run")
    #expect(
      missing.status == 64 && missing.stderr.contains("steps[1].parameters.t")
        && missing.stderr.contains("is required"), "\(missing.stderr)")
    let perModel = try CLI.run(
      "run", try recipe(folder, secondStep: "parameters: {density: 0.5, weight: [0.5, 2, nan]}"), "--dry-run")
    #expect(perModel.status == 64 && perModel.stderr.contains("steps[1].parameters.weight"), "\(perModel.stderr)")
    let typo = try CLI.run("run", try recipe(folder, secondStep: "parameter: {density: 0.5}"), "--dry-run")
    #expect(typo.status == 64 && typo.stderr.contains("unknown key 'parameter'"), "\(typo.stderr)")
  }

  @Test func aValidRecipesDryRunPrintsThePlanAndWritesNothing() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let path = try recipe(folder, secondStep: "parameters: {density: 0.5}")
    let dry = try CLI.run("run", path, "--dry-run")
    #expect(dry.status == 0, "\(dry.stderr)")
    #expect(dry.stderr.contains("soup: linear of") && dry.stderr.contains("merged: ties of"), "\(dry.stderr)")
    #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path) == ["recipe.yaml"])
    let run = try CLI.run("run", path, "-q")
    #expect(run.status == 0, "\(run.stderr)")
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == ["merged", "recipe.yaml", "soup"])
  }

  @Test func stepNamesArePlainAndOutputsDoNotCollide() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let escape = try CLI.run("run", try recipe(folder, secondStep: "parameters: {density: 0.5}"), "--dry-run")
    #expect(escape.status == 0, "\(escape.stderr)")
    let yaml = try String(contentsOfFile: folder.file("recipe.yaml"), encoding: .utf8)
    try Data(
      yaml.replacingOccurrences(of: "name: soup", with: "name: ../keep").replacingOccurrences(
        of: "[soup, b]", with: "[../keep, b]"
      ).replacingOccurrences(of: "soup: ", with: "../keep: ").utf8
    )
    .write(to: URL(fileURLWithPath: folder.file("escape.yaml")))
    let dotted = try CLI.run("run", folder.file("escape.yaml"))
    #expect(
      dotted.status == 64 && dotted.stderr.contains("'../keep' is not a name: use letters, digits"), "\(dotted.stderr)")
    let twice = try CLI.run(
      "run",
      try recipe(
        folder, secondStep: "parameters: {density: 0.5}",
        outputs: "soup: \(folder.file("same"))\n  merged: \(folder.file("same"))"))
    #expect(twice.status == 64 && twice.stderr.contains("is also the path of output soup"), "\(twice.stderr)")
    let onInput = try CLI.run(
      "run",
      try recipe(
        folder, secondStep: "parameters: {density: 0.5}", outputs: "merged: \(Self.examples.file("ex/finetune-b"))"),
      "--overwrite")
    #expect(onInput.status == 64 && onInput.stderr.contains("is also read by the recipe"), "\(onInput.stderr)")
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == ["escape.yaml", "recipe.yaml"])
  }

  @Test func allowMissingIsAStepKeyAsItIsAFlag() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let ex = Self.examples.file("ex")
    let lacking = folder.file("lacking.safetensors")
    #expect(
      try CLI.run("convert", "\(ex)/finetune-b", lacking, "--drop", "layers\\.2\\.mlp\\.up_proj", "-q").status == 0)
    func recipe(_ extra: String) throws -> String {
      let yaml = """
        inputs: {base: \(ex)/base, a: \(ex)/finetune-a, b: \(lacking)}
        steps:
          - {name: m, method: ties, base: base, models: [a, b], parameters: {density: 0.5}\(extra)}
        outputs: {m: \(folder.file("m.safetensors"))}

        """
      let path = folder.file("r.yaml")
      try Data(yaml.utf8).write(to: URL(fileURLWithPath: path))
      return path
    }
    // A later merge step whose inputs do not line up is refused before the first step runs.
    let ex2 = "  - {name: soup, method: linear, models: [a, a]}\n"
    let twoSteps = try String(contentsOfFile: try recipe(""), encoding: .utf8)
      .replacingOccurrences(of: "steps:\n", with: "steps:\n" + ex2)
      .replacingOccurrences(of: "outputs: {", with: "outputs: {soup: \(folder.file("soup.safetensors")), ")
    try Data(twoSteps.utf8).write(to: URL(fileURLWithPath: folder.file("two.yaml")))
    let early = try CLI.run("run", folder.file("two.yaml"), "-q")
    #expect(
      early.status == 1 && early.stderr.contains("steps[1] (m)") && early.stderr.contains("lacks 1 tensor"),
      "\(early.stderr)")
    #expect(!FileManager.default.fileExists(atPath: folder.file("soup.safetensors")))
    let refused = try CLI.run("run", try recipe(""), "-q")
    #expect(
      refused.status == 1 && refused.stderr.contains("lacks 1 tensor the others have")
        && refused.stderr.contains("allow_missing"), "\(refused.stderr)")
    #expect(!FileManager.default.fileExists(atPath: folder.file("m.safetensors")))
    #expect(try CLI.run("run", try recipe(", allow_missing: true"), "-q").status == 0)
    let cli = folder.file("cli.safetensors")
    #expect(
      try CLI.run(
        "merge", "\(ex)/finetune-a", lacking, "--base", "\(ex)/base", "--method", "ties", "--density", "0.5",
        "--allow-missing", "-o", cli, "-q"
      ).status == 0)
    let (a, b) = (try openCheckpoint(cli), try openCheckpoint(folder.file("m.safetensors")))
    for info in a.tensors { #expect(try a.read(info.name) == b.read(info.name), "\(info.name)") }
    let typo = try CLI.run("run", try recipe(", allow_missing: maybe"), "--dry-run")
    #expect(typo.status == 64 && typo.stderr.contains("allow_missing is true or false"), "\(typo.stderr)")
  }

  @Test func pathParametersTakeTheLabelsOfEarlierSteps() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    // The statistics are an intermediate step that zip reads through its stats parameter.
    let yaml = """
      steps:
        - {name: data, method: synthetic-data, parameters: {features: 6, samples_per_class: 10}}
        - {name: a, method: train, data: data, parameters: {hidden: [8], epochs: 1, seed: 1}}
        - {name: b, method: train, data: data, parameters: {hidden: [8], epochs: 1, seed: 2}}
        - {name: s, method: stats, models: [a, b], data: data, parameters: {at: "hidden$"}}
        - {name: z, method: zip, models: [a, b], parameters: {stats: s}}
      outputs: {z: \(folder.file("z")), a: \(folder.file("a")), b: \(folder.file("b")), data: \(folder.file("d.safetensors"))}

      """
    try Data(yaml.utf8).write(to: URL(fileURLWithPath: folder.file("r.yaml")))
    let run = try CLI.run("run", folder.file("r.yaml"), "-q")
    #expect(run.status == 0, "\(run.stderr)")
    // The same chain by hand gives the same model.
    let (a, b, d) = (folder.file("a"), folder.file("b"), folder.file("d.safetensors"))
    #expect(
      try CLI.run("stats", a, b, "--data", d, "--at", "hidden$", "-o", folder.file("s.safetensors"), "-q").status == 0)
    #expect(
      try CLI.run("zip", a, b, "--stats", folder.file("s.safetensors"), "-o", folder.file("z-cli"), "-q").status == 0)
    let (fromRecipe, byHand) = (try openCheckpoint(folder.file("z")), try openCheckpoint(folder.file("z-cli")))
    for info in byHand.tensors { #expect(try fromRecipe.read(info.name) == byHand.read(info.name), "\(info.name)") }
  }
}
