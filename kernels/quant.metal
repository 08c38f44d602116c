// Weight-only quantized matmul: dequantize, matrix-vector ("gemv", few activation rows), tiled
// matrix-matrix ("gemm") and the backward's grad_input = grad @ W ("bwd", the tiled kernel with
// the weight tile read untransposed). dequantize and gemv are instantiated per (format, dtype):
// the format is a template constant, so their decode, which is their whole cost, is
// straight-line code. The tiled kernels decode one run per thread per 32-wide reduction step
// and spend the rest on 8 x 8 matrix products, so they take the format at run time (a uniform
// switch) and are instantiated per dtype only.
//
// The building block is decode_run: weights k .. k+7 of one row as floats, exactly as the CPU
// kernels (csrc/quant/quant_cpu_kernel.cpp) decode them: the GGUF products are exact in float
// (or, for Q6_K, rounded in the same order), the affine s * q + b is one fused multiply-add, as
// the CPU's vector decode computes it. All accumulation is float.
#include <metal_stdlib>

#include "common/utils.h"
#include "quant.h"

using namespace metal;
using metalcore::kSimdWidth;
using metalcore::quant_k::kGemvMaxRows;
using metalcore::quant_k::kGemvRowsPerSimd;
using metalcore::quant_k::kGemvSimds;
using metalcore::quant_k::kHasBias;
using metalcore::quant_k::kInt4;
using metalcore::quant_k::kInt8;
using metalcore::quant_k::kParamBFloat;
using metalcore::quant_k::kParamFloat;
using metalcore::quant_k::kParamHalf;
using metalcore::quant_k::kQ4_0;
using metalcore::quant_k::kQ4_K;
using metalcore::quant_k::kQ6_K;
using metalcore::quant_k::kQ8_0;
using metalcore::quant_k::kRun;
using metalcore::quant_k::kTile;
using metalcore::quant_k::kTileThreads;
using metalcore::quant_k::Params;

// An fp16 field of a GGUF block, read bytewise: blocks are only 2-byte aligned, and a uint8
// tensor may start at any byte of its buffer.
inline float half_at(device const uchar* p) {
  return float(as_type<half>(ushort(ushort(p[0]) | (ushort(p[1]) << 8))));
}

inline float signed_byte(uchar v) { return float(as_type<char>(v)); }

// Element i of an affine scales / biases row, stored as float, half or bfloat.
inline float param_at(device const uchar* row, uint i, uint dtype) {
  if (dtype == kParamHalf) return float(reinterpret_cast<device const half*>(row)[i]);
  if (dtype == kParamBFloat) return float(reinterpret_cast<device const bfloat*>(row)[i]);
  return reinterpret_cast<device const float*>(row)[i];
}

// Bytes of one row of scales (or biases) of an affine format.
inline ulong param_row_bytes(constant Params& p) {
  return ulong(p.k / p.group) * (p.param_dtype == kParamFloat ? 4 : 2);
}

