// Linear algebra on CPU. torch's CPU path runs a batch one matrix after another on one core;
// here the batch is split across threads with at::parallel_for, and each task runs either the
// family's own unblocked kernels (small matrices, where LAPACK's per-call overhead dominates) or
// LAPACK through ATen on its slice of the batch (large matrices). Every matrix of a batch is
// computed on its own, so a failed one never changes the others, and results do not depend on
// the thread count.
#include "linalg/linalg_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Sizes (n) up to which the own kernels run. Measured on one core of a shared 2-core x86 machine
// (torch 2.13, MKL 2024.2; 16 matrices, noisy under load): Cholesky own/LAPACK 0.08/0.05 ms at
// n = 32, 0.29/0.26 at 64, 1.43/1.92 at 128; triangular solve with n right-hand sides
// 0.05/0.10, 0.23/0.61, 1.39/4.93. Beyond 128 LAPACK's blocked algorithms are expected to win
// (not measured yet).
constexpr int64_t kOwnCholeskyMaxN = 128;
constexpr int64_t kOwnTrsmMaxN = 128;

// About 64k flops per task: enough to amortize a task, small enough to balance two threads on
// a few dozen small matrices.
int64_t grain(double flops_per_matrix) {
  return std::max<int64_t>(1, static_cast<int64_t>(65536.0 / std::max(flops_per_matrix, 1.0)));
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + i), Vec<T>::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec<T>::loadu(a + i + W), Vec<T>::loadu(b + i + W), acc1);
  }
  for (; i + W <= n; i += W)
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + i), Vec<T>::loadu(b + i), acc0);
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y -= alpha * x
template <typename T>
void axmy(T alpha, const T* x, T* y, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> va(alpha);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    at::vec::fnmadd(va, Vec<T>::loadu(x + i), Vec<T>::loadu(y + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] -= alpha * x[i];
}

template <typename T>
void divide(T* y, T d, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vd(d);
  int64_t i = 0;
  for (; i + W <= n; i += W) (Vec<T>::loadu(y + i) / vd).store(y + i);
  for (; i < n; ++i) y[i] /= d;
}

template <typename T>
bool all_finite(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(p[i])) return false;
  }
  return true;
}

// Householder reflections in LAPACK's larfg convention (QR, tridiagonalization,
// bidiagonalization).
// Turns x (length len >= 1) into beta and the reflector's tail v[1:] in place; returns tau.
template <typename T>
T householder(T* x, int64_t len) {
  if (len <= 1) return T(0);
  T tail_max = 0;
  for (int64_t i = 1; i < len; ++i) tail_max = std::max(tail_max, std::abs(x[i]));
  if (tail_max == T(0)) return T(0);
  // Entries so small that their squares are subnormal (or zero) carry too few bits: tau and v
  // would then not make H orthogonal (it happens to the rounding noise a rank-deficient matrix
  // leaves behind). Scaled up by a power of two (exact; v and tau do not depend on the scale)
  // everything is normal again, and only beta is scaled back (LAPACK's larfg rescales too).
  constexpr T kSmall = T(1) / (T(1ull << 40) * T(1ull << 20));  // 2^-60
  int ex = 0;
  const T maxabs = std::max(tail_max, std::abs(x[0]));
  if (maxabs < kSmall) {
    std::frexp(maxabs, &ex);
    for (int64_t i = 0; i < len; ++i) x[i] = std::ldexp(x[i], -ex);
  }
  const T alpha = x[0];
  const T xnorm = std::sqrt(dot(x + 1, x + 1, len - 1));
  if (xnorm == T(0)) {
    x[0] = std::ldexp(alpha, ex);
    return T(0);  // a tail below eps^2 of alpha: H = I is exact to rounding
  }
  const T beta = -std::copysign(std::hypot(alpha, xnorm), alpha);
  divide(x + 1, alpha - beta, len - 1);
  x[0] = std::ldexp(beta, ex);
  return (beta - alpha) / beta;
}

// y -= tau (v^T y) v for v = [1, tail] and y of length len.
template <typename T>
void reflect(const T* tail, T tau, T* y, int64_t len) {
  const T s = tau * (y[0] + dot(tail, y + 1, len - 1));
  y[0] -= s;
  axmy(s, tail, y + 1, len - 1);
}

// --- Cholesky ----------------------------------------------------------------------------------

// Row-by-row (Cholesky-Banachiewicz) factor of the lower triangle of `a` into `l`: each entry is
// one contiguous dot product of two computed rows, and pivot i is checked as soon as the leading
// minor of order i + 1 is complete, so the reported order is LAPACK's. Returns 0, or the order
// of the first minor whose pivot is not a positive finite number (then `l` is all NaN: a
// partial factor is not a factor of anything).
template <typename T>
int32_t cholesky_one(const T* a, T* l, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T* li = l + i * n;
    for (int64_t j = 0; j <= i; ++j) {
      const T* lj = l + j * n;
      const T s = a[i * n + j] - dot(li, lj, j);
      if (j < i) {
        li[j] = s / lj[j];
      } else {
        if (!(s > T(0) && s < std::numeric_limits<T>::infinity())) {
          std::fill(l, l + n * n, std::numeric_limits<T>::quiet_NaN());
          return static_cast<int32_t>(i + 1);
        }
        li[i] = std::sqrt(s);
      }
    }
    std::fill(li + i + 1, li + n, T(0));
  }
  return 0;
}

template <typename T>
void cholesky_impl(const at::Tensor& A, const at::Tensor& L, const at::Tensor& info) {
  const int64_t batch = A.size(0), n = A.size(1), nn = n * n;
  const T* a = A.const_data_ptr<T>();
  T* l = L.mutable_data_ptr<T>();
  int32_t* inf = info.mutable_data_ptr<int32_t>();
  const double flops = static_cast<double>(n) * n * n / 3.0;
  if (n > kOwnCholeskyMaxN) {
    // LAPACK on the whole batch, outside any parallel region (as QR's): MKL parallelizes
    // internally, and called from at::parallel_for's threads its thread teams can spin.
    const auto [lc, ic] = at::linalg_cholesky_ex(A);
    L.copy_(lc);
    const int32_t* icp = ic.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) {
      inf[b] = icp[b];
      // LAPACK lets Inf through and reports NaN pivots late: the own kernel's answer for
      // every matrix that did not factor into finite numbers, so info means one thing.
      if (inf[b] != 0 || !all_finite(l + b * nn, nn))
        inf[b] = cholesky_one(a + b * nn, l + b * nn, n);
    }
    return;
  }
  at::parallel_for(0, batch, grain(flops), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) inf[b] = cholesky_one(a + b * nn, l + b * nn, n);
  });
}

// --- Triangular solve --------------------------------------------------------------------------

// A X = B for one n x n triangular A and n x k B, by substitution over rows: each step is a
// vectorized update of one row of X by an earlier (lower) or later (upper) one.
template <typename T>
void trsm_one(const T* a, const T* bm, T* x, int64_t n, int64_t k, bool upper, bool unit) {
  std::copy(bm, bm + n * k, x);
  // Two plain loops rather than one with a computed row index: GCC's loop analysis of the
  // latter warned of an out-of-range iteration that cannot happen.
  if (upper) {
    for (int64_t i = n - 1; i >= 0; --i) {
      T* xi = x + i * k;
      const T* ai = a + i * n;
      for (int64_t j = i + 1; j < n; ++j) axmy(ai[j], x + j * k, xi, k);
      if (!unit) divide(xi, ai[i], k);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      T* xi = x + i * k;
      const T* ai = a + i * n;
      for (int64_t j = 0; j < i; ++j) axmy(ai[j], x + j * k, xi, k);
      if (!unit) divide(xi, ai[i], k);
    }
  }
}

