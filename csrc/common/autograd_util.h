// Helpers for the C++ autograd kernels (registered at the Autograd key). C++ autograd costs
// ~1.5 us per call where a Python register_autograd costs ~6 us even under no_grad, so every
// differentiable metalcore op gets an autograd kernel that redispatches below autograd and, when
// a gradient is needed, records a graph node whose backward calls the family's
// metalcore::*_backward op, so compiled and exported backward graphs show one metalcore node.
//
// The nodes are written out the way PyTorch's generated VariableType kernels write theirs,
// rather than with torch::autograd::Function: Function runs its forward with grad mode off,
// which would hide the call from the outer levels of nested functorch transforms, so functorch
// refuses it ("cannot use C++ torch::autograd::Function with functorch transforms"). Written
// out, the same kernel serves loss.backward(), torch.func.grad/vjp/jacrev (each level records
// its own node), forward-mode AD (the kernels set tangents) and compiled autograd.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace metalcore {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Cached typed handle to a metalcore op, e.g. op_handle<at::Tensor(const at::Tensor&)>("silu").
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("metalcore::") + name).c_str(), overload)
      .template typed<Sig>();
}

// Calls `op` below autograd: the backend kernel (or, under a functorch transform, the next
// level down).
template <typename Sig, typename... Args>
decltype(auto) call_below(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// a + b below autograd (tangents assembled from several terms).
inline at::Tensor add_below(const at::Tensor& a, const at::Tensor& b) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return a + b;
}

// True when autograd must record this call: grad mode on and some input requires grad. When
// false, and no input carries a tangent, the autograd kernels redispatch directly (the common
// inference path), which keeps their cost within ~0.1 us of a bare op.
inline bool any_requires_grad(at::ArrayRef<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : inputs) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

// --- Graph nodes -------------------------------------------------------------------------------

// torch >= 2.13 holds graph nodes by c10::intrusive_ptr, earlier versions by std::shared_ptr with
// a custom deleter (which frees long chains without recursion).
template <typename T, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    return std::shared_ptr<T>(new T(std::forward<Args>(args)...),
                              [](T* node) { deleteNode(node); });  // torch::autograd, by ADL
  }
}

// A node's owning pointer to itself (what SavedVariable::unpack needs for saved outputs).
template <typename N>
auto self_ptr(N* node) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return node->getptr();
  } else {
    return node->shared_from_this();
  }
}

// --- Forward-mode AD ---------------------------------------------------------------------------
// Tangents live at forward-AD level 0, as in PyTorch's own kernels: torch.autograd.forward_ad
// uses that level, and torch.func.jvp gives each of its levels its own wrapper tensors.

// A tensor without autograd metadata (the inference case) has no tangent: answered inline,
// without the out-of-line lookup, so the kernels' no-grad path stays as cheap as before.
inline bool may_have_tangent(const at::Tensor& t) {
  return t.defined() && t.unsafeGetTensorImpl()->autograd_meta() != nullptr;
}

// The tangent of `t` (undefined when it has none).
inline at::Tensor tangent_of(const at::Tensor& t) {
  return may_have_tangent(t) ? t._fw_grad(/*level=*/0) : at::Tensor();
}

