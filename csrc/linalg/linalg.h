// Linear algebra family: validation and the entry points shared by every backend. The entry
// points reduce every op to one canonical form the kernels implement, so each backend writes
// one kernel per op:
//   cholesky(A, L, info)            lower factor of the lower triangle of A
//   solve_triangular(A, B, upper, unit, X)   A X = B with A on the left
//   eigh(A, w, V, info)             eigenpairs from the lower triangle of A
//   svd(A, full, U, S, Vh, info)
//   qr(A, Q, R)                     Householder QR; Q undefined for mode 'r'
//   lu_factor(A, LU, pivots, info)  LU with partial pivoting of an m x n A
//   lu_solve(LU, pivots, B, trans, X)   A X = B (A^T X = B when trans) for square A = P L U
// on contiguous [batch, ...] operands in the compute dtype (float32, or float64 for float64
// inputs): upper triangles are read as the lower triangle of the transpose, right-hand solves as
// the left-hand solve of the transposed system, and broadcast batch dims are expanded.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

#include <limits>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::linalg {

// float16/bfloat16 are upcast on load and the results stay float32: a factor rounded back to 16
// bits would be orthogonal or triangular-exact to ~1e-3 at best (torch.linalg rejects them).
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_matrix(const char* op, const char* arg, const at::Tensor& t) {
  check_float(op, arg, t);
  TORCH_CHECK_VALUE(t.dim() >= 2, "metalcore.", op, ": '", arg,
                    "' must have at least 2 dimensions (a batch of matrices), got shape ",
                    t.sizes());
}

inline void check_square(const char* op, const char* arg, const at::Tensor& t) {
  check_matrix(op, arg, t);
  TORCH_CHECK_VALUE(t.size(-1) == t.size(-2), "metalcore.", op, ": '", arg,
                    "' must be a batch of square matrices, got shape ", t.sizes());
}

inline std::vector<int64_t> batch_sizes(const at::Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end() - 2);
}

// [batch, rows, cols] contiguous in the compute dtype (a copy unless already so).
inline at::Tensor as_batch(const at::Tensor& t) {
  const int64_t r = t.size(-2), c = t.size(-1);
  return t.to(compute_dtype(t.scalar_type())).reshape({-1, r, c}).contiguous();
}