template <typename T>
void trsm_impl(const at::Tensor& A, const at::Tensor& B, bool upper, bool unit,
               const at::Tensor& X) {
  const int64_t batch = A.size(0), n = A.size(1), k = B.size(2);
  const T* a = A.const_data_ptr<T>();
  const T* bm = B.const_data_ptr<T>();
  T* x = X.mutable_data_ptr<T>();
  const double flops = static_cast<double>(n) * n * k;
  if (n > kOwnTrsmMaxN) {
    // LAPACK on the whole batch, outside any parallel region (as QR's): MKL parallelizes
    // internally, and called from at::parallel_for's threads its thread teams can spin.
    X.copy_(at::linalg_solve_triangular(A, B, upper, /*left=*/true, unit));
    return;
  }
  at::parallel_for(0, batch, grain(flops), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      trsm_one(a + b * n * n, bm + b * n * k, x + b * n * k, n, k, upper, unit);
    }
  });
}

// --- Jacobi eigh and SVD for small matrices ----------------------------------------------------
// Jacobi (the algorithm of the planned GPU kernels) now runs only below kTridiagMinN (eigh) and
// kGolubKahanMinK (SVD): its results are bitwise independent of how the batch is split and it
// keeps small singular values relatively accurate, but it does 3-5x the flops of the
// reductions below. Measured at one thread on the loaded 2-core x86 machine (4096 x 32 x 32
// float32, best of 3, torch 2.13 + MKL): Jacobi eigh 1450 ms and SVD 1178 ms against torch's
// 589 and 734 ms; tridiagonal QL eigh 335 ms (torch 449 ms in the same run) and Golub-Kahan SVD
// 474 ms (torch 775 ms). Results still do not depend on the thread count (each matrix is
// computed by one thread with the same code).
constexpr int64_t kJacobiMaxN = 64;
constexpr int kMaxSweeps = 40;

// rows x and y of length n: x' = c x - s y, y' = s x + c y (a plane rotation of two rows).
template <typename T>
void rotate_rows(T* x, T* y, T c, T s, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vc(c), vs(s);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec<T> a = Vec<T>::loadu(x + i), b = Vec<T>::loadu(y + i);
    at::vec::fmsub(vc, a, vs * b).store(x + i);
    at::vec::fmadd(vs, a, vc * b).store(y + i);
  }
  for (; i < n; ++i) {
    const T a = x[i], b = y[i];
    x[i] = c * a - s * b;
    y[i] = s * a + c * b;
  }
}

// t = tan of the smaller rotation angle that zeroes the off-diagonal entry of the symmetric
// 2 x 2 [[app, apq], [apq, aqq]]: t = sign(theta) / (|theta| + sqrt(1 + theta^2)) with
// theta = (aqq - app) / (2 apq) (Rutishauser), 1 / (2 theta) where theta^2 would overflow.
template <typename T>
T jacobi_tangent(T app, T aqq, T apq) {
  const T theta = (aqq - app) / (2 * apq);
  const T at = std::abs(theta);
  const T t = at > T(1) / std::sqrt(std::numeric_limits<T>::epsilon())
                  ? T(1) / (2 * at)
                  : T(1) / (at + std::sqrt(T(1) + theta * theta));
  return theta < 0 ? -t : t;
}

// Powers of two that bring the largest magnitude near 1: the squares formed below can then
// neither overflow nor underflow, and the scaling itself is exact.
template <typename T>
T power_of_two_scale(T maxabs) {
  if (maxabs == T(0)) return T(1);
  int e = 0;
  std::frexp(maxabs, &e);
  return std::ldexp(T(1), -e);
}

// Cyclic two-sided Jacobi on the symmetric matrix whose lower triangle is `a` (n x n). `w`
// gets ascending eigenvalues, `v` the eigenvectors as columns. The working matrix is kept whole
// (both triangles) so that a rotation updates two contiguous rows; the columns follow by
// symmetry, and the 2 x 2 pivot block is set analytically (otherwise rounding leaves
// eps * |a_pp| off the diagonal and the stopping test stalls). Returns false without
// convergence in kMaxSweeps sweeps.
template <typename T>
bool eigh_jacobi_one(const T* a, T* w, T* v, int64_t n, std::vector<T>& work) {
  work.resize(2 * n * n + n);
  T* m = work.data();  // the matrix being diagonalized
  T* vt = m + n * n;   // eigenvectors as rows
  int64_t* perm = nullptr;
  T maxabs = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) maxabs = std::max(maxabs, std::abs(a[i * n + j]));
  }
  const T scale = power_of_two_scale(maxabs);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) m[i * n + j] = m[j * n + i] = a[i * n + j] * scale;
  }
  std::fill(vt, vt + n * n, T(0));
  for (int64_t i = 0; i < n; ++i) vt[i * n + i] = T(1);
  const T eps = std::numeric_limits<T>::epsilon();
  const T floor = std::max(eps / 8 * maxabs * scale, std::numeric_limits<T>::min());
  bool converged = n < 2;
  for (int sweep = 0; sweep < kMaxSweeps && !converged; ++sweep) {
    converged = true;
    for (int64_t p = 0; p < n - 1; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        const T apq = m[p * n + q];
        const T app = m[p * n + p], aqq = m[q * n + q];
        // Off-diagonal entries below eps relative to their diagonal pair are converged
        // (eigenvalues then keep relative accuracy where the matrix allows it), and so are
        // those below eps / 8 of the largest entry: rotating against a diagonal entry of
        // rounding-noise size only moves noise around (it would never stop), and leaving
        // them changes the residual by less than the backward error allows.
        if (std::abs(apq) <= eps * std::sqrt(std::abs(app) * std::abs(aqq)) ||
            std::abs(apq) <= floor) {
          continue;
        }
        converged = false;
        const T t = jacobi_tangent(app, aqq, apq);
        const T c = T(1) / std::sqrt(T(1) + t * t), s = t * c;
        rotate_rows(m + p * n, m + q * n, c, s, n);
        for (int64_t r = 0; r < n; ++r) {
          m[r * n + p] = m[p * n + r];
          m[r * n + q] = m[q * n + r];
        }
        m[p * n + p] = app - t * apq;
        m[q * n + q] = aqq + t * apq;
        m[p * n + q] = m[q * n + p] = T(0);
        rotate_rows(vt + p * n, vt + q * n, c, s, n);
      }
    }
  }
  (void)perm;
  // Ascending order (a stable sort of the diagonal, so equal eigenvalues keep their order).
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return m[x * n + x] < m[y * n + y]; });
  for (int64_t j = 0; j < n; ++j) {
    const int64_t src = order[j];
    w[j] = m[src * n + src] / scale;
    for (int64_t r = 0; r < n; ++r) v[r * n + j] = vt[src * n + r];
  }
  return converged;
}

