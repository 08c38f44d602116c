// embedding_bag forward and backward, float accumulation for every dtype. One thread per output
// element: (bag, column) in the forward and the argmax, (weight row, column) in the weight
// gradient, whose positions arrive sorted by row (the host sorts them stably), so each sum runs in
// index order with no atomics: deterministic. One thread per position for the per_sample_weights
// gradient (a dot product over the row).
#include <metal_stdlib>

#include "common/utils.h"
#include "embedding_bag.h"

using namespace metal;
using metalcore::embedding_bag_k::kMax;
using metalcore::embedding_bag_k::kMean;
using metalcore::embedding_bag_k::Params;

// Bag b's reduction of column col; torch's max rule: the first row sets, a later one replaces only
// when strictly greater (the first of equal values wins; a NaN, once taken, stays).
template <typename T>
inline float bag_reduce(device const T* w, device const long* idx, device const long* bnd,
                        device const T* psw, constant Params& p, ulong b, ulong col,
                        thread long& arg) {
  float acc = 0.0f;
  ulong count = 0;
  arg = -1;
  for (long i = bnd[b]; i < bnd[b + 1]; ++i) {
    const long r = idx[i];
    if (ulong(r) + 1 == p.pad1) continue;
    const float x = float(w[ulong(r) * p.d + col]);
    if (p.mode == kMax) {
      if (count == 0 || x > acc) {
        acc = x;
        arg = r;
      }
    } else {
      acc += p.has_psw != 0 ? float(psw[i]) * x : x;
    }
    ++count;
  }
  if (p.mode == kMean && count > 0) acc /= float(count);
  return acc;
}

template <typename T>
[[kernel]] void embedding_bag_fwd(device const T* w [[buffer(0)]],
                                  device const long* idx [[buffer(1)]],
                                  device const long* bnd [[buffer(2)]],
                                  device const T* psw [[buffer(3)]], device T* out [[buffer(4)]],
                                  constant Params& p [[buffer(5)]],
                                  uint gid [[thread_position_in_grid]]) {
  if (ulong(gid) >= p.rows * p.d) return;
  long arg;
  out[gid] = T(bag_reduce(w, idx, bnd, psw, p, ulong(gid) / p.d, ulong(gid) % p.d, arg));
}

template <typename T>
[[kernel]] void embedding_bag_argmax(device const T* w [[buffer(0)]],
                                     device const long* idx [[buffer(1)]],
                                     device const long* bnd [[buffer(2)]],
                                     device long* argmax [[buffer(3)]],
                                     constant Params& p [[buffer(4)]],
                                     uint gid [[thread_position_in_grid]]) {
  if (ulong(gid) >= p.rows * p.d) return;
  long arg;
  bag_reduce(w, idx, bnd, w, p, ulong(gid) / p.d, ulong(gid) % p.d, arg);
  argmax[gid] = arg;
}

// Row r's positions are order[start[r] .. start[r + 1]).
template <typename T>
[[kernel]] void embedding_bag_bwd_weight(
    device const T* g [[buffer(0)]], device const long* order [[buffer(1)]],
    device const long* start [[buffer(2)]], device const long* bag_of [[buffer(3)]],
    device const long* count [[buffer(4)]], device const T* psw [[buffer(5)]],
    device const long* argmax [[buffer(6)]], device T* gw [[buffer(7)]],
    constant Params& p [[buffer(8)]], uint gid [[thread_position_in_grid]]) {
  if (ulong(gid) >= p.rows * p.d) return;
  const ulong r = ulong(gid) / p.d, col = ulong(gid) % p.d;
  float acc = 0.0f;
  long last_bag = -1;
  for (long k = start[r]; k < start[r + 1]; ++k) {
    const long i = order[k];
    const long b = bag_of[i];
    const float gv = float(g[ulong(b) * p.d + col]);
    if (p.mode == kMax) {
      // A row repeated within a bag took the max once: its gradient arrives once.
      if (b != last_bag && ulong(argmax[ulong(b) * p.d + col]) == r) acc += gv;
      last_bag = b;
    } else if (p.has_psw != 0) {
      acc += float(psw[i]) * gv;
    } else if (p.mode == kMean) {
      acc += gv / float(count[b]);
    } else {
      acc += gv;
    }
  }
  gw[gid] = T(acc);
}

template <typename T>
[[kernel]] void embedding_bag_bwd_psw(device const T* g [[buffer(0)]],
                                      device const T* w [[buffer(1)]],
                                      device const long* idx [[buffer(2)]],
                                      device const long* bag_of [[buffer(3)]],
                                      device T* gp [[buffer(4)]], constant Params& p [[buffer(5)]],
                                      uint gid [[thread_position_in_grid]]) {
  if (ulong(gid) >= p.n) return;
  const long b = bag_of[gid], r = idx[gid];
  float acc = 0.0f;
  if (b >= 0 && ulong(r) + 1 != p.pad1) {
    for (ulong j = 0; j < p.d; ++j)
      acc += float(g[ulong(b) * p.d + j]) * float(w[ulong(r) * p.d + j]);
  }
  gp[gid] = T(acc);
}

#define METALCORE_EMBEDDING_BAG_INSTANTIATE(T, tok)                                              \
  template [[host_name(METALCORE_HOST_NAME(embedding_bag, fwd, tok))]] [[kernel]] void           \
  embedding_bag_fwd<T>(device const T*, device const long*, device const long*, device const T*, \
                       device T*, constant Params&, uint);                                       \
  template [[host_name(METALCORE_HOST_NAME(embedding_bag, argmax, tok))]] [[kernel]] void        \
  embedding_bag_argmax<T>(device const T*, device const long*, device const long*, device long*, \
                          constant Params&, uint);                                               \
  template [[host_name(METALCORE_HOST_NAME(embedding_bag, bwd_weight, tok))]] [[kernel]] void    \
  embedding_bag_bwd_weight<T>(device const T*, device const long*, device const long*,           \
                              device const long*, device const long*, device const T*,           \
                              device const long*, device T*, constant Params&, uint);            \
  template [[host_name(METALCORE_HOST_NAME(embedding_bag, bwd_psw, tok))]] [[kernel]] void       \
  embedding_bag_bwd_psw<T>(device const T*, device const T*, device const long*,                 \
                           device const long*, device T*, constant Params&, uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_EMBEDDING_BAG_INSTANTIATE)
