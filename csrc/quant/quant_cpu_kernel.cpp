// Weight-only quantized matmul on CPU.
//
// Every format reduces to one primitive: decode one row of W (k weights) into a float buffer
// (double for float64 activations). The decode of the 4- and 8-bit formats is vectorized
// (AVX2/AVX-512 builds); the K-quants decode with scalar code. On top of it:
//   - dequantize: decode each row, convert to the output dtype (rows in parallel);
//   - linear: each task decodes a block of 4 weight rows into a thread-local buffer and takes
//     their dot products with every activation row, 4 x 4 at a time in registers, so W is read
//     from memory once and decoded once whatever m is (at m = 1 the cost is the weight bytes,
//     which is the point of quantizing);
//   - backward: each task owns a tile of input columns and accumulates grad[i, r] * W[r, :]
//     over the weight rows in order.
// No BLAS: every output element is one fixed-order sum, so results do not depend on the
// thread count (a BLAS call may split its reduction by threads).
#include "quant/quant_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

using quant::Format;
using quant::QWeight;

// GGUF blocks are only 2-byte aligned: read their fp16 fields bytewise.
inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// One row of an affine format's scales or biases, in their stored dtype.
struct ParamRow {
  const void* base;
  at::ScalarType type;
  template <typename A>
  A at(int64_t i) const {
    switch (type) {
      case at::kHalf:
        return static_cast<A>(static_cast<const c10::Half*>(base)[i]);
      case at::kBFloat16:
        return static_cast<A>(static_cast<const c10::BFloat16*>(base)[i]);
      case at::kDouble:
        return static_cast<A>(static_cast<const double*>(base)[i]);
      default:
        return static_cast<A>(static_cast<const float*>(base)[i]);
    }
  }
};

ParamRow param_row(const at::Tensor& t, int64_t row) {
  const auto* base = static_cast<const uint8_t*>(t.const_data_ptr());
  return {base + row * t.size(1) * t.element_size(), t.scalar_type()};
}

// --- Group / block decoders --------------------------------------------------------------------
// Each writes one group or block of dequantized weights in natural k order. The scalar forms
// are the definition; the vector forms produce the same values (the float products of the
// GGUF formats are exact, so only the affine s * q + b may differ by FMA rounding).

template <typename A>
inline void int4_group_scalar(const uint8_t* q, int64_t g, A s, A b, A* out) {
  for (int64_t i = 0; i < g / 2; ++i) {
    out[2 * i] = s * static_cast<A>(q[i] & 0xF) + b;
    out[2 * i + 1] = s * static_cast<A>(q[i] >> 4) + b;
  }
}

template <typename A>
inline void int8_group_scalar(const uint8_t* q, int64_t g, A s, A b, A* out) {
  for (int64_t i = 0; i < g; ++i) out[i] = s * static_cast<A>(q[i]) + b;
}

// Q4_0: byte j holds element j (low nibble) and element j + 16 (high nibble); x = d * (q - 8).
template <typename A>
inline void q4_0_block_scalar(const uint8_t* blk, A* out) {
  const A d = static_cast<A>(half_at(blk));
  const uint8_t* qs = blk + 2;
  for (int j = 0; j < 16; ++j) {
    out[j] = d * static_cast<A>((qs[j] & 0xF) - 8);
    out[j + 16] = d * static_cast<A>((qs[j] >> 4) - 8);
  }
}

// Q8_0: x = d * q with int8 q.
template <typename A>
inline void q8_0_block_scalar(const uint8_t* blk, A* out) {
  const A d = static_cast<A>(half_at(blk));
  const auto* qs = reinterpret_cast<const int8_t*>(blk + 2);
  for (int j = 0; j < 32; ++j) out[j] = d * static_cast<A>(qs[j]);
}

