// Tiled transpose through a padded threadgroup tile: 2-D full threadgroups, bounds-checked edges
// (with dispatch_threads the edge groups shrink and could not cover the transposed tile).
#include <metal_stdlib>
using namespace metal;

template <uint TILE>
kernel void transpose(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                      constant uint2& shape [[buffer(2)]],  // (rows, cols) of `in`
                      uint2 gid [[thread_position_in_grid]],
                      uint2 tid [[thread_position_in_threadgroup]],
                      uint2 group [[threadgroup_position_in_grid]]) {
  threadgroup float tile[TILE][TILE + 1];
  uint rows = shape.x, cols = shape.y;
  if (gid.y < rows && gid.x < cols) tile[tid.y][tid.x] = in[gid.y * cols + gid.x];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint orow = group.x * TILE + tid.y;  // output is cols x rows
  uint ocol = group.y * TILE + tid.x;
  if (orow < cols && ocol < rows) out[orow * rows + ocol] = tile[tid.x][tid.y];
}
template [[host_name("transpose16")]] kernel void transpose<16>(device const float*, device float*,
                                                                constant uint2&, uint2, uint2,
                                                                uint2);
template [[host_name("transpose8")]] kernel void transpose<8>(device const float*, device float*,
                                                              constant uint2&, uint2, uint2, uint2);
