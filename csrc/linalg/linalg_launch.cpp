// Metal backend of the linear algebra family: Cholesky and the triangular solve, on the entry
// points shared with the CPU (linalg.h), which hand the kernels contiguous float32 batches in
// canonical form (16-bit inputs upcast; float64 is refused: Metal has no double). The other ops
// of the family have no Metal kernels yet, so they are not registered here: an MPS call gets the
// dispatcher's error, and metalcore.linalg.enable_overrides() leaves them to PyTorch.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/linalg.h"
#include "linalg/linalg.h"

namespace metalcore::launch {
namespace {

using namespace linalg_k;

// One threadgroup per matrix (per matrix and column block for the solve): the batch is a grid
// dimension, and n * n indexes a matrix in 32-bit arithmetic in the kernels.
void check_metal(const char* op, const char* arg, const at::Tensor& A) {
  check_metal_dtype(op, arg, A.scalar_type());
  const int64_t n = A.size(-1);
  TORCH_CHECK_VALUE(n <= 46340, "metalcore.", op, ": '", arg,
                    "' may be at most 46340 x 46340 on the Metal backend (32-bit indexing), got ",
                    A.sizes());
}

unsigned as_u32(const char* op, const char* what, int64_t v) {
  TORCH_CHECK_VALUE(v <= std::numeric_limits<uint32_t>::max(), "metalcore.", op, ": at most ",
                    std::numeric_limits<uint32_t>::max(), " ", what, " on the Metal backend, got ",
                    v);
  return static_cast<unsigned>(v);
}

struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& t) {
    check_metal(op, arg, t);
  }

  void cholesky(const at::Tensor& A, const at::Tensor& L, const at::Tensor& info) const {
    const int64_t n = A.size(1);
    Params p{};
    p.n = static_cast<unsigned>(n);
    p.batch = as_u32("cholesky_ex", "matrices", A.size(0));
    const char* variant = n <= kTileMaxN ? "cholesky_tile" : "cholesky_device";
    enc.set_pipeline(kernel_name("linalg", variant, at::kFloat));
    enc.set_tensor(0, A);
    enc.set_tensor(1, L);
    enc.set_tensor(2, info);
    enc.set_value(3, p);
    const uint32_t tg = std::min(kCholeskyThreads, enc.max_threads_per_threadgroup());
    enc.dispatch_threadgroups({p.batch, 1, 1}, {tg, 1, 1});
  }

  void solve_triangular(const at::Tensor& A, const at::Tensor& B, bool upper, bool unit,
                        const at::Tensor& X) const {
    Params p{};
    p.n = static_cast<unsigned>(A.size(1));
    p.k = as_u32("solve_triangular", "right-hand-side columns", B.size(2));
    p.upper = upper ? 1u : 0u;
    p.unit = unit ? 1u : 0u;
    p.batch = as_u32("solve_triangular", "matrices", A.size(0));
    enc.set_pipeline(kernel_name("linalg", "trsm", at::kFloat));
    enc.set_tensor(0, A);
    enc.set_tensor(1, B);
    enc.set_tensor(2, X);
    enc.set_value(3, p);
    // kTrsmColumns simdgroups, fewer where the pipeline allows fewer threads.
    const uint32_t sgs =
        std::max(1u, std::min(kTrsmColumns, enc.max_threads_per_threadgroup() / kSimdWidth));
    enc.dispatch_threadgroups({ceil_div(p.k, sgs), p.batch, 1}, {sgs * kSimdWidth, 1, 1});
  }
};

std::tuple<at::Tensor, at::Tensor> cholesky_ex_metal(Encoder& enc, const at::Tensor& A,
                                                     bool upper) {
  return linalg::cholesky_ex(MetalKernels{enc}, A, upper);
}

at::Tensor solve_triangular_metal(Encoder& enc, const at::Tensor& A, const at::Tensor& B,
                                  bool upper, bool left, bool unitriangular) {
  return linalg::solve_triangular(MetalKernels{enc}, A, B, upper, left, unitriangular);
}

std::vector<std::string> linalg_kernel_names() {
  std::vector<std::string> names;
  for (const char* v : {"cholesky_tile", "cholesky_device", "trsm"})
    names.push_back(kernel_name("linalg", v, at::kFloat));
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("cholesky_ex", on_metal<&cholesky_ex_metal>);
  m.impl("solve_triangular", on_metal<&solve_triangular_metal>);
}

const RegisterKernelNames registered_names(&linalg_kernel_names);

}  // namespace metalcore::launch