// Q4_K super-block (ggml-common.h's block_q4_K): d, dmin (fp16), scales[12], qs[128]. Sub-block
// j (32 weights) has a 6-bit scale and min packed in `scales`; chunk c of 64 weights holds
// sub-block 2c in the low nibbles of qs[32c..32c+31] and sub-block 2c+1 in the high ones.
// x = (d * sc) * q - dmin * m, computed in float as ggml does (every product is exact).
template <typename A>
inline void q4_k_block(const uint8_t* blk, A* out) {
  const float d = half_at(blk), dmin = half_at(blk + 2);
  const uint8_t* sc = blk + 4;
  const uint8_t* qs = blk + 16;
  for (int j = 0; j < 8; ++j) {
    int scale, min;
    if (j < 4) {
      scale = sc[j] & 63;
      min = sc[j + 4] & 63;
    } else {
      scale = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
      min = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
    const float ds = d * static_cast<float>(scale), dm = dmin * static_cast<float>(min);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const float v = ds * static_cast<float>((q[l] >> shift) & 0xF) - dm;
      out[32 * j + l] = static_cast<A>(v);
    }
  }
}

// Q6_K super-block (block_q6_K): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16]
// (int8, one per 16 weights), d (fp16). Each half of 128 weights uses 64 ql bytes, 32 qh bytes
// and 8 scales: weight 32r + l (r = 0..3, l = 0..31) takes the low (r < 2) or high (r >= 2)
// nibble of ql[l + 32 (r % 2)] and bits 2r..2r+1 of qh[l]; q = that 6-bit value - 32, and
// x = d * scale[r * 2 + l / 16] * q (exact in float).
template <typename A>
inline void q6_k_block(const uint8_t* blk, A* out) {
  const uint8_t* ql = blk;
  const uint8_t* qh = blk + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(blk + 192);
  const float d = half_at(blk + 208);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* l4 = ql + 64 * half;
    const uint8_t* h2 = qh + 32 * half;
    const int8_t* s = sc + 8 * half;
    A* o = out + 128 * half;
    for (int r = 0; r < 4; ++r) {
      for (int l = 0; l < 32; ++l) {
        const int lo = (l4[l + 32 * (r % 2)] >> (4 * (r / 2))) & 0xF;
        const int hi = (h2[l] >> (2 * r)) & 3;
        const int q = (lo | (hi << 4)) - 32;
        const float v = d * static_cast<float>(s[r * 2 + l / 16]) * static_cast<float>(q);
        o[32 * r + l] = static_cast<A>(v);
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 bytes -> 16 floats.
inline __m512 u8x16_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

inline void int4_group_vec(const uint8_t* q, int64_t g, float s, float b, float* out) {
  const __m128i mask = _mm_set1_epi8(0xF);
  const __m512 vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b);
  for (int64_t j = 0; j < g; j += 32) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j / 2));
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    // Interleave low (even k) and high (odd k) nibbles back into k order.
    _mm512_storeu_ps(out + j, _mm512_fmadd_ps(u8x16_to_ps(_mm_unpacklo_epi8(lo, hi)), vs, vb));
    _mm512_storeu_ps(out + j + 16, _mm512_fmadd_ps(u8x16_to_ps(_mm_unpackhi_epi8(lo, hi)), vs, vb));
  }
}

inline void int8_group_vec(const uint8_t* q, int64_t g, float s, float b, float* out) {
  const __m512 vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b);
  for (int64_t j = 0; j < g; j += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j));
    _mm512_storeu_ps(out + j, _mm512_fmadd_ps(u8x16_to_ps(v), vs, vb));
  }
}

inline void q4_0_block_vec(const uint8_t* blk, float* out) {
  const __m512 d = _mm512_set1_ps(half_at(blk)), eight = _mm512_set1_ps(8.0f);
  const __m128i mask = _mm_set1_epi8(0xF);
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
  const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_sub_ps(u8x16_to_ps(lo), eight), d));
  _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_sub_ps(u8x16_to_ps(hi), eight), d));
}

inline void q8_0_block_vec(const uint8_t* blk, float* out) {
  const __m512 d = _mm512_set1_ps(half_at(blk));
  for (int j = 0; j < 32; j += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2 + j));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d));
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// 8 bytes (the low half of v) -> 8 floats.
inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

inline void int4_group_vec(const uint8_t* q, int64_t g, float s, float b, float* out) {
  const __m128i mask = _mm_set1_epi8(0xF);
  const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b);
  for (int64_t j = 0; j < g; j += 32) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j / 2));
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    const __m128i a = _mm_unpacklo_epi8(lo, hi), c = _mm_unpackhi_epi8(lo, hi);
    _mm256_storeu_ps(out + j, _mm256_fmadd_ps(u8x8_to_ps(a), vs, vb));
    _mm256_storeu_ps(out + j + 8, _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(a, 8)), vs, vb));
    _mm256_storeu_ps(out + j + 16, _mm256_fmadd_ps(u8x8_to_ps(c), vs, vb));
    _mm256_storeu_ps(out + j + 24, _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(c, 8)), vs, vb));
  }
}

