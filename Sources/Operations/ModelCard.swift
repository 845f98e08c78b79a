import Checkpoint
import Foundation
import Merge

/// The model card (`README.md`) and `mergekit_config.yml` a merged model folder gets, in place of
/// the base's own card: YAML front matter the Hugging Face Hub reads (`base_model`, `library_name`,
/// `tags`), then the method with its reference, the models, and the configuration.
public enum ModelCard {
  /// The files a merge output gets, by name. `configuration` is the recipe or mergekit config
  /// text (written as `mergekit_config.yml` too), or the command line that made the merge.
  public static func files(
    name: String, method: any MergeMethod, base: String?, models: [String], configuration: String,
    isYAML: Bool
  ) -> [String: Data] {
    let inputs = (base.map { [$0] } ?? []) + models.filter { $0 != base }
    var card = "---\nbase_model:\n" + inputs.map { "- \(yamlScalar($0))\n" }.joined()
    card += "library_name: transformers\ntags:\n- mergekit\n- merge\n- \(method.name)\n---\n\n"
    card += "# \(name)\n\n"
    card += "This model is a merge of pre-trained language models made with mergekit-swift.\n\n"
    card += "## Merge details\n\n"
    card += "Merged with **\(method.name)**: \(method.summary). Reference: \(method.reference).\n\n"
    card += "### Models merged\n\n"
    if let base { card += "- base: \(base)\n" }
    card += models.filter { $0 != base }.map { "- \($0)\n" }.joined()
    card += "\n### Configuration\n\n"
    let shown = configuration.trimmingCharacters(in: .newlines)
    card += isYAML ? "```yaml\n\(shown)\n```\n" : "```sh\n\(shown)\n```\n"
    var files = ["README.md": Data(card.utf8)]
    if isYAML {
      files["mergekit_config.yml"] = Data((configuration.hasSuffix("\n") ? configuration : configuration + "\n").utf8)
    }
    return files
  }

  /// The files of a copied model folder that describe that model, not the merge: never copied
  /// into a merge's output.
  public static let replacedFiles: Set<String> = ["README.md", "mergekit_config.yml"]

  /// `options` with the card of a merge written to `output` instead of the copied model's own.
  public static func adding(
    to options: WriteOptions, output: String, method: any MergeMethod, base: String?, models: [String],
    configuration: String, isYAML: Bool
  ) -> WriteOptions {
    var options = options
    options.skippedFiles.formUnion(replacedFiles)
    options.files.merge(
      files(
        name: URL(fileURLWithPath: output).lastPathComponent, method: method, base: base, models: models,
        configuration: configuration, isYAML: isYAML)
    ) { _, given in given }
    return options
  }

  /// `text` as a YAML scalar (quoted when it has characters YAML would read otherwise).
  /// The card of an adaptation's output (pela, mkv, zip, atlas): what was done to which models,
  /// and how to run the result. `loadsInTransformers` is false for folders only mergekit runs
  /// (factored PELA, MatryoshkaKV), whose config makes transformers refuse them; the card then
  /// says how to run them and how to get a standard model.
  public static func adaptation(
    method: String, title: String, models: [String], description: String, loadsInTransformers: Bool,
    howToRun: String
  ) -> Data {
    var card = "---\n" + (models.isEmpty ? "" : "base_model:\n" + models.map { "- \(yamlScalar($0))\n" }.joined())
    if loadsInTransformers { card += "library_name: transformers\n" }
    card += "tags:\n- mergekit\n- \(yamlScalar(method))\n---\n\n# \(title)\n\n\(description)\n\n## How to run it\n\n"
    card += howToRun + "\n"
    return Data(card.utf8)
  }

  /// How to run a model folder with transformers.
  public static let transformersUsage = """
    ```python
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
    ```
    """

  static func yamlScalar(_ text: String) -> String {
    let plain = text.unicodeScalars.allSatisfy {
      CharacterSet.alphanumerics.contains($0) || "/._-@".unicodeScalars.contains($0)
    }
    return plain && !text.isEmpty
      ? text
      : "\"" + text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
  }
}
