// Loads a metallib on this machine's Metal device and creates a compute pipeline for every
// function in it. `xcrun metal` runs only the compiler's front end; creating the pipeline runs the
// GPU back end for each kernel, as metalcore does at first use. Each pipeline's simdgroup width
// and threadgroup limit are printed and checked against what the kernels and the launch layer
// assume (kSimdWidth in kernels/common/defines.h; metalcore raises the same error at run time).
//
//     xcrun swift .github/scripts/metallib_check.swift metalcore.metallib
import Foundation
import Metal

let simdWidth = 32  // kSimdWidth in kernels/common/defines.h

let arguments = CommandLine.arguments
guard arguments.count == 2 else {
  FileHandle.standardError.write("usage: metallib_check.swift LIBRARY.metallib\n".data(using: .utf8)!)
  exit(2)
}
let path = arguments[1]

guard let device = MTLCreateSystemDefaultDevice() else {
  // Not an error of the kernels: the library was built, there is just nothing to load it on.
  print("::warning::no Metal device on this machine: \(path) was built but not loaded")
  exit(0)
}
print("device: \(device.name)")

let library: MTLLibrary
do {
  library = try device.makeLibrary(URL: URL(fileURLWithPath: path))
} catch {
  print("::error::cannot load \(path): \(error)")
  exit(1)
}

var failures = 0
let names = library.functionNames.sorted()
for name in names {
  guard let function = library.makeFunction(name: name) else {
    print("::error::\(name) is listed in the library but cannot be instantiated")
    failures += 1
    continue
  }
  do {
    let pipeline = try device.makeComputePipelineState(function: function)
    let width = pipeline.threadExecutionWidth
    let limit = pipeline.maxTotalThreadsPerThreadgroup
    print("ok      \(name): simdgroup width \(width), at most \(limit) threads per threadgroup")
    if width != simdWidth {
      print("::error::\(name): simdgroup width \(width); the kernels assume \(simdWidth)")
      failures += 1
    }
    if limit < simdWidth {
      print("::error::\(name): at most \(limit) threads per threadgroup, less than one simdgroup")
      failures += 1
    }
  } catch {
    print("::error::\(name): cannot create the compute pipeline: \(error)")
    failures += 1
  }
}
print("\(names.count) kernels, \(failures) failures")
exit(failures == 0 ? 0 : 1)
