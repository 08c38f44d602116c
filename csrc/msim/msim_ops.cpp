// Test-only library (never shipped): the `metalcore_msim` namespace has the schemas of the
// `metalcore` ops, with CPU kernels that run the Metal launch layer through msim on CPU tensors.
// Tests load it next to metalcore and compare both against float64 references; the user-facing
// `metalcore` ops and their CPU kernels are untouched (csrc/mps/README.md explains the choice).
#include <torch/library.h>

#include "activation/activation_launch.h"
#include "adamw/adamw_launch.h"
#include "msim/msim_encoder.h"
#include "rmsnorm/rmsnorm_launch.h"
#include "rope/rope_launch.h"

namespace metalcore::msim {
namespace {

template <auto Fn>
constexpr auto on_msim = &WithEncoder<MsimEncoder, Fn>::call;

std::vector<std::string> launch_kernel_names() {
  std::vector<std::string> names = launch::rmsnorm_kernel_names();
  for (auto& n : launch::activation_kernel_names()) names.push_back(n);
  for (auto& n : launch::rope_kernel_names()) names.push_back(n);
  for (auto& n : launch::adamw_kernel_names()) names.push_back(n);
  return names;
}

}  // namespace

TORCH_LIBRARY(metalcore_msim, m) {
  // Control ops: no tensors, so they run as catch-all kernels.
  m.def("load_kernels(str path) -> ()", [](const std::string& path) { load_library(path); });
  m.def("set_option(str key, str value) -> ()",
        [](const std::string& k, const std::string& v) { set_option(k, v); });
  m.def("library_kernel_names() -> str[]", [] { return library_kernel_names(); });
  m.def("dispatched_kernel_names() -> str[]", [] { return dispatched_kernel_names(); });
  m.def("launch_kernel_names() -> str[]", [] { return launch_kernel_names(); });

  // Same schemas as csrc/registration.cpp (a test compares them).
  m.def("rmsnorm(Tensor input, Tensor? weight, float eps) -> Tensor");
  m.def(
      "rmsnorm_backward(Tensor grad_out, Tensor input, Tensor? weight, float eps)"
      " -> (Tensor grad_input, Tensor grad_weight)");
  m.def(
      "fused_add_rmsnorm(Tensor input, Tensor residual, Tensor? weight, float eps)"
      " -> (Tensor output, Tensor residual_out)");
  m.def(
      "fused_add_rmsnorm_backward(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out,"
      " Tensor? weight, float eps) -> (Tensor grad_input, Tensor grad_weight)");
  m.def("silu(Tensor input) -> Tensor");
  m.def("silu_backward(Tensor grad_out, Tensor input) -> Tensor");
  m.def("gelu(Tensor input, str approximate='none') -> Tensor");
  m.def("gelu_backward(Tensor grad_out, Tensor input, str approximate='none') -> Tensor");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def(
      "swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor "
      "grad_up)");
  m.def(
      "rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved=False)"
      " -> (Tensor q_out, Tensor k_out)");
  m.def(
      "rope_backward(Tensor grad_q_out, Tensor grad_k_out, Tensor cos, Tensor sin,"
      " bool interleaved=False) -> (Tensor grad_q, Tensor grad_k)");
  m.def(
      "adamw(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
      " Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps,"
      " Tensor lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad=False,"
      " bool maximize=False) -> ()");
}

TORCH_LIBRARY_IMPL(metalcore_msim, CPU, m) {
  m.impl("rmsnorm", on_msim<&launch::rmsnorm>);
  m.impl("rmsnorm_backward", on_msim<&launch::rmsnorm_backward>);
  m.impl("fused_add_rmsnorm", on_msim<&launch::fused_add_rmsnorm>);
  m.impl("fused_add_rmsnorm_backward", on_msim<&launch::fused_add_rmsnorm_backward>);
  m.impl("silu", on_msim<&launch::silu>);
  m.impl("silu_backward", on_msim<&launch::silu_backward>);
  m.impl("gelu", on_msim<&launch::gelu>);
  m.impl("gelu_backward", on_msim<&launch::gelu_backward>);
  m.impl("swiglu", on_msim<&launch::swiglu>);
  m.impl("swiglu_backward", on_msim<&launch::swiglu_backward>);
  m.impl("rope", on_msim<&launch::rope>);
  m.impl("rope_backward", on_msim<&launch::rope_backward>);
  m.impl("adamw", on_msim<&launch::adamw>);
}

}  // namespace metalcore::msim
