// Fused AdamW: metadata layout and launch constants shared by adamw.metal and the host launcher.
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace adamw_k {

// One launch covers up to kMaxTensors tensors: threadgroup g updates the kChunk-element chunk g
// of the concatenated tensors; thread t owns elements t + k * threads of it (coalesced,
// bounds-checked). The metadata travels as set_bytes data: kMaxTensors * 64 B = Metal's 4 KB.
METALCORE_CONSTEXPR unsigned kThreads = 256;
METALCORE_CONSTEXPR unsigned kChunk = kThreads * 16;
METALCORE_CONSTEXPR unsigned kMaxTensors = 64;

METALCORE_CONSTEXPR unsigned kAmsgrad = 1;
METALCORE_CONSTEXPR unsigned kMaximize = 2;
METALCORE_CONSTEXPR unsigned kLrOnHost = 4;  // lr is Params::lr, not the lr buffer

// Device addresses of one parameter's tensors (param/grad/state element types come from the
// kernel's template arguments); max_exp_avg_sq is 0 unless amsgrad.
struct TensorMeta {
  METALCORE_DEVICE_PTR(uchar) param;
  METALCORE_DEVICE_PTR(uchar) grad;
  METALCORE_DEVICE_PTR(uchar) exp_avg;
  METALCORE_DEVICE_PTR(uchar) exp_avg_sq;
  METALCORE_DEVICE_PTR(uchar) max_exp_avg_sq;
  METALCORE_DEVICE_PTR(float) step;
  METALCORE_U64 numel;
  unsigned chunk_begin;  // first chunk (threadgroup) of this tensor in the launch
  unsigned pad;
};

struct Params {
  float beta1, beta2, weight_decay, eps;
  // 1 - beta computed in double on the host: 1.0f - float(0.999) is 1.3e-5 off relatively.
  float one_minus_beta1, one_minus_beta2;
  // log(beta) in double on the host: the bias corrections 1 - beta^step = -expm1(step log beta)
  // then keep float precision (1 - powf(float(beta), step) inherited the 1.3e-5 error).
  float log_beta1, log_beta2;
  float lr;  // used when flags & kLrOnHost
  unsigned num_tensors;
  unsigned flags;
};

// Host and kernel must agree on these layouts byte for byte (they travel as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(TensorMeta) == 64 && kMaxTensors * sizeof(TensorMeta) <= 4096);
static_assert(sizeof(Params) == 44);
#endif

}  // namespace adamw_k
}  // namespace metalcore
