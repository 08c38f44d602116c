// Flash attention: forward with an online softmax over key tiles, and a backward that recomputes
// P = exp(S - lse) from the saved log-sum-exp, split into a dQ kernel (parallel over query rows)
// and a dK/dV kernel (parallel over keys): each threadgroup owns the rows it writes, so there are
// no float atomics and the results do not depend on scheduling.
//
// fwd, bwd_dq and bwd_dkdv share one shape. A threadgroup holds `owners` vectors (query rows, or
// keys), one per simdgroup, in threadgroup memory, and streams tiles of `tile` items (keys, or
// query rows) through it. Lane l of a simdgroup scores item l % tile against its owner; with tile <
// 32 the 32 / tile lanes of one item each sum every (32 / tile)-th column and simd_shuffle_xor adds
// the parts. The accumulators (out, dq, dk, dv) are rows of the owner: lane l keeps columns
// l, l + 32, ... in registers, and adds the tile's weights times the tile's rows (column reads
// across lanes are consecutive). Everything is float32.
//
// GQA: the G = Hq / Hkv query heads of one KV head are packed into one row space of G * Lq rows
// (row r is query i = r % Lq of head hk * G + r / Lq), so every K/V tile a forward or dQ
// threadgroup loads serves all of its rows, and a dK/dV threadgroup walks the rows of all G heads.
//
// Visibility matches the CPU kernel (csrc/attention/attention.h): keys [lo(i), hi(i)) from the
// causal flag and the window, then a bool mask hides keys and an additive mask is added to the
// scaled score. The forward visits only the key range its rows can see; so does the backward,
// unless the pre-pass found a NaN or Inf in q, k, v, grad_out, D or lse: then every key is
// visited (P is exactly 0 where a key is hidden), so the non-finite value reaches exactly the
// gradients the unblocked formula dS = P (dO V^T - D) gives it (0 * NaN), as on the CPU.
#include <metal_stdlib>

#include "attention.h"
#include "common/utils.h"

using namespace metal;
using metalcore::kSimdWidth;
using metalcore::attention_k::kCausal;
using metalcore::attention_k::kGradLse;
using metalcore::attention_k::kMaskAdd;
using metalcore::attention_k::kMaskBool;
using metalcore::attention_k::kSlots;
using metalcore::attention_k::kSmemFloats;
using metalcore::attention_k::Params;

// The visible key range [lo, hi) of query i (empty when lo >= hi).
inline long2 key_range(constant Params& p, long i) {
  const long shift = long(p.lk) - long(p.lq);  // bottom-right alignment of the window
  const long lo = p.window_left < 0 ? 0 : max(0L, i + shift - long(p.window_left));
  long hi = long(p.lk);
  if ((p.flags & kCausal) != 0) hi = min(hi, i + 1);  // top-left, as F.sdpa
  if (p.window_right >= 0) hi = min(hi, max(0L, i + shift + long(p.window_right) + 1));
  return long2(lo, hi);
}

// Whether key j is visible to query i of head (b, h), and the additive mask's value there.
template <typename T>
inline bool visible(constant Params& p, device const uchar* mask_bool, device const T* mask_add,
                    uint b, uint h, long i, long j, long2 range, thread float& bias) {
  bias = 0.0f;
  if (j < range.x || j >= range.y) return false;
  const ulong at = ulong(b) * p.m_sb + ulong(h) * p.m_sh + ulong(i) * p.m_si + ulong(j) * p.m_sj;
  if ((p.flags & kMaskBool) != 0) return mask_bool[at] != 0;
  if ((p.flags & kMaskAdd) != 0) bias = float(mask_add[at]);
  return true;
}

// Dot product of an owner vector with an item row (both n floats in threadgroup memory), split
// over the 32 / tile lanes of one item and added up across them: every lane of the item returns
// the full sum. `ok` is false for lanes past the tile's items; all lanes run the shuffles.
inline float tile_dot(threadgroup const float* x, threadgroup const float* y, uint n, uint lane,
                      uint tile, bool ok) {
  const uint parts = kSimdWidth / tile;
  float s = 0.0f;
  if (ok) {
    for (uint c = lane / tile; c < n; c += parts) s += x[c] * y[c];
  }
  for (uint off = tile; off < kSimdWidth; off <<= 1) s += simd_shuffle_xor(s, ushort(off));
  return s;
}

