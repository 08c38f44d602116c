// The autograd-side kernel of metalcore::adamw (registered at ADInplaceOrView). adamw is not
// differentiable, but it mutates its tensors in place, so, like torch's own in-place ops
// (torch._fused_adamw_ included), it bumps their version counters. Autograd then raises "modified
// by an inplace operation" instead of silently computing a wrong gradient when a tensor saved for
// a pending backward was stepped. Custom ops fall through this key by default, which skips it.
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using AdamwSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, at::TensorList, const at::Tensor&, double, double, double,
                      double, bool, bool);

void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

// Like torch's in-place ops (torch._fused_adamw_ included): writing a leaf that requires grad
// while grad mode is on would silently detach the update from autograd, so it is an error;
// optimizers step under torch.no_grad().
void check_no_grad_leaves(const char* arg, at::TensorList tensors) {
  if (!at::GradMode::is_enabled()) return;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(!(t.defined() && t.requires_grad() && t.is_leaf()), "metalcore.adamw: '", arg, "[",
                i,
                "]' is a leaf tensor that requires grad and would be written in place with grad ",
                "mode on; step under torch.no_grad() (as torch.optim optimizers do)");
  }
}

void adamw_ad_inplace_or_view(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList state_steps, const at::Tensor& lr, double beta1,
                              double beta2, double weight_decay, double eps, bool amsgrad,
                              bool maximize) {
  static const auto op = op_handle<AdamwSig>("adamw");
  check_no_grad_leaves("params", params);
  check_no_grad_leaves("exp_avgs", exp_avgs);
  check_no_grad_leaves("exp_avg_sqs", exp_avg_sqs);
  check_no_grad_leaves("max_exp_avg_sqs", max_exp_avg_sqs);
  check_no_grad_leaves("state_steps", state_steps);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
            weight_decay, eps, amsgrad, maximize);
  }
  // Only after a step that happened: a rejected call (validation runs before any write) leaves
  // the versions alone.
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(max_exp_avg_sqs);
  bump_versions(state_steps);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, ADInplaceOrView, m) { m.impl("adamw", &adamw_ad_inplace_or_view); }

}  // namespace metalcore
