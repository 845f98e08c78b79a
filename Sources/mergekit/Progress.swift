import Foundation
import Operations

#if canImport(Glibc)
  import Glibc
#endif

/// Progress on stderr: a bar with rate and ETA, redrawn in place on a terminal; on a pipe or
/// file, a plain line every 10% (so logs stay readable). Silent with `quiet`, and for work that
/// ends within half a second (a rate measured over microseconds tells nobody anything).
/// Updates may come from several threads (parallel work); they are drawn one at a time.
final class Progress: ProgressMeter, @unchecked Sendable {
  private let lock = NSLock()
  private let label: String
  private let quiet: Bool
  private let isTerminal = isatty(STDERR_FILENO) != 0
  private let start = Date()
  private var lastDraw = Date.distantPast
  private var lastDecile = -1
  private var hasPrinted = false
  private static let quietPeriod: TimeInterval = 0.5

  /// What `update` counts: bytes (rates in B/s) or named items (training batches).
  private let unit: ProgressUnit

  init(_ label: String, quiet: Bool = false, unit: ProgressUnit = .bytes) {
    self.label = label
    self.quiet = quiet
    self.unit = unit
  }

  /// Reports `done` of `total` units, with an optional note (the running loss).
  func update(_ done: Int, _ total: Int, note: String? = nil) {
    guard !quiet, total > 0 else { return }
    lock.lock()
    defer { lock.unlock() }
    let fraction = min(1, Double(done) / Double(total))
    let elapsed = Date().timeIntervalSince(start)
    guard elapsed >= Self.quietPeriod else { return }
    hasPrinted = true
    let rate = elapsed > 0 ? Double(done) / elapsed : 0
    let eta = rate > 0 ? Double(total - done) / rate : 0
    let speed: String
    switch unit {
    case .bytes: speed = formatBytes(Int(rate)) + "/s"
    case .items(let name): speed = String(format: "%.1f %@/s", rate, name)
    }
    let figures =
      String(format: "%3.0f%%  %@  ETA %@", fraction * 100, speed, Self.duration(eta)) + (note.map { "  " + $0 } ?? "")
    if isTerminal {
      guard Date().timeIntervalSince(lastDraw) > 0.1 || done == total else { return }
      lastDraw = Date()
      let width = 30
      let filled = Int(fraction * Double(width))
      let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
      FileHandle.standardError.write(Data("\r\(label) [\(bar)] \(figures)\u{1B}[K".utf8))
    } else {
      let decile = Int(fraction * 10)
      guard decile > lastDecile else { return }
      lastDecile = decile
      FileHandle.standardError.write(Data("\(label): \(figures)\n".utf8))
    }
  }

  /// Ends the bar with the total time.
  func finish() {
    lock.lock()
    defer { lock.unlock() }
    let elapsed = Date().timeIntervalSince(start)
    guard !quiet, hasPrinted || elapsed >= Self.quietPeriod else { return }
    let end = String(format: "%@: done in %.2f s\n", label, elapsed)
    FileHandle.standardError.write(Data(((isTerminal ? "\r\u{1B}[K" : "") + end).utf8))
  }

  static func duration(_ seconds: Double) -> String {
    let s = Int(seconds.rounded())
    return s >= 3600 ? String(format: "%dh%02dm", s / 3600, (s % 3600) / 60) : String(format: "%d:%02d", s / 60, s % 60)
  }
}
