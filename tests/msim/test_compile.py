"""Compile-time fidelity: MSL-only names, generator errors with file:line, strict address spaces."""

import ctypes
import textwrap

import numpy as np
import pytest
from msim_paths import KERNELS

import msim

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"


def write(tmp_path, body: str, name: str = "k.metal"):
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def test_pointer_address_space_mixup_fails_only_in_strict_mode(tmp_path):
    src = write(
        tmp_path,
        """\
        float sum2(thread const float* p) { return p[0] + p[1]; }
        kernel void k(device const float* x [[buffer(0)]], device float* y [[buffer(1)]]) {
          y[0] = sum2(x);
        }
        """,
    )
    msim.build([src])  # default mode models a flat address space, like C++
    with pytest.raises(msim.BuildError, match=r"k\.metal:5:\d+: error: no matching function"):
        msim.check([src])


def test_strict_mode_accepts_correct_address_spaces(tmp_path):
    src = write(
        tmp_path,
        """\
        float sum2(device const float* p) { return p[0] + p[1]; }
        float first(threadgroup const float* t) { return t[0]; }
        kernel void k(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                      constant float& s [[buffer(2)]], uint tid [[thread_index_in_threadgroup]]) {
          threadgroup float t[32];
          t[tid] = x[tid];
          threadgroup_barrier(mem_flags::mem_threadgroup);
          y[tid] = sum2(x) * s + first(t);
        }
        """,
    )
    assert len(msim.check([src])) == 1


@pytest.mark.parametrize(
    "stmt,error",
    [
        ("y[0] = std::max(y[0], 1.0f);", "use of undeclared identifier 'std'"),
        ('printf("%f", y[0]);', "use of undeclared identifier 'printf'"),
        (
            "device float* p = (device float*)malloc(4); y[0] = p[0];",
            "undeclared identifier 'malloc'",
        ),
        ("float4 v = float4(1.0f, 2.0f, 3.0f); y[0] = v.x;", "component count does not match"),
    ],
)
def test_non_msl_code_fails_to_compile(tmp_path, stmt, error):
    src = write(tmp_path, f"kernel void k(device float* y [[buffer(0)]]) {{\n  {stmt}\n}}\n")
    with pytest.raises(msim.BuildError, match=error):
        msim.build([src])


def test_compile_errors_point_at_the_metal_line(tmp_path):
    src = write(
        tmp_path,
        """\
        kernel void k(device float* y [[buffer(0)]]) {
          y[0] = undefined_name;
        }
        """,
    )
    with pytest.raises(msim.BuildError, match=r"k\.metal:4:\d+: error: use of undeclared"):
        msim.build([src])


@pytest.mark.parametrize(
    "body,error",
    [
        (
            (
                "kernel void k(device float* y [[buffer(0)]]) {\n  threadgroup float t[4] = {0};\n"
                "  y[0] = t[0];\n}\n"
            ),
            r"k\.metal:4: error: threadgroup variable 't' cannot have an initializer",
        ),
        (
            "kernel void k(device float* y [[buffer(0)]], uint n) { y[0] = n; }\n",
            r"k\.metal:3: error: parameter 'n' of kernel 'k' needs \[\[buffer\(i\)\]\]",
        ),
        (
            "kernel void k(device float* y [[buffer(0)]], device float* z [[buffer(0)]]) {}\n",
            r"k\.metal:3: error: kernel 'k': \[\[buffer\(0\)\]\] bound twice",
        ),
        (
            (
                "kernel void k(texture2d<float> t [[texture(0)]],\n"
                "              device float* y [[buffer(0)]]) {}\n"
            ),
            r"k\.metal:3: error: msim does not support textures",
        ),
        (
            (
                "template <typename T> kernel void k(device T* y [[buffer(0)]]) {}\n"
                "template kernel void k<float>(device float*);\n"
            ),
            r"k\.metal:4: error: explicit kernel instantiation of 'k' needs \[\[host_name\]\]",
        ),
    ],
)
def test_generator_errors_name_file_and_line(tmp_path, body, error):
    with pytest.raises(msim.BuildError, match=error):
        msim.build([write(tmp_path, body)])


def test_duplicate_names_across_files(tmp_path):
    a = write(
        tmp_path, "kernel void k(device float* y [[buffer(0)]]) { y[0] = 1.0f; }\n", "a.metal"
    )
    b = write(
        tmp_path, "kernel void k(device float* y [[buffer(0)]]) { y[0] = 2.0f; }\n", "b.metal"
    )
    with pytest.raises(msim.BuildError, match="multiple definition"):  # as when linking a metallib
        msim.build([a, b])
    a.write_text(HEADER + '[[host_name("k")]] kernel void ka(device float* y [[buffer(0)]]) {}\n')
    b.write_text(HEADER + '[[host_name("k")]] kernel void kb(device float* y [[buffer(0)]]) {}\n')
    lib = msim.load([a, b])
    with pytest.raises(msim.MetalError, match="host name 'k' defined twice"):
        lib.dispatch("k", [np.zeros(1, np.float32)], (1,), threads=(1,))


def test_namespaces_macros_and_instantiations_without_attributes(tmp_path):
    src = write(
        tmp_path,
        """\
        namespace ops {
        template <typename T, int N>
        kernel void fill(device T* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
          y[i] = T(N) + T(0.5h);
        }
        #define FILL(T, N) template [[host_name("fill_" #T "_" #N)]] kernel void fill<T, N>( \\
            device T*, uint);
        FILL(float, 3)
        FILL(half, 7)
        }  // namespace ops
        """,
    )
    lib = msim.load([src])
    assert set(lib.kernels) == {"fill_float_3", "fill_half_7"}
    y = np.zeros(5, np.float16)
    lib.dispatch("fill_half_7", [y], (5,), threads=(5,))
    np.testing.assert_array_equal(y, np.full(5, 7.5, np.float16))


def test_include_dirs_and_shared_params_struct():
    inc = KERNELS / "include"
    lib = msim.load([inc / "scale.metal"], include_dirs=[inc])

    class ScaleParams(ctypes.Structure):  # mirrors family/params.h on the host side
        _fields_ = [("n", ctypes.c_uint32), ("alpha", ctypes.c_float), ("beta", ctypes.c_float)]

    x = np.arange(130, dtype=np.float32)
    y = np.zeros(130, np.float32)
    lib.dispatch("scale_params", [x, y, ScaleParams(130, 2.0, 0.5)], (64,), threads=(130,))
    np.testing.assert_array_equal(y, 2 * x + 0.5 + np.arange(130) // 64)
    assert msim.check([inc / "scale.metal"], include_dirs=[inc])


def test_vector_alias_constructors_convert_instead_of_bitcasting(tmp_path):
    src = write(
        tmp_path,
        """\
        template <typename T>
        kernel void widen(device const T* x [[buffer(0)]], device float4* y [[buffer(1)]],
                          uint i [[thread_position_in_grid]]) {
          typedef vec<float, 4> vec4;
          using ivec4 = metal::vec<int, 4>;
          y[i] = vec4(ivec4(x[i])) + vec4(0.5f, 0, 0, vec<float, 2>(1.0f, 2.0f).y);
        }
        template [[host_name("widen_int")]] kernel void widen<int4>(device const int4*,
                                                                   device float4*, uint);
        """,
    )
    x = np.array([[1, -2, 3, 40]], np.int32)
    y = np.zeros((1, 4), np.float32)
    msim.load([src]).dispatch("widen_int", [x, y], (1,), threads=(1,))
    np.testing.assert_array_equal(y, [[1.5, -2, 3, 42]])