// Copies `count` rows of n elements (row i at src + i * stride) into dst (row stride ld) as float.
template <typename T>
inline void load_rows(threadgroup float* dst, uint ld, device const T* src, ulong stride,
                      uint count, uint n, uint tid, uint tpg) {
  for (uint x = tid; x < count * n; x += tpg) {
    const uint r = x / n, c = x % n;
    dst[r * ld + c] = float(src[ulong(r) * stride + c]);
  }
}

// NaN-propagating max over the simdgroup (simd_max would drop a NaN).
inline float simd_max_nan(float s) { return simd_any(isnan(s)) ? NAN : simd_max(s); }

// Forward. Grid: (row blocks of `owners` packed rows, batch * kv_heads). Threadgroup memory: the
// owners' q rows (d), a tile of K rows (stride d | 1, read across keys) and V rows (dv).
template <typename T>
[[kernel]] void attention_fwd(
    device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]], device const uchar* mask_bool [[buffer(3)]],
    device const T* mask_add [[buffer(4)]], device T* out [[buffer(5)]],
    device float* lse [[buffer(6)]], constant Params& p [[buffer(7)]],
    device float* part [[buffer(8)]], uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]], uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float smem[kSmemFloats];
  const uint d = p.d, dv = p.dv, tile = p.tile, ldk = d | 1u;
  const uint n_rows = p.group * p.lq, r0 = tg.x * p.owners;
  const uint b = tg.y / p.kv_heads, hk = tg.y % p.kv_heads;
  threadgroup float* qs = smem;
  threadgroup float* ks = qs + p.owners * d;
  threadgroup float* vs = ks + tile * ldk;

  // The owners' q rows, and the union of their visible key ranges (the tiles to visit).
  long jlo = long(p.lk), jhi = 0;
  for (uint r = 0; r < p.owners && r0 + r < n_rows; ++r) {
    const uint h = hk * p.group + (r0 + r) / p.lq, i = (r0 + r) % p.lq;
    load_rows(qs + r * d, d, q + ulong(b) * p.q_sb + ulong(h) * p.q_sh + ulong(i) * p.q_si, 0, 1, d,
              tid, tpg);
    const long2 rg = key_range(p, long(i));
    if (rg.x < rg.y) {
      jlo = min(jlo, rg.x);
      jhi = max(jhi, rg.y);
    }
  }
  if (p.splits > 1) {
    // Split z of the range, in whole tiles (possibly empty: its partial then says so, m = -inf).
    const long splits = long(p.splits);
    const long span = max(0L, jhi - jlo);
    const long chunk = ((span + splits - 1) / splits + long(tile) - 1) / long(tile) * long(tile);
    const long a = jlo + long(tg.z) * chunk;
    jhi = min(jhi, a + chunk);
    jlo = a;
  }
  const uint row = r0 + sg;
  const bool active = row < n_rows;  // uniform per simdgroup
  const uint h = hk * p.group + row / p.lq, i = row % p.lq;
  const long2 range = key_range(p, long(i));
  const uint key = lane % tile;
  float acc[kSlots];
  for (uint t = 0; t < kSlots; ++t) acc[t] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  device const T* kb = k + ulong(b) * p.k_sb + ulong(hk) * p.k_sh;
  device const T* vb = v + ulong(b) * p.v_sb + ulong(hk) * p.v_sh;

  for (long j0 = jlo; j0 < jhi; j0 += tile) {
    const uint nk = uint(min(long(tile), jhi - j0));
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile is consumed
    load_rows(ks, ldk, kb + ulong(j0) * p.k_sj, p.k_sj, nk, d, tid, tpg);
    load_rows(vs, dv, vb + ulong(j0) * p.v_sj, p.v_sj, nk, dv, tid, tpg);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (!active) continue;
    const long j = j0 + long(key);
    float s = tile_dot(qs + sg * d, ks + key * ldk, d, lane, tile, key < nk);
    float bias = 0.0f;
    const bool vis = key < nk && visible(p, mask_bool, mask_add, b, h, long(i), j, range, bias);
    s = vis ? s * p.scale + bias : -INFINITY;
    const float m_blk = simd_max_nan(s);
    const float m_new = (isnan(m_blk) || isnan(m)) ? m_blk + m : max(m, m_blk);
    if (m_new == -INFINITY) continue;  // nothing visible yet: the row stays empty
    // m = -inf: nothing accumulated yet (exp(-inf - (-inf)) would be NaN).
    const float alpha = m == -INFINITY ? 0.0f : precise::exp(m - m_new);
    const float pr = vis ? precise::exp(s - m_new) : 0.0f;
    l = alpha * l + simd_sum(lane < tile ? pr : 0.0f);
    for (uint t = 0; t < kSlots; ++t) acc[t] *= alpha;
    for (uint kk = 0; kk < nk; ++kk) {
      const float pk = simd_shuffle(pr, ushort(kk));
      for (uint t = 0; t < kSlots; ++t) {
        const uint c = lane + t * kSimdWidth;
        if (c < dv) acc[t] += pk * vs[kk * dv + c];
      }
    }
    m = m_new;
  }
  if (!active) return;
  const ulong o_row = (ulong(b) * p.q_heads + h) * p.lq + i;
  if (p.splits > 1) {  // partial [split][row][m, l, out...] for attention_merge
    const ulong total_rows = ulong(p.batch) * p.q_heads * p.lq;
    device float* pr = part + (ulong(tg.z) * total_rows + o_row) * (dv + 2);
    if (lane == 0) {
      pr[0] = m;
      pr[1] = l;
    }
    for (uint t = 0; t < kSlots; ++t) {
      const uint c = lane + t * kSimdWidth;
      if (c < dv) pr[2 + c] = acc[t];
    }
    return;
  }
  const bool empty = m == -INFINITY;  // no visible key: out 0, lse +inf (the backward's P is 0)
  const float inv = empty ? 0.0f : 1.0f / l;
  for (uint t = 0; t < kSlots; ++t) {
    const uint c = lane + t * kSimdWidth;
    if (c < dv) out[o_row * dv + c] = T(acc[t] * inv);
  }
  if (lane == 0) lse[o_row] = empty ? INFINITY : m + precise::log(l);
}

