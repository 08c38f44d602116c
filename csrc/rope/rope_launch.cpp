// RoPE launch layer: the Metal backend of the family's shared entry points (rope.h). q and k keep
// their strides (unit stride on head_dim only), outputs are contiguous; one dispatch per tensor
// (GQA: q and k have their own head counts). The backward is the same kernel applying the
// transposed map.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/rope.h"
#include "rope/rope.h"

namespace metalcore::launch {
namespace {

using namespace rope_k;

std::string variant(bool interleaved, at::ScalarType x, at::ScalarType table) {
  std::string v = interleaved ? "interleaved" : "halfsplit";
  return table != x ? v + "_f32table" : v;
}

void encode(Encoder& enc, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& out, int64_t rot, bool interleaved, bool transpose) {
  if (x.numel() == 0) return;
  Params p{};
  p.in_stride_b = static_cast<uint64_t>(x.stride(0));
  p.in_stride_h = static_cast<uint64_t>(x.stride(1));
  p.in_stride_s = static_cast<uint64_t>(x.stride(2));
  p.table_stride_b = cos.size(0) == 1 ? 0 : static_cast<uint64_t>(cos.stride(0));
  p.table_stride_s = static_cast<uint64_t>(cos.stride(1));
  p.heads = static_cast<uint32_t>(x.size(1));
  p.seq = static_cast<uint32_t>(x.size(2));
  p.head_dim = static_cast<uint32_t>(x.size(3));
  p.rot = static_cast<uint32_t>(rot);
  p.transpose = transpose ? 1u : 0u;
  // x: rotated pairs then pass-through pairs; z: batch x groups of kHeadsPerThread heads.
  const uint32_t cols = p.rot / 2 + (p.head_dim - p.rot + 1) / 2;
  const int64_t z = x.size(0) * ceil_div(p.heads, kHeadsPerThread);
  TORCH_CHECK_VALUE(z <= std::numeric_limits<uint32_t>::max(), "metalcore.rope: batch * heads ",
                    "too large for one launch (", x.sizes(), ")");
  enc.set_pipeline(kernel_name("rope", variant(interleaved, x.scalar_type(), cos.scalar_type()),
                               x.scalar_type()));
  const uint32_t limit = enc.max_threads_per_threadgroup();
  const uint32_t tx = std::min({cols, kSimdWidth, limit});
  const uint32_t ty = std::max(1u, std::min(p.seq, std::min(128u, limit) / tx));
  enc.set_tensor(0, x);
  enc.set_tensor(1, cos);
  enc.set_tensor(2, sin);
  enc.set_tensor(3, out);
  enc.set_value(4, p);
  enc.dispatch_threads({cols, p.seq, static_cast<uint32_t>(z)}, {tx, ty, 1});
}

// The Metal backend of the shared entry points (rope.h).
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& t) {
    check_metal_dtype(op, arg, t.scalar_type());
  }
  void apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
             bool interleaved, bool transpose, const rope::Dims& dm, const at::Tensor& q_out,
             const at::Tensor& k_out) const {
    // The kernel reads both tables with one set of strides: tables laid out differently (rare,
    // and small: [batch or 1, seq, rot]) are read through contiguous copies.
    const bool same = cos.strides() == sin.strides();
    const at::Tensor c = same ? cos : cos.contiguous(), s = same ? sin : sin.contiguous();
    encode(enc, q, c, s, q_out, dm.rot, interleaved, transpose);
    encode(enc, k, c, s, k_out, dm.rot, interleaved, transpose);
  }
};

std::tuple<at::Tensor, at::Tensor> rope(Encoder& enc, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& cos, const at::Tensor& sin,
                                        bool interleaved) {
  return rope::forward(MetalKernels{enc}, q, k, cos, sin, interleaved);
}

std::tuple<at::Tensor, at::Tensor> rope_backward(Encoder& enc, const at::Tensor& grad_q_out,
                                                 const at::Tensor& grad_k_out,
                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                 bool interleaved) {
  return rope::backward(MetalKernels{enc}, grad_q_out, grad_k_out, cos, sin, interleaved);
}

std::vector<std::string> rope_kernel_names() {
  std::vector<std::string> names;
  for (bool interleaved : {false, true}) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16}) {
      names.push_back(kernel_name("rope", variant(interleaved, t, t), t));
      if (t != at::kFloat)
        names.push_back(kernel_name("rope", variant(interleaved, t, at::kFloat), t));
    }
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("rope", on_metal<&rope>);
  m.impl("rope_backward", on_metal<&rope_backward>);
}

const RegisterKernelNames registered_names(&rope_kernel_names);

}  // namespace metalcore::launch
