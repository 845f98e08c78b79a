// swift-tools-version: 6.0
// mergekit-swift: merge and adapt neural-network checkpoints without Python.
// Target layout and import direction: Tensor <- Checkpoint, Nets <- Merge, Adapt <- Operations <- Recipe <- mergekit
// (docs/architecture.md). Tests/OperationsTests/ImportDirectionTests.swift checks the direction.
import Foundation
import PackageDescription

/// The element loops (merging, dtype conversion, the Nets runtime) vectorise over the widest
/// vectors the machine has: on Linux x86-64 the numeric targets are built for the host CPU
/// (`-target-cpu native`, like `-march=native`), so an AVX-512 machine sums eight doubles a step
/// where the x86-64 baseline (SSE2) sums two; the binary then runs on such CPUs only. The results
/// keep their bits: Swift never contracts a product and a sum into an FMA, and the loops' order
/// is unchanged. `MERGEKIT_PORTABLE=1` builds for the baseline.
let hostCPU: [SwiftSetting] = {
  #if os(Linux) && arch(x86_64)
    guard ProcessInfo.processInfo.environment["MERGEKIT_PORTABLE"] != "1" else { return [] }
    return [.unsafeFlags(["-target-cpu", "native"])]
  #else
    return []
  #endif
}()

/// `-Ounchecked` (no overflow or precondition traps) only for the numeric kernels, where
/// `make bench-merge` shows it matters. Targets that parse input (Checkpoint, Operations,
/// Recipe, the CLI) keep the checks, so a lying size traps instead of reading out of bounds.
/// Debug builds optimise the kernels too (`-O`, checks kept): training and matching loops run
/// about twenty times slower unoptimised, which the tests and recipes would pay.
let kernels: [SwiftSetting] =
  [
    .unsafeFlags(["-Ounchecked"], .when(configuration: .release)), .unsafeFlags(["-O"], .when(configuration: .debug)),
  ] + hostCPU

let package = Package(
  name: "mergekit-swift",
  platforms: [.macOS(.v14)],
  products: [
    .executable(name: "mergekit", targets: ["mergekit"]),
    .library(name: "Tensor", targets: ["Tensor"]),
    .library(name: "Checkpoint", targets: ["Checkpoint"]),
    .library(name: "Merge", targets: ["Merge"]),
    .library(name: "Nets", targets: ["Nets"]),
    .library(name: "Adapt", targets: ["Adapt"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
  ],
  targets: [
    .systemLibrary(name: "CBLAS", path: "Sources/CBLAS"),
    .systemLibrary(name: "CLAPACKE", path: "Sources/CLAPACKE"),
    .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
    .systemLibrary(name: "CSystem", path: "Sources/CSystem"),
    .systemLibrary(name: "CKernels", path: "Sources/CKernels"),
    .target(name: "Tensor", dependencies: ["CBLAS", "CLAPACKE", "CSystem", "CKernels"], swiftSettings: kernels),
    .target(name: "Checkpoint", dependencies: ["Tensor", "CZstd", "CSystem"], swiftSettings: hostCPU),
    .target(name: "Nets", dependencies: ["Tensor"], swiftSettings: kernels),
    .target(name: "Merge", dependencies: ["Tensor", "Nets"], swiftSettings: kernels),
    .target(name: "Adapt", dependencies: ["Tensor", "Nets"], swiftSettings: kernels),
    .target(name: "Operations", dependencies: ["Checkpoint", "Merge", "Adapt", "Nets", "Tensor"]),
    .target(
      name: "Recipe",
      dependencies: ["Operations", "Checkpoint", "Merge", "Nets", "Tensor", .product(name: "Yams", package: "Yams")]),
    .executableTarget(
      name: "mergekit",
      dependencies: [
        "Tensor", "Checkpoint", "Nets", "Merge", "Adapt", "Operations", "Recipe",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),
    // The fuzz driver (make fuzz): built with the shipped checks, never -Ounchecked.
    .executableTarget(
      name: "mergekit-fuzz", dependencies: ["Checkpoint", "Merge", "Nets", "Operations", "Recipe", "Tensor"],
      path: "Fuzz"),
    .target(name: "TestSupport", dependencies: ["Tensor", "Checkpoint"]),
    .target(name: "BenchmarkSupport", dependencies: ["Checkpoint"], path: "Benchmarks/BenchmarkSupport"),
    .executableTarget(
      name: "CheckpointBenchmarks", dependencies: ["Tensor", "Checkpoint", "BenchmarkSupport"],
      path: "Benchmarks/CheckpointBenchmarks", swiftSettings: kernels),
    .executableTarget(
      name: "MergeBenchmarks", dependencies: ["Tensor", "Checkpoint", "BenchmarkSupport"],
      path: "Benchmarks/MergeBenchmarks", swiftSettings: kernels),
    .executableTarget(
      name: "AdaptBenchmarks", dependencies: ["Tensor", "Adapt", "BenchmarkSupport"],
      path: "Benchmarks/AdaptBenchmarks", swiftSettings: kernels),
    .executableTarget(
      name: "NetsBenchmarks", dependencies: ["Tensor", "Nets", "BenchmarkSupport"],
      path: "Benchmarks/NetsBenchmarks", swiftSettings: kernels),
    .testTarget(name: "TensorTests", dependencies: ["Tensor", "TestSupport"]),
    .testTarget(name: "CheckpointTests", dependencies: ["Checkpoint", "TestSupport"], exclude: ["Fixtures"]),
    .testTarget(
      name: "NetsTests", dependencies: ["Nets", "Tensor", "Checkpoint", "TestSupport"], exclude: ["Fixtures"]),
    .testTarget(name: "MergeTests", dependencies: ["Merge", "Nets", "Tensor", "Checkpoint", "TestSupport"]),
    .testTarget(name: "AdaptTests", dependencies: ["Adapt", "Nets", "Tensor", "Checkpoint", "TestSupport"]),
    .testTarget(
      name: "OperationsTests", dependencies: ["Operations", "Merge", "Nets", "Checkpoint", "Tensor", "TestSupport"]),
    .testTarget(
      name: "RecipeTests",
      dependencies: ["Recipe", "Operations", "Merge", "Nets", "Checkpoint", "Tensor", "TestSupport"]),
    .testTarget(name: "mergekitTests", dependencies: ["mergekit", "TestSupport", "Checkpoint", "Nets", "Tensor"]),
  ],
  swiftLanguageModes: [.v5]
)