// Split-K merge: out and lse of one query row from the splits' partials, one thread per output
// column (grid x: max(dv, 1), y: rows); each thread combines the splits' (m, l) itself.
template <typename T>
[[kernel]] void attention_merge(device const float* part [[buffer(0)]], device T* out [[buffer(1)]],
                                device float* lse [[buffer(2)]], constant Params& p [[buffer(3)]],
                                uint2 pos [[thread_position_in_grid]]) {
  const uint c = pos.x, row = pos.y, dv = p.dv;
  const ulong total_rows = ulong(p.batch) * p.q_heads * p.lq;
  if (row >= total_rows || c >= max(dv, 1u)) return;
  const ulong width = dv + 2, stride = total_rows * width;
  device const float* pr = part + ulong(row) * width;
  float m = -INFINITY;
  bool nan_seen = false;
  for (uint z = 0; z < p.splits; ++z) {
    const float mz = pr[z * stride];
    nan_seen |= isnan(mz);
    m = max(m, mz);
  }
  if (nan_seen) m = NAN;
  if (m == -INFINITY) {  // no split saw a key: out 0, lse +inf, as without splits
    if (c < dv) out[ulong(row) * dv + c] = T(0.0f);
    if (c == 0) lse[row] = INFINITY;
    return;
  }
  float l = 0.0f, a = 0.0f;
  for (uint z = 0; z < p.splits; ++z) {
    device const float* pz = pr + z * stride;
    if (pz[0] == -INFINITY) continue;  // an empty split (its acc and l are 0)
    const float e = precise::exp(pz[0] - m);
    l += pz[1] * e;
    if (c < dv) a += pz[2 + c] * e;
  }
  if (c < dv) out[ulong(row) * dv + c] = T(a * (1.0f / l));
  if (c == 0) lse[row] = m + precise::log(l);
}

