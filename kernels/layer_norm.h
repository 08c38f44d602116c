// LayerNorm family: parameters and tuning constants shared by layer_norm.metal and the host
// launcher (csrc/layer_norm/layer_norm_launch.cpp).
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace layer_norm_k {

// Backward: at most this many threadgroups (each owns one row of dweight and dbias partials),
// and at least this many rows per threadgroup so the partials stay small next to the row traffic.
METALCORE_CONSTEXPR unsigned kBackwardMaxGroups = 512;
METALCORE_CONSTEXPR unsigned kBackwardMinRowsPerGroup = 8;

METALCORE_CONSTEXPR unsigned kHasWeight = 1;
METALCORE_CONSTEXPR unsigned kHasResidual = 2;  // forward: fused add; backward: grad_residual_out
METALCORE_CONSTEXPR unsigned kHasBias = 4;      // forward: add bias; backward: want dbias

struct Params {
  METALCORE_U64 x_stride;  // elements between consecutive rows of x
  METALCORE_U64 r_stride;  // forward: residual rows; backward: grad_residual_out rows
  METALCORE_U64 g_stride;  // backward: grad_out rows
  unsigned rows;
  unsigned n;               // row length (the normalised dim)
  unsigned rows_per_group;  // backward: rows handled by one threadgroup
  unsigned flags;           // kHasWeight | kHasResidual | kHasBias
  float eps;
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 48);
#endif

}  // namespace layer_norm_k
}  // namespace metalcore
