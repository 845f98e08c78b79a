import Checkpoint
import Foundation
import Tensor
import Testing

@testable import TestSupport

/// `mergekit merge`, `task-vector` and `apply` on the example models, through the built binary.
@Suite(.serialized) struct MergeCommandTests {
  static let examples: TemporaryFolder = {
    let folder = TemporaryFolder.removedAtExit()
    _ = try? CLI.run("example", folder.file("ex"))
    return folder
  }()
  var base: String { Self.examples.file("ex/base") }
  var a: String { Self.examples.file("ex/finetune-a") }
  var b: String { Self.examples.file("ex/finetune-b") }

  func run(_ arguments: String..., environment: [String: String] = [:]) throws -> CLI.Result {
    try CLI.run(arguments, environment: environment)
  }

  @Test func taskArithmeticAtLambdaOneHalfIsTheLinearSoup() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let soup = folder.file("soup.safetensors")
    let ta = folder.file("ta.safetensors")
    #expect(try run("merge", a, b, "-o", soup, "--dtype", "f32", "-q").status == 0)
    let r = try run("merge", a, b, "--base", base, "--lambda", "0.5", "-o", ta, "--dtype", "f32", "-q")
    #expect(r.status == 0, "\(r.stderr)")
    let x = try openCheckpoint(soup)
    let y = try openCheckpoint(ta)
    for info in x.tensors {
      let (worst, failure) = compareClose(
        try x.tensor(named: info.name).scalars, try y.tensor(named: info.name).scalars, tolerance: 1e-6)
      #expect(failure == nil, "\(info.name): max difference \(worst)")
    }
  }

  @Test func taskVectorThenApplyGivesBackTheFineTuneExactly() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let tv = folder.file("tau.mkz")
    #expect(try run("task-vector", a, "--base", base, "-o", tv, "-q").status == 0)
    let vector = try openCheckpoint(tv)
    #expect(vector.tensors.allSatisfy { $0.dtype == .f32 })
    #expect(vector.metadata["mergekit.kind"] == "task-vector")
    let back = folder.file("back")
    let r = try run("apply", base, tv, "--scale", "1", "-o", back, "-q")
    #expect(r.status == 0, "\(r.stderr)")
    let original = try openCheckpoint(a)
    let rebuilt = try openCheckpoint(back)
    for info in original.tensors { #expect(try rebuilt.read(info.name) == original.read(info.name), "\(info.name)") }
    #expect(FileManager.default.fileExists(atPath: back + "/config.json"))
    // Negation: base - tau moves every weight the other way by the same amount.
    let forget = folder.file("forget.safetensors")
    #expect(try run("apply", base, tv, "--scale", "-1", "-o", forget, "--dtype", "f32", "-q").status == 0)
    let f = try openCheckpoint(forget)
    let name = "model.layers.1.mlp.up_proj.weight"
    let expected = zip(try base.tensor(name), try a.tensor(name)).map { 2 * $0 - $1 }
    #expect(compareClose(try f.tensor(named: name).scalars, expected, tolerance: 1e-6).firstFailure == nil)
  }

  @Test func outputIsBitIdenticalForAnyThreadCountShardSizeAndFormat() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let common = ["merge", a, b, "--base", base, "--method", "dare_ties", "--density", "0.4", "--seed", "7", "-q"]
    #expect(
      try CLI.run(common + ["-o", folder.file("one.safetensors")], environment: ["MERGEKIT_THREADS": "1"]).status == 0)
    #expect(
      try CLI.run(common + ["-o", folder.file("two.safetensors")], environment: ["MERGEKIT_THREADS": "2"]).status == 0)
    #expect(
      try CLI.run(
        common + ["-o", folder.file("sharded"), "--shard-size", "2MB", "--format", "mkz"],
        environment: ["MERGEKIT_THREADS": "3"]
      ).status == 0)
    #expect(readBytes(folder.file("one.safetensors")) == readBytes(folder.file("two.safetensors")))
    let one = try openCheckpoint(folder.file("one.safetensors"))
    let sharded = try openCheckpoint(folder.file("sharded"))
    #expect(FileManager.default.fileExists(atPath: folder.file("sharded/model.mkz.index.json")))
    for info in one.tensors { #expect(try sharded.read(info.name) == one.read(info.name)) }
    // A different seed draws different masks.
    #expect(
      try CLI.run(common.dropLast(2) + ["8", "-q", "-o", folder.file("other.safetensors")], environment: [:]).status
        == 0)
    #expect(readBytes(folder.file("other.safetensors")) != readBytes(folder.file("one.safetensors")))
  }

  /// `task-vector --rank-fraction`: a tenth of the size, read by `apply` and `convert` as the
  /// dense task vector, and merged by TSV-M from its triplets like its densified copy.
  @Test func lowRankTaskVectorsFromTheCommandLine() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let (tvA, tvB) = (folder.file("a.mkz"), folder.file("b.mkz"))
    let r = try run("task-vector", a, "--base", base, "-o", tvA, "--rank-fraction", "0.1")
    #expect(r.status == 0, "\(r.stderr)")
    #expect(r.stdout.contains("of the dense f32 task vector"))
    #expect(try run("task-vector", b, "--base", base, "-o", tvB, "--energy", "0.9", "-q").status == 0)
    let factored = try openCheckpoint(tvA)
    #expect(factored is FactoredCheckpoint)
    // inspect shows the dense view and says which matrices are stored low-rank.
    let listing = try run("inspect", tvA)
    #expect(listing.stdout.contains("low-rank") && listing.stdout.contains("stored as singular triplets"))
    let json = try run("inspect", tvA, "--json")
    let parsed = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
    let tensors = parsed?["tensors"] as? [[String: Any]] ?? []
    let lowRank = factored as? FactoredCheckpoint
    for entry in tensors {
      let name = entry["name"] as? String ?? ""
      #expect(entry["rank"] as? Int == lowRank?.rank(of: name), "\(name)")
    }
    #expect(tensors.contains { $0["rank"] != nil } && tensors.contains { $0["rank"] == nil })
    // convert densifies; apply adds the dense task vector.
    let dense = folder.file("a-dense.safetensors")
    #expect(try run("convert", tvA, dense, "-q").status == 0)
    let densified = try openCheckpoint(dense)
    #expect(densified.metadata[LowRankLayout.metadataKey] == nil)
    for info in factored.tensors { #expect(try densified.read(info.name) == factored.read(info.name)) }
    let applied = folder.file("applied.safetensors")
    #expect(try run("apply", base, tvA, "--scale", "1", "-o", applied, "--dtype", "f32", "-q").status == 0)
    let name = "model.layers.1.mlp.up_proj.weight"
    let expected = zip(try base.tensor(name), try factored.tensor(named: name).scalars).map { $0 + $1 }
    #expect(
      compareClose(try openCheckpoint(applied).tensor(named: name).scalars, expected, tolerance: 1e-6).firstFailure
        == nil)
    // TSV-M from the triplets and from the densified copies; and the same bytes at any thread count.
    let viaFactors = folder.file("tsv-factored.safetensors")
    let viaDense = folder.file("tsv-dense.safetensors")
    #expect(
      try CLI.run(
        ["merge", tvA, tvB, "--base", base, "--method", "tsv", "--dtype", "f32", "-q", "-o", viaFactors],
        environment: ["MERGEKIT_THREADS": "1"]
      ).status == 0)
    let denseB = folder.file("b-dense.safetensors")
    #expect(try run("convert", tvB, denseB, "-q").status == 0)
    #expect(
      try run("merge", dense, denseB, "--base", base, "--method", "tsv", "--dtype", "f32", "-q", "-o", viaDense).status
        == 0)
    let x = try openCheckpoint(viaFactors)
    let y = try openCheckpoint(viaDense)
    for info in x.tensors {
      let (worst, failure) = compareClose(
        try x.tensor(named: info.name).scalars, try y.tensor(named: info.name).scalars, tolerance: 1e-5)
      #expect(failure == nil, "\(info.name): \(worst)")
    }
    let again = folder.file("tsv-3.safetensors")
    #expect(
      try CLI.run(
        ["merge", tvA, tvB, "--base", base, "--method", "tsv", "--dtype", "f32", "-q", "-o", again],
        environment: ["MERGEKIT_THREADS": "3"]
      ).status == 0)
    #expect(readBytes(again) == readBytes(viaFactors))
    // Without a base, a task vector among the models is an error naming it.
    let bad = try run("merge", tvA, a, "-o", folder.file("bad.safetensors"), "-q")
    #expect(bad.status != 0 && bad.stderr.contains("a.mkz") && bad.stderr.contains("task vector"))
  }

  /// `--alpha-search` on the example decoders: each candidate's perplexity on token sequences,
  /// the lowest kept and written; the checks on its flags.
  @Test func alphaSearchKeepsTheLowestPerplexity() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let tokens = folder.file("tokens.jsonl")
    #expect(try run("synthetic-tokens", "-o", tokens, "--sequences", "6", "--length", "12", "-q").status == 0)
    let out = folder.file("best.safetensors")
    let r = try run(
      "merge", a, b, "--base", base, "--method", "iso-c", "--alpha-search", "0.5:1.5:0.5", "--data", tokens, "-o", out,
      "-q")
    #expect(r.status == 0, "\(r.stderr)")
    // Without -q each candidate is printed; with it only the choice.
    let chosen = try #require(r.stdout.split(separator: "\n").first { $0.hasPrefix("best alpha ") })
    let verbose = try run(
      "merge", a, b, "--base", base, "--method", "iso-c", "--alpha-search", "0.5:1.5:0.5", "--data", tokens, "-o",
      folder.file("again.safetensors"))
    let curve = verbose.stdout.split(separator: "\n").filter { $0.hasPrefix("alpha ") }.compactMap { line in
      Double(line.split(separator: " ").last ?? "").map { (String(line.split(separator: " ")[1].dropLast()), $0) }
    }
    #expect(curve.count == 3)
    let best = try #require(curve.min { $0.1 < $1.1 })
    #expect(chosen.hasPrefix("best alpha \(best.0) "), "\(chosen) against \(curve)")
    #expect(readBytes(out) == readBytes(folder.file("again.safetensors")))
    // The written merge is the merge at that alpha.
    let direct = folder.file("direct.safetensors")
    #expect(
      try run("merge", a, b, "--base", base, "--method", "iso-c", "--alpha", best.0, "-o", direct, "-q").status == 0)
    #expect(readBytes(direct) == readBytes(out))
    for (arguments, message) in [
      (["--method", "ties", "--alpha-search", "0.5:1:0.5", "--data", tokens], "no alpha parameter"),
      (["--method", "iso-c", "--alpha-search", "0.5:1:0.5"], "needs --data"),
      (["--method", "iso-c", "--alpha-search", "1:0.5:0.5", "--data", tokens], "start <= end"),
      (["--method", "iso-c", "--data", tokens], "are for --alpha-search"),
    ] {
      let bad = try CLI.run(
        ["merge", a, b, "--base", base, "-o", folder.file("bad.safetensors")] + arguments, environment: [:])
      #expect(bad.status != 0 && bad.stderr.contains(message), "\(arguments): \(bad.stderr)")
    }
  }

  /// `ties-global` through the streaming runner (model-wide passes, then the merge) against the
  /// official algorithm in float64 over the flattened checkpoints.
  @Test func globalTIESMergesWholeCheckpointsAsTheOfficialCode() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let shapes = [("a.weight", [60, 50]), ("b.bias", [70]), ("c.weight", [600, 40])]
    func checkpoint(_ name: String, scale: Float, seed: UInt64) throws -> [[Float]] {
      let values = shapes.enumerated().map { t, entry in
        CounterRNG(seed: seed, stream: entry.0).normalTensor(entry.1, scale: scale * Float(t + 1)).scalars
      }
      try ModelFolder.write(
        zip(shapes, values).map { ($0.0, Tensor(shape: $0.1, scalars: $1)) }, files: [:], dtype: .f32,
        to: folder.file(name), overwrite: false)
      return values
    }
    let base = try checkpoint("base", scale: 1, seed: 1)
    let deltas = try (0..<3).map { m in try checkpoint("d\(m)", scale: 0.02, seed: UInt64(10 + m)) }
    for m in 0..<3 {
      let tuned = zip(shapes, zip(base, deltas[m])).map { entry, pair in
        (entry.0, Tensor(shape: entry.1, scalars: zip(pair.0, pair.1).map { $0 + $1 }))
      }
      try ModelFolder.write(tuned, files: [:], dtype: .f32, to: folder.file("m\(m)"), overwrite: false)
    }
    let r = try run(
      "merge", folder.file("m0"), folder.file("m1"), folder.file("m2"), "--base", folder.file("base"), "--method",
      "ties-global", "--density", "0.15", "--lambda", "0.8", "-o", folder.file("out"), "-q")
    #expect(r.status == 0, "\(r.stderr)")
    // The reference: flatten, trim each task at the (D - k)-th smallest magnitude, elect, average.
    let tuned = (0..<3).map { m in
      (0..<3).flatMap { t in try! openCheckpoint(folder.file("m\(m)")).tensor(named: shapes[t].0).scalars }
    }
    let flatBase = (0..<3).flatMap { t in try! openCheckpoint(folder.file("base")).tensor(named: shapes[t].0).scalars }
    let d = flatBase.count
    let k = Int(0.15 * Double(d))
    let trimmed = tuned.map { model -> [Double] in
      let tau = zip(model, flatBase).map { Double($0 - $1) }
      let threshold = tau.map(abs).sorted()[d - k - 1]
      return tau.map { abs($0) >= threshold ? $0 : 0 }
    }
    let elected = (0..<d).map { i -> Double in
      let s = trimmed.reduce(0.0) { $0 + $1[i] }; return s > 0 ? 1 : (s < 0 ? -1 : 0)
    }
    let majority: Double = elected.reduce(0, +) >= 0 ? 1 : -1
    let expected = (0..<d).map { i -> Double in
      let sign = elected[i] != 0 ? elected[i] : majority
      let agreeing = trimmed.map { $0[i] }.filter { $0 != 0 && ($0 > 0 ? 1.0 : -1.0) == sign }
      return Double(flatBase[i]) + 0.8 * agreeing.reduce(0, +) / Double(max(agreeing.count, 1))
    }
    let out = (0..<3).flatMap { t in try! openCheckpoint(folder.file("out")).tensor(named: shapes[t].0).scalars }
    let (worst, failure) = compareClose(out, expected.map(Float.init), tolerance: 1e-6)
    #expect(failure == nil, "max difference \(worst)")
  }

  @Test func dryRunPrintsThePlanAndWritesNothing() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let r = try run(
      "merge", a, b, "--base", base, "--method", "ties", "--density", "0.3", "-o", folder.file("out"), "--dry-run")
    #expect(r.status == 0)
    #expect(r.stdout.contains("tensors:       39 (39 merged, 0 copied)"), "\(r.stdout)")
    #expect(r.stdout.contains("density=[0.3, 0.3]"))
    #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path).isEmpty)
  }

  @Test func badInputsAreClearErrorsWithNoOutput() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let out = folder.file("out.safetensors")
    let lacking = folder.file("lacking.safetensors")
    #expect(try run("convert", b, lacking, "--drop", "layers\\.2\\.mlp\\.up_proj", "-q").status == 0)
    let missing = try run("merge", a, lacking, "--base", base, "-o", out)
    #expect(missing.status == 1)
    #expect(
      missing.stderr.contains("\(lacking) lacks 1 tensor the others have: model.layers.2.mlp.up_proj.weight"),
      "\(missing.stderr)")
    let allowed = try run("merge", a, lacking, "--base", base, "-o", out, "--allow-missing", "-q")
    #expect(allowed.status == 0, "\(allowed.stderr)")
    #expect(
      try openCheckpoint(out).read("model.layers.2.mlp.up_proj.weight")
        == openCheckpoint(base).read("model.layers.2.mlp.up_proj.weight"))
    try FileManager.default.removeItem(atPath: out)

    let reshaped = folder.file("reshaped.safetensors")
    let embed = try openCheckpoint(a).read("model.embed_tokens.weight")
    try writeCheckpoint(
      [("model.embed_tokens.weight", TensorData(dtype: embed.dtype, shape: [1024, 512], bytes: embed.bytes))],
      to: reshaped)
    let shapes = try run("merge", folder.file("lacking.safetensors"), reshaped, "-o", out, "--allow-missing")
    #expect(
      shapes.status == 1 && shapes.stderr.contains("tensor 'model.embed_tokens.weight' has different shapes"),
      "\(shapes.stderr)")

    // A value out of range is a usage error found before any input is read, in a run and in a dry run alike.
    for dryRun in [[], ["--dry-run"]] {
      let density = try CLI.run(
        ["merge", a, b, "--base", base, "--method", "ties", "--density", "1.5", "-o", out] + dryRun, environment: [:])
      #expect(
        density.status == 64 && density.stderr.contains("ties: --density 1.5 is not a number in (0, 1]"),
        "\(density.stderr)")
    }
    let noT = try run("merge", a, "--base", base, "--method", "slerp", "-o", out)
    #expect(noT.status == 64 && noT.stderr.contains("slerp: --t is required"), "\(noT.stderr)")
    let noBase = try run("merge", a, b, "--method", "ties", "-o", out)
    #expect(noBase.status == 64 && noBase.stderr.contains("ties needs a base model"), "\(noBase.stderr)")
    let slerp3 = try run("merge", a, b, base, "--base", base, "--method", "slerp", "--t", "0.5", "-o", out)
    #expect(
      slerp3.status == 64 && slerp3.stderr.contains("slerp takes 1 model besides the base; got 3"), "\(slerp3.stderr)")
    let unknown = try run("merge", a, b, "--method", "linear", "--density", "0.5", "-o", out)
    #expect(unknown.status == 64 && unknown.stderr.contains("linear has no parameter --density"), "\(unknown.stderr)")
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == [
        "lacking.safetensors", "reshaped.safetensors",
      ])
  }
}

private extension String {
  /// The Float values of tensor `name` of the model folder at this path.
  func tensor(_ name: String) throws -> [Float] { try openCheckpoint(self).tensor(named: name).scalars }
}
