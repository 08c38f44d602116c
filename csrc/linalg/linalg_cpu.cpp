// CPU backend of the linear algebra family: the shared entry points (linalg.h) over the CPU
// kernels.
#include <torch/library.h>

#include "linalg/linalg.h"
#include "linalg/linalg_cpu_kernel.h"

namespace metalcore {
namespace {

using T = at::Tensor;

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void cholesky(const T& A, const T& L, const T& info) {
    METALCORE_CPU_DISPATCH(cholesky_lower, A, L, info);
  }
  static void solve_triangular(const T& A, const T& B, bool upper, bool unit, const T& X) {
    METALCORE_CPU_DISPATCH(solve_triangular_left, A, B, upper, unit, X);
  }
  static void eigh(const T& A, const T& w, const T& V, const T& info) {
    METALCORE_CPU_DISPATCH(eigh_lower, A, w, V, info);
  }
  static void svd(const T& A, bool full, const T& U, const T& S, const T& Vh, const T& info) {
    METALCORE_CPU_DISPATCH(svd, A, full, U, S, Vh, info);
  }
  static void qr(const T& A, const T& Q, const T& R) { METALCORE_CPU_DISPATCH(qr, A, Q, R); }
  static void lu_factor(const T& A, const T& LU, const T& piv, const T& info) {
    METALCORE_CPU_DISPATCH(lu_factor, A, LU, piv, info);
  }
  static void lu_solve(const T& LU, const T& piv, const T& B, bool trans, const T& X) {
    METALCORE_CPU_DISPATCH(lu_solve, LU, piv, B, trans, X);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { linalg::register_impls<CpuKernels>(m); }

}  // namespace metalcore