// Whether any of the n elements at x is NaN or Inf.
template <typename T>
inline bool any_nonfinite(device const T* x, uint n) {
  bool bad = false;
  for (uint c = 0; c < n; ++c) bad |= !isfinite(float(x[c]));
  return bad;
}

// Backward pre-pass, one thread per row of grid row y:
//   y = 0: D = rowsum(grad_out * out) - grad_lse per query row (grad_out, D and lse checked)
//   y = 1, 2, 3: the rows of q, k and v checked.
// Any NaN or Inf sets *dense (integer atomic, so concurrent stores of 1 are well defined): the
// dQ and dK/dV kernels then visit every key and row instead of the visible tiles only.
template <typename T>
[[kernel]] void attention_delta(device const T* grad_out [[buffer(0)]],
                                device const T* out [[buffer(1)]],
                                device const float* grad_lse [[buffer(2)]],
                                device float* delta [[buffer(3)]], constant Params& p [[buffer(4)]],
                                device const T* q [[buffer(5)]], device const T* k [[buffer(6)]],
                                device const T* v [[buffer(7)]],
                                device const float* lse [[buffer(8)]],
                                device atomic_uint* dense [[buffer(9)]],
                                uint2 pos [[thread_position_in_grid]]) {
  const uint row = pos.x, n_rows = p.batch * p.q_heads * p.lq;
  const uint kv_rows = p.batch * p.kv_heads * p.lk;
  bool bad = false;
  if (pos.y == 0 || pos.y == 1) {
    if (row >= n_rows) return;
    const uint i = row % p.lq, bh = row / p.lq, h = bh % p.q_heads, b = bh / p.q_heads;
    if (pos.y == 1) {
      bad = any_nonfinite(q + ulong(b) * p.q_sb + ulong(h) * p.q_sh + ulong(i) * p.q_si, p.d);
    } else {
      device const T* g = grad_out + ulong(b) * p.g_sb + ulong(h) * p.g_sh + ulong(i) * p.g_si;
      device const T* o = out + ulong(b) * p.o_sb + ulong(h) * p.o_sh + ulong(i) * p.o_si;
      float s = 0.0f;
      for (uint c = 0; c < p.dv; ++c) s += float(g[c]) * float(o[c]);
      if ((p.flags & kGradLse) != 0) s -= grad_lse[row];
      delta[row] = s;
      bad = !isfinite(s) || isnan(lse[row]) || lse[row] == -INFINITY || any_nonfinite(g, p.dv);
    }
  } else {
    if (row >= kv_rows) return;
    const uint j = row % p.lk, bh = row / p.lk, hk = bh % p.kv_heads, b = bh / p.kv_heads;
    bad = pos.y == 2
              ? any_nonfinite(k + ulong(b) * p.k_sb + ulong(hk) * p.k_sh + ulong(j) * p.k_sj, p.d)
              : any_nonfinite(v + ulong(b) * p.v_sb + ulong(hk) * p.v_sh + ulong(j) * p.v_sj, p.dv);
  }
  if (bad) atomic_store_explicit(dense, 1u, memory_order_relaxed);
}

