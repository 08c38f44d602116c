// Helpers for the C++ autograd kernels (registered at the Autograd key). C++ autograd costs
// ~1.5 us per call where a Python register_autograd costs ~6 us even under no_grad, so every
// differentiable metalcore op gets a torch::autograd::Function whose forward redispatches below
// autograd and whose backward calls the family's metalcore::*_backward op, so compiled and
// exported backward graphs show one metalcore node.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

namespace metalcore {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Cached typed handle to a metalcore op, e.g. op_handle<at::Tensor(const at::Tensor&)>("silu").
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("metalcore::") + name).c_str(), overload)
      .template typed<Sig>();
}

// True when autograd must record this call: grad mode on and some input requires grad. When
// false, the autograd kernels skip building a graph node and redispatch directly (the common
// inference path), which keeps their cost within ~0.1 us of a bare op.
inline bool any_requires_grad(std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : inputs) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

// Backward ops are not themselves differentiable: say so instead of silently returning tensors
// without a grad_fn when someone asks for a double backward.
inline void check_no_double_backward(const char* op, std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& t : inputs) {
    TORCH_CHECK(!(t.defined() && t.requires_grad()), "metalcore.", op,
                ": double backward (create_graph=True through this op) is not supported");
  }
}

}  // namespace metalcore