// Returns true for 'U', false for 'L' (torch.linalg.eigh accepts either case).
inline bool parse_uplo(const char* op, std::string_view uplo) {
  TORCH_CHECK_VALUE(
      uplo.size() == 1 && (uplo[0] == 'L' || uplo[0] == 'l' || uplo[0] == 'U' || uplo[0] == 'u'),
      "metalcore.", op, ": 'UPLO' must be 'L' or 'U', got '", uplo, "'");
  return uplo[0] == 'U' || uplo[0] == 'u';
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b: B::Guard, b.check(op, arg, t) for the
// backend's own limits, and the canonical kernels above.

template <typename B>
std::tuple<at::Tensor, at::Tensor> cholesky_ex(const B& b, const at::Tensor& A, bool upper) {
  constexpr const char* op = "cholesky_ex";
  check_square(op, "A", A);
  b.check(op, "A", A);
  const typename B::Guard guard(A.device());
  const auto opts = A.options().dtype(compute_dtype(A.scalar_type()));
  at::Tensor info = at::zeros(batch_sizes(A), A.options().dtype(at::kInt));
  if (A.numel() == 0) return {at::empty(A.sizes(), opts), info};
  // The upper triangle of A is the lower triangle of A^T, and U = L^T.
  const at::Tensor src = as_batch(upper ? A.mT() : A);
  at::Tensor L = at::empty(src.sizes(), opts);
  b.cholesky(src, L, info.view({-1}));
  if (upper) L = L.mT().contiguous();
  return {L.view(A.sizes()), info};
}

template <typename B>
at::Tensor solve_triangular(const B& b, const at::Tensor& A, const at::Tensor& Bm, bool upper,
                            bool left, bool unitriangular) {
  constexpr const char* op = "solve_triangular";
  check_square(op, "A", A);
  check_matrix(op, "B", Bm);
  check_same_device(op, "B", Bm, "A", A);
  check_same_dtype(op, "B", Bm, "A", A);
  const int64_t n = A.size(-1);
  const int64_t shared = left ? Bm.size(-2) : Bm.size(-1);
  TORCH_CHECK_VALUE(shared == n, "metalcore.", op, ": 'B' must have ", n,
                    left ? " rows (A X = B with A of size " : " columns (X A = B with A of size ",
                    n, "), got shape ", Bm.sizes());
  const auto a_batch = A.sizes().slice(0, A.dim() - 2);
  const auto b_batch = Bm.sizes().slice(0, Bm.dim() - 2);
  std::vector<int64_t> out_batch;
  {
    // Broadcast like torch: align from the right, sizes equal or 1.
    const int64_t nd = std::max<int64_t>(a_batch.size(), b_batch.size());
    out_batch.resize(nd);
    for (int64_t i = 0; i < nd; ++i) {
      const int64_t ia = i - (nd - static_cast<int64_t>(a_batch.size()));
      const int64_t ib = i - (nd - static_cast<int64_t>(b_batch.size()));
      const int64_t sa = ia >= 0 ? a_batch[ia] : 1, sb = ib >= 0 ? b_batch[ib] : 1;
      TORCH_CHECK_VALUE(sa == sb || sa == 1 || sb == 1, "metalcore.", op,
                        ": the batch dims of 'A' ", A.sizes(), " and 'B' ", Bm.sizes(),
                        " must broadcast");
      out_batch[i] = sa == 1 ? sb : sa;
    }
  }
  b.check(op, "A", A);
  const typename B::Guard guard(A.device());
  const auto opts = A.options().dtype(compute_dtype(A.scalar_type()));
  std::vector<int64_t> out_shape(out_batch);
  out_shape.push_back(Bm.size(-2));
  out_shape.push_back(Bm.size(-1));
  if (c10::multiply_integers(out_shape) == 0) return at::empty(out_shape, opts);
  // X A = B is A^T X^T = B^T, and A^T swaps the triangle.
  const at::Tensor a_op = left ? A : A.mT();
  const at::Tensor b_op = left ? Bm : Bm.mT();
  std::vector<int64_t> a_shape(out_batch), b_shape(out_batch);
  a_shape.insert(a_shape.end(), {n, n});
  b_shape.insert(b_shape.end(), {n, b_op.size(-1)});
  const at::Tensor a_k = as_batch(a_op.expand(a_shape));
  const at::Tensor b_k = as_batch(b_op.expand(b_shape));
  at::Tensor X = at::empty(b_k.sizes(), opts);
  b.solve_triangular(a_k, b_k, left ? upper : !upper, unitriangular, X);
  if (!left) X = X.mT().contiguous();
  return X.view(out_shape);
}

template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh(const B& b, const at::Tensor& A,
                                                    c10::string_view UPLO) {
  constexpr const char* op = "eigh";
  check_square(op, "A", A);
  const bool upper = parse_uplo(op, UPLO);
  b.check(op, "A", A);
  const typename B::Guard guard(A.device());
  const auto opts = A.options().dtype(compute_dtype(A.scalar_type()));
  std::vector<int64_t> w_shape(A.sizes().begin(), A.sizes().end() - 1);
  at::Tensor info = at::zeros(batch_sizes(A), A.options().dtype(at::kInt));
  if (A.numel() == 0) return {at::empty(w_shape, opts), at::empty(A.sizes(), opts), info};
  const at::Tensor src = as_batch(upper ? A.mT() : A);
  at::Tensor w = at::empty({src.size(0), src.size(1)}, opts);
  at::Tensor V = at::empty(src.sizes(), opts);
  b.eigh(src, w, V, info.view({-1}));
  return {w.view(w_shape), V.view(A.sizes()), info};
}

template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd(const B& b, const at::Tensor& A,
                                                               bool full_matrices) {
  constexpr const char* op = "svd";
  check_matrix(op, "A", A);
  b.check(op, "A", A);
  const typename B::Guard guard(A.device());
  const auto opts = A.options().dtype(compute_dtype(A.scalar_type()));
  const int64_t m = A.size(-2), n = A.size(-1), k = std::min(m, n);
  const auto batch = batch_sizes(A);
  auto with = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s(batch);
    s.insert(s.end(), tail);
    return s;
  };
  const int64_t ucols = full_matrices ? m : k, vrows = full_matrices ? n : k;
  at::Tensor info = at::zeros(batch, A.options().dtype(at::kInt));
  at::Tensor U = at::empty(with({m, ucols}), opts);
  at::Tensor S = at::empty(with({k}), opts);
  at::Tensor Vh = at::empty(with({vrows, n}), opts);
  if (c10::multiply_integers(batch) == 0) return {U, S, Vh, info};
  if (k == 0) {
    // No singular values: the full factors of an empty matrix are identities (torch's choice).
    if (full_matrices) {
      U.copy_(at::eye(m, opts).expand_as(U));
      Vh.copy_(at::eye(n, opts).expand_as(Vh));
    }
    return {U, S, Vh, info};
  }
  b.svd(as_batch(A), full_matrices, U.view({-1, m, ucols}), S.view({-1, k}),
        Vh.view({-1, vrows, n}), info.view({-1}));
  return {U, S, Vh, info};
}

