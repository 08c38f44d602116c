// CUDA entry points of rope / rope_backward: the family's validation, then the launcher of
// rope_cuda.cu.
#include "rope/rope_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rope/rope.h"

namespace metalcore {
namespace {

template <bool BWD>
std::tuple<at::Tensor, at::Tensor> rope_impl(const char* op, const char* q_arg, const at::Tensor& q,
                                             const char* k_arg, const at::Tensor& k,
                                             const at::Tensor& cos, const at::Tensor& sin,
                                             bool interleaved) {
  const rope::Dims dm = rope::check_inputs(op, q_arg, q, k_arg, k, cos, sin);
  TORCH_CHECK(q.is_cuda(), "metalcore.", op, ": expected CUDA tensors, got '", q_arg, "' on ",
              q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor qo = at::empty(q.sizes(), q.options());
  at::Tensor ko = at::empty(k.sizes(), k.options());
  if (dm.batch * dm.seq == 0 || dm.head_dim == 0 || dm.q_heads + dm.k_heads == 0) return {qo, ko};
  const at::Tensor q1 = rope::unit_last_stride(q), k1 = rope::unit_last_stride(k);
  const at::Tensor c1 = rope::as_table(cos), s1 = rope::as_table(sin);
  cuda::launch_rope(BWD, q1, k1, c1, s1, interleaved, dm, qo, ko);
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& cos, const at::Tensor& sin,
                                             bool interleaved) {
  return rope_impl<false>("rope", "q", q, "k", k, cos, sin, interleaved);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q_out,
                                                      const at::Tensor& grad_k_out,
                                                      const at::Tensor& cos, const at::Tensor& sin,
                                                      bool interleaved) {
  return rope_impl<true>("rope_backward", "grad_q_out", grad_q_out, "grad_k_out", grad_k_out, cos,
                         sin, interleaved);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_backward", &rope_backward_cuda);
}

}  // namespace metalcore
