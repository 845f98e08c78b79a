import ArgumentParser
import Checkpoint
import Dispatch
import Foundation
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
      InspectCommand.self, ConvertCommand.self, VerifyCommand.self, DiffCommand.self, MergeCommand.self, TaskVectorCommand.self, ApplyCommand.self, RunCommand.self,
      ZipCommand.self, ATLASCommand.self, PELACommand.self, ExtractLoRACommand.self, MKVCommand.self, TrainCommand.self, EvalCommand.self, StatsCommand.self, SyntheticDataCommand.self, SyntheticTokensCommand.self, ExampleCommand.self,
    ]
  )

  /// Entry point. On SIGINT or SIGTERM, deletes the temporary files of unfinished outputs and
  /// exits with 128 + signal number. With `MERGEKIT_REPORT_PEAK_RSS=1`, prints this process's peak resident memory
  /// (`VmHWM`) on stderr at exit, for benchmarks and memory checks.
  static func main() {
    BLAS.restartWithTheCPUsKernels()
    MemoryPolicy.returnLargeBlocksToSystem()
    if ProcessInfo.processInfo.environment["MERGEKIT_REPORT_PEAK_RSS"] == "1" {
      atexit {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        if let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }) {
          FileHandle.standardError.write(Data("peak RSS: \(line.dropFirst(6).trimmingCharacters(in: .whitespaces))\n".utf8))
        }
      }
    }
    for signalNumber in [SIGINT, SIGTERM] {
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
    main(nil)
  }

  nonisolated(unsafe) private static var signalSources: [any DispatchSourceSignal] = []
}