inline void int8_group_vec(const uint8_t* q, int64_t g, float s, float b, float* out) {
  const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b);
  for (int64_t j = 0; j < g; j += 8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
    _mm256_storeu_ps(out + j, _mm256_fmadd_ps(u8x8_to_ps(v), vs, vb));
  }
}

inline void q4_0_block_vec(const uint8_t* blk, float* out) {
  const __m256 d = _mm256_set1_ps(half_at(blk)), eight = _mm256_set1_ps(8.0f);
  const __m128i mask = _mm_set1_epi8(0xF);
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
  const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_sub_ps(u8x8_to_ps(lo), eight), d));
  _mm256_storeu_ps(out + 8,
                   _mm256_mul_ps(_mm256_sub_ps(u8x8_to_ps(_mm_srli_si128(lo, 8)), eight), d));
  _mm256_storeu_ps(out + 16, _mm256_mul_ps(_mm256_sub_ps(u8x8_to_ps(hi), eight), d));
  _mm256_storeu_ps(out + 24,
                   _mm256_mul_ps(_mm256_sub_ps(u8x8_to_ps(_mm_srli_si128(hi, 8)), eight), d));
}

inline void q8_0_block_vec(const uint8_t* blk, float* out) {
  const __m256 d = _mm256_set1_ps(half_at(blk));
  for (int j = 0; j < 32; j += 8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + j));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d));
  }
}
#else
inline void int4_group_vec(const uint8_t* q, int64_t g, float s, float b, float* out) {
  int4_group_scalar<float>(q, g, s, b, out);
}
inline void int8_group_vec(const uint8_t* q, int64_t g, float s, float b, float* out) {
  int8_group_scalar<float>(q, g, s, b, out);
}
inline void q4_0_block_vec(const uint8_t* blk, float* out) { q4_0_block_scalar<float>(blk, out); }
inline void q8_0_block_vec(const uint8_t* blk, float* out) { q8_0_block_scalar<float>(blk, out); }
#endif

// Columns [k0, k1) of row `row` of W, in natural order, into out; k0 and k1 are multiples of
// the group or block size (or k1 == k).
template <typename A>
void decode_row(const QWeight& w, int64_t row, A* out, int64_t k0, int64_t k1) {
  constexpr bool vec = std::is_same_v<A, float>;
  const auto* data = w.data.const_data_ptr<uint8_t>();
  const int64_t row_bytes = w.data.size(1);
  const uint8_t* src = data + row * row_bytes;
  switch (w.format) {
    case Format::Int4:
    case Format::Int8: {
      const bool four = w.format == Format::Int4;
      const int64_t g = w.group, group_bytes = four ? g / 2 : g;
      const ParamRow s = param_row(w.scales, row), b = param_row(w.biases, row);
      for (int64_t i = k0 / g; i < k1 / g; ++i) {
        const A si = s.at<A>(i), bi = b.at<A>(i);
        const uint8_t* q = src + i * group_bytes;
        A* o = out + i * g - k0;
        if constexpr (vec) {
          four ? int4_group_vec(q, g, si, bi, o) : int8_group_vec(q, g, si, bi, o);
        } else {
          four ? int4_group_scalar<A>(q, g, si, bi, o) : int8_group_scalar<A>(q, g, si, bi, o);
        }
      }
      break;
    }
    case Format::Q4_0:
      for (int64_t i = k0 / quant::kQ4_0Block; i < k1 / quant::kQ4_0Block; ++i) {
        const uint8_t* blk = src + i * quant::kQ4_0Bytes;
        if constexpr (vec) {
          q4_0_block_vec(blk, out + i * quant::kQ4_0Block - k0);
        } else {
          q4_0_block_scalar<A>(blk, out + i * quant::kQ4_0Block - k0);
        }
      }
      break;
    case Format::Q8_0:
      for (int64_t i = k0 / quant::kQ8_0Block; i < k1 / quant::kQ8_0Block; ++i) {
        const uint8_t* blk = src + i * quant::kQ8_0Bytes;
        if constexpr (vec) {
          q8_0_block_vec(blk, out + i * quant::kQ8_0Block - k0);
        } else {
          q8_0_block_scalar<A>(blk, out + i * quant::kQ8_0Block - k0);
        }
      }
      break;
    case Format::Q4_K:
      for (int64_t i = k0 / quant::kQ4_KBlock; i < k1 / quant::kQ4_KBlock; ++i) {
        q4_k_block<A>(src + i * quant::kQ4_KBytes, out + i * quant::kQ4_KBlock - k0);
      }
      break;
    case Format::Q6_K:
      for (int64_t i = k0 / quant::kQ6_KBlock; i < k1 / quant::kQ6_KBlock; ++i) {
        q6_k_block<A>(src + i * quant::kQ6_KBytes, out + i * quant::kQ6_KBlock - k0);
      }
      break;
  }
}