// Fills rows [have, want) of `q` (rows of length len) with unit vectors orthogonal to every
// earlier row: the unit basis vector with the largest component outside their span,
// orthogonalized twice (classical Gram-Schmidt loses orthogonality once; twice is enough).
template <typename T>
void complete_rows(T* q, int64_t have, int64_t want, int64_t len) {
  std::vector<T> cand(len);
  for (int64_t r = have; r < want; ++r) {
    int64_t best = 0;
    T best_norm = -1;
    for (int64_t i = 0; i < len; ++i) {
      // |e_i - proj(e_i)|^2 = 1 - sum_j q_j[i]^2
      T proj = 0;
      for (int64_t j = 0; j < r; ++j) proj += q[j * len + i] * q[j * len + i];
      if (T(1) - proj > best_norm) {
        best_norm = T(1) - proj;
        best = i;
      }
    }
    std::fill(cand.begin(), cand.end(), T(0));
    cand[best] = T(1);
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t j = 0; j < r; ++j)
        axmy(dot(q + j * len, cand.data(), len), q + j * len, cand.data(), len);
    }
    const T norm = std::sqrt(dot(cand.data(), cand.data(), len));
    for (int64_t i = 0; i < len; ++i) q[r * len + i] = cand[i] / norm;
  }
}

// One-sided (Hestenes) Jacobi SVD of the m x n matrix given by its columns `g` (n rows of
// length m, m >= n, overwritten): plane rotations of column pairs until every pair is
// orthogonal to eps * m relative to its norms, accumulated in `vt` (rows = right singular
// vectors). It is two-sided Jacobi on A^T A without forming it, so small singular values keep
// relative accuracy (Demmel-Veselic). Writes S (descending), `ut` (rows = left singular
// vectors, ucount rows: n, or m for the full basis) and `vt` reordered. A zero column (rank
// deficiency) gets a left vector from the orthogonal completion, not 0 / 0.
template <typename T>
bool svd_jacobi_tall(T* g, int64_t m, int64_t n, T* sv, T* ut, int64_t ucount, T* vout) {
  std::vector<T> vt(n * n, T(0));
  for (int64_t i = 0; i < n; ++i) vt[i * n + i] = T(1);
  T maxabs = 0;
  for (int64_t i = 0; i < m * n; ++i) maxabs = std::max(maxabs, std::abs(g[i]));
  const T scale = power_of_two_scale(maxabs);
  for (int64_t i = 0; i < m * n; ++i) g[i] *= scale;
  const T tol = std::numeric_limits<T>::epsilon() * static_cast<T>(m);
  // Columns shorter than tol times the longest are numerically zero: rotating one against
  // another column only reshuffles rounding noise, whose relative non-orthogonality never
  // falls below tol, so such pairs are skipped (and the column's left vector comes from the
  // completion below). The rank cutoff is numpy's matrix_rank default.
  bool converged = n < 2;
  for (int sweep = 0; sweep < kMaxSweeps && !converged; ++sweep) {
    converged = true;
    T longest = 0;
    for (int64_t j = 0; j < n; ++j) longest = std::max(longest, dot(g + j * m, g + j * m, m));
    const T negligible = tol * tol * longest;
    for (int64_t p = 0; p < n - 1; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        T* gp = g + p * m;
        T* gq = g + q * m;
        const T gamma = dot(gp, gq, m);
        if (gamma == T(0)) continue;
        const T alpha = dot(gp, gp, m), beta = dot(gq, gq, m);
        if (std::min(alpha, beta) <= negligible) continue;
        if (std::abs(gamma) <= tol * std::sqrt(alpha) * std::sqrt(beta)) continue;
        converged = false;
        // The rotation that diagonalizes [[alpha, gamma], [gamma, beta]].
        const T t = jacobi_tangent(alpha, beta, gamma);
        const T c = T(1) / std::sqrt(T(1) + t * t), s = t * c;
        rotate_rows(gp, gq, c, s, m);
        rotate_rows(vt.data() + p * n, vt.data() + q * n, c, s, n);
      }
    }
  }
  std::vector<T> norms(n);
  std::vector<int64_t> order(n);
  for (int64_t j = 0; j < n; ++j) {
    norms[j] = std::sqrt(dot(g + j * m, g + j * m, m));
    order[j] = j;
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return norms[x] > norms[y]; });
  const T cutoff = n ? tol * norms[order[0]] : T(0);
  int64_t have = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t src = order[j];
    sv[j] = norms[src] / scale;
    for (int64_t r = 0; r < n; ++r) vout[j * n + r] = vt[src * n + r];
    if (norms[src] > cutoff && have == j) {
      for (int64_t i = 0; i < m; ++i) ut[j * m + i] = g[src * m + i] / norms[src];
      ++have;
    }
  }
  // Zero singular values (sorted last) and the full basis: an orthonormal completion.
  complete_rows(ut, have, ucount, m);
  return converged;
}

// --- eigh by Householder tridiagonalization and implicit QL ------------------------------------
// For n >= kTridiagMinN: reduce the symmetric matrix to tridiagonal form T = Q^T A Q with n - 2
// Householder reflections (each a symmetric rank-2 update of the trailing block, on whole
// contiguous rows), form Q, then diagonalize T by the implicit QL iteration with Wilkinson's
// shift, applying every plane rotation to two contiguous rows of Q^T. About 9n^3 flops in all
// against ~9n^3 per sweep for cyclic Jacobi (6-8 sweeps); backward stable, so eigenvalues are
// within O(n u |A|) and eigenvectors orthonormal to O(n u), as LAPACK's.
constexpr int64_t kTridiagMinN = 12;
constexpr int kMaxQlIterations = 60;  // per eigenvalue; LAPACK's steqr allows 30

