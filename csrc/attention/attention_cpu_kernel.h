// CPU kernels of the attention family (compiled per CPU capability, see common/cpu_dispatch.h).
// q/k/v/grad_out/out: 4-D with a unit stride on the head dim (any other strides); mask: the
// [B, Hq, Lq, Lk] expanded view or undefined; lse/grad_lse contiguous; outputs contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include "attention/attention.h"
#include "common/cpu_dispatch.h"

#define METALCORE_ATTENTION_CPU_KERNELS                                                         \
  void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,         \
                         const at::Tensor& mask, const ::metalcore::attention::Params& p,       \
                         const at::Tensor& out, const at::Tensor& lse);                         \
  void attention_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse,               \
                          const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,        \
                          const at::Tensor& out, const at::Tensor& lse, const at::Tensor& mask, \
                          const ::metalcore::attention::Params& p, const at::Tensor& dq,        \
                          const at::Tensor& dk, const at::Tensor& dv);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_ATTENTION_CPU_KERNELS)
