// AdamW family: the validation and the entry point shared by every backend (adamw_cpu.cpp,
// adamw_cuda.cpp, and the Metal launch layer adamw_launch.cpp). Everything is checked before
// anything is mutated, so a bad call never leaves a half-applied optimizer step behind.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <ostream>
#include <vector>

#include "common/backend.h"
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

inline void check_strided(const char* op, Item arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "metalcore.", op, ": '", arg,
                    "' must be a dense (strided) tensor, got layout ", t.layout(),
                    " (sparse gradients are not supported)");
}

inline void check_dense(const char* op, Item arg, const at::Tensor& t) {
  check_strided(op, arg, t);
  TORCH_CHECK_VALUE(t.numel() == 0 || t.is_non_overlapping_and_dense(), "metalcore.", op, ": '",
                    arg, "' must be contiguous (or dense without gaps or overlap), got sizes ",
                    t.sizes(), " and strides ", t.strides());
}

// dtype rule aside, every tensor of parameter i matches params[i] in device, shape and layout.
inline void check_like_param(const char* op, Item arg, const at::Tensor& t, Item param_arg,
                             const at::Tensor& p) {
  check_same_device(op, arg, t, param_arg, p);
  check_same_shape(op, arg, t, param_arg, p);
  check_dense(op, arg, t);
  TORCH_CHECK_VALUE(p.numel() == 0 || same_memory_order(t, p), "metalcore.", op, ": '", arg,
                    "' must have the same memory layout as '", param_arg, "' (strides ",
                    p.strides(), "), got strides ", t.strides());
}

inline void check_state(const char* op, Item arg, const at::Tensor& t, Item param_arg,
                        const at::Tensor& p, const at::Tensor& first_state) {
  check_defined(op, arg, t);
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
  check_eps(op, eps);
}

inline void check_lr_tensor(const char* op, const at::Tensor& lr) {
  check_defined(op, "lr", lr);
  // A sparse lr would be read through item() as if it were dense.
  TORCH_CHECK_VALUE(lr.layout() == at::kStrided, "metalcore.", op,
                    ": 'lr' must be a dense (strided) tensor, got layout ", lr.layout());
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
    check_float(op, pa, p);
    check_dense(op, pa, p);

    const Item ga{"grads", i};
    const at::Tensor& g = grads[i];
    check_defined(op, ga, g);
    check_strided(op, ga, g);
    check_same_dtype(op, ga, g, pa, p);
    check_like_param(op, ga, g, pa, p);

    check_state(op, Item{"exp_avgs", i}, exp_avgs[i], pa, p, at::Tensor());
    check_state(op, Item{"exp_avg_sqs", i}, exp_avg_sqs[i], pa, p, exp_avgs[i]);
    if (amsgrad) {
      check_state(op, Item{"max_exp_avg_sqs", i}, max_exp_avg_sqs[i], pa, p, exp_avgs[i]);
    }

    const Item sa{"state_steps", i};
    const at::Tensor& s = state_steps[i];
    check_defined(op, sa, s);
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, "metalcore.",
                     op, ": '", sa, "' must be a 0-dim float32 or float64 tensor, got ",
                     s.scalar_type(), " of shape ", s.sizes());
    TORCH_CHECK_VALUE(s.dim() == 0, "metalcore.", op, ": '", sa,
                      "' must be a 0-dim float32 or float64 tensor, got ", s.scalar_type(),
                      " of shape ", s.sizes());
    check_dense(op, sa, s);
  }
}

// Where a backend keeps the step counters (state_steps).
enum class StepHome {
  kHost,          // in host memory: the entry point increments them before the kernel runs
  kDevice,        // on the params' device: the kernel increments them (no host sync)
  kHostOrDevice,  // either: the entry point increments the host ones, the kernel the others
};

// The devices a scalar argument may live on: the params' device and/or the CPU (read on the
// host). Prints as the place list of the error message.
struct Places {
  at::Device params_device;
  bool device, host;

