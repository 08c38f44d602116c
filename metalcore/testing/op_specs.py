"""One test specification per ``metalcore::`` operator, shared by the reliability tests.

The fuzzer, the leak, thread and determinism tests and the error-table generator all read this
registry, so an op is covered everywhere by adding one :class:`OpSpec`, and an op registered in
the dispatcher without a spec fails ``tests/reliability/test_fuzz.py``.

A spec says how to draw valid inputs (shapes, dtypes, memory layouts, special values), which
float64 reference to compare against and with which tolerances, and which bad inputs must be
rejected with which exception. Inputs are drawn through a :class:`Drawer`, so the same code serves
hypothesis (shrinking, example database) and plain seeded runs (the sanitizer smoke, the leak and
thread tests).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import reference as ref

# --- Drawing ---------------------------------------------------------------------------------


class Drawer:
    """Source of choices for input generation."""

    def integer(self, lo: int, hi: int, label: str = "") -> int:
        raise NotImplementedError

    def choice(self, options: Sequence, label: str = ""):
        raise NotImplementedError

    def boolean(self, p: float = 0.5, label: str = "") -> bool:
        raise NotImplementedError


class RandomDrawer(Drawer):
    """Seeded choices: ``RandomDrawer(seed)`` always yields the same sample."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def integer(self, lo, hi, label=""):
        return self.rng.randint(lo, hi)

    def choice(self, options, label=""):
        return options[self.rng.randrange(len(options))]

    def boolean(self, p=0.5, label=""):
        return self.rng.random() < p


class HypothesisDrawer(Drawer):
    """Choices drawn from ``hypothesis.strategies.data()``, labelled so a failing example prints
    every choice, and shrinking towards the first option of each choice (the simplest case)."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self._st = st
        self.data = data

    def integer(self, lo, hi, label=""):
        return self.data.draw(self._st.integers(lo, hi), label=label or None)

    def choice(self, options, label=""):
        return self.data.draw(self._st.sampled_from(list(options)), label=label or None)

    def boolean(self, p=0.5, label=""):
        # Shrinks to 0, i.e. to False: the plain case.
        return self.data.draw(self._st.integers(0, 999), label=label or None) >= 1000 * (1 - p)


# --- Tensor arguments with a memory layout ---------------------------------------------------

# contiguous; offset: a view with a storage offset; transposed: two dims swapped in memory;
# sliced: every step-th element along a dim; padded: a narrow of a larger dim (row stride larger
# than the row); expanded: a size-1 dim broadcast with stride 0 (read-only arguments only).
LAYOUTS = ("contiguous", "offset", "transposed", "sliced", "padded", "expanded")
READ_LAYOUTS = LAYOUTS
WRITE_LAYOUTS = ("contiguous", "offset", "transposed", "sliced", "padded")


@dataclass
class TensorArg:
    """Logical values (CPU, contiguous) plus the memory layout to present them in."""

    values: torch.Tensor
    layout: str = "contiguous"
    dims: tuple = ()

    def materialize(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A fresh tensor on ``device`` with these values in this layout. Storage outside the
        view is NaN, so a kernel that reads past its view shows it in the results."""
        v = self.values
        nan = float("nan")
        if self.layout == "contiguous" or v.dim() == 0 and self.layout != "offset":
            return v.clone().to(device)
        if self.layout == "offset":
            (k,) = self.dims
            buf = torch.full((v.numel() + k,), nan, dtype=v.dtype, device=device)
            out = buf[k:].view(v.shape)
            out.copy_(v)
            return out
        if self.layout == "transposed":
            a, b = self.dims
            return v.transpose(a, b).clone().contiguous().to(device).transpose(a, b)
        if self.layout == "sliced":
            d, step = self.dims
            shape = list(v.shape)
            shape[d] *= step
            big = torch.full(shape, nan, dtype=v.dtype, device=device)
            idx = [slice(None)] * v.dim()
            idx[d] = slice(0, None, step)
            out = big[tuple(idx)]
            out.copy_(v)
            return out
        if self.layout == "padded":
            d, pad = self.dims
            shape = list(v.shape)
            shape[d] += pad
            big = torch.full(shape, nan, dtype=v.dtype, device=device)
            out = big.narrow(d, pad // 2, v.shape[d])
            out.copy_(v)
            return out
        if self.layout == "expanded":
            (d,) = self.dims
            if v.shape[d] == 0:
                return v.clone().to(device)
            return v.narrow(d, 0, 1).clone().to(device).expand(v.shape)
        raise ValueError(f"unknown layout {self.layout!r}")

    def describe(self) -> str:
        dt = str(self.values.dtype).replace("torch.", "")
        lay = self.layout + (str(list(self.dims)) if self.dims else "")
        return f"{dt}{list(self.values.shape)} {lay}"


def draw_layout(d: Drawer, values: torch.Tensor, allowed: Sequence[str], label: str) -> TensorArg:
    """Wraps ``values`` in a layout drawn from ``allowed`` (those that fit its shape)."""
    nd = values.dim()
    options = [
        lay
        for lay in allowed
        if lay in ("contiguous", "offset")
        or (lay == "transposed" and nd >= 2)
        or (lay in ("sliced", "padded") and nd >= 1)
        or (lay == "expanded" and nd >= 1)
    ]
    layout = d.choice(options, label=f"{label}.layout")
    if layout == "contiguous":
        return TensorArg(values)
    if layout == "offset":
        return TensorArg(values, layout, (d.integer(1, 9, label=f"{label}.offset"),))
    if layout == "transposed":
        a = d.integer(0, nd - 2, label=f"{label}.dim_a")
        b = d.integer(a + 1, nd - 1, label=f"{label}.dim_b")
        return TensorArg(values, layout, (a, b))
    if layout == "sliced":
        dim = d.integer(0, nd - 1, label=f"{label}.dim")
        return TensorArg(values, layout, (dim, d.integer(2, 3, label=f"{label}.step")))
    if layout == "padded":
        dim = d.integer(0, nd - 1, label=f"{label}.dim")
        return TensorArg(values, layout, (dim, d.integer(1, 9, label=f"{label}.pad")))
    # expanded: broadcast one dim; the values become constant along it.
    dim = d.integer(0, nd - 1, label=f"{label}.dim")
    if values.shape[dim] > 0:
        values = values.narrow(dim, 0, 1).expand(values.shape).contiguous()
    return TensorArg(values, layout, (dim,))


# --- Values ----------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def special_values(dtype: torch.dtype, large: float | None = None) -> list[float]:
    """NaN, +-Inf, +-0, a denormal, the smallest normal and a very large magnitude."""
    fi = torch.finfo(dtype)
    big = fi.max / 2 if large is None else min(large, fi.max / 2)
    return [
        float("nan"),
        float("inf"),
        float("-inf"),
        0.0,
        -0.0,
        fi.smallest_normal / 4,  # denormal
        -fi.smallest_normal,
        big,
        -big,
    ]


def draw_values(
    d: Drawer,
    shape: Sequence[int],
    dtype: torch.dtype,
    label: str,
    *,
    specials: bool = True,
    large: float | None = None,
    positive: bool = False,
) -> torch.Tensor:
    """Random values of a drawn magnitude, with a few drawn special values at drawn positions."""
    seed = d.integer(0, 2**31 - 1, label=f"{label}.seed")
    scale = d.choice([1.0, 3.0, 1e-3, 1e3], label=f"{label}.scale")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale
    if positive:
        x = x.abs()
    x = x.to(dtype)
    n = x.numel()
    if specials and n > 0 and d.boolean(0.3, label=f"{label}.has_specials"):
        flat = x.view(-1)
        pool = special_values(dtype, large)
        if positive:
            pool = [v for v in pool if not (v < 0 or math.copysign(1.0, v) < 0)]
        for i in range(d.integer(1, 3, label=f"{label}.n_specials")):
            pos = d.integer(0, n - 1, label=f"{label}.special_pos{i}")
            flat[pos] = d.choice(pool, label=f"{label}.special{i}")
    return x


# Sizes around the CPU vector widths (4 doubles, 8 floats, 16 reduced lanes), primes, 0 and 1.
SMALL_SIZES = (0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 16, 17, 31, 32, 33)
ROW_SIZES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 127, 257, 1024, 4099)
# Element counts straddling the 32768-element parallel grain of the CPU kernels, so the multi-task
# split and its tails are exercised.
GRAIN_SIZES = (32767, 32768, 32769, 65537)