template <typename T>
bool eigh_tridiag_one(const T* a, T* w, T* v, int64_t n, std::vector<T>& work) {
  work.resize(3 * n * n + 5 * n);
  T* m = work.data();  // the symmetric matrix, both triangles
  T* qt = m + n * n;   // Q^T: row i = column i of Q, later the eigenvectors as rows
  T* d = qt + n * n;
  T* e = d + n;
  T* tau = e + n;
  T* p = tau + n;
  T maxabs = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) maxabs = std::max(maxabs, std::abs(a[i * n + j]));
  }
  const T scale = power_of_two_scale(maxabs);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) m[i * n + j] = m[j * n + i] = a[i * n + j] * scale;
  }
  // Step k zeroes column k below the subdiagonal: x = m[k+1:, k] (read from row k, which is
  // the same by symmetry) becomes beta e_1 by H = I - tau u u^T, u = [1, tail]. Row k of m
  // keeps u's tail after the subdiagonal entry. The trailing block A22 (rows/cols k+1..)
  // becomes H A22 H = A22 - u w^T - w u^T with p = tau A22 u, w = p - (tau/2)(p^T u) u.
  for (int64_t k = 0; k + 2 < n; ++k) {
    T* x = m + k * n + k + 1;  // row k from column k + 1: length n - k - 1
    const int64_t len = n - k - 1;
    tau[k] = householder(x, len);
    e[k] = x[0];
    d[k] = m[k * n + k];
    if (tau[k] == T(0)) continue;
    const T* tail = x + 1;
    // p = tau A22 u = tau sum_i u_i (row i of A22), A22 being symmetric: whole-row updates,
    // no horizontal sums.
    std::fill(p, p + len, T(0));
    for (int64_t i = 0; i < len; ++i) {
      const T ui = i == 0 ? T(1) : tail[i - 1];
      axmy(-tau[k] * ui, m + (k + 1 + i) * n + k + 1, p, len);
    }
    const T pu = p[0] + dot(p + 1, tail, len - 1);
    const T half = tau[k] * pu / 2;
    p[0] -= half;
    axmy(half, tail, p + 1, len - 1);
    // A22 -= u w^T + w u^T, one row at a time: row i gets -u_i w - w_i u.
    for (int64_t i = 0; i < len; ++i) {
      T* row = m + (k + 1 + i) * n + k + 1;
      const T ui = i == 0 ? T(1) : tail[i - 1];
      axmy(ui, p, row, len);
      row[0] -= p[i];
      axmy(p[i], tail, row + 1, len - 1);
    }
  }
  if (n >= 2) {
    d[n - 2] = m[(n - 2) * n + n - 2];
    e[n - 2] = m[(n - 2) * n + n - 1];
    tau[n - 2] = T(0);
  }
  d[n - 1] = m[(n - 1) * n + n - 1];
  e[n - 1] = T(0);
  // Q = H_0 ... H_{n-3}, accumulated backwards into Q^T's rows: H_k acts on entries k+1.. of
  // each column c > k of Q (earlier columns are still unit vectors there).
  // Q is built row-major in q (H_k Q touches rows k + 1.. and, of them, columns k + 1..:
  // w = u^T Q22 and Q22 -= tau u w^T, both whole-row updates), then transposed into qt.
  T* q = work.data() + 2 * n * n + 4 * n;
  T* wrow = q + n * n;
  std::fill(q, q + n * n, T(0));
  for (int64_t i = 0; i < n; ++i) q[i * n + i] = T(1);
  for (int64_t k = n - 3; k >= 0; --k) {
    if (tau[k] == T(0)) continue;
    const T* tail = m + k * n + k + 2;
    const int64_t len = n - k - 1;
    T* q22 = q + (k + 1) * n + k + 1;
    std::copy(q22, q22 + len, wrow);
    for (int64_t i = 1; i < len; ++i) axmy(-tail[i - 1], q22 + i * n, wrow, len);
    axmy(tau[k], wrow, q22, len);
    for (int64_t i = 1; i < len; ++i) axmy(tau[k] * tail[i - 1], wrow, q22 + i * n, len);
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) qt[j * n + i] = q[i * n + j];
  }
  // Implicit QL on (d, e), e[i] coupling d[i] and d[i + 1]. The rotation of rows i and i + 1
  // of T is applied to rows i and i + 1 of Q^T, so Q^T ends up holding the eigenvectors.
  const T eps = std::numeric_limits<T>::epsilon();
  for (int64_t l = 0; l < n; ++l) {
    int iter = 0;
    while (true) {
      // The first negligible coupling at or after l splits off the block [l, mm].
      int64_t mm = l;
      for (; mm + 1 < n; ++mm) {
        const T dd = std::abs(d[mm]) + std::abs(d[mm + 1]);
        if (std::abs(e[mm]) <= eps * dd) break;
      }
      if (mm == l) break;
      if (++iter > kMaxQlIterations) return false;
      // Wilkinson's shift from the leading 2 x 2 of the block.
      T g = (d[l + 1] - d[l]) / (2 * e[l]);
      T r = std::hypot(g, T(1));
      g = d[mm] - d[l] + e[l] / (g + std::copysign(r, g));
      T s = 1, c = 1, pp = 0;
      int64_t i = mm - 1;
      bool deflated = false;
      for (; i >= l; --i) {
        T f = s * e[i];
        const T b = c * e[i];
        r = std::hypot(f, g);
        e[i + 1] = r;
        if (r == T(0)) {
          // Underflow: the block splits at i + 1.
          d[i + 1] -= pp;
          e[mm] = 0;
          deflated = true;
          break;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - pp;
        r = (d[i] - g) * s + 2 * c * b;
        pp = s * r;
        d[i + 1] = g + pp;
        g = c * r - b;
        // The same rotation of rows i and i + 1 of Q^T: z_i' = c z_i - s z_(i+1),
        // z_(i+1)' = s z_i + c z_(i+1).
        rotate_rows(qt + i * n, qt + (i + 1) * n, c, s, n);
      }
      if (deflated) continue;
      d[l] -= pp;
      e[l] = g;
      e[mm] = 0;
    }
  }
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return d[x] < d[y]; });
  for (int64_t j = 0; j < n; ++j) {
    const int64_t src = order[j];
    w[j] = d[src] / scale;
    for (int64_t r = 0; r < n; ++r) v[r * n + j] = qt[src * n + r];
  }
  return true;
}

// --- SVD by Golub-Kahan bidiagonalization and implicit-shift QR ------------------------------
// For min(m, n) >= kGolubKahanMinK: Householder reflections from the left (on columns) and the
// right (on rows) reduce the tall matrix to upper bidiagonal B = U^T A V, U and V are formed
// from them, and the Golub-Reinsch implicit-shift QR iteration (Golub & Van Loan 8.6) drives
// B's superdiagonal to zero, every plane rotation applied to two contiguous rows of U^T or
// V^T. About 17 n^3 flops for a square matrix against ~7 n^3 per sweep for one-sided Jacobi
// (6-10 sweeps). Backward stable: singular values within O(n u sigma_max) (Jacobi gives small
// ones relative accuracy, which the accuracy contract does not promise), U and V orthonormal,
// and a full U's completion comes from the reflections themselves.
constexpr int64_t kGolubKahanMinK = 8;
constexpr int kMaxSvdIterations = 75;  // per singular value

