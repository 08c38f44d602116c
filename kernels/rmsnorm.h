// RMSNorm family: parameters and tuning constants shared by rmsnorm.metal and the host launcher.
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace rmsnorm_k {

// Elements per thread in the register-resident variants: a row of up to
// kReads * 1024 = 4096 elements is read from memory exactly once.
METALCORE_CONSTEXPR unsigned kReads = 4;
// Backward: at most this many threadgroups (each owns one row of dweight partials), and at least
// this many rows per threadgroup so the partials stay small next to the row traffic.
METALCORE_CONSTEXPR unsigned kBackwardMaxGroups = 512;
METALCORE_CONSTEXPR unsigned kBackwardMinRowsPerGroup = 8;

METALCORE_CONSTEXPR unsigned kHasWeight = 1;
METALCORE_CONSTEXPR unsigned kHasResidual = 2;  // forward: fused add; backward: grad_residual_out

struct Params {
  METALCORE_U64 x_stride;  // elements between consecutive rows of x
  METALCORE_U64 r_stride;  // forward: residual rows; backward: grad_residual_out rows
  METALCORE_U64 g_stride;  // backward: grad_out rows
  unsigned rows;
  unsigned n;               // row length (the normalised dim)
  unsigned rows_per_group;  // backward: rows handled by one threadgroup
  unsigned flags;           // kHasWeight | kHasResidual
  float eps;
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 48);
#endif

}  // namespace rmsnorm_k
}  // namespace metalcore
