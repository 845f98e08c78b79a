import Checkpoint
import Foundation
import Merge
import Nets
import Tensor
import Testing

@testable import Operations
@testable import TestSupport

/// Low-rank task vectors: written by `LowRankTaskVector`, read back as the dense task vectors
/// they stand for, and merged from their triplets.
@Suite struct LowRankTaskVectorTests {
  static let shapes: [(String, [Int])] = [
    ("model.layers.0.self_attn.q_proj.weight", [40, 32]), ("model.layers.0.input_layernorm.weight", [32]),
    ("model.layers.0.mlp.up_proj.weight", [64, 32]), ("model.layers.0.mlp.down_proj.weight", [32, 64]),
  ]

  /// A base and `count` fine-tunes: base plus a rank-3 change plus a little noise.
  func models(in folder: TemporaryFolder, count: Int) throws -> [String] {
    var paths: [String] = []
    for i in 0...count {
      let path = folder.file(i == 0 ? "base.safetensors" : "ft\(i).safetensors")
      let tensors = Self.shapes.enumerated().map { j, entry -> (String, TensorData) in
        let base = CounterRNG(seed: 1, stream: "base\(j)").normalTensor(entry.1, scale: 0.5)
        guard i > 0 else { return (entry.0, base.encoded(as: .f32)) }
        var tuned = base
        let rng = CounterRNG(seed: UInt64(i), stream: "ft\(j)")
        if entry.1.count == 2 {
          let left = rng.normalTensor([entry.1[0], 3], scale: 0.1)
          let right = CounterRNG(seed: UInt64(i), stream: "r\(j)").normalTensor([3, entry.1[1]], scale: 0.1)
          let change = BLAS.matmul(left, right)
          for k in tuned.scalars.indices { tuned.scalars[k] += change.scalars[k] + 0.001 * rng.normal(UInt64(k)) }
        } else {
          for k in tuned.scalars.indices { tuned.scalars[k] += 0.01 * rng.normal(UInt64(k)) }
        }
        return (entry.0, tuned.encoded(as: .f32))
      }
      try writeCheckpoint(tensors, to: path)
      paths.append(path)
    }
    return paths
  }

  func write(_ finetuned: String, base: String, rule: LowRankTaskVector.Rule, to path: String) throws
    -> [LowRankTaskVector.Entry]
  {
    try LowRankTaskVector.write(
      finetuned: try openCheckpoint(finetuned), base: try openCheckpoint(base), rule: rule, to: path,
      options: WriteOptions(
        format: path.hasSuffix(".mkz") ? .mkz : .safetensors, metadata: ["mergekit.kind": "task-vector"],
        overwrite: true))
  }

