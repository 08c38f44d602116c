// CPU entry point of AdamW: validate everything, then increment the steps and compute the
// per-tensor bias corrections on the host, then run one parallel kernel over all tensors.
#include <torch/library.h>

#include <cmath>

#include "adamw/adamw.h"
#include "adamw/adamw_cpu_kernel.h"

namespace metalcore {
namespace {

template <typename Arg>
void check_cpu(const char* op, const Arg& arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "metalcore.", op, ": '", arg,
              "' must be on the CPU for the CPU kernel, got ", t.device());
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize) {
  const char* op = "adamw";
  adamw::check_hyper(op, beta1, beta2, weight_decay, eps);
  adamw::check_lr_tensor(op, lr);
  check_cpu(op, "lr", lr);
  adamw::check_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                     amsgrad);
  for (size_t i = 0; i < params.size(); ++i) {
    // The other lists were checked to share params[i]'s device.
    check_cpu(op, adamw::Item{"params", i}, params[i]);
    check_cpu(op, adamw::Item{"state_steps", i}, state_steps[i]);
  }
  const double lr_value = lr.item<double>();
  adamw::check_lr_value(op, lr_value);

  // Nothing was mutated above; from here on the step is applied in full.
  const adamw::StepScalars scalars{beta1,   beta2,   eps, 1.0 - lr_value * weight_decay,
                                   amsgrad, maximize};
  std::vector<adamw::TensorWork> work;
  work.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    // In place on the step tensor's storage, in its own dtype, like torch's `step_t += 1`.
    const at::Tensor& s = state_steps[i];
    double step;
    if (s.scalar_type() == at::kFloat) {
      float* sp = s.mutable_data_ptr<float>();
      *sp += 1.0f;
      step = *sp;
    } else {
      double* sp = s.mutable_data_ptr<double>();
      *sp += 1.0;
      step = *sp;
    }
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const double bias_correction1 = 1.0 - std::pow(beta1, step);
    const double bias_correction2 = 1.0 - std::pow(beta2, step);
    work.push_back(adamw::TensorWork{
        p.data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
        amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr, p.numel(), p.scalar_type(),
        exp_avgs[i].scalar_type(), lr_value / bias_correction1, std::sqrt(bias_correction2)});
  }
  if (!work.empty()) METALCORE_CPU_DISPATCH(adamw_step, work, scalars);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { m.impl("adamw", &adamw_cpu); }

// A sparse grad routes the call to SparseCPU; send it to the same checks for a clear error.
TORCH_LIBRARY_IMPL(metalcore, SparseCPU, m) { m.impl("adamw", &adamw_cpu); }

}  // namespace metalcore
