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

template <typename X>
inline fvec<X> load_n(const X* p, int64_t c) {
  return c == vec_len<X>() ? vload(p) : vload(p, c);
}

// Updates elements [begin, end) of one tensor. T: param/grad dtype; S: state dtype.
template <typename T, typename S>
void update_range(const TensorWork& w, const StepScalars& s, int64_t begin, int64_t end) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  static_assert(std::is_same_v<fvec<S>, V>, "state and param must share an opmath type");
  constexpr int64_t L = vec_len<T>();

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

  for (int64_t i = begin; i < end; i += L) {
    const int64_t c = std::min(L, end - i);
    V gv = load_n(g + i, c);
    if (s.maximize) gv = zero - gv;
    V pv = load_n(p + i, c) * decay;
    V mv = load_n(m + i, c);
    mv = small_w1 ? mv + w1v * (gv - mv) : gv - (gv - mv) * one_minus_w1;
    V vv = load_n(v + i, c) * b2 + w2 * gv * gv;
    // The update uses the stored (rounded) moments, as torch does with its state tensors.
    mv = vround<S>(mv);
    vv = vround<S>(vv);
    vstore(m + i, mv, c);
    vstore(v + i, vv, c);
    V vhat = vv;
    if (vmax != nullptr) {
      vhat = at::vec::maximum(load_n(vmax + i, c), vv);
      vstore(vmax + i, vhat, c);
    }
    const V denom = vhat.sqrt() / bc2_sqrt + eps;
    pv = pv - step_size * (mv / denom);
    vstore(p + i, pv, c);
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
