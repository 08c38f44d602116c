// Weight formats of the quantization family: what the validated entry points hand to every
// backend's kernels. Shared by quant.h (validation) and the kernel files, so it holds no
// vectorized types (the CPU kernels are compiled once per capability).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace metalcore::quant {

enum class Format : int8_t { Int4, Int8, Q4_0, Q8_0, Q4_K, Q6_K };

// ggml's type ids (ggml.h's enum ggml_type), which GGUF files store per tensor.
constexpr int64_t kGgmlQ4_0 = 2;
constexpr int64_t kGgmlQ8_0 = 8;
constexpr int64_t kGgmlQ4_K = 12;
constexpr int64_t kGgmlQ6_K = 14;

// Weights per block and bytes per block of the GGUF formats (ggml-common.h's block structs).
constexpr int64_t kQ4_0Block = 32, kQ4_0Bytes = 18;    // fp16 d, 16 bytes of nibbles
constexpr int64_t kQ8_0Block = 32, kQ8_0Bytes = 34;    // fp16 d, 32 int8
constexpr int64_t kQ4_KBlock = 256, kQ4_KBytes = 144;  // fp16 d, dmin, 12 scale bytes, 128 nibbles
constexpr int64_t kQ6_KBlock = 256,
                  kQ6_KBytes = 210;  // 128 low nibbles, 64 high pairs, 16 int8 sc, d

// A validated quantized weight W [n, k]: `data` is contiguous uint8 [n, row_bytes]; `scales`
// and `biases` are contiguous [n, k / group] (affine formats only, undefined otherwise).
struct QWeight {
  Format format;
  int64_t n;
  int64_t k;
  int64_t group;  // affine group size, or the GGUF block size
  at::Tensor data, scales, biases;
};

}  // namespace metalcore::quant