template <typename A>
at::ScalarType acc_type() {
  return std::is_same_v<A, double> ? at::kDouble : at::kFloat;
}

// Tasks per parallel chunk so that a chunk does at least ~512K multiply-adds or decodes: a
// parallel region costs microseconds (far more on a loaded machine), small calls run inline.
int64_t work_grain(int64_t per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(per_task, 1));
}

// Rows per decode task so that a task decodes at least ~32K weights.
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)); }

template <typename T>
void dequantize_impl(const QWeight& w, const at::Tensor& out) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, w.n, row_grain(w.k), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(std::is_same_v<T, A> ? 0 : w.k);
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<T, A>) {
        decode_row<A>(w, r, op + r * w.k, 0, w.k);
      } else {
        decode_row<A>(w, r, buf.data(), 0, w.k);
        // One rounding from the float value to the output dtype.
        at::vec::convert(buf.data(), op + r * w.k, w.k);
      }
    }
  });
}

// y[i][j] = dot(w row j, x row i) for R weight rows and C activation rows at once: R * C
// vector accumulators, R + C loads per R * C FMAs, each weight and activation vector loaded
// once per block. Every output is one fixed-order dot product, whatever the blocking around
// it, so results do not depend on the thread count.
template <typename A, int R, int C>
inline void dot_block(const A* const* wr, const A* const* xr, int64_t k, A (*y)[R]) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t L = V::size();
  V acc[C][R];
  for (int c = 0; c < C; ++c) {
    for (int r = 0; r < R; ++r) acc[c][r] = V(A(0));
  }
  int64_t i = 0;
  for (; i + L <= k; i += L) {
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = V::loadu(wr[r] + i);
    for (int c = 0; c < C; ++c) {
      const V xv = V::loadu(xr[c] + i);
      for (int r = 0; r < R; ++r) acc[c][r] = at::vec::fmadd(wv[r], xv, acc[c][r]);
    }
  }
  if (i < k) {
    for (int c = 0; c < C; ++c) {
      const V xv = V::loadu(xr[c] + i, k - i);
      for (int r = 0; r < R; ++r) {
        acc[c][r] = at::vec::fmadd(V::loadu(wr[r] + i, k - i), xv, acc[c][r]);
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int r = 0; r < R; ++r) {
      y[c][r] = at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, acc[c][r]);
    }
  }
}

// Weight rows per block of the forward kernel, and activation rows per block.
constexpr int kRowBlock = 4;
constexpr int kColBlock = 4;
// Weight columns decoded at a time by the forward kernel: a multiple of every group and
// block size.
constexpr int64_t kChunk = 1024;
// Weight columns per backward task: a multiple of every group and block size.
constexpr int64_t kColTile = 256;

