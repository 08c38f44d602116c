// CPU backend of AdamW: the shared entry point (adamw.h) over the CPU kernel. The CPU is the
// host: the entry point has incremented every step, and each tensor's bias corrections are
// folded into its TensorWork here, so one parallel kernel updates all tensors.
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "adamw/adamw.h"
#include "adamw/adamw_cpu_kernel.h"

namespace metalcore {
namespace {

struct CpuKernels {
  using Guard = NoDeviceGuard;
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr adamw::StepHome kSteps = adamw::StepHome::kHost;

  static void check_limits(const char*, at::TensorList, at::TensorList) {}

  static void launch(const adamw::StepArgs& a) {
    const double lr = *a.host_lr;  // lr is on the params' device, the CPU
    const adamw::StepScalars scalars{a.beta1,   a.beta2,   a.eps, 1.0 - lr * a.weight_decay,
                                     a.amsgrad, a.maximize};
    std::vector<adamw::TensorWork> work;
    work.reserve(a.params.size());
    for (size_t i = 0; i < a.params.size(); ++i) {
      const at::Tensor& p = a.params[i];
      if (p.numel() == 0) continue;
      const double step = adamw::host_step_value(a.state_steps[i]);
      const double bias_correction1 = 1.0 - std::pow(a.beta1, step);
      const double bias_correction2 = 1.0 - std::pow(a.beta2, step);
      work.push_back(adamw::TensorWork{p.data_ptr(), a.grads[i].const_data_ptr(),
                                       a.exp_avgs[i].data_ptr(), a.exp_avg_sqs[i].data_ptr(),
                                       a.amsgrad ? a.max_exp_avg_sqs[i].data_ptr() : nullptr,
                                       p.numel(), p.scalar_type(), a.exp_avgs[i].scalar_type(),
                                       lr / bias_correction1, std::sqrt(bias_correction2)});
    }
    if (!work.empty()) METALCORE_CPU_DISPATCH(adamw_step, work, scalars);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { m.impl("adamw", &adamw::kernel<CpuKernels>); }

// A sparse grad routes the call to SparseCPU; send it to the same checks for a clear error.
TORCH_LIBRARY_IMPL(metalcore, SparseCPU, m) { m.impl("adamw", &adamw::kernel<CpuKernels>); }

}  // namespace metalcore
