// CUDA entry point of metalcore::adamw: the family's shared validation (adamw.h), the CUDA
// device rules, then the one-launch kernel of adamw_cuda.cu. Steps on the CPU are incremented
// here; steps on the device inside the kernel.
#include "adamw/adamw_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "adamw/adamw.h"

namespace metalcore {
namespace {

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize) {
  const char* op = "adamw";
  adamw::check_hyper(op, beta1, beta2, weight_decay, eps);
  adamw::check_lr_tensor(op, lr);
  adamw::check_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                     amsgrad);
  const size_t n = params.size();
  if (n == 0) return;
  // The other lists were checked to share params[i]'s device; params share one CUDA device, lr
  // and each step live there or on the CPU.
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "metalcore.", op, ": '", adamw::Item{"params", 0},
              "' must be a CUDA tensor for the CUDA kernel, got ", dev);
  TORCH_CHECK(lr.is_cpu() || lr.device() == dev, "metalcore.", op,
              ": 'lr' must be on the CPU or on the params' device (", dev, "), got ", lr.device());
  bool any_device_step = false;
  at::ScalarType step_dtype = at::kFloat;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].device() == dev, "metalcore.", op, ": '", adamw::Item{"params", i},
                "' must be on the device of params[0] (", dev, "), got ", params[i].device());
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.is_cpu() || s.device() == dev, "metalcore.", op, ": '",
                adamw::Item{"state_steps", i}, "' must be on the CPU or on the params' device (",
                dev, "), got ", s.device());
    if (s.is_cuda()) {
      TORCH_CHECK_TYPE(!any_device_step || s.scalar_type() == step_dtype, "metalcore.", op,
                       ": the CUDA tensors of 'state_steps' must share one dtype, got ", step_dtype,
                       " and ", s.scalar_type());
      any_device_step = true;
      step_dtype = s.scalar_type();
    }
  }
  // A device lr is read by the kernel (no sync), so only a CPU lr can be range-checked here.
  const double host_lr = lr.is_cpu() ? lr.item<double>() : 0.0;
  if (lr.is_cpu()) adamw::check_lr_value(op, host_lr);

  // Nothing was mutated above; from here on the step is applied in full.
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<at::Tensor> p(n), g(n), m(n), v(n), mv(n), st(n);
  for (size_t i = 0; i < n; ++i) {
    // Dense tensors in the param's memory order (checked): the kernel walks storage order.
    p[i] = params[i];
    g[i] = grads[i];
    m[i] = exp_avgs[i];
    v[i] = exp_avg_sqs[i];
    if (amsgrad) mv[i] = max_exp_avg_sqs[i];
    st[i] = state_steps[i];
    if (st[i].is_cpu()) st[i].add_(1);
  }
  cuda::AdamwHyper hp;
  hp.lr_ptr = lr.is_cuda() ? lr.const_data_ptr() : nullptr;
  hp.lr = host_lr;
  hp.lr_double = lr.scalar_type() == at::kDouble;
  hp.step_double = step_dtype == at::kDouble;
  hp.beta1 = beta1;
  hp.beta2 = beta2;
  hp.wd = weight_decay;
  hp.eps = eps;
  hp.amsgrad = amsgrad;
  hp.maximize = maximize;
  cuda::launch_adamw(p, g, m, v, mv, st, hp);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) { m.impl("adamw", &adamw_cuda); }

// A sparse grad routes the call to SparseCUDA; send it to the same checks for a clear error.
TORCH_LIBRARY_IMPL(metalcore, SparseCUDA, m) { m.impl("adamw", &adamw_cuda); }

}  // namespace metalcore
