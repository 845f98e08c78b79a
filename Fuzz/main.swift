// mergekit-fuzz: mutates valid inputs of every kind a stranger can hand the tool (safetensors,
// shard indexes, .mkz, recipes, mergekit configs, config.json, .npy, CSV, JSON lines) and runs
// the parsers on them in process. Any crash, hang (an input running past the time limit) or
// resident memory over the cap stops the run, saves the input under the output folder and exits
// 1. Thrown errors are the expected outcome of a bad input and count as "refused".
//
//   mergekit-fuzz [--seconds 60] [--seed 1] [--out .build/fuzz] [--timeout 5] [--memory-mb 1024]
//                 [--kinds safetensors,mkz,...]
//   mergekit-fuzz --replay FILE --kind KIND      run one saved input
import Checkpoint
import Foundation
import Nets
import Operations
import Recipe

#if canImport(Glibc)
  import Glibc
#endif

struct Options {
  var seconds = 60.0
  var seed: UInt64 = 1
  var out = ".build/fuzz"
  var timeout = 5.0
  var memoryMB = 1024
  var kinds: Set<String>?
  var replay: String?
  var replayKind: String?

  init(_ arguments: [String]) {
    var rest = arguments[...]
    func value(_ flag: String) -> String {
      guard let v = rest.popFirst() else { fail("\(flag) needs a value") }
      return v
    }
    while let flag = rest.popFirst() {
      switch flag {
      case "--seconds": seconds = Double(value(flag)) ?? { fail("--seconds takes a number") }()
      case "--seed": seed = UInt64(value(flag)) ?? { fail("--seed takes a non-negative integer") }()
      case "--out": out = value(flag)
      case "--timeout": timeout = Double(value(flag)) ?? { fail("--timeout takes seconds") }()
      case "--memory-mb": memoryMB = Int(value(flag)) ?? { fail("--memory-mb takes an integer") }()
      case "--kinds": kinds = Set(value(flag).split(separator: ",").map(String.init))
      case "--replay": replay = value(flag)
      case "--kind": replayKind = value(flag)
      case "-h", "--help":
        print(
          "usage: mergekit-fuzz [--seconds S] [--seed N] [--out DIR] [--timeout S] [--memory-mb M] [--kinds a,b]\n"
            + "       mergekit-fuzz --replay FILE --kind KIND")
        exit(0)
      default: fail("unknown argument '\(flag)'")
      }
    }
  }
}

func fail(_ message: String) -> Never {
  FileHandle.standardError.write(Data("mergekit-fuzz: \(message)\n".utf8))
  exit(64)
}

// The state the crash handler and the watchdog read: C strings prepared before each input, so
// that the handler only calls async-signal-safe functions (rename, write, _exit).
nonisolated(unsafe) var currentInput = UnsafeMutablePointer<CChar>.allocate(capacity: 4096)
nonisolated(unsafe) var crashCopy = UnsafeMutablePointer<CChar>.allocate(capacity: 4096)
nonisolated(unsafe) var hangCopy = UnsafeMutablePointer<CChar>.allocate(capacity: 4096)
nonisolated(unsafe) var memoryCopy = UnsafeMutablePointer<CChar>.allocate(capacity: 4096)
nonisolated(unsafe) var inputStarted = 0.0  // monotonic seconds; 0 between inputs

func setCString(_ buffer: UnsafeMutablePointer<CChar>, _ text: String) {
  let bytes = Array(text.utf8.prefix(4095))
  for (i, b) in bytes.enumerated() { buffer[i] = CChar(bitPattern: b) }
  buffer[bytes.count] = 0
}

