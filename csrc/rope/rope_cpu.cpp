// CPU entry points of the RoPE family: validate, keep q/k strides (unit stride on head_dim
// only), allocate contiguous outputs, run the kernel.
#include <torch/library.h>

#include "rope/rope.h"
#include "rope/rope_cpu_kernel.h"

namespace metalcore {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

Pair run(const char* op, const char* q_arg, const at::Tensor& q, const char* k_arg,
         const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
         bool transpose) {
  rope::check_inputs(op, q_arg, q, k_arg, k, cos, sin);
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  if (q.numel() == 0 && k.numel() == 0) return {q_out, k_out};
  METALCORE_CPU_DISPATCH(rope_apply, rope::unit_last_stride(q), rope::unit_last_stride(k),
                         rope::as_table(cos), rope::as_table(sin), interleaved, transpose, q_out,
                         k_out);
  return {q_out, k_out};
}

Pair rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
              const at::Tensor& sin, bool interleaved) {
  return run("rope", "q", q, "k", k, cos, sin, interleaved, /*transpose=*/false);
}

Pair rope_backward_cpu(const at::Tensor& grad_q_out, const at::Tensor& grad_k_out,
                       const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  return run("rope_backward", "grad_q_out", grad_q_out, "grad_k_out", grad_k_out, cos, sin,
             interleaved, /*transpose=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_backward", &rope_backward_cpu);
}

}  // namespace metalcore
