// Constructs that once compiled under msim into a different program than MSL defines (or that
// real projects write and msim must get exactly right). tests/msim/test_tricky.py runs each
// against numpy; the constructs msim rejects instead are inline in that test.
#include <metal_stdlib>
using namespace metal;

// A kernel template with a default template argument: its threadgroup array is shared by the
// threadgroup (reversal through it only works if every thread sees every other thread's write).
template <typename T, int Bias = 4>
[[kernel]] void tg_default_arg(device T* y [[buffer(0)]],
                               uint i [[thread_position_in_threadgroup]],
                               uint n [[threads_per_threadgroup]]) {
  threadgroup T s[64];
  s[i] = T(i);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[i] = s[n - 1 - i] + T(Bias);
}
template [[host_name("tg_default_arg")]] [[kernel]] void tg_default_arg<float>(device float*, uint,
                                                                             uint);
template [[host_name("tg_default_arg_7")]] [[kernel]] void tg_default_arg<float, 7>(device float*,
                                                                                  uint, uint);

// Nested templates: a traits class with a member template sizes the threadgroup array, and a
// default argument refers to an earlier template parameter.
template <typename T>
struct Traits {
  template <int W>
  struct Tile {
    static constexpr int size = W * 2;
  };
  static constexpr int width = sizeof(T) == 2 ? 16 : 32;
};
template <typename T, typename Tr = Traits<T>, int S = Tr::template Tile<Tr::width>::size>
kernel void nested_templates(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],
                             uint i [[thread_position_in_threadgroup]]) {
  threadgroup T tile[S];
  tile[i] = x[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[i] = tile[(i + 1) % S] + T(S);
}
template [[host_name("nested_templates_float")]] kernel void nested_templates<float>(
    device const float*, device float*, uint);
template [[host_name("nested_templates_half")]] kernel void nested_templates<half>(
    device const half*, device half*, uint);

// Threadgroup arrays in nested blocks of one kernel (as MLX's sort does) are distinct variables;
// a helper function works on them through a threadgroup pointer.
template <typename T>
T rotate_sum(threadgroup T* buf, uint i, uint n) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return buf[(i + 1) % n] + buf[(i + 2) % n];
}
kernel void nested_blocks(device float* y [[buffer(0)]], constant int& mode [[buffer(1)]],
                          uint i [[thread_position_in_threadgroup]],
                          uint n [[threads_per_threadgroup]]) {
  if (mode == 0) {
    threadgroup float a[32];
    a[i] = float(i);
    y[i] = rotate_sum(a, i, n);
  } else {
    threadgroup float b[32], c[32];
    b[i] = float(i) * 10.0f;
    c[i] = 1.0f;
    y[i] = rotate_sum(b, i, n) + rotate_sum(c, i, n);
  }
}

