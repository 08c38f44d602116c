// Autograd of the RoPE family. rope is linear in (q, k): its backward is the transposed map
// (metalcore::rope_backward), the backward of that is rope again (so double backward works), and
// the forward-mode tangent of either is the op itself applied to the tangents (so jvp, jacfwd
// and hessians work too). cos/sin never get gradients or tangents: asking for them is an error,
// not a silently dropped derivative.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using RopeSig = Pair(const T&, const T&, const T&, const T&, bool);

void check_tables_need_no_grad(const char* op, const T& cos, const T& sin) {
  if (at::GradMode::is_enabled()) {
    TORCH_CHECK(!(cos.defined() && cos.requires_grad()) && !(sin.defined() && sin.requires_grad()),
                "metalcore.", op,
                ": gradients with respect to 'cos'/'sin' are not supported; pass them detached "
                "(e.g. cos.detach(), as rotary tables are buffers) or build them under "
                "torch.no_grad()");
  }
  TORCH_CHECK(!any_has_tangent({cos, sin}), "metalcore.", op,
              ": forward-mode tangents of 'cos'/'sin' are not supported; pass them without one "
              "(rotary tables are buffers)");
}

// ForwardOp maps (x_q, x_k) to its outputs; BackwardOp is its transpose (and vice versa).
template <const char* ForwardOp, const char* BackwardOp, const char* Name>
struct RopeLinearBackward : OpNode<RopeLinearBackward<ForwardOp, BackwardOp, Name>> {
  static constexpr const char* kName = Name;
  // Only the tables are needed: the map is linear, q and k are not saved.
  SavedVariable cos_, sin_;
  bool interleaved_ = false;
  template <typename V>
  void visit(V&& v) {
    v(cos_, false);
    v(sin_, false);
    v(interleaved_);
  }
  variable_list backward(variable_list& grads) {
    static const auto op = op_handle<RopeSig>(BackwardOp);
    if (!grads[0].defined() && !grads[1].defined()) return {T(), T()};
    // The op takes both gradients: an unused output's is zero.
    const T gq = grads[0].defined() ? grads[0] : this->input_metadata(0).zeros_like();
    const T gk = grads[1].defined() ? grads[1] : this->input_metadata(1).zeros_like();
    auto [grad_q, grad_k] = op.call(gq, gk, cos_.unpack(), sin_.unpack(), interleaved_);
    return {grad_q, grad_k};
  }
};

constexpr char kRope[] = "rope";
constexpr char kRopeBackward[] = "rope_backward";
constexpr char kRopeNode[] = "MetalcoreRopeBackward";
constexpr char kRopeBackwardNode[] = "MetalcoreRopeBackwardBackward";

// Shared by rope and rope_backward: both are linear in their first two arguments.
template <const char* OpName, const char* TransposeName, const char* NodeName>
Pair linear_autograd(const T& x_q, const T& x_k, const T& cos, const T& sin, bool interleaved) {
  static const auto op = op_handle<RopeSig>(OpName);
  check_tables_need_no_grad(OpName, cos, sin);
  const bool grad = any_requires_grad({x_q, x_k});
  const T t_q = tangent_of(x_q), t_k = tangent_of(x_k);
  // Inference: no graph node, straight to the backend kernel.
  if (!grad && !t_q.defined() && !t_k.defined()) {
    return call_below(op, x_q, x_k, cos, sin, interleaved);
  }
  auto [q_out, k_out] = call_below(op, x_q, x_k, cos, sin, interleaved);
  if (grad) {
    auto node = new_node<RopeLinearBackward<OpName, TransposeName, NodeName>>(x_q, x_k);
    node->cos_ = SavedVariable(cos, false);
    node->sin_ = SavedVariable(sin, false);
    node->interleaved_ = interleaved;
    torch::autograd::set_history(q_out, node);
    torch::autograd::set_history(k_out, node);
  }
  if (t_q.defined() || t_k.defined()) {
    // Linear: the tangent is the op of the tangents, called through autograd so that it is
    // differentiable like any other output.
    auto [tq_out, tk_out] =
        op.call(t_q.defined() ? t_q : at::zeros_like(x_q),
                t_k.defined() ? t_k : at::zeros_like(x_k), cos, sin, interleaved);
    q_out._set_fw_grad(tq_out, /*level=*/0, /*is_inplace_op=*/false);
    k_out._set_fw_grad(tk_out, /*level=*/0, /*is_inplace_op=*/false);
  }
  return {q_out, k_out};
}

Pair rope_autograd(const T& q, const T& k, const T& cos, const T& sin, bool interleaved) {
  return linear_autograd<kRope, kRopeBackward, kRopeNode>(q, k, cos, sin, interleaved);
}

Pair rope_backward_autograd(const T& grad_q_out, const T& grad_k_out, const T& cos, const T& sin,
                            bool interleaved) {
  return linear_autograd<kRopeBackward, kRope, kRopeBackwardNode>(grad_q_out, grad_k_out, cos, sin,
                                                                  interleaved);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("rope", &rope_autograd);
  m.impl("rope_backward", &rope_backward_autograd);
}

}  // namespace metalcore
