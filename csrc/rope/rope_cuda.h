// Launcher of the RoPE CUDA kernels: q/k (or their gradients) with a unit head_dim stride,
// cos/sin as [batch or 1, seq, rot] tables with a unit stride on rot, contiguous outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include "rope/rope.h"

namespace metalcore::cuda {

void launch_rope(bool backward, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                 const at::Tensor& sin, bool interleaved, const rope::Dims& dm,
                 const at::Tensor& qo, const at::Tensor& ko);

}  // namespace metalcore::cuda
