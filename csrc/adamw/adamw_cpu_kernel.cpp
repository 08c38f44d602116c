// AdamW on CPU: all tensors are flattened into one index space of fixed-size chunks, one
// parallel region covers them all, and each element of p, g, m, v (and max v) is read once and
// written once, in opmath (float32, or float64 for float64 params), rounded once on store.
#include "adamw/adamw_cpu_kernel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_vec.h"

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

using adamw::StepScalars;
using adamw::TensorWork;

// Elements per parallel task: large enough to amortise scheduling, small enough to balance
// uneven tensor sizes over the threads.
constexpr int64_t kChunk = 65536;

// Blocks of two opmath vectors: a 16-bit type converts to and from float once per 16 elements
// with full-width loads and stores (one vector's worth would need a partial store each time).
template <typename X>
struct Block {
  fvec<X> lo, hi;
};

// Loads min(count, 2 * vec_len) elements; lanes past count are zero.
template <typename X>
inline Block<X> load_block(const X* p, int64_t count) {
  constexpr int64_t L = vec_len<X>();
  if constexpr (is_reduced_v<X>) {
    const auto raw =
        count >= 2 * L ? at::vec::Vectorized<X>::loadu(p) : at::vec::Vectorized<X>::loadu(p, count);
    auto [lo, hi] = at::vec::convert_to_float<X>(raw);
    return {lo, hi};
  } else {
    using V = fvec<X>;
    if (count >= 2 * L) return {V::loadu(p), V::loadu(p + L)};
    if (count <= L) return {V::loadu(p, count), V(0)};
    return {V::loadu(p), V::loadu(p + L, count - L)};
  }
}

// Stores min(count, 2 * vec_len) elements rounded to X and returns the stored values in opmath.
template <typename X>
inline Block<X> store_block(X* p, const Block<X>& b, int64_t count) {
  constexpr int64_t L = vec_len<X>();
  if constexpr (is_reduced_v<X>) {
    const auto packed = at::vec::convert_from_float<X>(b.lo, b.hi);
    if (count >= 2 * L) {
      packed.store(p);
    } else {
      packed.store(p, count);
    }
    auto [lo, hi] = at::vec::convert_to_float<X>(packed);
    return {lo, hi};
  } else {
    if (count >= 2 * L) {
      b.lo.store(p);
      b.hi.store(p + L);
    } else if (count <= L) {
      b.lo.store(p, count);
    } else {
      b.lo.store(p);
      b.hi.store(p + L, count - L);
    }
    return b;
  }
}

// Updates elements [begin, end) of one tensor. T: param/grad dtype; S: state dtype.
template <typename T, typename S>
void update_range(const TensorWork& w, const StepScalars& s, int64_t begin, int64_t end) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  static_assert(std::is_same_v<fvec<S>, V>, "state and param must share an opmath type");
  constexpr int64_t B = 2 * vec_len<T>();

  T* p = static_cast<T*>(w.param);
  const T* g = static_cast<const T*>(w.grad);
  S* m = static_cast<S*>(w.exp_avg);
  S* v = static_cast<S*>(w.exp_avg_sq);
  S* vmax = static_cast<S*>(w.max_exp_avg_sq);

  // Same formulas as torch.optim.AdamW (lerp for m, mul + addcmul for v, addcdiv for p), with
  // the scalars rounded to opmath as torch's scalar arguments are.
  const acc_t w1 = static_cast<acc_t>(1.0 - s.beta1);
  const bool small_w1 = std::abs(w1) < acc_t(0.5);
  const V w1v(w1), one_minus_w1(acc_t(1) - w1);
  const V b2(static_cast<acc_t>(s.beta2)), w2(static_cast<acc_t>(1.0 - s.beta2));
  const V eps(static_cast<acc_t>(s.eps)), decay(static_cast<acc_t>(s.decay));
  const V step_size(static_cast<acc_t>(w.step_size));
  const V bc2_sqrt(static_cast<acc_t>(w.bias_correction2_sqrt));
  const V zero(acc_t(0));

  auto moments = [&](V gv, V& mv, V& vv) {
    mv = small_w1 ? mv + w1v * (gv - mv) : gv - (gv - mv) * one_minus_w1;
    vv = vv * b2 + w2 * gv * gv;
  };
  auto param = [&](V pv, V mv, V vhat) {
    const V denom = vhat.sqrt() / bc2_sqrt + eps;
    return pv * decay - step_size * (mv / denom);
  };

  for (int64_t i = begin; i < end; i += B) {
    const int64_t c = std::min(B, end - i);
    Block<T> gb = load_block(g + i, c);
    if (s.maximize) gb = {zero - gb.lo, zero - gb.hi};
    Block<S> mb = load_block(m + i, c);
    Block<S> vb = load_block(v + i, c);
    moments(gb.lo, mb.lo, vb.lo);
    moments(gb.hi, mb.hi, vb.hi);
    // The update uses the moments as stored (rounded), as torch does with its state tensors.
    mb = store_block(m + i, mb, c);
    vb = store_block(v + i, vb, c);
    if (vmax != nullptr) {
      const Block<S> xb = load_block(vmax + i, c);
      vb = store_block(vmax + i, {at::vec::maximum(xb.lo, vb.lo), at::vec::maximum(xb.hi, vb.hi)},
                       c);
    }
    Block<T> pb = load_block(p + i, c);
    store_block(p + i, {param(pb.lo, mb.lo, vb.lo), param(pb.hi, mb.hi, vb.hi)}, c);
  }
}

void update_tensor_range(const TensorWork& w, const StepScalars& s, int64_t begin, int64_t end) {
  const at::ScalarType pt = w.param_dtype, st = w.state_dtype;
  switch (pt) {
    case at::kFloat:
      return update_range<float, float>(w, s, begin, end);
    case at::kDouble:
      return update_range<double, double>(w, s, begin, end);
    case at::kBFloat16:
      return st == at::kFloat ? update_range<at::BFloat16, float>(w, s, begin, end)
                              : update_range<at::BFloat16, at::BFloat16>(w, s, begin, end);
    case at::kHalf:
      return st == at::kFloat ? update_range<at::Half, float>(w, s, begin, end)
                              : update_range<at::Half, at::Half>(w, s, begin, end);
    default:
      TORCH_CHECK(false, "metalcore.adamw: unsupported param dtype ", pt);
  }
}

}  // namespace

void adamw_step(const std::vector<TensorWork>& work, const StepScalars& scalars) {
  // starts[k] = first flattened index of tensor k; starts.back() = total element count.
  std::vector<int64_t> starts(work.size() + 1, 0);
  for (size_t k = 0; k < work.size(); ++k) starts[k + 1] = starts[k] + work[k].numel;
  const int64_t total = starts.back();
  if (total == 0) return;
  const int64_t chunks = (total + kChunk - 1) / kChunk;

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const int64_t lo = chunk_begin * kChunk;
    const int64_t hi = std::min(total, chunk_end * kChunk);
    // First tensor whose range contains lo (empty tensors are skipped by upper_bound).
    size_t k = std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin() - 1;
    for (int64_t pos = lo; pos < hi; ++k) {
      const int64_t seg_end = std::min(hi, starts[k + 1]);
      if (seg_end > pos) {
        update_tensor_range(work[k], scalars, pos - starts[k], seg_end - starts[k]);
        pos = seg_end;
      }
    }
  });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
