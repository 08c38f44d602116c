"""Never silently different: every tricky construct either runs exactly as MSL defines it (checked
against numpy) or is rejected at build time with an error naming the construct and the .metal
line. The runnable corpus is tricky/runs.metal; rejected constructs are inline here."""

import textwrap

import numpy as np
import pytest
from msim_paths import REPO_ROOT

import msim

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"


@pytest.fixture(scope="module")
def tricky():
    return msim.load([REPO_ROOT / "tests" / "msim" / "tricky" / "runs.metal"])


@pytest.mark.parametrize("name,bias", [("tg_default_arg", 4), ("tg_default_arg_7", 7)])
def test_threadgroup_array_in_template_with_default_argument_is_shared(tricky, name, bias):
    # The silent miscompile this guards against made `s` per-thread: y[i] would read garbage.
    y = np.zeros(32, np.float32)
    tricky.dispatch(name, [y], (32,), threadgroups=(1,))
    np.testing.assert_array_equal(y, 31 - np.arange(32) + bias)


@pytest.mark.parametrize("name,dtype,size", [("float", np.float32, 64), ("half", np.float16, 32)])
def test_nested_templates_size_the_threadgroup_array(tricky, name, dtype, size):
    x = np.arange(size).astype(dtype)
    y = np.zeros(size, dtype)
    tricky.dispatch(f"nested_templates_{name}", [x, y], (size,), threadgroups=(1,))
    np.testing.assert_array_equal(y, (np.roll(x, -1) + size).astype(dtype))


@pytest.mark.parametrize("mode", [0, 1])
def test_threadgroup_arrays_in_nested_blocks_are_distinct(tricky, mode):
    n = 32
    y = np.zeros(n, np.float32)
    tricky.dispatch("nested_blocks", [y, np.int32(mode)], (n,), threadgroups=(1,))
    i = np.arange(n)
    rot = (i + 1) % n + (i + 2) % n
    np.testing.assert_array_equal(y, rot if mode == 0 else 10 * rot + 2)


def test_address_space_qualified_methods(tricky):
    rng = np.random.default_rng(1)
    y0 = rng.standard_normal(40).astype(np.float32)
    pairs = rng.standard_normal((40, 2)).astype(np.float32)
    k = np.array([3.0, 0.5], np.float32)
    y = y0.copy()
    tricky.dispatch("qualified_methods", [y, pairs, k], (8,), threads=(40,))
    np.testing.assert_allclose(y, 2 * y0 + pairs.sum(1) + (k[0] - k[1]), rtol=1e-6)


@pytest.mark.parametrize(
    "constants",
    [
        {10: True, 11: 2, 12: 0.5, 13: True},
        {10: False, 11: -3, 12: 3.0, 13: False},
        {10: False, 11: 0, 12: 7.0, 13: False},  # fc_plain: the derived constant is true
    ],
)
def test_function_constants_with_expression_indices(tricky, constants):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(50).astype(np.float32)
    bias = rng.standard_normal(50).astype(np.float32)
    y = np.zeros_like(x)
    args = [x, y, bias if constants[13] else None]
    tricky.dispatch("function_constants", args, (16,), threads=(50,), constants=constants)
    square, offset, gain, has_bias = (constants[i] for i in (10, 11, 12, 13))
    if not square and offset == 0:
        want = x.copy()
    else:
        want = (x * x if square else x) * np.float32(gain) + np.float32(offset)
    np.testing.assert_allclose(y, want + (bias if has_bias else 0), rtol=1e-6)


def test_vector_casts_convert_instead_of_reinterpreting_bits(tricky):
    v = np.array([[1, -2, 3, 40], [0, 7, -100, 5]], np.int32)
    y = np.zeros((2, 4), np.float32)
    tricky.dispatch("vector_casts", [v, y], (2,), threads=(2,))
    np.testing.assert_array_equal(y, 6 * v + v[:, ::-1])


def test_unsuffixed_literals_are_float(tricky):
    x = np.linspace(1, 50, 200, dtype=np.float32)
    by_double = (x.astype(np.float64) * 0.1).astype(np.float32)
    by_float = x * np.float32(0.1)
    assert (by_double != by_float).any()  # the inputs tell the two meanings apart
    y = np.zeros(2 * x.size, np.float32)
    tricky.dispatch("float_literals", [x, y], (64,), threads=(x.size,))
    np.testing.assert_array_equal(y[0::2], by_float)
    np.testing.assert_array_equal(y[1::2], x * np.float32(0.3) + np.float32(1))