// Weights k .. k + kRun - 1 (k a multiple of kRun) of the weight row whose bytes start at q
// (affine formats: s and b are that row's scales and biases) into w.
template <int F>
inline void decode_run(device const uchar* q, device const uchar* s, device const uchar* b, uint k,
                       constant Params& p, thread float* w) {
  switch (F) {
    case kInt4: {
      // Byte k/2 + i holds k + 2i (low nibble) and k + 2i + 1 (high nibble).
      const float sc = param_at(s, k / p.group, p.param_dtype);
      const float bi = param_at(b, k / p.group, p.param_dtype);
      device const uchar* c = q + k / 2;
      for (uint i = 0; i < kRun / 2; ++i) {
        w[2 * i] = fma(sc, float(c[i] & 0xF), bi);
        w[2 * i + 1] = fma(sc, float(c[i] >> 4), bi);
      }
      break;
    }
    case kInt8: {
      const float sc = param_at(s, k / p.group, p.param_dtype);
      const float bi = param_at(b, k / p.group, p.param_dtype);
      for (uint i = 0; i < kRun; ++i) w[i] = fma(sc, float(q[k + i]), bi);
      break;
    }
    case kQ4_0: {
      // fp16 d, then 16 bytes: byte j holds element j (low nibble) and j + 16 (high nibble).
      device const uchar* blk = q + ulong(k / 32) * 18;
      const float d = half_at(blk);
      const uint j = k % 32;
      const uint shift = j < 16 ? 0 : 4;
      device const uchar* c = blk + 2 + (j % 16);
      for (uint i = 0; i < kRun; ++i) w[i] = d * float(int((c[i] >> shift) & 0xF) - 8);
      break;
    }
    case kQ8_0: {
      device const uchar* blk = q + ulong(k / 32) * 34;
      const float d = half_at(blk);
      device const uchar* c = blk + 2 + k % 32;
      for (uint i = 0; i < kRun; ++i) w[i] = d * signed_byte(c[i]);
      break;
    }
    case kQ4_K: {
      // d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles: sub-block j
      // (32 weights) is the low (even j) or high (odd j) nibbles of qs[32 (j / 2) ...].
      device const uchar* blk = q + ulong(k / 256) * 144;
      const uint idx = k % 256, j = idx / 32, l = idx % 32;
      device const uchar* sc = blk + 4;
      uint scale, mn;
      if (j < 4) {
        scale = sc[j] & 63;
        mn = sc[j + 4] & 63;
      } else {
        scale = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
        mn = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
      }
      const float ds = half_at(blk) * float(scale), dm = half_at(blk + 2) * float(mn);
      device const uchar* c = blk + 16 + 32 * (j / 2) + l;
      const uint shift = 4 * (j % 2);
      // ds * q is exact in float, so a contracted fma gives the same value.
      for (uint i = 0; i < kRun; ++i) w[i] = ds * float((c[i] >> shift) & 0xF) - dm;
      break;
    }
    case kQ6_K: {
      // ql[128] low 4 bits, qh[64] high 2 bits, 16 int8 scales (one per 16 weights), fp16 d.
      // In half h (128 weights), weight 32 r + l takes the low (r < 2) or high nibble of
      // ql[64 h + l + 32 (r % 2)] and bits 2r, 2r + 1 of qh[32 h + l].
      device const uchar* blk = q + ulong(k / 256) * 210;
      const uint idx = k % 256, h = idx / 128, r = (idx % 128) / 32, l = idx % 32;
      // (d * scale) * q in that order, as the CPU computes it (the product can round).
      const float ds = half_at(blk + 208) * signed_byte(blk[192 + 8 * h + 2 * r + l / 16]);
      device const uchar* lo = blk + 64 * h + 32 * (r % 2) + l;
      device const uchar* hi = blk + 128 + 32 * h + l;
      const uint lshift = 4 * (r / 2), hshift = 2 * r;
      for (uint i = 0; i < kRun; ++i) {
        const int v = int(((lo[i] >> lshift) & 0xF) | (((hi[i] >> hshift) & 3) << 4)) - 32;
        w[i] = ds * float(v);
      }
      break;
    }
  }
}

// decode_run for a format known only at run time (uniform across the threadgroup).
inline void decode_run_any(uint format, device const uchar* q, device const uchar* s,
                           device const uchar* b, uint k, constant Params& p, thread float* w) {
  switch (format) {
    case kInt4:
      decode_run<kInt4>(q, s, b, k, p, w);
      break;
    case kInt8:
      decode_run<kInt8>(q, s, b, k, p, w);
      break;
    case kQ4_0:
      decode_run<kQ4_0>(q, s, b, k, p, w);
      break;
    case kQ8_0:
      decode_run<kQ8_0>(q, s, b, k, p, w);
      break;
    case kQ4_K:
      decode_run<kQ4_K>(q, s, b, k, p, w);
      break;
    default:
      decode_run<kQ6_K>(q, s, b, k, p, w);
      break;
  }
}

// out [n, k] = W in the output dtype: one thread per run of kRun weights.
template <typename T, int F>
[[kernel]] void quant_dequantize(device const uchar* data [[buffer(0)]],
                                 device const uchar* scales [[buffer(1)]],
                                 device const uchar* biases [[buffer(2)]],
                                 device T* out [[buffer(3)]], constant Params& p [[buffer(4)]],
                                 uint2 gid [[thread_position_in_grid]]) {
  if (gid.x >= p.k / kRun || gid.y >= p.n) return;
  const ulong pb = param_row_bytes(p);
  float w[kRun];
  decode_run<F>(data + gid.y * p.row_bytes, scales + gid.y * pb, biases + gid.y * pb, gid.x * kRun,
                p, w);
  device T* o = out + ulong(gid.y) * p.k + gid.x * kRun;
  for (uint i = 0; i < kRun; ++i) o[i] = T(w[i]);
}