  bool allow(const at::Device& d) const {
    return (device && d == params_device) || (host && d.is_cpu());
  }
};

inline std::ostream& operator<<(std::ostream& os, const Places& w) {
  if (!w.device) return os << "the CPU";
  os << "the params' device (" << w.params_device << ")";
  return w.host && !w.params_device.is_cpu() ? os << " or the CPU" : os;
}

// Every param on one device of the backend's type; lr on that device or the CPU; each step
// where the backend keeps steps. (check_lists put the other tensors of params[i] on its device.)
inline void check_devices(const char* op, c10::DeviceType backend, StepHome steps,
                          at::TensorList params, at::TensorList state_steps, const at::Tensor& lr) {
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.type() == backend, "metalcore.", op, ": '", Item{"params", 0}, "' must be a ",
              c10::DeviceTypeName(backend), " tensor for the ", c10::DeviceTypeName(backend),
              " kernel, got ", dev);
  for (size_t i = 1; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device() == dev, "metalcore.", op, ": '", Item{"params", i},
                "' must be on the device of 'params[0]' (", dev, "), got ", params[i].device());
  }
  const Places lr_places{dev, true, true};
  TORCH_CHECK(lr_places.allow(lr.device()), "metalcore.", op, ": 'lr' must be on ", lr_places,
              ", got ", lr.device());
  const Places step_places{dev, steps != StepHome::kHost, steps != StepHome::kDevice};
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(step_places.allow(s.device()), "metalcore.", op, ": '", Item{"state_steps", i},
                "' must be on ", step_places, ", got ", s.device());
  }
}

// A tensor the step writes must not share memory with any other tensor of the call: the result
// would depend on the order in which the kernel reads and writes (one tensor passed as both
// exp_avgs[i] and exp_avg_sqs[i] mixes the two moments), or one step counter would advance
// twice. Grads are only read, so grads may share memory with each other. Each tensor was checked
// to be dense, so it covers exactly numel elements from its first one.
inline void check_no_overlap(const char* op, at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList max_exp_avg_sqs, at::TensorList state_steps) {
  struct Span {
    const void* storage;
    size_t begin, end;  // bytes into the storage
    uint32_t order;     // argument order: ties name the earlier argument first
    bool written;
    Item item;
  };
  std::vector<Span> spans;
  spans.reserve(params.size() * 6);
  auto add = [&](const char* list, at::TensorList tensors, bool written) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      if (t.numel() == 0 || !t.has_storage()) continue;
      const size_t begin = static_cast<size_t>(t.storage_offset()) * t.itemsize();
      spans.push_back(Span{t.storage().unsafeGetStorageImpl(), begin,
                           begin + static_cast<size_t>(t.numel()) * t.itemsize(),
                           static_cast<uint32_t>(spans.size()), written, Item{list, i}});
    }
  };
  add("params", params, true);
  add("grads", grads, false);
  add("exp_avgs", exp_avgs, true);
  add("exp_avg_sqs", exp_avg_sqs, true);
  add("max_exp_avg_sqs", max_exp_avg_sqs, true);
  add("state_steps", state_steps, true);
  // Tensors on distinct storages cannot overlap, and most calls have one storage per tensor:
  // a set of storage pointers (open addressing, at most half full) finds in O(n) whether any
  // storage holds two tensors; only then are the spans sorted and compared.
  size_t capacity = 16;
  while (capacity < 2 * spans.size()) capacity *= 2;
  std::vector<const void*> seen(capacity, nullptr);
  bool shared = false;
  for (const Span& s : spans) {
    // Fibonacci hashing of the pointer, then linear probing.
    size_t slot =
        (reinterpret_cast<uintptr_t>(s.storage) * 0x9E3779B97F4A7C15ull >> 32) & (capacity - 1);
    while (seen[slot] != nullptr && seen[slot] != s.storage) slot = (slot + 1) & (capacity - 1);
    shared = shared || seen[slot] == s.storage;
    seen[slot] = s.storage;
  }
  if (!shared) return;
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    if (a.storage != b.storage) return a.storage < b.storage;
    return a.begin != b.begin ? a.begin < b.begin : a.order < b.order;
  });
  // One sweep per storage: a span overlaps an earlier one iff it starts before the furthest end
  // seen so far, among written spans (any span) or among all spans (a written span).
  const Span* reach = nullptr;          // the furthest-reaching span of this storage so far
  const Span* reach_written = nullptr;  // the same among written spans
  for (const Span& s : spans) {
    if (reach != nullptr && reach->storage != s.storage) reach = reach_written = nullptr;
    const Span* hit = reach_written != nullptr && s.begin < reach_written->end ? reach_written
                      : s.written && reach != nullptr && s.begin < reach->end  ? reach
                                                                               : nullptr;
    TORCH_CHECK_VALUE(hit == nullptr, "metalcore.", op, ": '", hit->item, "' and '", s.item,
                      "' overlap in memory; every tensor the step writes needs memory of its own");
    if (reach == nullptr || s.end > reach->end) reach = &s;
    if (s.written && (reach_written == nullptr || s.end > reach_written->end)) reach_written = &s;
  }
}