inline bool any_has_tangent(at::ArrayRef<at::Tensor> inputs) {
  for (const auto& t : inputs) {
    if (may_have_tangent(t) && t._fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// The backward ops have no derivatives of their own, so no tangent can flow through them:
// an error naming the op, instead of an output silently without a tangent (which forward AD
// reads as zero). Reaching one with a tangent means a second derivative of `forward_op`.
inline void check_no_tangent(const char* op, const char* forward_op,
                             at::ArrayRef<at::Tensor> inputs) {
  TORCH_CHECK(!any_has_tangent(inputs), "metalcore.", op,
              ": forward-mode AD through this op is not supported; it is reached when taking a "
              "second derivative of metalcore.",
              forward_op, " (torch.func.hessian, jacfwd over jacrev or grad, jvp of a gradient)");
}

// Sets `tangent` as the forward-mode gradient of `output`. The tangents of the non-linear ops
// are computed below autograd from their backward ops, which have no derivatives of their own;
// when autograd would have to differentiate such a tangent (reverse-over-forward, e.g.
// torch.func.jacrev of a jvp), it gets a node that raises instead of a silently missing
// gradient. `sources` are the tensors the tangent was computed from.
inline void set_tangent(const char* op, const at::Tensor& output, const at::Tensor& tangent,
                        const variable_list& sources) {
  if (at::GradMode::is_enabled()) {
    bool needs_graph = false;
    for (const auto& t : sources) needs_graph |= t.defined() && t.requires_grad();
    if (needs_graph) {
      auto node = make_node<torch::autograd::Error>(
          std::string("metalcore.") + op +
              ": the forward-mode tangent (jvp) of this op cannot be differentiated "
              "(reverse-over-forward, e.g. torch.func.jacrev of a jvp, would need a second "
              "derivative of the op, which is not supported)",
          torch::autograd::collect_next_edges(sources));
      torch::autograd::set_history(tangent, node);
    }
  }
  output._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
}

// --- Backward ops ------------------------------------------------------------------------------

// True for a tensor of a functorch grad transform (torch.func.grad, vjp, jacrev, hessian).
inline bool is_functorch_grad_tensor(const at::Tensor& t) {
  return t.defined() && t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper);
}

// The backward ops are not themselves differentiable. Asked for a derivative (a double
// backward: some input requires grad under grad mode), they raise at once rather than return
// tensors without a grad_fn, which autograd would read as zero. Under a functorch grad transform
// every backward runs with create_graph=True, whether or not a second derivative follows, so
// there this returns true instead: the caller gives the outputs a node that raises only if that
// derivative is actually taken (set_double_backward_error).
inline bool double_backward_needs_error_node(const char* op, at::ArrayRef<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  bool requires_grad = false, functorch = false;
  for (const auto& t : inputs) {
    if (t.defined() && t.requires_grad()) {
      requires_grad = true;
      functorch |= is_functorch_grad_tensor(t);
    }
  }
  TORCH_CHECK(!requires_grad || functorch, "metalcore.", op,
              ": double backward (create_graph=True through this op) is not supported");
  return requires_grad;
}

inline void set_double_backward_error(const char* op, const char* forward_op,
                                      at::ArrayRef<at::Tensor> inputs,
                                      at::ArrayRef<at::Tensor> outputs) {
  auto node = make_node<torch::autograd::Error>(
      std::string("metalcore.") + op + ": double backward (a second derivative of metalcore." +
          forward_op + ", e.g. torch.func.grad of grad, jacrev of jacrev or vjp) is not supported",
      torch::autograd::collect_next_edges(inputs));
  for (const auto& t : outputs) torch::autograd::set_history(t, node);
}

// The autograd kernel of a backward op `op` (of `forward_op`): checks, then the call below
// autograd. `inputs` are its tensor arguments, `args` the call's arguments.
template <typename Sig, typename... Args>
auto call_backward_op(const char* op, const char* forward_op,
                      const c10::TypedOperatorHandle<Sig>& handle, at::ArrayRef<at::Tensor> inputs,
                      Args&&... args) {
  const bool error_node = double_backward_needs_error_node(op, inputs);
  check_no_tangent(op, forward_op, inputs);
  auto out = call_below(handle, std::forward<Args>(args)...);
  if (error_node) {
    if constexpr (std::is_same_v<decltype(out), at::Tensor>) {
      set_double_backward_error(op, forward_op, inputs, {out});
    } else {
      std::apply([&](auto&... o) { set_double_backward_error(op, forward_op, inputs, {o...}); },
                 out);
    }
  }
  return out;
}

// --- The node of one op call ------------------------------------------------------------------

template <typename... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <typename... F>
Overloaded(F...) -> Overloaded<F...>;

// The graph node of one call of a differentiable metalcore op. Derived declares
//   static constexpr const char* kName;                    the grad_fn name
//   template <typename V> void visit(V&& v);               v(saved, is_output) for each
//                                                          SavedVariable, v(x) for each scalar
//   variable_list backward(variable_list& grads);         the gradients of the inputs, in the
//                                                          order of the node's next edges
// and this base supplies the locking, the release of saved tensors after backward, and the
// hooks of compiled autograd (the scalars key its cache, the saved tensors are swapped for its
// proxies, and backward, calling metalcore ops, is traced as it is).
template <typename Derived>
struct OpNode : Node {
  std::string name() const override { return Derived::kName; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return derived().backward(grads);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    derived().visit(Overloaded{[](SavedVariable& v, bool) { v.reset_data(); }, [](auto&) {}});
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    const_cast<Derived&>(static_cast<const Derived&>(*this))
        .visit(Overloaded{[&](SavedVariable& v, bool is_output) { args.collect(v, is_output); },
                          [&](const auto& x) { args.collect(x); }});
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    derived().visit(Overloaded{[&](SavedVariable& v, bool) { saved.before(v); }, [](auto&) {}});
    variable_list result = apply(variable_list(grads));
    derived().visit(Overloaded{[&](SavedVariable& v, bool) { saved.after(v); }, [](auto&) {}});
    return result;
  }

 private:
  Derived& derived() { return static_cast<Derived&>(*this); }
};

// A new node of type N for a call whose differentiable inputs are `inputs` (in the order
// N::backward returns their gradients).
template <typename N, typename... Inputs>
auto new_node(const Inputs&... inputs) {
  auto node = make_node<N>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

}  // namespace metalcore
