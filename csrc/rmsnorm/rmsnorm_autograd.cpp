// Autograd of the RMSNorm family: forward redispatches below autograd, backward calls
// metalcore::rmsnorm_backward / metalcore::fused_add_rmsnorm_backward.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;

class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                            double eps) {
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const OptTensor&, double)>("rmsnorm");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, weight.value_or(at::Tensor())});
    ctx->saved_data["eps"] = eps;
    return op.call(input, weight, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<Pair(const at::Tensor&, const at::Tensor&, const OptTensor&, double)>(
            "rmsnorm_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[1];
    auto [grad_input, grad_weight] =
        op.call(grads[0], saved[0], weight.defined() ? OptTensor(weight) : std::nullopt,
                ctx->saved_data["eps"].toDouble());
    return {grad_input, weight.defined() ? grad_weight : at::Tensor(), at::Tensor()};
  }
};

class FusedAddRmsNormFunction : public torch::autograd::Function<FusedAddRmsNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& residual, const OptTensor& weight, double eps) {
    static const auto op =
        op_handle<Pair(const at::Tensor&, const at::Tensor&, const OptTensor&, double)>(
            "fused_add_rmsnorm");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, residual_out] = op.call(input, residual, weight, eps);
    // The backward needs only the summed residual, not input and residual separately.
    ctx->save_for_backward({residual_out, weight.value_or(at::Tensor())});
    ctx->saved_data["eps"] = eps;
    // An unused residual_out gets an undefined grad instead of a materialised zero tensor.
    ctx->set_materialize_grads(false);
    return {out, residual_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<Pair(const at::Tensor&, const OptTensor&, const at::Tensor&,
                                          const OptTensor&, double)>("fused_add_rmsnorm_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& residual_out = saved[0];
    const at::Tensor& weight = saved[1];
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined()) grad_out = at::zeros_like(residual_out);
    auto [grad_x, grad_weight] = op.call(
        grad_out, grads[1].defined() ? OptTensor(grads[1]) : std::nullopt, residual_out,
        weight.defined() ? OptTensor(weight) : std::nullopt, ctx->saved_data["eps"].toDouble());
    // d(input + residual)/d input = d/d residual = identity.
    return {grad_x, grad_x, weight.defined() ? grad_weight : at::Tensor(), at::Tensor()};
  }
};

at::Tensor rmsnorm_autograd(const at::Tensor& input, const OptTensor& weight, double eps) {
  if (any_requires_grad({input, weight.value_or(at::Tensor())})) {
    return RmsNormFunction::apply(input, weight, eps);
  }
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const OptTensor&, double)>("rmsnorm");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input, weight, eps);
}

Pair fused_add_rmsnorm_autograd(const at::Tensor& input, const at::Tensor& residual,
                                const OptTensor& weight, double eps) {
  if (!any_requires_grad({input, residual, weight.value_or(at::Tensor())})) {
    static const auto op =
        op_handle<Pair(const at::Tensor&, const at::Tensor&, const OptTensor&, double)>(
            "fused_add_rmsnorm");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, residual, weight, eps);
  }
  auto outs = FusedAddRmsNormFunction::apply(input, residual, weight, eps);
  return {outs[0], outs[1]};
}

Pair rmsnorm_backward_autograd(const at::Tensor& grad_out, const at::Tensor& input,
                               const OptTensor& weight, double eps) {
  static const auto op =
      op_handle<Pair(const at::Tensor&, const at::Tensor&, const OptTensor&, double)>(
          "rmsnorm_backward");
  check_no_double_backward("rmsnorm_backward", {grad_out, input, weight.value_or(at::Tensor())});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_out, input, weight, eps);
}

Pair fused_add_rmsnorm_backward_autograd(const at::Tensor& grad_out,
                                         const OptTensor& grad_residual_out,
                                         const at::Tensor& residual_out, const OptTensor& weight,
                                         double eps) {
  static const auto op = op_handle<Pair(const at::Tensor&, const OptTensor&, const at::Tensor&,
                                        const OptTensor&, double)>("fused_add_rmsnorm_backward");
  check_no_double_backward("fused_add_rmsnorm_backward",
                           {grad_out, grad_residual_out.value_or(at::Tensor()), residual_out,
                            weight.value_or(at::Tensor())});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_out, grad_residual_out, residual_out, weight, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("rmsnorm", &rmsnorm_autograd);
  m.impl("fused_add_rmsnorm", &fused_add_rmsnorm_autograd);
  m.impl("rmsnorm_backward", &rmsnorm_backward_autograd);
  m.impl("fused_add_rmsnorm_backward", &fused_add_rmsnorm_backward_autograd);
}

}  // namespace metalcore
