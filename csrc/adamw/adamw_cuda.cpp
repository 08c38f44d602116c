// CUDA entry point of metalcore::adamw: validates the lists, routes non-contiguous tensors
// through contiguous copies (written back after the step), increments CPU step counters, then
// runs the one-launch kernel of adamw_cuda.cu.
#include "adamw/adamw_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "common/checks.h"

namespace metalcore {
namespace {

void check_list(const char* op, const char* name, const at::TensorList& l, size_t n) {
  TORCH_CHECK_VALUE(l.size() == n, "metalcore.", op, ": '", name, "' must have ", n,
                    " tensors (one per param), got ", l.size());
}

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize) {
  const char* op = "adamw";
  const size_t n = params.size();
  check_list(op, "grads", grads, n);
  check_list(op, "exp_avgs", exp_avgs, n);
  check_list(op, "exp_avg_sqs", exp_avg_sqs, n);
  check_list(op, "state_steps", state_steps, n);
  if (amsgrad) check_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, n);
  check_defined(op, "lr", lr);
  TORCH_CHECK_VALUE(lr.dim() == 0, "metalcore.", op, ": 'lr' must be a 0-dim tensor, got shape ",
                    lr.sizes());
  TORCH_CHECK_TYPE(lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble, "metalcore.",
                   op, ": 'lr' must be float32 or float64, got ", lr.scalar_type());
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "metalcore.", op,
                    ": 'beta1' and 'beta2' must be in [0, 1), got ", beta1, " and ", beta2);
  TORCH_CHECK_VALUE(eps >= 0, "metalcore.", op, ": 'eps' must be >= 0, got ", eps);
  if (n == 0) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "metalcore.", op, ": expected CUDA tensors, got 'params' on ", dev);
  TORCH_CHECK(lr.is_cpu() || lr.device() == dev, "metalcore.", op,
              ": 'lr' must be on the CPU or on the params' device (", dev, "), got ", lr.device());

  std::vector<at::Tensor> p(n), g(n), m(n), v(n), mv(n), st(n);
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, contiguous copy)
  auto contiguous = [&](const at::Tensor& t, bool mutated) {
    if (t.is_contiguous()) return t;
    at::Tensor c = t.contiguous();
    if (mutated) write_back.emplace_back(t, c);
    return c;
  };
  at::ScalarType step_dtype = at::kFloat;
  bool any_device_step = false;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& pi = params[i];
    check_float(op, "params", pi);
    TORCH_CHECK(pi.device() == dev, "metalcore.", op, ": every param must be on ", dev,
                ", got params[", i, "] on ", pi.device());
    const std::pair<const char*, const at::Tensor*> others[] = {
        {"grads", &grads[i]}, {"exp_avgs", &exp_avgs[i]}, {"exp_avg_sqs", &exp_avg_sqs[i]}};
    for (const auto& [name, t] : others) {
      check_defined(op, name, *t);
      check_same_device(op, name, *t, "params", pi);
      check_same_shape(op, name, *t, "params", pi);
    }
    check_same_dtype(op, "grads", grads[i], "params", pi);
    const at::ScalarType sd = exp_avgs[i].scalar_type();
    TORCH_CHECK_TYPE(sd == pi.scalar_type() || sd == at::kFloat, "metalcore.", op,
                     ": 'exp_avgs' must be float32 or the params' dtype (", pi.scalar_type(),
                     "), got ", sd);
    check_same_dtype(op, "exp_avg_sqs", exp_avg_sqs[i], "exp_avgs", exp_avgs[i]);
    if (amsgrad) {
      check_defined(op, "max_exp_avg_sqs", max_exp_avg_sqs[i]);
      check_same_device(op, "max_exp_avg_sqs", max_exp_avg_sqs[i], "params", pi);
      check_same_shape(op, "max_exp_avg_sqs", max_exp_avg_sqs[i], "params", pi);
      check_same_dtype(op, "max_exp_avg_sqs", max_exp_avg_sqs[i], "exp_avgs", exp_avgs[i]);
    }
    const at::Tensor& s = state_steps[i];
    check_defined(op, "state_steps", s);
    TORCH_CHECK_VALUE(s.numel() == 1, "metalcore.", op,
                      ": each of 'state_steps' must hold one value, got shape ", s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, "metalcore.",
                     op, ": 'state_steps' must be float32 or float64, got ", s.scalar_type());
    TORCH_CHECK(s.is_cpu() || s.device() == dev, "metalcore.", op,
                ": 'state_steps' must be on the CPU or on the params' device (", dev, "), got ",
                s.device());
    if (s.is_cuda()) {
      TORCH_CHECK_TYPE(!any_device_step || s.scalar_type() == step_dtype, "metalcore.", op,
                       ": device 'state_steps' must share one dtype");
      any_device_step = true;
      step_dtype = s.scalar_type();
    }
    p[i] = contiguous(pi, true);
    g[i] = contiguous(grads[i], false);
    m[i] = contiguous(exp_avgs[i], true);
    v[i] = contiguous(exp_avg_sqs[i], true);
    if (amsgrad) mv[i] = contiguous(max_exp_avg_sqs[i], true);
    st[i] = s;
  }
  const c10::cuda::CUDAGuard guard(dev);
  // Host steps are incremented here (no device work); device steps inside the kernel.
  for (size_t i = 0; i < n; ++i) {
    if (st[i].is_cpu()) st[i].add_(1);
  }

  cuda::AdamwHyper hp;
  hp.lr_ptr = lr.is_cuda() ? lr.const_data_ptr() : nullptr;
  hp.lr = lr.is_cuda() ? 0.0 : lr.item<double>();
  hp.lr_double = lr.scalar_type() == at::kDouble;
  hp.step_double = step_dtype == at::kDouble;
  hp.beta1 = beta1;
  hp.beta2 = beta2;
  hp.wd = weight_decay;
  hp.eps = eps;
  hp.amsgrad = amsgrad;
  hp.maximize = maximize;
  cuda::launch_adamw(p, g, m, v, mv, st, hp);
  for (auto& [orig, copy] : write_back) orig.copy_(copy);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) { m.impl("adamw", &adamw_cuda); }

}  // namespace metalcore
