// AdamW launch layer: tensors are grouped by (param dtype, state dtype) and sent in batches of
// up to kMaxTensors per launch pair: `prepare` (steps += 1, bias corrections once per tensor)
// then `step` over every element of the batch. No host synchronisation: lr and the steps are
// read on the device (a CPU lr next to device params is read on the host, which costs nothing).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "adamw/adamw.h"
#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/adamw.h"

namespace metalcore::launch {
namespace {

using namespace adamw_k;

std::string step_variant(at::ScalarType param, at::ScalarType state) {
  return state == param ? "step" : "step_f32state";
}

// One optimizer step on validated arguments (adamw.h): prepare + step launch pairs.
void encode(Encoder& enc, const adamw::StepArgs& a) {
  const at::Device device = a.params[0].device();

  Params p{};
  p.beta1 = static_cast<float>(a.beta1);
  p.beta2 = static_cast<float>(a.beta2);
  p.one_minus_beta1 = static_cast<float>(1.0 - a.beta1);
  p.one_minus_beta2 = static_cast<float>(1.0 - a.beta2);
  p.log_beta1 = static_cast<float>(std::log(a.beta1));  // -inf for beta = 0: bias correction 1
  p.log_beta2 = static_cast<float>(std::log(a.beta2));
  p.weight_decay = static_cast<float>(a.weight_decay);
  p.eps = static_cast<float>(a.eps);
  p.flags = (a.amsgrad ? kAmsgrad : 0u) | (a.maximize ? kMaximize : 0u);
  // A device lr stays on the device (a schedule changing it needs no recompile and no sync); an
  // lr elsewhere is on the CPU (checked) and was read there.
  at::Tensor lr_buf;
  if (a.lr.device() == device) {
    lr_buf = a.lr.scalar_type() == at::kFloat ? a.lr : a.lr.to(at::kFloat);
  } else {
    p.lr = static_cast<float>(*a.host_lr);
    p.flags |= kLrOnHost;
  }

  // Groups by dtype pair, keeping the caller's order inside each group.
  std::map<std::pair<int, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < a.params.size(); ++i) {
    groups[{static_cast<int>(a.params[i].scalar_type()),
            static_cast<int>(a.exp_avgs[i].scalar_type())}]
        .push_back(i);
  }
  for (const auto& [dtypes, members] : groups) {
    const auto param_t = static_cast<at::ScalarType>(dtypes.first);
    const auto state_t = static_cast<at::ScalarType>(dtypes.second);
    for (size_t first = 0; first < members.size(); first += kMaxTensors) {
      const size_t count = std::min<size_t>(kMaxTensors, members.size() - first);
      TensorMeta meta[kMaxTensors] = {};
      uint64_t chunks = 0;
      for (size_t j = 0; j < count; ++j) {
        const size_t i = members[first + j];
        TensorMeta& m = meta[j];
        m.step = enc.device_address(a.state_steps[i]);
        m.numel = static_cast<uint64_t>(a.params[i].numel());
        m.chunk_begin = static_cast<uint32_t>(chunks);
        if (m.numel > 0) {
          m.param = enc.device_address(a.params[i]);
          m.grad = enc.device_address(a.grads[i]);
          m.exp_avg = enc.device_address(a.exp_avgs[i]);
          m.exp_avg_sq = enc.device_address(a.exp_avg_sqs[i]);
          if (a.amsgrad) m.max_exp_avg_sq = enc.device_address(a.max_exp_avg_sqs[i]);
        }
        chunks += (m.numel + kChunk - 1) / kChunk;
        TORCH_CHECK_VALUE(chunks <= std::numeric_limits<uint32_t>::max(),
                          "metalcore.adamw: too many elements for one launch");
      }
      p.num_tensors = static_cast<uint32_t>(count);
      const size_t meta_bytes = count * sizeof(TensorMeta);
      const at::Tensor coef =
          at::empty({static_cast<int64_t>(count), 4}, a.params[0].options().dtype(at::kFloat));

      enc.set_pipeline(kernel_name("adamw", "prepare", at::kFloat));
      enc.set_bytes(0, meta, meta_bytes);
      enc.set_tensor(1, lr_buf.defined() ? lr_buf : coef);
      enc.set_tensor(2, coef);
      enc.set_value(3, p);
      enc.dispatch_threads({p.num_tensors, 1, 1},
                           {std::min<uint32_t>(p.num_tensors, kSimdWidth), 1, 1});
      if (chunks == 0) continue;
      // Runs after prepare: dispatches of one compute encoder execute in order.
      enc.set_pipeline(kernel_name("adamw", step_variant(param_t, state_t), param_t));
      const uint32_t threads =
          std::min(kThreads, enc.max_threads_per_threadgroup() / kSimdWidth * kSimdWidth);
      enc.set_bytes(0, meta, meta_bytes);
      enc.set_tensor(1, coef);
      enc.set_value(2, p);
      enc.dispatch_threadgroups({static_cast<uint32_t>(chunks), 1, 1}, {threads, 1, 1});
    }
  }
}

// The Metal backend of the shared entry point (adamw.h).
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  static constexpr c10::DeviceType kDevice = kMetalTargetDevice;
  // Steps live with the params: the prepare kernel increments them, so no step syncs the host.
  static constexpr adamw::StepHome kSteps = adamw::StepHome::kDevice;
  Encoder& enc;

  static void check_limits(const char* op, at::TensorList params, at::TensorList state_steps) {
    for (size_t i = 0; i < params.size(); ++i) {
      check_metal_dtype(op, adamw::Item{"params", i}, params[i].scalar_type());
      TORCH_CHECK_TYPE(state_steps[i].scalar_type() == at::kFloat, "metalcore.", op, ": '",
                       adamw::Item{"state_steps", i},
                       "' must be float32 on the Metal backend, got ",
                       state_steps[i].scalar_type());
    }
  }
  void launch(const adamw::StepArgs& a) const { encode(enc, a); }
};

void adamw(Encoder& enc, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
           const at::Tensor& lr, double beta1, double beta2, double weight_decay, double eps,
           bool amsgrad, bool maximize) {
  adamw::run(MetalKernels{enc}, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
             lr, beta1, beta2, weight_decay, eps, amsgrad, maximize);
}

std::vector<std::string> adamw_kernel_names() {
  std::vector<std::string> names = {kernel_name("adamw", "prepare", at::kFloat)};
  for (auto t : {at::kFloat, at::kHalf, at::kBFloat16}) {
    names.push_back(kernel_name("adamw", step_variant(t, t), t));
    if (t != at::kFloat) names.push_back(kernel_name("adamw", step_variant(t, at::kFloat), t));
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) { m.impl("adamw", on_metal<&adamw>); }

const RegisterKernelNames registered_names(&adamw_kernel_names);

}  // namespace metalcore::launch