// Same contract as svd_jacobi_tall: g holds the n columns of the m x n (m >= n) matrix as rows
// of length m and is overwritten; writes sv (descending), ut (ucount rows: left vectors) and
// vout (n rows: right vectors, i.e. the rows of Vh).
template <typename T>
bool svd_gk_tall(T* g, int64_t m, int64_t n, T* sv, T* ut, int64_t ucount, T* vout,
                 std::vector<T>& work) {
  work.resize(n * n + 6 * n + m);
  T* vt = work.data();  // columns of V as rows
  T* d = vt + n * n;    // diagonal of B
  T* e = d + n;         // e[i] = B[i - 1][i], e[0] = 0
  T* taul = e + n;
  T* taur = taul + n;
  T* rowk = taur + n;  // row k of A right of the diagonal, gathered
  T* y = rowk + n;     // length m: A22 u for a right reflection
  T maxabs = 0;
  for (int64_t i = 0; i < m * n; ++i) maxabs = std::max(maxabs, std::abs(g[i]));
  const T scale = power_of_two_scale(maxabs);
  for (int64_t i = 0; i < m * n; ++i) g[i] *= scale;
  e[0] = 0;
  for (int64_t k = 0; k < n; ++k) {
    // Left: column k (row k of g) from row k down becomes d[k] e_1.
    T* x = g + k * m + k;
    taul[k] = householder(x, m - k);
    d[k] = x[0];
    if (taul[k] != T(0)) {
      for (int64_t c = k + 1; c < n; ++c) reflect(x + 1, taul[k], g + c * m + k, m - k);
    }
    taur[k] = 0;
    if (k + 1 >= n) continue;
    // Right: row k from column k + 1 (entries g[c][k], c > k) becomes e[k + 1] e_1.
    const int64_t len = n - k - 1;
    for (int64_t c = 0; c < len; ++c) rowk[c] = g[(k + 1 + c) * m + k];
    taur[k] = householder(rowk, len);
    e[k + 1] = rowk[0];
    for (int64_t c = 0; c < len; ++c) g[(k + 1 + c) * m + k] = rowk[c];
    if (taur[k] == T(0)) continue;
    // Rows k + 1.. of A: A22 -= tau (A22 u) u^T, with A22's columns the rows of g.
    const int64_t rows = m - k - 1;
    std::copy(g + (k + 1) * m + k + 1, g + (k + 1) * m + m, y);
    for (int64_t c = 1; c < len; ++c) axmy(-rowk[c], g + (k + 1 + c) * m + k + 1, y, rows);
    axmy(taur[k], y, g + (k + 1) * m + k + 1, rows);
    for (int64_t c = 1; c < len; ++c) axmy(taur[k] * rowk[c], y, g + (k + 1 + c) * m + k + 1, rows);
  }
  // U = H_0 ... H_{n-1} [I; 0] (ucount columns) and V = G_0 ... G_{n-3}, both accumulated
  // backwards (columns before a reflection's start are still unit vectors there).
  std::fill(ut, ut + ucount * m, T(0));
  for (int64_t c = 0; c < ucount; ++c) ut[c * m + c] = T(1);
  for (int64_t k = n - 1; k >= 0; --k) {
    if (taul[k] == T(0)) continue;
    const T* tail = g + k * m + k + 1;
    for (int64_t c = k; c < ucount; ++c) reflect(tail, taul[k], ut + c * m + k, m - k);
  }
  std::fill(vt, vt + n * n, T(0));
  for (int64_t c = 0; c < n; ++c) vt[c * n + c] = T(1);
  for (int64_t k = n - 2; k >= 0; --k) {
    if (taur[k] == T(0)) continue;
    // The right reflector's tail sits in g[c][k] for c > k + 1.
    const int64_t len = n - k - 1;
    for (int64_t c = 1; c < len; ++c) rowk[c - 1] = g[(k + 1 + c) * m + k];
    for (int64_t c = k + 1; c < n; ++c) reflect(rowk, taur[k], vt + c * n + k + 1, len);
  }
  // Implicit-shift QR on the bidiagonal (d, e), from the bottom singular value up. Entries
  // below eps |B| are set to exactly 0 first (a change within the backward error): rotations
  // built from subnormal numbers are not orthogonal.
  T anorm = 0;
  for (int64_t i = 0; i < n; ++i) anorm = std::max(anorm, std::abs(d[i]) + std::abs(e[i]));
  const T eps = std::numeric_limits<T>::epsilon();
  const T small = eps * anorm;
  for (int64_t i = 0; i < n; ++i) {
    if (std::abs(d[i]) <= small) d[i] = 0;
    if (std::abs(e[i]) <= small) e[i] = 0;
  }
  for (int64_t k = n - 1; k >= 0; --k) {
    for (int it = 0;; ++it) {
      // Split: the largest l <= k with e[l] negligible (e[0] is 0), or with d[l - 1]
      // negligible, in which case e[l] is first rotated away from the left.
      int64_t l = k;
      bool cancel = true;
      for (; l >= 0; --l) {
        if (std::abs(e[l]) <= small) {
          cancel = false;
          break;
        }
        if (std::abs(d[l - 1]) <= small) break;
      }
      if (cancel) {
        // d[l - 1] ~ 0: rotations of rows (l - 1, i) chase e[l] along row l - 1 to zero.
        const int64_t nm = l - 1;
        T c = 0, s = 1;
        for (int64_t i = l; i <= k; ++i) {
          const T f = s * e[i];
          e[i] = c * e[i];
          if (std::abs(f) <= small) break;
          const T gi = d[i];
          const T h = std::hypot(f, gi);
          d[i] = h;
          c = gi / h;
          s = -f / h;
          rotate_rows(ut + i * m, ut + nm * m, c, s, m);
        }
      }
      const T z = d[k];
      if (l == k) {
        if (z < 0) {  // singular values are nonnegative: flip the right vector
          d[k] = -z;
          for (int64_t j = 0; j < n; ++j) vt[k * n + j] = -vt[k * n + j];
        }
        break;
      }
      if (it >= kMaxSvdIterations) return false;
      // Shift from the trailing 2 x 2 of B^T B (Wilkinson's), then one chase from l to k.
      T x = d[l];
      const int64_t nm = k - 1;
      T yy = d[nm];
      T gg = e[nm];
      T h = e[k];
      T f = ((yy - z) * (yy + z) + (gg - h) * (gg + h)) / (2 * h * yy);
      gg = std::hypot(f, T(1));
      f = ((x - z) * (x + z) + h * ((yy / (f + std::copysign(gg, f))) - h)) / x;
      T c = 1, s = 1;
      for (int64_t j = l; j <= nm; ++j) {
        const int64_t i = j + 1;
        gg = e[i];
        yy = d[i];
        h = s * gg;
        gg = c * gg;
        T zz = std::hypot(f, h);
        e[j] = zz;
        c = f / zz;
        s = h / zz;
        f = x * c + gg * s;
        gg = gg * c - x * s;
        h = yy * s;
        yy *= c;
        rotate_rows(vt + i * n, vt + j * n, c, s, n);
        zz = std::hypot(f, h);
        d[j] = zz;
        if (zz != T(0)) {
          c = f / zz;
          s = h / zz;
        }
        f = c * gg + s * yy;
        x = c * yy - s * gg;
        rotate_rows(ut + i * m, ut + j * m, c, s, m);
      }
      e[l] = 0;
      e[k] = f;
      d[k] = x;
    }
  }
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return d[a] > d[b]; });
  // Permute the first n rows of ut (the rest is the completion) through g as scratch.
  std::copy(ut, ut + n * m, g);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t src = order[j];
    sv[j] = d[src] / scale;
    std::copy(g + src * m, g + (src + 1) * m, ut + j * m);
    std::copy(vt + src * n, vt + (src + 1) * n, vout + j * n);
  }
  return true;
}

template <typename T>
void eigh_jacobi_impl(const at::Tensor& A, const at::Tensor& w, const at::Tensor& V,
                      const at::Tensor& info) {
  const int64_t batch = A.size(0), n = A.size(1), nn = n * n;
  const T* a = A.const_data_ptr<T>();
  T* wp = w.mutable_data_ptr<T>();
  T* vp = V.mutable_data_ptr<T>();
  int32_t* inf = info.mutable_data_ptr<int32_t>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  at::parallel_for(0, batch, grain(60.0 * n * n * n), [&](int64_t lo, int64_t hi) {
    std::vector<T> work;
    for (int64_t b = lo; b < hi; ++b) {
      const T* ab = a + b * nn;
      bool finite = true;
      for (int64_t i = 0; i < n && finite; ++i) finite = all_finite(ab + i * n, i + 1);
      const bool ok =
          finite && (n >= kTridiagMinN ? eigh_tridiag_one(ab, wp + b * n, vp + b * nn, n, work)
                                       : eigh_jacobi_one(ab, wp + b * n, vp + b * nn, n, work));
      inf[b] = ok ? 0 : 1;
      if (!ok) {
        std::fill(wp + b * n, wp + (b + 1) * n, nan);
        std::fill(vp + b * nn, vp + (b + 1) * nn, nan);
      }
    }
  });
}

