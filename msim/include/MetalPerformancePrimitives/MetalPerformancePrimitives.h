// MetalPerformancePrimitives (tensor operations on Apple's neural accelerators) has no
// documented semantics msim could model.
#error "msim does not model MetalPerformancePrimitives (tensor operations)"
