// CUDA kernels of the activation family (entry points in activation_cuda.cpp): one elementwise
// kernel template, one thread per 16-byte vector of every operand, math in fp32 (fp64 for double),
// a scalar tail for the last partial vector. Operands that are not 16-byte aligned take the same
// kernel with one element a thread.
#include <ATen/Dispatch.h>

#include "activation/activation_cuda.h"
#include "common/cuda_utils.cuh"

namespace metalcore {
namespace {

using cuda::acc_t;
using cuda::Vec;

__device__ __forceinline__ float exp_a(float v) { return expf(v); }
__device__ __forceinline__ double exp_a(double v) { return exp(v); }
// Phi(x), the standard normal CDF, with its relative accuracy kept in the negative tail, where
// (1 + erf(x / sqrt 2)) / 2 cancels to nothing (as on the CPU and Metal backends). In float:
// erfc(z), z = |x| / sqrt 2, as t exp(-z^2 + P(t)) with t = 1 / (1 + z / 2) and P the Chebyshev fit
// of Numerical Recipes (2nd ed., section 6.2: fractional error < 1.2e-7), -z^2 = -x^2 / 2 formed
// from x^2 split exactly into hi + lo. Relative error of Phi < 8e-6 down to x = -12 (erfcf(-x /
// sqrt 2): 1.1e-5, from rounding its argument) in a few fused multiply-adds and one exp. GELU
// forward on an H100 (bench/results/README.md): 2707 GB/s, where erfcf held it to 1925.
__device__ __forceinline__ float phi_a(float x) {
  const float ax = fminf(fabsf(x), 20.f);  // Phi(-20) underflows to 0; keeps x^2 finite
  const float t = __fdividef(1.f, fmaf(0.5f * 0.7071067811865476f, ax, 1.f));
  float p = 0.17087277f;
  p = fmaf(p, t, -0.82215223f);
  p = fmaf(p, t, 1.48851587f);
  p = fmaf(p, t, -1.13520398f);
  p = fmaf(p, t, 0.27886807f);
  p = fmaf(p, t, -0.18628806f);
  p = fmaf(p, t, 0.09678418f);
  p = fmaf(p, t, 0.37409196f);
  p = fmaf(p, t, 1.00002368f);
  p = fmaf(p, t, -1.26551223f);
  const float hi = ax * ax;
  const float lo = fmaf(ax, ax, -hi);
  const float e = t * expf(fmaf(-0.5f, hi, p) - 0.5f * lo);  // erfc(z)
  return x < 0.f ? 0.5f * e : 1.f - 0.5f * e;
}
__device__ __forceinline__ double phi_a(double x) { return 0.5 * erfc(x * -0.7071067811865476); }

template <typename A>
__device__ __forceinline__ A sigmoid(A v) {
  return A(1) / (A(1) + exp_a(-v));
}

struct SiluFwd {
  template <typename A>
  __device__ void operator()(const A (&i)[1], A (&o)[1]) const {
    o[0] = i[0] * sigmoid(i[0]);
  }
};

// d/dx [x * s(x)] = s(x) * (1 + x * (1 - s(x)))
struct SiluBwd {  // inputs: grad_out, input
  template <typename A>
  __device__ void operator()(const A (&i)[2], A (&o)[1]) const {
    const A s = sigmoid(i[1]);
    o[0] = i[0] * s * (A(1) + i[1] * (A(1) - s));
  }
};

template <bool Tanh>
struct GeluFwd {
  template <typename A>
  __device__ void operator()(const A (&i)[1], A (&o)[1]) const {
    const A x = i[0];
    if constexpr (Tanh) {
      // 0.5 x (1 + tanh u) = x sigmoid(2u): no cancellation of 1 + tanh u in the negative tail.
      const A u2 = A(2 * 0.7978845608028654) * (x + A(0.044715) * x * x * x);
      o[0] = x / (A(1) + exp_a(-u2));
    } else {
      o[0] = x * phi_a(x);
    }
  }
};

template <bool Tanh>
struct GeluBwd {  // inputs: grad_out, input
  template <typename A>
  __device__ void operator()(const A (&i)[2], A (&o)[1]) const {
    const A x = i[1];
    A d;
    if constexpr (Tanh) {
      // u = k (x + c x^3), s = sigmoid(2u) = (1 + tanh u) / 2, 1 - tanh^2 u = 4 s (1 - s):
      // d/dx = s + 2 s (1 - s) x k (1 + 3 c x^2), with no cancellation in the negative tail.
      // s (1 - s) vanishes once |x| > ~10, so capping x^2 in the last factor changes nothing but
      // keeps it finite: past |x| = 1.8e19, x^2 overflows and 0 * inf would be NaN.
      const A k = A(0.7978845608028654), c = A(0.044715);
      const A s = A(1) / (A(1) + exp_a(A(-2) * k * (x + c * x * x * x)));
      const A x2 = min(x * x, A(1e4));
      d = s + A(2) * s * (A(1) - s) * x * k * (A(1) + A(3) * c * x2);
    } else {
      // Phi(x) + x * phi(x), phi the standard normal density.
      d = phi_a(x) + x * A(0.3989422804014327) * exp_a(A(-0.5) * x * x);
    }
    o[0] = i[0] * d;
  }
};

struct SwigluFwd {  // inputs: gate, up
  template <typename A>
  __device__ void operator()(const A (&i)[2], A (&o)[1]) const {
    o[0] = i[0] * sigmoid(i[0]) * i[1];
  }
};

struct SwigluBwd {  // inputs: grad_out, gate, up; outputs: grad_gate, grad_up
  template <typename A>
  __device__ void operator()(const A (&i)[3], A (&o)[2]) const {
    const A s = sigmoid(i[1]);
    // The derivative factor (|.| <= 1.1) scales g before up does, and silu(gate) is formed
    // before g multiplies it: g * up or g * gate alone can overflow where the result is finite.
    o[0] = (i[0] * (s * (A(1) + i[1] * (A(1) - s)))) * i[2];
    o[1] = i[0] * (i[1] * s);
  }
};

template <typename T, int N>
struct Ptrs {
  T* p[N];
};

template <typename T, int VEC, int NIN, int NOUT, typename Op>
__global__ void __launch_bounds__(256)
    eltwise_kernel(Ptrs<const T, NIN> in, Ptrs<T, NOUT> out, int64_t n, Op op) {
  using A = acc_t<T>;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (base + VEC <= n) {
    Vec<T, VEC> iv[NIN];
#pragma unroll
    for (int a = 0; a < NIN; ++a) iv[a] = cuda::load_vec_stream<T, VEC>(in.p[a] + base);
    Vec<T, VEC> ov[NOUT];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A ia[NIN], oa[NOUT];
#pragma unroll
      for (int a = 0; a < NIN; ++a) ia[a] = static_cast<A>(iv[a].v[j]);
      op(ia, oa);
#pragma unroll
      for (int b = 0; b < NOUT; ++b) ov[b].v[j] = T(oa[b]);
    }
#pragma unroll
    for (int b = 0; b < NOUT; ++b) cuda::store_vec(out.p[b] + base, ov[b]);
  } else {
    for (int64_t e = base; e < n; ++e) {
      A ia[NIN], oa[NOUT];
#pragma unroll
      for (int a = 0; a < NIN; ++a) ia[a] = static_cast<A>(in.p[a][e]);
      op(ia, oa);
#pragma unroll
      for (int b = 0; b < NOUT; ++b) out.p[b][e] = T(oa[b]);
    }
  }
}

template <typename T, int VEC, int NIN, int NOUT, typename Op>
void launch_kernel(const char* name, const Ptrs<const T, NIN>& in, const Ptrs<T, NOUT>& out,
                   int64_t n, Op op, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t blocks = cuda::ceil_div(cuda::ceil_div(n, VEC), threads);
  TORCH_CHECK(blocks <= INT32_MAX, "metalcore.", name, ": tensor too large");
  eltwise_kernel<T, VEC, NIN, NOUT, Op>
      <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(in, out, n, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs `op` over contiguous operands of the same numel and dtype.
template <int NIN, int NOUT, typename Op>
void launch(const char* name, std::array<at::Tensor, NIN> in, std::array<at::Tensor, NOUT> out,
            Op op) {
  const int64_t n = out[0].numel();
  if (n == 0) return;
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out[0].scalar_type(), "metalcore_activation_cuda", [&] {
        using T = scalar_t;
        Ptrs<const T, NIN> ip;
        Ptrs<T, NOUT> op_;
        bool aligned = true;
        for (int a = 0; a < NIN; ++a) {
          ip.p[a] = in[a].template const_data_ptr<T>();
          aligned = aligned && cuda::aligned16(ip.p[a]);
        }
        for (int b = 0; b < NOUT; ++b) {
          op_.p[b] = out[b].template mutable_data_ptr<T>();
          aligned = aligned && cuda::aligned16(op_.p[b]);
        }
        if (aligned) {
          launch_kernel<T, cuda::vec_width<T>(), NIN, NOUT>(name, ip, op_, n, op, stream);
        } else {
          launch_kernel<T, 1, NIN, NOUT>(name, ip, op_, n, op, stream);
        }
      });
}

}  // namespace

namespace cuda {

void launch_silu(const at::Tensor& in, const at::Tensor& out) {
  launch<1, 1>("silu", {in}, {out}, SiluFwd{});
}

void launch_silu_backward(const at::Tensor& grad_out, const at::Tensor& in,
                          const at::Tensor& grad_in) {
  launch<2, 1>("silu_backward", {grad_out, in}, {grad_in}, SiluBwd{});
}

void launch_gelu(const at::Tensor& in, bool tanh_approx, const at::Tensor& out) {
  if (tanh_approx) {
    launch<1, 1>("gelu", {in}, {out}, GeluFwd<true>{});
  } else {
    launch<1, 1>("gelu", {in}, {out}, GeluFwd<false>{});
  }
}

void launch_gelu_backward(const at::Tensor& grad_out, const at::Tensor& in, bool tanh_approx,
                          const at::Tensor& grad_in) {
  if (tanh_approx) {
    launch<2, 1>("gelu_backward", {grad_out, in}, {grad_in}, GeluBwd<true>{});
  } else {
    launch<2, 1>("gelu_backward", {grad_out, in}, {grad_in}, GeluBwd<false>{});
  }
}

void launch_swiglu(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  launch<2, 1>("swiglu", {gate, up}, {out}, SwigluFwd{});
}

void launch_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                            const at::Tensor& up, const at::Tensor& grad_gate,
                            const at::Tensor& grad_up) {
  launch<3, 2>("swiglu_backward", {grad_out, gate, up}, {grad_gate, grad_up}, SwigluBwd{});
}

}  // namespace cuda
}  // namespace metalcore