// torch.linalg.qr's modes: Q is m x k and R k x n ('reduced'), Q m x m and R m x n
// ('complete'), or only R, with an empty Q of shape [0] ('r').
enum class QrMode { kReduced, kComplete, kR };

inline QrMode parse_qr_mode(const char* op, std::string_view mode) {
  if (mode == "reduced") return QrMode::kReduced;
  if (mode == "complete") return QrMode::kComplete;
  TORCH_CHECK_VALUE(mode == "r", "metalcore.", op,
                    ": 'mode' must be 'reduced', 'complete' or 'r', got '", mode, "'");
  return QrMode::kR;
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> qr(const B& b, const at::Tensor& A, c10::string_view mode) {
  constexpr const char* op = "qr";
  check_matrix(op, "A", A);
  const QrMode qm = parse_qr_mode(op, mode);
  b.check(op, "A", A);
  const typename B::Guard guard(A.device());
  const auto opts = A.options().dtype(compute_dtype(A.scalar_type()));
  const int64_t m = A.size(-2), n = A.size(-1), k = std::min(m, n);
  const bool complete = qm == QrMode::kComplete;
  const int64_t qcols = complete ? m : k, rrows = complete ? m : k;
  std::vector<int64_t> q_shape = batch_sizes(A), r_shape = batch_sizes(A);
  q_shape.insert(q_shape.end(), {m, qcols});
  r_shape.insert(r_shape.end(), {rrows, n});
  at::Tensor Q = qm == QrMode::kR ? at::empty({0}, opts) : at::empty(q_shape, opts);
  at::Tensor R = at::empty(r_shape, opts);
  if (R.numel() == 0 && Q.numel() == 0) return {Q, R};
  if (k == 0) {
    // No reflections: Q is the identity (m x m, or m x 0), R all zeros (m x 0 or 0 x n, or
    // m x n zeros for a complete factorization of an m x 0 matrix).
    R.zero_();
    if (Q.numel()) Q.copy_(at::eye(m, qcols, opts).expand_as(Q));
    return {Q, R};
  }
  const at::Tensor q_k = qm == QrMode::kR ? at::Tensor() : Q.view({-1, m, qcols});
  b.qr(as_batch(A), q_k, R.view({-1, rrows, n}));
  return {Q, R};
}

// Batch dims of A and B broadcast like torch's: aligned from the right, sizes equal or 1.
inline std::vector<int64_t> broadcast_batch(const char* op, const at::Tensor& A,
                                            const at::Tensor& Bm, const char* a_name = "A") {
  const auto a_batch = A.sizes().slice(0, A.dim() - 2);
  const auto b_batch = Bm.sizes().slice(0, Bm.dim() - 2);
  const int64_t nd = std::max<int64_t>(a_batch.size(), b_batch.size());
  std::vector<int64_t> out(nd);
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t ia = i - (nd - static_cast<int64_t>(a_batch.size()));
    const int64_t ib = i - (nd - static_cast<int64_t>(b_batch.size()));
    const int64_t sa = ia >= 0 ? a_batch[ia] : 1, sb = ib >= 0 ? b_batch[ib] : 1;
    TORCH_CHECK_VALUE(sa == sb || sa == 1 || sb == 1, "metalcore.", op, ": the batch dims of '",
                      a_name, "' ", A.sizes(), " and 'B' ", Bm.sizes(), " must broadcast");
    out[i] = sa == 1 ? sb : sa;
  }
  return out;
}

