"""Inputs that once gave silently wrong results (issue 19), each pinned so none comes back.

Every call here either computes the right answer, checked against float64 references written in
plain torch (metalcore.testing.reference), or raises an error that names the op and the argument:

1. meta parity: every bad-input case of every op spec fails on meta tensors (the fakes) exactly
   as on CPU (the C++ kernels); a meta tensor among CPU tensors is an error, not uninitialized
   memory;
2. every argument position of every op on the other device, both ways round;
3. sparse, quantized, mkldnn and nested tensors;
4. forward-mode AD (torch.func.jvp, forward_ad.make_dual, jacfwd) and the functorch transforms
   (grad, jacrev, vmap of grad, hessian): real derivatives, or an error naming the op, never a
   zero or missing tangent;
5. the public wrappers with integer, bool, complex and other-device inputs, and the eps default.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD

import metalcore
import metalcore.functional
from metalcore.testing import error_table
from metalcore.testing import reference as ref
from metalcore.testing.op_specs import SPECS, RandomDrawer, TensorArg

ops = torch.ops.metalcore
# vmap over ops without a batching rule runs torch's per-sample fallback, which says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

# --- Argument plumbing -------------------------------------------------------------------------


def _map_tensors(args: list, fn) -> list:
    """``args`` with every tensor (list elements included) replaced by ``fn(tensor)``."""

    def conv(a):
        if isinstance(a, torch.Tensor):
            return fn(a)
        if isinstance(a, (list, tuple)):
            return [conv(x) for x in a]
        return a

    return [conv(a) for a in args]


def _devices(args: list) -> set[str]:
    found: set[str] = set()
    _map_tensors(args, lambda t: found.add(t.device.type))
    return found


def _on(t: torch.Tensor, device: str) -> torch.Tensor:
    """``t``'s shape, dtype and strides on ``device`` (``.to()`` would make a non-dense view
    contiguous and so lose exactly what a layout check looks at). The values do not matter:
    with a meta tensor among the arguments no kernel reads them."""
    if t.layout != torch.strided or t.is_quantized:
        return t.to(device)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).zero_()


def _stem(message: str) -> str:
    # Swapping CPU and meta swaps the device names in a message, nothing else.
    return re.sub(r"\b(cpu|meta)\b", "<device>", message)


def _raised(fn, *args, **kwargs) -> BaseException | None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # the exception is the result under test
        return e
    return None


# --- 1. Meta parity: the fakes reject what the kernels reject --------------------------------

# Checks the C++ kernels do not do yet: the fake does, so the two differ until the kernel is
# fixed, and the strict xfail then fails to say so. Empty: every kernel check is mirrored.
CPP_GAPS: dict[tuple[str, str], str] = {}
# Checks of tensor values: meta tensors have none, so the fake cannot see the problem.
DATA_DEPENDENT = {
    ("adamw", "negative lr"),
    # The pivots' values, which a fake cannot read: the CPU kernel checks them before use.
    ("lu_solve", "pivots out of range"),
}

PARITY_CASES = [(name, i) for name in sorted(SPECS) for i in range(len(SPECS[name].bad_inputs))]


def _parity_param(name, i):
    desc = SPECS[name].bad_inputs[i].description
    marks = []
    if (name, desc) in CPP_GAPS:
        marks.append(pytest.mark.xfail(strict=True, reason=CPP_GAPS[(name, desc)]))
    return pytest.param(name, i, id=f"{name}-{desc}", marks=marks)


@pytest.mark.parametrize("op,case", [_parity_param(n, i) for n, i in PARITY_CASES])
def test_bad_input_fails_on_meta_as_on_cpu(op, case):
    spec, bad = SPECS[op], SPECS[op].bad_inputs[case]
    cpu_err = error_table.run_case(spec, bad)
    assert cpu_err is not None, f"the CPU kernel accepted {bad.description}"
    args, kwargs = bad.make()
    if len(_devices(args)) > 1:
        # A device-mismatch case (already on the fake: Meta outranks CPU): the mirror image,
        # CPU tensors to meta and meta ones to the CPU, must fail the same way.
        meta_args = _map_tensors(args, lambda t: _on(t, "cpu" if t.is_meta else "meta"))
    else:
        meta_args = _map_tensors(args, lambda t: _on(t, "meta"))
    meta_err = _raised(spec.overload(), *meta_args, **kwargs)
    if (op, bad.description) in DATA_DEPENDENT:
        assert meta_err is None, meta_err
        return
    assert meta_err is not None, f"the fake accepted {bad.description}"
    assert type(meta_err) is type(cpu_err), f"meta: {meta_err!r}\ncpu: {cpu_err!r}"
    assert _stem(str(meta_err)) == _stem(str(cpu_err))


def test_meta_mixed_with_cpu_no_longer_returns_uninitialized_memory():
    # The reported case: the fake ran and handed back a CPU tensor of garbage.
    with pytest.raises(RuntimeError, match=r"metalcore\.silu_backward: 'grad_out' must be on"):
        ops.silu_backward(torch.ones(4, 8, device="meta"), torch.ones(4, 8))


def test_meta_validation_matches_cpu_for_dtype_value_and_shape():
    # Integer input and a negative eps: the fake checked neither.
    with pytest.raises(TypeError, match=r"metalcore\.rmsnorm: 'input' must be float16.*got Int"):
        ops.rmsnorm(torch.ones(3, dtype=torch.int32, device="meta"), None, -1.0)
    with pytest.raises(ValueError, match=r"metalcore\.rmsnorm: 'eps' must be >= 0, got -1"):
        ops.rmsnorm(torch.ones(3, device="meta"), None, -1.0)
    # Shape errors on meta were RuntimeError; they are ValueError everywhere.
    with pytest.raises(ValueError, match=r"metalcore\.swiglu: 'up' must have the same shape"):
        ops.swiglu(torch.ones(3, device="meta"), torch.ones(4, device="meta"))


def test_shape_checks_raise_value_error_under_symbolic_shapes():
    # Tracing with dynamic shapes runs the fakes on symbolic sizes: a mismatch found there is
    # the ValueError eager mode raises (torch._check would raise RuntimeError).
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(shape_env=ShapeEnv())
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 2)
    gate = mode.from_tensor(torch.randn(3, 5), symbolic_context=ctx)
    up = mode.from_tensor(torch.randn(3, 6), symbolic_context=ctx)
    w = mode.from_tensor(
        torch.randn(7), symbolic_context=StatelessSymbolicContext([DimDynamic.DYNAMIC])
    )
    with mode:
        assert isinstance(gate.shape[0], torch.SymInt)
        with pytest.raises(ValueError, match=r"metalcore\.swiglu: 'up' must have the same shape"):
            ops.swiglu(gate, up)
        with pytest.raises(ValueError, match=r"metalcore\.rmsnorm: 'weight' must have shape \["):
            ops.rmsnorm(gate, w, 1e-6)
        assert ops.swiglu(gate, gate).shape == gate.shape
    # torch.compile reports it as a failed fake-tensor call that quotes the ValueError.
    f = torch.compile(lambda a, b: ops.swiglu(a, b), fullgraph=True, dynamic=True, backend="eager")
    with pytest.raises(
        Exception, match=r"ValueError\(\"metalcore\.swiglu: 'up' must have the same"
    ):
        f(torch.randn(3, 5), torch.randn(3, 6))


# --- 2. Every argument position on the other device ------------------------------------------


def _complete(sample) -> bool:
    """Every tensor argument present (optional ones too), every list non-empty."""
    for a in sample.args:
        if a is None or (isinstance(a, list) and not a):
            return False
    numel = [t.values.numel() for t in _tensor_args(sample.args)]
    return all(0 < n <= 4096 for n in numel)


def _tensor_args(args):
    for a in args:
        if isinstance(a, TensorArg):
            yield a
        elif isinstance(a, list):
            yield from (x for x in a if isinstance(x, TensorArg))


@functools.cache
def _complete_seed(op: str) -> int:
    for seed in range(5000):
        if _complete(SPECS[op].draw(RandomDrawer(seed))):
            return seed
    raise AssertionError(f"no complete sample of {op}")


def _valid_args(op: str) -> list:
    """A valid CPU call of ``op`` (fresh tensors) with every optional tensor argument given."""
    args, _ = SPECS[op].draw(RandomDrawer(_complete_seed(op))).materialize("cpu")
    return args


def _positions(op: str) -> list[tuple[str, tuple[int, int | None]]]:
    """(argument name, (arg index, list index or None)) of every tensor argument."""
    schema = SPECS[op].overload()._schema
    out = []
    for i, a in enumerate(_valid_args(op)):
        name = schema.arguments[i].name
        if isinstance(a, torch.Tensor):
            out.append((name, (i, None)))
        elif isinstance(a, list):
            out.extend((f"{name}[{j}]", (i, j)) for j in range(len(a)))
    return out


POSITIONS = [(op, arg, pos) for op in sorted(SPECS) for arg, pos in _positions(op)]
# Positions of ops with two or more tensor arguments: those can mix devices.
MIX_POSITIONS = [p for p in POSITIONS if sum(q[0] == p[0] for q in POSITIONS) > 1]


def _with(args: list, pos, fn) -> list:
    i, j = pos
    args = list(args)
    if j is None:
        args[i] = fn(args[i])
    else:
        args[i] = list(args[i])
        args[i][j] = fn(args[i][j])
    return args


@pytest.mark.parametrize("op,arg,pos", MIX_POSITIONS, ids=[f"{o}-{a}" for o, a, _ in MIX_POSITIONS])
def test_one_meta_argument_among_cpu_ones_is_an_error_naming_it(op, arg, pos):
    args = _with(_valid_args(op), pos, lambda t: _on(t, "meta"))
    with pytest.raises(RuntimeError) as info:
        SPECS[op].overload()(*args)
    msg = str(info.value)
    assert msg.startswith(f"metalcore.{op}: ") and f"'{arg}'" in msg and "device" in msg, msg


# Scalars of adamw that may stay on the CPU next to params on another device (read on the
# host, as torch.optim's CPU step counters are).
HOST_SCALARS = re.compile(r"^(lr|state_steps\[\d+\])$")


@pytest.mark.parametrize("op,arg,pos", MIX_POSITIONS, ids=[f"{o}-{a}" for o, a, _ in MIX_POSITIONS])
def test_one_cpu_argument_among_meta_ones_is_an_error_naming_it(op, arg, pos):
    args = _map_tensors(_valid_args(op), lambda t: _on(t, "meta"))
    args = _with(args, pos, lambda t: _on(t, "cpu"))
    err = _raised(SPECS[op].overload(), *args)
    if op == "adamw" and HOST_SCALARS.match(arg):
        assert err is None, repr(err)
        return
    assert isinstance(err, RuntimeError), repr(err)
    msg = str(err)
    assert msg.startswith(f"metalcore.{op}: ") and f"'{arg}'" in msg and "device" in msg, msg


# --- 3. Sparse, quantized, mkldnn and nested tensors ------------------------------------------


def _variants(t: torch.Tensor) -> dict:
    """The other-layout versions torch can build of ``t`` (name -> (builder, error type))."""
    out = {"sparse_coo": (lambda t: t.to_sparse(), ValueError)}
    if t.dim() == 2:
        out["sparse_csr"] = (lambda t: t.to_sparse_csr(), ValueError)
    out["quantized"] = (
        lambda t: torch.quantize_per_tensor(t.float(), 0.1, 0, torch.quint8),
        TypeError,
    )
    if t.dim() >= 1:
        out["mkldnn"] = (lambda t: t.float().contiguous().to_mkldnn(), ValueError)
        out["nested"] = (lambda t: torch.nested.nested_tensor([t, t]), ValueError)
        out["jagged"] = (
            lambda t: torch.nested.nested_tensor([t, t], layout=torch.jagged),
            ValueError,
        )
    return out


# Layouts a C++ kernel does not check yet, as (op, argument, layout) -> reason: a strict xfail
# each, so a fix shows. Empty: every kernel names the argument.
LAYOUT_CPP_GAPS: dict[tuple[str, str, str], str] = {}


def _layout_param(op, arg, pos, kind):
    gap = LAYOUT_CPP_GAPS.get((op, arg, kind))
    marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
    return pytest.param(op, arg, pos, kind, id=f"{op}-{arg}-{kind}", marks=marks)


def _arg_at(args, pos):
    return args[pos[0]] if pos[1] is None else args[pos[0]][pos[1]]


LAYOUT_CASES = [
    _layout_param(op, arg, pos, kind)
    for op, arg, pos in POSITIONS
    for kind in _variants(_arg_at(_valid_args(op), pos))
]


@pytest.mark.parametrize("op,arg,pos,kind", LAYOUT_CASES)
def test_other_layouts_get_an_error_naming_the_argument(op, arg, pos, kind):
    args = _valid_args(op)
    build, error = _variants(_arg_at(args, pos))[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized creation and nested tensors warn
        args = _with(args, pos, build)
        err = _raised(SPECS[op].overload(), *args)
    assert type(err) is error, repr(err)
    msg = str(err)
    assert msg.startswith(f"metalcore.{op}: '{arg}' must be"), msg


# --- 4. Forward-mode AD and functorch --------------------------------------------------------

EPS = 1e-5


def _rope_ref_backward(interleaved):
    # rope is linear in (q, k): its backward is the transposed map, the vjp of the reference.
    def f(gq, gk, cos, sin):
        fn = ref.gptj_apply_rotary_pos_emb if interleaved else ref.hf_apply_rotary_pos_emb
        zq, zk = torch.zeros_like(gq), torch.zeros_like(gk)
        _, vjp = torch.func.vjp(lambda q, k: fn(q, k, cos, sin), zq, zk)
        return vjp((gq, gk))

    return f


def _diff_cases():
    """name -> (metalcore fn, reference fn, shapes of the differentiable inputs, fixed inputs):
    both functions take the differentiable inputs then the fixed ones."""
    rope_shapes = [(2, 3, 5, 8), (2, 1, 5, 8)]
    tables = [(5, 6), (5, 6)]  # partial rotary: the last two features pass through
    cases = {
        "rmsnorm": (
            lambda x, w: ops.rmsnorm(x, w, EPS),
            lambda x, w: ref.rmsnorm(x, w, EPS),
            [(3, 16), (16,)],
            [],
        ),
        "rmsnorm-no-weight": (
            lambda x: ops.rmsnorm(x, None, EPS),
            lambda x: ref.rmsnorm(x, None, EPS),
            [(3, 16)],
            [],
        ),
        "fused_add_rmsnorm": (
            lambda x, r, w: ops.fused_add_rmsnorm(x, r, w, EPS),
            lambda x, r, w: ref.fused_add_rmsnorm(x, r, w, EPS),
            [(3, 16), (3, 16), (16,)],
            [],
        ),
        "fused_add_rmsnorm-no-weight": (
            lambda x, r: ops.fused_add_rmsnorm(x, r, None, EPS),
            lambda x, r: ref.fused_add_rmsnorm(x, r, None, EPS),
            [(3, 16), (3, 16)],
            [],
        ),
        "silu": (ops.silu, ref.silu, [(3, 16)], []),
        "gelu-none": (
            lambda x: ops.gelu(x, "none"),
            lambda x: ref.gelu(x, "none"),
            [(3, 16)],
            [],
        ),
        "gelu-tanh": (
            lambda x: ops.gelu(x, "tanh"),
            lambda x: ref.gelu(x, "tanh"),
            [(3, 16)],
            [],
        ),
        "swiglu": (ops.swiglu, ref.swiglu, [(3, 16), (3, 16)], []),
    }
    for interleaved in (False, True):
        tag = "-interleaved" if interleaved else ""
        cases["rope" + tag] = (
            lambda q, k, c, s, i=interleaved: ops.rope(q, k, c, s, i),
            lambda q, k, c, s, i=interleaved: ref.rope(q, k, c, s, i),
            rope_shapes,
            tables,
        )
        cases["rope_backward" + tag] = (
            lambda q, k, c, s, i=interleaved: ops.rope_backward(q, k, c, s, i),
            _rope_ref_backward(interleaved),
            rope_shapes,
            tables,
        )
    return cases


DIFF = _diff_cases()
LINEAR = {name for name in DIFF if name.startswith("rope")}
NONLINEAR = sorted(set(DIFF) - LINEAR)
# The backward op a second derivative of each non-linear case reaches.
BACKWARD_OP = {
    "rmsnorm": "rmsnorm_backward",
    "rmsnorm-no-weight": "rmsnorm_backward",
    "fused_add_rmsnorm": "fused_add_rmsnorm_backward",
    "fused_add_rmsnorm-no-weight": "fused_add_rmsnorm_backward",
    "silu": "silu_backward",
    "gelu-none": "gelu_backward",
    "gelu-tanh": "gelu_backward",
    "swiglu": "swiglu_backward",
}


def _inputs(name, seed=0, dtype=torch.float64):
    _, _, shapes, fixed = DIFF[name]
    g = torch.Generator().manual_seed(seed)
    diff = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    tangents = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    rest = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in fixed]
    return diff, tangents, rest


def _close(actual, expected, rtol=1e-10, atol=1e-12):
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol)


def _bind(fn, rest):
    return lambda *xs: fn(*xs, *rest)


@pytest.mark.parametrize("name", sorted(DIFF))
def test_jvp_matches_float64_reference(name):
    mc, rf, _, _ = DIFF[name]
    diff, tangents, rest = _inputs(name)
    out, tan = torch.func.jvp(_bind(mc, rest), tuple(diff), tuple(tangents))
    out_ref, tan_ref = torch.func.jvp(_bind(rf, rest), tuple(diff), tuple(tangents))
    _close(out, out_ref)
    _close(tan, tan_ref)
    # One input's tangent at a time: the others carry none (not zeros) into the kernel.
    for i in range(len(diff)):

        def only(x, fn, i=i):
            return fn(*diff[:i], x, *diff[i + 1 :], *rest)

        _, tan = torch.func.jvp(lambda x: only(x, mc), (diff[i],), (tangents[i],))
        _, tan_ref = torch.func.jvp(lambda x: only(x, rf), (diff[i],), (tangents[i],))
        _close(tan, tan_ref)


@pytest.mark.parametrize("name", sorted(DIFF))
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "requires-grad"])
def test_forward_ad_make_dual_matches_float64_reference(name, requires_grad):
    mc, rf, _, _ = DIFF[name]
    diff, tangents, rest = _inputs(name, seed=1)
    _, tan_ref = torch.func.jvp(_bind(rf, rest), tuple(diff), tuple(tangents))
    leaves = [x.clone().requires_grad_(requires_grad) for x in diff]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(leaves, tangents, strict=True)]
        out = mc(*duals, *rest)
        outs = out if isinstance(out, tuple) else (out,)
        tan = [fwAD.unpack_dual(o).tangent for o in outs]
        assert all(t is not None for t in tan), "an output has no tangent"
        _close(tan, tan_ref)
        if requires_grad and name in NONLINEAR:
            # A backward inside the dual level would have to give the gradient a tangent: a
            # second derivative, which the backward ops do not have.
            with pytest.raises(
                RuntimeError, match=rf"metalcore\.{BACKWARD_OP[name]}: forward-mode"
            ):
                torch.autograd.grad([o.sum() for o in outs], leaves, retain_graph=True)
    if requires_grad:
        # The reverse-mode graph recorded alongside the tangents is intact.
        ref_leaves = [x.clone().requires_grad_() for x in diff]
        ref_outs = rf(*ref_leaves, *rest)
        ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
        grads = torch.autograd.grad([o.sum() for o in outs], leaves)
        grads_ref = torch.autograd.grad([o.sum() for o in ref_outs], ref_leaves)
        _close(grads, grads_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["rmsnorm", "fused_add_rmsnorm", "silu", "swiglu", "rope"])
def test_jvp_in_low_precision_is_close_to_float64(name, dtype):
    mc, rf, _, _ = DIFF[name]
    diff, tangents, rest = _inputs(name, seed=2, dtype=dtype)
    _, tan = torch.func.jvp(_bind(mc, rest), tuple(diff), tuple(tangents))
    up = [t.double() for t in (*diff, *tangents, *rest)]
    n = len(diff)
    _, tan_ref = torch.func.jvp(_bind(rf, up[2 * n :]), tuple(up[:n]), tuple(up[n : 2 * n]))
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    _close(tan, tan_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(DIFF))
def test_jacrev_and_jacfwd_match_float64_reference(name):
    mc, rf, shapes, _ = DIFF[name]
    diff, _, rest = _inputs(name, seed=3)
    argnums = tuple(range(len(shapes)))
    expected = torch.func.jacrev(_bind(rf, rest), argnums=argnums)(*diff)
    _close(
        torch.utils._pytree.tree_leaves(torch.func.jacrev(_bind(mc, rest), argnums=argnums)(*diff)),
        torch.utils._pytree.tree_leaves(expected),
    )
    _close(
        torch.utils._pytree.tree_leaves(torch.func.jacfwd(_bind(mc, rest), argnums=argnums)(*diff)),
        torch.utils._pytree.tree_leaves(expected),
    )


def _loss(fn, rest):
    def f(*xs):
        out = fn(*xs, *rest)
        outs = out if isinstance(out, tuple) else (out,)
        # A weighted sum, so every output element's derivative counts.
        return sum(
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs
        )

    return f


@pytest.mark.parametrize("name", sorted(DIFF))
def test_grad_and_vmap_of_grad_match_float64_reference(name):
    mc, rf, shapes, _ = DIFF[name]
    diff, _, rest = _inputs(name, seed=4)
    argnums = tuple(range(len(shapes)))
    _close(
        torch.func.grad(_loss(mc, rest), argnums=argnums)(*diff),
        torch.func.grad(_loss(rf, rest), argnums=argnums)(*diff),
    )
    # vmap over a batch of the first input (the others shared).
    batch = torch.stack([diff[0], diff[0] * 0.5 + 1.0])

    def per_sample(fn):
        return torch.func.vmap(torch.func.grad(lambda x: _loss(fn, rest)(x, *diff[1:])))

    _close(per_sample(mc)(batch), per_sample(rf)(batch))


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_second_derivatives_of_the_linear_ops_match_float64_reference(name):
    mc, rf, _, _ = DIFF[name]
    diff, tangents, rest = _inputs(name, seed=5)

    def square(fn):
        return lambda q: sum(o.pow(2).sum() for o in fn(q, *diff[1:], *rest))

    _close(torch.func.hessian(square(mc))(diff[0]), torch.func.hessian(square(rf))(diff[0]))
    _close(
        torch.func.grad(lambda q: torch.func.grad(square(mc))(q).pow(2).sum())(diff[0]),
        torch.func.grad(lambda q: torch.func.grad(square(rf))(q).pow(2).sum())(diff[0]),
    )
    # Reverse over forward: the tangent of a linear op is differentiable (in the tangent).
    grads = []
    for fn in (mc, rf):
        tq = tangents[0].clone().requires_grad_()
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(diff[0], tq), *diff[1:], *rest)
            t = fwAD.unpack_dual(out[0]).tangent
        grads.append(torch.autograd.grad(t.pow(2).sum(), tq)[0])
    _close(*grads)


@pytest.mark.parametrize("name", NONLINEAR)
def test_second_derivatives_of_the_nonlinear_ops_are_clear_errors(name):
    mc, _, _, _ = DIFF[name]
    diff, tangents, rest = _inputs(name, seed=6)
    backward_op = BACKWARD_OP[name]
    x0 = diff[0]

    def scalar(x):
        out = mc(x, *diff[1:], *rest)
        return sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)))

    # Forward over reverse (hessian = jacfwd(jacrev)): a tangent reaches the backward op.
    with pytest.raises(RuntimeError, match=rf"metalcore\.{backward_op}: forward-mode AD"):
        torch.func.hessian(scalar)(x0)
    # Reverse over reverse under functorch: a node that raises once differentiated.
    with pytest.raises(RuntimeError, match=rf"metalcore\.{backward_op}: double backward"):
        torch.func.grad(lambda x: torch.func.grad(scalar)(x).pow(2).sum())(x0)
    # ... and with create_graph=True outside functorch: raised at once.
    x = x0.clone().requires_grad_()
    with pytest.raises(RuntimeError, match=rf"metalcore\.{backward_op}: double backward"):
        torch.autograd.grad(scalar(x), x, create_graph=True)
    # Reverse over forward: the tangent of a non-linear op is not differentiable.
    op = name.split("-")[0]
    with fwAD.dual_level():
        out = mc(fwAD.make_dual(x, tangents[0]), *diff[1:], *rest)
        t = fwAD.unpack_dual(out if isinstance(out, torch.Tensor) else out[0]).tangent
    with pytest.raises(RuntimeError, match=rf"metalcore\.{op}: the forward-mode tangent"):
        torch.autograd.grad(t.sum(), x)


def test_backward_ops_reject_tangents_by_name():
    x = torch.randn(3, 8, dtype=torch.float64)
    calls = {
        "silu_backward": lambda g, a: ops.silu_backward(g, a),
        "gelu_backward": lambda g, a: ops.gelu_backward(g, a, "tanh"),
        "swiglu_backward": lambda g, a: ops.swiglu_backward(g, a, a),
        "rmsnorm_backward": lambda g, a: ops.rmsnorm_backward(g, a, None, EPS),
        "fused_add_rmsnorm_backward": lambda g, a: ops.fused_add_rmsnorm_backward(
            g, None, a, None, EPS
        ),
    }
    for op, call in calls.items():
        for which in (0, 1):
            with fwAD.dual_level():
                args = [x, x.clone()]
                args[which] = fwAD.make_dual(args[which], torch.ones_like(x))
                with pytest.raises(RuntimeError, match=rf"metalcore\.{op}: forward-mode AD"):
                    call(*args)


def test_rope_rejects_table_tangents_by_name():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    cos, sin = torch.randn(3, 4), torch.randn(3, 4)
    with fwAD.dual_level():
        dcos = fwAD.make_dual(cos, torch.ones_like(cos))
        with pytest.raises(RuntimeError, match=r"metalcore\.rope: forward-mode tangents of 'cos'"):
            ops.rope(q, k, dcos, sin)


def test_reported_zero_and_missing_tangents():
    # torch.func.jvp over rmsnorm returned a zero tangent; make_dual through silu gave None.
    x = torch.randn(4, 8, dtype=torch.float64)
    t = torch.randn_like(x)
    _, tan = torch.func.jvp(lambda a: metalcore.rmsnorm(a, None, eps=1e-6), (x,), (t,))
    _, tan_ref = torch.func.jvp(lambda a: ref.rmsnorm(a, None, 1e-6), (x,), (t,))
    assert tan.abs().max() > 0.1
    _close(tan, tan_ref)
    with fwAD.dual_level():
        y = metalcore.silu(fwAD.make_dual(x, t))
        assert fwAD.unpack_dual(y).tangent is not None


def test_compiled_autograd_runs_the_backward_nodes():
    # The graph nodes are written out (not torch::autograd::Function): compiled autograd must
    # still trace them, calling the backward ops.
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    q, k = torch.randn(1, 2, 4, 8, requires_grad=True), torch.randn(1, 1, 4, 8)
    cos, sin = torch.randn(4, 8), torch.randn(4, 8)

    def loss(x, w, q):
        y, h = ops.fused_add_rmsnorm(ops.silu(x), x, w, 1e-6)
        qo, ko = ops.rope(q, k, cos, sin, False)
        return (ops.rmsnorm(y, w, 1e-6) * h).sum() + ops.gelu(qo, "tanh").sum() + ko.sum()

    expected = torch.autograd.grad(loss(x, w, q), (x, w, q))

    @torch.compile(backend="aot_eager")
    def step(x, w, q):
        loss(x, w, q).backward()

    with torch._dynamo.config.patch(compiled_autograd=True):
        step(x, w, q)
    _close((x.grad, w.grad, q.grad), expected, rtol=1e-5, atol=1e-6)


# --- 5. The public wrappers -------------------------------------------------------------------


def _x(*shape):
    return torch.randn(*shape)


def _adamw_kwargs():
    p = _x(4, 8)
    return dict(
        params=[p],
        grads=[_x(4, 8)],
        exp_avgs=[torch.zeros(4, 8)],
        exp_avg_sqs=[torch.zeros(4, 8)],
        state_steps=[torch.tensor(0.0)],
        lr=torch.tensor(1e-3, dtype=torch.float64),
        amsgrad=True,
        max_exp_avg_sqs=[torch.zeros(4, 8)],
    )


# Public function -> (op name in messages, builder of valid keyword arguments).
WRAPPERS = {
    "rmsnorm": ("rmsnorm", lambda: dict(input=_x(4, 8), weight=_x(8))),
    "fused_add_rmsnorm": (
        "fused_add_rmsnorm",
        lambda: dict(input=_x(4, 8), residual=_x(4, 8), weight=_x(8)),
    ),
    "silu": ("silu", lambda: dict(input=_x(4, 8))),
    "gelu": ("gelu", lambda: dict(input=_x(4, 8))),
    "swiglu": ("swiglu", lambda: dict(gate=_x(4, 8), up=_x(4, 8))),
    "rope": (
        "rope",
        lambda: dict(q=_x(2, 3, 5, 8), k=_x(2, 1, 5, 8), cos=_x(5, 8), sin=_x(5, 8)),
    ),
    "adamw_step": ("adamw", _adamw_kwargs),
    # LayerNorm family
    "layer_norm": (
        "layer_norm",
        lambda: dict(input=_x(4, 8), normalized_shape=8, weight=_x(8), bias=_x(8)),
    ),
    "fused_add_layer_norm": (
        "fused_add_layer_norm",
        lambda: dict(
            input=_x(4, 8), residual=_x(4, 8), normalized_shape=8, weight=_x(8), bias=_x(8)
        ),
    ),
    # --- Attention
    "attention": ("attention", lambda: dict(q=_x(2, 4, 5, 8), k=_x(2, 2, 6, 8), v=_x(2, 2, 6, 8))),
    "scaled_dot_product_attention": (
        "scaled_dot_product_attention",
        lambda: dict(query=_x(2, 4, 5, 8), key=_x(2, 4, 6, 8), value=_x(2, 4, 6, 8)),
    ),
    # --- Softmax and cross-entropy
    "softmax": ("softmax", lambda: dict(input=_x(4, 8), dim=-1)),
    "log_softmax": ("log_softmax", lambda: dict(input=_x(4, 8), dim=-1)),
    "cross_entropy": (
        "cross_entropy",
        lambda: dict(input=_x(4, 8), target=torch.tensor([0, 3, 7, 1])),
    ),
    "fused_linear_cross_entropy": (
        "fused_linear_cross_entropy",
        lambda: dict(input=_x(4, 8), weight=_x(6, 8), target=torch.tensor([0, 3, 5, 1])),
    ),
    # --- embedding_bag and LoRA linear
    "embedding_bag": (
        "embedding_bag",
        lambda: dict(input=torch.tensor([0, 3, 1]), weight=_x(4, 8), offsets=torch.tensor([0, 2])),
    ),
    "lora_linear": (
        "lora_linear",
        lambda: dict(
            input=_x(4, 8), weight=_x(6, 8), lora_a=_x(2, 8), lora_b=_x(6, 2), scaling=2.0
        ),
    ),
}


def test_every_public_function_is_swept():
    public = {
        name
        for name, fn in inspect.getmembers(metalcore.functional, inspect.isfunction)
        if fn.__module__ == "metalcore.functional" and not name.startswith("_")
    }
    assert public == set(WRAPPERS)
    exported = {n for n in metalcore.__all__ if inspect.isfunction(getattr(metalcore, n))}
    assert exported - {"patch"} == set(WRAPPERS)  # patch: the users' layer's own tests


def _wrapper_positions():
    for fn_name, (_, build) in WRAPPERS.items():
        for key, value in build().items():
            if isinstance(value, torch.Tensor):
                yield fn_name, key, None
            elif isinstance(value, list):
                yield from ((fn_name, key, j) for j in range(len(value)))


WRAPPER_POSITIONS = list(_wrapper_positions())
# Functions with two or more tensor arguments: those can mix devices.
WRAPPER_MIX_POSITIONS = [
    p for p in WRAPPER_POSITIONS if sum(q[0] == p[0] for q in WRAPPER_POSITIONS) > 1
]
BAD_DTYPES = {
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "complex64": torch.complex64,
}


def _wrapper_call(fn_name, key, j, fn):
    op, build = WRAPPERS[fn_name]
    kwargs = build()
    if j is None:
        kwargs[key] = fn(kwargs[key])
        arg = key
    else:
        kwargs[key] = [fn(t) if i == j else t for i, t in enumerate(kwargs[key])]
        arg = f"{key}[{j}]"
    return op, arg, lambda: getattr(metalcore, fn_name)(**kwargs)


def _dtype_param(fn_name, key, j, kind):
    name = key if j is None else f"{key}[{j}]"
    return pytest.param(fn_name, key, j, kind, id=f"{fn_name}-{name}-{kind}")


def _bad_for(fn_name, key, kind) -> bool:
    # Class-index targets are integer tensors: int64 is theirs, the other kinds are bad.
    if key == "target" and kind == "int64":
        return False
    # embedding_bag's indices and offsets: int64 or int32 (one changed alone is a dtype mismatch
    # that names the other argument).
    return not (
        fn_name == "embedding_bag" and key in ("input", "offsets") and kind.startswith("int")
    )


@pytest.mark.parametrize(
    "fn_name,key,j,kind",
    [
        _dtype_param(f, k, j, kind)
        for f, k, j in WRAPPER_POSITIONS
        for kind in BAD_DTYPES
        if _bad_for(f, k, kind)
    ],
)
def test_wrappers_raise_the_ops_dtype_error(fn_name, key, j, kind):
    dtype = BAD_DTYPES[kind]
    op, arg, call = _wrapper_call(fn_name, key, j, lambda t: t.to(dtype))
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value).startswith(f"metalcore.{op}: '{arg}'"), str(info.value)


@pytest.mark.parametrize(
    "fn_name,key,j",
    WRAPPER_MIX_POSITIONS,
    ids=[f"{f}-{k}" + ("" if j is None else f"[{j}]") for f, k, j in WRAPPER_MIX_POSITIONS],
)
def test_wrappers_raise_the_ops_device_error(fn_name, key, j):
    # One argument on meta, the others on the CPU (tests/cuda mixes CPU and CUDA tensors).
    op, arg, call = _wrapper_call(fn_name, key, j, lambda t: t.to("meta"))
    err = _raised(call)
    assert isinstance(err, RuntimeError), repr(err)
    msg = str(err)
    assert msg.startswith(f"metalcore.{op}: ") and f"'{arg}'" in msg and "device" in msg, msg


@pytest.mark.parametrize(
    "lr", [[0.1], None, "0.1", True, (0.1,)], ids=["list", "None", "str", "bool", "tuple"]
)
def test_adamw_step_rejects_an_lr_that_is_not_a_number(lr):
    kwargs = _adamw_kwargs()
    kwargs["lr"] = lr
    with pytest.raises(TypeError, match=r"^metalcore\.adamw: 'lr' must be a float or a 0-dim"):
        metalcore.adamw_step(**kwargs)


def test_adamw_step_rejects_a_tensor_where_a_list_belongs():
    # A tensor iterates over its rows: each row would have been stepped as a param of its own.
    kwargs = _adamw_kwargs()
    kwargs["params"] = kwargs["params"][0]
    with pytest.raises(TypeError, match=r"^metalcore\.adamw: 'params' must be a list of tensors"):
        metalcore.adamw_step(**kwargs)


def test_adamw_step_still_takes_numbers_and_iterables():
    kwargs = _adamw_kwargs()
    kwargs["lr"] = 1e-3
    kwargs["params"] = tuple(kwargs["params"])
    kwargs["grads"] = iter(kwargs["grads"])
    metalcore.adamw_step(**kwargs)
    assert float(kwargs["state_steps"][0]) == 1.0


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
def test_default_eps_is_torchs(dtype):
    # F.rms_norm's default eps is float32's machine epsilon for 16-bit and float32 input
    # (float64's for float64), not finfo(dtype).eps: with bfloat16's (7.8e-3) a row of 0.01s
    # normalised to 0.11 instead of 1.
    x = torch.full((3, 64), 0.01, dtype=dtype)
    y = metalcore.rmsnorm(x)
    torch.testing.assert_close(y, F.rms_norm(x, (64,)))
    torch.testing.assert_close(
        y.double(), torch.ones(3, 64, dtype=torch.float64), rtol=0, atol=1e-2
    )
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(y, ops.rmsnorm(x, None, torch.finfo(opmath).eps))
    r = torch.full_like(x, 0.02)
    out, h = metalcore.fused_add_rmsnorm(x, r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (64,)))
    assert torch.equal(out, ops.fused_add_rmsnorm(x, r, None, torch.finfo(opmath).eps)[0])


def test_adamw_refuses_leaves_that_require_grad_with_grad_mode_on():
    # torch's in-place ops raise here: the update of a leaf that requires grad would be invisible
    # to autograd. Optimizers step under torch.no_grad().
    def state():
        p = torch.nn.Parameter(torch.randn(4, 3))
        zeros = [torch.zeros(4, 3), torch.zeros(4, 3)]
        return [p], [torch.randn(4, 3)], [zeros[0]], [zeros[1]], [torch.zeros(())]

    p, g, m, v, s = state()
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        p[0].mul_(0.5)
    before = p[0].detach().clone()
    with pytest.raises(
        RuntimeError, match=r"metalcore\.adamw: 'params\[0\]' is a leaf tensor that requires grad"
    ):
        metalcore.adamw_step(p, g, m, v, s, lr=torch.tensor(1e-3))
    assert torch.equal(p[0].detach(), before) and float(s[0]) == 0.0  # nothing was written
    with torch.no_grad():
        metalcore.adamw_step(p, g, m, v, s, lr=torch.tensor(1e-3))
    assert not torch.equal(p[0].detach(), before) and float(s[0]) == 1.0