template <typename T>
void svd_jacobi_impl(const at::Tensor& A, bool full, const at::Tensor& U, const at::Tensor& S,
                     const at::Tensor& Vh, const at::Tensor& info) {
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2), k = std::min(m, n);
  const int64_t ucols = U.size(2), vrows = Vh.size(1);
  const T* a = A.const_data_ptr<T>();
  T* up = U.mutable_data_ptr<T>();
  T* sp = S.mutable_data_ptr<T>();
  T* vp = Vh.mutable_data_ptr<T>();
  int32_t* inf = info.mutable_data_ptr<int32_t>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  // Tall form: columns of the m >= n matrix (A, or A^T for wide A) as rows of length `len`.
  const bool wide = m < n;
  const int64_t len = wide ? n : m;
  at::parallel_for(0, batch, grain(80.0 * len * k * k), [&](int64_t lo, int64_t hi) {
    std::vector<T> g(len * k), left(len * len), right(k * k), work;
    for (int64_t b = lo; b < hi; ++b) {
      const T* ab = a + b * m * n;
      T* ub = up + b * m * ucols;
      T* vb = vp + b * vrows * n;
      if (!all_finite(ab, m * n)) {
        inf[b] = 1;
        std::fill(ub, ub + m * ucols, nan);
        std::fill(sp + b * k, sp + (b + 1) * k, nan);
        std::fill(vb, vb + vrows * n, nan);
        continue;
      }
      // Columns of the tall matrix: for A (m x n, m >= n) column j is A[:, j]; for wide A the
      // tall matrix is A^T, whose column j is row j of A.
      for (int64_t j = 0; j < k; ++j) {
        for (int64_t i = 0; i < len; ++i) g[j * len + i] = wide ? ab[j * n + i] : ab[i * n + j];
      }
      // Left vectors of the tall matrix: all `len` of them when its full basis is wanted.
      const int64_t lcount = full ? len : k;
      const bool ok =
          k >= kGolubKahanMinK
              ? svd_gk_tall(g.data(), len, k, sp + b * k, left.data(), lcount, right.data(), work)
              : svd_jacobi_tall(g.data(), len, k, sp + b * k, left.data(), lcount, right.data());
      inf[b] = ok ? 0 : 1;
      if (!wide) {
        // A = U S V^T: U's columns are `left`'s rows, Vh's rows are `right`'s rows.
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < ucols; ++j) ub[i * ucols + j] = left[j * len + i];
        }
        std::copy(right.data(), right.data() + k * k, vb);
      } else {
        // A^T = U' S V'^T, so A = V' S U'^T: U = V' (m x m, columns = `right`'s rows) and
        // Vh = U'^T (rows = `left`'s rows).
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < k; ++j) ub[i * ucols + j] = right[j * k + i];
        }
        std::copy(left.data(), left.data() + vrows * n, vb);
      }
      if (!ok) {
        std::fill(ub, ub + m * ucols, nan);
        std::fill(sp + b * k, sp + (b + 1) * k, nan);
        std::fill(vb, vb + vrows * n, nan);
      }
    }
  });
}

// --- eigh and SVD through LAPACK per slice -----------------------------------------------------

// Runs `solve(first, count)` (LAPACK through ATen on matrices [first, first + count)); a
// LinAlgError there (no convergence) is retried matrix by matrix so that only the failing
// matrices get `fail(b)`.
template <typename Solve, typename Fail>
void per_slice(int64_t lo, int64_t hi, const Solve& solve, const Fail& fail) {
  try {
    solve(lo, hi - lo);
    return;
  } catch (const c10::Error&) {
  }
  for (int64_t b = lo; b < hi; ++b) {
    try {
      solve(b, 1);
    } catch (const c10::Error&) {
      fail(b);
    }
  }
}

template <typename T>
void eigh_impl(const at::Tensor& A, const at::Tensor& w, const at::Tensor& V,
               const at::Tensor& info) {
  const int64_t batch = A.size(0), n = A.size(1), nn = n * n;
  const T* a = A.const_data_ptr<T>();
  int32_t* inf = info.mutable_data_ptr<int32_t>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  auto fail = [&](int64_t b) {
    inf[b] = 1;
    w[b].fill_(nan);
    V[b].fill_(nan);
  };
  // LAPACK on the whole batch, outside any parallel region (as QR's): MKL parallelizes
  // internally, and called from at::parallel_for's threads its thread teams can spin.
  {
    const int64_t lo = 0, hi = batch;
    // Only the lower triangle is read, so only it decides finiteness; LAPACK would raise (or
    // loop) on a non-finite entry, so such matrices are replaced by zeros and marked failed.
    std::vector<int64_t> bad;
    for (int64_t b = lo; b < hi; ++b) {
      const T* ab = a + b * nn;
      for (int64_t i = 0; i < n && (bad.empty() || bad.back() != b); ++i) {
        if (!all_finite(ab + i * n, i + 1)) bad.push_back(b);
      }
    }
    at::Tensor src = A.narrow(0, lo, hi - lo);
    if (!bad.empty()) {
      src = src.clone();
      for (int64_t b : bad) src[b - lo].zero_();
    }
    per_slice(
        lo, hi,
        [&](int64_t first, int64_t count) {
          const auto [wc, vc] = at::linalg_eigh(src.narrow(0, first - lo, count), "L");
          w.narrow(0, first, count).copy_(wc);
          V.narrow(0, first, count).copy_(vc);
          for (int64_t b = first; b < first + count; ++b) inf[b] = 0;
        },
        fail);
    for (int64_t b : bad) fail(b);
  }
}

template <typename T>
void svd_impl(const at::Tensor& A, bool full, const at::Tensor& U, const at::Tensor& S,
              const at::Tensor& Vh, const at::Tensor& info) {
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2), mn = m * n;
  const T* a = A.const_data_ptr<T>();
  int32_t* inf = info.mutable_data_ptr<int32_t>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  auto fail = [&](int64_t b) {
    inf[b] = 1;
    U[b].fill_(nan);
    S[b].fill_(nan);
    Vh[b].fill_(nan);
  };
  // LAPACK on the whole batch, outside any parallel region (as QR's): MKL parallelizes
  // internally, and called from at::parallel_for's threads its thread teams can spin.
  {
    const int64_t lo = 0, hi = batch;
    std::vector<int64_t> bad;
    for (int64_t b = lo; b < hi; ++b) {
      if (!all_finite(a + b * mn, mn)) bad.push_back(b);
    }
    at::Tensor src = A.narrow(0, lo, hi - lo);
    if (!bad.empty()) {
      src = src.clone();
      for (int64_t b : bad) src[b - lo].zero_();
    }
    per_slice(
        lo, hi,
        [&](int64_t first, int64_t count) {
          const auto [uc, sc, vc] = at::linalg_svd(src.narrow(0, first - lo, count), full);
          U.narrow(0, first, count).copy_(uc);
          S.narrow(0, first, count).copy_(sc);
          Vh.narrow(0, first, count).copy_(vc);
          for (int64_t b = first; b < first + count; ++b) inf[b] = 0;
        },
        fail);
    for (int64_t b : bad) fail(b);
  }
}