// dQ: grid and owners as the forward; every key tile. Threadgroup memory: the owners' q (d) and
// grad_out (dv) rows, a tile of K (stride d | 1) and V (stride dv | 1) rows.
//   P = exp(scale q.k + bias - lse), dS = P (dO.v - D), dq = scale sum_j dS_j k_j
template <typename T>
[[kernel]] void attention_bwd_dq(
    device const T* grad_out [[buffer(0)]], device const T* q [[buffer(1)]],
    device const T* k [[buffer(2)]], device const T* v [[buffer(3)]],
    device const float* lse [[buffer(4)]], device const float* delta [[buffer(5)]],
    device const uchar* mask_bool [[buffer(6)]], device const T* mask_add [[buffer(7)]],
    device T* dq [[buffer(8)]], constant Params& p [[buffer(9)]],
    device const uint* dense [[buffer(10)]], uint2 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]], uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float smem[kSmemFloats];
  const uint d = p.d, dv = p.dv, tile = p.tile, ldk = d | 1u, ldv = dv | 1u;
  const uint n_rows = p.group * p.lq, r0 = tg.x * p.owners;
  const uint b = tg.y / p.kv_heads, hk = tg.y % p.kv_heads;
  threadgroup float* qs = smem;
  threadgroup float* gs = qs + p.owners * d;
  threadgroup float* ks = gs + p.owners * dv;
  threadgroup float* vs = ks + tile * ldk;

  // Every key when the pre-pass saw a non-finite value, else the union of the visible ranges.
  const bool all_keys = *dense != 0;
  long jlo = all_keys ? 0 : long(p.lk), jhi = all_keys ? long(p.lk) : 0;
  for (uint r = 0; r < p.owners && r0 + r < n_rows; ++r) {
    const uint h = hk * p.group + (r0 + r) / p.lq, i = (r0 + r) % p.lq;
    const long2 rg = key_range(p, long(i));
    if (!all_keys && rg.x < rg.y) {
      jlo = min(jlo, rg.x);
      jhi = max(jhi, rg.y);
    }
    load_rows(qs + r * d, d, q + ulong(b) * p.q_sb + ulong(h) * p.q_sh + ulong(i) * p.q_si, 0, 1, d,
              tid, tpg);
    load_rows(gs + r * dv, dv, grad_out + ulong(b) * p.g_sb + ulong(h) * p.g_sh + ulong(i) * p.g_si,
              0, 1, dv, tid, tpg);
  }
  const uint row = r0 + sg;
  const bool active = row < n_rows;
  const uint h = hk * p.group + row / p.lq, i = row % p.lq;
  const ulong o_row = (ulong(b) * p.q_heads + h) * p.lq + i;
  const float row_lse = active ? lse[o_row] : 0.0f;
  const float row_delta = active ? delta[o_row] : 0.0f;
  const long2 range = key_range(p, long(i));
  const uint key = lane % tile;
  float acc[kSlots];
  for (uint t = 0; t < kSlots; ++t) acc[t] = 0.0f;
  device const T* kb = k + ulong(b) * p.k_sb + ulong(hk) * p.k_sh;
  device const T* vb = v + ulong(b) * p.v_sb + ulong(hk) * p.v_sh;

  for (long jt = jlo; jt < jhi; jt += tile) {
    const uint j0 = uint(jt), nk = uint(min(long(tile), jhi - jt));
    threadgroup_barrier(mem_flags::mem_threadgroup);
    load_rows(ks, ldk, kb + ulong(j0) * p.k_sj, p.k_sj, nk, d, tid, tpg);
    load_rows(vs, ldv, vb + ulong(j0) * p.v_sj, p.v_sj, nk, dv, tid, tpg);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (!active) continue;
    const bool ok = key < nk;
    const float s = tile_dot(qs + sg * d, ks + key * ldk, d, lane, tile, ok);
    const float dp = tile_dot(gs + sg * dv, vs + key * ldv, dv, lane, tile, ok);
    float bias = 0.0f;
    const bool vis =
        ok && visible(p, mask_bool, mask_add, b, h, long(i), long(j0 + key), range, bias);
    const float pr = vis ? precise::exp(s * p.scale + bias - row_lse) : 0.0f;
    const float ds = ok ? pr * (dp - row_delta) : 0.0f;
    for (uint kk = 0; kk < nk; ++kk) {
      const float dk_ = simd_shuffle(ds, ushort(kk));
      for (uint t = 0; t < kSlots; ++t) {
        const uint c = lane + t * kSimdWidth;
        if (c < d) acc[t] += dk_ * ks[kk * ldk + c];
      }
    }
  }
  if (!active) return;
  for (uint t = 0; t < kSlots; ++t) {
    const uint c = lane + t * kSimdWidth;
    if (c < d) dq[o_row * d + c] = T(acc[t] * p.scale);
  }
}