// out [m, n] = x [m, k] @ W^T (+ bias) for m <= kGemvMaxRows. Each simdgroup owns
// kGemvRowsPerSimd weight rows; lane l decodes runs l, l + 32, ... of each into registers once
// and applies them to every activation row, then one simd_sum per output. Weight rows past n
// are never read (their accumulators stay zero and are not stored).
template <typename T, int F>
[[kernel]] void quant_gemv(device const T* x [[buffer(0)]], device const uchar* data [[buffer(1)]],
                           device const uchar* scales [[buffer(2)]],
                           device const uchar* biases [[buffer(3)]],
                           device const T* bias [[buffer(4)]], device T* out [[buffer(5)]],
                           constant Params& p [[buffer(6)]],
                           uint tg [[threadgroup_position_in_grid]],
                           uint lane [[thread_index_in_simdgroup]],
                           uint sg [[simdgroup_index_in_threadgroup]]) {
  const uint row0 = (tg * kGemvSimds + sg) * kGemvRowsPerSimd;
  const ulong pb = param_row_bytes(p);
  float acc[kGemvMaxRows][kGemvRowsPerSimd];
  for (uint i = 0; i < kGemvMaxRows; ++i) {
    for (uint r = 0; r < kGemvRowsPerSimd; ++r) acc[i][r] = 0.0f;
  }
  for (uint k = lane * kRun; k < p.k; k += kSimdWidth * kRun) {
    float w[kGemvRowsPerSimd][kRun];
    for (uint r = 0; r < kGemvRowsPerSimd; ++r) {
      const uint row = row0 + r;
      if (row < p.n) {
        decode_run<F>(data + row * p.row_bytes, scales + row * pb, biases + row * pb, k, p, w[r]);
      } else {
        for (uint i = 0; i < kRun; ++i) w[r][i] = 0.0f;
      }
    }
    for (uint i = 0; i < p.m; ++i) {
      device const T* xr = x + ulong(i) * p.k + k;
      float xv[kRun];
      for (uint j = 0; j < kRun; ++j) xv[j] = float(xr[j]);
      for (uint r = 0; r < kGemvRowsPerSimd; ++r) {
        float s = acc[i][r];
        for (uint j = 0; j < kRun; ++j) s = fma(xv[j], w[r][j], s);
        acc[i][r] = s;
      }
    }
  }
  const bool has_bias = (p.flags & kHasBias) != 0;
  for (uint i = 0; i < p.m; ++i) {
    for (uint r = 0; r < kGemvRowsPerSimd; ++r) {
      const float s = simd_sum(acc[i][r]);
      const uint row = row0 + r;
      if (lane == 0 && row < p.n) {
        out[ulong(i) * p.n + row] = T(has_bias ? s + float(bias[row]) : s);
      }
    }
  }
}

