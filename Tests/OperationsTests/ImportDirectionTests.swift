import Foundation
import Testing

/// The targets import only downward (docs/architecture.md): a source file that imports a target
/// above its own, or a library that imports ArgumentParser or Yams, fails here naming the file.
@Suite struct ImportDirectionTests {
  /// What each target may import (besides Foundation, Dispatch, Glibc and the Swift standard library).
  static let allowed: [String: Set<String>] = [
    "Tensor": ["CBLAS", "CLAPACKE", "CSystem", "CKernels"],
    "Checkpoint": ["Tensor", "CZstd", "CSystem"],
    "Nets": ["Tensor"],
    "Merge": ["Tensor", "Nets"],
    "Adapt": ["Tensor", "Nets"],
    "Operations": ["Tensor", "Checkpoint", "Nets", "Merge", "Adapt"],
    "Recipe": ["Tensor", "Checkpoint", "Nets", "Merge", "Operations", "Yams"],
    "mergekit": ["Tensor", "Checkpoint", "Nets", "Merge", "Adapt", "Operations", "Recipe", "ArgumentParser"],
    "TestSupport": ["Tensor", "Checkpoint"],
  ]
  static let system: Set<String> = ["Foundation", "Dispatch", "Glibc", "Darwin", "Testing"]

  static let sources = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("Sources")

  @Test func everyTargetImportsOnlyTheTargetsBelowIt() throws {
    var files = 0
    for (target, allowed) in Self.allowed {
      let folder = Self.sources.appendingPathComponent(target)
      let enumerator = FileManager.default.enumerator(at: folder, includingPropertiesForKeys: nil)
      while let url = enumerator?.nextObject() as? URL {
        guard url.pathExtension == "swift" else { continue }
        files += 1
        let text = try String(contentsOf: url, encoding: .utf8)
        for line in text.split(separator: "\n") {
          let words = line.split(separator: " ").map(String.init)
          guard let i = words.firstIndex(of: "import"), words[..<i].allSatisfy({ $0.hasPrefix("@") }),
            i + 1 < words.count
          else { continue }
          let module = words[i + 1].split(separator: ".").first.map(String.init) ?? words[i + 1]
          #expect(
            allowed.contains(module) || Self.system.contains(module),
            "\(target)/\(url.lastPathComponent) imports \(module), which \(target) may not import")
        }
      }
    }
    #expect(files > 100)
  }
}