def draw_shape(d: Drawer, label: str, max_dim: int = 4) -> tuple[int, ...]:
    if d.boolean(0.1, label=f"{label}.large"):
        numel = d.choice(GRAIN_SIZES, label=f"{label}.numel")
        return d.choice([(numel,), (1, numel), (numel, 1)], label=f"{label}.shape")
    nd = d.integer(0, max_dim, label=f"{label}.ndim")
    return tuple(d.choice(SMALL_SIZES, label=f"{label}.size{i}") for i in range(nd))


def draw_dtype(d: Drawer, label: str = "dtype") -> torch.dtype:
    return d.choice(list(FLOAT_DTYPES), label=label)


# --- Specs -----------------------------------------------------------------------------------


@dataclass
class Sample:
    """Arguments of one op call: TensorArg, lists of TensorArg, or plain values."""

    args: list
    kwargs: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    info: dict = field(default_factory=dict)

    def materialize(self, device: torch.device | str = "cpu") -> tuple[list, dict]:
        def conv(a):
            if isinstance(a, TensorArg):
                return a.materialize(device)
            if isinstance(a, (list, tuple)) and a and isinstance(a[0], TensorArg):
                return [x.materialize(device) for x in a]
            return a

        return [conv(a) for a in self.args], {k: conv(v) for k, v in self.kwargs.items()}

    def describe(self) -> str:
        def desc(a):
            if isinstance(a, TensorArg):
                return a.describe()
            if isinstance(a, (list, tuple)) and a and isinstance(a[0], TensorArg):
                return "[" + ", ".join(x.describe() for x in a) + "]"
            return repr(a)

        parts = [desc(a) for a in self.args] + [f"{k}={desc(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


@dataclass
class Tolerance:
    """``|actual - expected| <= atol * scale + rtol * |expected|``, where scale is the median
    magnitude of the finite expected values (per row when ``per_row``), so tolerances follow the
    drawn input magnitude, and special values elsewhere in the tensor do not loosen them."""

    rtol: float
    atol: float
    per_row: bool = False
    # Overrides the median-magnitude scale (broadcastable to the output), for outputs that are
    # small differences of large terms: their error follows the terms, not the result.
    scale: torch.Tensor | None = None


# Output rounding plus fp32 accumulation, from a float64 reference on the same inputs.
ELEMENTWISE_TOL = {
    torch.float64: Tolerance(1e-10, 1e-10),
    torch.float32: Tolerance(1e-5, 1e-5),
    torch.float16: Tolerance(2e-3, 2e-3),
    torch.bfloat16: Tolerance(1.6e-2, 1.6e-2),
}
# Backward formulas combine several rounded terms (cancellation near the function's extrema).
BACKWARD_TOL = {
    torch.float64: Tolerance(1e-9, 1e-9),
    torch.float32: Tolerance(1e-4, 1e-4),
    torch.float16: Tolerance(4e-3, 4e-3),
    torch.bfloat16: Tolerance(3.2e-2, 3.2e-2),
}


@dataclass
class BadInput:
    """A call that must be rejected: ``make()`` returns (args, kwargs) on CPU."""

    description: str
    make: Callable[[], tuple[list, dict]]
    error: type[BaseException]
    match: str


@dataclass
class OpSpec:
    name: str
    draw: Callable[[Drawer], Sample]
    # Expected outputs (float64 or the output dtype) from CPU-materialized args.
    reference: Callable[..., tuple[torch.Tensor, ...]]
    tolerances: Callable[[Sample, int], Tolerance]
    bad_inputs: list[BadInput]
    # Indices of positional args the op writes (in-place ops); their after-call values are
    # the outputs that get compared. Empty: a functional op, whose inputs must stay untouched.
    mutated_args: tuple[int, ...] = ()
    # Runs forward + backward through autograd (leak and thread tests); None: not differentiable
    # (the backward ops, which are called directly).
    autograd: Callable[[list, dict], list[torch.Tensor]] | None = None
    namespace: str = "metalcore"

    def overload(self, namespace: str | None = None):
        return getattr(getattr(torch.ops, namespace or self.namespace), self.name).default

    def outputs(self, args: list, result) -> tuple[torch.Tensor, ...]:
        """The tensors to compare after a call: the results, or the mutated args."""
        if self.mutated_args:
            outs: list[torch.Tensor] = []
            for i in self.mutated_args:
                outs.extend(args[i] if isinstance(args[i], (list, tuple)) else [args[i]])
            return tuple(outs)
        if isinstance(result, torch.Tensor):
            return (result,)
        return tuple(result)


def _tol_table(table: dict[torch.dtype, Tolerance], per_row: bool = False):
    def tol(sample: Sample, index: int) -> Tolerance:
        t = table[sample.dtype]
        return Tolerance(t.rtol, t.atol, per_row)

    return tol


# --- RMSNorm family --------------------------------------------------------------------------

# The kernels accumulate sum(x^2) in float32 for float32/16-bit inputs (the documented contract,
# as torch.nn.functional.rms_norm): "very large" values are capped so that a row's sum of squares
# stays finite in float32; larger ones overflow by design, not by bug.
_RMS_LARGE = 1e15


def _rms_eps(d: Drawer) -> float:
    return d.choice([1e-6, 1e-5, 0.0, 0.5], label="eps")


def _draw_rms_common(d: Drawer, label: str = "input"):
    dtype = draw_dtype(d)
    if d.boolean(0.1, label="large_rows"):
        # Many rows: several parallel tasks, each a block of rows.
        lead = (d.choice([33, 65, 129], label="rows"),)
        n = d.choice([1024, 4099], label="n")
    else:
        nd = d.integer(0, 3, label="lead_ndim")
        lead = tuple(d.choice(SMALL_SIZES[:12], label=f"lead{i}") for i in range(nd))
        n = d.choice((0,) + ROW_SIZES, label="n")
    return dtype, lead + (n,)


def _draw_weight(d: Drawer, n: int, dtype: torch.dtype):
    if not d.boolean(0.7, label="has_weight"):
        return None
    w = draw_values(d, (n,), dtype, "weight", large=_RMS_LARGE)
    return draw_layout(d, w, READ_LAYOUTS, "weight")


def _draw_rmsnorm(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    x = draw_layout(d, draw_values(d, shape, dtype, "input", large=_RMS_LARGE), LAYOUTS, "input")
    return Sample([x, _draw_weight(d, shape[-1], dtype), _rms_eps(d)], dtype=dtype)


def _draw_rmsnorm_backward(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    g = draw_layout(d, draw_values(d, shape, dtype, "grad_out", large=_RMS_LARGE), LAYOUTS, "g")
    x = draw_layout(d, draw_values(d, shape, dtype, "input", large=_RMS_LARGE), LAYOUTS, "input")
    return Sample([g, x, _draw_weight(d, shape[-1], dtype), _rms_eps(d)], dtype=dtype)


def _draw_fused_add(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    x = draw_layout(d, draw_values(d, shape, dtype, "input", large=_RMS_LARGE), LAYOUTS, "input")
    r = draw_layout(d, draw_values(d, shape, dtype, "residual", large=_RMS_LARGE), LAYOUTS, "res")
    return Sample([x, r, _draw_weight(d, shape[-1], dtype), _rms_eps(d)], dtype=dtype)


def _draw_fused_add_backward(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    g = draw_layout(d, draw_values(d, shape, dtype, "grad_out", large=_RMS_LARGE), LAYOUTS, "g")
    gr = None
    if d.boolean(0.7, label="has_grad_residual_out"):
        gr = draw_layout(
            d, draw_values(d, shape, dtype, "grad_res", large=_RMS_LARGE), LAYOUTS, "grad_res"
        )
    h = draw_layout(d, draw_values(d, shape, dtype, "res_out", large=_RMS_LARGE), LAYOUTS, "h")
    return Sample([g, gr, h, _draw_weight(d, shape[-1], dtype), _rms_eps(d)], dtype=dtype)


def _ref_rmsnorm(x, w, eps):
    return (ref.rmsnorm(x.double(), None if w is None else w.double(), eps),)


def _ref_rmsnorm_backward(g, x, w, eps):
    dx, dw = ref.rmsnorm_backward(g, x, w, eps)
    return dx, (dw if w is not None else torch.zeros(0, dtype=torch.float64))


def _ref_fused_add(x, r, w, eps):
    h = x + r  # rounded to the input dtype once, as the op's contract says
    return ref.rmsnorm(h.double(), None if w is None else w.double(), eps), h


def _ref_fused_add_backward(g, gr, h, w, eps):
    dh, dw = ref.rmsnorm_backward(g, h, w, eps)
    if gr is not None:
        dh = dh + gr.double()
    return dh, (dw if w is not None else torch.zeros(0, dtype=torch.float64))


def _rms_grad_scale(g: TensorArg, x: TensorArg, w: TensorArg | None, eps: float) -> torch.Tensor:
    """Per-row magnitude of the terms of dx = rstd * g * w - x * rstd^3 * mean(g * w * x): dx is
    their difference (tiny for short rows, zero for N = 1 and eps = 0), so its rounding error
    follows |g * w| * rstd rather than |dx|."""
    gv, xv = g.values.double(), x.values.double()
    gw = gv * w.values.double() if w is not None else gv
    rstd = torch.rsqrt(xv.pow(2).mean(-1, keepdim=True) + eps)
    t = (gw.abs() * rstd).where(torch.isfinite(gw * rstd), torch.full_like(gv, float("nan")))
    t = t.where(t > 0, torch.full_like(t, float("nan")))
    if t.numel() == 0:
        return torch.ones(())
    return torch.nan_to_num(t.nanmedian(dim=-1, keepdim=True).values, nan=1.0)


def _rms_tol(table, backward: tuple[int, int, int] | None = None):
    """``backward``: positions of (grad_out, input, weight) in the args of a backward op."""

    def tol(sample: Sample, index: int) -> Tolerance:
        t = table[sample.dtype]
        if backward is None:
            return Tolerance(t.rtol, t.atol, per_row=True)
        g, x, w = (sample.args[i] for i in backward)
        if index == 1:
            # grad_weight sums over rows: the error grows with the row count.
            n = max(1, x.values.shape[-1])
            rows = max(1, x.values.numel() // n)
            s = math.sqrt(rows)
            return Tolerance(t.rtol * s, t.atol * s)
        return Tolerance(t.rtol, t.atol, scale=_rms_grad_scale(g, x, w, sample.args[-1]))

    return tol


def _bad_rms() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731

    def common(op, extra, name="input"):
        # The normalised tensor is named in every message (residual_out in the fused backward).
        return [
            BadInput(
                f"integer {name}",
                lambda: ([*extra(torch.ones(4, 8, dtype=torch.int32)), None, 1e-6], {}),
                TypeError,
                rf"metalcore\.{op}: '{name}' must be float16, bfloat16, float32 or float64, "
                r"got Int",
            ),
            BadInput(
                f"0-d {name}",
                lambda: ([*extra(torch.tensor(1.0)), None, 1e-6], {}),
                ValueError,
                rf"metalcore\.{op}: '{name}' must have at least 1 dimension",
            ),
            BadInput(
                "weight of the wrong size",
                lambda: ([*extra(x(4, 8)), x(7), 1e-6], {}),
                ValueError,
                rf"metalcore\.{op}: 'weight' must have shape \[8\] \(the last dim of '{name}'\)",
            ),
            BadInput(
                "weight of another dtype",
                lambda: ([*extra(x(4, 8)), x(8, dtype=torch.float64), 1e-6], {}),
                TypeError,
                rf"metalcore\.{op}: 'weight' must have the same dtype as '{name}'",
            ),
            BadInput(
                "weight on another device",
                lambda: ([*extra(x(4, 8)), torch.empty(8, device="meta"), 1e-6], {}),
                RuntimeError,
                rf"metalcore\.{op}: 'weight' must be on the same device as '{name}'",
            ),
            BadInput(
                "negative eps",
                lambda: ([*extra(x(4, 8)), None, -1.0], {}),
                ValueError,
                rf"metalcore\.{op}: 'eps' must be >= 0, got -1",
            ),
            BadInput(
                "NaN eps",
                lambda: ([*extra(x(4, 8)), None, float("nan")], {}),
                ValueError,
                rf"metalcore\.{op}: 'eps' must be >= 0, got nan",
            ),
        ]

    return {
        "rmsnorm": common("rmsnorm", lambda t: [t]),
        "rmsnorm_backward": common("rmsnorm_backward", lambda t: [t.clone(), t])
        + [
            BadInput(
                "grad_out of another shape",
                lambda: ([x(3, 8), x(4, 8), None, 1e-6], {}),
                ValueError,
                r"metalcore\.rmsnorm_backward: 'grad_out' must have the same shape as 'input'",
            ),
            BadInput(
                "grad_out of another dtype",
                lambda: ([x(4, 8, dtype=torch.float16), x(4, 8), None, 1e-6], {}),
                TypeError,
                r"metalcore\.rmsnorm_backward: 'grad_out' must have the same dtype as 'input'",
            ),
        ],
        "fused_add_rmsnorm": common("fused_add_rmsnorm", lambda t: [t, t.clone()])
        + [
            BadInput(
                "residual of another shape",
                lambda: ([x(4, 8), x(4, 9), None, 1e-6], {}),
                ValueError,
                r"metalcore\.fused_add_rmsnorm: 'residual' must have the same shape as 'input'",
            ),
            BadInput(
                "residual of another dtype",
                lambda: ([x(4, 8), x(4, 8, dtype=torch.bfloat16), None, 1e-6], {}),
                TypeError,
                r"metalcore\.fused_add_rmsnorm: 'residual' must have the same dtype as 'input'",
            ),
            BadInput(
                "integer residual",
                lambda: ([x(4, 8), torch.ones(4, 8, dtype=torch.int64), None, 1e-6], {}),
                TypeError,
                r"metalcore\.fused_add_rmsnorm: 'residual' must be float16, bfloat16, float32 or "
                r"float64, got Long",
            ),
        ],
        "fused_add_rmsnorm_backward": common(
            "fused_add_rmsnorm_backward", lambda t: [t.clone(), None, t], "residual_out"
        )
        + [
            BadInput(
                "grad_residual_out of another shape",
                lambda: ([x(4, 8), x(2, 8), x(4, 8), None, 1e-6], {}),
                ValueError,
                r"metalcore\.fused_add_rmsnorm_backward: 'grad_residual_out' must have the same "
                r"shape as 'residual_out'",
            ),
            BadInput(
                "grad_out of another dtype",
                lambda: ([x(4, 8, dtype=torch.float64), None, x(4, 8), None, 1e-6], {}),
                TypeError,
                r"metalcore\.fused_add_rmsnorm_backward: 'grad_out' must have the same dtype as "
                r"'residual_out'",
            ),
        ],
    }


def _autograd_rmsnorm(args, kwargs):
    x, w, eps = args
    leaves = [x.detach().requires_grad_()] + (
        [w.detach().requires_grad_()] if w is not None else []
    )
    y = torch.ops.metalcore.rmsnorm(leaves[0], leaves[1] if w is not None else None, eps)
    y.backward(torch.ones_like(y))
    return [y] + [t.grad for t in leaves]


def _autograd_fused_add(args, kwargs):
    x, r, w, eps = args
    leaves = [t.detach().requires_grad_() for t in (x, r)]
    wl = w.detach().requires_grad_() if w is not None else None
    y, h = torch.ops.metalcore.fused_add_rmsnorm(leaves[0], leaves[1], wl, eps)
    torch.autograd.backward((y, h), (torch.ones_like(y), torch.ones_like(h)))
    return [y, h] + [t.grad for t in leaves] + ([wl.grad] if wl is not None else [])


# --- Activations -----------------------------------------------------------------------------


def _draw_unary(d: Drawer, names: Sequence[str]) -> tuple[torch.dtype, list[TensorArg]]:
    dtype = draw_dtype(d)
    shape = draw_shape(d, "shape")
    return dtype, [draw_layout(d, draw_values(d, shape, dtype, n), LAYOUTS, n) for n in names]


def _approximate(d: Drawer) -> str:
    return d.choice(["none", "tanh"], label="approximate")


def _draw_silu(d):
    dtype, (x,) = _draw_unary(d, ["input"])
    return Sample([x], dtype=dtype)


def _draw_silu_backward(d):
    dtype, (g, x) = _draw_unary(d, ["grad_out", "input"])
    return Sample([g, x], dtype=dtype)


def _draw_gelu(d):
    dtype, (x,) = _draw_unary(d, ["input"])
    return Sample([x, _approximate(d)], dtype=dtype)


def _draw_gelu_backward(d):
    dtype, (g, x) = _draw_unary(d, ["grad_out", "input"])
    return Sample([g, x, _approximate(d)], dtype=dtype)


def _draw_swiglu(d):
    dtype, (a, b) = _draw_unary(d, ["gate", "up"])
    return Sample([a, b], dtype=dtype)


def _draw_swiglu_backward(d):
    dtype, (g, a, b) = _draw_unary(d, ["grad_out", "gate", "up"])
    return Sample([g, a, b], dtype=dtype)


def _gelu64(approximate):
    def f(x):
        if approximate == "tanh":
            inner = (2.0 / math.pi) ** 0.5 * (x + 0.044715 * x.pow(3))
            return x * torch.sigmoid(2.0 * inner)  # = 0.5 x (1 + tanh u), without cancellation
        # erfc, not 1 + erf: exact to float64 precision in the negative tail.
        return 0.5 * x * torch.erfc(-x / 2.0**0.5)

    return f


def _bad_activation() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    i32 = lambda: torch.ones(4, 8, dtype=torch.int32)  # noqa: E731

    def int_input(op, build, arg):
        return BadInput(
            "integer input",
            lambda: (build(i32()), {}),
            TypeError,
            rf"metalcore\.{op}: '{arg}' must be float16, bfloat16, float32 or float64, got Int",
        )

    def complex_input(op, build, arg):
        return BadInput(
            "complex input",
            lambda: (build(torch.ones(3, dtype=torch.complex64)), {}),
            TypeError,
            rf"metalcore\.{op}: '{arg}' must be float16, bfloat16, float32 or float64, got "
            r"ComplexFloat",
        )

    def mismatch(op, desc, build, arg, ref_arg, error, what):
        return BadInput(
            desc,
            lambda: (build(), {}),
            error,
            rf"metalcore\.{op}: '{arg}' must have the same {what} as '{ref_arg}'",
        )

    bad_approx = lambda op, build: BadInput(  # noqa: E731
        "unknown approximate",
        lambda: (build("fast"), {}),
        ValueError,
        rf"metalcore\.{op}: 'approximate' must be 'none' or 'tanh', got 'fast'",
    )
    return {
        "silu": [
            int_input("silu", lambda t: [t], "input"),
            complex_input("silu", lambda t: [t], "input"),
        ],
        "silu_backward": [
            int_input("silu_backward", lambda t: [t.float(), t], "input"),
            mismatch(
                "silu_backward",
                "grad_out of another shape",
                lambda: [x(3), x(4, 8)],
                "grad_out",
                "input",
                ValueError,
                "shape",
            ),
            mismatch(
                "silu_backward",
                "grad_out of another dtype",
                lambda: [x(4, 8, dtype=torch.float16), x(4, 8)],
                "grad_out",
                "input",
                TypeError,
                "dtype",
            ),
        ],
        "gelu": [
            int_input("gelu", lambda t: [t, "none"], "input"),
            bad_approx("gelu", lambda a: [x(4, 8), a]),
        ],
        "gelu_backward": [
            int_input("gelu_backward", lambda t: [t.float(), t, "none"], "input"),
            bad_approx("gelu_backward", lambda a: [x(4, 8), x(4, 8), a]),
            mismatch(
                "gelu_backward",
                "grad_out of another shape",
                lambda: [x(4, 9), x(4, 8), "tanh"],
                "grad_out",
                "input",
                ValueError,
                "shape",
            ),
        ],
        "swiglu": [
            int_input("swiglu", lambda t: [t, t], "gate"),
            mismatch(
                "swiglu",
                "up of another shape",
                lambda: [x(4, 8), x(4, 9)],
                "up",
                "gate",
                ValueError,
                "shape",
            ),
            mismatch(
                "swiglu",
                "up of another dtype",
                lambda: [x(4, 8), x(4, 8, dtype=torch.float16)],
                "up",
                "gate",
                TypeError,
                "dtype",
            ),
        ],
        "swiglu_backward": [
            int_input("swiglu_backward", lambda t: [t.float(), t, t], "gate"),
            mismatch(
                "swiglu_backward",
                "grad_out of another shape",
                lambda: [x(8), x(4, 8), x(4, 8)],
                "grad_out",
                "gate",
                ValueError,
                "shape",
            ),
            mismatch(
                "swiglu_backward",
                "up of another dtype",
                lambda: [x(4, 8), x(4, 8), x(4, 8, dtype=torch.bfloat16)],
                "up",
                "gate",
                TypeError,
                "dtype",
            ),
        ],
    }


def _autograd_unary(op_name, extra=()):
    def run(args, kwargs):
        x = args[0].detach().requires_grad_()
        y = getattr(torch.ops.metalcore, op_name)(x, *extra)
        y.backward(torch.ones_like(y))
        return [y, x.grad]

    return run


def _autograd_gelu(args, kwargs):
    x = args[0].detach().requires_grad_()
    y = torch.ops.metalcore.gelu(x, args[1])
    y.backward(torch.ones_like(y))
    return [y, x.grad]


def _autograd_swiglu(args, kwargs):
    a, b = (t.detach().requires_grad_() for t in args)
    y = torch.ops.metalcore.swiglu(a, b)
    y.backward(torch.ones_like(y))
    return [y, a.grad, b.grad]


# --- RoPE --------------------------------------------------------------------------------------

ROPE_HEAD_DIMS = (2, 4, 6, 8, 16, 18, 32, 34, 64, 66, 128)
# Outputs are x * cos + y * sin in float32 opmath: a product beyond 3e38 overflows there (as in
# the unfused float32 formula) where the float64 reference stays finite, so special magnitudes
# stay at 1e18 (products up to 1e36).
_ROPE_LARGE = 1e18


def _draw_rope_args(d: Drawer, q_name: str, k_name: str) -> Sample:
    dtype = draw_dtype(d)
    b = d.choice([1, 2, 3], label="batch")
    hq = d.choice([1, 2, 3, 5, 0], label="q_heads")
    hk = d.choice([1, 2, hq, 0], label="k_heads")
    if d.boolean(0.05, label="long_seq"):
        s, hd = d.choice([257, 1031], label="seq"), 128
    else:
        s = d.choice([1, 2, 7, 16, 17, 33, 0], label="seq")
        hd = d.choice(ROPE_HEAD_DIMS, label="head_dim")
    # rot: full, half (partial rotary), the smallest pair, or none (pure pass-through).
    rot = d.choice(sorted({hd, 2 * max(1, hd // 4), 2, 0}, reverse=True), label="rot")
    q = draw_layout(
        d,
        draw_values(d, (b, hq, s, hd), dtype, q_name, large=_ROPE_LARGE),
        LAYOUTS,
        q_name,
    )
    k = draw_layout(
        d,
        draw_values(d, (b, hk, s, hd), dtype, k_name, large=_ROPE_LARGE),
        LAYOUTS,
        k_name,
    )
    reduced = dtype in (torch.float16, torch.bfloat16)
    tdtype = torch.float32 if reduced and d.boolean(label="fp32_tables") else dtype
    form = d.choice(["2d", "3d", "batch1"], label="table_form")
    tshape = {"2d": (s, rot), "3d": (b, s, rot), "batch1": (1, s, rot)}[form]
    # Arbitrary (not rotation-shaped) tables, so every coefficient position is exercised.
    cos = draw_layout(
        d,
        draw_values(d, tshape, tdtype, "cos", large=_ROPE_LARGE),
        LAYOUTS,
        "cos",
    )
    sin = draw_layout(
        d,
        draw_values(d, tshape, tdtype, "sin", large=_ROPE_LARGE),
        LAYOUTS,
        "sin",
    )
    return Sample([q, k, cos, sin, d.boolean(label="interleaved")], dtype=dtype)


def _rope_terms(x: TensorArg, cos: TensorArg, sin: TensorArg, interleaved: bool, transposed: bool):
    """|x| * |cos| + |rotate(x)| * |sin| (|rotate(sin)| for the transposed map): the magnitude of
    the two products each output sums, which its rounding error follows (their difference can
    be far smaller than either)."""
    rotate = ref.rotate_every_two if interleaved else ref.rotate_half
    c, s = cos.values.double(), sin.values.double()
    if c.dim() == 3:
        c, s = c.unsqueeze(1), s.unsqueeze(1)
    rot = c.shape[-1]
    xd = x.values.double()
    xr, xp = xd[..., :rot], xd[..., rot:]
    s_term = rotate(s).abs() if transposed else s.abs()
    return torch.cat((xr.abs() * c.abs() + rotate(xr).abs() * s_term, xp.abs()), dim=-1)


def _rope_tol(transposed: bool):
    def tol(sample: Sample, index: int) -> Tolerance:
        t = ELEMENTWISE_TOL[sample.dtype]
        x, cos, sin, interleaved = sample.args[index], *sample.args[2:5]
        return Tolerance(t.rtol, t.atol, scale=_rope_terms(x, cos, sin, interleaved, transposed))

    return tol


def _ref_rope(q, k, cos, sin, interleaved):
    return ref.rope(q.double(), k.double(), cos.double(), sin.double(), interleaved)


def _ref_rope_backward(gq, gk, cos, sin, interleaved):
    # rope is linear in (q, k): its vjp in float64 is the exact transposed map.
    fn = ref.gptj_apply_rotary_pos_emb if interleaved else ref.hf_apply_rotary_pos_emb
    c, s = cos.double(), sin.double()
    zq = torch.zeros(gq.shape, dtype=torch.float64)
    zk = torch.zeros(gk.shape, dtype=torch.float64)
    _, vjp = torch.func.vjp(lambda q, k: fn(q, k, c, s), zq, zk)
    return vjp((gq.double(), gk.double()))


def _bad_rope() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731

    def cases(op, qn, kn):
        def call(q, k, cos, sin):
            return lambda: ([q(), k(), cos(), sin(), False], {})

        q4 = lambda: x(2, 3, 5, 8)  # noqa: E731
        k4 = lambda: x(2, 1, 5, 8)  # noqa: E731
        t = lambda: x(5, 8)  # noqa: E731
        return [
            BadInput(
                f"integer {qn}",
                call(lambda: torch.ones(2, 3, 5, 8, dtype=torch.int32), k4, t, t),
                TypeError,
                rf"metalcore\.{op}: '{qn}' must be float16, bfloat16, float32 or float64, got Int",
            ),
            BadInput(
                f"{kn} of another dtype",
                call(q4, lambda: x(2, 1, 5, 8, dtype=torch.float64), t, t),
                TypeError,
                rf"metalcore\.{op}: '{kn}' must have the same dtype as '{qn}'",
            ),
            BadInput(
                "float64 cos with float32 q",
                call(q4, k4, lambda: x(5, 8, dtype=torch.float64), t),
                TypeError,
                rf"metalcore\.{op}: 'cos' must have the same dtype as '{qn}'",
            ),
            BadInput(
                f"3-D {qn}",
                call(lambda: x(3, 5, 8), k4, t, t),
                ValueError,
                rf"metalcore\.{op}: '{qn}' must be 4-D \[batch, heads, seq, head_dim\]",
            ),
            BadInput(
                f"{kn} with another head_dim",
                call(q4, lambda: x(2, 1, 5, 6), t, t),
                ValueError,
                rf"metalcore\.{op}: '{kn}' must have the batch, seq and head_dim of '{qn}'",
            ),
            BadInput(
                "1-D cos",
                call(q4, k4, lambda: x(8), lambda: x(8)),
                ValueError,
                rf"metalcore\.{op}: 'cos' must be 2-D \[seq, rot\] or 3-D",
            ),
            BadInput(
                "sin of another shape than cos",
                call(q4, k4, t, lambda: x(5, 6)),
                ValueError,
                rf"metalcore\.{op}: 'sin' must have the same shape as 'cos'",
            ),
            BadInput(
                "cos of another seq",
                call(q4, k4, lambda: x(4, 8), lambda: x(4, 8)),
                ValueError,
                rf"metalcore\.{op}: 'cos' must have seq = 5",
            ),
            BadInput(
                "cos of another batch",
                call(q4, k4, lambda: x(3, 5, 8), lambda: x(3, 5, 8)),
                ValueError,
                rf"metalcore\.{op}: 'cos' must have batch 1 or 2 in dim 0",
            ),
            BadInput(
                "odd rot",
                call(q4, k4, lambda: x(5, 7), lambda: x(5, 7)),
                ValueError,
                rf"metalcore\.{op}: 'cos' last dim \(rot\) must be even and <= head_dim",
            ),
            BadInput(
                "rot larger than head_dim",
                call(q4, k4, lambda: x(5, 10), lambda: x(5, 10)),
                ValueError,
                rf"metalcore\.{op}: 'cos' last dim \(rot\) must be even and <= head_dim = 8",
            ),
        ]

    return {
        "rope": cases("rope", "q", "k"),
        "rope_backward": cases("rope_backward", "grad_q_out", "grad_k_out"),
    }


def _autograd_rope(args, kwargs):
    q, k, cos, sin, interleaved = args
    ql, kl = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = torch.ops.metalcore.rope(ql, kl, cos, sin, interleaved)
    torch.autograd.backward((qo, ko), (torch.ones_like(qo), torch.ones_like(ko)))
    return [qo, ko, ql.grad, kl.grad]


# --- AdamW -------------------------------------------------------------------------------------

# Each tensor of one parameter must share the param's memory order (the kernel walks storage
# order), so one dense layout is drawn per parameter and applied to all of its tensors.
ADAMW_LAYOUTS = ("contiguous", "offset", "transposed")
# The update is torch.optim.AdamW's addcdiv in float32 opmath, step_size * (m / denom): m / denom
# overflows float32 where the float64 reference does not once |m| / (sqrt(v) + eps) > 3e38, which
# is the contract (torch computes the same). Special magnitudes stay below that: moments up to
# 1e18 and eps > 0 (eps = 0 with a denormal v is such an overflow).
_ADAMW_LARGE = 1e18


def _draw_adamw(d: Drawer) -> Sample:
    pdtype = draw_dtype(d, "param_dtype")
    reduced = pdtype in (torch.float16, torch.bfloat16)
    sdtype = torch.float32 if reduced and d.boolean(label="fp32_states") else pdtype
    amsgrad, maximize = d.boolean(label="amsgrad"), d.boolean(label="maximize")
    lists: dict[str, list[TensorArg]] = {k: [] for k in ("p", "g", "m", "v", "mx", "step")}
    for i in range(d.integer(0, 4, label="n_params")):
        shape = draw_shape(d, f"param{i}", max_dim=3)
        lay = draw_layout(d, torch.empty(shape), ADAMW_LAYOUTS, f"param{i}")

        def arg(values, lay=lay):
            return TensorArg(values, lay.layout, lay.dims)

        lists["p"].append(arg(draw_values(d, shape, pdtype, f"p{i}", large=_ADAMW_LARGE)))
        lists["g"].append(arg(draw_values(d, shape, pdtype, f"g{i}", large=_ADAMW_LARGE)))
        lists["m"].append(arg(draw_values(d, shape, sdtype, f"m{i}", large=_ADAMW_LARGE)))
        lists["v"].append(
            arg(draw_values(d, shape, sdtype, f"v{i}", positive=True, large=_ADAMW_LARGE))
        )
        if amsgrad:
            lists["mx"].append(
                arg(draw_values(d, shape, sdtype, f"mx{i}", positive=True, large=_ADAMW_LARGE))
            )
        step = float(d.choice([0, 1, 9, 999], label=f"step{i}"))
        lists["step"].append(TensorArg(torch.tensor(step, dtype=torch.float32)))
    lr_dtype = d.choice([torch.float64, torch.float32], label="lr_dtype")
    lr = TensorArg(torch.tensor(d.choice([1e-3, 0.1, 0.0], label="lr"), dtype=lr_dtype))
    args = [
        lists["p"],
        lists["g"],
        lists["m"],
        lists["v"],
        lists["mx"],
        lists["step"],
        lr,
        d.choice([0.9, 0.0, 0.5], label="beta1"),
        d.choice([0.999, 0.0, 0.9], label="beta2"),
        d.choice([1e-2, 0.0, 0.1], label="weight_decay"),
        d.choice([1e-8, 1e-3], label="eps"),
        amsgrad,
        maximize,
    ]
    return Sample(args, dtype=pdtype, info={"state_dtype": sdtype})


def _ref_adamw(params, grads, m, v, mx, steps, lr, beta1, beta2, wd, eps, amsgrad, maximize):
    # Updates the (CPU) arguments in place; check_sample then compares the mutated lists.
    ref.adamw_step_reference(
        params,
        grads,
        m,
        v,
        mx,
        steps,
        lr=float(lr),
        beta1=beta1,
        beta2=beta2,
        weight_decay=wd,
        eps=eps,
        amsgrad=amsgrad,
        maximize=maximize,
    )


def _adamw_tol(sample: Sample, index: int) -> Tolerance:
    # Outputs: params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps (flattened lists).
    n = len(sample.args[0])
    n_max = len(sample.args[4])
    bounds = [n, 2 * n, 3 * n, 3 * n + n_max]
    if index < bounds[0]:
        dtype = sample.dtype
    elif index < bounds[3]:
        dtype = sample.info["state_dtype"]
    else:
        return Tolerance(0.0, 0.0)  # state_steps: exact
    # The update is lr * m / (sqrt(v) + eps) on top of p: rounding of the stored result.
    return ELEMENTWISE_TOL[dtype]


def _bad_adamw() -> list[BadInput]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    step = lambda: torch.tensor(0.0)  # noqa: E731
    lr = lambda: torch.tensor(1e-3, dtype=torch.float64)  # noqa: E731

    def call(
        p=None, g=None, m=None, v=None, mx=(), steps=None, lr_=None, hyper=(0.9, 0.999, 0.0, 1e-8)
    ):
        def make():
            pp = p() if p else [x(4, 8)]
            return (
                [
                    pp,
                    g() if g else [torch.randn_like(t) for t in pp],
                    m() if m else [torch.zeros_like(t) for t in pp],
                    v() if v else [torch.zeros_like(t) for t in pp],
                    mx() if callable(mx) else list(mx),
                    steps() if steps else [step() for _ in pp],
                    lr_() if lr_ else lr(),
                    *hyper,
                ],
                {},
            )

        return make

    op = r"metalcore\.adamw: "
    return [
        BadInput(
            "fewer grads than params",
            call(p=lambda: [x(4), x(3)], g=lambda: [x(4)]),
            ValueError,
            op + r"'grads' must have one tensor per param \(2\), got 1",
        ),
        BadInput(
            "grad of another dtype",
            call(g=lambda: [x(4, 8, dtype=torch.float64)]),
            TypeError,
            op + r"'grads\[0\]' must have the same dtype as 'params\[0\]'",
        ),
        BadInput(
            "state of another shape",
            call(m=lambda: [x(4, 7)]),
            ValueError,
            op + r"'exp_avgs\[0\]' must have the same shape as 'params\[0\]'",
        ),
        BadInput(
            "float16 state for a float32 param",
            call(v=lambda: [x(4, 8, dtype=torch.float16)]),
            TypeError,
            op + r"'exp_avg_sqs\[0\]' must be float32 or the dtype of 'params\[0\]'",
        ),
        BadInput(
            "non-dense (sliced) param",
            call(p=lambda: [x(4, 16)[:, ::2]]),
            ValueError,
            op + r"'params\[0\]' must be contiguous \(or dense without gaps or overlap\)",
        ),
        BadInput(
            "max_exp_avg_sqs without amsgrad",
            call(mx=lambda: [x(4, 8)]),
            ValueError,
            op + r"'max_exp_avg_sqs' must be empty when amsgrad=False, got 1 tensor",
        ),
        BadInput(
            "integer state_step",
            call(steps=lambda: [torch.tensor(0)]),
            ValueError,
            op + r"'state_steps\[0\]' must be a 0-dim float32 or float64 tensor",
        ),
        BadInput(
            "1-D lr",
            call(lr_=lambda: torch.tensor([1e-3])),
            ValueError,
            op + r"'lr' must be a 0-dim tensor",
        ),
        BadInput(
            "negative lr",
            call(lr_=lambda: torch.tensor(-1.0)),
            ValueError,
            op + r"'lr' must be >= 0, got -1",
        ),
        BadInput(
            "beta1 of 1",
            call(hyper=(1.0, 0.999, 0.0, 1e-8)),
            ValueError,
            op + r"'beta1' must be in \[0, 1\), got 1",
        ),
        BadInput(
            "negative weight_decay",
            call(hyper=(0.9, 0.999, -0.1, 1e-8)),
            ValueError,
            op + r"'weight_decay' must be >= 0, got -0.1",
        ),
    ]


# --- Registry --------------------------------------------------------------------------------


def _build() -> dict[str, OpSpec]:
    rms_bad = _bad_rms()
    act_bad = _bad_activation()
    rope_bad = _bad_rope()
    specs = [
        OpSpec(
            "rmsnorm",
            _draw_rmsnorm,
            _ref_rmsnorm,
            _rms_tol(ELEMENTWISE_TOL),
            rms_bad["rmsnorm"],
            autograd=_autograd_rmsnorm,
        ),
        OpSpec(
            "rmsnorm_backward",
            _draw_rmsnorm_backward,
            _ref_rmsnorm_backward,
            _rms_tol(BACKWARD_TOL, backward=(0, 1, 2)),
            rms_bad["rmsnorm_backward"],
        ),
        OpSpec(
            "fused_add_rmsnorm",
            _draw_fused_add,
            _ref_fused_add,
            _rms_tol(ELEMENTWISE_TOL),
            rms_bad["fused_add_rmsnorm"],
            autograd=_autograd_fused_add,
        ),
        OpSpec(
            "fused_add_rmsnorm_backward",
            _draw_fused_add_backward,
            _ref_fused_add_backward,
            _rms_tol(BACKWARD_TOL, backward=(0, 2, 3)),
            rms_bad["fused_add_rmsnorm_backward"],
        ),
        OpSpec(
            "silu",
            _draw_silu,
            lambda x: (ref.silu_opmath(x),),
            _tol_table(ELEMENTWISE_TOL),
            act_bad["silu"],
            autograd=_autograd_unary("silu"),
        ),
        OpSpec(
            "silu_backward",
            _draw_silu_backward,
            lambda g, x: (ref.silu_backward(g, x),),
            _tol_table(BACKWARD_TOL),
            act_bad["silu_backward"],
        ),
        OpSpec(
            "gelu",
            _draw_gelu,
            lambda x, a: (_gelu64(a)(x.double()),),
            _tol_table(ELEMENTWISE_TOL),
            act_bad["gelu"],
            autograd=_autograd_gelu,
        ),
        OpSpec(
            "gelu_backward",
            _draw_gelu_backward,
            lambda g, x, a: (ref.gelu_backward(g, x, a),),
            _tol_table(BACKWARD_TOL),
            act_bad["gelu_backward"],
        ),
        OpSpec(
            "swiglu",
            _draw_swiglu,
            lambda a, b: (ref.silu_opmath(a) * b.double(),),
            _tol_table(ELEMENTWISE_TOL),
            act_bad["swiglu"],
            autograd=_autograd_swiglu,
        ),
        OpSpec(
            "swiglu_backward",
            _draw_swiglu_backward,
            lambda g, a, b: ref.swiglu_backward(g, a, b),
            _tol_table(BACKWARD_TOL),
            act_bad["swiglu_backward"],
        ),
        OpSpec(
            "rope",
            lambda d: _draw_rope_args(d, "q", "k"),
            _ref_rope,
            _rope_tol(transposed=False),
            rope_bad["rope"],
            autograd=_autograd_rope,
        ),
        OpSpec(
            "rope_backward",
            lambda d: _draw_rope_args(d, "grad_q_out", "grad_k_out"),
            _ref_rope_backward,
            _rope_tol(transposed=True),
            rope_bad["rope_backward"],
        ),
        OpSpec(
            "adamw",
            _draw_adamw,
            _ref_adamw,
            _adamw_tol,
            _bad_adamw(),
            mutated_args=(0, 2, 3, 4, 5),
        ),
    ]
    return {s.name: s for s in specs}


SPECS: dict[str, OpSpec] = _build()


def registered_ops(namespace: str = "metalcore") -> set[str]:
    """Names of every op the dispatcher knows in ``namespace`` (from the loaded libraries)."""
    prefix = f"{namespace}::"
    names = set()
    for full in torch._C._dispatch_get_all_op_names():
        if full.startswith(prefix):
            names.add(full[len(prefix) :].split(".")[0])
    return names


def sample(spec: OpSpec, seed: int) -> Sample:
    """A reproducible sample of ``spec`` without hypothesis."""
    return spec.draw(RandomDrawer(seed))


def _numel(s: Sample) -> int:
    total = 0
    for a in list(s.args) + list(s.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        total += sum(t.values.numel() for t in items if isinstance(t, TensorArg))
    return total


def typical_samples(spec: OpSpec, count: int, lo: int = 256, hi: int = 20000) -> list[Sample]:
    """``count`` reproducible samples whose tensors hold between ``lo`` and ``hi`` elements in
    all: big enough that a leaked or mis-shared buffer shows, small enough to call thousands of
    times."""
    out: list[Sample] = []
    seed = 0
    while len(out) < count:
        if seed > 20000:
            raise ValueError(f"{spec.name}: no {count} samples with {lo}..{hi} elements")
        s = sample(spec, seed)
        if lo <= _numel(s) <= hi:
            out.append(s)
        seed += 1
    return out


__all__ = [
    "SPECS",
    "BadInput",
    "Drawer",
    "HypothesisDrawer",
    "OpSpec",
    "RandomDrawer",
    "Sample",
    "TensorArg",
    "Tolerance",
    "registered_ops",
    "sample",
    "typical_samples",
]
