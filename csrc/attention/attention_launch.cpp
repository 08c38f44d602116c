// Attention launch layer: the Metal backend of the family's shared entry points (attention.h) —
// Metal's limits, the tiling, grid sizes and argument binding, written once against Encoder.
// Forward: one kernel (online softmax over key tiles). Backward: a pre-pass for
// D = rowsum(grad_out * out) - grad_lse (and a flag for non-finite inputs), then a dQ kernel over
// query rows and a dK/dV kernel over keys (no float atomics). Design notes are at the top of
// kernels/attention.metal.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "attention/attention.h"
#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/attention.h"

namespace metalcore::launch {
namespace {

using namespace attention_k;

constexpr const char* kVariants[] = {"fwd", "merge", "delta", "bwd_dq", "bwd_dkdv"};
constexpr uint32_t kDeltaThreads = 256;

// Owners per threadgroup (one per simdgroup) and items per tile, so that the owners' vectors
// (owner_floats each) and one tile of items (item_floats each) fit kSmemFloats: the most owners
// the pipeline allows (up to kMaxOwners), then the largest tile. Head dims up to kMaxHeadDim
// always fit with 8 items per tile.
struct Tiling {
  uint32_t owners, tile;
};

Tiling tiling(Encoder& enc, uint32_t owner_floats, uint32_t item_floats) {
  const uint32_t most =
      std::clamp<uint32_t>(enc.max_threads_per_threadgroup() / kSimdWidth, 1, kMaxOwners);
  for (uint32_t owners = most; owners >= 1; owners /= 2) {
    for (uint32_t tile : {32u, 16u, 8u}) {
      if (owners * owner_floats + tile * item_floats <= kSmemFloats) return {owners, tile};
    }
  }
  TORCH_CHECK(false, "metalcore: attention tiling found no fit for ", owner_floats, " + ",
              item_floats, " floats (head dims are checked against kMaxHeadDim first)");
}

// t, or a placeholder where t is empty: a kernel never reads an empty tensor, and no backend is
// asked to bind a zero-length range.
const at::Tensor& bound(const at::Tensor& t, const at::Tensor& placeholder) {
  return t.defined() && t.numel() > 0 ? t : placeholder;
}

uint32_t odd(uint32_t n) { return n | 1u; }  // tile row strides read across lanes

void check_head_dims(const char* op, const attention::Dims& dm) {
  TORCH_CHECK_NOT_IMPLEMENTED(dm.d <= kMaxHeadDim && dm.dv <= kMaxHeadDim, "metalcore.", op,
                              ": the Metal backend supports head dims up to ", kMaxHeadDim,
                              ", got head_dim ", dm.d, " and v_head_dim ", dm.dv,
                              " (run this call on the CPU)");
}

// Grids and indices are 32-bit: every dimension and every output must fit.
void check_metal(const char* op, const char* arg, const at::Tensor& q) {
  check_metal_dtype(op, arg, q.scalar_type());
  TORCH_CHECK_VALUE(q.numel() <= std::numeric_limits<uint32_t>::max(), "metalcore.", op, ": '", arg,
                    "' must have at most 2^32 - 1 elements on the Metal backend, got ", q.sizes());
}

void check_sizes(const char* op, const attention::Dims& dm) {
  const int64_t most = std::numeric_limits<uint32_t>::max();
  TORCH_CHECK_VALUE(dm.batch * dm.q_heads * dm.lq <= most && dm.batch * dm.kv_heads * dm.lk <= most,
                    "metalcore.", op,
                    ": at most 2^32 - 1 query rows and key rows on the Metal backend, got ",
                    dm.batch * dm.q_heads * dm.lq, " and ", dm.batch * dm.kv_heads * dm.lk);
  TORCH_CHECK_VALUE(
      dm.lq <= std::numeric_limits<int32_t>::max() && dm.lk <= std::numeric_limits<int32_t>::max(),
      "metalcore.", op, ": sequence lengths must be below 2^31 on the Metal backend");
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& mask, const attention::Params& ap) {
  const attention::Dims& dm = ap.dims;
  Params p{};
  const auto u = [](int64_t x) { return static_cast<uint64_t>(x); };
  p.q_sb = u(q.stride(0)), p.q_sh = u(q.stride(1)), p.q_si = u(q.stride(2));
  p.k_sb = u(k.stride(0)), p.k_sh = u(k.stride(1)), p.k_sj = u(k.stride(2));
  p.v_sb = u(v.stride(0)), p.v_sh = u(v.stride(1)), p.v_sj = u(v.stride(2));
  if (mask.defined()) {
    p.m_sb = u(mask.stride(0)), p.m_sh = u(mask.stride(1));
    p.m_si = u(mask.stride(2)), p.m_sj = u(mask.stride(3));
    p.flags |= mask.scalar_type() == at::kBool ? kMaskBool : kMaskAdd;
  }
  p.batch = static_cast<uint32_t>(dm.batch);
  p.q_heads = static_cast<uint32_t>(dm.q_heads);
  p.kv_heads = static_cast<uint32_t>(dm.kv_heads);
  p.group = static_cast<uint32_t>(dm.kv_heads > 0 ? dm.q_heads / dm.kv_heads : 0);
  p.lq = static_cast<uint32_t>(dm.lq);
  p.lk = static_cast<uint32_t>(dm.lk);
  p.d = static_cast<uint32_t>(dm.d);
  p.dv = static_cast<uint32_t>(dm.dv);
  // A window of Lk keys to the left (Lq to the right) already reaches every key: clamped there,
  // the bounds fit 32 bits and the ranges are unchanged.
  p.window_left = static_cast<int32_t>(std::min<int64_t>(ap.vis.left, dm.lk));
  p.window_right = static_cast<int32_t>(std::min<int64_t>(ap.vis.right, dm.lq));
  if (ap.vis.causal) p.flags |= kCausal;
  p.scale = static_cast<float>(ap.scale);
  return p;
}

// Binds the mask to the buffer of its kind and a placeholder the flags keep the kernel from
// reading to the other.
void bind_mask(Encoder& enc, unsigned bool_index, const at::Tensor& mask,
               const at::Tensor& placeholder) {
  const bool is_bool = mask.defined() && mask.scalar_type() == at::kBool;
  const bool is_add = mask.defined() && !is_bool;
  enc.set_tensor(bool_index, is_bool ? bound(mask, placeholder) : placeholder);
  enc.set_tensor(bool_index + 1, is_add ? bound(mask, placeholder) : placeholder);
}

void encode_forward(Encoder& enc, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& mask, const attention::Params& ap, const at::Tensor& out,
                    const at::Tensor& lse) {
  Params p = make_params(q, k, v, mask, ap);
  const std::string name = kernel_name("attention", "fwd", q.scalar_type());
  enc.set_pipeline(name);
  const Tiling t = tiling(enc, p.d, odd(p.d) + p.dv);
  p.owners = t.owners, p.tile = t.tile;
  const uint32_t rows = p.group * p.lq;
  const uint32_t groups = ceil_div(rows, p.owners) * p.batch * p.kv_heads;
  // Split-K when few threadgroups would run (decode: G * Lq rows per KV head fit one or two).
  p.splits = 1;
  if (groups < kTargetThreadgroups) {
    p.splits = std::clamp<uint32_t>(std::min(kTargetThreadgroups / groups, p.lk / kMinSplitKeys), 1,
                                    kMaxSplits);
  }
  const uint32_t total_rows = p.batch * p.q_heads * p.lq;
  const at::Tensor part =
      p.splits > 1 ? at::empty({p.splits, total_rows, p.dv + 2}, lse.options()) : lse;
  enc.set_tensor(0, bound(q, lse));
  enc.set_tensor(1, bound(k, lse));
  enc.set_tensor(2, bound(v, lse));
  bind_mask(enc, 3, mask, lse);
  enc.set_tensor(5, bound(out, lse));  // dv = 0: nothing is written to out
  enc.set_tensor(6, lse);
  enc.set_value(7, p);
  enc.set_tensor(8, part);  // unused (lse as a placeholder) without splits
  enc.dispatch_threadgroups({ceil_div(rows, p.owners), p.batch * p.kv_heads, p.splits},
                            {p.owners * kSimdWidth, 1, 1});
  if (p.splits == 1) return;
  enc.set_pipeline(kernel_name("attention", "merge", q.scalar_type()));
  enc.set_tensor(0, part);
  enc.set_tensor(1, bound(out, lse));
  enc.set_tensor(2, lse);
  enc.set_value(3, p);
  const uint32_t cols = std::max(p.dv, 1u);
  const uint32_t most =
      std::max(kSimdWidth, enc.max_threads_per_threadgroup() / kSimdWidth * kSimdWidth);
  enc.dispatch_threads({cols, total_rows, 1},
                       {std::min({kDeltaThreads, most, round_up(cols, kSimdWidth)}), 1, 1});
}

void encode_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& mask,
                     const attention::Params& ap, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv) {
  Params p = make_params(q, k, v, mask, ap);
  const auto u = [](int64_t x) { return static_cast<uint64_t>(x); };
  p.g_sb = u(grad_out.stride(0)), p.g_sh = u(grad_out.stride(1)), p.g_si = u(grad_out.stride(2));
  p.o_sb = u(out.stride(0)), p.o_sh = u(out.stride(1)), p.o_si = u(out.stride(2));
  if (grad_lse.defined()) p.flags |= kGradLse;
  const at::ScalarType dt = q.scalar_type();
  const uint32_t n_rows = p.batch * p.q_heads * p.lq;
  const uint32_t kv_rows = p.batch * p.kv_heads * p.lk;
  const at::Tensor delta = at::empty({std::max<int64_t>(n_rows, 1)}, lse.options());
  // Set by the pre-pass when an input holds a NaN or Inf: the gradient kernels then visit every
  // tile, hidden ones included (int32 storage of the kernels' uint flag).
  const at::Tensor dense = at::zeros({1}, lse.options().dtype(at::kInt));
  const uint32_t pre_rows = std::max(n_rows, kv_rows);
  // Unwritten outputs (a zero-size grid) are never bound as written: a placeholder is.
  if (pre_rows > 0) {
    enc.set_pipeline(kernel_name("attention", "delta", dt));
    enc.set_tensor(0, bound(grad_out, delta));
    enc.set_tensor(1, bound(out, delta));
    enc.set_tensor(2, bound(grad_lse, delta));
    enc.set_tensor(3, delta);
    enc.set_value(4, p);
    enc.set_tensor(5, bound(q, delta));
    enc.set_tensor(6, bound(k, delta));
    enc.set_tensor(7, bound(v, delta));
    enc.set_tensor(8, bound(lse, delta));
    enc.set_tensor(9, dense);
    // Grid row 0: D and the grad_out / lse checks; rows 1-3: the q, k and v checks.
    const uint32_t most =
        std::max(kSimdWidth, enc.max_threads_per_threadgroup() / kSimdWidth * kSimdWidth);
    enc.dispatch_threads({pre_rows, 4, 1},
                         {std::min({kDeltaThreads, most, round_up(pre_rows, kSimdWidth)}), 1, 1});
  }
  const uint32_t heads = p.batch * p.kv_heads;
  const auto bind_common = [&](const at::Tensor& placeholder) {
    enc.set_tensor(0, bound(grad_out, placeholder));
    enc.set_tensor(1, bound(q, placeholder));
    enc.set_tensor(2, bound(k, placeholder));
    enc.set_tensor(3, bound(v, placeholder));
    enc.set_tensor(4, bound(lse, placeholder));
    enc.set_tensor(5, delta);
    bind_mask(enc, 6, mask, placeholder);
  };
  if (dq.numel() > 0) {
    Params pq = p;
    enc.set_pipeline(kernel_name("attention", "bwd_dq", dt));
    const Tiling t = tiling(enc, p.d + p.dv, odd(p.d) + odd(p.dv));
    pq.owners = t.owners, pq.tile = t.tile;
    bind_common(dq);
    enc.set_tensor(8, dq);
    enc.set_value(9, pq);
    enc.set_tensor(10, dense);
    enc.dispatch_threadgroups({ceil_div(p.group * p.lq, pq.owners), heads, 1},
                              {pq.owners * kSimdWidth, 1, 1});
  }
  if (dk.numel() > 0 || dv.numel() > 0) {
    Params pk = p;
    enc.set_pipeline(kernel_name("attention", "bwd_dkdv", dt));
    const Tiling t = tiling(enc, p.d + p.dv, odd(p.d) + odd(p.dv) + 2);
    pk.owners = t.owners, pk.tile = t.tile;
    const at::Tensor& any = dk.numel() > 0 ? dk : dv;
    bind_common(any);
    enc.set_tensor(8, bound(dk, any));
    enc.set_tensor(9, bound(dv, any));
    enc.set_value(10, pk);
    enc.set_tensor(11, dense);
    enc.dispatch_threadgroups({ceil_div(p.lk, pk.owners), heads, 1},
                              {pk.owners * kSimdWidth, 1, 1});
  }
}

// The Metal backend of the shared entry points (attention.h).
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& q) {
    check_metal(op, arg, q);
  }
  void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& mask, const attention::Params& p, const at::Tensor& out,
               const at::Tensor& lse) const {
    check_head_dims("attention", p.dims);
    check_sizes("attention", p.dims);
    encode_forward(enc, q, k, v, mask, p, out, lse);
  }
  void backward(const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                const at::Tensor& lse, const at::Tensor& mask, const attention::Params& p,
                const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) const {
    check_head_dims("attention_backward", p.dims);
    check_sizes("attention_backward", p.dims);
    encode_backward(enc, grad_out, grad_lse, q, k, v, out, lse, mask, p, dq, dk, dv);
  }
};

using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> attention(Encoder& enc, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const OptT& mask,
                                             std::optional<double> scale, bool is_causal,
                                             int64_t left, int64_t right) {
  return attention::forward(MetalKernels{enc}, q, k, v, mask, scale, is_causal, left, right);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    Encoder& enc, const at::Tensor& grad_out, const OptT& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const OptT& mask, std::optional<double> scale, bool is_causal, int64_t left, int64_t right) {
  return attention::backward(MetalKernels{enc}, grad_out, grad_lse, q, k, v, out, lse, mask, scale,
                             is_causal, left, right);
}

std::vector<std::string> attention_kernel_names() {
  std::vector<std::string> names;
  for (const char* v : kVariants) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16})
      names.push_back(kernel_name("attention", v, t));
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("attention", on_metal<&attention>);
  m.impl("attention_backward", on_metal<&attention_backward>);
}

const RegisterKernelNames registered_names(&attention_kernel_names);

}  // namespace metalcore::launch
