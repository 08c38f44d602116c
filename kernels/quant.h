// Weight-only quantization family: formats, tile sizes and the parameter struct shared by
// quant.metal and the host launcher (csrc/quant/quant_launch.cpp).
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace quant_k {

// Weight formats (the order of quant_format.h's Format). The dequantize and matrix-vector
// kernels are instantiated per format (their time is the decode); the tiled kernels, where each
// decoded weight feeds 32 rows of multiply-adds, read it from Params (one instantiation per
// dtype: 36 fewer kernels to compile).
METALCORE_CONSTEXPR int kInt4 = 0;  // uint8 [n, k/2], low nibble = even k; w = s q + b
METALCORE_CONSTEXPR int kInt8 = 1;  // uint8 [n, k]; w = s q + b
METALCORE_CONSTEXPR int kQ4_0 = 2;  // GGUF blocks of 32 weights in 18 bytes
METALCORE_CONSTEXPR int kQ8_0 = 3;  // GGUF blocks of 32 weights in 34 bytes
METALCORE_CONSTEXPR int kQ4_K = 4;  // GGUF super-blocks of 256 weights in 144 bytes
METALCORE_CONSTEXPR int kQ6_K = 5;  // GGUF super-blocks of 256 weights in 210 bytes

// Every kernel decodes weights 8 consecutive k at a time: every group (32, 64, 128) and every
// GGUF block or sub-block (32) is a whole number of such runs, so a run never straddles a scale.
METALCORE_CONSTEXPR unsigned kRun = 8;

// Matrix-vector kernels ("gemv") serve up to this many activation rows: each weight is decoded
// once into registers and applied to every row. Beyond it the tiled kernel ("gemm") reuses each
// decoded weight tile for 32 rows. (MLX's crossover is 6-14 depending on the chip; to be tuned
// on a Mac.)
METALCORE_CONSTEXPR unsigned kGemvMaxRows = 8;
// gemv: weight rows per simdgroup and simdgroups per threadgroup (8 rows per threadgroup, as in
// MLX's qmv and ggml's mul_mv_q4_0).
METALCORE_CONSTEXPR unsigned kGemvRowsPerSimd = 4;
METALCORE_CONSTEXPR unsigned kGemvSimds = 2;

// Tiled kernels: a [kTile x kTile] output tile per threadgroup of kTileThreads (2 x 2
// simdgroups, 16 x 16 outputs each in 8 x 8 simdgroup matrices), the reduction in kTile steps.
// The weight tile is kTile rows x kTile k: kTileThreads runs of kRun, one per thread.
METALCORE_CONSTEXPR unsigned kTile = 32;
METALCORE_CONSTEXPR unsigned kTileThreads = 128;

// Dequantize: threads per threadgroup (one thread per run of kRun weights).
METALCORE_CONSTEXPR unsigned kDequantThreads = 64;

// dtype of the affine formats' scales and biases (may differ from the activations').
METALCORE_CONSTEXPR unsigned kParamFloat = 0;
METALCORE_CONSTEXPR unsigned kParamHalf = 1;
METALCORE_CONSTEXPR unsigned kParamBFloat = 2;

METALCORE_CONSTEXPR unsigned kHasBias = 1;

struct Params {
  METALCORE_U64 row_bytes;  // bytes per weight row in `data`
  unsigned m;               // activation rows (linear) / grad rows (backward)
  unsigned n;               // weight rows (out_features)
  unsigned k;               // weight columns (in_features), a multiple of 32
  unsigned group;           // affine group size (unused by the GGUF formats)
  unsigned param_dtype;     // kParamFloat / kParamHalf / kParamBFloat (affine formats)
  unsigned flags;           // kHasBias
  unsigned format;          // kInt4 .. kQ6_K (read by the tiled kernels, one per dtype)
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 40);
#endif

}  // namespace quant_k
}  // namespace metalcore
