import Checkpoint
import Foundation
import Tensor
import Testing

@testable import TestSupport

/// Runs the built `mergekit` binary (next to the test bundle, or `MERGEKIT_BIN`).
struct CLI {
  static let binary: String = {
    if let explicit = ProcessInfo.processInfo.environment["MERGEKIT_BIN"] { return explicit }
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    var folder = URL(fileURLWithPath: exe).deletingLastPathComponent()
    while folder.path != "/" {
      let candidate = folder.appendingPathComponent("mergekit").path
      var isDirectory: ObjCBool = false
      if FileManager.default.fileExists(atPath: candidate, isDirectory: &isDirectory), !isDirectory.boolValue {
        return candidate
      }
      folder = folder.deletingLastPathComponent()
    }
    return "mergekit"
  }()

  struct Result {
    var status: Int32
    var stdout: String
    var stderr: String
  }

  static func run(_ arguments: String...) throws -> Result { try run(arguments, environment: [:]) }

  /// Runs the binary with this process's environment, `environment` added and `unset` removed.
  static func run(_ arguments: [String], environment: [String: String], unset: [String] = []) throws -> Result {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: binary)
    process.arguments = arguments
    process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }.filter {
      !unset.contains($0.key)
    }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return Result(
      status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
      stderr: String(decoding: stderr, as: UTF8.self))
  }
}

@Suite(.serialized) struct CLITests {
  /// OpenBLAS names its kernels on stderr as it loads (`OPENBLAS_VERBOSE=2`). Where it falls back
  /// to the generic Prescott kernels on a CPU with AVX2 or AVX-512, the command must start again
  /// with the kernels the CPU supports; anywhere else it must run once, as loaded.
  @Test func theCommandRunsWithTheKernelsTheCPUSupports() throws {
    let result = try CLI.run(["--version"], environment: ["OPENBLAS_VERBOSE": "2"], unset: ["OPENBLAS_CORETYPE"])
    #expect(result.status == 0)
    let cores = result.stderr.split(separator: "\n").filter { $0.hasPrefix("Core: ") }.map { String($0.dropFirst(6)) }
    guard let first = cores.first else { Issue.record("OpenBLAS printed no core name: \(result.stderr)"); return }
    if first.lowercased() == "prescott", let better = BLAS.coreType(cpuFlags: BLAS.cpuFlags()) {
      #expect(cores == [first, better])
    } else {
      #expect(cores == [first])
    }
  }

