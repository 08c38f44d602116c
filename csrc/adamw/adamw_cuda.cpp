// CUDA backend of AdamW: the shared entry point (adamw.h) over the one-launch kernel of
// adamw_cuda.cu. Steps may live on the CPU (the entry point increments them) or on the params'
// device (the kernel increments them, so a step needs no host sync); so may lr.
#include "adamw/adamw_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "adamw/adamw.h"

namespace metalcore {
namespace {

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr adamw::StepHome kSteps = adamw::StepHome::kHostOrDevice;

  // The kernel reads every device step with one dtype.
  static void check_limits(const char* op, at::TensorList, at::TensorList state_steps) {
    std::optional<at::ScalarType> dtype;
    for (const at::Tensor& s : state_steps) {
      if (!s.is_cuda()) continue;
      TORCH_CHECK_TYPE(!dtype || s.scalar_type() == *dtype, "metalcore.", op,
                       ": the CUDA tensors of 'state_steps' must share one dtype, got ", *dtype,
                       " and ", s.scalar_type());
      dtype = s.scalar_type();
    }
  }

  static void launch(const adamw::StepArgs& a) {
    const size_t n = a.params.size();
    std::vector<at::Tensor> p(n), g(n), m(n), v(n), mv(n), st(n);
    bool double_steps = false;
    for (size_t i = 0; i < n; ++i) {
      // Dense tensors in the param's memory order (checked): the kernel walks storage order.
      p[i] = a.params[i];
      g[i] = a.grads[i];
      m[i] = a.exp_avgs[i];
      v[i] = a.exp_avg_sqs[i];
      if (a.amsgrad) mv[i] = a.max_exp_avg_sqs[i];
      st[i] = a.state_steps[i];
      if (st[i].is_cuda()) double_steps = st[i].scalar_type() == at::kDouble;
    }
    cuda::AdamwHyper hp;
    hp.lr_ptr = a.lr.is_cuda() ? a.lr.const_data_ptr() : nullptr;
    hp.lr = a.host_lr.value_or(0.0);
    hp.lr_double = a.lr.scalar_type() == at::kDouble;
    hp.step_double = double_steps;
    hp.beta1 = a.beta1;
    hp.beta2 = a.beta2;
    hp.wd = a.weight_decay;
    hp.eps = a.eps;
    hp.amsgrad = a.amsgrad;
    hp.maximize = a.maximize;
    cuda::launch_adamw(p, g, m, v, mv, st, hp);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) { m.impl("adamw", &adamw::kernel<CudaKernels>); }

// A sparse grad routes the call to SparseCUDA; send it to the same checks for a clear error.
TORCH_LIBRARY_IMPL(metalcore, SparseCUDA, m) { m.impl("adamw", &adamw::kernel<CudaKernels>); }

}  // namespace metalcore
