// Flash attention on the CPU: blocked, online softmax, memory linear in the sequence lengths
// (never an Lq x Lk buffer).
//
// Work is organised per KV head: the G = Hq / Hkv query heads that read one KV head are packed
// into one row space of G * Lq rows (row r is query i = r % Lq of head h = hk * G + r / Lq), so
// a block of rows shares every K/V block it loads: GQA decode reads K/V once per KV head, not G
// times, and prefill with G = 1 is the usual per-head blocking.
//
// Every block product is a BLAS GEMM (at::native::cpublas, MKL/OpenBLAS) on float32 (float64)
// copies of the blocks: 16-bit inputs are converted once per block, so the scores, P and dS stay
// in float32 for every product (PyTorch's CPU flash kernel rounds P and dS to bf16, which its
// bf16 backward error shows), and the copies are aligned buffers of this call, so results do
// not depend on the inputs' alignment.
//
// Forward: parallel over (batch, KV head, row block); per key block S = scale Q K^T (+ mask),
// online max/sum in float32, O = alpha O + P V; out = O / l, lse = m + log(l).
// Backward (split, no atomics): D = rowsum(dO * O) - grad_lse once; a dQ pass parallel over row
// blocks (P = exp(S - lse), dS = P (dO V^T - D), dQ += scale dS K) and a dK/dV pass parallel over
// key blocks that loops over the row blocks of all G query heads (dV += P^T dO, dK += scale dS^T
// Q), so each thread owns the rows it writes.
//
// Blocks that no row can see (causal or window) are skipped. A skipped pair contributes exactly
// zero to every gradient, except when some input of the backward is not finite (0 * NaN is
// NaN): then the backward computes every block, so NaN and Inf reach exactly the gradients the
// unblocked formula gives them.
#include "attention/attention_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_vec.h"

// BLAS through its Fortran symbols, which the Linux x86 torch wheels export (MKL, LP64):
// torch does not export at::native::cpublas::gemm. Declared weak, so a torch that does not
// export them still loads this library and the portable loop below runs instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

using attention::Params;
using attention::Visibility;

// Packed query rows per block and keys per block: 128 x 256 float32 scores (128 KB) and the
// K/V blocks (128 KB each at head dim 128) stay in L2 while the GEMMs reuse them. Measured on 2
// cores (B1 H8 S2048 D128 causal float32): 1.5x faster forward than 64 x 128 blocks.
constexpr int64_t kRows = 128;
constexpr int64_t kKeys = 256;
// The backward is fused per (batch, KV head) from this many pairs on (enough tasks for the
// threads of common CPUs), split into a dQ and a dK/dV pass below it. A fixed count, not the
// thread count, decides, so results do not depend on the number of threads.
constexpr int64_t kFusedBackwardHeads = 8;

// Tasks per parallel chunk so that a chunk does at least ~1 MFLOP: small problems (decode
// steps of small models, tests) run on the calling thread instead of paying a thread-pool
// round trip per call. The task split never changes a result.
inline int64_t grain(int64_t flops_per_task) {
  constexpr int64_t kMinChunkFlops = int64_t(1) << 20;
  return std::max<int64_t>(1, kMinChunkFlops / std::max<int64_t>(1, flops_per_task));
}

// An aligned scratch buffer owned by one task chunk (c10's 64-byte aligned allocator).
template <typename A>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(static_cast<A*>(
            c10::alloc_cpu(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(A)))) {}
  ~Scratch() { c10::free_cpu(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  A* get() const { return p_; }

 private:
  A* p_;
};

// Column-major C (m x n) = alpha op(A) op(B) + beta C without BLAS (C is not read when beta is
// 0, as in BLAS). The inner loop runs along C's columns, contiguous in memory.
template <typename A>
void portable_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a,
                   int64_t lda, const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    A* cj = c + j * ldc;
    for (int64_t i = 0; i < m; ++i) cj[i] = beta == A(0) ? A(0) : beta * cj[i];
    for (int64_t l = 0; l < k; ++l) {
      const A blj = alpha * (tb ? b[j + l * ldb] : b[l + j * ldb]);
      if (ta) {
        for (int64_t i = 0; i < m; ++i) cj[i] += a[l + i * lda] * blj;
      } else {
        const A* al = a + l * lda;
        for (int64_t i = 0; i < m; ++i) cj[i] += al[i] * blj;
      }
    }
  }
}

