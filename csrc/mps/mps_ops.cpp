// MPS kernels of the metalcore ops (macOS builds only): each is the op's launch function run on
// a MetalEncoder, which encodes into PyTorch's current MPS stream.
#include <torch/library.h>

#include "activation/activation_launch.h"
#include "adamw/adamw_launch.h"
#include "mps/metal_encoder.h"
#include "rmsnorm/rmsnorm_launch.h"
#include "rope/rope_launch.h"

namespace metalcore::mps {
namespace {

template <auto Fn>
constexpr auto on_metal = &WithEncoder<MetalEncoder, Fn>::call;

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, MPS, m) {
  m.impl("rmsnorm", on_metal<&launch::rmsnorm>);
  m.impl("rmsnorm_backward", on_metal<&launch::rmsnorm_backward>);
  m.impl("fused_add_rmsnorm", on_metal<&launch::fused_add_rmsnorm>);
  m.impl("fused_add_rmsnorm_backward", on_metal<&launch::fused_add_rmsnorm_backward>);
  m.impl("silu", on_metal<&launch::silu>);
  m.impl("silu_backward", on_metal<&launch::silu_backward>);
  m.impl("gelu", on_metal<&launch::gelu>);
  m.impl("gelu_backward", on_metal<&launch::gelu_backward>);
  m.impl("swiglu", on_metal<&launch::swiglu>);
  m.impl("swiglu_backward", on_metal<&launch::swiglu_backward>);
  m.impl("rope", on_metal<&launch::rope>);
  m.impl("rope_backward", on_metal<&launch::rope_backward>);
  m.impl("adamw", on_metal<&launch::adamw>);
}

}  // namespace metalcore::mps
