import ArgumentParser
import Checkpoint
import Dispatch
import Foundation
import Merge
import Operations
import Recipe
import Tensor

@main
struct MergekitCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "mergekit",
    abstract: "Merge, adapt, compress and inspect neural-network checkpoints (safetensors and .mkz).",
    discussion: """
      Every subcommand reads a checkpoint (a .safetensors or .mkz file, or a Hugging Face model \
      folder, sharded or not) and writes one, so the output of one command is the input of the \
      next. Exit status: 0 success, 1 run error, 64 bad usage.
      """,
    version: "0.1.0",
    subcommands: [
      InspectCommand.self, ConvertCommand.self, VerifyCommand.self, DiffCommand.self, MergeCommand.self,
      TaskVectorCommand.self, ApplyCommand.self, RunCommand.self,
      ATLASCommand.self,
    ] + OperationRegistry.operations.filter { $0.commandPath.count == 1 }.map { commandType($0) } + [
      ExampleCommand.self
    ]
  )

  /// Entry point. On SIGINT, SIGTERM or SIGHUP (a closed terminal), deletes the temporary files
  /// of unfinished outputs and exits with 128 + signal number. With `MERGEKIT_REPORT_PEAK_RSS=1`, prints this process's peak resident memory
  /// (`VmHWM`) on stderr at exit, for benchmarks and memory checks.
  static func main() {
    BLAS.restartWithTheCPUsKernels()
    BLAS.shortenIdleSpin()
    MemoryPolicy.returnLargeBlocksToSystem()
    if ProcessInfo.processInfo.environment["MERGEKIT_REPORT_PEAK_RSS"] == "1" {
      atexit {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        if let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }) {
          FileHandle.standardError.write(
            Data("peak RSS: \(line.dropFirst(6).trimmingCharacters(in: .whitespaces))\n".utf8))
        }
      }
    }
    for signalNumber in [SIGINT, SIGTERM, SIGHUP] {
      signal(signalNumber, SIG_IGN)
      let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
      source.setEventHandler {
        TemporaryOutputs.removeAll()
        FileHandle.standardError.write(Data("\ninterrupted; no output written\n".utf8))
        Glibc._exit(128 + signalNumber)  // at once: no atexit work while the main thread runs on
      }
      source.resume()
      signalSources.append(source)
    }
    do {
      var command = try parseAsRoot(nil)
      try command.run()
    } catch {
      if let message = usageMessage(error) {
        FileHandle.standardError.write(Data("Error: \(boundedLines(message))\n".utf8))
        Glibc.exit(ExitCode.validationFailure.rawValue)
      }
      let code = exitCode(for: error)
      if code == .success { exit(withError: error) }  // --help, --version: printed in full
      FileHandle.standardError.write(Data((boundedLines(fullMessage(for: error)) + "\n").utf8))
      Glibc.exit(code.rawValue)
    }
  }

  nonisolated(unsafe) private static var signalSources: [any DispatchSourceSignal] = []
}

/// The message of an error that is the user's mistake in what they asked (a parameter out of
/// range, a missing input, a bad recipe): these exit 64 like flag errors. Parameters are named
/// as flags. nil for errors of the run itself (exit 1).
func usageMessage(_ error: any Error) -> String? {
  switch error {
  case OperationError.outputExists(let path): return "'\(path)' already exists; pass --overwrite to replace it"
  case CheckpointError.outputIsInput: return "\(error)"
  case let error as OperationError:
    return error.isUsage ? error.message { "--" + $0.replacingOccurrences(of: "_", with: "-") } : nil
  case let error as RecipeError:
    if case .stepFailed = error { return nil }
    return error.description
  case let error as MergeError:
    switch error {
    case .invalidParameter(let method, let name, let tensor, let reason):
      return "\(method): \(flagName(name))\(tensor.map { " for tensor '\($0)'" } ?? "") \(reason)"
    case .missingParameter(let method, let name, let help): return "\(method): \(flagName(name)) is required (\(help))"
    case .unknownParameter, .unknownMethod, .baseRequired, .baseUnused, .modelCount: return error.description
    default: return nil  // errors of the inputs' contents or of the run
    }
  default: return nil
  }
}

/// A message with each line cut to about 1,000 characters (its start and its end, where the
/// reason is): errors quote names and values from the input, and a hostile file's "tensor
/// name" can be megabytes long.
func boundedLines(_ message: String) -> String {
  message.split(separator: "\n", omittingEmptySubsequences: false).map { line in
    guard line.count > 1000 else { return String(line) }
    return line.prefix(600) + " [... \(line.count - 1000) characters ...] " + line.suffix(400)
  }.joined(separator: "\n")
}

/// `density (model 2)` as `--density (model 2)`.
func flagName(_ parameter: String) -> String { "--" + parameter.replacingOccurrences(of: "_", with: "-") }