// Structs with address-space-qualified methods (MLX's loaders and ops are written this way).
struct Scaled {
  device float* p;
  float scale;
  float load(uint i) const thread { return p[i] * scale; }
  void store(uint i, float v) thread { p[i] = v; }
};
struct Pair {
  float a, b;
  float sum() const device { return a + b; }
  float diff() const constant { return a - b; }
};
kernel void qualified_methods(device float* y [[buffer(0)]], device const Pair* pairs [[buffer(1)]],
                              constant Pair& k [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  Scaled s{y, 2.0f};
  s.store(i, s.load(i) + pairs[i].sum() + k.diff());
}

// Function constants: a bool choosing a branch, an int and a float in arithmetic, a constant
// derived from them, an optional buffer, and an index written as an expression (ggml does).
#define FC_BASE 10
constant bool fc_square [[function_constant(FC_BASE + 0)]];
constant int fc_offset [[function_constant(FC_BASE + 1)]];
constant float fc_gain [[function_constant(FC_BASE + 2)]];
constant bool fc_has_bias [[function_constant(FC_BASE + 3)]];
constant bool fc_plain = !fc_square && fc_offset == 0;
template <typename T>
T apply_constants(T v) {
  return (fc_square ? v * v : v) * T(fc_gain) + T(fc_offset);
}
kernel void function_constants(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                               device const float* bias [[buffer(2), function_constant(fc_has_bias)]],
                               uint i [[thread_position_in_grid]]) {
  float v = fc_plain ? x[i] : apply_constants(x[i]);
  y[i] = v + (fc_has_bias ? bias[i] : 0.0f);
}

// Casts through a template parameter, a typedef, decltype and C-style casts convert element by
// element in MSL; clang alone would reinterpret the bits of an equal-size vector.
typedef float4 vec4_alias;
template <typename V, typename I>
kernel void vector_casts(device const I* x [[buffer(0)]], device V* y [[buffer(1)]],
                         uint i [[thread_position_in_grid]]) {
  const I v = x[i];
  V f = V(v);                    // functional cast through a template parameter
  f += (V)v;                     // C-style cast through a template parameter
  f += vec4_alias(v);            // functional cast through a typedef
  f += (float4)v * 2.0f;         // C-style cast to an MSL vector name, then a product
  f += decltype(f)(v.wzyx);      // functional cast through decltype
  f += -(float4)-v;              // casts inside unary operators
  y[i] = f;
}
template [[host_name("vector_casts")]] kernel void vector_casts<float4, int4>(device const int4*,
                                                                          device float4*, uint);

// Unsuffixed floating literals are float in MSL (there is no double): x * 0.1 multiplies by the
// float nearest 0.1, in float, where C++ would multiply by the double 0.1 and round.
kernel void float_literals(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                           uint i [[thread_position_in_grid]]) {
  y[2 * i] = x[i] * 0.1;
  y[2 * i + 1] = x[i] * 3e-1 + 1.;
}

// ggml-style program-scope tables: `constexpr constant static` arrays.
constexpr constant static float table[4] = {0.5f, -1.0f, 2.0f, 8.0f};
kernel void constant_tables(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  y[i] = table[i % 4];
}

// ---- The MSL real projects write ----

// Unattributed kernel parameters: Metal numbers buffers in declaration order (ggml, MLX).
// Instantiation through a function typedef (ggml) and through decltype (MLX's
// instantiate_kernel).
template <typename T, short F>
kernel void unattributed(constant float& scale, device const T* x, device T* y,
                         uint i [[thread_position_in_grid]]) {
  y[i] = x[i] * T(scale) + T(F);
}
typedef decltype(unattributed<float, 1>) unattributed_t;
template [[host_name("unattributed_f1")]] kernel unattributed_t unattributed<float, 1>;
template [[host_name("unattributed_f2")]] [[kernel]] decltype(unattributed<float, 2>)
    unattributed<float, 2>;

// Mixed: the unattributed parameters take the lowest indices no attribute uses.
kernel void mixed_indices(device float* a [[buffer(1)]], device const float* b,
                          device const float* c, uint i [[thread_position_in_grid]]) {
  a[i] = b[i] * 10.0f + c[i];  // b is buffer(0), c is buffer(2)
}

// METAL_FUNC helpers, __METAL__, metal_type_traits and the exact math functions.
#if defined(__METAL__) && __METAL_VERSION__ >= 300
template <typename T, typename U>
METAL_FUNC metal::enable_if_t<metal::is_convertible_v<U, T> && metal::is_floating_point_v<T>, T>
widen(U u) {
  return T(u);
}
kernel void math_exact(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                       device int* e [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  int k = 0;
  const float m = frexp(x[i], k);
  e[i] = k;
  y[4 * i] = m;
  y[4 * i + 1] = ldexp(m, k + 1);
  y[4 * i + 2] = nextafter(x[i], INFINITY);
  y[4 * i + 3] = widen<float>(half(nextafter(half(x[i]), -MAXHALF)));
}
#endif

// simd_shuffle_and_fill_down/up: vectors of `modulo` lanes, filled from `filling_data`.
kernel void shuffle_fill(device float* y [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
  const float data = float(lane), fill = 100.0f + float(lane);
  y[lane] = simd_shuffle_and_fill_down(data, fill, ushort(3));
  y[32 + lane] = simd_shuffle_and_fill_up(data, fill, ushort(2), ushort(8));
  y[64 + lane] = simd_shuffle_and_fill_down(data, fill, ushort(5), ushort(16));
}

// Implicit conversions of MSL's overloaded math (ggml writes pow(float, int) and fmax(0, v));
// bfloat arguments convert to float.
kernel void math_overloads(device const float4* x [[buffer(0)]], device float4* y [[buffer(1)]],
                           device const bfloat* b [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  const int k = 3;
  y[i] = fmax(0, x[i]) + pow(x[i].x, k) + float4(exp(b[i]));
}

// Overloads that differ only in address spaces (MLX's complex_t, os_log, pointer_element):
// msim keeps one of each when their bodies agree.
struct Acc2 {
  float v;
  Acc2(float x) thread : v(x) {}
  Acc2(float x) device : v(x) {}
  float get() const thread { return v; }
  float get() const device { return v; }
};
template <typename T>
inline thread T& bump(thread T& a) {
  a.v += 1.0f;
  return a;
}
template <typename T>
inline device T& bump(device T& a) {
  a.v += 1.0f;
  return a;
}
template <typename T>
struct elem_of {};
template <typename T>
struct elem_of<thread T*> {
  using type = T;
};
template <typename T>
struct elem_of<device T*> {
  using type = T;
};

// Function constants shadowed by parameters and locals of the same name (MLX's fft and
// sdpa_vector do this), uniform<T>, direct-initialized vectors, `sizeof(T) < 8` in template
// arguments, float atomics.
constant int blocks [[function_constant(30)]];
template <typename T, metal::enable_if_t<sizeof(T) < 8, bool> = true>
T twice(T x) {
  return x + x;
}
float scaled(float x, const int blocks) { return x * float(blocks); }
kernel void mlx_idioms(device float* y [[buffer(0)]], device atomic_float* acc [[buffer(1)]],
                       const constant int& shift [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  Acc2 a = Acc2(float(i));
  bump(a);
  typename elem_of<thread float*>::type e = a.get();
  const uniform<int> u = make_uniform(blocks);
  const short2 offset(short(i), short(u * 2));
  {
    const int blocks = 100;  // a local: not the function constant
    y[4 * i] = e + float(blocks) + float(shift);
  }
  y[4 * i + 1] = scaled(1.0f, blocks);
  y[4 * i + 2] = float(offset.x + offset.y);
  y[4 * i + 3] = twice(0.5f);
  atomic_fetch_add_explicit(acc, 1.0f, memory_order_relaxed);
  if (i == 0) atomic_store_explicit(acc + 1, atomic_load_explicit(acc + 2, memory_order_relaxed), memory_order_relaxed);
}
