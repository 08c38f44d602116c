// Attention family (attention, attention_backward): parameters and limits shared by
// attention.metal and the host launcher (csrc/attention/attention_launch.cpp).
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace attention_k {

// Head dims (of q/k and of v) up to this many elements: each lane keeps its columns of an
// accumulator row (out, dq, dk, dv) in kSlots registers.
METALCORE_CONSTEXPR unsigned kMaxHeadDim = 256;
METALCORE_CONSTEXPR unsigned kSlots = kMaxHeadDim / kSimdWidth;
// Threadgroup memory of every kernel, in floats (Metal's 32 KB): the owners' vectors and one tile
// of streamed items, laid out at run time from the head dims (attention_launch.cpp's tiling()).
METALCORE_CONSTEXPR unsigned kSmemFloats = 8192;
// At most this many owners (query rows or keys, one per simdgroup) per threadgroup.
METALCORE_CONSTEXPR unsigned kMaxOwners = 8;
// Forward split-K (decode, few query rows per KV head): the key range is split until about
// kTargetThreadgroups threadgroups run, each split at least kMinSplitKeys keys, at most
// kMaxSplits splits; float partials (m, l, unnormalised out) are merged by attention_merge.
METALCORE_CONSTEXPR unsigned kTargetThreadgroups = 128;
METALCORE_CONSTEXPR unsigned kMinSplitKeys = 128;
METALCORE_CONSTEXPR unsigned kMaxSplits = 32;

METALCORE_CONSTEXPR unsigned kCausal = 1;    // top-left causal (F.sdpa's is_causal)
METALCORE_CONSTEXPR unsigned kMaskBool = 2;  // buffer mask_bool: false hides the key
METALCORE_CONSTEXPR unsigned kMaskAdd = 4;   // buffer mask_add: added to the scaled score
METALCORE_CONSTEXPR unsigned kGradLse = 8;   // backward: grad_lse is bound

// Strides are in elements; q/k/v/grad_out/out have a unit stride on head_dim, the mask is the
// [B, Hq, Lq, Lk] broadcast view (stride 0 along broadcast dims).
struct Params {
  METALCORE_U64 q_sb, q_sh, q_si;
  METALCORE_U64 k_sb, k_sh, k_sj;
  METALCORE_U64 v_sb, v_sh, v_sj;
  METALCORE_U64 g_sb, g_sh, g_si;  // backward: grad_out
  METALCORE_U64 o_sb, o_sh, o_si;  // backward: out
  METALCORE_U64 m_sb, m_sh, m_si, m_sj;
  unsigned batch, q_heads, kv_heads, group;  // group = q_heads / kv_heads
  unsigned lq, lk, d, dv;
  int window_left, window_right;  // -1: unbounded
  unsigned flags;
  float scale;
  unsigned owners;  // query rows (forward, dq) or keys (dk/dv) per threadgroup, one per simdgroup
  unsigned tile;    // items (keys or query rows) per streamed tile: 32, 16 or 8
  unsigned splits;  // forward: key-range splits (grid z), merged by attention_merge when > 1
  unsigned pad0;
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 216);
#endif

}  // namespace attention_k
}  // namespace metalcore
