// Helpers shared by the benchmark executables: timing, the no-work read and write baselines, and running
// the mergekit binary as a child process to measure its wall time and peak memory.
import Checkpoint
import Foundation

public func seconds(_ body: () throws -> Void) rethrows -> Double {
  let start = DispatchTime.now().uptimeNanoseconds
  try body()
  return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
}

public func gbps(_ bytes: Int, _ time: Double) -> String { String(format: "%.2f GB/s", Double(bytes) / time / 1e9) }

/// Reads every byte of every tensor with no work beyond a running XOR (the read baseline).
public func plainRead(_ model: any Checkpoint) throws -> Double {
  var sink: UInt64 = 0
  let time = try seconds {
    for info in model.tensors {
      try model.withBytes(of: info.name, range: nil) { raw in
        let words = raw.count / 8
        for i in 0..<words { sink ^= raw.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self) }
      }
    }
  }
  if sink == 42 { print("") }
  return time
}

/// Writes `bytes` bytes to a new file at `path` in 1 MiB pieces, with no work (the write baseline);
/// the file is removed afterwards, outside the timing. 1 MiB, as the checkpoint writer stages its
/// output: writes of 2 MiB and more can get the page cache's 2 MiB folios, whose copy cost several
/// times more on this project's machines (docs/performance.md).
public func plainWrite(_ bytes: Int, to path: String) throws -> Double {
  let piece = [UInt8](repeating: 0x5A, count: 1 << 20)
  let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
  guard descriptor >= 0 else { throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: path]) }
  defer { try? FileManager.default.removeItem(atPath: path) }
  var failed = false
  let time = seconds {
    var left = bytes
    piece.withUnsafeBytes { raw in
      while left > 0, let start = raw.baseAddress {
        let written = write(descriptor, start, min(left, raw.count))
        guard written > 0 else {
          failed = true
          return
        }
        left -= written
      }
    }
    if close(descriptor) != 0 { failed = true }
  }
  if failed { throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: path]) }
  return time
}

/// Whether this machine is a virtual machine that hands its free memory back to the host: a
/// virtio balloon offering free page reporting (feature bit 5, `VIRTIO_BALLOON_F_REPORTING`).
/// There, memory the guest freed a few seconds ago has been given back, and the first write to
/// each of its pages waits on the host to supply it again: a page-cache write of 1 GB onto such
/// memory took 6-9 s on this project's machines, against 0.4 s onto memory just freed
/// (docs/performance.md, "The write path").
public func hostTakesFreeMemory() -> Bool {
  let devices = "/sys/bus/virtio/devices"
  let names = (try? FileManager.default.contentsOfDirectory(atPath: devices)) ?? []
  return names.contains { name in
    let folder = devices + "/" + name
    guard (try? String(contentsOfFile: folder + "/device", encoding: .utf8))?.hasPrefix("0x0005") == true,
      let features = try? String(contentsOfFile: folder + "/features", encoding: .utf8)
    else { return false }
    let bits = Array(features.utf8)
    return bits.count > 5 && bits[5] == UInt8(ascii: "1")
  }
}

/// Writes `bytes` to a scratch file at `path` and removes it, so that the guest has that much
/// memory freed just now: the timed run after it gets its page cache and heap from those pages,
/// which the host has not taken back yet (the balloon reports free pages after about two
/// seconds). Without it, a run's figures depend on how long the machine sat idle before it.
public func recycleMemory(_ bytes: Int, at path: String) throws {
  _ = try plainWrite(bytes, to: path)
}

/// Runs the mergekit binary and returns (wall seconds, its peak RSS in MB). The child reports
/// its own VmHWM (`MERGEKIT_REPORT_PEAK_RSS=1`): wait4's ru_maxrss would also count this
/// process's memory, which Linux folds into a vforked child's high-water mark at exec.
public func runChild(_ binary: String, _ arguments: [String]) throws -> (Double, Double) {
  let process = Process()
  process.executableURL = URL(fileURLWithPath: binary)
  process.arguments = arguments
  var environment = ProcessInfo.processInfo.environment
  environment["MERGEKIT_REPORT_PEAK_RSS"] = "1"
  process.environment = environment
  let errors = Pipe()
  process.standardError = errors
  process.standardOutput = FileHandle.nullDevice
  var stderr = ""
  let time = try seconds {
    try process.run()
    stderr = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
  }
  guard process.terminationStatus == 0 else {
    FileHandle.standardError.write(Data("mergekit \(arguments.joined(separator: " ")) failed:\n\(stderr)".utf8))
    exit(1)
  }
  let peak = stderr.split(separator: "\n").first { $0.hasPrefix("peak RSS: ") }
  let kilobytes = peak.flatMap { Double($0.dropFirst(10).split(separator: " ")[0]) } ?? .nan
  return (time, kilobytes * 1024 / 1e6)  // seconds, MB
}

/// The `mergekit` binary next to this benchmark executable (same build folder).
public func siblingBinary(_ name: String = "mergekit") -> String {
  URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(name).path
}

/// `--name value` from the command line.
public func option(_ name: String, in arguments: [String] = Array(CommandLine.arguments.dropFirst())) -> String? {
  arguments.firstIndex(of: name).flatMap { $0 + 1 < arguments.count ? arguments[$0 + 1] : nil }
}

/// Where `record` appends its JSON lines: `--json FILE`, else `bench-data/benchmarks.jsonl`.
let recordFile = option("--json") ?? "bench-data/benchmarks.jsonl"

/// When this run started (ISO 8601), the same in every record it writes.
let runStarted = ISO8601DateFormatter().string(from: Date())

/// The machine, for the records: core count and CPU model.
let machine: String = {
  let model =
    (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?.split(separator: "\n")
    .first { $0.hasPrefix("model name") }.map { String($0.split(separator: ":", maxSplits: 1).last ?? "") }?
    .trimmingCharacters(in: .whitespaces) ?? "unknown CPU"
  return "\(ProcessInfo.processInfo.activeProcessorCount) cores, \(model)"
}()

/// Appends one measure as a JSON line (`{"benchmark", "measure", "value", "unit", "started",
/// "machine", ...details}`) so that runs can be compared over time; the printed table stays
/// the human view. A file that cannot be written is reported once and the run goes on.
public func record(
  _ benchmark: String, _ measure: String, _ value: Double, unit: String, _ details: [String: Any] = [:]
) {
  var object: [String: Any] = [
    "benchmark": benchmark, "measure": measure, "value": value.isFinite ? value : 0, "unit": unit,
    "started": runStarted, "machine": machine,
  ]
  object.merge(details) { a, _ in a }
  guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
  else { return }
  let url = URL(fileURLWithPath: recordFile)
  try? FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
  if !FileManager.default.fileExists(atPath: url.path) {
    _ = FileManager.default.createFile(atPath: url.path, contents: nil)
  }
  guard let handle = try? FileHandle(forWritingTo: url) else {
    if !recordWarned {
      recordWarned = true
      print("(cannot append to \(url.path); figures are printed only)")
    }
    return
  }
  defer { try? handle.close() }
  _ = try? handle.seekToEnd()
  try? handle.write(contentsOf: data + Data("\n".utf8))
}

nonisolated(unsafe) var recordWarned = false