func monotonic() -> Double {
  var t = timespec()
  clock_gettime(CLOCK_MONOTONIC, &t)
  return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

/// Saves the input in flight as `target` and exits 1 with `message` (async-signal-safe).
func saveAndExit(_ target: UnsafeMutablePointer<CChar>, _ message: StaticString) -> Never {
  rename(currentInput, target)
  _ = write(2, message.utf8Start, message.utf8CodeUnitCount)
  _ = write(2, target, strlen(target))
  _ = write(2, "\n", 1)
  _exit(1)
}

func installCrashHandlers() {
  for signalNumber in [SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGABRT, SIGFPE] {
    var action = sigaction()
    action.__sigaction_handler.sa_handler = { _ in
      saveAndExit(crashCopy, "mergekit-fuzz: CRASH (signal); input saved as ")
    }
    sigemptyset(&action.sa_mask)
    action.sa_flags = Int32(truncatingIfNeeded: SA_RESETHAND)
    sigaction(signalNumber, &action, nil)
  }
}

/// Resident memory of this process in bytes (from /proc/self/statm).
func residentBytes() -> Int {
  guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
  let fields = text.split(separator: " ")
  return fields.count > 1 ? (Int(fields[1]) ?? 0) * Int(sysconf(Int32(_SC_PAGESIZE))) : 0
}

func startWatchdog(timeout: Double, memoryCap: Int) {
  let thread = Thread {
    while true {
      usleep(50_000)
      let started = inputStarted
      if started > 0 && monotonic() - started > timeout {
        saveAndExit(hangCopy, "mergekit-fuzz: HANG (input ran past the time limit); input saved as ")
      }
      if started > 0 && residentBytes() > memoryCap {
        saveAndExit(memoryCopy, "mergekit-fuzz: MEMORY (resident memory over the cap); input saved as ")
      }
    }
  }
  thread.stackSize = 1 << 20
  thread.start()
}

func writeFile(_ path: String, _ bytes: [UInt8]) {
  let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
  guard fd >= 0 else { fail("cannot write \(path): \(String(cString: strerror(errno)))") }
  bytes.withUnsafeBytes { buffer in
    var done = 0
    while done < buffer.count {
      let n = write(fd, buffer.baseAddress.map { $0 + done }, buffer.count - done)
      if n <= 0 { break }
      done += n
    }
  }
  close(fd)
}

// MARK: - Main

let options = Options(Array(CommandLine.arguments.dropFirst()))
let out = URL(fileURLWithPath: options.out).standardizedFileURL.path
let work = out + "/work"
try? FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
TemporaryOutputs.report = { _ in }
let kinds: [InputKind]
do { kinds = try makeInputKinds(work: work) } catch { fail("cannot prepare the seeds: \(error)") }
let selected = kinds.filter { options.kinds?.contains($0.name) ?? true }
if let wanted = options.kinds, let unknown = wanted.first(where: { name in !kinds.contains { $0.name == name } }) {
  fail("unknown kind '\(unknown)'; kinds: \(kinds.map(\.name).joined(separator: ", "))")
}

var limit = rlimit(rlim_cur: rlim_t(16) << 30, rlim_max: rlim_t(16) << 30)
setrlimit(Int32(RLIMIT_AS.rawValue), &limit)  // an absurd allocation fails at once instead of paging
installCrashHandlers()
startWatchdog(timeout: options.timeout, memoryCap: options.memoryMB << 20)

/// Runs one input of `kind`; true when the parser accepted it, false when it threw.
func execute(_ kind: InputKind, _ bytes: [UInt8], number: Int) -> Bool {
  let path = work + "/" + kind.file
  writeFile(path, bytes)
  let ext = URL(fileURLWithPath: kind.file).pathExtension
  setCString(currentInput, path)
  setCString(crashCopy, "\(out)/crash-\(kind.name)-\(number).\(ext)")
  setCString(hangCopy, "\(out)/hang-\(kind.name)-\(number).\(ext)")
  setCString(memoryCopy, "\(out)/memory-\(kind.name)-\(number).\(ext)")
  inputStarted = monotonic()
  defer { inputStarted = 0 }
  do {
    try kind.run(path)
    return true
  } catch {
    return false
  }
}

if let replay = options.replay {
  guard let name = options.replayKind, let kind = kinds.first(where: { $0.name == name }) else {
    fail("--replay needs --kind, one of \(kinds.map(\.name).joined(separator: ", "))")
  }
  let bytes = (try? readAll(replay)) ?? { fail("cannot read \(replay)") }()
  do {
    let path = work + "/" + kind.file
    writeFile(path, bytes)
    setCString(currentInput, path)
    setCString(crashCopy, "\(out)/replayed-crash")
    setCString(hangCopy, "\(out)/replayed-hang")
    setCString(memoryCopy, "\(out)/replayed-memory")
    inputStarted = monotonic()
    try kind.run(path)
    print("accepted")
  } catch {
    print("refused: \(error)")
  }
  exit(0)
}

var mutator = Mutator(seed: options.seed)
var corpus = Dictionary(uniqueKeysWithValues: selected.map { ($0.name, $0.seeds) })
var counts = Dictionary(uniqueKeysWithValues: selected.map { ($0.name, (run: 0, accepted: 0)) })
for kind in selected {
  for seed in kind.seeds where !execute(kind, seed, number: 0) {
    fail("the \(kind.name) seed is refused by its own parser; the seed generator is out of date")
  }
}
let start = monotonic()
var number = 0
print(
  "mergekit-fuzz: seed \(options.seed), \(options.seconds) s, kinds \(selected.map(\.name).joined(separator: ", "))")
while monotonic() - start < options.seconds {
  for kind in selected {
    number += 1
    let pool = corpus[kind.name] ?? kind.seeds
    let parent = pool[mutator.random.below(pool.count)]
    let other = pool[mutator.random.below(pool.count)]
    var input = mutator.mutate(parent, text: kind.isText, other: other)
    if let repair = kind.repair, mutator.random.below(2) == 0 { repair(&input) }
    let accepted = execute(kind, input, number: number)
    counts[kind.name, default: (0, 0)].run += 1
    if accepted {
      counts[kind.name, default: (0, 0)].accepted += 1
      // Accepted mutants are new valid inputs: mutating them reaches further into the parser.
      if pool.count < 64 { corpus[kind.name, default: []].append(input) }
    }
  }
}
let elapsed = monotonic() - start
let total = counts.values.reduce(0) { $0 + $1.run }
for kind in selected {
  let c = counts[kind.name] ?? (0, 0)
  print(
    "  \(kind.name.padding(toLength: 16, withPad: " ", startingAt: 0)) \(c.run) inputs, \(c.run - c.accepted) refused, "
      + "\(c.accepted) accepted")
}
print(
  String(
    format: "mergekit-fuzz: %d inputs in %.1f s (%.0f per second), no crash, hang or memory blow-up", total, elapsed,
    Double(total) / elapsed))
