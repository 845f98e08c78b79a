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

  /// `body(item)` for every item in `0..<count`, in item order, computed on up to `workers`
  /// workers taking turns (`forEachTakingTurns`): for a few items of real work each.
  public static func map<Value>(
    _ count: Int, workers: Int = Parallel.threadCount, _ body: (_ item: Int) throws -> Value
  ) throws -> [Value] {
    let results = ResultSlots<Value>(count: count)
    try forEachTakingTurns(count, workers: workers) { results.set($0, try body($0)) }
    return (0..<count).map(results.get)
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

extension Parallel {
  /// Runs `produce(i)` for every item in `0..<count` on up to `workers` workers, each taking the
  /// next item once its size fits `budget` next to the items produced and not yet consumed (an
  /// item larger than the budget waits until nothing is held, then runs alone), and
  /// `consume(i, result)` in order 0, 1, 2, ...: whoever finishes the next item in order
  /// consumes every ready one, one worker at a time, while the others go on producing. So a
  /// write (the consumer) overlaps the next merges instead of waiting for a batch to end.
  /// Stops handing out items after a failure; rethrows the lowest-numbered failing item's error,
  /// and consumes nothing after it.
  public static func inOrder<Result>(
    _ count: Int, workers: Int = Parallel.threadCount, budget: Int, size: (Int) -> Int = { _ in 1 },
    produce: (Int) throws -> Result, consume: (Int, Result) throws -> Void
  ) throws {
    guard count > 0 else { return }
    let flight = InOrderFlight<Result>(sizes: (0..<count).map(size), budget: budget)
    // Errors are kept by the flight, which stops handing out work after one.
    try? forEach(min(workers, count), workers: workers) { _, _ in
      while let i = flight.take() {
        do {
          flight.finish(i, try produce(i))
          flight.consumeReady(consume)
        } catch {
          flight.fail(i, error)
        }
      }
    }
    try flight.check()
  }
}

/// The shared state of `Parallel.inOrder`: which item is next, the size held by items taken and
/// not yet consumed, finished results waiting for their turn, the first failure.
public final class InOrderFlight<Result>: @unchecked Sendable {
  private let condition = NSCondition()
  private let sizes: [Int]
  private let budget: Int
  private var next = 0
  private var held = 0
  private var nextToConsume = 0
  private var consuming = false
  private var results: [Result?]
  private var failure: (index: Int, error: Error)?

  public init(sizes: [Int], budget: Int) {
    self.sizes = sizes
    self.budget = budget
    results = Array(repeating: nil, count: sizes.count)
  }

  /// The next item to produce, once it fits (or nothing else is held); nil when all are taken
  /// or one failed.
  public func take() -> Int? {
    condition.lock()
    defer { condition.unlock() }
    while true {
      guard failure == nil, next < sizes.count else { return nil }
      if held == 0 || held + sizes[next] <= budget {
        next += 1
        held += sizes[next - 1]
        return next - 1
      }
      condition.wait()
    }
  }

  public func finish(_ i: Int, _ result: Result) {
    condition.lock()
    results[i] = result
    condition.unlock()
  }

  public func fail(_ i: Int, _ error: Error) {
    condition.lock()
    if failure.map({ i < $0.index }) ?? true { failure = (i, error) }
    condition.broadcast()
    condition.unlock()
  }

  /// Consumes, in order, every finished result that is next, unless another worker is
  /// consuming (it will take them); frees their share of the budget for the items waiting. A
  /// failed `consume(j, _)` is item j's failure: nothing after it is consumed.
  public func consumeReady(_ consume: (Int, Result) throws -> Void) {
    condition.lock()
    guard !consuming else { return condition.unlock() }
    consuming = true
    while failure == nil, nextToConsume < results.count, let result = results[nextToConsume] {
      let j = nextToConsume
      results[j] = nil
      condition.unlock()
      do { try consume(j, result) } catch {
        condition.lock()
        consuming = false
        if failure.map({ j < $0.index }) ?? true { failure = (j, error) }
        condition.broadcast()
        condition.unlock()
        return
      }
      condition.lock()
      nextToConsume += 1
      held -= sizes[j]
      condition.broadcast()
    }
    consuming = false
    condition.unlock()
  }

  /// Throws the first failure; otherwise every result must have been consumed.
  public func check() throws {
    if let failure { throw failure.error }
    precondition(
      nextToConsume == results.count, "in-order flight ended with \(nextToConsume) of \(results.count) consumed")
  }
}
