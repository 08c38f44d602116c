// Linear algebra family: parameters shared by linalg.metal and the host launcher
// (csrc/linalg/linalg_launch.cpp). The kernels take the entry points' canonical forms
// (csrc/linalg/linalg.h): contiguous [batch, n, n] float32 matrices, lower-triangle Cholesky,
// left-hand triangular solves.
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace linalg_k {

// Threads per threadgroup of the Cholesky kernels (one threadgroup per matrix).
METALCORE_CONSTEXPR unsigned kCholeskyThreads = 256;
// Largest n whose matrix the Cholesky kernel factors in threadgroup memory (64 * 64 floats:
// 16 KB of the 32 KB every Apple GPU has); larger matrices are factored in place in the output.
METALCORE_CONSTEXPR unsigned kTileMaxN = 64;
// Right-hand-side columns per threadgroup of the triangular solve: one simdgroup each.
METALCORE_CONSTEXPR unsigned kTrsmColumns = 8;

struct Params {
  unsigned n;       // matrix order
  unsigned k;       // right-hand-side columns (triangular solve)
  unsigned upper;   // triangular solve: A is upper triangular
  unsigned unit;    // triangular solve: unit diagonal (not read)
  unsigned batch;   // matrices
  unsigned pad[3];  // keeps the size a multiple of 16 bytes
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 32);
#endif

}  // namespace linalg_k
}  // namespace metalcore
