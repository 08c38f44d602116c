// embedding_bag launch layer: the Metal backend of the family's shared entry points
// (embedding_bag.h). The forward is one thread per output element. The backward's bookkeeping
// (each position's bag, each bag's count, the stable sort of positions by weight row and the row
// segments) is integer work done with ATen ops on the device; the kernels then sum each weight
// row's contributions in index order (deterministic, no atomics).
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "embedding_bag/embedding_bag.h"
#include "kernels/embedding_bag.h"

namespace metalcore::launch {
namespace {

using embedding_bag::Mode;
using namespace embedding_bag_k;

constexpr const char* kVariants[] = {"fwd", "argmax", "bwd_weight", "bwd_psw"};

// Grids are 32-bit: one thread per element of [B, D] and [V, D].
void check_metal(const char* op, const char* arg, const at::Tensor& weight) {
  check_metal_dtype(op, arg, weight.scalar_type());
  TORCH_CHECK_VALUE(weight.numel() <= std::numeric_limits<uint32_t>::max(), "metalcore.", op,
                    ": at most 2^32 - 1 weight elements on the Metal backend, got ",
                    weight.sizes());
}

// A bound buffer must have storage; kernels never read an argument they do not use (no
// per_sample_weights, no argmax) or an empty one, so any non-empty tensor stands in.
const at::Tensor& bindable(const at::Tensor& t, const at::Tensor& fallback) {
  return t.defined() && t.numel() > 0 ? t : fallback;
}

Params params(int64_t d, int64_t rows, int64_t n, int64_t padding_idx, Mode mode, bool has_psw) {
  Params p{};
  p.d = static_cast<uint64_t>(d);
  p.rows = static_cast<uint64_t>(rows);
  p.n = static_cast<uint64_t>(n);
  p.pad1 = static_cast<uint64_t>(padding_idx + 1);
  p.mode = static_cast<unsigned>(mode);
  p.has_psw = has_psw ? 1u : 0u;
  return p;
}

void dispatch_1d(Encoder& enc, uint64_t threads) {
  TORCH_CHECK_VALUE(threads <= std::numeric_limits<uint32_t>::max(),
                    "metalcore.embedding_bag: at most 2^32 - 1 output elements on the Metal "
                    "backend, got ",
                    threads);
  const uint32_t tg = std::min(kThreads, enc.max_threads_per_threadgroup());
  enc.dispatch_threads({static_cast<uint32_t>(threads), 1, 1}, {tg, 1, 1});
}

struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& t) {
    check_metal(op, arg, t);
  }

  void forward(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& bounds,
               Mode mode, const at::Tensor& psw, int64_t padding_idx, const at::Tensor& out) const {
    const int64_t bags = out.size(0), d = out.size(1);
    enc.set_pipeline(kernel_name("embedding_bag", "fwd", weight.scalar_type()));
    enc.set_tensor(0, weight);
    enc.set_tensor(1, bindable(indices, bounds));
    enc.set_tensor(2, bounds);
    enc.set_tensor(3, bindable(psw, weight));
    enc.set_tensor(4, out);
    enc.set_value(5, params(d, bags, indices.size(0), padding_idx, mode, psw.defined()));
    dispatch_1d(enc, static_cast<uint64_t>(bags) * d);
  }