def test_program_scope_constant_tables(tricky):
    y = np.zeros(8, np.float32)
    tricky.dispatch("constant_tables", [y], (8,), threads=(8,))
    np.testing.assert_array_equal(y, [0.5, -1, 2, 8] * 2)


@pytest.mark.parametrize("name,fuse", [("unattributed_f1", 1), ("unattributed_f2", 2)])
def test_unattributed_parameters_and_typedef_instantiations(tricky, name, fuse):
    sig = tricky.kernels[name].params
    assert [(p.name, p.kind, p.index) for p in sig[:3]] == [
        ("scale", "buffer", "0"),
        ("x", "buffer", "1"),
        ("y", "buffer", "2"),
    ]
    x = np.arange(20, dtype=np.float32)
    y = np.zeros_like(x)
    tricky.dispatch(name, [np.float32(0.5), x, y], (8,), threads=(20,))
    np.testing.assert_array_equal(y, x * 0.5 + fuse)


def test_unattributed_parameters_skip_attributed_indices(tricky):
    b, c = np.arange(10, dtype=np.float32), np.full(10, 0.25, np.float32)
    a = np.zeros(10, np.float32)
    tricky.dispatch("mixed_indices", {0: b, 1: a, 2: c}, (10,), threads=(10,))
    np.testing.assert_array_equal(a, b * 10 + c)


def test_exact_math_functions(tricky):
    x = np.array([1.5, -3.0, 1e-3, 1000.25, 0.75, -0.1], np.float32)
    y = np.zeros(4 * x.size, np.float32)
    e = np.zeros(x.size, np.int32)
    tricky.dispatch("math_exact", [x, y, e], (8,), threads=(x.size,))
    m, k = np.frexp(x)
    np.testing.assert_array_equal(y[0::4], m)
    np.testing.assert_array_equal(e, k)
    np.testing.assert_array_equal(y[1::4], 2 * x)
    np.testing.assert_array_equal(y[2::4], np.nextafter(x, np.float32(np.inf)))
    half_down = np.nextafter(x.astype(np.float16), np.float16(-65504))
    np.testing.assert_array_equal(y[3::4], half_down.astype(np.float32))


def test_simd_shuffle_and_fill(tricky):
    y = np.zeros(96, np.float32)
    tricky.dispatch("shuffle_fill", [y], (32,), threads=(32,))

    def fill(delta, modulo):
        lane = np.arange(32)
        base, idx = lane // modulo * modulo, lane % modulo + delta
        inside = (idx >= 0) & (idx < modulo)
        return np.where(inside, base + idx, 100 + base + idx - np.sign(delta) * modulo)

    np.testing.assert_array_equal(y[:32], fill(3, 32))
    np.testing.assert_array_equal(y[32:64], fill(-2, 8))
    np.testing.assert_array_equal(y[64:], fill(5, 16))


def test_math_overloads_convert_like_msl(tricky):
    import torch

    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 4)).astype(np.float32)
    b = torch.randn(9).to(torch.bfloat16)
    y = np.zeros_like(x)
    tricky.dispatch("math_overloads", [x, y, b], (9,), threads=(9,))
    want = np.maximum(x, 0) + x[:, :1] ** 3 + np.exp(b.float().numpy())[:, None]
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_mlx_idioms(tricky):
    n = 6
    y = np.zeros(4 * n, np.float32)
    acc = np.array([0.0, -1.0, 42.5], np.float32)
    tricky.dispatch("mlx_idioms", [y, acc, np.int32(7)], (n,), threads=(n,), constants={30: 3})
    i = np.arange(n)
    np.testing.assert_array_equal(y[0::4], i + 1 + 100 + 7)
    np.testing.assert_array_equal(y[1::4], np.full(n, 3.0))
    np.testing.assert_array_equal(y[2::4], i + 6)
    np.testing.assert_array_equal(y[3::4], np.ones(n))
    np.testing.assert_array_equal(acc, [n, 42.5, 42.5])


KERNEL = "kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]])"