// LU with partial pivoting of any m x n A: LU packs unit-lower L (strictly below the diagonal)
// and U, pivots (int32, 1-based, k = min(m, n)) say row i was swapped with row pivots[i],
// info = the first (1-based) exactly zero U_ii, as LAPACK's getrf.
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lu_factor_ex(const B& b, const at::Tensor& A) {
  constexpr const char* op = "lu_factor_ex";
  check_matrix(op, "A", A);
  b.check(op, "A", A);
  const typename B::Guard guard(A.device());
  const auto opts = A.options().dtype(compute_dtype(A.scalar_type()));
  const int64_t m = A.size(-2), n = A.size(-1), k = std::min(m, n);
  std::vector<int64_t> piv_shape = batch_sizes(A);
  piv_shape.push_back(k);
  at::Tensor info = at::zeros(batch_sizes(A), A.options().dtype(at::kInt));
  at::Tensor piv = at::empty(piv_shape, A.options().dtype(at::kInt));
  at::Tensor LU = at::empty(A.sizes(), opts);
  if (A.numel() == 0) return {LU, piv, info};
  b.lu_factor(as_batch(A), LU.view({-1, m, n}), piv.view({-1, k}), info.view({-1}));
  return {LU, piv, info};
}

// The canonical solve: X with op(A) X = B (op = A^T when trans) for A = P L U given by lu/piv,
// broadcast to the batch `batch`, B [batch.., n, k] in the compute dtype.
template <typename B>
at::Tensor lu_solve_canonical(const B& b, const at::Tensor& lu, const at::Tensor& piv,
                              const at::Tensor& rhs, const std::vector<int64_t>& batch,
                              bool trans) {
  const int64_t n = lu.size(-1);
  std::vector<int64_t> a_shape(batch), p_shape(batch), b_shape(batch);
  a_shape.insert(a_shape.end(), {n, n});
  p_shape.push_back(n);
  b_shape.insert(b_shape.end(), {n, rhs.size(-1)});
  const at::Tensor lu_k = as_batch(lu.expand(a_shape));
  const at::Tensor piv_k = piv.expand(p_shape).reshape({-1, n}).contiguous();
  const at::Tensor b_k = as_batch(rhs.expand(b_shape));
  at::Tensor X = at::empty(b_k.sizes(), b_k.options());
  b.lu_solve(lu_k, piv_k, b_k, trans, X);
  return X.view(b_shape);
}

template <typename B>
at::Tensor lu_solve(const B& b, const at::Tensor& LU, const at::Tensor& pivots,
                    const at::Tensor& Bm, bool left, bool adjoint) {
  constexpr const char* op = "lu_solve";
  check_square(op, "LU", LU);
  check_matrix(op, "B", Bm);
  check_same_device(op, "B", Bm, "LU", LU);
  check_same_device(op, "pivots", pivots, "LU", LU);
  check_same_dtype(op, "B", Bm, "LU", LU);
  const int64_t n = LU.size(-1);
  TORCH_CHECK_TYPE(pivots.scalar_type() == at::kInt, "metalcore.", op,
                   ": 'pivots' must be int32 (as lu_factor returns them), got ",
                   pivots.scalar_type());
  std::vector<int64_t> want_piv(LU.sizes().begin(), LU.sizes().end() - 1);
  TORCH_CHECK_VALUE(pivots.sizes() == at::IntArrayRef(want_piv), "metalcore.", op,
                    ": 'pivots' must have shape ", at::IntArrayRef(want_piv),
                    " (LU's batch and size), got ", pivots.sizes());
  const int64_t shared = left ? Bm.size(-2) : Bm.size(-1);
  TORCH_CHECK_VALUE(shared == n, "metalcore.", op, ": 'B' must have ", n,
                    left ? " rows (A X = B with A of size " : " columns (X A = B with A of size ",
                    n, "), got shape ", Bm.sizes());
  // Out-of-range pivots would make the kernels swap rows outside the matrix. (One reduction on
  // the device; the values are data, so no fake tensor can check them.)
  if (pivots.numel() > 0) {
    TORCH_CHECK_VALUE(pivots.min().item<int32_t>() >= 1 && pivots.max().item<int32_t>() <= n,
                      "metalcore.", op, ": 'pivots' must hold row numbers in [1, ", n,
                      "] (1-based, as lu_factor returns them)");
  }
  const std::vector<int64_t> batch = broadcast_batch(op, LU, Bm, "LU");
  b.check(op, "LU", LU);
  const typename B::Guard guard(LU.device());
  const auto opts = LU.options().dtype(compute_dtype(LU.scalar_type()));
  std::vector<int64_t> out_shape(batch);
  out_shape.push_back(Bm.size(-2));
  out_shape.push_back(Bm.size(-1));
  if (c10::multiply_integers(out_shape) == 0) return at::empty(out_shape, opts);
  // X A = B is A^T X^T = B^T: the transposed system with B^T.
  const bool trans = left ? adjoint : !adjoint;
  at::Tensor X = lu_solve_canonical(b, LU, pivots, left ? Bm : Bm.mT(), batch, trans);
  if (!left) X = X.mT().contiguous();
  return X.view(out_shape);
}