  void backward(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& indices,
                const at::Tensor& bounds, Mode mode, const at::Tensor& psw, int64_t padding_idx,
                const at::Tensor& grad_weight, const at::Tensor& grad_psw) const {
    const int64_t bags = grad_out.size(0), d = grad_out.size(1);
    const int64_t v = grad_weight.size(0), n = indices.size(0);
    const auto long_opts = indices.options();
    // Each position's bag (-1 past the last bag) and each bag's count of non-padding rows.
    const at::Tensor lengths = bounds.slice(0, 1) - bounds.slice(0, 0, bags);
    const int64_t covered = bounds[bags].item<int64_t>();
    const at::Tensor bag_of =
        at::cat({at::repeat_interleave(at::arange(bags, long_opts), lengths, 0, covered),
                 at::full({n - covered}, -1, long_opts)});
    const at::Tensor valid = bag_of.ge(0).logical_and_(indices.ne(padding_idx));
    const at::Tensor csum = at::cat({at::zeros({1}, long_opts), valid.to(at::kLong).cumsum(0)});
    const at::Tensor count =
        csum.index_select(0, bounds.slice(0, 1)) - csum.index_select(0, bounds.slice(0, 0, bags));
    // Positions sorted by row, stably; invalid ones sort last under the key V.
    const at::Tensor keys = at::where(valid, indices, v);
    const auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor start = at::searchsorted(sorted, at::arange(v + 1, long_opts));
    const Params p_bags = params(d, bags, n, padding_idx, mode, psw.defined());
    at::Tensor argmax;
    if (mode == Mode::Max) {
      argmax = at::empty({bags, d}, long_opts);
      enc.set_pipeline(kernel_name("embedding_bag", "argmax", weight.scalar_type()));
      enc.set_tensor(0, weight);
      enc.set_tensor(1, bindable(indices, bounds));
      enc.set_tensor(2, bounds);
      enc.set_tensor(3, argmax);
      enc.set_value(4, p_bags);
      dispatch_1d(enc, static_cast<uint64_t>(bags) * d);
    }
    if (v == 0) return;  // no rows: no positions either (the indices were range-checked)
    enc.set_pipeline(kernel_name("embedding_bag", "bwd_weight", weight.scalar_type()));
    enc.set_tensor(0, grad_out);
    enc.set_tensor(1, bindable(order, start));
    enc.set_tensor(2, start);
    enc.set_tensor(3, bindable(bag_of, start));
    enc.set_tensor(4, count);
    enc.set_tensor(5, bindable(psw, grad_out));
    enc.set_tensor(6, bindable(argmax, start));
    enc.set_tensor(7, grad_weight);
    enc.set_value(8, params(d, v, n, padding_idx, mode, psw.defined()));
    dispatch_1d(enc, static_cast<uint64_t>(v) * d);
    if (grad_psw.defined() && n > 0) {
      enc.set_pipeline(kernel_name("embedding_bag", "bwd_psw", weight.scalar_type()));
      enc.set_tensor(0, grad_out);
      enc.set_tensor(1, weight);
      enc.set_tensor(2, indices);
      enc.set_tensor(3, bag_of);
      enc.set_tensor(4, grad_psw);
      enc.set_value(5, p_bags);
      dispatch_1d(enc, static_cast<uint64_t>(n));
    }
  }
};

at::Tensor embedding_bag_fwd(Encoder& enc, const at::Tensor& weight, const at::Tensor& input,
                             const at::Tensor& offsets, c10::string_view mode,
                             const std::optional<at::Tensor>& per_sample_weights,
                             bool include_last_offset, std::optional<int64_t> padding_idx) {
  return embedding_bag::forward(MetalKernels{enc}, weight, input, offsets,
                                std::string_view(mode.data(), mode.size()), per_sample_weights,
                                include_last_offset, padding_idx);
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_bwd(
    Encoder& enc, const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& input,
    const at::Tensor& offsets, c10::string_view mode,
    const std::optional<at::Tensor>& per_sample_weights, bool include_last_offset,
    std::optional<int64_t> padding_idx) {
  return embedding_bag::backward(MetalKernels{enc}, grad_out, weight, input, offsets,
                                 std::string_view(mode.data(), mode.size()), per_sample_weights,
                                 include_last_offset, padding_idx);
}

std::vector<std::string> embedding_bag_kernel_names() {
  std::vector<std::string> names;
  for (const char* v : kVariants) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16})
      names.push_back(kernel_name("embedding_bag", v, t));
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("embedding_bag", on_metal<&embedding_bag_fwd>);
  m.impl("embedding_bag_backward", on_metal<&embedding_bag_bwd>);
}

const RegisterKernelNames registered_names(&embedding_bag_kernel_names);

}  // namespace metalcore::launch