template <typename A>
void col_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda,
              const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  const char sa = ta ? 'T' : 'N', sb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ila = static_cast<int>(lda), ilb = static_cast<int>(ldb), ilc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<A, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&sa, &sb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&sa, &sb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
      return;
    }
  }
  portable_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C (M x N) = alpha op(A) op(B) + beta C, op(A) M x K, op(B) K x N. BLAS is
// column-major, where a row-major matrix reads as its transpose: C^T = op(B)^T op(A)^T. Block
// sizes keep every dimension far below 2^31.
template <typename A>
void mm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, A alpha, const A* a,
        int64_t lda, const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == A(0)) {
      for (int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, A(0));
    }
    return;
  }
  col_gemm<A>(trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

template <typename T>
struct View4 {
  const T* p;
  int64_t s0, s1, s2;
  const T* row(int64_t b, int64_t h, int64_t i) const { return p + b * s0 + h * s1 + i * s2; }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The [B, Hq, Lq, Lk] mask view: bool (false: masked) or additive in any float dtype.
template <typename T>
struct Mask {
  const void* p = nullptr;
  bool is_bool = false;
  at::ScalarType dtype = at::kBool;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;

  // Applies the mask to scores s[a, e) of keys j0 + [a, e) of row (b, h, i).
  template <typename A>
  void apply(A* s, int64_t a, int64_t e, int64_t j0, int64_t b, int64_t h, int64_t i) const {
    if (p == nullptr) return;
    const int64_t off = b * s0 + h * s1 + i * s2;
    if (is_bool) {
      const bool* m = static_cast<const bool*>(p) + off;
      for (int64_t j = a; j < e; ++j) {
        if (!m[(j0 + j) * s3]) s[j] = -std::numeric_limits<A>::infinity();
      }
    } else if (dtype == at::kHalf) {
      add(static_cast<const at::Half*>(p) + off, s, a, e, j0);
    } else if (dtype == at::kBFloat16) {
      add(static_cast<const at::BFloat16*>(p) + off, s, a, e, j0);
    } else if (dtype == at::kFloat) {
      add(static_cast<const float*>(p) + off, s, a, e, j0);
    } else {
      add(static_cast<const double*>(p) + off, s, a, e, j0);
    }
  }

  // An additive mask keeps its own dtype (16-bit inputs run the float32 kernels): converting
  // the broadcast [B, Hq, Lq, Lk] view would materialise it.
  template <typename M, typename A>
  void add(const M* m, A* s, int64_t a, int64_t e, int64_t j0) const {
    for (int64_t j = a; j < e; ++j) s[j] += static_cast<A>(m[(j0 + j) * s3]);
  }
};

template <typename T>
Mask<T> mask_view(const at::Tensor& mask) {
  Mask<T> m;
  if (!mask.defined()) return m;
  m.p = mask.const_data_ptr();
  m.is_bool = mask.scalar_type() == at::kBool;
  m.dtype = mask.scalar_type();
  m.s0 = mask.stride(0);
  m.s1 = mask.stride(1);
  m.s2 = mask.stride(2);
  m.s3 = mask.stride(3);
  return m;
}

// One packed row of a block: its query head, query index and visible key range [lo, hi).
struct RowInfo {
  int64_t h, i, lo, hi;
};

// Fills the RowInfo of rows [r0, r0 + n) of KV head hk; returns the union of their visible key
// ranges as [lo, hi) (empty: lo >= hi).
inline std::pair<int64_t, int64_t> row_infos(RowInfo* info, int64_t r0, int64_t n, int64_t hk,
                                             int64_t g_heads, const Visibility& vis) {
  int64_t lo = vis.lk, hi = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t g = (r0 + r) / vis.lq, i = (r0 + r) % vis.lq;
    RowInfo& ri = info[r];
    ri = {hk * g_heads + g, i, vis.lo(i), vis.hi(i)};
    if (ri.lo < ri.hi) {
      lo = std::min(lo, ri.lo);
      hi = std::max(hi, ri.hi);
    }
  }
  return {lo, hi};
}

// Converts n elements of a row to the compute type.
template <typename T, typename A>
inline void load_row(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy_n(src, n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename A, typename T>
inline void store_row(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy_n(src, n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// NaN-propagating max of x[0, n).
template <typename A>
inline A row_max(const A* x, int64_t n) {
  using V = at::vec::Vectorized<A>;
  A m = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  if (n >= V::size()) {
    V acc(m);
    for (; j + V::size() <= n; j += V::size()) acc = at::vec::maximum(acc, V::loadu(x + j));
    m = at::vec::vec_reduce_all<A>([](V& a, V& b) { return at::vec::maximum(a, b); }, acc);
  }
  for (; j < n; ++j) {
    if (std::isnan(x[j]) || std::isnan(m)) {
      m = std::numeric_limits<A>::quiet_NaN();
    } else {
      m = std::max(m, x[j]);
    }
  }
  return m;
}

// x[j] = exp(x[j] - shift) for j in [0, n); returns their sum.
template <typename A>
inline A exp_sum(A* x, int64_t n, A shift) {
  using V = at::vec::Vectorized<A>;
  const V vs(shift);
  V acc(A(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V e = (V::loadu(x + j) - vs).exp();
    e.store(x + j);
    acc = acc + e;
  }
  A sum = at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// x[0, n) *= c.
template <typename A>
inline void scale_row(A* x, int64_t n, A c) {
  using V = at::vec::Vectorized<A>;
  const V vc(c);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * vc).store(x + j);
  for (; j < n; ++j) x[j] *= c;
}

template <typename A>
inline A dot(const A* x, const A* y, int64_t n) {
  using V = at::vec::Vectorized<A>;
  V acc(A(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size())
    acc = at::vec::fmadd(V::loadu(x + j), V::loadu(y + j), acc);
  A sum = at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, acc);
  for (; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

// Packs rows [j0, j0 + n) of head (b, h) of x (row length len) into dst (n x len, row-major).
template <typename T, typename A>
inline void pack_rows(const View4<T>& x, int64_t b, int64_t h, int64_t j0, int64_t n, int64_t len,
                      A* dst) {
  for (int64_t j = 0; j < n; ++j) load_row(x.row(b, h, j0 + j), dst + j * len, len);
}

// --- Forward -----------------------------------------------------------------------------------

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& mask, const Params& p, const at::Tensor& out,
                  const at::Tensor& lse) {
  using A = opmath_t<T>;
  constexpr A kInf = std::numeric_limits<A>::infinity();
  const auto& dm = p.dims;
  const Visibility& vis = p.vis;
  const int64_t g_heads = dm.q_heads / dm.kv_heads;
  const int64_t rows = g_heads * dm.lq, n_row_blocks = (rows + kRows - 1) / kRows;
  const int64_t d = dm.d, dv = dm.dv;
  const A scale = static_cast<A>(p.scale);
  const View4<T> Q = view4<T>(q), K = view4<T>(k), V = view4<T>(v);
  const Mask<T> M = mask_view<T>(mask);
  T* o_ptr = out.data_ptr<T>();
  A* lse_ptr = lse.data_ptr<A>();

  const int64_t task_flops = 2 * std::min(kRows, rows) * dm.lk * (d + dv);
  at::parallel_for(
      0, dm.batch * dm.kv_heads * n_row_blocks, grain(task_flops), [&](int64_t begin, int64_t end) {
        Scratch<A> qf(kRows * d), kf(kKeys * d), vf(kKeys * dv), sc(kRows * kKeys), acc(kRows * dv),
            mx(kRows), sum(kRows);
        std::vector<RowInfo> info(kRows);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t rb = task % n_row_blocks, bh = task / n_row_blocks;
          const int64_t hk = bh % dm.kv_heads, b = bh / dm.kv_heads;
          const int64_t r0 = rb * kRows, nr = std::min(kRows, rows - r0);
          const auto [jlo, jhi] = row_infos(info.data(), r0, nr, hk, g_heads, vis);
          for (int64_t r = 0; r < nr; ++r) {
            load_row(Q.row(b, info[r].h, info[r].i), qf.get() + r * d, d);
          }
          std::fill_n(acc.get(), nr * dv, A(0));
          std::fill_n(mx.get(), nr, -kInf);
          std::fill_n(sum.get(), nr, A(0));
          for (int64_t j0 = jlo; j0 < jhi; j0 += kKeys) {
            const int64_t nk = std::min(kKeys, jhi - j0);
            pack_rows(K, b, hk, j0, nk, d, kf.get());
            pack_rows(V, b, hk, j0, nk, dv, vf.get());
            A* s = sc.get();
            mm<A>(false, true, nr, nk, d, scale, qf.get(), d, kf.get(), d, A(0), s, nk);
            for (int64_t r = 0; r < nr; ++r) {
              A* sr = s + r * nk;
              const RowInfo& ri = info[r];
              const int64_t a = std::clamp(ri.lo - j0, int64_t(0), nk);
              const int64_t e = std::clamp(ri.hi - j0, int64_t(0), nk);
              if (a >= e) {
                std::fill_n(sr, nk, A(0));
                continue;
              }
              M.apply(sr, a, e, j0, b, ri.h, ri.i);
              const A m_blk = row_max(sr + a, e - a);
              const A m_old = mx.get()[r];
              const A m_new =
                  (std::isnan(m_blk) || std::isnan(m_old)) ? m_blk + m_old : std::max(m_old, m_blk);
              if (m_new == -kInf) {  // nothing visible yet: keep the row empty
                std::fill_n(sr, nk, A(0));
                continue;
              }
              // m_old = -inf: nothing accumulated yet (exp(-inf - m) would be 0 too, but
              // exp(-inf - (-inf)) is NaN for an all -inf block that follows).
              const A alpha = m_old == -kInf ? A(0) : std::exp(m_old - m_new);
              std::fill_n(sr, a, A(0));
              std::fill_n(sr + e, nk - e, A(0));
              const A blk_sum = exp_sum(sr + a, e - a, m_new);
              sum.get()[r] = alpha * sum.get()[r] + blk_sum;
              if (alpha != A(1)) scale_row(acc.get() + r * dv, dv, alpha);
              mx.get()[r] = m_new;
            }
            mm<A>(false, false, nr, dv, nk, A(1), s, nk, vf.get(), dv, A(1), acc.get(), dv);
          }
          for (int64_t r = 0; r < nr; ++r) {
            const RowInfo& ri = info[r];
            const int64_t row = (b * dm.q_heads + ri.h) * dm.lq + ri.i;
            A* ar = acc.get() + r * dv;
            const A m = mx.get()[r], l = sum.get()[r];
            if (m == -kInf) {  // no visible key: out 0, lse +inf (the backward's P is then 0)
              std::fill_n(ar, dv, A(0));
              lse_ptr[row] = kInf;
            } else {
              scale_row(ar, dv, A(1) / l);
              lse_ptr[row] = m + std::log(l);
            }
            store_row(ar, o_ptr + row * dv, dv);
          }
        }
      });
}

// True when every element of the [b, h, l, len] view is finite.
template <typename T>
bool all_finite(const View4<T>& x, int64_t nb, int64_t nh, int64_t nl, int64_t len) {
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t h = 0; h < nh; ++h) {
      for (int64_t i = 0; i < nl; ++i) {
        const T* r = x.row(b, h, i);
        bool ok = true;
        for (int64_t c = 0; c < len; ++c) ok &= std::isfinite(static_cast<opmath_t<T>>(r[c]));
        if (!ok) return false;
      }
    }
  }
  return true;
}

// --- Backward ----------------------------------------------------------------------------------

// P = exp(S - lse) for the rows of a block, in place in s (nr x nk, keys j0 + [0, nk)): exactly 0
// where a key is not visible.
template <typename T, typename A>
void probabilities(A* s, int64_t nr, int64_t nk, int64_t j0, const RowInfo* info, const A* lse_r,
                   const Mask<T>& M, int64_t b) {
  for (int64_t r = 0; r < nr; ++r) {
    A* sr = s + r * nk;
    const RowInfo& ri = info[r];
    const int64_t a = std::clamp(ri.lo - j0, int64_t(0), nk);
    const int64_t e = std::clamp(ri.hi - j0, int64_t(0), nk);
    if (a >= e) {
      std::fill_n(sr, nk, A(0));
      continue;
    }
    M.apply(sr, a, e, j0, b, ri.h, ri.i);
    exp_sum(sr + a, e - a, lse_r[r]);
    std::fill_n(sr, a, A(0));
    std::fill_n(sr + e, nk - e, A(0));
  }
}

// dS = P * (dP - D), in place in dp.
template <typename A>
void score_grads(A* dp, const A* pr, int64_t nr, int64_t nk, const A* d_r) {
  using Vec = at::vec::Vectorized<A>;
  for (int64_t r = 0; r < nr; ++r) {
    A* x = dp + r * nk;
    const A* pp = pr + r * nk;
    const Vec dd(d_r[r]);
    int64_t j = 0;
    for (; j + Vec::size() <= nk; j += Vec::size()) {
      (Vec::loadu(pp + j) * (Vec::loadu(x + j) - dd)).store(x + j);
    }
    for (; j < nk; ++j) x[j] = pp[j] * (x[j] - d_r[r]);
  }
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, const at::Tensor& mask, const Params& p,
                   const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv_out) {
  using A = opmath_t<T>;
  const auto& dm = p.dims;
  const Visibility& vis = p.vis;
  const int64_t g_heads = dm.kv_heads > 0 ? dm.q_heads / dm.kv_heads : 0;
  const int64_t rows = g_heads * dm.lq, n_row_blocks = (rows + kRows - 1) / kRows;
  const int64_t n_key_blocks = (dm.lk + kKeys - 1) / kKeys;
  const int64_t d = dm.d, dv = dm.dv;
  const A scale = static_cast<A>(p.scale);
  const View4<T> Q = view4<T>(q), K = view4<T>(k), V = view4<T>(v);
  const View4<T> dO = view4<T>(grad_out), O = view4<T>(out);
  const Mask<T> M = mask_view<T>(mask);
  const A* lse_ptr = lse.const_data_ptr<A>();
  const A* glse_ptr = grad_lse.defined() ? grad_lse.const_data_ptr<A>() : nullptr;

  // D = rowsum(dO * O) - grad_lse, once per query row.
  const int64_t n_rows = dm.batch * dm.q_heads * dm.lq;
  std::vector<A> delta(static_cast<size_t>(std::max<int64_t>(n_rows, 1)));
  at::parallel_for(0, n_rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<A> x(dv), y(dv);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % dm.lq, bh = row / dm.lq;
      const int64_t h = bh % dm.q_heads, b = bh / dm.q_heads;
      load_row(dO.row(b, h, i), x.data(), dv);
      load_row(O.row(b, h, i), y.data(), dv);
      delta[row] = dot(x.data(), y.data(), dv) - (glse_ptr ? glse_ptr[row] : A(0));
    }
  });
  // Not finite somewhere: every block is computed (see the top of the file).
  const auto finite = [](A x) { return std::isfinite(x); };
  bool dense = !std::all_of(delta.begin(), delta.begin() + n_rows, finite) ||
               !all_finite(Q, dm.batch, dm.q_heads, dm.lq, d) ||
               !all_finite(K, dm.batch, dm.kv_heads, dm.lk, d) ||
               !all_finite(V, dm.batch, dm.kv_heads, dm.lk, dv);
  for (int64_t row = 0; !dense && row < n_rows; ++row) {
    dense = std::isnan(lse_ptr[row]) || lse_ptr[row] == -std::numeric_limits<A>::infinity();
  }
  if (!dense && mask.defined() && mask.scalar_type() != at::kBool) {
    // The broadcast dims (stride 0) narrowed to one element: the mask as given, not expanded.
    at::Tensor given = mask;
    for (int64_t i = 0; i < given.dim(); ++i) {
      if (given.stride(i) == 0) given = given.narrow(i, 0, std::min<int64_t>(1, given.size(i)));
    }
    dense = at::isnan(given).any().item<bool>();
  }

  T* dq_ptr = dq.data_ptr<T>();
  T* dk_ptr = dk.data_ptr<T>();
  T* dv_ptr = dv_out.data_ptr<T>();

  // Loads the rows' q, dO, lse and D.
  auto load_rows = [&](const RowInfo* info, int64_t nr, int64_t b, A* qf, A* dof, A* lse_r,
                       A* d_r) {
    for (int64_t r = 0; r < nr; ++r) {
      const RowInfo& ri = info[r];
      const int64_t row = (b * dm.q_heads + ri.h) * dm.lq + ri.i;
      load_row(Q.row(b, ri.h, ri.i), qf + r * d, d);
      load_row(dO.row(b, ri.h, ri.i), dof + r * dv, dv);
      lse_r[r] = lse_ptr[row];
      d_r[r] = delta[row];
    }
  };

  if (dm.batch * dm.kv_heads >= kFusedBackwardHeads) {
    // Fused: one task per (batch, KV head) owns all of that head's dQ, dK and dV rows, so S
    // and dP are computed once per block pair (5 block products instead of 7).
    at::parallel_for(
        0, dm.batch * dm.kv_heads, grain(5 * rows * dm.lk * (d + dv)),
        [&](int64_t begin, int64_t end) {
          Scratch<A> qf(kRows * d), dof(kRows * dv), kf(kKeys * d), vf(kKeys * dv),
              pr(kRows * kKeys), dp(kRows * kKeys), dq_acc(rows * d), dk_acc(kKeys * d),
              dv_acc(kKeys * dv), lse_r(kRows), d_r(kRows);
          std::vector<RowInfo> info(kRows);
          for (int64_t task = begin; task < end; ++task) {
            const int64_t hk = task % dm.kv_heads, b = task / dm.kv_heads;
            std::fill_n(dq_acc.get(), rows * d, A(0));
            for (int64_t kb = 0; kb < n_key_blocks; ++kb) {
              const int64_t j0 = kb * kKeys, nk = std::min(kKeys, dm.lk - j0);
              pack_rows(K, b, hk, j0, nk, d, kf.get());
              pack_rows(V, b, hk, j0, nk, dv, vf.get());
              std::fill_n(dk_acc.get(), nk * d, A(0));
              std::fill_n(dv_acc.get(), nk * dv, A(0));
              for (int64_t rb = 0; rb < n_row_blocks; ++rb) {
                const int64_t r0 = rb * kRows, nr = std::min(kRows, rows - r0);
                const auto [jlo, jhi] = row_infos(info.data(), r0, nr, hk, g_heads, vis);
                if (!dense && (jlo >= jhi || jhi <= j0 || jlo >= j0 + nk)) continue;
                load_rows(info.data(), nr, b, qf.get(), dof.get(), lse_r.get(), d_r.get());
                mm<A>(false, true, nr, nk, d, scale, qf.get(), d, kf.get(), d, A(0), pr.get(), nk);
                probabilities(pr.get(), nr, nk, j0, info.data(), lse_r.get(), M, b);
                mm<A>(true, false, nk, dv, nr, A(1), pr.get(), nk, dof.get(), dv, A(1),
                      dv_acc.get(), dv);
                mm<A>(false, true, nr, nk, dv, A(1), dof.get(), dv, vf.get(), dv, A(0), dp.get(),
                      nk);
                score_grads(dp.get(), pr.get(), nr, nk, d_r.get());
                mm<A>(true, false, nk, d, nr, scale, dp.get(), nk, qf.get(), d, A(1), dk_acc.get(),
                      d);
                mm<A>(false, false, nr, d, nk, scale, dp.get(), nk, kf.get(), d, A(1),
                      dq_acc.get() + r0 * d, d);
              }
              const int64_t base = (b * dm.kv_heads + hk) * dm.lk + j0;
              for (int64_t j = 0; j < nk; ++j) {
                store_row(dk_acc.get() + j * d, dk_ptr + (base + j) * d, d);
                store_row(dv_acc.get() + j * dv, dv_ptr + (base + j) * dv, dv);
              }
            }
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t h = hk * g_heads + r / dm.lq, i = r % dm.lq;
              store_row(dq_acc.get() + r * d, dq_ptr + ((b * dm.q_heads + h) * dm.lq + i) * d, d);
            }
          }
        });
    return;
  }

  // Split, for few (batch, KV head) pairs: a dQ pass parallel over row blocks...
  const int64_t dq_task_flops = 4 * std::min(kRows, rows) * dm.lk * (d + dv);
  at::parallel_for(
      0, dm.batch * dm.kv_heads * n_row_blocks, grain(dq_task_flops),
      [&](int64_t begin, int64_t end) {
        Scratch<A> qf(kRows * d), dof(kRows * dv), kf(kKeys * d), vf(kKeys * dv), pr(kRows * kKeys),
            dp(kRows * kKeys), acc(kRows * d), lse_r(kRows), d_r(kRows);
        std::vector<RowInfo> info(kRows);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t rb = task % n_row_blocks, bh = task / n_row_blocks;
          const int64_t hk = bh % dm.kv_heads, b = bh / dm.kv_heads;
          const int64_t r0 = rb * kRows, nr = std::min(kRows, rows - r0);
          auto [jlo, jhi] = row_infos(info.data(), r0, nr, hk, g_heads, vis);
          if (dense) jlo = 0, jhi = dm.lk;
          load_rows(info.data(), nr, b, qf.get(), dof.get(), lse_r.get(), d_r.get());
          std::fill_n(acc.get(), nr * d, A(0));
          for (int64_t j0 = jlo; j0 < jhi; j0 += kKeys) {
            const int64_t nk = std::min(kKeys, jhi - j0);
            pack_rows(K, b, hk, j0, nk, d, kf.get());
            pack_rows(V, b, hk, j0, nk, dv, vf.get());
            mm<A>(false, true, nr, nk, d, scale, qf.get(), d, kf.get(), d, A(0), pr.get(), nk);
            probabilities(pr.get(), nr, nk, j0, info.data(), lse_r.get(), M, b);
            mm<A>(false, true, nr, nk, dv, A(1), dof.get(), dv, vf.get(), dv, A(0), dp.get(), nk);
            score_grads(dp.get(), pr.get(), nr, nk, d_r.get());
            mm<A>(false, false, nr, d, nk, scale, dp.get(), nk, kf.get(), d, A(1), acc.get(), d);
          }
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t row = (b * dm.q_heads + info[r].h) * dm.lq + info[r].i;
            store_row(acc.get() + r * d, dq_ptr + row * d, d);
          }
        }
      });

  // ... and a dK/dV pass parallel over key blocks; each loops over the row blocks of its G query
  // heads.
  const int64_t dkv_task_flops = 6 * rows * std::min(kKeys, dm.lk) * (d + dv);
  at::parallel_for(
      0, dm.batch * dm.kv_heads * n_key_blocks, grain(dkv_task_flops),
      [&](int64_t begin, int64_t end) {
        Scratch<A> qf(kRows * d), dof(kRows * dv), kf(kKeys * d), vf(kKeys * dv), pr(kRows * kKeys),
            dp(kRows * kKeys), dk_acc(kKeys * d), dv_acc(kKeys * dv), lse_r(kRows), d_r(kRows);
        std::vector<RowInfo> info(kRows);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t kb = task % n_key_blocks, bh = task / n_key_blocks;
          const int64_t hk = bh % dm.kv_heads, b = bh / dm.kv_heads;
          const int64_t j0 = kb * kKeys, nk = std::min(kKeys, dm.lk - j0);
          pack_rows(K, b, hk, j0, nk, d, kf.get());
          pack_rows(V, b, hk, j0, nk, dv, vf.get());
          std::fill_n(dk_acc.get(), nk * d, A(0));
          std::fill_n(dv_acc.get(), nk * dv, A(0));
          for (int64_t rb = 0; rb < n_row_blocks; ++rb) {
            const int64_t r0 = rb * kRows, nr = std::min(kRows, rows - r0);
            const auto [jlo, jhi] = row_infos(info.data(), r0, nr, hk, g_heads, vis);
            if (!dense && (jlo >= jhi || jhi <= j0 || jlo >= j0 + nk)) continue;
            load_rows(info.data(), nr, b, qf.get(), dof.get(), lse_r.get(), d_r.get());
            mm<A>(false, true, nr, nk, d, scale, qf.get(), d, kf.get(), d, A(0), pr.get(), nk);
            probabilities(pr.get(), nr, nk, j0, info.data(), lse_r.get(), M, b);
            mm<A>(true, false, nk, dv, nr, A(1), pr.get(), nk, dof.get(), dv, A(1), dv_acc.get(),
                  dv);
            mm<A>(false, true, nr, nk, dv, A(1), dof.get(), dv, vf.get(), dv, A(0), dp.get(), nk);
            score_grads(dp.get(), pr.get(), nr, nk, d_r.get());
            mm<A>(true, false, nk, d, nr, scale, dp.get(), nk, qf.get(), d, A(1), dk_acc.get(), d);
          }
          const int64_t base = (b * dm.kv_heads + hk) * dm.lk + j0;
          for (int64_t j = 0; j < nk; ++j) {
            store_row(dk_acc.get() + j * d, dk_ptr + (base + j) * d, d);
            store_row(dv_acc.get() + j * dv, dv_ptr + (base + j) * dv, dv);
          }
        }
      });
}

}  // namespace

