/// Every merge method, registered once: the CLI, recipes and mergekit configs find methods here.
public enum MergeRegistry {
  public static let methods: [any MergeMethod] = [
    LinearMerge(),
    TaskVectorMerge.taskArithmetic,
    TaskVectorMerge.ties,
    TIESGlobalMerge(),
    TaskVectorMerge.dareLinear,
    TaskVectorMerge.dareTies,
    TaskVectorMerge.breadcrumbs,
    TaskVectorMerge.breadcrumbsTies,
    SlerpMerge(),
    ModelStockMerge(),
    STFMerge(),
    TSVMerge(),
    IsoCMerge(),
    IsoCTSMerge(),
    PassthroughMerge(),
    NearSwapMerge(),
    MultiSLERPMerge(),
    KarcherMerge(),
    NuSLERPMerge(),
    SCEMerge(),
    DELLAMerge.della,
    DELLAMerge.dellaLinear,
    RAMMerge.ram,
    RAMMerge.ramPlus,
    ArceeFusionMerge(),
  ]

  /// The method called `name`; mergekit's spellings (`task_arithmetic`, `dare_ties`) work too.
  public static func method(named name: String) throws -> any MergeMethod {
    let key = name.lowercased().replacingOccurrences(of: "_", with: "-")
    guard let method = methods.first(where: { $0.name == key }) else {
      throw MergeError.unknownMethod(name, known: methods.map(\.name))
    }
    return method
  }
}
