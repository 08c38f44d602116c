// CPU kernels of the linear algebra family (compiled per CPU capability). Operands are the
// canonical forms of linalg.h: contiguous [batch, rows, cols] in float32 or float64, outputs
// preallocated and contiguous, info int32 [batch].
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"

#define METALCORE_LINALG_CPU_KERNELS                                                             \
  void cholesky_lower(const at::Tensor& A, const at::Tensor& L, const at::Tensor& info);         \
  void solve_triangular_left(const at::Tensor& A, const at::Tensor& B, bool upper, bool unit,    \
                             const at::Tensor& X);                                               \
  void eigh_lower(const at::Tensor& A, const at::Tensor& w, const at::Tensor& V,                 \
                  const at::Tensor& info);                                                       \
  void svd(const at::Tensor& A, bool full_matrices, const at::Tensor& U, const at::Tensor& S,    \
           const at::Tensor& Vh, const at::Tensor& info);                                        \
  void qr(const at::Tensor& A, const at::Tensor& Q, const at::Tensor& R);                        \
  void lu_factor(const at::Tensor& A, const at::Tensor& LU, const at::Tensor& pivots,            \
                 const at::Tensor& info);                                                        \
  void lu_solve(const at::Tensor& LU, const at::Tensor& pivots, const at::Tensor& B, bool trans, \
                const at::Tensor& X);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_LINALG_CPU_KERNELS)