template <typename T>
void linear_impl(const at::Tensor& x, const QWeight& w, const at::Tensor& bias,
                 const at::Tensor& out) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t m = x.size(0), n = w.n, k = w.k;
  // Activations in the accumulation type, converted once (no copy when they already are).
  const at::Tensor xa = x.to(acc_type<A>()).contiguous();
  const A* xp = xa.const_data_ptr<A>();
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* op = out.mutable_data_ptr<T>();
  // Tasks own blocks of kRowBlock weight rows: each block is decoded once into a thread-local
  // buffer (L1/L2) and multiplied with every activation row, kColBlock rows at a time, so W
  // is read from memory once and decoded once whatever m is.
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t grain = work_grain(kRowBlock * k * (m + 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    // The block is decoded kChunk columns at a time (16 KB of float for 4 rows: it stays in
    // L1 while every activation row uses it); partial dot products add up chunk by chunk, in
    // the same order whatever the thread count.
    std::vector<A> buf(kRowBlock * kChunk), acc(m * kRowBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kRowBlock, rows = std::min<int64_t>(kRowBlock, n - n0);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
        const int64_t len = std::min(kChunk, k - k0);
        const A* wr[kRowBlock];
        for (int r = 0; r < kRowBlock; ++r) {
          // Rows past n repeat the last row (their results are dropped).
          const int64_t rr = std::min<int64_t>(r, rows - 1);
          if (r < rows) decode_row<A>(w, n0 + r, buf.data() + r * len, k0, k0 + len);
          wr[r] = buf.data() + rr * len;
        }
        for (int64_t i0 = 0; i0 < m; i0 += kColBlock) {
          const int64_t cols = std::min<int64_t>(kColBlock, m - i0);
          A y[kColBlock][kRowBlock];
          const A* xr[kColBlock];
          for (int c = 0; c < kColBlock; ++c) {
            xr[c] = xp + (i0 + std::min<int64_t>(c, cols - 1)) * k + k0;
          }
          if (cols == kColBlock) {
            dot_block<A, kRowBlock, kColBlock>(wr, xr, len, y);
          } else {
            // Fewer activation rows (decode with m < 4): no work on repeated rows.
            for (int c = 0; c < cols; ++c) dot_block<A, kRowBlock, 1>(wr, xr + c, len, y + c);
          }
          for (int c = 0; c < cols; ++c) {
            for (int r = 0; r < kRowBlock; ++r) acc[(i0 + c) * kRowBlock + r] += y[c][r];
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        const A bias_v = bp != nullptr ? static_cast<A>(bp[n0 + r]) : A(0);
        for (int64_t i = 0; i < m; ++i) {
          op[i * n + n0 + r] = static_cast<T>(acc[i * kRowBlock + r] + bias_v);
        }
      }
    }
  });
}

template <typename T>
void linear_backward_impl(const at::Tensor& grad, const QWeight& w, const at::Tensor& grad_input) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using V = at::vec::Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t n = w.n, k = w.k, m = grad.size(0);
  const at::Tensor ga = grad.to(acc_type<A>()).contiguous();
  const A* gp = ga.const_data_ptr<A>();
  T* op = grad_input.mutable_data_ptr<T>();
  // grad_input [m, k] = grad [m, n] @ W [n, k]. Tasks own kColTile columns: each walks the n
  // weight rows in order, decoding only its columns, and accumulates
  // acc[i, :] += grad[i, r] * W[r, cols] in a thread-local [m, kColTile] buffer, so every
  // element sums its n terms in the same order whatever the thread count.
  const int64_t grain = work_grain(n * kColTile * (m + 1));
  at::parallel_for(0, (k + kColTile - 1) / kColTile, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> wrow(kColTile), acc(m * kColTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k0 = t * kColTile, cols = std::min(kColTile, k - k0);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t r = 0; r < n; ++r) {
        decode_row<A>(w, r, wrow.data(), k0, k0 + cols);
        for (int64_t i = 0; i < m; ++i) {
          const V g(gp[i * n + r]);
          A* a = acc.data() + i * kColTile;
          int64_t j = 0;
          for (; j + L <= cols; j += L) {
            at::vec::fmadd(g, V::loadu(wrow.data() + j), V::loadu(a + j)).store(a + j);
          }
          if (j < cols) {
            at::vec::fmadd(g, V::loadu(wrow.data() + j, cols - j), V::loadu(a + j, cols - j))
                .store(a + j, cols - j);
          }
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < cols; ++j)
          op[i * k + k0 + j] = static_cast<T>(acc[i * kColTile + j]);
      }
    }
  });
}

}  // namespace

void quant_dequantize(const QWeight& w, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "quant_dequantize",
                                  [&] { dequantize_impl<scalar_t>(w, out); });
}

void quant_linear(const at::Tensor& x, const QWeight& w, const at::Tensor& bias,
                  const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quant_linear",
                                  [&] { linear_impl<scalar_t>(x, w, bias, out); });
}

void quant_linear_backward(const at::Tensor& grad, const QWeight& w, const at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "quant_linear_backward",
                                  [&] { linear_backward_impl<scalar_t>(grad, w, grad_input); });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