// dK/dV: grid (key blocks of `owners` keys, batch * kv_heads); each threadgroup walks the G * Lq
// packed rows of its KV head in tiles. Threadgroup memory: the owners' k (d) and v (dv) rows, a
// tile of q (stride d | 1) and grad_out (stride dv | 1) rows, and the tile's lse and D.
//   dv_j = sum_r P_rj dO_r, dk_j = scale sum_r dS_rj q_r
template <typename T>
[[kernel]] void attention_bwd_dkdv(
    device const T* grad_out [[buffer(0)]], device const T* q [[buffer(1)]],
    device const T* k [[buffer(2)]], device const T* v [[buffer(3)]],
    device const float* lse [[buffer(4)]], device const float* delta [[buffer(5)]],
    device const uchar* mask_bool [[buffer(6)]], device const T* mask_add [[buffer(7)]],
    device T* dk [[buffer(8)]], device T* dv_out [[buffer(9)]], constant Params& p [[buffer(10)]],
    device const uint* dense [[buffer(11)]], uint2 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]], uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float smem[kSmemFloats];
  const uint d = p.d, dv = p.dv, tile = p.tile, ldq = d | 1u, ldg = dv | 1u;
  const uint n_rows = p.group * p.lq, j0 = tg.x * p.owners;
  const uint b = tg.y / p.kv_heads, hk = tg.y % p.kv_heads;
  threadgroup float* ko = smem;
  threadgroup float* vo = ko + p.owners * d;
  threadgroup float* qs = vo + p.owners * dv;
  threadgroup float* gs = qs + tile * ldq;
  threadgroup float* ls = gs + tile * ldg;  // lse of the tile's rows
  threadgroup float* ds_ = ls + tile;       // D of the tile's rows

  device const T* kb = k + ulong(b) * p.k_sb + ulong(hk) * p.k_sh;
  device const T* vb = v + ulong(b) * p.v_sb + ulong(hk) * p.v_sh;
  const uint n_keys = min(p.owners, p.lk - min(p.lk, j0));
  load_rows(ko, d, kb + ulong(j0) * p.k_sj, p.k_sj, n_keys, d, tid, tpg);
  load_rows(vo, dv, vb + ulong(j0) * p.v_sj, p.v_sj, n_keys, dv, tid, tpg);
  const uint j = j0 + sg;
  const bool active = j < p.lk;  // uniform per simdgroup
  const uint item = lane % tile;
  float acc_k[kSlots], acc_v[kSlots];
  for (uint t = 0; t < kSlots; ++t) acc_k[t] = acc_v[t] = 0.0f;

  const bool all_rows = *dense != 0;  // the pre-pass saw a non-finite value
  for (uint r0 = 0; r0 < n_rows; r0 += tile) {
    const uint nr = min(tile, n_rows - r0);
    // A tile none of whose rows sees one of this threadgroup's keys adds exactly zero: skipped
    // (by every thread alike, so the barriers stay uniform).
    bool needed = all_rows;
    for (uint r = 0; r < nr && !needed; ++r) {
      const long2 rg = key_range(p, long((r0 + r) % p.lq));
      needed = rg.x < rg.y && rg.x < long(j0 + n_keys) && rg.y > long(j0);
    }
    if (!needed) continue;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint x = tid; x < nr * d; x += tpg) {
      const uint r = x / d, c = x % d;
      const uint h = hk * p.group + (r0 + r) / p.lq, i = (r0 + r) % p.lq;
      qs[r * ldq + c] = float(q[ulong(b) * p.q_sb + ulong(h) * p.q_sh + ulong(i) * p.q_si + c]);
    }
    for (uint x = tid; x < nr * dv; x += tpg) {
      const uint r = x / dv, c = x % dv;
      const uint h = hk * p.group + (r0 + r) / p.lq, i = (r0 + r) % p.lq;
      gs[r * ldg + c] =
          float(grad_out[ulong(b) * p.g_sb + ulong(h) * p.g_sh + ulong(i) * p.g_si + c]);
    }
    for (uint r = tid; r < nr; r += tpg) {
      const uint h = hk * p.group + (r0 + r) / p.lq, i = (r0 + r) % p.lq;
      const ulong o_row = (ulong(b) * p.q_heads + h) * p.lq + i;
      ls[r] = lse[o_row];
      ds_[r] = delta[o_row];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (!active) continue;
    const bool ok = item < nr;
    const float s = tile_dot(ko + sg * d, qs + item * ldq, d, lane, tile, ok);
    const float dp = tile_dot(vo + sg * dv, gs + item * ldg, dv, lane, tile, ok);
    float pr = 0.0f, ds = 0.0f;
    if (ok) {
      const uint r = r0 + item, h = hk * p.group + r / p.lq, i = r % p.lq;
      float bias = 0.0f;
      const bool vis =
          visible(p, mask_bool, mask_add, b, h, long(i), long(j), key_range(p, long(i)), bias);
      pr = vis ? precise::exp(s * p.scale + bias - ls[item]) : 0.0f;
      ds = pr * (dp - ds_[item]);
    }
    for (uint rr = 0; rr < nr; ++rr) {
      const float pk = simd_shuffle(pr, ushort(rr));
      const float dk_ = simd_shuffle(ds, ushort(rr));
      for (uint t = 0; t < kSlots; ++t) {
        const uint c = lane + t * kSimdWidth;
        if (c < dv) acc_v[t] += pk * gs[rr * ldg + c];
        if (c < d) acc_k[t] += dk_ * qs[rr * ldq + c];
      }
    }
  }
  if (!active) return;
  const ulong k_row = (ulong(b) * p.kv_heads + hk) * p.lk + j;
  for (uint t = 0; t < kSlots; ++t) {
    const uint c = lane + t * kSimdWidth;
    if (c < d) dk[k_row * d + c] = T(acc_k[t] * p.scale);
    if (c < dv) dv_out[k_row * dv + c] = T(acc_v[t]);
  }
}