  @Test func coreTypesFollowTheCPUFeatures() {
    #expect(
      BLAS.coreType(cpuFlags: ["sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"])
        == "SkylakeX")
    #expect(BLAS.coreType(cpuFlags: ["avx2", "fma", "avx512f"]) == "Haswell")  // AVX-512 without BW/DQ/VL
    #expect(BLAS.coreType(cpuFlags: ["sse2", "avx"]) == nil)
  }

  @Test func exampleInspectConvertVerifyDiffRoundTrip() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let example = try CLI.run("example", folder.file("ex"))
    #expect(example.status == 0, "\(example.stderr)")
    let base = folder.file("ex/base")
    let tuned = folder.file("ex/finetune-a")

    let inspect = try CLI.run("inspect", base, "--json")
    #expect(inspect.status == 0)
    let summary = try JSONSerialization.jsonObject(with: Data(inspect.stdout.utf8)) as! [String: Any]
    let rows = summary["tensors"] as! [[String: Any]]
    #expect(rows.count == 39)
    #expect(summary["total_parameters"] as! Int == rows.reduce(0) { $0 + ($1["parameters"] as! Int) })
    #expect(rows.allSatisfy { ($0["dtype"] as! String) == "BF16" })

    let delta = folder.file("tuned-mkz")
    #expect(try CLI.run("convert", tuned, delta, "--format", "mkz", "--base", base, "-q").status == 0)
    #expect(
      FileManager.default.fileExists(atPath: delta + "/model.mkz")
        && FileManager.default.fileExists(atPath: delta + "/config.json"))
    let table = try CLI.run("inspect", delta)
    #expect(table.stdout.contains("stored in"), "\(table.stdout)")
    #expect(try CLI.run("verify", delta, "--base", base, "-q").status == 0)
    let back = folder.file("back")
    #expect(try CLI.run("convert", delta, back, "--base", base, "-q").status == 0)
    #expect(readBytes(back + "/model.safetensors") == readBytes(tuned + "/model.safetensors"))
    #expect(FileManager.default.fileExists(atPath: back + "/config.json"))

    let same = try CLI.run("diff", tuned, back, "--json")
    let sameRows =
      (try JSONSerialization.jsonObject(with: Data(same.stdout.utf8)) as! [String: Any])["tensors"] as! [[String: Any]]
    #expect(
      sameRows.count == 39
        && sameRows.allSatisfy { ($0["max_abs"] as! Double) == 0 && ($0["cosine"] as! Double) > 0.9999999 })
    let different = try CLI.run("diff", base, tuned)
    #expect(different.status == 0)
    #expect(different.stdout.contains("39 tensors compared, 0 identical"), "\(different.stdout)")
  }

  @Test func convertCastsSelectsAndShards() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    _ = try CLI.run("example", folder.file("ex"))
    let out = folder.file("mlp")
    let result = try CLI.run(
      "convert", folder.file("ex/base"), out, "--dtype", "f32", "--select", "mlp", "--shard-size", "2MB", "-q")
    #expect(result.status == 0, "\(result.stderr)")
    let model = try openCheckpoint(out)
    #expect(model.tensors.count == 12 && model.tensors.allSatisfy { $0.name.contains("mlp") && $0.dtype == .f32 })
    #expect(model.files.count > 1)
    #expect(FileManager.default.fileExists(atPath: out + "/model.safetensors.index.json"))
  }

  @Test func verifyNamesTheDamagedChunkAndExitsOne() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    _ = try CLI.run("example", folder.file("ex"))
    let path = folder.file("base.mkz")
    #expect(try CLI.run("convert", folder.file("ex/base"), path, "-q").status == 0)
    var bytes = readBytes(path)
    bytes[40_000] ^= 0x20
    writeBytes(bytes, to: path)
    let result = try CLI.run("verify", path, "-q")
    #expect(result.status == 1)
    #expect(result.stderr.contains("Error: \(path): tensor 'model.embed_tokens.weight' chunk 0"), "\(result.stderr)")
  }

  @Test func usageErrorsExit64AndRunErrorsExit1WithoutOutput() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    #expect(try CLI.run("inspect", folder.file("missing")).status == 64)
    #expect(try CLI.run("nonsense").status == 64)
    writeBytes([1, 2, 3, 4, 5, 6, 7, 8, 9], to: folder.file("bad.safetensors"))
    #expect(try CLI.run("convert", folder.file("bad.safetensors"), folder.file("o.mkz"), "--dtype", "f7").status == 64)
    let run = try CLI.run("convert", folder.file("bad.safetensors"), folder.file("o.mkz"))
    #expect(run.status == 1)
    #expect(run.stderr.hasPrefix("Error: \(folder.file("bad.safetensors")): header length"), "\(run.stderr)")
    #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path) == ["bad.safetensors"])
  }

  /// One file output, and a folder output whose first shards are complete when the signal lands;
  /// Ctrl-C's SIGTERM and a closed terminal's SIGHUP are handled alike.
  @Test(arguments: [["out.mkz"], ["out", "--format", "mkz", "--shard-size", "8MB"]], [SIGTERM, SIGHUP])
  func anInterruptedConvertLeavesNothingBehind(_ output: [String], _ signal: Int32) throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let process = try startLongConversion(in: folder, output: output)
    kill(process.processIdentifier, signal)
    process.waitUntilExit()
    #expect(process.terminationStatus == 128 + signal)
    #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path) == ["in.safetensors"])
  }

  /// SIGKILL cannot be handled: the temporary stays, and the next run writing into the folder
  /// removes it (its process no longer exists) and says so.
  @Test func aKilledConversionsTemporariesAreRemovedByTheNextRun() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let process = try startLongConversion(in: folder, output: ["out", "--format", "mkz", "--shard-size", "8MB"])
    kill(process.processIdentifier, SIGKILL)
    process.waitUntilExit()
    let left = try FileManager.default.contentsOfDirectory(atPath: folder.path).filter { $0 != "in.safetensors" }
    #expect(left == [".out.mergekit-tmp-\(process.processIdentifier)"])
    let next = try CLI.run("convert", folder.file("in.safetensors"), folder.file("copy.safetensors"), "-q")
    #expect(next.stderr.contains("removed \(folder.file(left.first ?? "?"))"), "\(next.stderr)")
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == [
        "copy.safetensors", "in.safetensors",
      ])
  }

  /// Starts `convert` on 64 MB of f32 in `folder` and returns once its temporary output exists.
  func startLongConversion(in folder: TemporaryFolder, output: [String]) throws -> Process {
    // 64 MB of f32 (a 1 MiB random block repeated): a second or more of work, so the signal
    // lands mid-write.
    let block = Data(randomTensorData(.f32, shape: [1 << 18], seed: 5).bytes)
    let total = 64 * block.count
    var header = #"{"w":{"dtype":"F32","shape":[\#(total / 4)],"data_offsets":[0,\#(total)]}}"#
    while header.utf8.count % 8 != 0 { header += " " }
    writeBytes(safetensorsBytes(header: header), to: folder.file("in.safetensors"))
    let file = try FileHandle(forWritingTo: URL(fileURLWithPath: folder.file("in.safetensors")))
    try file.seekToEnd()
    for _ in 0..<64 { try file.write(contentsOf: block) }
    try file.close()

    let process = Process()
    process.executableURL = URL(fileURLWithPath: CLI.binary)
    process.arguments = ["convert", folder.file("in.safetensors"), folder.file(output[0]), "-q"] + output.dropFirst()
    process.standardError = Pipe()
    try process.run()
    let deadline = Date().addingTimeInterval(30)
    var sawTemporaryOutput = false
    while process.isRunning && Date() < deadline && !sawTemporaryOutput {
      sawTemporaryOutput = (try FileManager.default.contentsOfDirectory(atPath: folder.path)).contains {
        $0.hasPrefix(".\(output[0]).mergekit-tmp-")
      }
      usleep(sawTemporaryOutput ? 300_000 : 5_000)
    }
    #expect(sawTemporaryOutput && process.isRunning, "the conversion ended before it could be interrupted")
    return process
  }
}