  @Test func readingAFactoredMatrixIsItsProductAndRangesAreSlices() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let paths = try models(in: folder, count: 1)
    let out = folder.file("tv.mkz")
    let entries = try write(paths[1], base: paths[0], rule: .sizeFraction(0.3), to: out)
    #expect(entries.filter { $0.rank != nil }.count == 3)
    let tv = try openCheckpoint(out)
    let factored = try #require(tv as? FactoredCheckpoint)
    #expect(tv.tensors.map(\.name) == Self.shapes.map(\.0))
    #expect(tv.metadata[LowRankLayout.metadataKey] == nil)
    for (name, shape) in Self.shapes where shape.count == 2 {
      let f = try #require(try factored.factors(of: name))
      // Float64 product of the stored factors.
      let (m, n, k) = (shape[0], shape[1], f.rank)
      let expected = (0..<(m * n)).map { e in
        (0..<k).reduce(0.0) {
          $0 + Double(f.u.scalars[(e / n) * k + $1]) * Double(f.s[$1]) * Double(f.vt.scalars[$1 * n + e % n])
        }
      }
      let whole = try tv.tensor(named: name)
      #expect(whole.shape == shape)
      let scale = expected.map(abs).max() ?? 1
      #expect(zip(whole.scalars, expected).allSatisfy { abs(Double($0) - $1) <= 1e-6 * scale })
      // Any byte range, aligned or not, is the slice of the whole.
      let bytes = whole.encoded(as: .f32).bytes
      for range in [0..<4, 6..<130, (4 * n - 3)..<(4 * n + 9), (bytes.count - 17)..<bytes.count] {
        #expect(try tv.withBytes(of: name, range: range) { Array($0) } == Array(bytes[range]), "\(name) \(range)")
      }
      // The factors: orthonormal u columns and vt rows, descending s.
      #expect(f.s == f.s.sorted(by: >))
      let gram = BLAS.matmul(f.u, f.u, transposeA: true)
      for i in 0..<k { for j in 0..<k { #expect(abs(gram.scalars[i * k + j] - (i == j ? 1 : 0)) < 1e-5) } }
    }
    // Densifying gives the same bytes.
    let dense = folder.file("dense.safetensors")
    let writer = try CheckpointWriter(destination: dense, tensors: tv.tensors, options: WriteOptions(overwrite: true))
    for info in tv.tensors { try writer.write(info.name, try tv.read(info.name)) }
    try writer.finish()
    let reopened = try openCheckpoint(dense)
    for info in tv.tensors { #expect(try reopened.read(info.name) == tv.read(info.name)) }
  }

  @Test func sizeFractionAndEnergyRules() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let paths = try models(in: folder, count: 1)
    let entries = try write(paths[1], base: paths[0], rule: .sizeFraction(0.1), to: folder.file("a.mkz"))
    for entry in entries where entry.rank != nil {
      let ratio = Double(entry.storedBytes) / Double(entry.denseBytes)
      #expect(ratio <= 0.1 && ratio > 0.05, "\(entry.name): \(ratio)")
    }
    // Energy: the kept rank is the fewest triplets holding 99% (checked on an exact SVD).
    let energyEntries = try write(paths[1], base: paths[0], rule: .energy(0.99), to: folder.file("e.mkz"))
    let base = try openCheckpoint(paths[0])
    let tuned = try openCheckpoint(paths[1])
    for entry in energyEntries where entry.rank != nil {
      let d = DoubleMatrix(
        rows: entry.shape[0], columns: entry.shape[1],
        values: zip(try tuned.tensor(named: entry.name).scalars, try base.tensor(named: entry.name).scalars).map {
          Double($0) - Double($1)
        })
      let s2 = try LAPACK.svd(d).s.map { $0 * $0 }
      let total = s2.reduce(0, +)
      let k = try #require(entry.rank)
      #expect(s2.prefix(k).reduce(0, +) >= 0.99 * total * (1 - 1e-9))
      #expect(s2.prefix(k - 1).reduce(0, +) < 0.99 * total)
      #expect(abs(entry.keptEnergy - s2.prefix(k).reduce(0, +) / total) < 1e-5)
    }
  }

  /// TSV-M, Iso-C, Iso-CTS (from the triplets) and task arithmetic (from ranges of the dense
  /// view) give the same merge from low-rank task vectors as from their densified copies.
  @Test(arguments: ["tsv", "iso-c", "iso-cts", "task-arithmetic"])
  func mergesFromFactoredAndDenseTaskVectorsAgree(_ method: String) throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let paths = try models(in: folder, count: 3)
    var factored: [String] = []
    var dense: [String] = []
    for i in 1...3 {
      let path = folder.file("tv\(i).mkz")
      _ = try write(paths[i], base: paths[0], rule: .sizeFraction(0.3), to: path)
      factored.append(path)
      let copy = folder.file("tv\(i)-dense.safetensors")
      let tv = try openCheckpoint(path)
      var options = WriteOptions(overwrite: true)
      options.metadata = tv.metadata
      let writer = try CheckpointWriter(destination: copy, tensors: tv.tensors, options: options)
      for info in tv.tensors { try writer.write(info.name, try tv.read(info.name)) }
      try writer.finish()
      dense.append(copy)
    }
    let base = try openCheckpoint(paths[0])
    let merge = try MergeRegistry.method(named: method)
    func merged(_ inputs: [String]) throws -> any Checkpoint {
      let plan = try MergePlan(
        method: merge, base: base, models: try inputs.map { try openCheckpoint($0) }, global: [:],
        perModel: Array(repeating: method == "task-arithmetic" ? ["weight": .number(1)] : [:], count: 3))
      let out = folder.file("\(method)-\(inputs[0].hasSuffix(".mkz") ? "factored" : "dense").safetensors")
      try MergeRunner.run(plan, to: out, options: WriteOptions(overwrite: true))
      return try openCheckpoint(out)
    }
    let (a, b) = (try merged(factored), try merged(dense))
    for (name, shape) in Self.shapes {
      let x = try a.tensor(named: name).scalars
      let y = try b.tensor(named: name).scalars
      let scale = y.map { abs(Double($0)) }.max() ?? 1
      let worst = zip(x, y).map { abs(Double($0) - Double($1)) }.max() ?? 0
      #expect(worst <= 1e-5 * scale, "\(method) \(name) \(shape): \(worst / scale)")
      // And not the base: the merge did something.
      #expect(x != (try base.tensor(named: name).scalars), "\(method) \(name)")
    }
  }

