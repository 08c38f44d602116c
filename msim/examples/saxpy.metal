// A self-contained example for `msim run` (msim/README.md): y = a * x + y.
#include <metal_stdlib>
using namespace metal;

kernel void saxpy(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                  constant uint& n [[buffer(2)]], constant float& a [[buffer(3)]],
                  uint i [[thread_position_in_grid]]) {
  if (i < n) y[i] = fma(a, x[i], y[i]);
}
