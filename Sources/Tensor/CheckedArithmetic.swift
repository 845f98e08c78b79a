/// The product of non-negative `factors` (a shape's element count, times an element size), or
/// nil when a factor is negative or the product overflows `Int`. For sizes read from files:
/// the kernels' targets are built without overflow checks, so a size a file claims must be
/// checked explicitly before anything is allocated or indexed by it.
public func checkedProduct(_ factors: [Int]) -> Int? {
  var product = 1
  for factor in factors {
    guard factor >= 0 else { return nil }
    let (next, overflow) = product.multipliedReportingOverflow(by: factor)
    if overflow { return nil }
    product = next
  }
  return product
}