#define METALCORE_ATTENTION_INSTANTIATE(T, tok)                                                \
  template [[host_name(METALCORE_HOST_NAME(attention, fwd, tok))]] [[kernel]] void             \
  attention_fwd<T>(device const T*, device const T*, device const T*, device const uchar*,     \
                   device const T*, device T*, device float*, constant Params&, device float*, \
                   uint3, uint, uint, uint, uint);                                             \
  template [[host_name(METALCORE_HOST_NAME(attention, merge, tok))]] [[kernel]] void           \
  attention_merge<T>(device const float*, device T*, device float*, constant Params&, uint2);  \
  template [[host_name(METALCORE_HOST_NAME(attention, delta, tok))]] [[kernel]] void           \
  attention_delta<T>(device const T*, device const T*, device const float*, device float*,     \
                     constant Params&, device const T*, device const T*, device const T*,      \
                     device const float*, device atomic_uint*, uint2);                         \
  template [[host_name(METALCORE_HOST_NAME(attention, bwd_dq, tok))]] [[kernel]] void          \
  attention_bwd_dq<T>(device const T*, device const T*, device const T*, device const T*,      \
                      device const float*, device const float*, device const uchar*,           \
                      device const T*, device T*, constant Params&, device const uint*, uint2, \
                      uint, uint, uint, uint);                                                 \
  template [[host_name(METALCORE_HOST_NAME(attention, bwd_dkdv, tok))]] [[kernel]] void        \
  attention_bwd_dkdv<T>(device const T*, device const T*, device const T*, device const T*,    \
                        device const float*, device const float*, device const uchar*,         \
                        device const T*, device T*, device T*, constant Params&,               \
                        device const uint*, uint2, uint, uint, uint, uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_ATTENTION_INSTANTIATE)