  /// The runner hands the SVD-based merges a low-rank task vector's triplets, and the exact
  /// stored values of a dense one; other methods get base + tau.
  @Test func theRunnerPassesStoredTaskVectors() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let paths = try models(in: folder, count: 1)
    _ = try write(paths[1], base: paths[0], rule: .sizeFraction(0.3), to: folder.file("tv.mkz"))
    let base = try openCheckpoint(paths[0])
    let name = "model.layers.0.mlp.up_proj.weight"
    for (method, expectsFactors) in [(TSVMerge() as any MergeMethod, true), (TaskVectorMerge.taskArithmetic, false)] {
      let plan = try MergePlan(
        method: method, base: base, models: [try openCheckpoint(folder.file("tv.mkz"))], global: [:],
        perModel: [expectsFactors ? [:] : ["weight": .number(1)]])
      let item = try #require(plan.items.first { $0.name == name })
      let stored = try MergeRunner.storedTaskVectors(
        item, plan: plan, base: try base.tensor(named: name), arithmetic: .exact)
      if expectsFactors {
        guard case .factored(let f)? = stored?.first else {
          Issue.record("\(method.name) did not get the triplets")
          continue
        }
        #expect(f.rows == 64 && f.columns == 32 && f.rank == 6)
      } else {
        #expect(stored == nil)
      }
    }
  }

  @Test func brokenLayoutsAreErrorsNamingTheMatrix() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let u = randomTensorData(.f32, shape: [4, 2], seed: 1)
    let s = randomTensorData(.f32, shape: [2], seed: 2)
    let vt = randomTensorData(.f32, shape: [2, 3], seed: 3)
    func attempt(_ entry: String, _ tensors: [(String, TensorData)]) throws -> String {
      let path = folder.file("bad.safetensors")
      try writeCheckpoint(
        tensors, to: path, options: WriteOptions(metadata: [LowRankLayout.metadataKey: entry], overwrite: true))
      do {
        _ = try openCheckpoint(path)
        return "opened"
      } catch { return "\(error)" }
    }
    let good: [(String, TensorData)] = [("w.lowrank.u", u), ("w.lowrank.s", s), ("w.lowrank.vt", vt)]
    #expect(try attempt(#"{"w": [4, 3]}"#, good) == "opened")
    #expect(try attempt(#"{"w": [4, 4]}"#, good).contains("do not make a 4 x 4 matrix"))
    #expect(try attempt(#"{"w": [4, 3]}"#, Array(good.prefix(2))).contains("lacks one of its factors"))
    #expect(try attempt(#"["w"]"#, good).contains("not a JSON object"))
    #expect(try attempt(#"{"w": [-4, 3]}"#, good).contains("positive sizes"))
    #expect(try attempt(#"{"w": [4611686018427387904, 4]}"#, good).contains("positive sizes"))
    #expect(try attempt(#"{"w": [4, 3]}"#, good + [("w", vt)]).contains("both dense and as low-rank"))
    // A rank-0 (or tiny) factorisation cannot stand for a huge matrix.
    let empty: [(String, TensorData)] = [
      ("w.lowrank.u", randomTensorData(.f32, shape: [1_000_000, 0], seed: 1)),
      ("w.lowrank.s", randomTensorData(.f32, shape: [0], seed: 2)),
      ("w.lowrank.vt", randomTensorData(.f32, shape: [0, 1_000_000], seed: 3)),
    ]
    #expect(try attempt(#"{"w": [1000000, 1000000]}"#, empty).contains("too large for what it stores"))
  }

  /// Without a base, task vectors merge among themselves as they are; mixed with a model they
  /// are an error naming the task vector.
  @Test func withoutABaseTaskVectorsMergeAsTheyAre() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let paths = try models(in: folder, count: 2)
    for i in 1...2 {
      _ = try write(paths[i], base: paths[0], rule: .sizeFraction(0.3), to: folder.file("tv\(i).mkz"))
    }
    let vectors = try (1...2).map { try openCheckpoint(folder.file("tv\($0).mkz")) }
    let soup = try MergePlan(method: LinearMerge(), base: nil, models: vectors, global: [:], perModel: [[:], [:]])
    #expect(soup.models.allSatisfy { !($0 is TaskVectorModel) })
    #expect(throws: CheckpointError.self) {
      try MergePlan(
        method: LinearMerge(), base: nil, models: [vectors[0], try openCheckpoint(paths[1])], global: [:],
        perModel: [[:], [:]])
    }
  }
}

@Suite struct AlphaGridTests {
  @Test func gridsParseInclusivelyAndRefuseNonsense() throws {
    #expect(try AlphaSearch.grid("0.5:2:0.5") == [0.5, 1, 1.5, 2])
    #expect(try AlphaSearch.grid("0.1:0.3:0.1") == [0.1, 0.2, 0.3])
    #expect(try AlphaSearch.grid("1:1:0.1") == [1])
    for bad in ["2:1:0.1", "0:1:0", "0:1", "a:b:c", "0:1e6:0.1", "0:inf:1", "0:1:-0.1"] {
      #expect(throws: OperationError.self, "\(bad)") { try AlphaSearch.grid(bad) }
    }
  }
}
