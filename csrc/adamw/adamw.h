// AdamW: input validation shared by every backend's entry point. Everything is checked before
// anything is mutated, so a bad call never leaves a half-applied optimizer step behind.
#pragma once

#include <ATen/ATen.h>

#include <ostream>

#include "common/checks.h"

namespace metalcore::adamw {

// Names one list element in messages ("grads[3]"); formatted only when a check fails, so the
// success path allocates nothing per tensor.
struct Item {
  const char* list;
  size_t index;
};

inline std::ostream& operator<<(std::ostream& os, const Item& item) {
  return os << item.list << "[" << item.index << "]";
}

// States are float32 (master-weight style) or the param dtype (what torch.optim.AdamW keeps, so
// its state_dict loads as is). float64 params are for reference testing and keep float64 states.
inline bool state_dtype_ok(at::ScalarType param, at::ScalarType state) {
  if (state == param) return true;
  return state == at::kFloat && (param == at::kBFloat16 || param == at::kHalf);
}

// Elementwise kernels walk memory in storage order: each tensor must cover a dense block, and
// every tensor of one parameter must lay its elements out in the same order as the param.
inline bool same_memory_order(const at::Tensor& a, const at::Tensor& b) {
  return (a.is_contiguous() && b.is_contiguous()) || a.strides() == b.strides();
}

inline void check_dense(const char* op, Item arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "metalcore.", op, ": '", arg,
                    "' must be a dense (strided) tensor, got layout ", t.layout(),
                    " (sparse gradients are not supported)");
  TORCH_CHECK_VALUE(t.numel() == 0 || t.is_non_overlapping_and_dense(), "metalcore.", op, ": '",
                    arg, "' must be contiguous (or dense without gaps or overlap), got sizes ",
                    t.sizes(), " and strides ", t.strides());
}

// dtype rule aside, every tensor of parameter i matches params[i] in device, shape and layout.
inline void check_like_param(const char* op, Item arg, const at::Tensor& t, Item param_arg,
                             const at::Tensor& p) {
  TORCH_CHECK(t.device() == p.device(), "metalcore.", op, ": '", arg,
              "' must be on the same device as '", param_arg, "' (", p.device(), "), got ",
              t.device());
  TORCH_CHECK_VALUE(t.sizes() == p.sizes(), "metalcore.", op, ": '", arg,
                    "' must have the same shape as '", param_arg, "' ", p.sizes(), ", got ",
                    t.sizes());
  check_dense(op, arg, t);
  TORCH_CHECK_VALUE(p.numel() == 0 || same_memory_order(t, p), "metalcore.", op, ": '", arg,
                    "' must have the same memory layout as '", param_arg, "' (strides ",
                    p.strides(), "), got strides ", t.strides());
}

inline void check_state(const char* op, Item arg, const at::Tensor& t, Item param_arg,
                        const at::Tensor& p, const at::Tensor& first_state) {
  TORCH_CHECK_VALUE(t.defined(), "metalcore.", op, ": '", arg, "' must be a tensor, got None");
  TORCH_CHECK_TYPE(state_dtype_ok(p.scalar_type(), t.scalar_type()), "metalcore.", op, ": '", arg,
                   "' must be float32 or the dtype of '", param_arg, "' (", p.scalar_type(),
                   "), got ", t.scalar_type());
  if (first_state.defined()) {
    TORCH_CHECK_TYPE(t.scalar_type() == first_state.scalar_type(), "metalcore.", op, ": '", arg,
                     "' must have the same dtype as the other optimizer states of '", param_arg,
                     "' (", first_state.scalar_type(), "), got ", t.scalar_type());
  }
  check_like_param(op, arg, t, param_arg, p);
}