// --- Householder QR ----------------------------------------------------------------------------
// Unblocked Householder QR on the columns of A stored as contiguous rows (A^T), so every
// reflection of a trailing column is one vectorized dot product and one update of contiguous
// memory. Reflectors follow LAPACK's larfg (H = I - tau v v^T, v[0] = 1, beta = -sign(alpha)
// |x|, tau = 0 when x is already a multiple of e_1), so R's diagonal signs match torch's.
// Up to kOwnQrMaxK columns and kOwnQrMaxM rows the own kernel runs, beyond them LAPACK's
// blocked geqrf/orgqr per slice. Measured at one thread on the shared 2-core x86 machine under
// load (torch 2.13, MKL; reduced mode, float32, best of 5): 4096 x 32 x 32 own 123 ms, LAPACK
// 126 ms; 256 x 128 x 128: 182 vs 175 ms; 64 x 256 x 128: 88 vs 71 ms; 32 x 512 x 128: 105 vs
// 64 ms.
constexpr int64_t kOwnQrMaxK = 64;
constexpr int64_t kOwnQrMaxM = 128;

// One m x n matrix `a` (row-major) into R (rrows x n) and, when q is not null, Q (m x qcols).
// The matrix is first scaled by a power of two that brings its largest entry near 1 (exact), so
// the column norms can neither overflow nor underflow. Everything stays row-major: a
// reflection of the trailing columns is w = v^T A22 and A22 -= tau v w^T, two passes of
// whole-row updates without horizontal sums; only the column being reduced is gathered.
template <typename T>
void qr_one(const T* a, int64_t m, int64_t n, T* q, int64_t qcols, T* r, int64_t rrows,
            std::vector<T>& work) {
  const int64_t k = std::min(m, n);
  work.resize(m * n + k + 2 * m + n);
  T* w = work.data();  // the matrix being reduced, row-major; column j keeps v_j's tail
  T* tau = w + m * n;
  T* col = tau + k;   // the column being reduced (length m)
  T* wrow = col + m;  // v^T A22 (length n), later v^T Q22 (length <= m)
  T maxabs = 0;
  for (int64_t i = 0; i < m * n; ++i) maxabs = std::max(maxabs, std::abs(a[i]));
  const T scale = power_of_two_scale(maxabs);
  for (int64_t i = 0; i < m * n; ++i) w[i] = a[i] * scale;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t len = m - j, rest = n - j - 1;
    for (int64_t i = 0; i < len; ++i) col[i] = w[(j + i) * n + j];
    tau[j] = householder(col, len);
    for (int64_t i = 0; i < len; ++i) w[(j + i) * n + j] = col[i];
    if (tau[j] == T(0) || rest == 0) continue;
    T* a22 = w + j * n + j + 1;
    std::copy(a22, a22 + rest, wrow);
    for (int64_t i = 1; i < len; ++i) axmy(-col[i], a22 + i * n, wrow, rest);
    axmy(tau[j], wrow, a22, rest);
    for (int64_t i = 1; i < len; ++i) axmy(tau[j] * col[i], wrow, a22 + i * n, rest);
  }
  for (int64_t i = 0; i < rrows; ++i) {
    for (int64_t j = 0; j < n; ++j) r[i * n + j] = i <= j ? w[i * n + j] / scale : T(0);
  }
  if (q == nullptr) return;
  // Q = H_0 ... H_{k-1} [I; 0], accumulated backwards (LAPACK's orgqr order) in place in q:
  // H_j touches rows j.. and, of those, columns j.. (earlier columns are still e_c there).
  std::fill(q, q + m * qcols, T(0));
  for (int64_t c = 0; c < qcols; ++c) q[c * qcols + c] = T(1);
  for (int64_t j = k - 1; j >= 0; --j) {
    if (tau[j] == T(0)) continue;
    const int64_t len = m - j, cols = qcols - j;
    for (int64_t i = 1; i < len; ++i) col[i] = w[(j + i) * n + j];
    T* q22 = q + j * qcols + j;
    std::copy(q22, q22 + cols, wrow);
    for (int64_t i = 1; i < len; ++i) axmy(-col[i], q22 + i * qcols, wrow, cols);
    axmy(tau[j], wrow, q22, cols);
    for (int64_t i = 1; i < len; ++i) axmy(tau[j] * col[i], wrow, q22 + i * qcols, cols);
  }
}

template <typename T>
void qr_impl(const at::Tensor& A, const at::Tensor& Q, const at::Tensor& R) {
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2), k = std::min(m, n);
  const bool want_q = Q.defined();
  const int64_t qcols = want_q ? Q.size(2) : 0, rrows = R.size(1);
  const T* a = A.const_data_ptr<T>();
  T* qp = want_q ? Q.mutable_data_ptr<T>() : nullptr;
  T* rp = R.mutable_data_ptr<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  // A non-finite entry poisons the whole factorization (LAPACK would leave a mix of NaN and
  // numbers that depends on where it sits); R's strict lower triangle stays structurally 0.
  auto poison = [&](int64_t b) {
    if (want_q) std::fill(qp + b * m * qcols, qp + (b + 1) * m * qcols, nan);
    for (int64_t i = 0; i < rrows; ++i) {
      T* row = rp + b * rrows * n + i * n;
      for (int64_t j = 0; j < n; ++j) row[j] = i <= j ? nan : T(0);
    }
  };
  if (k > kOwnQrMaxK || m > kOwnQrMaxM) {
    // LAPACK on the whole batch, outside any parallel region: MKL's geqrf parallelizes
    // internally, and called from at::parallel_for's threads its thread teams spun for minutes
    // on the shared 2-core machine.
    std::vector<int64_t> bad;
    for (int64_t b = 0; b < batch; ++b) {
      if (!all_finite(a + b * m * n, m * n)) bad.push_back(b);
    }
    at::Tensor src = A;
    if (!bad.empty()) {
      src = A.clone();
      for (int64_t b : bad) src[b].zero_();
    }
    const char* mode = !want_q ? "r" : (qcols == m && rrows == m ? "complete" : "reduced");
    const auto [qc, rc] = at::linalg_qr(src, mode);
    R.copy_(rc);
    if (want_q) Q.copy_(qc);
    for (int64_t b : bad) poison(b);
    return;
  }
  at::parallel_for(0, batch, grain(4.0 * m * n * k), [&](int64_t lo, int64_t hi) {
    std::vector<T> work;
    for (int64_t b = lo; b < hi; ++b) {
      if (!all_finite(a + b * m * n, m * n)) {
        poison(b);
        continue;
      }
      qr_one(a + b * m * n, m, n, want_q ? qp + b * m * qcols : nullptr, qcols, rp + b * rrows * n,
             rrows, work);
    }
  });
}

