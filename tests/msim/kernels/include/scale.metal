// Uses a shared params header from an include directory (-I tests/msim/kernels/include).
#include "family/params.h"
using namespace metal;

kernel void scale_params(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                         constant ScaleParams& p [[buffer(2)]],
                         uint gid [[thread_position_in_grid]]) {
  if (gid < p.n) y[gid] = p.alpha * x[gid] + p.beta + float(gid / kScaleBlock);
}