// Tiled product with the weight dequantized into threadgroup memory, one kTile x kTile output
// tile per threadgroup (2 x 2 simdgroups of 16 x 16 outputs, 8 x 8 simdgroup matrices with
// float accumulators):
//   forward  (BWD false): out [m, n] = a [m, k] @ W^T (+ bias), reduction over k;
//   backward (BWD true):  out [m, k] = a [m, n] @ W, reduction over n (grad_input).
// Each reduction step stages an activation tile and a weight tile (kTile weight rows x kTile
// k, one decode_run per thread); the forward reads the weight tile transposed. Out-of-range
// rows and columns are staged as zeros and never read from memory or stored.
template <typename T, bool BWD>
[[kernel]] void quant_tiled(device const T* a [[buffer(0)]], device const uchar* data [[buffer(1)]],
                            device const uchar* scales [[buffer(2)]],
                            device const uchar* biases [[buffer(3)]],
                            device const T* bias [[buffer(4)]], device T* out [[buffer(5)]],
                            constant Params& p [[buffer(6)]],
                            uint2 tgp [[threadgroup_position_in_grid]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float as[kTile * kTile];  // as[i * kTile + c]: activation row i0 + i, column r0 + c
  threadgroup float ws[kTile * kTile];  // ws[r * kTile + c]: weight row, weight column (k)
  threadgroup float cs[kTile * kTile];  // the output tile, for the guarded store
  const uint red = BWD ? p.n : p.k;     // reduction length
  const uint cols = BWD ? p.k : p.n;    // output columns
  const uint i0 = tgp.y * kTile, j0 = tgp.x * kTile;
  const uint sm = sg / 2, sn = sg % 2;
  const ulong pb = param_row_bytes(p);
  // This thread's weight run in the tile: row wr, columns wc .. wc + kRun - 1.
  const uint wr = tid / (kTile / kRun), wc = (tid % (kTile / kRun)) * kRun;
  simdgroup_float8x8 acc[2][2];
  for (uint u = 0; u < 2; ++u) {
    for (uint v = 0; v < 2; ++v) acc[u][v] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  for (uint r0 = 0; r0 < red; r0 += kTile) {
    for (uint e = tid; e < kTile * kTile; e += kTileThreads) {
      const uint i = i0 + e / kTile, c = r0 + e % kTile;
      as[e] = (i < p.m && c < red) ? float(a[ulong(i) * red + c]) : 0.0f;
    }
    const uint wrow = BWD ? r0 + wr : j0 + wr;
    const uint wk = BWD ? j0 + wc : r0 + wc;
    float w[kRun];
    if (wrow < p.n && wk < p.k) {
      decode_run_any(p.format, data + wrow * p.row_bytes, scales + wrow * pb, biases + wrow * pb,
                     wk, p, w);
    } else {
      for (uint i = 0; i < kRun; ++i) w[i] = 0.0f;
    }
    for (uint i = 0; i < kRun; ++i) ws[wr * kTile + wc + i] = w[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < kTile; kk += 8) {
      simdgroup_float8x8 am[2], bm[2];
      for (uint u = 0; u < 2; ++u) simdgroup_load(am[u], as, kTile, ulong2(kk, 16 * sm + 8 * u));
      for (uint v = 0; v < 2; ++v) {
        if (BWD) {
          simdgroup_load(bm[v], ws, kTile, ulong2(16 * sn + 8 * v, kk));
        } else {
          // B[kk + r][j] = W[j0 + j][r0 + kk + r]: the tile's block read transposed.
          simdgroup_load(bm[v], ws, kTile, ulong2(kk, 16 * sn + 8 * v), true);
        }
      }
      for (uint u = 0; u < 2; ++u) {
        for (uint v = 0; v < 2; ++v)
          simdgroup_multiply_accumulate(acc[u][v], am[u], bm[v], acc[u][v]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint u = 0; u < 2; ++u) {
    for (uint v = 0; v < 2; ++v) {
      simdgroup_store(acc[u][v], cs, kTile, ulong2(16 * sn + 8 * v, 16 * sm + 8 * u));
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const bool has_bias = !BWD && (p.flags & kHasBias) != 0;
  for (uint e = tid; e < kTile * kTile; e += kTileThreads) {
    const uint i = i0 + e / kTile, j = j0 + e % kTile;
    if (i < p.m && j < cols) {
      out[ulong(i) * cols + j] = T(has_bias ? cs[e] + float(bias[j]) : cs[e]);
    }
  }
}

#define METALCORE_QUANT_INSTANTIATE_FORMAT(T, tok, F, fmt)                                         \
  template [[host_name(METALCORE_HOST_NAME(quant, dequantize_##fmt, tok))]] [[kernel]] void        \
  quant_dequantize<T, F>(device const uchar*, device const uchar*, device const uchar*, device T*, \
                         constant Params&, uint2);                                                 \
  template [[host_name(METALCORE_HOST_NAME(quant, gemv_##fmt, tok))]] [[kernel]] void              \
  quant_gemv<T, F>(device const T*, device const uchar*, device const uchar*, device const uchar*, \
                   device const T*, device T*, constant Params&, uint, uint, uint);

#define METALCORE_QUANT_INSTANTIATE(T, tok)                                                       \
  METALCORE_QUANT_INSTANTIATE_FORMAT(T, tok, kInt4, int4)                                         \
  METALCORE_QUANT_INSTANTIATE_FORMAT(T, tok, kInt8, int8)                                         \
  METALCORE_QUANT_INSTANTIATE_FORMAT(T, tok, kQ4_0, q4_0)                                         \
  METALCORE_QUANT_INSTANTIATE_FORMAT(T, tok, kQ8_0, q8_0)                                         \
  METALCORE_QUANT_INSTANTIATE_FORMAT(T, tok, kQ4_K, q4_k)                                         \
  METALCORE_QUANT_INSTANTIATE_FORMAT(T, tok, kQ6_K, q6_k)                                         \
  template [[host_name(METALCORE_HOST_NAME(quant, gemm, tok))]] [[kernel]] void                   \
  quant_tiled<T, false>(device const T*, device const uchar*, device const uchar*,                \
                        device const uchar*, device const T*, device T*, constant Params&, uint2, \
                        uint, uint);                                                              \
  template [[host_name(METALCORE_HOST_NAME(quant, bwd, tok))]] [[kernel]] void                    \
  quant_tiled<T, true>(device const T*, device const uchar*, device const uchar*,                 \
                       device const uchar*, device const T*, device T*, constant Params&, uint2,  \
                       uint, uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_QUANT_INSTANTIATE)