REJECTED = {
    "threadgroup_array_in_helper": (
        "float helper(uint i) {\n  threadgroup float s[32];\n  s[i] = 1.0f;\n  return s[0];\n}\n"
        f"{KERNEL} {{ y[i] = helper(i); }}\n",
        r"k\.metal:4: error: threadgroup variable declared in a function that is not a kernel",
    ),
    "threadgroup_member": (
        f"struct S {{ threadgroup float s[4]; }};\n{KERNEL} {{ y[i] = 0.0f; }}\n",
        r"k\.metal:3: error: threadgroup variable declared as a struct or class member",
    ),
    "threadgroup_program_scope": (
        f"threadgroup float shared_s[4];\n{KERNEL} {{ y[i] = shared_s[0]; }}\n",
        r"k\.metal:3: error: threadgroup variable declared at program scope",
    ),
    "threadgroup_in_initializer": (
        f"{KERNEL} {{\n  auto f = [&] {{ return 1; }};\n  y[i] = f();\n}}\n"
        "constant int arr[2] = {0, 1};\n"
        "auto g = [] { threadgroup float s[4]; return s[0]; };\n",
        r"k\.metal:8: error: threadgroup variable declared inside an initializer",
    ),
    "threadgroup_typedef": (
        f"typedef threadgroup float tg4[4];\n{KERNEL} {{\n  tg4 s;\n  y[i] = s[0];\n}}\n",
        r"k\.metal:3: error: msim cannot model a typedef or alias of a threadgroup object type",
    ),
    "threadgroup_alias": (
        f"using tgf = threadgroup float;\n{KERNEL} {{\n  tgf s[4];\n  y[i] = s[0];\n}}\n",
        r"k\.metal:3: error: msim cannot model a typedef or alias of a threadgroup object type",
    ),
    "threadgroup_template_argument": (
        "template <typename T> float first() {\n  T s[4];\n  return s[0];\n}\n"
        f"{KERNEL} {{ y[i] = first<threadgroup float>(); }}\n",
        r"k\.metal:7: error: msim cannot model a threadgroup-qualified object type as a template",
    ),
    "threadgroup_mixed_declarators": (
        f"{KERNEL} {{\n  threadgroup float *p, s[4];\n  y[i] = s[0];\n}}\n",
        r"k\.metal:4: error: declare threadgroup pointers and threadgroup variables in separate",
    ),
    "volatile_threadgroup_initialized": (
        f"{KERNEL} {{\n  volatile threadgroup int flag = 0;\n  y[i] = flag;\n}}\n",
        r"k\.metal:4: error: threadgroup variable 'flag' cannot have an initializer",
    ),
    "static_local": (
        f"{KERNEL} {{\n  static float acc;\n  acc += 1.0f;\n  y[i] = acc;\n}}\n",
        r"k\.metal:4: error: 'k\(float\*, unsigned int\)::acc' is mutable storage shared by all",
    ),
    "program_scope_variable": (
        f"float counter;\n{KERNEL} {{ y[i] = counter++; }}\n",
        r"k\.metal:3: error: 'counter' is mutable storage shared by all threads",
    ),
    "implicit_vector_conversion": (
        f"{KERNEL} {{\n  int4 a = int4(1);\n  uint4 b = a;\n  y[i] = float(b.x);\n}}\n",
        r"k\.metal:5:\d+: error: .*(cannot|incompatible|no viable)",
    ),
    "unparsed_kernel_declaration": (
        f'[[host_name("c")]] constant float c_value = 1.0f;\n{KERNEL} {{ y[i] = c_value; }}\n',
        r"k\.metal:3: error: msim cannot parse this kernel declaration",
    ),
    "instantiation_of_unknown_template": (
        'template [[host_name("f_float")]] kernel kernel_t missing<float>;\n',
        r"k\.metal:3: error: msim cannot find the kernel template 'missing'",
    ),
    "unattributed_value_parameter": (
        "kernel void k(device float* y, uint n) { y[0] = n; }\n",
        r"k\.metal:3: error: parameter 'n' of kernel 'k' needs \[\[buffer\(i\)\]\]",
    ),
    "address_space_overloads_that_differ": (
        "float pick(thread float* p) { return p[0]; }\n"
        "float pick(device float* p) { return p[1]; }\n"
        f"{KERNEL} {{ y[i] = pick(y); }}\n",
        r"k\.metal:4: error: msim cannot model functions that differ only in address spaces",
    ),
    "metal_performance_primitives": (
        "#include <MetalPerformancePrimitives/MetalPerformancePrimitives.h>\n"
        f"{KERNEL} {{ y[i] = 0.0f; }}\n",
        r"msim does not model MetalPerformancePrimitives",
    ),
    "undocumented_apple_builtin": (
        f"{KERNEL} {{ y[i] = __metal_secret(y[i]); }}\n",
        r"k\.metal:3: error: msim does not model the Apple-internal builtin '__metal_secret'",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_constructs_msim_cannot_model_are_build_errors(tmp_path, case):
    body, error = REJECTED[case]
    src = tmp_path / "k.metal"
    src.write_text(HEADER + textwrap.dedent(body))
    with pytest.raises(msim.BuildError, match=error):
        msim.build([src])
