import Foundation
import Testing

@testable import Checkpoint
@testable import TestSupport

/// The layer every untrusted file is read through: regular files only, never blocking, capped.
@Suite struct InputFileTests {
  @Test func readsRegularFilesAndRefusesEverythingElse() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    writeBytes([1, 2, 3], to: folder.file("a.bin"))
    #expect(try InputFile.read(folder.file("a.bin")) == [1, 2, 3])
    #expect(throws: CheckpointError.fileTooLarge(file: folder.file("a.bin"), size: 3, limit: 2)) {
      try InputFile.read(folder.file("a.bin"), limit: 2)
    }
    #expect(mkfifo(folder.file("pipe"), 0o600) == 0)
    #expect(throws: CheckpointError.notARegularFile(file: folder.file("pipe"), kind: "a FIFO (named pipe)")) {
      try InputFile.read(folder.file("pipe"))
    }
    #expect(throws: CheckpointError.notARegularFile(file: folder.path, kind: "a folder")) {
      try InputFile.read(folder.path)
    }
    #expect(!InputFile.isRegularFile(folder.file("pipe")) && InputFile.isRegularFile(folder.file("a.bin")))
    writeBytes([0xC3, 0x28], to: folder.file("bad.txt"))
    #expect(throws: CheckpointError.notUTF8(file: folder.file("bad.txt"))) {
      try InputFile.readText(folder.file("bad.txt"))
    }
  }

  /// Temporaries carry their process id; only names of this exact form are ever swept.
  @Test func temporaryNamesCarryTheirOwner() {
    #expect(TemporaryOutputs.owner(ofTemporary: ".out.mkz.mergekit-tmp-1234-99") == 1234)
    #expect(TemporaryOutputs.owner(ofTemporary: ".out.mergekit-tmp-77") == 77)
    #expect(TemporaryOutputs.owner(ofTemporary: ".out.mergekit-tmp-77.old") == 77)
    #expect(TemporaryOutputs.owner(ofTemporary: "out.mergekit-tmp-77") == nil)  // not hidden: a user's file
    #expect(TemporaryOutputs.owner(ofTemporary: ".out.mergekit-tmp-") == nil)
    #expect(TemporaryOutputs.owner(ofTemporary: ".out.mergekit-tmp-12x") == nil)
    let path = TemporaryOutputs.path(for: "/tmp/x/model.mkz", tag: "7")
    #expect(path == "/tmp/x/.model.mkz.mergekit-tmp-\(getpid())-7")
  }

  /// A dead process's temporaries are removed (and reported); a live one's and other files stay.
  @Test func staleTemporariesAreSwept() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    // A process id that cannot be running: above the kernel's maximum.
    let dead =
      (Int(
        (try? String(contentsOfFile: "/proc/sys/kernel/pid_max", encoding: .utf8))?.trimmingCharacters(
          in: .whitespacesAndNewlines) ?? "") ?? 4_194_304) + 1
    writeBytes([1], to: folder.file(".a.mkz.mergekit-tmp-\(dead)-5"))
    try FileManager.default.createDirectory(
      atPath: folder.file(".b.mergekit-tmp-\(dead)"), withIntermediateDirectories: true)
    writeBytes([2], to: folder.file(".c.mkz.mergekit-tmp-1"))  // pid 1 always runs
    writeBytes([3], to: folder.file("keep.mergekit-tmp-\(dead)"))
    final class Lines: @unchecked Sendable { var all: [String] = [] }
    let lines = Lines()
    let saved = TemporaryOutputs.report
    TemporaryOutputs.report = { lines.all.append($0) }
    defer { TemporaryOutputs.report = saved }
    TemporaryOutputs.removeStale(in: folder.path)
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == [
        ".c.mkz.mergekit-tmp-1", "keep.mergekit-tmp-\(dead)",
      ])
    #expect(lines.all.count == 2 && lines.all.allSatisfy { $0.contains("process \(dead)") })
  }

  /// Canonically equivalent names with different bytes are different tensors.
  @Test func namesCompareByBytes() {
    #expect("\u{E9}" == "e\u{301}")
    #expect(ExactName("\u{E9}") != ExactName("e\u{301}"))
    #expect(Set([ExactName("\u{E9}"), ExactName("e\u{301}"), ExactName("\u{E9}")]).count == 2)
    // Equivalent with as many bytes (D with the dots above and below in either order).
    let (aboveFirst, belowFirst) = ("\u{1E0A}\u{323}", "\u{1E0C}\u{307}")
    #expect(aboveFirst == belowFirst && aboveFirst.utf8.count == belowFirst.utf8.count)
    #expect(ExactName(aboveFirst) != ExactName(belowFirst))
    #expect(ExactName(aboveFirst) == ExactName(String(aboveFirst.unicodeScalars)))
  }
}