// A X = B (X A = B when not left) through LU with partial pivoting; info as lu_factor_ex's, and
// the solution of a singular matrix is all NaN (LAPACK's would be a mix of Inf and NaN).
template <typename B>
std::tuple<at::Tensor, at::Tensor> solve_ex(const B& b, const at::Tensor& A, const at::Tensor& Bm,
                                            bool left) {
  constexpr const char* op = "solve_ex";
  check_square(op, "A", A);
  check_matrix(op, "B", Bm);
  check_same_device(op, "B", Bm, "A", A);
  check_same_dtype(op, "B", Bm, "A", A);
  const int64_t n = A.size(-1);
  const int64_t shared = left ? Bm.size(-2) : Bm.size(-1);
  TORCH_CHECK_VALUE(shared == n, "metalcore.", op, ": 'B' must have ", n,
                    left ? " rows (A X = B with A of size " : " columns (X A = B with A of size ",
                    n, "), got shape ", Bm.sizes());
  const std::vector<int64_t> batch = broadcast_batch(op, A, Bm);
  b.check(op, "A", A);
  const typename B::Guard guard(A.device());
  const auto opts = A.options().dtype(compute_dtype(A.scalar_type()));
  std::vector<int64_t> out_shape(batch);
  out_shape.push_back(Bm.size(-2));
  out_shape.push_back(Bm.size(-1));
  // info has A's batch shape, as torch's (one factorization per matrix of A).
  const std::vector<int64_t> a_batch = batch_sizes(A);
  at::Tensor info = at::zeros(a_batch, A.options().dtype(at::kInt));
  if (A.numel() == 0) return {at::empty(out_shape, opts), info};
  const at::Tensor a_k = as_batch(A);
  at::Tensor LU = at::empty(a_k.sizes(), opts);
  at::Tensor piv = at::empty({a_k.size(0), n}, A.options().dtype(at::kInt));
  b.lu_factor(a_k, LU, piv, info.view({-1}));
  if (c10::multiply_integers(out_shape) == 0) return {at::empty(out_shape, opts), info};
  std::vector<int64_t> lu_shape(a_batch), piv_shape(a_batch);
  lu_shape.insert(lu_shape.end(), {n, n});
  piv_shape.push_back(n);
  at::Tensor X = lu_solve_canonical(b, LU.view(lu_shape), piv.view(piv_shape), left ? Bm : Bm.mT(),
                                    batch, !left);
  if (!left) X = X.mT();
  X = X.masked_fill((info != 0).unsqueeze(-1).unsqueeze(-1),
                    std::numeric_limits<double>::quiet_NaN());
  return {X.contiguous().view(out_shape), info};
}

// Registers the family's ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  m.impl("cholesky_ex", [](const T& A, bool upper) { return cholesky_ex(B{}, A, upper); });
  m.impl("solve_triangular", [](const T& A, const T& Bm, bool upper, bool left, bool unit) {
    return solve_triangular(B{}, A, Bm, upper, left, unit);
  });
  m.impl("eigh", [](const T& A, c10::string_view uplo) { return eigh(B{}, A, uplo); });
  m.impl("svd", [](const T& A, bool full) { return svd(B{}, A, full); });
  m.impl("qr", [](const T& A, c10::string_view mode) { return qr(B{}, A, mode); });
  m.impl("lu_factor_ex", [](const T& A) { return lu_factor_ex(B{}, A); });
  m.impl("lu_solve", [](const T& LU, const T& piv, const T& Bm, bool left, bool adjoint) {
    return lu_solve(B{}, LU, piv, Bm, left, adjoint);
  });
  m.impl("solve_ex", [](const T& A, const T& Bm, bool left) { return solve_ex(B{}, A, Bm, left); });
}

}  // namespace metalcore::linalg
