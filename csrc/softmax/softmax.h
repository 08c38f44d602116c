// Softmax family (softmax, log_softmax and their backward ops): validation, layout and the entry
// points shared by the CPU and CUDA backends (the Metal launch layer, softmax_launch.cpp, adds
// Metal's own limits).
//
// Every op works on any dim. The tensor is viewed as [outer, n, inner] (n: the softmax dim,
// inner: the product of the dims after it), contiguous, so the kernels see either unit-stride
// rows (inner == 1, the common last-dim case) or columns strided by inner, which they read
// vectorized across inner instead of transposing.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::softmax {

// [outer, n, inner] of a tensor for softmax over `dim` (already wrapped).
struct Shape {
  int64_t outer = 1, n = 1, inner = 1;
};

// Wraps `dim` into [0, max(dim(), 1)) as torch does (a 0-dim tensor has one dim, of size 1).
inline int64_t wrap_dim(const char* op, const at::Tensor& t, int64_t dim, const char* arg) {
  const int64_t nd = std::max<int64_t>(t.dim(), 1);
  TORCH_CHECK_VALUE(dim >= -nd && dim < nd, "metalcore.", op, ": 'dim' must be in [", -nd, ", ",
                    nd - 1, "] for the ", t.dim(), "-D '", arg, "', got ", dim);
  return dim < 0 ? dim + nd : dim;
}

inline Shape shape_of(const at::Tensor& t, int64_t dim) {
  Shape s;
  if (t.dim() == 0) return s;
  for (int64_t i = 0; i < dim; ++i) s.outer *= t.size(i);
  s.n = t.size(dim);
  for (int64_t i = dim + 1; i < t.dim(); ++i) s.inner *= t.size(i);
  return s;
}

inline at::Tensor as_3d(const at::Tensor& t, const Shape& s) {
  return t.contiguous().view({s.outer, s.n, s.inner});
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b (softmax_cpu.cpp, softmax_cuda.cpp and the Metal
// launch layer softmax_launch.cpp): B::Guard, b.check(op, arg, x), and
//   b.forward(x, log, out)                 out = softmax(x) or log_softmax(x) over dim 1
//   b.backward(grad_out, out, log, grad_in)
// on contiguous [outer, n, inner] tensors of one dtype (no empty tensor reaches a kernel).

template <typename B>
at::Tensor forward(const B& b, const char* op, bool log, const at::Tensor& input, int64_t dim) {
  check_float(op, "input", input);
  dim = wrap_dim(op, input, dim, "input");
  b.check(op, "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return out;
  const Shape s = shape_of(input, dim);
  b.forward(as_3d(input, s), log, out.view({s.outer, s.n, s.inner}));
  return out;
}

template <typename B>
at::Tensor backward(const B& b, const char* op, bool log, const at::Tensor& grad_out,
                    const at::Tensor& output, int64_t dim) {
  check_float(op, "output", output);
  check_float(op, "grad_out", grad_out);
  check_same_device(op, "grad_out", grad_out, "output", output);
  check_same_dtype(op, "grad_out", grad_out, "output", output);
  check_same_shape(op, "grad_out", grad_out, "output", output);
  dim = wrap_dim(op, output, dim, "output");
  b.check(op, "output", output);
  const typename B::Guard guard(output.device());
  at::Tensor grad_input = at::empty(output.sizes(), output.options());
  if (output.numel() == 0) return grad_input;
  const Shape s = shape_of(output, dim);
  b.backward(as_3d(grad_out, s), as_3d(output, s), log, grad_input.view({s.outer, s.n, s.inner}));
  return grad_input;
}

// Registers the family's four ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  m.impl("softmax", [](const T& x, int64_t dim) { return forward(B{}, "softmax", false, x, dim); });
  m.impl("log_softmax",
         [](const T& x, int64_t dim) { return forward(B{}, "log_softmax", true, x, dim); });
  m.impl("softmax_backward", [](const T& g, const T& y, int64_t dim) {
    return backward(B{}, "softmax_backward", false, g, y, dim);
  });
  m.impl("log_softmax_backward", [](const T& g, const T& y, int64_t dim) {
    return backward(B{}, "log_softmax_backward", true, g, y, dim);
  });
}

}  // namespace metalcore::softmax
