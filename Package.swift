// swift-tools-version: 6.0
// mergekit-swift: merge and adapt neural-network checkpoints without Python.
// Target layout and import direction: Tensor <- Checkpoint, Nets <- Merge, Adapt <- Recipe <- mergekit (see DESIGN notes).
import PackageDescription

let optimize: [SwiftSetting] = [.unsafeFlags(["-Ounchecked"], .when(configuration: .release))]

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
    .target(name: "Tensor", dependencies: ["CBLAS", "CLAPACKE", "CSystem"], swiftSettings: optimize),
    .target(name: "Checkpoint", dependencies: ["Tensor", "CZstd"], swiftSettings: optimize),
    .target(name: "Nets", dependencies: ["Tensor"], swiftSettings: optimize),
    .target(name: "Merge", dependencies: ["Tensor", "Nets"], swiftSettings: optimize),
    .target(name: "Adapt", dependencies: ["Tensor", "Nets"], swiftSettings: optimize),
    .target(name: "Recipe", dependencies: ["Checkpoint", "Merge", "Adapt", "Nets", "Tensor", .product(name: "Yams", package: "Yams")], swiftSettings: optimize),
    .executableTarget(
      name: "mergekit",
      dependencies: [
        "Tensor", "Checkpoint", "Nets", "Merge", "Adapt", "Recipe",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),
    .target(name: "TestSupport", dependencies: ["Tensor", "Checkpoint"]),
    .target(name: "BenchmarkSupport", dependencies: ["Checkpoint"], path: "Benchmarks/BenchmarkSupport"),
    .executableTarget(
      name: "CheckpointBenchmarks", dependencies: ["Tensor", "Checkpoint", "BenchmarkSupport"],
      path: "Benchmarks/CheckpointBenchmarks", swiftSettings: optimize),
    .executableTarget(
      name: "MergeBenchmarks", dependencies: ["Tensor", "Checkpoint", "BenchmarkSupport"],
      path: "Benchmarks/MergeBenchmarks", swiftSettings: optimize),
    .executableTarget(
      name: "AdaptBenchmarks", dependencies: ["Tensor", "Adapt", "BenchmarkSupport"],
      path: "Benchmarks/AdaptBenchmarks", swiftSettings: optimize),
    .executableTarget(
      name: "NetsBenchmarks", dependencies: ["Tensor", "Nets", "BenchmarkSupport"],
      path: "Benchmarks/NetsBenchmarks", swiftSettings: optimize),
    .testTarget(name: "TensorTests", dependencies: ["Tensor", "TestSupport"]),
    .testTarget(name: "CheckpointTests", dependencies: ["Checkpoint", "TestSupport"]),
    .testTarget(name: "NetsTests", dependencies: ["Nets", "Tensor", "Checkpoint", "TestSupport"], exclude: ["Fixtures"]),
    .testTarget(name: "MergeTests", dependencies: ["Merge", "Nets", "Tensor", "Checkpoint", "TestSupport"]),
    .testTarget(name: "AdaptTests", dependencies: ["Adapt", "Nets", "Tensor", "Checkpoint", "TestSupport"]),
    .testTarget(name: "RecipeTests", dependencies: ["Recipe", "Merge", "Nets", "Checkpoint", "Tensor", "TestSupport"]),
    .testTarget(name: "mergekitTests", dependencies: ["mergekit", "TestSupport", "Checkpoint", "Nets", "Tensor"]),
  ],
  swiftLanguageModes: [.v5]
)