// --- LU with partial pivoting and its solves ---------------------------------------------------
// Right-looking unblocked LU (LAPACK's getf2) on the row-major matrix: the pivot search reads a
// column, the swap and the rank-1 update of every remaining row are contiguous vectorized row
// operations. A zero pivot column is skipped (info records it, the factorization goes on), so
// P L U = A holds for singular matrices too. The pivot is the first entry of largest magnitude
// (LAPACK's idamax).
template <typename T>
int32_t lu_one(T* a, int64_t m, int64_t n, int32_t* piv) {
  const int64_t k = std::min(m, n);
  int32_t info = 0;
  for (int64_t j = 0; j < k; ++j) {
    int64_t p = j;
    T best = std::abs(a[j * n + j]);
    for (int64_t i = j + 1; i < m; ++i) {
      const T v = std::abs(a[i * n + j]);
      if (v > best) {
        best = v;
        p = i;
      }
    }
    piv[j] = static_cast<int32_t>(p + 1);
    if (best == T(0)) {
      if (info == 0) info = static_cast<int32_t>(j + 1);
      continue;
    }
    if (p != j) std::swap_ranges(a + j * n, a + (j + 1) * n, a + p * n);
    const T* pivot_row = a + j * n + j + 1;
    const T d = a[j * n + j];
    for (int64_t i = j + 1; i < m; ++i) {
      T* row = a + i * n;
      const T l = row[j] / d;
      row[j] = l;
      axmy(l, pivot_row, row + j + 1, n - j - 1);
    }
  }
  return info;
}

template <typename T>
void lu_factor_impl(const at::Tensor& A, const at::Tensor& LU, const at::Tensor& piv,
                    const at::Tensor& info) {
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2), k = std::min(m, n);
  const T* a = A.const_data_ptr<T>();
  T* lu = LU.mutable_data_ptr<T>();
  int32_t* pv = piv.mutable_data_ptr<int32_t>();
  int32_t* inf = info.mutable_data_ptr<int32_t>();
  const double flops = 2.0 * m * n * k;
  at::parallel_for(0, batch, grain(flops), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const T* ab = a + b * m * n;
      T* lub = lu + b * m * n;
      int32_t* pb = pv + b * k;
      if (!all_finite(ab, m * n)) {
        // NaN compares false, so LAPACK's pivot choice around it is arbitrary: one defined
        // answer instead (no swaps, all NaN; info stays 0: no pivot is exactly zero).
        std::fill(lub, lub + m * n, std::numeric_limits<T>::quiet_NaN());
        for (int64_t j = 0; j < k; ++j) pb[j] = static_cast<int32_t>(j + 1);
        inf[b] = 0;
        continue;
      }
      std::copy(ab, ab + m * n, lub);
      inf[b] = lu_one(lub, m, n, pb);
    }
  });
}

// op(A) X = B for A = P L U (n x n, packed in lu) and n x k B, by rows of X: every step is a
// vectorized update of one row of X by another. Not trans: swap B's rows as the pivots say,
// then L y = P^T b forward (unit diagonal) and U x = y backward. Trans (A^T = U^T L^T P^T):
// U^T y = b forward, L^T z = y backward (unit), then the swaps in reverse order.
template <typename T>
void lu_solve_one(const T* lu, const int32_t* piv, const T* bm, T* x, int64_t n, int64_t k,
                  bool trans) {
  std::copy(bm, bm + n * k, x);
  if (!trans) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = piv[j] - 1;
      if (p != j) std::swap_ranges(x + j * k, x + (j + 1) * k, x + p * k);
    }
    for (int64_t i = 1; i < n; ++i) {
      for (int64_t j = 0; j < i; ++j) axmy(lu[i * n + j], x + j * k, x + i * k, k);
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      for (int64_t j = i + 1; j < n; ++j) axmy(lu[i * n + j], x + j * k, x + i * k, k);
      divide(x + i * k, lu[i * n + i], k);
    }
    return;
  }
  // U^T y = b: row i of U^T is column i of U, entries U[j][i] for j <= i.
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) axmy(lu[j * n + i], x + j * k, x + i * k, k);
    divide(x + i * k, lu[i * n + i], k);
  }
  // L^T z = y: row i of L^T holds L[j][i] for j > i.
  for (int64_t i = n - 2; i >= 0; --i) {
    for (int64_t j = i + 1; j < n; ++j) axmy(lu[j * n + i], x + j * k, x + i * k, k);
  }
  for (int64_t j = n - 1; j >= 0; --j) {
    const int64_t p = piv[j] - 1;
    if (p != j) std::swap_ranges(x + j * k, x + (j + 1) * k, x + p * k);
  }
}

template <typename T>
void lu_solve_impl(const at::Tensor& LU, const at::Tensor& piv, const at::Tensor& B, bool trans,
                   const at::Tensor& X) {
  const int64_t batch = LU.size(0), n = LU.size(1), k = B.size(2);
  const T* lu = LU.const_data_ptr<T>();
  const int32_t* pv = piv.const_data_ptr<int32_t>();
  const T* bm = B.const_data_ptr<T>();
  T* x = X.mutable_data_ptr<T>();
  const double flops = 2.0 * n * n * k;
  at::parallel_for(0, batch, grain(flops), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      lu_solve_one(lu + b * n * n, pv + b * n, bm + b * n * k, x + b * n * k, n, k, trans);
    }
  });
}

#define METALCORE_DISPATCH_LINALG(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES(dtype, name, __VA_ARGS__)

}  // namespace

void cholesky_lower(const at::Tensor& A, const at::Tensor& L, const at::Tensor& info) {
  METALCORE_DISPATCH_LINALG(A.scalar_type(), "cholesky_lower",
                            [&] { cholesky_impl<scalar_t>(A, L, info); });
}

void solve_triangular_left(const at::Tensor& A, const at::Tensor& B, bool upper, bool unit,
                           const at::Tensor& X) {
  METALCORE_DISPATCH_LINALG(A.scalar_type(), "solve_triangular_left",
                            [&] { trsm_impl<scalar_t>(A, B, upper, unit, X); });
}

void eigh_lower(const at::Tensor& A, const at::Tensor& w, const at::Tensor& V,
                const at::Tensor& info) {
  METALCORE_DISPATCH_LINALG(A.scalar_type(), "eigh_lower", [&] {
    if (A.size(1) <= kJacobiMaxN) {
      eigh_jacobi_impl<scalar_t>(A, w, V, info);
    } else {
      eigh_impl<scalar_t>(A, w, V, info);
    }
  });
}

void svd(const at::Tensor& A, bool full_matrices, const at::Tensor& U, const at::Tensor& S,
         const at::Tensor& Vh, const at::Tensor& info) {
  METALCORE_DISPATCH_LINALG(A.scalar_type(), "svd", [&] {
    if (std::min(A.size(1), A.size(2)) <= kJacobiMaxN &&
        std::max(A.size(1), A.size(2)) <= 4 * kJacobiMaxN) {
      svd_jacobi_impl<scalar_t>(A, full_matrices, U, S, Vh, info);
    } else {
      svd_impl<scalar_t>(A, full_matrices, U, S, Vh, info);
    }
  });
}

void qr(const at::Tensor& A, const at::Tensor& Q, const at::Tensor& R) {
  METALCORE_DISPATCH_LINALG(A.scalar_type(), "qr", [&] { qr_impl<scalar_t>(A, Q, R); });
}

void lu_factor(const at::Tensor& A, const at::Tensor& LU, const at::Tensor& pivots,
               const at::Tensor& info) {
  METALCORE_DISPATCH_LINALG(A.scalar_type(), "lu_factor",
                            [&] { lu_factor_impl<scalar_t>(A, LU, pivots, info); });
}

void lu_solve(const at::Tensor& LU, const at::Tensor& pivots, const at::Tensor& B, bool trans,
              const at::Tensor& X) {
  METALCORE_DISPATCH_LINALG(LU.scalar_type(), "lu_solve",
                            [&] { lu_solve_impl<scalar_t>(LU, pivots, B, trans, X); });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
