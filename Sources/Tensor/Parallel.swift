import Dispatch
import Foundation

/// Work split across cores. Results never depend on the thread count: callers give each item a
/// fixed slot, and the split only decides who computes it.
public enum Parallel {
  /// Worker count: `MERGEKIT_THREADS` if set to a positive integer, else the active core count.
  public static let threadCount: Int = {
    if let text = ProcessInfo.processInfo.environment["MERGEKIT_THREADS"], let n = Int(text), n > 0 { return n }
    return max(1, ProcessInfo.processInfo.activeProcessorCount)
  }()

  /// Runs `body(worker, item)` for every item in `0..<count` on up to `threadCount` workers; each
  /// worker takes items `worker, worker + workers, ...`, so per-worker state (a codec context)
  /// can be created once per worker. Rethrows the error of the lowest-numbered failing item.
  @inlinable
  public static func forEach(
    _ count: Int, workers: Int = Parallel.threadCount,
    _ body: (_ worker: Int, _ item: Int) throws -> Void
  ) throws {
    guard count > 0 else { return }
    let n = max(1, min(workers, count))
    if n == 1 {
      for item in 0..<count { try body(0, item) }
      return
    }
    let errors = ErrorSlots(count: count)
    withoutActuallyEscaping(body) { body in
      DispatchQueue.concurrentPerform(iterations: n) { worker in
        for item in Swift.stride(from: worker, to: count, by: n) {
          do { try body(worker, item) } catch { errors.set(item, error) }
        }
      }
    }
    if let first = errors.first { throw first }
  }

  /// Runs `body(item)` for every item in `0..<count` on up to `threadCount` workers, each taking
  /// the next item not yet taken when it finishes one: for items of very different cost (whole
  /// tensors), where fixed strides leave workers idle. Rethrows the error of the lowest-numbered
  /// failing item.
  public static func forEachTakingTurns(
    _ count: Int, workers: Int = Parallel.threadCount, _ body: (_ item: Int) throws -> Void
  ) throws {
    let next = TurnCounter()
    try forEach(min(workers, count), workers: workers) { _, _ in
      while let item = next.take(below: count) { try body(item) }
    }
  }

  /// Hands out 0, 1, 2, ... to workers, one at a time.
  final class TurnCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func take(below limit: Int) -> Int? {
      lock.withLock {
        guard value < limit else { return nil }
        value += 1
        return value - 1
      }
    }
  }

  @usableFromInline
  final class ErrorSlots: @unchecked Sendable {
    private var slots: [Error?]
    private let lock = NSLock()
    @usableFromInline init(count: Int) { slots = Array(repeating: nil, count: count) }
    @usableFromInline func set(_ index: Int, _ error: Error) { lock.withLock { slots[index] = error } }
    @usableFromInline var first: Error? { lock.withLock { slots.lazy.compactMap { $0 }.first } }
  }
}

/// Results filled by parallel workers, one slot each.
public final class ResultSlots<Value>: @unchecked Sendable {
  private var values: [Value?]
  private let lock = NSLock()
  public init(count: Int) { values = Array(repeating: nil, count: count) }
  public func set(_ i: Int, _ value: Value) { lock.withLock { values[i] = value } }
  /// Replaces slot `i` by `change` of its value, atomically; returns the new value.
  @discardableResult public func update(_ i: Int, _ change: (Value) -> Value) -> Value {
    lock.withLock {
      guard let value = values[i] else { preconditionFailure("result slot \(i) updated before it was filled") }
      let new = change(value)
      values[i] = new
      return new
    }
  }
  public func get(_ i: Int) -> Value {
    lock.withLock {
      guard let value = values[i] else { preconditionFailure("result slot \(i) read before it was filled") }
      return value
    }
  }
}