// A step counter in host memory, incremented in place in its own dtype (torch's `step_t += 1`).
inline void increment_host_step(const at::Tensor& s) {
  if (s.scalar_type() == at::kFloat) {
    *s.mutable_data_ptr<float>() += 1.0f;
  } else {
    *s.mutable_data_ptr<double>() += 1.0;
  }
}

inline double host_step_value(const at::Tensor& s) {
  return s.scalar_type() == at::kFloat ? *s.const_data_ptr<float>() : *s.const_data_ptr<double>();
}

// A validated call, as a backend's launch receives it: host steps already incremented.
struct StepArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  const at::Tensor& lr;
  std::optional<double> host_lr;  // lr's value when lr is on the CPU (range-checked)
  double beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize;
};

// ---------------------------------------------------------------------------------------------
// The entry point, written once for every backend b (adamw_cpu.cpp, adamw_cuda.cpp, and the Metal
// launch layer adamw_launch.cpp):
//   B::Guard                        device guard type, constructed from the params' device
//   B::kDevice                      the device type the backend's kernels run on
//   B::kSteps                       where the backend keeps the step counters (StepHome)
//   b.check_limits(op, params, state_steps)   the backend's own limits (dtypes)
//   b.launch(args)                  the update of every tensor, on validated StepArgs

template <typename B>
void run(const B& b, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
         const at::Tensor& lr, double beta1, double beta2, double weight_decay, double eps,
         bool amsgrad, bool maximize) {
  const char* op = "adamw";
  check_hyper(op, beta1, beta2, weight_decay, eps);
  check_lr_tensor(op, lr);
  check_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad);
  if (!params.empty()) {
    check_devices(op, B::kDevice, B::kSteps, params, state_steps, lr);
    b.check_limits(op, params, state_steps);
    check_no_overlap(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps);
  }
  // A CPU lr is read here, for free; a device lr is read by the kernel (a host read would
  // synchronize), so only a CPU lr can be range-checked.
  std::optional<double> host_lr;
  if (lr.is_cpu()) {
    host_lr = lr.item<double>();
    check_lr_value(op, *host_lr);
  }
  if (params.empty()) return;

  // Nothing was mutated above; from here on the step is applied in full.
  const typename B::Guard guard(params[0].device());
  if constexpr (B::kSteps != StepHome::kDevice) {
    for (const at::Tensor& s : state_steps) {
      if (s.is_cpu()) increment_host_step(s);
    }
  }
  b.launch(StepArgs{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, host_lr,
                    beta1, beta2, weight_decay, eps, amsgrad, maximize});
}

// The op's kernel on a stateless backend B (CPU, CUDA).
template <typename B>
void kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
            const at::Tensor& lr, double beta1, double beta2, double weight_decay, double eps,
            bool amsgrad, bool maximize) {
  run(B{}, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
      weight_decay, eps, amsgrad, maximize);
}

}  // namespace metalcore::adamw
