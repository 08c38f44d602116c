// Autograd of the RoPE family. rope is linear in (q, k): its backward is the transposed map
// (metalcore::rope_backward), and the backward of that is rope again, so double backward works.
// cos/sin never get gradients: asking for them is an error, not a silently dropped gradient.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using RopeSig = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     bool);

void check_tables_need_no_grad(const char* op, const at::Tensor& cos, const at::Tensor& sin) {
  if (!at::GradMode::is_enabled()) return;
  TORCH_CHECK(!(cos.defined() && cos.requires_grad()) && !(sin.defined() && sin.requires_grad()),
              "metalcore.", op,
              ": gradients with respect to 'cos'/'sin' are not supported; pass them detached "
              "(e.g. cos.detach(), as rotary tables are buffers) or build them under "
              "torch.no_grad()");
}

// ForwardOp maps (x_q, x_k) to its outputs; BackwardOp is its transpose (and vice versa).
template <const char* ForwardOp, const char* BackwardOp>
class RopeLinearFunction
    : public torch::autograd::Function<RopeLinearFunction<ForwardOp, BackwardOp>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
    static const auto op = op_handle<RopeSig>(ForwardOp);
    at::AutoDispatchBelowADInplaceOrView guard;
    // Only the tables are needed: the map is linear, q and k are not saved.
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    auto [q_out, k_out] = op.call(q, k, cos, sin, interleaved);
    return {q_out, k_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<RopeSig>(BackwardOp);
    const auto saved = ctx->get_saved_variables();
    auto [grad_q, grad_k] =
        op.call(grads[0], grads[1], saved[0], saved[1], ctx->saved_data["interleaved"].toBool());
    return {grad_q, grad_k, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

constexpr char kRope[] = "rope";
constexpr char kRopeBackward[] = "rope_backward";
using RopeFunction = RopeLinearFunction<kRope, kRopeBackward>;
using RopeBackwardFunction = RopeLinearFunction<kRopeBackward, kRope>;

// Shared by rope and rope_backward: both are linear in their first two arguments.
template <typename Function, const char* OpName>
Pair linear_autograd(const at::Tensor& x_q, const at::Tensor& x_k, const at::Tensor& cos,
                     const at::Tensor& sin, bool interleaved) {
  check_tables_need_no_grad(OpName, cos, sin);
  if (!any_requires_grad({x_q, x_k})) {
    // Inference: no graph node, straight to the backend kernel.
    static const auto op = op_handle<RopeSig>(OpName);
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x_q, x_k, cos, sin, interleaved);
  }
  auto outs = Function::apply(x_q, x_k, cos, sin, interleaved);
  return {outs[0], outs[1]};
}

Pair rope_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                   const at::Tensor& sin, bool interleaved) {
  return linear_autograd<RopeFunction, kRope>(q, k, cos, sin, interleaved);
}

Pair rope_backward_autograd(const at::Tensor& grad_q_out, const at::Tensor& grad_k_out,
                            const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  return linear_autograd<RopeBackwardFunction, kRopeBackward>(grad_q_out, grad_k_out, cos, sin,
                                                              interleaved);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("rope", &rope_autograd);
  m.impl("rope_backward", &rope_backward_autograd);
}

}  // namespace metalcore