// 16-bit inputs with several row blocks per KV head run the float32 kernels on float32 copies
// (memory linear in the lengths): every block is converted once instead of once per block pair,
// which made the 16-bit forward ~1.6x slower than float32 on 2 cores. The values are those the
// kernels would convert on load, and the outputs are rounded once from float32 either way, so the
// results are the same. With one row block per KV head (decode) each K/V block is converted once
// anyway: there the copies would only add traffic.
namespace {
bool reduced(const at::Tensor& t, const Params& p) {
  const int64_t rows = p.dims.kv_heads > 0 ? p.dims.q_heads / p.dims.kv_heads * p.dims.lq : 0;
  return (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) && rows > kRows;
}
at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat); }
at::Tensor float_like(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().dtype(at::kFloat));
}
}  // namespace

void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& mask, const Params& p, const at::Tensor& out,
                       const at::Tensor& lse) {
  if (reduced(q, p)) {
    const at::Tensor out32 = float_like(out);
    forward_impl<float>(as_float(q), as_float(k), as_float(v), mask, p, out32, lse);
    out.copy_(out32);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention",
                                  [&] { forward_impl<scalar_t>(q, k, v, mask, p, out, lse); });
}

void attention_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                        const at::Tensor& lse, const at::Tensor& mask, const Params& p,
                        const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  if (reduced(q, p)) {
    const at::Tensor dq32 = float_like(dq), dk32 = float_like(dk), dv32 = float_like(dv);
    backward_impl<float>(as_float(grad_out), grad_lse, as_float(q), as_float(k), as_float(v),
                         as_float(out), lse, mask, p, dq32, dk32, dv32);
    dq.copy_(dq32);
    dk.copy_(dk32);
    dv.copy_(dv32);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward",
      [&] { backward_impl<scalar_t>(grad_out, grad_lse, q, k, v, out, lse, mask, p, dq, dk, dv); });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