@Suite struct OutputFileTests {
  /// Copied and handed-over writes land in the order they were made, whatever their sizes:
  /// pieces smaller and larger than a staging buffer (one spanning several write calls), more of
  /// them than there are turns, empty ones, and a staging buffer left partly filled before each.
  @Test func ownedAndCopiedWritesKeepTheirOrder() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let destination = folder.file("out.bin")
    let file = try OutputFile(destination: destination)
    var expected: [UInt8] = []
    for (i, size) in [100, 3 << 20, 0, 1 << 20, 7, (1 << 20) + 5, 64, 2_000_000, 1, 9].enumerated() {
      let piece = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
      if i % 2 == 0 { try file.write(piece) } else { try file.write(owned: piece) }
      expected += piece
    }
    try file.publish()
    let got = readBytes(destination)
    let same = got == expected  // a Bool: a failure prints no megabyte arrays
    #expect(same, "\(got.count) bytes written, \(expected.count) expected")
  }

  /// `reserve` sizes the file before it is written (where the file system preallocates); a file
  /// that gets fewer bytes than reserved is cut to what was written; a size no disk here has is
  /// refused before anything is written, naming the file (a folder's shard by its place in the
  /// output folder).
  @Test func reservedFilesHoldExactlyWhatWasWritten() throws {
    let folder = TemporaryFolder()
    defer { folder.remove() }
    let destination = folder.file("out.bin")
    let file = try OutputFile(destination: destination)
    try file.reserve(1 << 20)
    var info = stat()
    #expect(stat(file.temporaryPath, &info) == 0)
    let preallocates = info.st_size == 1 << 20
    let bytes = (0..<1000).map { UInt8(truncatingIfNeeded: $0 * 7) }
    try file.write(bytes)
    try file.publish()
    #expect(readBytes(destination) == bytes)
    guard preallocates else { return }
    let huge = try OutputFile(destination: folder.file("huge.bin"))
    #expect {
      try huge.reserve(1 << 46)
    } throws: { error in
      guard case CheckpointError.cannotWrite(let file, let reason) = error else { return false }
      return file == folder.file("huge.bin") && reason.contains("\(1 << 46) bytes")
    }
    huge.discard()
    #expect(!FileManager.default.fileExists(atPath: folder.file("huge.bin")))

    // A shard of a folder output that no disk here holds: refused when it starts, named in the
    // output folder rather than the work folder it is written in, and nothing is published.
    let out = folder.file("out")
    let writer = try CheckpointWriter(
      destination: out, tensors: [TensorInfo(name: "w", dtype: .f32, shape: [1 << 44])], options: WriteOptions())
    #expect {
      try writer.beginTensor("w")
    } throws: { error in
      guard case CheckpointError.cannotWrite(let file, let reason) = error else { return false }
      return file == out + "/model.safetensors" && reason.contains("bytes")
    }
    writer.abandon()
    #expect(!FileManager.default.fileExists(atPath: out))
  }
}
