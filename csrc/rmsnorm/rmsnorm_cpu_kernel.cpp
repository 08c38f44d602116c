// RMSNorm forward/backward on CPU: one parallel task per block of rows, each row read from
// memory once (its second pass hits L1/L2), fp32 (or fp64) accumulation with at::vec.
#include "rmsnorm/rmsnorm_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "common/cpu_vec.h"

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

// Rows per parallel task: aim for ~32K elements so small rows do not drown in scheduling.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                  double eps_d, const at::Tensor& out, const at::Tensor& residual_out) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const T* rp = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
  const T* wp = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
  T* op = out.mutable_data_ptr<T>();
  T* hp = residual_out.defined() ? residual_out.mutable_data_ptr<T>() : nullptr;
  const int64_t xs = x.stride(0), rs = rp ? residual.stride(0) : 0;
  const acc_t eps = static_cast<acc_t>(eps_d);

  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = xp + row * xs;
      T* yr = op + row * n;
      // Pass 1: sum of squares (of the rounded residual sum in the fused variant).
      RowSum<T> ss;
      const T* src = xr;
      if (rp != nullptr) {
        const T* rr = rp + row * rs;
        T* hr = hp + row * n;
        for (int64_t j = 0; j < n; j += C) {
          const int64_t c = std::min(C, n - j);
          const Chunk<T> a = load_chunk(xr + j, c, c == C), b = load_chunk(rr + j, c, c == C);
          const Chunk<T> h = round_chunk<T>({a.lo + b.lo, a.hi + b.hi});
          store_chunk(hr + j, h, c);
          ss.add(h, h);
        }
        src = hr;
      } else {
        for (int64_t j = 0; j < n; j += C) {
          const int64_t c = std::min(C, n - j);
          const Chunk<T> v = load_chunk(xr + j, c, c == C);
          ss.add(v, v);
        }
      }
      const V rstd(acc_t(1) / std::sqrt(ss.reduce() / static_cast<acc_t>(n) + eps));
      // Pass 2 (the row is in L1/L2 now): normalise and scale.
      for (int64_t j = 0; j < n; j += C) {
        const int64_t c = std::min(C, n - j);
        Chunk<T> y = load_chunk(src + j, c, c == C);
        y = {y.lo * rstd, y.hi * rstd};
        if (wp != nullptr) {
          const Chunk<T> w = load_chunk(wp + j, c, c == C);
          y = {y.lo * w.lo, y.hi * w.hi};
        }
        store_chunk(yr + j, y, c);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& grad_residual, double eps_d, const at::Tensor& grad_input,
                   const at::Tensor& grad_weight) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  constexpr int64_t C = chunk_len<T>();
  const int64_t rows = x.size(0), n = x.size(1);
  const T* gp = grad_out.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* wp = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
  const T* grp = grad_residual.defined() ? grad_residual.const_data_ptr<T>() : nullptr;
  T* dxp = grad_input.mutable_data_ptr<T>();
  const int64_t gs = grad_out.stride(0), xs = x.stride(0);
  const int64_t grs = grp ? grad_residual.stride(0) : 0;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(n, 1));

  // grad_weight = sum over rows of g * x * rstd. Rows are cut into at most kMaxBlocks fixed
  // blocks, each accumulating its own row of partials (no atomics), and the partials are summed
  // in block order: the blocks depend only on the shape, so the result is bitwise the same for
  // any thread count (per-thread partials changed with torch.set_num_threads).
  constexpr int64_t kMaxBlocks = 64;
  const int64_t block_rows = std::max(row_grain(n), (rows + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t nblocks = (rows + block_rows - 1) / block_rows;
  at::Tensor dw_partial;
  acc_t* dwp = nullptr;
  if (wp != nullptr) {
    dw_partial = at::zeros({nblocks, n}, x.options().dtype(c10::CppTypeToScalarType<acc_t>()));
    dwp = dw_partial.mutable_data_ptr<acc_t>();
  }

  at::parallel_for(0, nblocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      acc_t* dw = dwp ? dwp + block * n : nullptr;
      const int64_t begin = block * block_rows, end = std::min(rows, begin + block_rows);
      for (int64_t row = begin; row < end; ++row) {
        const T* gr = gp + row * gs;
        const T* xr = xp + row * xs;
        T* dxr = dxp + row * n;
        // Pass 1: sum x^2 and sum (g * w) * x.
        RowSum<T> ss_acc, dot_acc;
        for (int64_t j = 0; j < n; j += C) {
          const int64_t c = std::min(C, n - j);
          const bool full = c == C;
          const Chunk<T> xv = load_chunk(xr + j, c, full);
          Chunk<T> gv = load_chunk(gr + j, c, full);
          if (wp != nullptr) {
            const Chunk<T> w = load_chunk(wp + j, c, full);
            gv = {gv.lo * w.lo, gv.hi * w.hi};
          }
          ss_acc.add(xv, xv);
          dot_acc.add(gv, xv);
        }
        const acc_t ss = ss_acc.reduce();
        const acc_t dot = dot_acc.reduce();
        const acc_t rstd_s = acc_t(1) / std::sqrt(ss * inv_n + eps);
        // dx = rstd * g * w - x * rstd^3 * mean(g * w * x)
        const V rstd(rstd_s);
        const V coef(dot * rstd_s * rstd_s * rstd_s * inv_n);
        // Pass 2: dx, and this block's grad_weight partials.
        for (int64_t j = 0; j < n; j += C) {
          const int64_t c = std::min(C, n - j);
          const bool full = c == C;
          const Chunk<T> xv = load_chunk(xr + j, c, full);
          const Chunk<T> gv = load_chunk(gr + j, c, full);
          Chunk<T> gw = gv;
          if (wp != nullptr) {
            const Chunk<T> w = load_chunk(wp + j, c, full);
            gw = {gv.lo * w.lo, gv.hi * w.hi};
            // dw[j..] += g * x * rstd, on the opmath partial row (split at the vector width).
            const int64_t c_lo = std::min(L, c), c_hi = c - c_lo;
            at::vec::fmadd(gv.lo, xv.lo * rstd, V::loadu(dw + j, c_lo)).store(dw + j, c_lo);
            if (c_hi > 0) {
              at::vec::fmadd(gv.hi, xv.hi * rstd, V::loadu(dw + j + L, c_hi))
                  .store(dw + j + L, c_hi);
            }
          }
          Chunk<T> dx = {gw.lo * rstd - xv.lo * coef, gw.hi * rstd - xv.hi * coef};
          if (grp != nullptr) {
            const Chunk<T> gres = load_chunk(grp + row * grs + j, c, full);
            dx = {dx.lo + gres.lo, dx.hi + gres.hi};
          }
          store_chunk(dxr + j, dx, c);
        }
      }
    }
  });

  if (wp != nullptr) {
    // Column sums over the blocks in a fixed order (at::sum may split a reduction by threads).
    at::Tensor dw_sum = at::empty({n}, dw_partial.options());
    acc_t* sp = dw_sum.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) sp[j] = dwp[j];
      for (int64_t b = 1; b < nblocks; ++b) {
        const acc_t* pb = dwp + b * n;
        for (int64_t j = begin; j < end; ++j) sp[j] += pb[j];
      }
    });
    grad_weight.copy_(dw_sum);
  }
}

}  // namespace

void rmsnorm_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                     double eps, const at::Tensor& out, const at::Tensor& residual_out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_forward",
      [&] { forward_impl<scalar_t>(x, residual, weight, eps, out, residual_out); });
}

void rmsnorm_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input,
                      const at::Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_backward", [&] {
        backward_impl<scalar_t>(grad_out, x, weight, grad_residual, eps, grad_input, grad_weight);
      });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