inline void check_hyper(const char* op, double beta1, double beta2, double weight_decay,
                        double eps) {
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "metalcore.", op,
                    ": 'beta1' must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "metalcore.", op,
                    ": 'beta2' must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "metalcore.", op, ": 'weight_decay' must be >= 0, got ",
                    weight_decay);
  TORCH_CHECK_VALUE(eps >= 0.0, "metalcore.", op, ": 'eps' must be >= 0, got ", eps);
}

inline void check_lr_tensor(const char* op, const at::Tensor& lr) {
  check_defined(op, "lr", lr);
  TORCH_CHECK_VALUE(lr.dim() == 0, "metalcore.", op, ": 'lr' must be a 0-dim tensor, got shape ",
                    lr.sizes());
  TORCH_CHECK_TYPE(lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble, "metalcore.",
                   op, ": 'lr' must be float32 or float64, got ", lr.scalar_type());
}

inline void check_lr_value(const char* op, double lr) {
  TORCH_CHECK_VALUE(lr >= 0.0, "metalcore.", op, ": 'lr' must be >= 0, got ", lr);
}

// Validates every list against params (lengths, dtypes, shapes, devices, layouts).
inline void check_lists(const char* op, at::TensorList params, at::TensorList grads,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList max_exp_avg_sqs, at::TensorList state_steps, bool amsgrad) {
  const size_t n = params.size();
  auto check_len = [&](const char* name, at::TensorList list) {
    TORCH_CHECK_VALUE(list.size() == n, "metalcore.", op, ": '", name,
                      "' must have one tensor per param (", n, "), got ", list.size());
  };
  check_len("grads", grads);
  check_len("exp_avgs", exp_avgs);
  check_len("exp_avg_sqs", exp_avg_sqs);
  check_len("state_steps", state_steps);
  if (amsgrad) {
    TORCH_CHECK_VALUE(max_exp_avg_sqs.size() == n, "metalcore.", op,
                      ": 'max_exp_avg_sqs' must have one tensor per param (", n,
                      ") when amsgrad=True, got ", max_exp_avg_sqs.size());
  } else {
    TORCH_CHECK_VALUE(max_exp_avg_sqs.empty(), "metalcore.", op,
                      ": 'max_exp_avg_sqs' must be empty when amsgrad=False, got ",
                      max_exp_avg_sqs.size(), " tensor(s)");
  }
  for (size_t i = 0; i < n; ++i) {
    const Item pa{"params", i};
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.defined(), "metalcore.", op, ": '", pa, "' must be a tensor, got None");
    TORCH_CHECK_TYPE(is_supported_float(p.scalar_type()), "metalcore.", op, ": '", pa,
                     "' must be float16, bfloat16, float32 or float64, got ", p.scalar_type());
    check_dense(op, pa, p);

    const Item ga{"grads", i};
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.defined(), "metalcore.", op, ": '", ga, "' must be a tensor, got None");
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, "metalcore.", op, ": '", ga,
                      "' must be a dense (strided) tensor, got layout ", g.layout(),
                      " (sparse gradients are not supported)");
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), "metalcore.", op, ": '", ga,
                     "' must have the same dtype as '", pa, "' (", p.scalar_type(), "), got ",
                     g.scalar_type());
    check_like_param(op, ga, g, pa, p);

    check_state(op, Item{"exp_avgs", i}, exp_avgs[i], pa, p, at::Tensor());
    check_state(op, Item{"exp_avg_sqs", i}, exp_avg_sqs[i], pa, p, exp_avgs[i]);
    if (amsgrad) {
      check_state(op, Item{"max_exp_avg_sqs", i}, max_exp_avg_sqs[i], pa, p, exp_avgs[i]);
    }

    const Item sa{"state_steps", i};
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK_VALUE(s.defined(), "metalcore.", op, ": '", sa, "' must be a tensor, got None");
    TORCH_CHECK_VALUE(
        s.dim() == 0 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
        "metalcore.", op, ": '", sa, "' must be a 0-dim float32 or float64 tensor, got ",
        s.scalar_type(), " of shape ", s.sizes());
  }
}

}  // namespace metalcore::adamw
