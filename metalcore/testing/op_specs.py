"""One test specification per ``metalcore::`` operator: the single source of every op test.

The op contract tests (``tests/ops/test_contract.py``: numerics, gradients, opcheck, compile,
export and bad inputs on every device), the reliability tests (leaks, threads, determinism) and
the error-table generator all read this registry, so an op is covered everywhere by adding one
:class:`OpSpec`, and an op registered in the dispatcher without a spec fails
``tests/reliability/test_fuzz.py``.

A spec says how to draw valid inputs (shapes, dtypes, memory layouts, value scales, special
values), which float64 reference to compare against (plain PyTorch in float64, never a metalcore
op) and with which tolerances (one table, :data:`ROUNDING`), how autograd reaches its backward op,
which deterministic edge cases always run, and which bad inputs must be rejected with which
exception. Inputs are drawn through a :class:`Drawer`, so the same code serves hypothesis
(shrinking, example database) and plain seeded runs (the sanitizer smoke, the leak and thread
tests); tensor values always come from a drawn seed, so every sample replays.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from . import reference as ref

# --- Drawing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What a test lets a spec draw. The default draws everything; gradcheck asks for small
    float64 samples without special values, compile and export for sizes >= 2 (torch
    specializes sizes 0 and 1), a backend for the dtypes it has."""

    dtypes: tuple[torch.dtype, ...] | None = None
    min_size: int = 0
    # Also switches off the spec's "large" branches (sizes beyond every option list).
    max_size: int | None = None
    specials: bool = True
    layouts: tuple[str, ...] | None = None
    scales: tuple[float, ...] | None = None


class Drawer:
    """Source of choices for input generation.

    ``integer``, ``choice`` and ``boolean`` are the raw choices. Specs draw dimension sizes with
    :meth:`size`, dtypes with :meth:`dtype` and their rare big-shape branches with :meth:`large`,
    so that :class:`Limits` can restrict them and :class:`ReplayDrawer` can vary the sizes of a
    sample while keeping everything else."""

    limits: Limits = Limits()

    def integer(self, lo: int, hi: int, label: str = "") -> int:
        raise NotImplementedError

    def choice(self, options: Sequence, label: str = ""):
        raise NotImplementedError

    def boolean(self, p: float = 0.5, label: str = "") -> bool:
        raise NotImplementedError

    def size(self, options: Sequence[int], label: str) -> int:
        return self.choice(_sizes_within(options, self.limits), label=label)

    def dtype(self, options: Sequence[torch.dtype], label: str) -> torch.dtype:
        allowed = self.limits.dtypes
        opts = [o for o in options if allowed is None or o in allowed]
        if not opts:
            raise ValueError(f"{label}: none of {list(options)} is allowed ({list(allowed)})")
        return self.choice(opts, label=label)

    def large(self, p: float, label: str) -> bool:
        if self.limits.max_size is not None:
            return False
        return self.boolean(p, label=label)


def _sizes_within(options: Sequence[int], limits: Limits) -> list[int]:
    lo, hi = limits.min_size, limits.max_size
    inside = [o for o in options if o >= lo and (hi is None or o <= hi)]
    if inside:
        return inside
    # Nothing fits (head dims are never below 2, say): the closest option to the range.
    target = lo if hi is None else (lo + hi) / 2
    return [min(options, key=lambda o: (abs(o - target), o))]


class RandomDrawer(Drawer):
    """Seeded choices: ``RandomDrawer(seed)`` always yields the same sample."""

    def __init__(self, seed: int, limits: Limits = Limits()):
        self.rng = random.Random(seed)
        self.limits = limits

    def integer(self, lo, hi, label=""):
        return self.rng.randint(lo, hi)

    def choice(self, options, label=""):
        return options[self.rng.randrange(len(options))]

    def boolean(self, p=0.5, label=""):
        return self.rng.random() < p


class PinnedDrawer(RandomDrawer):
    """Seeded choices, except those named in ``pins`` by label, which take the pinned value
    (any value: a size outside the spec's lists, say). Kernel-variant tests pin the sizes,
    dtype and layout of one spec-drawn case and leave the rest to the seed."""

    def __init__(self, seed: int, pins: dict, limits: Limits = Limits()):
        super().__init__(seed, limits)
        self.pins = pins

    def integer(self, lo, hi, label=""):
        return self.pins[label] if label in self.pins else super().integer(lo, hi, label)

    def choice(self, options, label=""):
        return self.pins[label] if label in self.pins else super().choice(options, label)

    def boolean(self, p=0.5, label=""):
        return self.pins[label] if label in self.pins else super().boolean(p, label)

    def size(self, options, label):
        return self.pins[label] if label in self.pins else super().size(options, label)

    def dtype(self, options, label):
        return self.pins[label] if label in self.pins else super().dtype(options, label)

    def large(self, p, label):
        return self.pins[label] if label in self.pins else super().large(p, label)


class HypothesisDrawer(Drawer):
    """Choices drawn from ``hypothesis.strategies.data()``, labelled so a failing example prints
    every choice, and shrinking towards the first option of each choice (the simplest case)."""

    def __init__(self, data, limits: Limits = Limits()):
        from hypothesis import strategies as st

        self._st = st
        self.data = data
        self.limits = limits

    def integer(self, lo, hi, label=""):
        return self.data.draw(self._st.integers(lo, hi), label=label or None)

    def choice(self, options, label=""):
        return self.data.draw(self._st.sampled_from(list(options)), label=label or None)

    def boolean(self, p=0.5, label=""):
        # Shrinks to 0, i.e. to False: the plain case.
        return self.data.draw(self._st.integers(0, 999), label=label or None) >= 1000 * (1 - p)


class RecordingDrawer(Drawer):
    """Draws from ``inner`` and records every choice, for :class:`ReplayDrawer`."""

    def __init__(self, inner: Drawer):
        self.inner = inner
        self.limits = inner.limits
        self.record: list[tuple[str, str, object]] = []

    def _keep(self, kind, label, value):
        self.record.append((kind, label, value))
        return value

    def integer(self, lo, hi, label=""):
        return self._keep("integer", label, self.inner.integer(lo, hi, label))

    def choice(self, options, label=""):
        value = self.inner.choice(options, label)
        # By position, found by identity first: 0.0 == -0.0, but they are different cases.
        index = next((i for i, o in enumerate(options) if o is value), None)
        self._keep("choice", label, list(options).index(value) if index is None else index)
        return value

    def boolean(self, p=0.5, label=""):
        return self._keep("boolean", label, self.inner.boolean(p, label))

    def size(self, options, label):
        return self._keep("size", label, self.inner.size(options, label))

    def dtype(self, options, label):
        return self._keep("dtype", label, self.inner.dtype(options, label))

    def large(self, p, label):
        return self._keep("large", label, self.inner.large(p, label))


class ReplayDrawer(Drawer):
    """Replays a recorded draw with other sizes: every choice stays (by position in its option
    list, so "k_heads = q_heads" stays that), every :meth:`size` comes from ``resize(label,
    options, old)``. Specs draw their seeds and structure the same way whatever the sizes, so the
    replay is the same case at another size (how compile and export vary shapes)."""

    def __init__(self, record, resize: Callable[[str, list[int], int], int], limits: Limits):
        self.record = list(record)
        self.pos = 0
        self.resize = resize
        self.limits = limits

    def _next(self, kind, label):
        if self.pos >= len(self.record):
            raise ValueError(f"replay: {kind} {label!r} was not in the recorded draw")
        k, lab, value = self.record[self.pos]
        if (k, lab) != (kind, label):
            raise ValueError(f"replay: expected {k} {lab!r}, the spec drew {kind} {label!r}")
        self.pos += 1
        return value

    def integer(self, lo, hi, label=""):
        return min(max(self._next("integer", label), lo), hi)

    def choice(self, options, label=""):
        return options[min(self._next("choice", label), len(options) - 1)]

    def boolean(self, p=0.5, label=""):
        return self._next("boolean", label)

    def size(self, options, label):
        old = self._next("size", label)
        return self.resize(label, _sizes_within(options, self.limits), old)

    def dtype(self, options, label):
        return self._next("dtype", label)

    def large(self, p, label):
        return self._next("large", label)


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
    limited = d.limits.layouts
    options = [
        lay
        for lay in allowed
        if (limited is None or lay in limited)
        and (
            lay in ("contiguous", "offset")
            or (lay == "transposed" and nd >= 2)
            or (lay in ("sliced", "padded") and nd >= 1)
            or (lay == "expanded" and nd >= 1)
        )
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
# Magnitudes across decades: a kernel that drops a term which matters only at some scales (eps
# against mean(x^2) in RMSNorm) meets the scale where it matters.
SCALES = (1.0, 1e-3, 1e3, 0.1, 10.0, 3.0)


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
    """Seeded random values of a drawn magnitude, with a few drawn special values at drawn
    positions. Only the seed is drawn, so a replay at another shape keeps the case."""
    seed = d.integer(0, 2**31 - 1, label=f"{label}.seed")
    scale = d.choice(list(d.limits.scales or SCALES), label=f"{label}.scale")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale
    if positive:
        x = x.abs()
    x = x.to(dtype)
    n = x.numel()
    specials = specials and d.limits.specials
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
    if d.large(0.1, label=f"{label}.large"):
        numel = d.size(GRAIN_SIZES, label=f"{label}.numel")
        return d.choice([(numel,), (1, numel), (numel, 1)], label=f"{label}.shape")
    nd = d.integer(0, max_dim, label=f"{label}.ndim")
    return tuple(d.size(SMALL_SIZES, label=f"{label}.size{i}") for i in range(nd))


def draw_dtype(d: Drawer, label: str = "dtype") -> torch.dtype:
    return d.dtype(FLOAT_DTYPES, label=label)


def bigger_sizes(step: int) -> Callable[[str, list[int], int], int]:
    """A :class:`ReplayDrawer` resize rule: each size moves ``step`` options up its list
    (wrapping), so every variant differs from the recorded sizes where the list allows."""

    def resize(label: str, options: list[int], old: int) -> int:
        i = options.index(old) if old in options else 0
        return options[(i + step) % len(options)]

    return resize


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
                shown = ", ".join(x.describe() for x in a[:6])
                more = f", ... {len(a)} in all" if len(a) > 6 else ""
                return f"[{shown}{more}]"
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
    # An absolute error allowed on top (broadcastable), for intermediates that fall below the
    # opmath's normal range and carry its subnormal step into a large factor.
    floor: torch.Tensor | None = None


# THE tolerance table. An output compared with its float64 reference (rounded to the output
# dtype) may be off by t = eps(dtype) + c * eps(opmath): one rounding of the result to its dtype,
# plus c rounding units of the math that produced it (float32 for float32 and 16-bit inputs,
# float64 for float64). c is each op's, stated with its reason at the spec; nothing else sets a
# tolerance. The rule behind the c's: at most about twice PyTorch's own error in that dtype.
# Measured on 150-200 drawn samples per op and dtype (CPU and msim; error / (scale + |expected|)):
#   dtype      metalcore (forward / backward ops)    PyTorch eager in that dtype (fwd / bwd)
#   float64    5e-16, gelu 1.5e-15 / 7e-15          4e-16, gelu 2.8e-12 / 1e-15, gelu 3.9e-6
#   float32    2.3e-7 / 1.7e-6                      2.1e-7, gelu 5.9e-6 / 6.9e-7, rmsnorm 1.4e-2
#   float16    6.6e-4 / 7e-4                        9.3e-4 / 3.8e-3
#   bfloat16   5e-3 / 6.4e-3                        7.6e-3 / 0.39 (rmsnorm: autograd of rms_norm)
ROUNDING = {
    #              eps(dtype)                   eps(opmath)
    torch.float64: (torch.finfo(torch.float64).eps, torch.finfo(torch.float64).eps),
    torch.float32: (torch.finfo(torch.float32).eps, torch.finfo(torch.float32).eps),
    torch.float16: (torch.finfo(torch.float16).eps, torch.finfo(torch.float32).eps),
    torch.bfloat16: (torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float32).eps),
}


# The math each input dtype is computed in.
ROUNDING_OPMATH = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}


def tolerance(dtype: torch.dtype, c: float, **kwargs) -> Tolerance:
    """The table's tolerance for an output of ``dtype`` whose math loses ``c`` opmath units."""
    rounding, opmath = ROUNDING[dtype]
    t = rounding + c * opmath
    return Tolerance(t, t, **kwargs)


@dataclass
class BadInput:
    """A call that must be rejected: ``make()`` returns (args, kwargs) on CPU."""

    description: str
    make: Callable[[], tuple[list, dict]]
    error: type[BaseException]
    match: str


@dataclass
class Gradient:
    """How autograd through an op reaches its backward op: the arg positions that get gradients,
    the backward op autograd calls, its arguments built from (forward args, forward outputs,
    grad outputs), and for each forward arg position the backward output that is its gradient."""

    inputs: tuple[int, ...]
    op: str
    args: Callable[[list, Sequence, Sequence], list]
    grads: dict[int, int]
    # The largest special magnitude of a drawn grad output (as the backward op's own spec draws
    # its grad_out); None: half the dtype's max.
    large: float | None = None
    # Draw the first grad output's infinities as NaN (where an infinite gradient's result has
    # no float32-resolvable sign, as LayerNorm's; see _ln_grad_out).
    inf_as_nan: bool = False


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
    # Differentiable ops: how autograd maps onto the backward op. None: the backward ops and
    # adamw, which are called directly.
    gradient: Gradient | None = None
    # Deterministic samples every device always runs (empty shapes, NaN/Inf rows, ...).
    edges: Callable[[], list[Sample]] = list
    # opcheck's checks; None: all of them.
    opcheck_utils: tuple[str, ...] | None = None
    namespace: str = "metalcore"
    # Replaces the element-wise comparison of every output with the reference, for outputs
    # unique only up to a gauge (eigenvector signs): (sample, outputs, expected, where), raising
    # AssertionError on a mismatch.
    check_outputs: Callable | None = None

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

    @property
    def autograd(self) -> Callable[[list, dict], list[torch.Tensor]] | None:
        """Forward + backward through autograd with all-ones grad outputs, returning the outputs
        and the gradients (leak and thread tests, the smoke); None when not differentiable."""
        if self.gradient is None:
            return None
        return lambda args, kwargs: run_autograd(self, args, kwargs)


def run_autograd(
    spec: OpSpec,
    args: list,
    kwargs: dict,
    grad_outputs: Sequence[torch.Tensor] | None = None,
    namespace: str | None = None,
) -> list[torch.Tensor]:
    """Calls ``spec``'s op with its differentiable tensor args as fresh leaves, backpropagates
    ``grad_outputs`` (all ones by default) and returns the outputs followed by the leaves'
    gradients, in arg order."""
    assert spec.gradient is not None
    leaves = {
        i: args[i].detach().requires_grad_()
        for i in spec.gradient.inputs
        if isinstance(args[i], torch.Tensor)
    }
    outs = spec.outputs(
        args, spec.overload(namespace)(*[leaves.get(i, a) for i, a in enumerate(args)], **kwargs)
    )
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outs]
    torch.autograd.backward(outs, list(grad_outputs))
    return list(outs) + [leaves[i].grad for i in sorted(leaves)]


def _tol(c: float, per_row: bool = False, c_float64: float | None = None):
    """The table's tolerance with ``c`` opmath units (``c_float64`` for float64 outputs)."""

    def tol(sample: Sample, index: int) -> Tolerance:
        units = c_float64 if c_float64 is not None and sample.dtype == torch.float64 else c
        return tolerance(sample.dtype, units, per_row=per_row)

    return tol


def _terms_tol(c: float, terms: Callable[..., tuple[torch.Tensor, ...]], c_float64=None):
    """The table's tolerance with ``c`` opmath units of each element's own terms: ``terms`` maps
    the sample's float64 arguments to, per output, the magnitude its error follows (the sum of
    the absolute terms it is computed from, or |x f'(x)| where rounding the argument dominates).
    For outputs that are small next to what they are computed from (a derivative near its zero,
    a tail value with condition number x^2); never below the median of those magnitudes."""
    base = _tol(c, c_float64=c_float64)

    def tol(sample: Sample, index: int) -> Tolerance:
        args = [a.values.double() if isinstance(a, TensorArg) else a for a in sample.args]
        t = terms(*args)[index].abs()
        bulk = t[torch.isfinite(t) & (t > 0)]
        median = bulk.median() if bulk.numel() else torch.tensor(1.0, dtype=t.dtype)
        # NaN terms (NaN or infinite inputs) stay NaN: compare() then wants the exact value.
        return replace(base(sample, index), scale=torch.maximum(t, median))

    return tol


# --- RMSNorm family --------------------------------------------------------------------------

# The kernels accumulate sum(x^2) in float32 for float32/16-bit inputs (the documented contract,
# as torch.nn.functional.rms_norm): "very large" values are capped so that a row's sum of squares
# stays finite in float32; larger ones overflow by design, not by bug.
_RMS_LARGE = 1e15
# eps as a multiple of the rows' mean square, across decades: negligible, none, as large as
# mean(x^2) (dropping it, or adding it twice, moves every output by ~30%), a visible 1%, and
# dominant. Whatever the drawn value scale, eps matters in three draws out of five.
_EPS_RATIOS = (1e-6, 0.0, 1.0, 1e-2, 100.0)


def _rms_eps(d: Drawer, x: torch.Tensor) -> float:
    ratio = d.choice(_EPS_RATIOS, label="eps_ratio")
    ms = x.double().pow(2).mean(-1).reshape(-1) if x.numel() else torch.ones(1)
    ms = ms[torch.isfinite(ms) & (ms > 0)]
    return ratio * (float(ms.median()) if ms.numel() else 1.0)


def _draw_rms_common(d: Drawer, label: str = "input"):
    dtype = draw_dtype(d)
    if d.large(0.1, label="large_rows"):
        # Many rows: several parallel tasks, each a block of rows.
        lead = (d.size([33, 65, 129], label="rows"),)
        n = d.size([1024, 4099], label="n")
    else:
        nd = d.integer(0, 3, label="lead_ndim")
        lead = tuple(d.size(SMALL_SIZES[:12], label=f"lead{i}") for i in range(nd))
        n = d.size((0,) + ROW_SIZES, label="n")
    return dtype, lead + (n,)


def _draw_weight(d: Drawer, n: int, dtype: torch.dtype):
    if not d.boolean(0.7, label="has_weight"):
        return None
    w = draw_values(d, (n,), dtype, "weight", large=_RMS_LARGE)
    return draw_layout(d, w, READ_LAYOUTS, "weight")


def _rms_values(d: Drawer, shape, dtype, label: str, layout_label: str) -> TensorArg:
    return draw_layout(
        d, draw_values(d, shape, dtype, label, large=_RMS_LARGE), LAYOUTS, layout_label
    )


def _draw_rmsnorm(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    x = _rms_values(d, shape, dtype, "input", "input")
    w = _draw_weight(d, shape[-1], dtype)
    return Sample([x, w, _rms_eps(d, x.values)], dtype=dtype)


def _draw_rmsnorm_backward(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    g = _rms_values(d, shape, dtype, "grad_out", "g")
    x = _rms_values(d, shape, dtype, "input", "input")
    w = _draw_weight(d, shape[-1], dtype)
    return Sample([g, x, w, _rms_eps(d, x.values)], dtype=dtype)


def _draw_fused_add(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    x = _rms_values(d, shape, dtype, "input", "input")
    r = _rms_values(d, shape, dtype, "residual", "res")
    w = _draw_weight(d, shape[-1], dtype)
    return Sample([x, r, w, _rms_eps(d, x.values + r.values)], dtype=dtype)


def _draw_fused_add_backward(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    g = _rms_values(d, shape, dtype, "grad_out", "g")
    gr = None
    if d.boolean(0.7, label="has_grad_residual_out"):
        gr = _rms_values(d, shape, dtype, "grad_res", "grad_res")
    h = _rms_values(d, shape, dtype, "res_out", "h")
    w = _draw_weight(d, shape[-1], dtype)
    return Sample([g, gr, h, w, _rms_eps(d, h.values)], dtype=dtype)


# float32 accumulation (documented, as F.rms_norm) for float32 and 16-bit inputs: the reference
# models its range (ref.rms_rstd), as "very large" values are capped for its overflow.
def _ref_rmsnorm(x, w, eps):
    w64 = None if w is None else w.double()
    return (ref.rmsnorm(x.double(), w64, eps, ROUNDING_OPMATH[x.dtype]),)


def _ref_rmsnorm_backward(g, x, w, eps):
    dx, dw = ref.rmsnorm_backward(g, x, w, eps, ROUNDING_OPMATH[x.dtype])
    return dx, (dw if w is not None else torch.zeros(0, dtype=torch.float64))


def _ref_fused_add(x, r, w, eps):
    h = x + r  # rounded to the input dtype once, as the op's contract says
    w64 = None if w is None else w.double()
    return ref.rmsnorm(h.double(), w64, eps, ROUNDING_OPMATH[x.dtype]), h


def _ref_fused_add_backward(g, gr, h, w, eps):
    dh, dw = ref.rmsnorm_backward(g, h, w, eps, ROUNDING_OPMATH[h.dtype])
    if gr is not None:
        dh = dh + gr.double()
    return dh, (dw if w is not None else torch.zeros(0, dtype=torch.float64))


def _rms_subnormal_floor(
    terms: torch.Tensor, x: TensorArg, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """What float32 cannot hold below its normal range, per row of grad_input: mean(g * w * x)
    is scaled by x * rstd^3, so where that mean is subnormal its step (1.4e-45) grows by
    max|x| * rstd^3; and a row whose terms are themselves subnormal has no relative accuracy
    left at all (allowed up to their size). PyTorch's own float32 rms_norm backward is off by
    as much there: a denormal grad_out on one element of 1.5e-3 gives -1.7e-40 against
    1.9e-42, one on 1541 gives 1.9e-42 against 1.9e-48."""
    opmath = ROUNDING_OPMATH[dtype]
    xv = x.values.double()
    if xv.numel() == 0:
        return torch.zeros(())
    rstd = torch.rsqrt(xv.pow(2).mean(-1, keepdim=True) + eps)
    top = xv.abs().nan_to_num(nan=0.0, posinf=0.0).amax(-1, keepdim=True)
    fi = torch.finfo(opmath)
    amplified = 4 * fi.smallest_normal * fi.eps * top * rstd.pow(3)
    subnormal_terms = torch.where(terms < fi.smallest_normal, 2 * terms, torch.zeros_like(terms))
    return torch.nan_to_num(amplified + subnormal_terms, nan=0.0, posinf=0.0)


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


# Forward: the row's sum of squares and rsqrt, one rounding (3 units: measured 1.7 in float32,
# 2.4 in float64, as F.rms_norm's own 1.7). Backward: grad_input is the difference of two terms
# that each hold a row reduction of up to 4099 products (~sqrt(4099) = 64 units; measured 12
# in float32 and 32 in float64, against 1.2e5 for autograd through F.rms_norm in float32).
_RMS_C, _RMS_BACKWARD_C = 3, 64


def _rms_tol(backward: tuple[int, int, int] | None = None):
    """``backward``: positions of (grad_out, input, weight) in the args of a backward op."""

    def tol(sample: Sample, index: int) -> Tolerance:
        if backward is None:
            return tolerance(sample.dtype, _RMS_C, per_row=True)
        g, x, w = (sample.args[i] for i in backward)
        if index == 1:
            # grad_weight sums over rows: its opmath error grows with sqrt(rows).
            n = max(1, x.values.shape[-1])
            rows = max(1, x.values.numel() // n)
            return tolerance(sample.dtype, _RMS_BACKWARD_C * math.sqrt(rows))
        eps = sample.args[-1]
        scale = _rms_grad_scale(g, x, w, eps)
        floor = _rms_subnormal_floor(scale, x, eps, sample.dtype)
        return tolerance(sample.dtype, _RMS_BACKWARD_C, scale=scale, floor=floor)

    return tol


def _seeded(shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype)


def _rms_edges(op: str) -> Callable[[], list[Sample]]:
    """Empty shapes, and rows holding NaN and Inf at both forward variants of the Metal path
    (rows that fit one threadgroup's registers and longer ones): such a row is all NaN, the
    others stay finite."""

    def edges() -> list[Sample]:
        cases = []
        for shape in [(0, 16), (3, 0), (0,)]:
            cases.append((_seeded(shape, seed=1), _seeded(shape[-1:], seed=2)))
        for n in (16, 5000):
            x = _seeded((3, n), seed=3)
            x[0, 3] = float("nan")
            x[1, 5] = float("inf")
            cases.append((x, None))
        out = []
        for x, w in cases:
            t = [TensorArg(x), None if w is None else TensorArg(w)]
            g = TensorArg(_seeded(x.shape, seed=4))
            args = {
                "rmsnorm": [t[0], t[1], 1e-6],
                "rmsnorm_backward": [g, t[0], t[1], 1e-6],
                "fused_add_rmsnorm": [t[0], TensorArg(_seeded(x.shape, seed=5)), t[1], 1e-6],
                "fused_add_rmsnorm_backward": [g, g, t[0], t[1], 1e-6],
            }[op]
            out.append(Sample(args, dtype=torch.float32))
        return out

    return edges


_RMS_GRADIENT = Gradient(
    (0, 1),
    "rmsnorm_backward",
    lambda a, o, g: [g[0], a[0], a[1], a[2]],
    {0: 0, 1: 1},
    large=_RMS_LARGE,
)
# The fused backward gets the forward's h = input + residual (an output) and returns one gradient
# for both summands.
_FUSED_ADD_GRADIENT = Gradient(
    (0, 1, 2),
    "fused_add_rmsnorm_backward",
    lambda a, o, g: [g[0], g[1], o[1], a[2], a[3]],
    {0: 0, 1: 0, 2: 1},
    large=_RMS_LARGE,
)


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


# Opmath units per activation output. silu, swiglu: exp and a division (measured 1.9 in float32;
# torch's silu(a) * b: 1.6). gelu: an erf/erfc or tanh fit (measured 6.6 in float64; F.gelu's own
# float32 error is 50 units). Backward: the derivative's few terms (silu/swiglu measured 5.8,
# equal to torch's silu_backward); gelu's derivative holds exp(-x^2 / 2), whose condition number
# x^2 makes it 15 units in float32 (torch's own gelu_backward: 92).
_ACT_C = {"silu": 2, "swiglu": 2, "gelu": 8, "silu_backward": 8, "swiglu_backward": 8}
_ACT_C["gelu_backward"] = 32
# float64 gelu takes at::vec's (Sleef's) erfc, which is 1e-13 off relative in the far tail
# (gelu(-34) = 1.7e-254); F.gelu's own float64 error is 2.8e-12. float32 never gets there
# (gelu underflows below x = -13).
_GELU_C_FLOAT64 = 4096


# The magnitudes the activations' errors follow (see _terms_tol). gelu: rounding its argument
# moves f(x) by |x f'(x)| relative units, which in the negative tail (f ~ phi(x), condition
# number ~ x^2) is about 100 times f at x = -10; any float32 gelu, torch's included, loses those
# digits. silu/swiglu derivatives s (1 + x (1 - s)) cancel to zero at x = -1.28: their error
# follows s + |x| s (1 - s).
def _gelu_terms(x, approximate):
    x = x.detach().requires_grad_(True)
    y = _gelu64(approximate)(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    return ((y.abs() + (x * dy).abs()).detach(),)


def _dsilu_terms(x):
    s = torch.sigmoid(x)
    return s + x.abs() * s * (1.0 - s)


def _activation_edges(op: str) -> Callable[[], list[Sample]]:
    """Empty shapes and every special value the kernels branch on (or overflow at)."""

    def edges() -> list[Sample]:
        x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30])
        x = torch.cat((x, torch.tensor([3.0, -50.0, 50.0, -100.0, 100.0])))
        values = [torch.zeros(0), torch.zeros(4, 0), torch.zeros(0, 4), x]
        out = []
        for v in values:
            t = TensorArg(v)
            g = TensorArg(torch.ones_like(v))
            for args in {
                "silu": [[t]],
                "silu_backward": [[g, t]],
                "gelu": [[t, "none"], [t, "tanh"]],
                "gelu_backward": [[g, t, "none"], [g, t, "tanh"]],
                "swiglu": [[t, t], [t, TensorArg(torch.ones_like(v))]],
                "swiglu_backward": [[g, t, t]],
            }[op]:
                out.append(Sample(args, dtype=torch.float32))
        return out

    return edges


_SILU_GRADIENT = Gradient((0,), "silu_backward", lambda a, o, g: [g[0], a[0]], {0: 0})
_GELU_GRADIENT = Gradient((0,), "gelu_backward", lambda a, o, g: [g[0], a[0], a[1]], {0: 0})
_SWIGLU_GRADIENT = Gradient(
    (0, 1), "swiglu_backward", lambda a, o, g: [g[0], a[0], a[1]], {0: 0, 1: 1}
)


# --- RoPE --------------------------------------------------------------------------------------

ROPE_HEAD_DIMS = (2, 4, 6, 8, 16, 18, 32, 34, 64, 66, 128)
# Outputs are x * cos + y * sin in float32 opmath: a product beyond 3e38 overflows there (as in
# the unfused float32 formula) where the float64 reference stays finite, so special magnitudes
# stay at 1e18 (products up to 1e36).
_ROPE_LARGE = 1e18


def _draw_rope_args(d: Drawer, q_name: str, k_name: str) -> Sample:
    dtype = draw_dtype(d)
    b = d.size([1, 2, 3], label="batch")
    hq = d.size([1, 2, 3, 5, 0], label="q_heads")
    hk = d.size([1, 2, hq, 0], label="k_heads")
    if d.large(0.05, label="long_seq"):
        s, hd = d.size([257, 1031], label="seq"), 128
    else:
        s = d.size([1, 2, 7, 16, 17, 33, 0], label="seq")
        hd = d.size(ROPE_HEAD_DIMS, label="head_dim")
    # rot: full, half (partial rotary), the smallest pair, or none (pure pass-through).
    rot = d.size(sorted({hd, 2 * max(1, hd // 4), 2, 0}, reverse=True), label="rot")
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


# Two products and a sum per output, rounded once (measured 0.5 units, as HF's formula in float32).
_ROPE_C = 2


def _rope_tol(transposed: bool):
    def tol(sample: Sample, index: int) -> Tolerance:
        x, cos, sin, interleaved = sample.args[index], *sample.args[2:5]
        scale = _rope_terms(x, cos, sin, interleaved, transposed)
        return tolerance(sample.dtype, _ROPE_C, scale=scale)

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
                "float64 cos with float16 q",
                call(
                    lambda: x(2, 3, 5, 8, dtype=torch.float16),
                    lambda: x(2, 1, 5, 8, dtype=torch.float16),
                    lambda: x(5, 8, dtype=torch.float64),
                    lambda: x(5, 8, dtype=torch.float64),
                ),
                TypeError,
                rf"metalcore\.{op}: 'cos' must have the same dtype as '{qn}' \(Half\) or float32, "
                r"got Double",
            ),
            BadInput(
                "float16 sin with float32 cos",
                call(
                    lambda: x(2, 3, 5, 8, dtype=torch.float16),
                    lambda: x(2, 1, 5, 8, dtype=torch.float16),
                    t,
                    lambda: x(5, 8, dtype=torch.float16),
                ),
                TypeError,
                rf"metalcore\.{op}: 'sin' must have the same dtype as 'cos'",
            ),
            BadInput(
                "integer cos",
                call(q4, k4, lambda: torch.ones(5, 8, dtype=torch.int32), t),
                TypeError,
                rf"metalcore\.{op}: 'cos' must be float16, bfloat16, float32 or float64, got Int",
            ),
            BadInput(
                "sin on another device",
                call(q4, k4, t, lambda: torch.empty(5, 8, device="meta")),
                RuntimeError,
                rf"metalcore\.{op}: 'sin' must be on the same device as '{qn}'",
            ),
            BadInput(
                f"3-D {qn}",
                call(lambda: x(3, 5, 8), k4, t, t),
                ValueError,
                rf"metalcore\.{op}: '{qn}' must be 4-D \[batch, heads, seq, head_dim\]",
            ),
            BadInput(
                f"3-D {kn}",
                call(q4, lambda: x(1, 5, 8), t, t),
                ValueError,
                rf"metalcore\.{op}: '{kn}' must be 4-D \[batch, heads, seq, head_dim\]",
            ),
            BadInput(
                f"{kn} with another head_dim",
                call(q4, lambda: x(2, 1, 5, 6), t, t),
                ValueError,
                rf"metalcore\.{op}: '{kn}' must have the batch, seq and head_dim of '{qn}'",
            ),
            BadInput(
                f"{kn} of another batch",
                call(q4, lambda: x(3, 1, 5, 8), t, t),
                ValueError,
                rf"metalcore\.{op}: '{kn}' must have the batch, seq and head_dim of '{qn}'",
            ),
            BadInput(
                f"{kn} of another seq",
                call(q4, lambda: x(2, 1, 6, 8), t, t),
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


def _rope_edges() -> list[Sample]:
    """Empty batch, heads, seq or head_dim; only k non-empty; rot = 0 (pure pass-through); NaN
    and Inf in q and in the tables, for both pairings."""
    t = lambda *s: TensorArg(_seeded(s, seed=sum(s)))  # noqa: E731
    out = []
    for qs, ks, cs in [
        ((0, 2, 3, 8), (0, 1, 3, 8), (3, 8)),
        ((1, 2, 0, 8), (1, 1, 0, 8), (1, 0, 8)),
        ((1, 0, 3, 8), (1, 0, 3, 8), (3, 4)),
        ((1, 2, 3, 0), (1, 1, 3, 0), (3, 0)),
        ((1, 0, 3, 8), (1, 2, 3, 8), (3, 4)),
        ((1, 2, 3, 8), (1, 2, 3, 8), (3, 0)),
    ]:
        out.append(Sample([t(*qs), t(*ks), t(*cs), t(*cs), False]))
    for interleaved in (False, True):
        q = _seeded((1, 2, 4, 8), seed=7)
        q[0, 0, 1, 2] = float("nan")
        q[0, 1, 2, 5] = float("inf")
        cos = _seeded((4, 8), seed=8)
        cos[3, 0] = float("inf")
        args = [TensorArg(q), TensorArg(q.clone()), TensorArg(cos), t(4, 8), interleaved]
        out.append(Sample(args))
    return out


_ROPE_GRADIENT = Gradient(
    (0, 1),
    "rope_backward",
    lambda a, o, g: [g[0], g[1], a[2], a[3], a[4]],
    {0: 0, 1: 1},
    large=_ROPE_LARGE,
)


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


# The update p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) and the moment updates,
# each rounded once to its stored dtype: units of the magnitude of the terms each sums (measured
# 2.3 in float32).
_ADAMW_C = 4


def _adamw_terms(sample: Sample) -> list[torch.Tensor]:
    """Per output tensor (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), the magnitude of the
    terms its new value sums, elementwise: its rounding error follows them, and a moment
    b1 m + (1 - b1) g or a param update can be far smaller than its terms."""
    p, g, m, v, mx, steps, lr, b1, b2, wd, eps, amsgrad, maximize = sample.args
    lr = float(lr.values)
    terms: dict[str, list[torch.Tensor]] = {k: [] for k in ("p", "m", "v", "mx")}
    for i in range(len(p)):
        gd = g[i].values.double().abs()
        md, vd = m[i].values.double(), v[i].values.double()
        step = float(steps[i].values) + 1
        m_new = b1 * md.abs() + (1 - b1) * gd
        v_new = b2 * vd.abs() + (1 - b2) * gd * gd
        if amsgrad:
            v_new = torch.maximum(mx[i].values.double().abs(), v_new)
            terms["mx"].append(v_new)
        denom = v_new.sqrt() / math.sqrt(1 - b2**step) + eps
        update = lr / (1 - b1**step) * m_new / denom
        terms["p"].append(p[i].values.double().abs() * abs(1 - lr * wd) + update)
        terms["m"].append(m_new)
        terms["v"].append(v_new)
    return terms["p"] + terms["m"] + terms["v"] + terms["mx"]


def _adamw_tol(sample: Sample, index: int) -> Tolerance:
    # Outputs: params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps (flattened lists);
    # each tensor's own dtype (one call may mix dtype groups).
    outputs = [t for i in (0, 2, 3, 4) for t in sample.args[i]]
    if index >= len(outputs):
        return Tolerance(0.0, 0.0)  # state_steps: exact
    if "terms" not in sample.info:  # one pass per sample, not per output
        sample.info["terms"] = _adamw_terms(sample)
    scale = sample.info["terms"][index]
    return tolerance(outputs[index].values.dtype, _ADAMW_C, scale=scale)


def _adamw_edges() -> list[Sample]:
    """No tensors at all, and zero-element tensors next to a non-empty one (the step counters of
    all three still advance)."""
    out = []
    for sizes in ([], [0, 5, 0]):
        lists = [
            [TensorArg(_seeded((n,), seed=i + 10 * k)) for i, n in enumerate(sizes)]
            for k in range(4)
        ]
        lists[3] = [TensorArg(t.values.abs()) for t in lists[3]]  # exp_avg_sq >= 0
        steps = [TensorArg(torch.tensor(0.0)) for _ in sizes]
        lr = TensorArg(torch.tensor(1e-2, dtype=torch.float64))
        args = [*lists, [], steps, lr, 0.9, 0.999, 0.01, 1e-8, False, False]
        out.append(Sample(args, dtype=torch.float32, info={"state_dtype": torch.float32}))
    return out


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
            "fewer exp_avgs than params",
            call(p=lambda: [x(4), x(3)], m=lambda: [x(4)]),
            ValueError,
            op + r"'exp_avgs' must have one tensor per param \(2\), got 1",
        ),
        BadInput(
            "fewer exp_avg_sqs than params",
            call(p=lambda: [x(4), x(3)], v=lambda: [x(4)]),
            ValueError,
            op + r"'exp_avg_sqs' must have one tensor per param \(2\), got 1",
        ),
        BadInput(
            "fewer state_steps than params",
            call(p=lambda: [x(4), x(3)], steps=lambda: [step()]),
            ValueError,
            op + r"'state_steps' must have one tensor per param \(2\), got 1",
        ),
        BadInput(
            "grad of another dtype",
            call(g=lambda: [x(4, 8, dtype=torch.float64)]),
            TypeError,
            op + r"'grads\[0\]' must have the same dtype as 'params\[0\]'",
        ),
        BadInput(
            "grad of another shape",
            call(g=lambda: [x(4, 7)]),
            ValueError,
            op + r"'grads\[0\]' must have the same shape as 'params\[0\]'",
        ),
        BadInput(
            "grad on another device",
            call(g=lambda: [torch.empty(4, 8, device="meta")]),
            RuntimeError,
            op + r"'grads\[0\]' must be on the same device as 'params\[0\]'",
        ),
        BadInput(
            "sparse grad",
            call(g=lambda: [x(4, 8).to_sparse()]),
            ValueError,
            op + r"'grads\[0\]' must be a dense \(strided\) tensor.*sparse gradients",
        ),
        BadInput(
            "integer param",
            call(
                p=lambda: [torch.ones(4, 8, dtype=torch.int32)],
                g=lambda: [torch.ones(4, 8, dtype=torch.int32)],
            ),
            TypeError,
            op + r"'params\[0\]' must be float16, bfloat16, float32 or float64",
        ),
        BadInput(
            "state of another shape",
            call(m=lambda: [x(4, 7)]),
            ValueError,
            op + r"'exp_avgs\[0\]' must have the same shape as 'params\[0\]'",
        ),
        BadInput(
            "exp_avg_sq of another shape",
            call(v=lambda: [x(4, 7)]),
            ValueError,
            op + r"'exp_avg_sqs\[0\]' must have the same shape as 'params\[0\]'",
        ),
        BadInput(
            "float16 state for a float32 param",
            call(v=lambda: [x(4, 8, dtype=torch.float16)]),
            TypeError,
            op + r"'exp_avg_sqs\[0\]' must be float32 or the dtype of 'params\[0\]'",
        ),
        BadInput(
            "float16 exp_avg for a float32 param",
            call(m=lambda: [x(4, 8, dtype=torch.float16)]),
            TypeError,
            op + r"'exp_avgs\[0\]' must be float32 or the dtype of 'params\[0\]'",
        ),
        BadInput(
            "non-dense (sliced) param",
            call(p=lambda: [x(4, 16)[:, ::2]]),
            ValueError,
            op + r"'params\[0\]' must be contiguous \(or dense without gaps or overlap\)",
        ),
        BadInput(
            "grad in another memory layout than its param",
            call(p=lambda: [x(8, 4).t()], g=lambda: [x(4, 8)]),
            ValueError,
            op + r"'grads\[0\]' must have the same memory layout as 'params\[0\]'",
        ),
        BadInput(
            "max_exp_avg_sqs without amsgrad",
            call(mx=lambda: [x(4, 8)]),
            ValueError,
            op + r"'max_exp_avg_sqs' must be empty when amsgrad=False, got 1 tensor",
        ),
        BadInput(
            "fewer max_exp_avg_sqs than params with amsgrad",
            call(p=lambda: [x(4), x(3)], mx=lambda: [x(4)], hyper=(0.9, 0.999, 0.0, 1e-8, True)),
            ValueError,
            op + r"'max_exp_avg_sqs' must have one tensor per param \(2\) when amsgrad=True",
        ),
        BadInput(
            "max_exp_avg_sq of another shape",
            call(mx=lambda: [x(4, 7)], hyper=(0.9, 0.999, 0.0, 1e-8, True)),
            ValueError,
            op + r"'max_exp_avg_sqs\[0\]' must have the same shape as 'params\[0\]'",
        ),
        BadInput(
            "integer state_step",
            call(steps=lambda: [torch.tensor(0)]),
            TypeError,
            op + r"'state_steps\[0\]' must be a 0-dim float32 or float64 tensor",
        ),
        BadInput(
            "1-element state_step",
            call(steps=lambda: [torch.zeros(1)]),
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
            "integer lr",
            call(lr_=lambda: torch.tensor(1, dtype=torch.int64)),
            TypeError,
            op + r"'lr' must be float32 or float64",
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
            "negative beta2",
            call(hyper=(0.9, -0.1, 0.0, 1e-8)),
            ValueError,
            op + r"'beta2' must be in \[0, 1\), got -0.1",
        ),
        BadInput(
            "negative weight_decay",
            call(hyper=(0.9, 0.999, -0.1, 1e-8)),
            ValueError,
            op + r"'weight_decay' must be >= 0, got -0.1",
        ),
        BadInput(
            "negative eps",
            call(hyper=(0.9, 0.999, 0.0, -1e-8)),
            ValueError,
            op + r"'eps' must be >= 0",
        ),
    ]


# --- Registry --------------------------------------------------------------------------------


def _build() -> dict[str, OpSpec]:
    rms_bad = _bad_rms()
    act_bad = _bad_activation()
    rope_bad = _bad_rope()
    rms_backward_tol = _rms_tol(backward=(0, 1, 2))
    specs = [
        OpSpec(
            "rmsnorm",
            _draw_rmsnorm,
            _ref_rmsnorm,
            _rms_tol(),
            rms_bad["rmsnorm"],
            gradient=_RMS_GRADIENT,
            edges=_rms_edges("rmsnorm"),
        ),
        OpSpec(
            "rmsnorm_backward",
            _draw_rmsnorm_backward,
            _ref_rmsnorm_backward,
            rms_backward_tol,
            rms_bad["rmsnorm_backward"],
            edges=_rms_edges("rmsnorm_backward"),
        ),
        OpSpec(
            "fused_add_rmsnorm",
            _draw_fused_add,
            _ref_fused_add,
            _rms_tol(),
            rms_bad["fused_add_rmsnorm"],
            gradient=_FUSED_ADD_GRADIENT,
            edges=_rms_edges("fused_add_rmsnorm"),
        ),
        OpSpec(
            "fused_add_rmsnorm_backward",
            _draw_fused_add_backward,
            _ref_fused_add_backward,
            _rms_tol(backward=(0, 2, 3)),
            rms_bad["fused_add_rmsnorm_backward"],
            edges=_rms_edges("fused_add_rmsnorm_backward"),
        ),
        OpSpec(
            "silu",
            _draw_silu,
            lambda x: (ref.silu_opmath(x),),
            _tol(_ACT_C["silu"]),
            act_bad["silu"],
            gradient=_SILU_GRADIENT,
            edges=_activation_edges("silu"),
        ),
        OpSpec(
            "silu_backward",
            _draw_silu_backward,
            lambda g, x: (ref.silu_backward(g, x),),
            _terms_tol(_ACT_C["silu_backward"], lambda g, x: (g * _dsilu_terms(x),)),
            act_bad["silu_backward"],
            edges=_activation_edges("silu_backward"),
        ),
        OpSpec(
            "gelu",
            _draw_gelu,
            lambda x, a: (_gelu64(a)(x.double()),),
            _terms_tol(_ACT_C["gelu"], _gelu_terms, c_float64=_GELU_C_FLOAT64),
            act_bad["gelu"],
            gradient=_GELU_GRADIENT,
            edges=_activation_edges("gelu"),
        ),
        OpSpec(
            "gelu_backward",
            _draw_gelu_backward,
            lambda g, x, a: (ref.gelu_backward(g, x, a),),
            _tol(_ACT_C["gelu_backward"]),
            act_bad["gelu_backward"],
            edges=_activation_edges("gelu_backward"),
        ),
        OpSpec(
            "swiglu",
            _draw_swiglu,
            lambda a, b: (ref.silu_opmath(a) * b.double(),),
            _tol(_ACT_C["swiglu"]),
            act_bad["swiglu"],
            gradient=_SWIGLU_GRADIENT,
            edges=_activation_edges("swiglu"),
        ),
        OpSpec(
            "swiglu_backward",
            _draw_swiglu_backward,
            lambda g, a, b: ref.swiglu_backward(g, a, b),
            _terms_tol(
                _ACT_C["swiglu_backward"],
                lambda g, a, b: (g * b * _dsilu_terms(a), g * a * torch.sigmoid(a)),
            ),
            act_bad["swiglu_backward"],
            edges=_activation_edges("swiglu_backward"),
        ),
        OpSpec(
            "rope",
            lambda d: _draw_rope_args(d, "q", "k"),
            _ref_rope,
            _rope_tol(transposed=False),
            rope_bad["rope"],
            gradient=_ROPE_GRADIENT,
            edges=_rope_edges,
        ),
        OpSpec(
            "rope_backward",
            lambda d: _draw_rope_args(d, "grad_q_out", "grad_k_out"),
            _ref_rope_backward,
            _rope_tol(transposed=True),
            rope_bad["rope_backward"],
            edges=_rope_edges,
        ),
        OpSpec(
            "adamw",
            _draw_adamw,
            _ref_adamw,
            _adamw_tol,
            _bad_adamw(),
            mutated_args=(0, 2, 3, 4, 5),
            edges=_adamw_edges,
            # adamw has no autograd formula: with nothing requiring grad, opcheck's autograd
            # registration check has nothing to check.
            opcheck_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
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


def sample(spec: OpSpec, seed: int, limits: Limits = Limits()) -> Sample:
    """A reproducible sample of ``spec`` without hypothesis."""
    return spec.draw(RandomDrawer(seed, limits))


def pinned(op: str, seed: int = 0, limits: Limits = Limits(specials=False), **pins) -> Sample:
    """The sample of ``op``'s spec with the choices named in ``pins`` (by their labels, e.g.
    ``n=4097, dtype=torch.float16, **{"input.layout": "offset"}``) and the rest from ``seed``;
    no special values unless ``limits`` allows them."""
    return SPECS[op].draw(PinnedDrawer(seed, pins, limits))


def numel(s: Sample) -> int:
    """Elements in all tensor arguments of ``s``."""
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
        if lo <= numel(s) <= hi:
            out.append(s)
        seed += 1
    return out


__all__ = [
    "ROUNDING",
    "SPECS",
    "BadInput",
    "Drawer",
    "Gradient",
    "HypothesisDrawer",
    "Limits",
    "OpSpec",
    "PinnedDrawer",
    "RandomDrawer",
    "RecordingDrawer",
    "ReplayDrawer",
    "Sample",
    "TensorArg",
    "Tolerance",
    "pinned",
    "registered_ops",
    "run_autograd",
    "sample",
    "tolerance",
    "typical_samples",
]


# --- Linear algebra family -------------------------------------------------------------------
# Inputs are built in float64 and rounded to the drawn dtype; float16/bfloat16 inputs compute
# and return float32, so a sample's dtype (what the outputs are compared in) is float32 for them.
# Factors that are unique (Cholesky, triangular solves) are compared element-wise; eigenvectors
# and singular vectors, unique only up to signs (and rotations within repeated values), through
# invariants: values against LAPACK float64, residuals and orthogonality, all within
# c * n * u * |A| (backward stable algorithms; c stated at each check).

LA_SIZES = (0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33)
LA_BATCH = (0, 1, 2, 3, 5)


def _la_out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _la_batch(d: Drawer, label: str = "batch") -> tuple[int, ...]:
    # Rarely a batch big enough to be split across threads (and found by the determinism and
    # leak tests, which look for samples of tens of thousands of elements).
    if d.large(0.05, label=f"{label}.large"):
        return (d.size((64, 100), label=f"{label}.large_size"),)
    nd = d.integer(0, 2, label=f"{label}.ndim")
    return tuple(d.size(LA_BATCH, label=f"{label}{i}") for i in range(nd))


def _la_gen(d: Drawer, label: str) -> torch.Generator:
    return torch.Generator().manual_seed(d.integer(0, 2**31 - 1, label=f"{label}.seed"))


def _la_specials(d: Drawer, x: torch.Tensor, label: str, where: torch.Tensor | None = None):
    """NaN or +-Inf at a drawn position (inside ``where`` when given: the read triangle)."""
    if not d.limits.specials or x.numel() == 0 or not d.boolean(0.2, label=f"{label}.special"):
        return x
    positions = where.expand(x.shape) if where is not None else torch.ones_like(x, dtype=bool)
    idx = positions.reshape(-1).nonzero().view(-1)
    if idx.numel() == 0:
        return x
    x = x.clone()
    pos = idx[d.integer(0, idx.numel() - 1, label=f"{label}.special_pos")]
    x.view(-1)[pos] = d.choice([float("nan"), float("inf"), float("-inf")], f"{label}.value")
    return x


def _la_triangle_mask(n: int, upper: bool) -> torch.Tensor:
    ones = torch.ones(n, n, dtype=torch.bool)
    return ones.triu() if upper else ones.tril()


def _la_garbage(d: Drawer, x: torch.Tensor, upper: bool, g, label: str) -> torch.Tensor:
    """Values in the triangle the op must not read (sometimes NaN): any influence shows."""
    if x.numel() == 0 or not d.boolean(0.5, label=f"{label}.garbage"):
        return x
    n = x.shape[-1]
    fill = torch.randn(x.shape, generator=g, dtype=torch.float64) * 1e3
    if d.boolean(0.3, label=f"{label}.garbage_nan"):
        fill = torch.full_like(fill, float("nan"))
    unread = ~_la_triangle_mask(n, upper) if n else torch.zeros(0, 0, dtype=torch.bool)
    return torch.where(unread, fill, x)


def _la_scale(d: Drawer, label: str) -> float:
    return d.choice(list(d.limits.scales or (1.0, 1e-3, 1e3, 3.0)), label=f"{label}.scale")


def _draw_cholesky_ex(d: Drawer) -> Sample:
    dtype = d.dtype(FLOAT_DTYPES, "dtype")
    batch, n = _la_batch(d), d.size(LA_SIZES, "n")
    upper = d.boolean(label="upper")
    g = _la_gen(d, "A")
    M = torch.randn((*batch, n, n), generator=g, dtype=torch.float64)
    # Eigenvalues in [1, ~5]: well conditioned, so an element-wise comparison is meaningful.
    A = (M @ M.mT / max(n, 1) + torch.eye(n, dtype=torch.float64)) * _la_scale(d, "A")
    # (Only where special values are allowed: the failed factor is NaN.)
    if d.limits.specials and n and d.boolean(0.2, label="A.not_pd"):
        # Negate one diagonal entry: the minor of that order (or an earlier one) fails.
        k = d.integer(0, n - 1, label="A.not_pd_at")
        A[..., k, k] = -A[..., k, k]
    A = _la_specials(d, A, "A", _la_triangle_mask(n, upper))
    A = _la_garbage(d, A, upper, g, "A")
    a = draw_layout(d, A.to(dtype), READ_LAYOUTS, "A")
    return Sample([a, upper], dtype=_la_out_dtype(dtype))


def _draw_solve_triangular(d: Drawer) -> Sample:
    dtype = d.dtype(FLOAT_DTYPES, "dtype")
    batch, n = _la_batch(d), d.size(LA_SIZES, "n")
    k = d.size(LA_SIZES, "k")
    upper, left, unit = (d.boolean(label=x) for x in ("upper", "left", "unitriangular"))
    g = _la_gen(d, "A")
    # Off-diagonal entries small against a diagonal of magnitude in [1, 2]: well conditioned.
    T = torch.randn((*batch, n, n), generator=g, dtype=torch.float64) / (2 * max(n, 1) ** 0.5)
    diag = (1 + torch.rand((*batch, n), generator=g, dtype=torch.float64)) * torch.where(
        torch.rand((*batch, n), generator=g) < 0.5, -1.0, 1.0
    )
    A = T.triu(1) if upper else T.tril(-1)
    A = A + torch.diag_embed(diag if not unit else torch.full_like(diag, 7.0))
    A = _la_garbage(d, A + 0.0, upper if not unit else upper, g, "A")
    if unit:  # the diagonal must not be read either
        A = A + torch.diag_embed(torch.full_like(diag, 5.0))
    # Broadcasting: B's batch drops leading dims or has ones.
    b_batch = list(batch)
    if b_batch and d.boolean(0.3, label="B.broadcast"):
        if d.boolean(label="B.drop"):
            b_batch = b_batch[1:]
        else:
            b_batch[0] = 1
    shape = (*b_batch, n, k) if left else (*b_batch, k, n)
    B = torch.randn(shape, generator=g, dtype=torch.float64) * _la_scale(d, "B")
    B = _la_specials(d, B, "B")
    # Not "expanded" for A: repeating one row replaces the well-conditioned triangle drawn above
    # by one with arbitrary diagonal entries, whose solution's forward error grows with its
    # condition number (no element-wise tolerance fits it). Expanded B stays.
    a_layouts = tuple(lay for lay in READ_LAYOUTS if lay != "expanded")
    a = draw_layout(d, A.to(dtype), a_layouts, "A")
    b = draw_layout(d, B.to(dtype), READ_LAYOUTS, "B")
    return Sample([a, b, upper, left, unit], dtype=_la_out_dtype(dtype))


def _draw_eigh(d: Drawer) -> Sample:
    dtype = d.dtype(FLOAT_DTYPES, "dtype")
    batch, n = _la_batch(d), d.size(LA_SIZES, "n")
    uplo = d.choice(["L", "U"], "UPLO")
    g = _la_gen(d, "A")
    M = torch.randn((*batch, n, n), generator=g, dtype=torch.float64)
    A = (M + M.mT) * _la_scale(d, "A")
    if n > 1 and d.boolean(0.2, label="A.repeated"):
        # A repeated eigenvalue (a 2-D eigenspace): vectors are unique only up to a rotation.
        Q = torch.linalg.qr(M)[0]
        w = torch.randn((*batch, n), generator=g, dtype=torch.float64)
        w[..., 1] = w[..., 0]
        A = Q @ torch.diag_embed(w) @ Q.mT
    upper = uplo == "U"
    A = _la_specials(d, A, "A", _la_triangle_mask(n, upper))
    A = _la_garbage(d, A, upper, g, "A")
    a = draw_layout(d, A.to(dtype), READ_LAYOUTS, "A")
    return Sample([a, uplo], dtype=_la_out_dtype(dtype))


def _draw_svd(d: Drawer) -> Sample:
    dtype = d.dtype(FLOAT_DTYPES, "dtype")
    batch, m, n = _la_batch(d), d.size(LA_SIZES, "m"), d.size(LA_SIZES, "n")
    full = d.boolean(label="full_matrices")
    g = _la_gen(d, "A")
    A = torch.randn((*batch, m, n), generator=g, dtype=torch.float64) * _la_scale(d, "A")
    k = min(m, n)
    if k > 1 and d.boolean(0.2, label="A.rank_deficient"):
        A[..., :, -1] = A[..., :, 0]  # rank k - 1 at most: a zero singular value
    A = _la_specials(d, A, "A")
    a = draw_layout(d, A.to(dtype), READ_LAYOUTS, "A")
    return Sample([a, full], dtype=_la_out_dtype(dtype))


def _la_units(sample: Sample) -> float:
    return torch.finfo(sample.dtype).eps


def _la_fail(where: str, what: str, err: float, bound: float) -> None:
    raise AssertionError(f"{where}: {what} {err:.3g} exceeds {bound:.3g}")


def _la_check_nan_rows(where, out, ok, what):
    """Failed matrices (``~ok``) must be all NaN."""
    bad = out[~ok] if out.dim() else out
    if bad.numel() and not bad.isnan().all():
        raise AssertionError(f"{where}: {what} of a failed matrix is not all NaN")


# Backward-error constants (in units of n * u * |A|): twice the worst measured over drawn
# samples of the CPU kernels, LAPACK's own fp32 error included.
_LA_C = 8.0


def _check_eigh(sample: Sample, outs, expected, where: str) -> None:
    from . import backends as bk

    w, V, info = (o.detach().cpu() for o in outs)
    ew, _, einfo = expected
    bk.compare(info, einfo, Tolerance(0, 0), f"{where}: info")
    A = ref.read_triangle(sample.args[0].values.double(), sample.args[1].upper() == "U")
    n = A.shape[-1]
    if n == 0 or A.numel() == 0:
        return
    ok = einfo == 0
    _la_check_nan_rows(where, w, ok, "eigenvalues")
    _la_check_nan_rows(where, V, ok, "eigenvectors")
    if not ok.any():
        return
    A, w, V, ew = A[ok], w[ok].double(), V[ok].double(), ew[ok]
    norm = torch.linalg.matrix_norm(A, ord=2).clamp_min(torch.finfo(torch.float64).tiny)
    u = _la_units(sample)
    bound = _LA_C * n * u
    err = ((w - ew).abs().amax(-1) / norm).max().item()
    if err > bound:
        _la_fail(where, "eigenvalue error / |A|", err, bound)
    if not torch.equal(w, w.sort(-1).values):
        raise AssertionError(f"{where}: eigenvalues not ascending")
    res = (A @ V - V * w.unsqueeze(-2)).abs().amax((-2, -1)) / norm
    if res.max().item() > bound:
        _la_fail(where, "|A V - V diag(w)| / |A|", res.max().item(), bound)
    orth = (V.mT @ V - torch.eye(n, dtype=torch.float64)).abs().max().item()
    if orth > bound:
        _la_fail(where, "|V^T V - I|", orth, bound)


def _check_svd(sample: Sample, outs, expected, where: str) -> None:
    from . import backends as bk

    U, S, Vh, info = (o.detach().cpu() for o in outs)
    _, eS, _, einfo = expected
    bk.compare(info, einfo, Tolerance(0, 0), f"{where}: info")
    A = sample.args[0].values.double()
    m, n = A.shape[-2], A.shape[-1]
    k = min(m, n)
    if A.numel() == 0 or k == 0:
        return
    ok = einfo == 0
    for t, what in ((U, "U"), (S, "S"), (Vh, "Vh")):
        _la_check_nan_rows(where, t, ok, what)
    if not ok.any():
        return
    A, U, S, Vh, eS = A[ok], U[ok].double(), S[ok].double(), Vh[ok].double(), eS[ok]
    norm = eS[..., :1].clamp_min(torch.finfo(torch.float64).tiny)
    u = _la_units(sample)
    bound = _LA_C * max(m, n) * u
    err = ((S - eS).abs() / norm).max().item()
    if err > bound:
        _la_fail(where, "singular value error / |A|", err, bound)
    if (S[..., 1:] > S[..., :-1]).any() or (S < 0).any():
        raise AssertionError(f"{where}: singular values not descending and >= 0")
    rec = U[..., :k] * S.unsqueeze(-2) @ Vh[..., :k, :]
    res = ((rec - A).abs().amax((-2, -1)) / norm.squeeze(-1)).max().item()
    if res > bound:
        _la_fail(where, "|U S Vh - A| / |A|", res, bound)
    for Q, what in ((U.mT @ U, "|U^T U - I|"), (Vh @ Vh.mT, "|Vh Vh^T - I|")):
        orth = (Q - torch.eye(Q.shape[-1], dtype=torch.float64)).abs().max().item()
        if orth > bound:
            _la_fail(where, what, orth, bound)


def _la_tol(per_n: float):
    """Element-wise tolerance for a unique factor: per_n * n + 16 opmath units (forward error
    of substitution-based algorithms on well-conditioned inputs grows like n)."""

    def tol(sample: Sample, index: int) -> Tolerance:
        n = sample.args[0].values.shape[-1]
        return tolerance(sample.dtype, per_n * n + 16)

    return tol


def _la_edges_cholesky() -> list[Sample]:
    out = []
    spd = torch.tensor([[4.0, 2.0, 0.4], [2.0, 5.0, 1.0], [0.4, 1.0, 3.0]], dtype=torch.float64)
    for upper in (False, True):
        # Failing at the first, a middle and the last pivot, in one batch with a good matrix.
        fails = []
        for k in range(3):
            a = spd.clone()
            a[k, k] = -1.0
            fails.append(a)
        A = torch.stack([spd, *fails])
        out.append(Sample([TensorArg(A.float()), upper], dtype=torch.float32))
        nan_in = spd.clone()
        nan_in[2, 0] = nan_in[0, 2] = float("nan")
        inf_in = spd.clone()
        inf_in[1, 1] = float("inf")
        out.append(
            Sample([TensorArg(torch.stack([nan_in, inf_in, spd])), upper], dtype=torch.float64)
        )
        out.append(Sample([TensorArg(torch.zeros(0, 3, 3)), upper], dtype=torch.float32))
        out.append(Sample([TensorArg(torch.zeros(2, 0, 0)), upper], dtype=torch.float32))
        out.append(Sample([TensorArg(torch.zeros(2, 2)), upper], dtype=torch.float32))
    return out


def _la_edges_trsm() -> list[Sample]:
    A = torch.tensor([[2.0, 0.0], [1.0, -4.0]])
    return [
        Sample(
            [TensorArg(torch.zeros(0, 3, 3)), TensorArg(torch.zeros(0, 3, 2)), False, True, False]
        ),
        Sample([TensorArg(torch.zeros(3, 3)), TensorArg(torch.zeros(3, 0)), True, True, False]),
        Sample([TensorArg(A), TensorArg(torch.zeros(0, 2)), False, False, False]),
        # Singular A: Inf/NaN propagate as in LAPACK's substitution.
        Sample(
            [
                TensorArg(A * torch.tensor([[0.0, 1.0], [1.0, 1.0]])),
                TensorArg(torch.ones(2, 1)),
                False,
                True,
                False,
            ]
        ),
        Sample([TensorArg(A.half()), TensorArg(torch.ones(3, 2, 1).half()), False, True, False]),
    ]


def _la_edges_eigh() -> list[Sample]:
    S = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    nan = S.clone()
    nan[2, 1] = float("nan")
    return [
        Sample([TensorArg(torch.stack([S, nan, torch.eye(3), torch.zeros(3, 3)])), "L"]),
        Sample([TensorArg(torch.stack([S, nan, torch.eye(3)])), "U"]),
        Sample([TensorArg(torch.zeros(0, 4, 4)), "L"]),
        Sample([TensorArg(torch.zeros(3, 0, 0)), "U"]),
        Sample([TensorArg(torch.full((2, 2), 1e30)), "L"]),
    ]


def _la_edges_svd() -> list[Sample]:
    A = torch.arange(12.0).reshape(3, 4)
    nan = A.clone()
    nan[1, 2] = float("nan")
    out = []
    for full in (True, False):
        out += [
            Sample([TensorArg(torch.stack([A, nan, torch.zeros(3, 4)])), full]),
            Sample([TensorArg(torch.stack([A.mT, nan.mT])), full]),
            Sample([TensorArg(torch.zeros(2, 0, 3)), full]),
            Sample([TensorArg(torch.zeros(0, 3, 2)), full]),
            Sample([TensorArg(torch.eye(4)[:, :2] * 1e-30), full]),
        ]
    return out


def _la_bad(op: str, call) -> list[BadInput]:
    """Bad inputs shared by the family: dtype, rank, squareness."""
    out = [
        BadInput(
            "integer A",
            lambda: call(torch.ones(3, 3, dtype=torch.int64)),
            TypeError,
            rf"metalcore\.{op}: 'A' must be float16, bfloat16, float32 or float64, got Long",
        ),
        BadInput(
            "1-D A",
            lambda: call(torch.ones(3)),
            ValueError,
            rf"metalcore\.{op}: 'A' must have at least 2 dimensions \(a batch of matrices\), "
            r"got shape \[3\]",
        ),
    ]
    if op != "svd":
        out.append(
            BadInput(
                "non-square A",
                lambda: call(torch.ones(2, 3, 4)),
                ValueError,
                rf"metalcore\.{op}: 'A' must be a batch of square matrices, got shape \[2, 3, 4\]",
            )
        )
    return out


def _la_bad_trsm() -> list[BadInput]:
    out = _la_bad("solve_triangular", lambda A: ([A, torch.ones(3, 2), False], {}))
    out += [
        BadInput(
            "B of another dtype",
            lambda: ([torch.eye(3), torch.ones(3, 2, dtype=torch.float64), False], {}),
            TypeError,
            r"metalcore\.solve_triangular: 'B' must have the same dtype as 'A' \(Float\), "
            r"got Double",
        ),
        BadInput(
            "B with the wrong rows",
            lambda: ([torch.eye(3), torch.ones(4, 2), False], {}),
            ValueError,
            r"metalcore\.solve_triangular: 'B' must have 3 rows \(A X = B with A of size 3\), "
            r"got shape \[4, 2\]",
        ),
        BadInput(
            "B with the wrong columns (left=False)",
            lambda: ([torch.eye(3), torch.ones(3, 2), False, False], {}),
            ValueError,
            r"metalcore\.solve_triangular: 'B' must have 3 columns",
        ),
        BadInput(
            "batch dims that do not broadcast",
            lambda: ([torch.eye(3).expand(2, 3, 3), torch.ones(3, 3, 1), False], {}),
            ValueError,
            r"metalcore\.solve_triangular: the batch dims of 'A' \[2, 3, 3\] and 'B' \[3, 3, 1\] "
            r"must broadcast",
        ),
        BadInput(
            "B on meta",
            lambda: ([torch.eye(3), torch.ones(3, 2, device="meta"), False], {}),
            RuntimeError,
            r"metalcore\.solve_triangular: 'B' must be on the same device as 'A' \(cpu\), got meta",
        ),
    ]
    return out


def _build_linalg() -> dict[str, OpSpec]:
    bad_eigh = _la_bad("eigh", lambda A: ([A], {}))
    bad_eigh.append(
        BadInput(
            "UPLO 'X'",
            lambda: ([torch.eye(2), "X"], {}),
            ValueError,
            r"metalcore\.eigh: 'UPLO' must be 'L' or 'U', got 'X'",
        )
    )
    specs = [
        OpSpec(
            "cholesky_ex",
            _draw_cholesky_ex,
            ref.cholesky_ex,
            _la_tol(2.0),
            _la_bad("cholesky_ex", lambda A: ([A], {})),
            edges=_la_edges_cholesky,
        ),
        OpSpec(
            "solve_triangular",
            _draw_solve_triangular,
            lambda *a: (ref.solve_triangular(*a),),
            _la_tol(2.0),
            _la_bad_trsm(),
            edges=_la_edges_trsm,
        ),
        OpSpec(
            "eigh",
            _draw_eigh,
            ref.eigh,
            _la_tol(0.0),
            bad_eigh,
            edges=_la_edges_eigh,
            check_outputs=_check_eigh,
        ),
        OpSpec(
            "svd",
            _draw_svd,
            ref.svd,
            _la_tol(0.0),
            _la_bad("svd", lambda A: ([A], {})),
            edges=_la_edges_svd,
            check_outputs=_check_svd,
        ),
    ]
    return {s.name: s for s in specs}


SPECS.update(_build_linalg())

# --- Weight-only quantization ------------------------------------------------------------------
# Weights are drawn as random valid bytes (every code pattern is a valid weight; only the fp16
# block scales of the GGUF formats are set to finite values), so the specs cover every code,
# negative scales included. Quantized tensors stay contiguous (they are stored buffers); the
# activations take every layout.

QUANT_GROUPS = (32, 64, 128)
# ggml type id -> (weights per block, bytes per block, byte offsets of its fp16 fields)
QUANT_GGUF = {2: (32, 18, (0,)), 8: (32, 34, (0,)), 12: (256, 144, (0, 2)), 14: (256, 210, (208,))}
# Activations stay below this magnitude, so no float32 partial sum overflows where the float64
# reference does not (NaN and Inf still appear).
_QUANT_LARGE = 1e4


def _quant_bytes(seed: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, tuple(shape), generator=g, dtype=torch.uint8)


def _draw_affine_weight(d: Drawer, bits: int, x_dtype: torch.dtype):
    """(tensors [qweight, scales, biases], group_size, n, k) of a random affine weight."""
    group = d.choice(list(QUANT_GROUPS), label="group_size")
    if d.large(0.1, label="weight.large"):
        # Past the kernels' parallel grain: several tasks, and more than one GEMM panel.
        n, k = d.size((600, 1500), label="n"), group * 8
    else:
        n = d.size(ROW_SIZES[:12], label="n")
        k = group * d.size((1, 2, 3), label="groups")
    seed = d.integer(0, 2**31 - 1, label="weight.seed")
    q = _quant_bytes(seed, (n, k // 2 if bits == 4 else k))
    sdtype = d.dtype((x_dtype, torch.float32, torch.float16, torch.bfloat16), label="scales.dtype")
    gen = torch.Generator().manual_seed(seed + 1)
    scales = (torch.randn(n, k // group, generator=gen, dtype=torch.float64) * 0.1).to(sdtype)
    biases = (torch.randn(n, k // group, generator=gen, dtype=torch.float64) * 0.1).to(sdtype)
    return [TensorArg(q), TensorArg(scales), TensorArg(biases)], group, n, k


def _gguf_data(seed: int, qtype: int, n: int, blocks: int) -> torch.Tensor:
    bs, ts, fields = QUANT_GGUF[qtype]
    data = _quant_bytes(seed, (n, blocks, ts))
    gen = torch.Generator().manual_seed(seed + 1)
    for off in fields:
        d = (torch.randn(n, blocks, generator=gen) * 0.05).to(torch.float16)
        data[:, :, off : off + 2] = d.view(torch.uint8).view(n, blocks, 2)
    return data.reshape(n, blocks * ts)


def _draw_gguf_weight(d: Drawer):
    qtype = d.choice(list(QUANT_GGUF), label="qtype")
    if d.large(0.1, label="weight.large"):
        n, blocks = d.size((600, 1500), label="n"), 8 if qtype in (2, 8) else 2
    else:
        n = d.size(ROW_SIZES[:12], label="n")
        blocks = d.size((1, 2, 3), label="blocks")
    data = _gguf_data(d.integer(0, 2**31 - 1, label="weight.seed"), qtype, n, blocks)
    return [TensorArg(data)], qtype, n, blocks * QUANT_GGUF[qtype][0]


def _quant_batch(d: Drawer) -> tuple[int, ...]:
    # M around the kernels' dot / GEMM crossover (8), and leading dims of any rank.
    m = d.size((1, 2, 3, 7, 8, 9, 16, 33, 0), label="m")
    return d.choice([(m,), (1, m), (m, 1)] if m else [(m,)], label="batch")


def _draw_quant_x(d: Drawer, k: int, name: str):
    dtype = draw_dtype(d)
    shape = (*_quant_batch(d), k)
    x = draw_layout(d, draw_values(d, shape, dtype, name, large=_QUANT_LARGE), LAYOUTS, name)
    return dtype, x


def _draw_quant_bias(d: Drawer, n: int, dtype: torch.dtype):
    if not d.boolean(label="has_bias"):
        return None
    return TensorArg(draw_values(d, (n,), dtype, "bias", specials=False))


def _draw_affine_dequantize(bits: int):
    def draw(d: Drawer) -> Sample:
        w, group, _, _ = _draw_affine_weight(d, bits, draw_dtype(d))
        return Sample([*w, group], dtype=w[1].values.dtype)

    return draw


def _draw_affine_linear(bits: int):
    def draw(d: Drawer) -> Sample:
        dtype = draw_dtype(d)
        w, group, n, k = _draw_affine_weight(d, bits, dtype)
        _, x = _draw_quant_x(d, k, "input")
        x = TensorArg(x.values.to(dtype), x.layout, x.dims)
        return Sample([x, *w, group, _draw_quant_bias(d, n, dtype)], dtype=dtype)

    return draw


def _draw_affine_backward(bits: int):
    def draw(d: Drawer) -> Sample:
        dtype = draw_dtype(d)
        w, group, n, _ = _draw_affine_weight(d, bits, dtype)
        _, g = _draw_quant_x(d, n, "grad_out")
        return Sample([TensorArg(g.values.to(dtype), g.layout, g.dims), *w, group], dtype=dtype)

    return draw


def _draw_gguf_dequantize(d: Drawer) -> Sample:
    w, qtype, _, _ = _draw_gguf_weight(d)
    dtype = draw_dtype(d)
    return Sample([*w, qtype], {"dtype": dtype}, dtype=dtype)


def _draw_gguf_linear(d: Drawer) -> Sample:
    dtype = draw_dtype(d)
    w, qtype, n, k = _draw_gguf_weight(d)
    _, x = _draw_quant_x(d, k, "input")
    x = TensorArg(x.values.to(dtype), x.layout, x.dims)
    return Sample([x, *w, qtype, _draw_quant_bias(d, n, dtype)], dtype=dtype)


def _draw_gguf_backward(d: Drawer) -> Sample:
    dtype = draw_dtype(d)
    w, qtype, n, _ = _draw_gguf_weight(d)
    _, g = _draw_quant_x(d, n, "grad_out")
    return Sample([TensorArg(g.values.to(dtype), g.layout, g.dims), *w, qtype], dtype=dtype)


def _quant_w64(args, bits: int | None) -> torch.Tensor:
    """The float64 weight of a sample's args (affine: args[1:5]; GGUF: args[1:3])."""
    if bits is None:
        return ref.gguf_dequantize(args[1], args[2])
    return ref.affine_dequantize(args[1], args[2], args[3], args[4], bits)


def _ref_quant_linear(bits: int | None):
    def reference(x, *rest):
        args = [x, *rest]
        y = x.double() @ _quant_w64(args, bits).t()
        bias = args[-1]
        return (y if bias is None else y + bias.double(),)

    return reference


def _ref_quant_backward(bits: int | None):
    return lambda g, *rest: (g.double() @ _quant_w64([g, *rest], bits),)


# Dequantizing is one product and one sum per weight in float (exact for GGUF), then one
# rounding to the output dtype.
_QUANT_DEQ_C = 2
# A K-term dot product in float32 (blocked, 4 x 16 lanes, or BLAS): its error follows
# sum(|x| |w|), which is the tolerance's scale; 16 units cover K <= 768 with room.
_QUANT_DOT_C = 16


def _quant_dot_tol(bits: int | None, backward: bool):
    def tol(sample: Sample, index: int) -> Tolerance:
        args, _ = sample.materialize("cpu")
        w = _quant_w64(args, bits).abs()
        a = args[0].double().abs()
        scale = a @ w if backward else a @ w.t()
        if not backward and args[-1] is not None:
            scale = scale + args[-1].double().abs()
        scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
        return tolerance(sample.dtype, _QUANT_DOT_C, scale=scale)

    return tol


def _quant_edges(op: str) -> Callable[[], list[Sample]]:
    """Empty batches and weights, and activations with NaN and Inf on both the dot (m <= 8) and
    GEMM (m > 8) paths: only the rows holding them are non-finite."""

    def edges() -> list[Sample]:
        out = []
        affine = op.startswith("int")
        bits = 4 if op.startswith("int4") else 8
        for n, k, m in [(5, 64, 0), (0, 64, 3), (4, 64, 3), (6, 256, 20)]:
            if affine:
                q = _quant_bytes(7, (n, k // 2 if bits == 4 else k))
                s = _seeded((n, k // 32), seed=8, scale=0.1)
                w = [TensorArg(q), TensorArg(s), TensorArg(_seeded((n, k // 32), seed=9)), 32]
            else:
                w = [TensorArg(_gguf_data(7, 8, n, k // 32)), 8]
            if op.endswith("dequantize"):
                if m == 0:
                    continue
                out.append(Sample(w, dtype=torch.float32))
                continue
            width = n if op.endswith("backward") else k
            x = _seeded((m, width), seed=10)
            if m > 2 and width > 5:
                x[1, 3] = float("nan")
                x[2, 5] = float("inf")
            tail = [] if op.endswith("backward") else [None]
            out.append(Sample([TensorArg(x), *w, *tail], dtype=torch.float32))
        return out

    return edges


def _bad_affine(bits: int) -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    u8 = lambda *s: torch.zeros(*s, dtype=torch.uint8)  # noqa: E731
    out: dict[str, list[BadInput]] = {}
    kb = 32 if bits == 4 else 64  # qweight bytes per row for K = 64
    w = lambda: [u8(3, kb), x(3, 2), x(3, 2), 32]  # noqa: E731
    deq, lin, bwd = f"int{bits}_dequantize", f"int{bits}_linear", f"int{bits}_linear_backward"
    common = lambda op, head, tail: [  # noqa: E731
        BadInput(
            "int32 qweight",
            lambda: (
                [*head(), torch.zeros(3, kb, dtype=torch.int32), x(3, 2), x(3, 2), 32, *tail],
                {},
            ),
            TypeError,
            rf"metalcore\.{op}: 'qweight' must be uint8, got Int",
        ),
        BadInput(
            "1-D qweight",
            lambda: ([*head(), u8(3 * kb), x(3, 2), x(3, 2), 32, *tail], {}),
            ValueError,
            rf"metalcore\.{op}: 'qweight' must be 2-D",
        ),
        BadInput(
            "integer scales",
            lambda: (
                [*head(), u8(3, kb), torch.ones(3, 2, dtype=torch.int64), x(3, 2), 32, *tail],
                {},
            ),
            TypeError,
            rf"metalcore\.{op}: 'scales' must be float16, bfloat16, float32 or float64, "
            r"got Long",
        ),
        BadInput(
            "biases of another dtype",
            lambda: (
                [*head(), u8(3, kb), x(3, 2), x(3, 2, dtype=torch.float16), 32, *tail],
                {},
            ),
            TypeError,
            rf"metalcore\.{op}: 'biases' must have the same dtype as 'scales'",
        ),
        BadInput(
            "odd group size",
            lambda: ([*head(), u8(3, kb), x(3, 2), x(3, 2), 48, *tail], {}),
            ValueError,
            rf"metalcore\.{op}: 'group_size' must be 32, 64 or 128, got 48",
        ),
        BadInput(
            "in_features not a multiple of the group",
            lambda: ([*head(), u8(3, kb), x(3, 2), x(3, 2), 128, *tail], {}),
            ValueError,
            rf"metalcore\.{op}: in_features \(64, from 'qweight'\) must be a multiple of "
            r"'group_size' \(128\)",
        ),
        BadInput(
            "scales of the wrong shape",
            lambda: ([*head(), u8(3, kb), x(3, 4), x(3, 4), 32, *tail], {}),
            ValueError,
            rf"metalcore\.{op}: 'scales' must have shape \[3, 2\]",
        ),
        BadInput(
            "biases of the wrong shape",
            lambda: ([*head(), u8(3, kb), x(3, 2), x(2, 2), 32, *tail], {}),
            ValueError,
            rf"metalcore\.{op}: 'biases' must have the same shape as 'scales'",
        ),
        BadInput(
            "scales on another device",
            lambda: (
                [*head(), u8(3, kb), torch.empty(3, 2, device="meta"), x(3, 2), 32, *tail],
                {},
            ),
            RuntimeError,
            rf"metalcore\.{op}: 'scales' must be on the same device as",
        ),
    ]
    out[deq] = common(deq, lambda: [], [])
    out[lin] = common(lin, lambda: [x(2, 64)], [None]) + [
        BadInput(
            "input of the wrong width",
            lambda: ([x(2, 63), *w(), None], {}),
            ValueError,
            rf"metalcore\.{lin}: the last dim of 'input' must be 64 \(the weight's "
            r"in_features\), got shape \[2, 63\]",
        ),
        BadInput(
            "integer input",
            lambda: ([torch.ones(2, 64, dtype=torch.int32), *w(), None], {}),
            TypeError,
            rf"metalcore\.{lin}: 'input' must be float16, bfloat16, float32 or float64",
        ),
        BadInput(
            "0-d input",
            lambda: ([torch.tensor(1.0), *w(), None], {}),
            ValueError,
            rf"metalcore\.{lin}: 'input' must have at least 1 dimension",
        ),
        BadInput(
            "bias of the wrong size",
            lambda: ([x(2, 64), *w(), x(4)], {}),
            ValueError,
            rf"metalcore\.{lin}: 'bias' must have shape \[3\] \(out_features\), got \[4\]",
        ),
        BadInput(
            "bias of another dtype",
            lambda: ([x(2, 64), *w(), x(3, dtype=torch.float64)], {}),
            TypeError,
            rf"metalcore\.{lin}: 'bias' must have the same dtype as 'input'",
        ),
    ]
    out[bwd] = common(bwd, lambda: [x(2, 3)], []) + [
        BadInput(
            "grad_out of the wrong width",
            lambda: ([x(2, 4), *w()], {}),
            ValueError,
            rf"metalcore\.{bwd}: the last dim of 'grad_out' must be 3 \(the weight's "
            r"out_features\)",
        ),
    ]

    return out


def _bad_quant() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    u8 = lambda *s: torch.zeros(*s, dtype=torch.uint8)  # noqa: E731
    out: dict[str, list[BadInput]] = {}
    for bits in (4, 8):
        out.update(_bad_affine(bits))

    def gguf_common(op, head, tail):
        # The device case needs a primary tensor besides data (gguf_dequantize has none).
        cases = [
            BadInput(
                "float data",
                lambda: ([*head(), x(3, 36), 2, *tail], {}),
                TypeError,
                rf"metalcore\.{op}: 'data' must be uint8, got Float",
            ),
            BadInput(
                "unsupported qtype",
                lambda: ([*head(), u8(3, 36), 3, *tail], {}),
                ValueError,
                rf"metalcore\.{op}: 'qtype' must be a supported ggml type: 2 \(Q4_0\), 8 "
                r"\(Q8_0\), 12 \(Q4_K\) or 14 \(Q6_K\), got 3",
            ),
            BadInput(
                "rows that are not whole blocks",
                lambda: ([*head(), u8(3, 37), 2, *tail], {}),
                ValueError,
                rf"metalcore\.{op}: each row of 'data' must be whole Q4_0 blocks \(a multiple of "
                r"18 bytes\), got 37 bytes",
            ),
            BadInput(
                "1-D data",
                lambda: ([*head(), u8(36), 2, *tail], {}),
                ValueError,
                rf"metalcore\.{op}: 'data' must be 2-D",
            ),
            BadInput(
                "data on another device",
                lambda: (
                    [*head(), torch.empty(3, 36, dtype=torch.uint8, device="meta"), 2, *tail],
                    {},
                ),
                RuntimeError,
                rf"metalcore\.{op}: 'data' must be on the same device as",
            ),
        ]
        return cases if head() else cases[:-1]

    out["gguf_dequantize"] = gguf_common("gguf_dequantize", lambda: [], []) + [
        BadInput(
            "integer dtype",
            lambda: ([u8(3, 36), 2], {"dtype": torch.int32}),
            TypeError,
            r"metalcore\.gguf_dequantize: 'dtype' must be float16, bfloat16, float32 or "
            r"float64, got Int",
        ),
    ]
    out["gguf_linear"] = gguf_common("gguf_linear", lambda: [x(2, 64)], [None]) + [
        BadInput(
            "input of the wrong width",
            lambda: ([x(2, 32), u8(3, 36), 2, None], {}),
            ValueError,
            r"metalcore\.gguf_linear: the last dim of 'input' must be 64 \(the weight's "
            r"in_features\)",
        ),
        BadInput(
            "bias of the wrong size",
            lambda: ([x(2, 64), u8(3, 36), 2, x(2)], {}),
            ValueError,
            r"metalcore\.gguf_linear: 'bias' must have shape \[3\]",
        ),
    ]
    out["gguf_linear_backward"] = gguf_common("gguf_linear_backward", lambda: [x(2, 3)], []) + [
        BadInput(
            "grad_out of the wrong width",
            lambda: ([x(2, 4), u8(3, 36), 2], {}),
            ValueError,
            r"metalcore\.gguf_linear_backward: the last dim of 'grad_out' must be 3",
        ),
    ]
    return out


def _quant_gradient(bits: int | None) -> Gradient:
    if bits is None:
        return Gradient(
            (0,),
            "gguf_linear_backward",
            lambda a, o, g: [g[0], a[1], a[2]],
            {0: 0},
            large=_QUANT_LARGE,
        )
    return Gradient(
        (0,),
        f"int{bits}_linear_backward",
        lambda a, o, g: [g[0], a[1], a[2], a[3], a[4]],
        {0: 0},
        large=_QUANT_LARGE,
    )


def _build_quant() -> dict[str, OpSpec]:
    bad = _bad_quant()
    specs = []
    for bits in (4, 8):
        deq, lin, bwd = f"int{bits}_dequantize", f"int{bits}_linear", f"int{bits}_linear_backward"
        specs += [
            OpSpec(
                deq,
                _draw_affine_dequantize(bits),
                lambda q, s, b, g, bits=bits: (ref.affine_dequantize(q, s, b, g, bits),),
                _tol(_QUANT_DEQ_C),
                bad[deq],
                edges=_quant_edges(deq),
            ),
            OpSpec(
                lin,
                _draw_affine_linear(bits),
                _ref_quant_linear(bits),
                _quant_dot_tol(bits, backward=False),
                bad[lin],
                gradient=_quant_gradient(bits),
                edges=_quant_edges(lin),
            ),
            OpSpec(
                bwd,
                _draw_affine_backward(bits),
                _ref_quant_backward(bits),
                _quant_dot_tol(bits, backward=True),
                bad[bwd],
                edges=_quant_edges(bwd),
            ),
        ]
    specs += [
        OpSpec(
            "gguf_dequantize",
            _draw_gguf_dequantize,
            lambda data, qtype, dtype=None: (ref.gguf_dequantize(data, qtype),),
            _tol(_QUANT_DEQ_C),
            bad["gguf_dequantize"],
            edges=_quant_edges("gguf_dequantize"),
        ),
        OpSpec(
            "gguf_linear",
            _draw_gguf_linear,
            _ref_quant_linear(None),
            _quant_dot_tol(None, backward=False),
            bad["gguf_linear"],
            gradient=_quant_gradient(None),
            edges=_quant_edges("gguf_linear"),
        ),
        OpSpec(
            "gguf_linear_backward",
            _draw_gguf_backward,
            _ref_quant_backward(None),
            _quant_dot_tol(None, backward=True),
            bad["gguf_linear_backward"],
            edges=_quant_edges("gguf_linear_backward"),
        ),
    ]
    return {s.name: s for s in specs}


SPECS.update(_build_quant())

# --- LayerNorm family ----------------------------------------------------------------------------

# eps as a multiple of the rows' variance, across decades: negligible, as large as the variance
# (dropping it, or adding it twice, moves every output by ~30%), a visible 1%, and dominant.
# Never 0: a constant row then has 0 / 0, which no formulation defines (torch's neither).
_LN_EPS_RATIOS = (1e-6, 1.0, 1e-2, 100.0)


def _ln_eps(d: Drawer, x: torch.Tensor) -> float:
    ratio = d.choice(_LN_EPS_RATIOS, label="eps_ratio")
    if x.numel() == 0:
        return ratio
    xd = x.double()
    var = ref.layer_norm_stats(xd, 0.0)[1].pow(-2).reshape(-1)
    # Rows of equal values (an expanded layout) have no spread to scale eps by: their variance
    # is 0 up to the mean's rounding, and an eps scaled by that would be ~1e-38.
    spread = torch.finfo(torch.float64).eps * 4 * xd.mean(-1).abs().reshape(-1)
    var = var[torch.isfinite(var) & (var > spread**2)]
    return ratio * (float(var.median()) if var.numel() else 1.0)


def _ln_affine(d: Drawer, n: int, dtype: torch.dtype, name: str):
    if not d.boolean(0.7, label=f"has_{name}"):
        return None
    return draw_layout(d, draw_values(d, (n,), dtype, name, large=_RMS_LARGE), READ_LAYOUTS, name)


def _draw_layer_norm(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    x = _rms_values(d, shape, dtype, "input", "input")
    w, b = _ln_affine(d, shape[-1], dtype, "weight"), _ln_affine(d, shape[-1], dtype, "bias")
    return Sample([x, w, b, _ln_eps(d, x.values)], dtype=dtype)


def _ln_grad_out(d: Drawer, shape, dtype) -> TensorArg:
    """grad_out for the LayerNorm backward ops, with its infinities turned into NaN. An infinite
    grad_out meets (x - mean) in every element of its row, whose sign float32 cannot resolve
    for elements within the mean's rounding of the mean (rows with 1e15 outliers): the exact
    result there is inf or NaN by a coin toss of rounding, in any float32 implementation. NaN
    propagation is unambiguous and stays tested."""
    g = _rms_values(d, shape, dtype, "grad_out", "g")
    g.values = torch.where(g.values.isinf(), torch.full_like(g.values, float("nan")), g.values)
    return g


def _draw_layer_norm_backward(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    g = _ln_grad_out(d, shape, dtype)
    x = _rms_values(d, shape, dtype, "input", "input")
    w, b = _ln_affine(d, shape[-1], dtype, "weight"), _ln_affine(d, shape[-1], dtype, "bias")
    return Sample([g, x, w, b, _ln_eps(d, x.values)], dtype=dtype)


def _draw_fused_add_layer_norm(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    x = _rms_values(d, shape, dtype, "input", "input")
    r = _rms_values(d, shape, dtype, "residual", "res")
    w, b = _ln_affine(d, shape[-1], dtype, "weight"), _ln_affine(d, shape[-1], dtype, "bias")
    return Sample([x, r, w, b, _ln_eps(d, x.values + r.values)], dtype=dtype)


def _draw_fused_add_layer_norm_backward(d: Drawer) -> Sample:
    dtype, shape = _draw_rms_common(d)
    g = _ln_grad_out(d, shape, dtype)
    gr = None
    if d.boolean(0.7, label="has_grad_residual_out"):
        gr = _rms_values(d, shape, dtype, "grad_res", "grad_res")
    h = _rms_values(d, shape, dtype, "res_out", "h")
    w, b = _ln_affine(d, shape[-1], dtype, "weight"), _ln_affine(d, shape[-1], dtype, "bias")
    return Sample([g, gr, h, w, b, _ln_eps(d, h.values)], dtype=dtype)


def _ref_layer_norm(x, w, b, eps):
    return (ref.layer_norm(x, w, b, eps, ROUNDING_OPMATH[x.dtype]),)


def _ln_empty_or(t, present: bool) -> torch.Tensor:
    return t if present else torch.zeros(0, dtype=torch.float64)


def _ref_layer_norm_backward(g, x, w, b, eps):
    dx, dw, db = ref.layer_norm_backward(g, x, w, eps, ROUNDING_OPMATH[x.dtype])
    return dx, _ln_empty_or(dw, w is not None), _ln_empty_or(db, b is not None)


def _ref_fused_add_layer_norm(x, r, w, b, eps):
    h = x + r  # rounded to the input dtype once, as the op's contract says
    return ref.layer_norm(h, w, b, eps, ROUNDING_OPMATH[x.dtype]), h


def _ref_fused_add_layer_norm_backward(g, gr, h, w, b, eps):
    dh, dw, db = ref.layer_norm_backward(g, h, w, eps, ROUNDING_OPMATH[h.dtype])
    if gr is not None:
        dh = dh + gr.double()
    return dh, _ln_empty_or(dw, w is not None), _ln_empty_or(db, b is not None)


def _ln_row_scale(t: torch.Tensor) -> torch.Tensor:
    """Per-row median of the finite, non-zero magnitudes of ``t`` (1 where a row has none)."""
    t = t.abs().where(torch.isfinite(t), torch.full_like(t, float("nan")))
    t = t.where(t > 0, torch.full_like(t, float("nan")))
    if t.numel() == 0:
        return torch.ones(())
    return torch.nan_to_num(t.nanmedian(dim=-1, keepdim=True).values, nan=1.0)


def _ln_terms(x: TensorArg, eps: float):
    """xhat, rstd and kappa = sqrt(n) * mean|x| * rstd per row. The row's sum is rounded at the
    scale of its terms, so the mean is off by ~eps * mean|x|, and that error, a shift of the row,
    reaches xhat multiplied by rstd. Rows whose mean is large against their spread (300 +- 0.01)
    or that hold a huge outlier are ill-conditioned by that factor in any implementation that
    accumulates in the opmath type (torch's included)."""
    xv = x.values.double()
    mean, rstd = ref.layer_norm_stats(xv, eps)
    xhat = (xv - mean) * rstd
    # The sum's rounding grows with its chain of additions: ~sqrt(n) units, as the backward's
    # row reductions.
    mean_abs = _finite_abs(xv).mean(-1, keepdim=True) * math.sqrt(max(1, xv.shape[-1]))
    kappa = torch.nan_to_num(mean_abs * rstd, nan=0.0, posinf=0.0)
    return xhat, rstd, kappa


def _finite_abs(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t.abs(), nan=0.0, posinf=0.0)


def _ln_forward_scale(x: TensorArg, w: TensorArg | None, b: TensorArg | None, eps: float):
    """The magnitude y's rounding follows: |xhat * w| per row (a row normalises to a spread of
    1) and elementwise, |b| where a bias is added (y = xhat * w + b rounds at the larger term),
    and the rounding of the mean carried by kappa * |w|."""
    xhat, _, kappa = _ln_terms(x, eps)
    wv = w.values.double() if w is not None else torch.ones(())
    scale = _ln_row_scale(xhat * wv) + _finite_abs(xhat * wv) + kappa * _finite_abs(wv)
    if b is not None:
        scale = scale + _finite_abs(b.values.double())
    return scale


def _ln_grad_scale(g: TensorArg, x: TensorArg, w: TensorArg | None, eps: float) -> torch.Tensor:
    """dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) is a difference of terms: its
    rounding error follows them, not |dx|. The element's own rstd * |g*w|; the two row means,
    rounded at the scale of their terms (rstd * mean|g*w| and rstd * mean|g*w*xhat| * |xhat|);
    and a shift of xhat by the mean's rounding (kappa), which moves dx by up to
    kappa * rstd * mean|g*w| * (1 + |xhat|)."""
    gv = g.values.double()
    gw = _finite_abs(gv * w.values.double() if w is not None else gv)
    xhat, rstd, kappa = _ln_terms(x, eps)
    r = _finite_abs(rstd)
    ax = _finite_abs(xhat)
    mean_gw = r * gw.mean(-1, keepdim=True)
    mean_gwx = r * (gw * ax).mean(-1, keepdim=True)
    scale = r * gw + mean_gw + mean_gwx * ax + kappa * mean_gw * (1 + ax)
    return _ln_row_scale(gw * r) + scale


def _ln_param_grad_scale(g: TensorArg, x: TensorArg, eps: float, weight: bool) -> torch.Tensor:
    """grad_weight = sum over rows of g * xhat (grad_bias: of g): the sum of the terms'
    magnitudes, plus the mean's rounding through xhat for grad_weight."""
    n = max(1, x.values.shape[-1])
    gv = _finite_abs(g.values.double()).reshape(-1, n)
    if not weight:
        return gv.sum(0)
    xhat, _, kappa = _ln_terms(x, eps)
    terms = gv * _finite_abs(xhat).reshape(-1, n) + gv * kappa.reshape(-1, 1)
    return terms.sum(0)


def _ln_floor(x: TensorArg, eps: float, sample: Sample) -> torch.Tensor:
    """An absolute error allowed where terms fall below the opmath's normal range: their
    subnormal step, scaled by rstd through the formulas (as rmsnorm's floor)."""
    fi = torch.finfo(ROUNDING_OPMATH[sample.dtype])
    _, rstd, kappa = _ln_terms(x, eps)
    step = fi.smallest_normal * fi.eps
    return torch.nan_to_num(_LN_BACKWARD_C * step * (1 + _finite_abs(rstd)) * (1 + kappa))


# Forward: mean, corrected variance, rsqrt, scale and shift (4 units; F.layer_norm's own float32
# error is of the same order). Backward: rmsnorm's reasoning, two row reductions of up to 4099
# terms each (~sqrt(4099) = 64 units).
_LN_C, _LN_BACKWARD_C = 4, 64


def _ln_tol(
    backward: tuple[int, int, int] | None = None, forward: tuple[int, int, int] = (0, 1, 2)
):
    """``forward``: positions of (input, weight, bias); ``backward``: of (grad_out, input,
    weight) in the args of a backward op."""

    def tol(sample: Sample, index: int) -> Tolerance:
        eps = sample.args[-1]
        if backward is None:
            x, w, b = (sample.args[i] for i in forward)
            if index == 1:  # fused_add's residual_out: one rounding of the sum
                return tolerance(sample.dtype, 0, per_row=True)
            if x.values.numel() == 0:
                return tolerance(sample.dtype, _LN_C)
            if forward[1] == 2:  # fused_add: the normalised tensor is input + residual
                x = TensorArg(x.values + sample.args[1].values)
            scale = _ln_forward_scale(x, w, b, eps)
            return tolerance(sample.dtype, _LN_C, scale=scale, floor=_ln_floor(x, eps, sample))
        g, x, w = (sample.args[i] for i in backward)
        if x.values.numel() == 0:
            return tolerance(sample.dtype, _LN_BACKWARD_C)
        if index >= 1:
            # grad_weight / grad_bias sum over rows, against the sum of the terms' magnitudes.
            scale = _ln_param_grad_scale(g, x, eps, weight=index == 1)
            return tolerance(sample.dtype, _LN_BACKWARD_C, scale=scale)
        scale = _ln_grad_scale(g, x, w, eps)
        return tolerance(sample.dtype, _LN_BACKWARD_C, scale=scale, floor=_ln_floor(x, eps, sample))

    return tol


def _ln_edges(op: str) -> Callable[[], list[Sample]]:
    """Empty shapes, rows holding NaN and Inf (that row is all NaN, the others stay finite), and
    a row whose mean is large against its spread (300 +- 0.01), short and long."""

    def edges() -> list[Sample]:
        cases = []
        for shape in [(0, 16), (3, 0), (0,)]:
            cases.append((_seeded(shape, seed=1), _seeded(shape[-1:], seed=2)))
        for n in (16, 5000):
            x = _seeded((3, n), seed=3)
            x[0, 3] = float("nan")
            x[1, 5] = float("inf")
            cases.append((x, None))
            cases.append((300.0 + _seeded((2, n), seed=6, scale=0.01), _seeded((n,), seed=7)))
        out = []
        for x, w in cases:
            t = [TensorArg(x), None if w is None else TensorArg(w)]
            bias = None if w is None else TensorArg(_seeded(x.shape[-1:], seed=8))
            g = TensorArg(_seeded(x.shape, seed=4))
            args = {
                "layer_norm": [t[0], t[1], bias, 1e-5],
                "layer_norm_backward": [g, t[0], t[1], bias, 1e-5],
                "fused_add_layer_norm": [
                    t[0],
                    TensorArg(torch.zeros_like(x)),
                    t[1],
                    bias,
                    1e-5,
                ],
                "fused_add_layer_norm_backward": [g, g, t[0], t[1], bias, 1e-5],
            }[op]
            out.append(Sample(args, dtype=torch.float32))
        return out

    return edges


_LAYER_NORM_GRADIENT = Gradient(
    (0, 1, 2),
    "layer_norm_backward",
    lambda a, o, g: [g[0], a[0], a[1], a[2], a[3]],
    {0: 0, 1: 1, 2: 2},
    large=_RMS_LARGE,
    inf_as_nan=True,
)
_FUSED_ADD_LAYER_NORM_GRADIENT = Gradient(
    (0, 1, 2, 3),
    "fused_add_layer_norm_backward",
    lambda a, o, g: [g[0], g[1], o[1], a[2], a[3], a[4]],
    {0: 0, 1: 0, 2: 1, 3: 2},
    large=_RMS_LARGE,
    inf_as_nan=True,
)


def _bad_layer_norm() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731

    def common(op, extra, name="input"):
        return [
            BadInput(
                f"integer {name}",
                lambda: ([*extra(torch.ones(4, 8, dtype=torch.int32)), None, None, 1e-5], {}),
                TypeError,
                rf"metalcore\.{op}: '{name}' must be float16, bfloat16, float32 or float64, "
                r"got Int",
            ),
            BadInput(
                f"0-d {name}",
                lambda: ([*extra(torch.tensor(1.0)), None, None, 1e-5], {}),
                ValueError,
                rf"metalcore\.{op}: '{name}' must have at least 1 dimension",
            ),
            BadInput(
                "weight of the wrong size",
                lambda: ([*extra(x(4, 8)), x(7), None, 1e-5], {}),
                ValueError,
                rf"metalcore\.{op}: 'weight' must have shape \[8\] \(the last dim of '{name}'\)",
            ),
            BadInput(
                "bias of the wrong size",
                lambda: ([*extra(x(4, 8)), None, x(2, 4), 1e-5], {}),
                ValueError,
                rf"metalcore\.{op}: 'bias' must have shape \[8\] \(the last dim of '{name}'\)",
            ),
            BadInput(
                "bias of another dtype",
                lambda: ([*extra(x(4, 8)), x(8), x(8, dtype=torch.float64), 1e-5], {}),
                TypeError,
                rf"metalcore\.{op}: 'bias' must have the same dtype as '{name}'",
            ),
            BadInput(
                "weight on another device",
                lambda: ([*extra(x(4, 8)), torch.empty(8, device="meta"), None, 1e-5], {}),
                RuntimeError,
                rf"metalcore\.{op}: 'weight' must be on the same device as '{name}'",
            ),
            BadInput(
                "negative eps",
                lambda: ([*extra(x(4, 8)), None, None, -1.0], {}),
                ValueError,
                rf"metalcore\.{op}: 'eps' must be >= 0, got -1",
            ),
        ]

    return {
        "layer_norm": common("layer_norm", lambda t: [t]),
        "layer_norm_backward": common("layer_norm_backward", lambda t: [t.clone(), t])
        + [
            BadInput(
                "grad_out of another shape",
                lambda: ([x(3, 8), x(4, 8), None, None, 1e-5], {}),
                ValueError,
                r"metalcore\.layer_norm_backward: 'grad_out' must have the same shape as 'input'",
            ),
        ],
        "fused_add_layer_norm": common("fused_add_layer_norm", lambda t: [t, t.clone()])
        + [
            BadInput(
                "residual of another shape",
                lambda: ([x(4, 8), x(4, 9), None, None, 1e-5], {}),
                ValueError,
                r"metalcore\.fused_add_layer_norm: 'residual' must have the same shape as 'input'",
            ),
            BadInput(
                "residual of another dtype",
                lambda: ([x(4, 8), x(4, 8, dtype=torch.bfloat16), None, None, 1e-5], {}),
                TypeError,
                r"metalcore\.fused_add_layer_norm: 'residual' must have the same dtype as 'input'",
            ),
        ],
        "fused_add_layer_norm_backward": common(
            "fused_add_layer_norm_backward", lambda t: [t.clone(), None, t], "residual_out"
        )
        + [
            BadInput(
                "grad_residual_out of another shape",
                lambda: ([x(4, 8), x(2, 8), x(4, 8), None, None, 1e-5], {}),
                ValueError,
                r"metalcore\.fused_add_layer_norm_backward: 'grad_residual_out' must have the "
                r"same shape as 'residual_out'",
            ),
        ],
    }


def _layer_norm_specs() -> list[OpSpec]:
    bad = _bad_layer_norm()
    return [
        OpSpec(
            "layer_norm",
            _draw_layer_norm,
            _ref_layer_norm,
            _ln_tol(),
            bad["layer_norm"],
            gradient=_LAYER_NORM_GRADIENT,
            edges=_ln_edges("layer_norm"),
        ),
        OpSpec(
            "layer_norm_backward",
            _draw_layer_norm_backward,
            _ref_layer_norm_backward,
            _ln_tol(backward=(0, 1, 2)),
            bad["layer_norm_backward"],
            edges=_ln_edges("layer_norm_backward"),
        ),
        OpSpec(
            "fused_add_layer_norm",
            _draw_fused_add_layer_norm,
            _ref_fused_add_layer_norm,
            _ln_tol(forward=(0, 2, 3)),
            bad["fused_add_layer_norm"],
            gradient=_FUSED_ADD_LAYER_NORM_GRADIENT,
            edges=_ln_edges("fused_add_layer_norm"),
        ),
        OpSpec(
            "fused_add_layer_norm_backward",
            _draw_fused_add_layer_norm_backward,
            _ref_fused_add_layer_norm_backward,
            _ln_tol(backward=(0, 2, 3)),
            bad["fused_add_layer_norm_backward"],
            edges=_ln_edges("fused_add_layer_norm_backward"),
        ),
    ]


SPECS.update({s.name: s for s in _layer_norm_specs()})

# --- Attention -----------------------------------------------------------------------------------

# q and k stay at moderate magnitudes: a score is a float32 sum of D products, and at |q|, |k| ~
# 1e3 its rounding error (eps * sum |q_c k_c| ~ 10) would reorder the softmax in any float32
# implementation (PyTorch's too); v, the masks and the gradients take every SCALE.
_ATTN_QK_SCALES = (1.0, 0.5, 2.0)
_ATTN_MODES = ("none", "causal", "window", "bool_mask", "additive_mask")
# Forward: one exp, a max and a sum per score, float32 GEMM accumulation over D and over the
# visible keys. Backward: two more GEMM accumulations (dP, then dQ/dK/dV) on recomputed P.
_ATTN_C = 16
_ATTN_BACKWARD_C = 32
# Gradients drawn up to this magnitude: dS sums products of grad_out with V and O, which must
# stay finite in float32.
_ATTN_LARGE = 1e6


def _attn_lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _attn_values(d: Drawer, shape, dtype, label: str) -> torch.Tensor:
    """q/k values: seeded normal values times a moderate drawn scale, no special values."""
    seed = d.integer(0, 2**31 - 1, label=f"{label}.seed")
    scales = [s for s in (d.limits.scales or _ATTN_QK_SCALES) if s <= 3.0] or [1.0]
    scale = d.choice(scales, label=f"{label}.scale")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype)


def _draw_attention_args(d: Drawer) -> Sample:
    """q, k, v, attn_mask, scale, is_causal, window_left, window_right."""
    dtype = draw_dtype(d)
    b = d.size([1, 2, 3], label="batch")
    # 8 (batch x KV heads >= 8) takes the CPU kernel's fused backward, fewer its split one.
    hkv = d.size([1, 2, 3, 8], label="kv_heads")
    group = d.size([1, 2, 4], label="group")  # Hq / Hkv: MHA, GQA 2:1, 4:1
    if d.large(0.1, label="long"):
        # Past one row block (64 packed rows) and one key block (128 keys) of the CPU kernel.
        lq = d.size([70, 150], label="q_seq")
        lk = d.size([129, 150, 300], label="kv_seq")
        hd = d.size([16, 64], label="head_dim")
        b, hkv = 1, 1
    else:
        lq = d.size([1, 2, 5, 8, 17, 33, 0], label="q_seq")
        lk = d.size([1, 3, 8, 17, 33, 70, 0], label="kv_seq")
        hd = d.size([8, 16, 3, 32, 1, 0], label="head_dim")
    dv = d.size([hd, 5, 16], label="v_head_dim")
    if d.limits.max_size is not None and d.limits.max_size <= 5:
        # gradcheck perturbs every input element: one batch and at most 4 query heads keep its
        # numerical Jacobians to a few hundred columns.
        b, hkv, group = 1, min(hkv, 2), min(group, 2)
    hq = hkv * group
    q = draw_layout(d, _attn_values(d, (b, hq, lq, hd), dtype, "q"), LAYOUTS, "q")
    k = draw_layout(d, _attn_values(d, (b, hkv, lk, hd), dtype, "k"), LAYOUTS, "k")
    v = draw_layout(d, draw_values(d, (b, hkv, lk, dv), dtype, "v", specials=False), LAYOUTS, "v")
    mode = d.choice(list(_ATTN_MODES), label="mode")
    # Without special values (gradcheck, opcheck) every row sees a key: a row that sees none has
    # lse = +inf, whose numerical derivative is NaN.
    smooth = not d.limits.specials
    mask, causal, left, right = None, False, -1, -1
    if mode == "causal":
        causal = True
    elif mode == "window":
        left = d.choice([-1, 0, 3, 20], label="window_left")
        right = d.choice([0, -1, 2], label="window_right")
        if smooth and lq > lk:  # bottom-right: the first Lq - Lk rows could see nothing
            left, right = -1, -1
    elif mode in ("bool_mask", "additive_mask"):
        form = d.choice(["full", "1hqk", "b11k", "qk"], label="mask_form")
        mshape = {
            "full": (b, hq, lq, lk),
            "1hqk": (1, hq, lq, lk),
            "b11k": (b, 1, 1, lk),
            "qk": (lq, lk),
        }[form]
        g = torch.Generator().manual_seed(d.integer(0, 2**31 - 1, label="mask.seed"))
        keep = torch.rand(mshape, generator=g, dtype=torch.float64) < 0.7
        if smooth and keep.numel():
            keep[..., -1] = True
        if mode == "bool_mask":
            values = keep
        else:
            bias = torch.randn(mshape, generator=g, dtype=torch.float64)
            values = torch.where(keep, bias, float("-inf")).to(dtype)
        mask = draw_layout(d, values, LAYOUTS, "mask")
    scale = d.choice([None, 0.5, 0.125], label="scale")
    return Sample([q, k, v, mask, scale, causal, left, right], dtype=dtype)


def _attn_info(dtype: torch.dtype) -> dict:
    # lse is float32 (float64 for float64 inputs) whatever the input dtype.
    return {"out_dtypes": {1: _attn_lse_dtype(dtype)}}


def _draw_attention(d: Drawer) -> Sample:
    s = _draw_attention_args(d)
    s.info = _attn_info(s.dtype)
    return s


def _draw_attention_backward(d: Drawer) -> Sample:
    """grad_out, grad_lse (or None), q, k, v, out, lse and the forward's flags; out and lse are
    the float64 forward rounded as the op stores them."""
    fwd = _draw_attention_args(d)
    q, k, v, mask = (a.values if isinstance(a, TensorArg) else a for a in fwd.args[:4])
    out, lse = ref.attention(q, k, v, mask, *fwd.args[4:])
    out, lse = out.to(fwd.dtype), lse.to(_attn_lse_dtype(fwd.dtype))
    grad_out = draw_layout(
        d,
        draw_values(d, out.shape, fwd.dtype, "grad_out", large=_ATTN_LARGE),
        ("contiguous", "offset", "transposed"),
        "grad_out",
    )
    grad_lse = None
    if d.boolean(label="has_grad_lse"):
        grad_lse = TensorArg(
            draw_values(d, lse.shape, lse.dtype, "grad_lse", specials=False, large=_ATTN_LARGE)
        )
    args = [grad_out, grad_lse, *fwd.args[:3], TensorArg(out), TensorArg(lse), *fwd.args[3:]]
    return Sample(args, dtype=fwd.dtype, info={"out_dtypes": {}})


def _attn_terms(q, k, v, mask, scale, causal, left, right):
    """float64 (P, |S| rounding terms per row, |v|): P the softmax weights; smax_i the largest
    |scale * sum_c |q_ic k_jc|| + |mask_ij| over visible keys, which a float32 score's rounding
    error follows."""
    s, vis, sc, g = ref._attention_scores(q, k, mask, scale, causal, left, right)
    qa, ka = q.double().abs(), k.double().abs().repeat_interleave(g, dim=1)
    terms = torch.matmul(qa, ka.transpose(-1, -2)) * abs(sc)
    if mask is not None and mask.dtype != torch.bool:
        terms = terms + mask.double().abs().nan_to_num(posinf=0.0)
    terms = torch.where(vis & torch.isfinite(s), terms, 0.0)
    smax = terms.amax(-1) if terms.shape[-1] else terms.sum(-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(vis, torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1)), 0.0)
    return p.nan_to_num(0.0), smax, g


def _attn_forward_tol(sample: Sample, index: int) -> Tolerance:
    q, k, v, mask = (a.values if isinstance(a, TensorArg) else a for a in sample.args[:4])
    p, smax, g = _attn_terms(q, k, v, mask, *sample.args[4:])
    vr = v.double().repeat_interleave(g, dim=1)
    if index == 1:  # lse, in its own dtype: |error| ~ rounding of the largest score
        _, opmath = ROUNDING[_attn_lse_dtype(sample.dtype)]
        t = (_ATTN_C + 1) * opmath
        return Tolerance(t, t, scale=(1.0 + smax))
    weighted = torch.matmul(p, vr.abs())
    spread = torch.matmul(p, vr.abs()) + torch.matmul(p, vr).abs()
    scale = weighted + smax.unsqueeze(-1) * spread
    return tolerance(sample.dtype, _ATTN_C, scale=scale)


def _attn_backward_tol(sample: Sample, index: int) -> Tolerance:
    go, gl, q, k, v, out, lse, mask = (
        a.values if isinstance(a, TensorArg) else a for a in sample.args[:8]
    )
    flags = sample.args[8:]
    p, smax, g = _attn_terms(q, k, v, mask, *flags)
    scale = flags[0]
    if scale is None:
        scale = 1.0 / q.shape[-1] ** 0.5 if q.shape[-1] else 1.0
    do = go.double().nan_to_num(0.0, 0.0, 0.0).abs()
    vr = v.double().repeat_interleave(g, dim=1).abs()
    kr = k.double().repeat_interleave(g, dim=1).abs()
    a_delta = (do * out.double().abs()).sum(-1)
    if gl is not None:
        a_delta = a_delta + gl.double().abs()
    a_ds = p * (torch.matmul(do, vr.transpose(-1, -2)) + a_delta.unsqueeze(-1))
    a_ds = a_ds * (1.0 + smax).unsqueeze(-1)
    b, hkv, lk = k.shape[0], k.shape[1], k.shape[2]
    if index == 0:
        terms = torch.matmul(a_ds, kr) * abs(scale)
    elif index == 1:
        terms = torch.matmul(a_ds.transpose(-1, -2), q.double().abs()) * abs(scale)
        terms = terms.reshape(b, hkv, g, lk, q.shape[-1]).sum(2)
    else:
        pw = p * (1.0 + smax).unsqueeze(-1)
        terms = torch.matmul(pw.transpose(-1, -2), do).reshape(b, hkv, g, lk, v.shape[-1]).sum(2)
    return tolerance(sample.dtype, _ATTN_BACKWARD_C, scale=terms)


def _ref_attention(q, k, v, mask, scale, causal, left, right):
    return ref.attention(q, k, v, mask, scale, causal, left, right)


def _attn_edges(backward: bool) -> Callable[[], list[Sample]]:
    """Empty batch, heads, sequences and head dims; rows that see no key (a window past the
    keys, an all-False bool row, an all -inf additive row); decode (Lq 1) over 300 keys with
    GQA 4:1 and a bool padding mask; for the backward also NaN and Inf in grad_out."""

    def t(*s, seed=0, dtype=torch.float32):
        return TensorArg(_seeded(s, dtype=dtype, seed=seed))

    def fwd_cases() -> list[list]:
        cases = [
            [t(0, 2, 3, 8), t(0, 1, 5, 8), t(0, 1, 5, 8), None, None, False, -1, -1],
            [t(1, 2, 0, 8), t(1, 1, 5, 8), t(1, 1, 5, 4), None, None, True, -1, -1],
            [t(1, 2, 3, 8), t(1, 1, 0, 8), t(1, 1, 0, 8), None, None, False, -1, -1],
            [t(1, 2, 3, 0), t(1, 2, 4, 0), t(1, 2, 4, 3), None, None, False, -1, -1],
            [t(1, 2, 3, 8), t(1, 2, 4, 8), t(1, 2, 4, 0), None, None, False, -1, -1],
            [t(1, 0, 3, 8), t(1, 0, 4, 8), t(1, 0, 4, 8), None, None, False, -1, -1],
            # Lq > Lk with a bottom-right window: the first rows see no key.
            [t(1, 2, 9, 8, seed=1), t(1, 1, 4, 8, seed=2), t(1, 1, 4, 8), None, 0.3, False, 1, 0],
        ]
        keep = torch.ones(1, 1, 3, 5, dtype=torch.bool)
        keep[..., 1, :] = False
        cases.append(
            [t(1, 2, 3, 8, seed=3), t(1, 2, 5, 8), t(1, 2, 5, 8), TensorArg(keep)]
            + [None, False, -1, -1]
        )
        bias = torch.zeros(2, 1, 3, 5)
        bias[1, :, 2, :] = float("-inf")
        cases.append(
            [t(2, 2, 3, 8, seed=4), t(2, 2, 5, 8), t(2, 2, 5, 8), TensorArg(bias)]
            + [None, False, -1, -1]
        )
        pad = torch.ones(2, 1, 1, 300, dtype=torch.bool)
        pad[0, ..., :37] = False  # left padding
        cases.append(
            [
                t(2, 8, 1, 64, seed=5),
                t(2, 2, 300, 64, seed=6),
                t(2, 2, 300, 64, seed=7),
                TensorArg(pad),
            ]
            + [None, False, -1, -1]
        )
        # 2 x 4 (batch, KV head) pairs: the fused backward; 300 keys span two key blocks.
        cases.append(
            [t(2, 8, 9, 16, seed=8), t(2, 4, 300, 16, seed=9), t(2, 4, 300, 16, seed=10)]
            + [None, None, True, -1, -1]
        )
        return cases

    def make() -> list[Sample]:
        out = []
        for args in fwd_cases():
            if not backward:
                out.append(Sample(args, info=_attn_info(torch.float32)))
                continue
            vals = [a.values if isinstance(a, TensorArg) else a for a in args]
            o, lse = ref.attention(*vals)
            go = _seeded(tuple(o.shape), seed=11)
            if go.numel():
                go.view(-1)[0] = float("nan")
                go.view(-1)[-1] = float("inf")
            gl = TensorArg(_seeded(tuple(lse.shape), seed=12))
            bargs = [TensorArg(go), gl, *args[:3], TensorArg(o.float()), TensorArg(lse.float())]
            out.append(Sample(bargs + args[3:], info={"out_dtypes": {}}))
        return out

    return make


_ATTN_GRADIENT = Gradient(
    (0, 1, 2),
    "attention_backward",
    lambda a, o, g: [g[0], g[1].to(o[1].dtype), a[0], a[1], a[2], o[0], o[1], *a[3:8]],
    {0: 0, 1: 1, 2: 2},
    large=_ATTN_LARGE,
)


def _bad_attention() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    q4 = lambda: x(2, 4, 5, 8)  # noqa: E731
    kv = lambda: x(2, 2, 6, 8)  # noqa: E731

    def cases(op: str, backward: bool):
        def call(
            q=q4,
            k=kv,
            v=kv,
            mask=None,
            scale=None,
            causal=False,
            left=-1,
            right=-1,
            grad_out=None,
            grad_lse=None,
            out=None,
            lse=None,
        ):
            def make():
                qq, kk, vv = q(), k(), v()
                m = mask() if mask is not None else None
                flags = [m, scale, causal, left, right]
                if not backward:
                    return [qq, kk, vv, *flags], {}
                shape = (2, 4, 5, 8)
                go = grad_out() if grad_out else x(*shape)
                o = out() if out else x(*shape)
                ls = lse() if lse else x(2, 4, 5)
                gl = grad_lse() if grad_lse else None
                return [go, gl, qq, kk, vv, o, ls, *flags], {}

            return make

        p = rf"metalcore\.{op}: "
        bad = [
            BadInput(
                "integer q",
                call(q=lambda: torch.ones(2, 4, 5, 8, dtype=torch.int32)),
                TypeError,
                p + r"'q' must be float16, bfloat16, float32 or float64, got Int",
            ),
            BadInput(
                "k of another dtype",
                call(k=lambda: x(2, 2, 6, 8, dtype=torch.float64)),
                TypeError,
                p + r"'k' must have the same dtype as 'q'",
            ),
            BadInput(
                "v on another device",
                call(v=lambda: torch.empty(2, 2, 6, 8, device="meta")),
                RuntimeError,
                p + r"'v' must be on the same device as 'q'",
            ),
            BadInput(
                "integer mask",
                call(mask=lambda: torch.ones(5, 6, dtype=torch.int32)),
                TypeError,
                p + r"'attn_mask' must be bool or have the dtype of 'q' \(Float\), got Int",
            ),
            BadInput(
                "3-D q",
                call(q=lambda: x(4, 5, 8)),
                ValueError,
                p + r"'q' must be 4-D \[batch, heads, seq, head_dim\]",
            ),
            BadInput(
                "k with another head_dim",
                call(k=lambda: x(2, 2, 6, 7)),
                ValueError,
                p + r"'k' must have the batch and head_dim of 'q'",
            ),
            BadInput(
                "v with another seq",
                call(v=lambda: x(2, 2, 7, 8)),
                ValueError,
                p + r"'v' must have the batch, heads and seq of 'k'",
            ),
            BadInput(
                "kv heads not dividing q heads",
                call(k=lambda: x(2, 3, 6, 8), v=lambda: x(2, 3, 6, 8)),
                ValueError,
                p + r"the heads of 'k' \(3\) must divide the heads of 'q' \(4\)",
            ),
            BadInput(
                "mask not broadcastable",
                call(mask=lambda: torch.ones(5, 7, dtype=torch.bool)),
                ValueError,
                p + r"'attn_mask' must be broadcastable to \[batch, q_heads, q_seq, "
                r"kv_seq\] = \[2, 4, 5, 6\], got shape \[5, 7\]",
            ),
            BadInput(
                "infinite scale",
                call(scale=float("inf")),
                ValueError,
                p + r"'scale' must be finite, got inf",
            ),
            BadInput(
                "window below -1",
                call(left=-2),
                ValueError,
                p + r"'window_left' and 'window_right' must be >= -1",
            ),
            BadInput(
                "causal with a window",
                call(causal=True, right=0),
                ValueError,
                p + r"'is_causal' \(top-left\) cannot be combined with a window",
            ),
            BadInput(
                "causal with a mask",
                call(causal=True, mask=lambda: torch.ones(5, 6, dtype=torch.bool)),
                ValueError,
                p + r"'is_causal' cannot be combined with 'attn_mask'",
            ),
        ]
        if backward:
            bad += [
                BadInput(
                    "grad_out of another shape",
                    call(grad_out=lambda: x(2, 4, 5, 7)),
                    ValueError,
                    p + r"'grad_out' must have shape \[batch, q_heads, q_seq, "
                    r"v_head_dim\] = \[2, 4, 5, 8\], got \[2, 4, 5, 7\]",
                ),
                BadInput(
                    "out of another dtype",
                    call(out=lambda: x(2, 4, 5, 8, dtype=torch.float64)),
                    TypeError,
                    p + r"'out' must have the same dtype as 'q'",
                ),
                BadInput(
                    "float16 lse",
                    call(lse=lambda: x(2, 4, 5, dtype=torch.float16)),
                    TypeError,
                    p + r"'lse' must be Float \(lse's dtype for Float inputs\), got Half",
                ),
                BadInput(
                    "grad_lse of another shape",
                    call(grad_lse=lambda: x(2, 4, 6)),
                    ValueError,
                    p + r"'grad_lse' must have shape \[batch, q_heads, q_seq\] = \[2, 4, 5\], "
                    r"got \[2, 4, 6\]",
                ),
            ]
        return bad

    return {
        "attention": cases("attention", False),
        "attention_backward": cases("attention_backward", True),
    }


def _attention_specs() -> list[OpSpec]:
    bad = _bad_attention()
    return [
        OpSpec(
            "attention",
            _draw_attention,
            _ref_attention,
            _attn_forward_tol,
            bad["attention"],
            gradient=_ATTN_GRADIENT,
            edges=_attn_edges(backward=False),
        ),
        OpSpec(
            "attention_backward",
            _draw_attention_backward,
            ref.attention_backward,
            _attn_backward_tol,
            bad["attention_backward"],
            edges=_attn_edges(backward=True),
        ),
    ]


SPECS.update({s.name: s for s in _attention_specs()})

# --- Softmax family ------------------------------------------------------------------------------
# softmax and log_softmax over any dim, and their backward ops (which take the forward's output).


def _softmax_dim(d: Drawer, shape: tuple[int, ...]) -> int:
    nd = max(len(shape), 1)
    return d.integer(-nd, nd - 1, label="dim")


def _draw_softmax(d: Drawer) -> Sample:
    dtype = draw_dtype(d)
    if d.large(0.2, label="long_rows"):
        # Long rows, the kernels' last-dim fast path: vector main loop plus scalar tail.
        shape = (d.size(SMALL_SIZES[1:6], label="rows"), d.size(ROW_SIZES, label="n"))
    else:
        shape = draw_shape(d, "shape")
    x = draw_values(d, shape, dtype, "input")
    return Sample([draw_layout(d, x, LAYOUTS, "input"), _softmax_dim(d, shape)], dtype=dtype)


def _draw_softmax_backward(log: bool) -> Callable[[Drawer], Sample]:
    """grad_out drawn freely; output a real (log_)softmax of drawn logits, as autograd passes it
    (an arbitrary 'output' would make exp(output) overflow where no forward could)."""

    def draw(d: Drawer) -> Sample:
        inner = _draw_softmax(d)
        x, dim = inner.args[0].values, inner.args[1]
        y = (ref.log_softmax if log else ref.softmax)(x.double(), dim).to(inner.dtype)
        g = draw_values(d, x.shape, inner.dtype, "grad_out")
        return Sample(
            [draw_layout(d, g, LAYOUTS, "grad_out"), draw_layout(d, y, LAYOUTS, "output"), dim],
            dtype=inner.dtype,
        )

    return draw


def _softmax_sums(sample: Sample, term: Callable) -> torch.Tensor:
    """sum over dim of term(g, y) (float64, keepdim), for the backward tolerances."""
    g, y, dim = sample.args[0].values.double(), sample.args[1].values.double(), sample.args[2]
    if y.dim() == 0:
        return term(g, y)
    return term(g, y).sum(dim, keepdim=True)


# Forward: exp (1 unit) and the float32 sum of up to 4099 terms in 16 lanes: 16 units; plus the
# rounded x - max, which exp turns into a relative error of up to |x - max| / 2 units where the two
# have different exponents (10 units at 1e-9 of the row max, 17 at 1e-15): _softmax_tol adds it
# per element. log_softmax: (x - max) - log(sum): 4.
_SOFTMAX_C = {"softmax": 16, "log_softmax": 4, "softmax_backward": 8, "log_softmax_backward": 8}


def _softmax_tol(log: bool):
    """The table's tolerance plus the rounding of x - max per element, which exp turns into a
    relative error of |x - max| / 2 opmath units (growing for outputs far below the row's
    largest; every softmax computing exp(x - max) in the input's opmath has it, PyTorch's
    included). log_softmax's (x - max) - log(sum) is off by opmath units of 1 + |x - max|, however
    small the result (log(sum) of a sum that rounds to 1 is 0)."""
    op = "log_softmax" if log else "softmax"

    def tol(sample: Sample, index: int) -> Tolerance:
        base = tolerance(sample.dtype, _SOFTMAX_C[op])
        x, dim = sample.args[0].values.double(), sample.args[1]
        if x.dim() == 0 or x.numel() == 0:
            return base
        eps = ROUNDING[sample.dtype][1]
        with torch.no_grad():
            gap = (x - x.amax(dim, keepdim=True)).abs()
            if log:
                extra = (1 + gap) * (_SOFTMAX_C[op] * eps)
            else:
                extra = ref.softmax(x, dim).abs() * gap * (eps / 2)
        return replace(base, floor=torch.nan_to_num(extra, nan=0.0, posinf=0.0))

    return tol


def _softmax_backward_tol(log: bool):
    """Error scale of the backward: each term's magnitude plus the sum's (which the result may
    cancel): softmax y (|g| + sum |g y|), log_softmax |g| + exp(y) sum |g| (1 + |y|, exp's
    condition)."""

    def tol(sample: Sample, index: int) -> Tolerance:
        g, y = sample.args[0].values.double(), sample.args[1].values.double()
        with torch.no_grad():
            if log:
                s = _softmax_sums(sample, lambda g, y: g.abs())
                scale = g.abs() + torch.exp(y) * s * (1 + y.abs())
            else:
                s = _softmax_sums(sample, lambda g, y: (g * y).abs())
                scale = y.abs() * (g.abs() + s)
        op = "log_softmax_backward" if log else "softmax_backward"
        return tolerance(sample.dtype, _SOFTMAX_C[op], scale=scale)

    return tol


def _softmax_edges(op: str) -> Callable[[], list[Sample]]:
    """Empty shapes, rows of -inf (all: NaN as in torch; some: zero probability), +inf, NaN,
    0-dim inputs, a softmax over a middle dim."""

    def edges() -> list[Sample]:
        inf = float("inf")
        rows = torch.tensor(
            [
                [-inf, -inf, -inf, -inf],
                [-inf, 0.0, 1.0, -inf],
                [inf, 0.0, 1.0, 2.0],
                [float("nan"), 0.0, 1.0, 2.0],
                [1e30, -1e30, 0.0, 1e30],
                [100.0, -100.0, 50.0, 0.0],
            ]
        )
        cases = [
            (torch.zeros(0), 0),
            (torch.zeros(4, 0), 1),
            (torch.zeros(0, 4), -1),
            (torch.tensor(3.0), 0),
            (rows, 1),
            (rows, 0),
            (torch.arange(24.0).reshape(2, 3, 4) - 12, 1),
            (torch.full((3, 33), -inf).index_fill(1, torch.tensor([5]), 0.0), 1),
        ]
        out = []
        for x, dim in cases:
            if op in ("softmax", "log_softmax"):
                out.append(Sample([TensorArg(x), dim], dtype=torch.float32))
            else:
                y = (ref.log_softmax if op == "log_softmax_backward" else ref.softmax)(x, dim)
                g = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
                out.append(Sample([TensorArg(g), TensorArg(y), dim], dtype=torch.float32))
        return out

    return edges


def _bad_softmax() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    out: dict[str, list[BadInput]] = {}
    for op in ("softmax", "log_softmax"):
        out[op] = [
            BadInput(
                "integer input",
                lambda: ([torch.ones(4, 8, dtype=torch.int32), 1], {}),
                TypeError,
                rf"metalcore\.{op}: 'input' must be float16, bfloat16, float32 or float64, got Int",
            ),
            BadInput(
                "dim out of range",
                lambda: ([x(4, 8), 2], {}),
                ValueError,
                rf"metalcore\.{op}: 'dim' must be in \[-2, 1\] for the 2-D 'input', got 2",
            ),
            BadInput(
                "negative dim out of range",
                lambda: ([x(4, 8, 3), -4], {}),
                ValueError,
                rf"metalcore\.{op}: 'dim' must be in \[-3, 2\] for the 3-D 'input', got -4",
            ),
        ]
    for op in ("softmax_backward", "log_softmax_backward"):
        out[op] = [
            BadInput(
                "integer output",
                lambda: ([x(4, 8), torch.ones(4, 8, dtype=torch.int64), 1], {}),
                TypeError,
                rf"metalcore\.{op}: 'output' must be float16, bfloat16, float32 or float64, "
                r"got Long",
            ),
            BadInput(
                "grad_out of another shape",
                lambda: ([x(4, 9), x(4, 8), 1], {}),
                ValueError,
                rf"metalcore\.{op}: 'grad_out' must have the same shape as 'output'",
            ),
            BadInput(
                "grad_out of another dtype",
                lambda: ([x(4, 8, dtype=torch.float16), x(4, 8), 1], {}),
                TypeError,
                rf"metalcore\.{op}: 'grad_out' must have the same dtype as 'output'",
            ),
            BadInput(
                "dim out of range",
                lambda: ([x(4, 8), x(4, 8), -3], {}),
                ValueError,
                rf"metalcore\.{op}: 'dim' must be in \[-2, 1\] for the 2-D 'output', got -3",
            ),
        ]
    return out


def _build_softmax() -> dict[str, OpSpec]:
    bad = _bad_softmax()
    # autograd passes the forward's output (o[0]) and dim (a[1]) to the backward op.
    grad = {
        op: Gradient((0,), f"{op}_backward", lambda a, o, g: [g[0], o[0], a[1]], {0: 0})
        for op in ("softmax", "log_softmax")
    }
    specs = [
        OpSpec(
            "softmax",
            _draw_softmax,
            lambda x, dim: (ref.softmax(x.double(), dim),),
            _softmax_tol(log=False),
            bad["softmax"],
            gradient=grad["softmax"],
            edges=_softmax_edges("softmax"),
        ),
        OpSpec(
            "log_softmax",
            _draw_softmax,
            lambda x, dim: (ref.log_softmax(x.double(), dim),),
            _softmax_tol(log=True),
            bad["log_softmax"],
            gradient=grad["log_softmax"],
            edges=_softmax_edges("log_softmax"),
        ),
        OpSpec(
            "softmax_backward",
            _draw_softmax_backward(log=False),
            lambda g, y, dim: (ref.softmax_backward(g.double(), y.double(), dim),),
            _softmax_backward_tol(log=False),
            bad["softmax_backward"],
            edges=_softmax_edges("softmax_backward"),
        ),
        OpSpec(
            "log_softmax_backward",
            _draw_softmax_backward(log=True),
            lambda g, y, dim: (
                ref.log_softmax_backward(g.double(), y.double(), dim, ROUNDING_OPMATH[g.dtype]),
            ),
            _softmax_backward_tol(log=True),
            bad["log_softmax_backward"],
            edges=_softmax_edges("log_softmax_backward"),
        ),
    ]
    return {s.name: s for s in specs}


SPECS.update(_build_softmax())


# --- Cross-entropy family ------------------------------------------------------------------------
# cross_entropy(input [N, C], target [N] int64, ignore_index, reduction, label_smoothing) and its
# backward, against the float64 formula (tests/ops/test_cross_entropy.py also checks
# torch.nn.functional.cross_entropy itself).

_CE_REDUCTIONS = ("mean", "sum", "none")
_CE_SMOOTHING = (0.0, 0.0, 0.1, 0.5, 1.0)
# Specials capped so a row's float32 sum of logits (label smoothing) cannot overflow where the
# float64 reference's does not.
_CE_LARGE = 1e30


def _ce_targets(d: Drawer, n: int, c: int, ignore_index: int, share: float | None) -> torch.Tensor:
    """Class indices in [0, C), a drawn share of them ignore_index. Without special values
    (opcheck, gradcheck: NaN never compares equal) a batch keeps one counted row, so 'mean' is
    not 0 / 0."""
    g = torch.Generator().manual_seed(d.integer(0, 2**31 - 1, label="target.seed"))
    target = torch.randint(0, c, (n,), generator=g, dtype=torch.int64)
    if n and share is not None:
        target[torch.rand(n, generator=g) < share] = ignore_index
    if n and not d.limits.specials and bool((target == ignore_index).all()):
        valid = [k for k in range(min(c, 2)) if k != ignore_index]
        target[0] = valid[0]
    return target


def _draw_ce_common(d: Drawer) -> tuple[torch.dtype, TensorArg, TensorArg, int, str, float]:
    dtype = draw_dtype(d)
    n = d.size(SMALL_SIZES, label="n")
    c = d.size(ROW_SIZES, label="c")
    x = draw_values(d, (n, c), dtype, "input", large=_CE_LARGE)
    ignore_index = d.choice([-100, -1, 0] if c > 1 else [-100, -1], label="ignore_index")
    share = None
    if n and d.boolean(0.4, label="target.ignored"):
        share = d.choice([0.25, 0.5, 1.0], label="target.ignored_share")
    target = _ce_targets(d, n, c, ignore_index, share)
    reduction = d.choice(list(_CE_REDUCTIONS), label="reduction")
    smoothing = d.choice(list(_CE_SMOOTHING), label="label_smoothing")
    x_arg = draw_layout(d, x, LAYOUTS, "input")
    return dtype, x_arg, TensorArg(target), ignore_index, reduction, smoothing


def _draw_cross_entropy(d: Drawer) -> Sample:
    dtype, x, t, ig, red, ls = _draw_ce_common(d)
    return Sample([x, t, ig, red, ls], dtype=dtype)


def _draw_cross_entropy_backward(d: Drawer) -> Sample:
    dtype, x, t, ig, red, ls = _draw_ce_common(d)
    n = x.values.shape[0]
    shape = (n,) if red == "none" else ()
    g = draw_values(d, shape, dtype, "grad_loss", specials=False)
    return Sample([TensorArg(g), x, t, ig, red, ls], dtype=dtype)


def _ce_row_terms(x: torch.Tensor, target: torch.Tensor, ignore_index: int, ls: float):
    """Per-row magnitudes of the loss's terms (float64): log(sum) + |max - x_t| (1 - eps) +
    |max - mean x| eps, 0 for ignored rows."""
    xd = x.double()
    keep = target != ignore_index
    if xd.shape[0] == 0:
        return xd.sum(1), keep
    mx = xd.amax(1)
    safe = torch.where(keep, target, torch.zeros_like(target))
    xt = xd.gather(1, safe.unsqueeze(1)).squeeze(1)
    shifted = torch.where(torch.isfinite(mx).unsqueeze(1), xd - mx.unsqueeze(1), xd)
    log_sum = torch.log(torch.exp(shifted).sum(1))
    terms = 1 + log_sum.abs() + (1 - ls) * (mx - xt).abs() + ls * (mx - xd.mean(1)).abs()
    return torch.where(keep, terms, torch.zeros_like(terms)), keep


# Forward: the row's log(sum of exp) (exp and a float32 sum of up to 4099 terms: 16 units on
# its magnitude), one rounding of max - x_t, and the reduction's float32 sum.
_CE_C = 16


def _ce_tol(sample: Sample, index: int) -> Tolerance:
    x, target, ig, red, ls = (a.values if isinstance(a, TensorArg) else a for a in sample.args)
    terms, keep = _ce_row_terms(x, target, ig, ls)
    if red == "none":
        scale = terms
    else:
        scale = terms.sum() * (1 + math.log2(max(terms.numel(), 1)))
        if red == "mean":
            scale = scale / max(int(keep.sum()), 1)
    return tolerance(sample.dtype, _CE_C, scale=torch.nan_to_num(scale, nan=0.0))


def _ce_backward_tol(sample: Sample, index: int) -> Tolerance:
    """|scale_i| (p (1 + |x - max|) + (1 - eps) onehot + eps / C): exp's condition on each
    probability, the target's cancellation p_t - 1, and the uniform term."""
    g, x, target, ig, red, ls = (a.values if isinstance(a, TensorArg) else a for a in sample.args)
    xd = x.double()
    n, c = xd.shape
    if n == 0:
        return tolerance(sample.dtype, _CE_C)
    keep = target != ig
    scale = g.double().abs().expand(n)
    if red == "mean":
        scale = scale / max(int(keep.sum()), 1)
    p = ref.softmax(xd, 1)
    dist = (xd - xd.amax(1, keepdim=True)).abs()
    cond = torch.where(p > 0, p * (1 + dist), torch.zeros_like(p))
    safe = torch.where(keep, target, torch.zeros_like(target))
    onehot = torch.nn.functional.one_hot(safe, c).double()
    terms = cond + (1 - ls) * onehot + ls / c
    # Products of a tiny probability and a small scale fall below the opmath's normal range,
    # where they keep only its subnormal step.
    floor = torch.tensor(4 * torch.finfo(ROUNDING_OPMATH[sample.dtype]).tiny)
    return tolerance(
        sample.dtype, _CE_C, scale=torch.nan_to_num(scale.unsqueeze(1) * terms), floor=floor
    )


def _ce_edges(op: str) -> Callable[[], list[Sample]]:
    """All-ignored batches (mean: NaN), empty batches, -inf (masked) logits, a +inf logit, one
    class, every reduction."""

    def edges() -> list[Sample]:
        inf = float("inf")
        x = torch.tensor(
            [
                [1.0, 2.0, 3.0, -inf],
                [-inf, 0.0, -inf, 5.0],
                [100.0, -100.0, 0.0, 50.0],
                [0.5, 0.5, 0.5, 0.5],
            ]
        )
        cases = [
            (x, torch.tensor([0, 1, 2, 3]), -100),
            (x, torch.tensor([-100, -100, -100, -100]), -100),
            (x, torch.tensor([2, -1, 3, -1]), -1),
            (torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), -100),
            (torch.tensor([[3.0], [-2.0]]), torch.tensor([0, 0]), -100),
            (torch.tensor([[inf, 0.0, 1.0]]), torch.tensor([1]), -100),
        ]
        out = []
        for xv, t, ig in cases:
            for red in _CE_REDUCTIONS:
                for ls in (0.0, 0.2):
                    if op == "cross_entropy":
                        args = [TensorArg(xv), TensorArg(t), ig, red, ls]
                    else:
                        g = torch.full((xv.shape[0],) if red == "none" else (), 0.5)
                        args = [TensorArg(g), TensorArg(xv), TensorArg(t), ig, red, ls]
                    out.append(Sample(args, dtype=torch.float32))
        return out

    return edges


def _bad_cross_entropy() -> dict[str, list[BadInput]]:
    """Out-of-range target values are a data check the fakes cannot make (meta tensors have no
    values): tests/ops/test_cross_entropy.py checks them on every device."""
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    t = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    out: dict[str, list[BadInput]] = {}
    for op in ("cross_entropy", "cross_entropy_backward"):
        # The backward op takes grad_loss first; the rest of its arguments are the forward's.
        pre = (lambda: [x(())]) if op == "cross_entropy_backward" else (lambda: [])
        out[op] = [
            BadInput(
                "integer input",
                lambda pre=pre: ([*pre(), torch.ones(2, 3, dtype=torch.int32), t(0, 1)], {}),
                TypeError,
                rf"metalcore\.{op}: 'input' must be float16, bfloat16, float32 or float64, got Int",
            ),
            BadInput(
                "3-D input",
                lambda pre=pre: ([*pre(), x(2, 3, 4), t(0, 1)], {}),
                ValueError,
                rf"metalcore\.{op}: 'input' must be 2-D \[N, C\], got shape \[2, 3, 4\]",
            ),
            BadInput(
                "no classes",
                lambda pre=pre: ([*pre(), x(2, 0), t(0, 1)], {}),
                ValueError,
                rf"metalcore\.{op}: 'input' must have at least one class",
            ),
            BadInput(
                "int32 target",
                lambda pre=pre: ([*pre(), x(2, 3), t(0, 1).int()], {}),
                TypeError,
                rf"metalcore\.{op}: 'target' must be int64 \(Long\) class indices, got Int",
            ),
            BadInput(
                "float target",
                lambda pre=pre: ([*pre(), x(2, 3), x(2)], {}),
                TypeError,
                rf"metalcore\.{op}: 'target' must be int64 \(Long\) class indices, got Float",
            ),
            BadInput(
                "target of another length",
                lambda pre=pre: ([*pre(), x(2, 3), t(0, 1, 2)], {}),
                ValueError,
                rf"metalcore\.{op}: 'target' must have shape \[2\] \(the N of 'input'\), got "
                r"\[3\]",
            ),
            BadInput(
                "unknown reduction",
                lambda pre=pre: ([*pre(), x(2, 3), t(0, 1), -100, "avg"], {}),
                ValueError,
                rf"metalcore\.{op}: 'reduction' must be 'none', 'sum' or 'mean', got 'avg'",
            ),
            BadInput(
                "label_smoothing above 1",
                lambda pre=pre: ([*pre(), x(2, 3), t(0, 1), -100, "mean", 1.5], {}),
                ValueError,
                rf"metalcore\.{op}: 'label_smoothing' must be in \[0, 1\], got 1.5",
            ),
        ]
    out["cross_entropy_backward"] += [
        BadInput(
            "grad_loss of another dtype",
            lambda: ([x((), dtype=torch.float64), x(2, 3), t(0, 1)], {}),
            TypeError,
            r"metalcore\.cross_entropy_backward: 'grad_loss' must have the same dtype as 'input'",
        ),
        BadInput(
            "grad_loss not 0-dim for mean",
            lambda: ([x(2), x(2, 3), t(0, 1)], {}),
            ValueError,
            r"metalcore\.cross_entropy_backward: 'grad_loss' must be 0-dim \(the loss of "
            r"reduction 'mean'\), got shape \[2\]",
        ),
        BadInput(
            "grad_loss of the wrong length for none",
            lambda: ([x(3), x(2, 3), t(0, 1), -100, "none"], {}),
            ValueError,
            r"metalcore\.cross_entropy_backward: 'grad_loss' must have shape \[2\] \(the loss "
            r"of reduction 'none'\), got \[3\]",
        ),
    ]
    return out


def _build_cross_entropy() -> dict[str, OpSpec]:
    bad = _bad_cross_entropy()
    specs = [
        OpSpec(
            "cross_entropy",
            _draw_cross_entropy,
            lambda x, t, ig, red, ls: (ref.cross_entropy(x.double(), t, ig, red, ls),),
            _ce_tol,
            bad["cross_entropy"],
            gradient=Gradient(
                (0,), "cross_entropy_backward", lambda a, o, g: [g[0], *a[:5]], {0: 0}
            ),
            edges=_ce_edges("cross_entropy"),
        ),
        OpSpec(
            "cross_entropy_backward",
            _draw_cross_entropy_backward,
            lambda g, x, t, ig, red, ls: (
                ref.cross_entropy_backward(g.double(), x.double(), t, ig, red, ls),
            ),
            _ce_backward_tol,
            bad["cross_entropy_backward"],
            edges=_ce_edges("cross_entropy_backward"),
        ),
    ]
    return {s.name: s for s in specs}


SPECS.update(_build_cross_entropy())


# --- Fused linear + cross-entropy ----------------------------------------------------------------
# fused_linear_cross_entropy(input [N, H], weight [V, H], target [N], bias [V] | None, ...) and its
# backward, against the float64 formula with the logits materialized.


# Magnitudes of hidden states and weights whose logits (sums of up to 33 products) stay finite
# in float16; the cross-entropy's own range is its spec's.
_FLCE_SCALES = (1.0, 0.1, 3.0, 1e-3)


def _flce_values(d: Drawer, shape, dtype: torch.dtype, label: str) -> torch.Tensor:
    seed = d.integer(0, 2**31 - 1, label=f"{label}.seed")
    scale = d.choice(list(_FLCE_SCALES), label=f"{label}.scale")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype)


def _draw_flce_common(d: Drawer):
    dtype = draw_dtype(d)
    if d.large(0.1, label="large"):
        # Thread-count and leak tests want bigger samples: ~140K elements, several CPU tasks.
        n = d.size((64, 128), label="n")
        h = d.size((64,), label="h")
        v = d.size((1024, 2048), label="v")
    else:
        n = d.size(SMALL_SIZES, label="n")
        h = d.size((1, 2, 3, 8, 16, 17, 33), label="h")
        v = d.size((1, 2, 5, 16, 33, 127, 257), label="v")
    x = _flce_values(d, (n, h), dtype, "input")
    w = _flce_values(d, (v, h), dtype, "weight")
    bias = None
    if d.boolean(label="has_bias"):
        bias = TensorArg(_flce_values(d, (v,), dtype, "bias"))
    ignore_index = d.choice([-100, 0] if v > 1 else [-100], label="ignore_index")
    share = 0.5 if n and d.boolean(0.3, label="target.ignored") else None
    target = _ce_targets(d, n, v, ignore_index, share)
    reduction = d.choice(list(_CE_REDUCTIONS), label="reduction")
    smoothing = d.choice([0.0, 0.1], label="label_smoothing")
    args = [
        draw_layout(d, x, LAYOUTS, "input"),
        draw_layout(d, w, LAYOUTS, "weight"),
        TensorArg(target),
        bias,
        ignore_index,
        reduction,
        smoothing,
    ]
    return dtype, args


def _draw_flce(d: Drawer) -> Sample:
    dtype, args = _draw_flce_common(d)
    return Sample(args, dtype=dtype)


def _draw_flce_backward(d: Drawer) -> Sample:
    dtype, args = _draw_flce_common(d)
    n = args[0].values.shape[0]
    shape = (n,) if args[5] == "none" else ()
    g = draw_values(d, shape, dtype, "grad_loss", specials=False)
    return Sample([TensorArg(g), *args], dtype=dtype)


def _flce_abs_logits(x, w, b) -> torch.Tensor:
    """|x| @ |w|^T + |b| in float64: the magnitude the logits' rounding and the matmul's
    accumulation errors scale with."""
    z = x.double().abs() @ w.double().abs().T
    return z + b.double().abs() if b is not None else z


# The logits are rounded to the input dtype (as F.linear's are) before the float32
# cross-entropy: an error of eps(dtype) |z| per logit, plus the matmul's H-term accumulation
# (float32 units, up to 33 terms); the loss and its gradient carry it with weights p.
_FLCE_C = 64


def _flce_tol(sample: Sample, index: int) -> Tolerance:
    x, w, t, b, ig, red, ls = (a.values if isinstance(a, TensorArg) else a for a in sample.args)
    z = _flce_abs_logits(x, w, b)
    keep = t != ig
    terms = 1 + (z.amax(1) if z.shape[1] else z.sum(1)) * 2
    terms = torch.where(keep, terms, torch.zeros_like(terms))
    if red == "none":
        scale = terms
    else:
        scale = terms.sum()
        if red == "mean":
            scale = scale / max(int(keep.sum()), 1)
    return tolerance(sample.dtype, _FLCE_C, scale=scale)


def _flce_backward_tol(sample: Sample, index: int) -> Tolerance:
    g, x, w, t, b, ig, red, ls = (a.values if isinstance(a, TensorArg) else a for a in sample.args)
    n = x.shape[0]
    keep = t != ig
    scale = g.double().abs().expand(n)
    if red == "mean":
        scale = scale / max(int(keep.sum()), 1)
    z = _flce_abs_logits(x, w, b)
    zd = x.double() @ w.double().T + (b.double() if b is not None else 0)
    p = ref.softmax(zd, 1) if n else zd
    gabs = (p * (1 + 2 * z) + 1 + ls).mul(
        torch.where(keep, scale, torch.zeros_like(scale))[:, None]
    )
    if index == 0:
        s = gabs @ w.double().abs()
    elif index == 1:
        s = gabs.T @ x.double().abs()
    else:
        s = gabs.sum(0) if b is not None else torch.zeros(0, dtype=torch.float64)
    return tolerance(sample.dtype, _FLCE_C, scale=s)


def _flce_edges(op: str) -> Callable[[], list[Sample]]:
    """Empty batches, all-ignored batches, and a batch bigger than one chunk is left to the
    family's test file (its size would slow every device's edge run)."""

    def edges() -> list[Sample]:
        x = torch.tensor([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0]])
        w = torch.tensor([[0.5, 1.0], [-1.0, 2.0], [0.0, 0.1], [2.0, -0.5]])
        b = torch.tensor([0.1, -0.2, 0.3, 0.0])
        cases = [
            (x, torch.tensor([0, 3, 1]), b),
            (x, torch.tensor([-100, -100, -100]), None),
            (torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), b),
        ]
        out = []
        for xv, t, bv in cases:
            for red in _CE_REDUCTIONS:
                bias = TensorArg(bv) if bv is not None else None
                args = [TensorArg(xv), TensorArg(w), TensorArg(t), bias, -100, red, 0.1]
                if op == "fused_linear_cross_entropy_backward":
                    g = torch.full((xv.shape[0],) if red == "none" else (), 0.5)
                    args = [TensorArg(g), *args]
                out.append(Sample(args, dtype=torch.float32))
        return out

    return edges


def _bad_flce() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    t = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    out: dict[str, list[BadInput]] = {}
    for op in ("fused_linear_cross_entropy", "fused_linear_cross_entropy_backward"):
        pre = (lambda: [x(())]) if op.endswith("_backward") else (lambda: [])
        out[op] = [
            BadInput(
                "integer input",
                lambda pre=pre: (
                    [*pre(), torch.ones(2, 3, dtype=torch.int32), x(4, 3), t(0, 1)],
                    {},
                ),
                TypeError,
                rf"metalcore\.{op}: 'input' must be float16, bfloat16, float32 or float64, got Int",
            ),
            BadInput(
                "3-D input",
                lambda pre=pre: ([*pre(), x(2, 2, 3), x(4, 3), t(0, 1)], {}),
                ValueError,
                rf"metalcore\.{op}: 'input' must be 2-D \[N, H\], got shape \[2, 2, 3\]",
            ),
            BadInput(
                "weight of another hidden size",
                lambda pre=pre: ([*pre(), x(2, 3), x(4, 5), t(0, 1)], {}),
                ValueError,
                rf"metalcore\.{op}: 'weight' must have shape \[V, 3\] with V >= 1",
            ),
            BadInput(
                "weight of another dtype",
                lambda pre=pre: ([*pre(), x(2, 3), x(4, 3, dtype=torch.float64), t(0, 1)], {}),
                TypeError,
                rf"metalcore\.{op}: 'weight' must have the same dtype as 'input'",
            ),
            BadInput(
                "int32 target",
                lambda pre=pre: ([*pre(), x(2, 3), x(4, 3), t(0, 1).int()], {}),
                TypeError,
                rf"metalcore\.{op}: 'target' must be int64 \(Long\) class indices, got Int",
            ),
            BadInput(
                "target of another length",
                lambda pre=pre: ([*pre(), x(2, 3), x(4, 3), t(0)], {}),
                ValueError,
                rf"metalcore\.{op}: 'target' must have shape \[2\] \(the N of 'input'\)",
            ),
            BadInput(
                "bias of another vocabulary",
                lambda pre=pre: ([*pre(), x(2, 3), x(4, 3), t(0, 1), x(5)], {}),
                ValueError,
                rf"metalcore\.{op}: 'bias' must have shape \[4\] \(the V of 'weight'\)",
            ),
            BadInput(
                "unknown reduction",
                lambda pre=pre: ([*pre(), x(2, 3), x(4, 3), t(0, 1), None, -100, "avg"], {}),
                ValueError,
                rf"metalcore\.{op}: 'reduction' must be 'none', 'sum' or 'mean', got 'avg'",
            ),
        ]
    return out


def _build_flce() -> dict[str, OpSpec]:
    bad = _bad_flce()
    specs = [
        OpSpec(
            "fused_linear_cross_entropy",
            _draw_flce,
            lambda *a: (ref.fused_linear_cross_entropy(*a),),
            _flce_tol,
            bad["fused_linear_cross_entropy"],
            gradient=Gradient(
                (0, 1, 3),
                "fused_linear_cross_entropy_backward",
                lambda a, o, g: [g[0], *a[:7]],
                {0: 0, 1: 1, 3: 2},
            ),
            edges=_flce_edges("fused_linear_cross_entropy"),
        ),
        OpSpec(
            "fused_linear_cross_entropy_backward",
            _draw_flce_backward,
            ref.fused_linear_cross_entropy_backward,
            _flce_backward_tol,
            bad["fused_linear_cross_entropy_backward"],
            edges=_flce_edges("fused_linear_cross_entropy_backward"),
        ),
    ]
    return {s.name: s for s in specs}


SPECS.update(_build_flce())


# --- embedding_bag -------------------------------------------------------------------------------
# embedding_bag(weight [V, D], indices [N], offsets, mode, per_sample_weights, include_last_offset,
# padding_idx) and its backward, against torch.nn.functional.embedding_bag in float64 (and its
# autograd for the backward). Value checks on indices and offsets (range, order) read the data,
# which fakes cannot: tests/ops/test_embedding_bag.py checks them.

_EB_MODES = ("sum", "mean", "max")
_EB_TABLE = (1, 2, 3, 5, 8, 17, 33)
# Each output is a sum of at most ~20 rows (the drawn bag lengths), in opmath.
_EB_C = 16


def _eb_bags(d: Drawer, n_bags: int, max_len: int, include_last_offset: bool):
    """Bag lengths (a drawn share empty) and the offsets (with include_last_offset, B + 1 of them,
    the last the number of indices)."""
    g = torch.Generator().manual_seed(d.integer(0, 2**31 - 1, label="bags.seed"))
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=g)
    if n_bags and d.boolean(0.3, label="bags.empty"):
        lengths[torch.rand(n_bags, generator=g) < 0.4] = 0
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    if include_last_offset:
        offsets = torch.cat([starts, torch.tensor([total])])
    else:
        offsets = starts
    return offsets, total


def _draw_eb_common(d: Drawer):
    dtype = draw_dtype(d)
    if d.large(0.1, label="large"):
        v = d.size([1000], label="num_embeddings")
        dim = d.size([257, 1024], label="embedding_dim")
        n_bags = d.size([65], label="bags")
        max_len = 20
    else:
        v = d.size(_EB_TABLE, label="num_embeddings")
        dim = d.size(SMALL_SIZES + (64, 127), label="embedding_dim")
        n_bags = d.size(SMALL_SIZES[:12], label="bags")
        max_len = d.choice([1, 3, 8], label="max_len")
    mode = d.choice(list(_EB_MODES), label="mode")
    last = d.boolean(0.3, label="include_last_offset")
    offsets, n = _eb_bags(d, n_bags, max_len, last)
    g = torch.Generator().manual_seed(d.integer(0, 2**31 - 1, label="indices.seed"))
    indices = torch.randint(0, v, (n,), generator=g)
    index_dtype = d.choice([torch.int64, torch.int32], label="index_dtype")
    padding = None
    if d.boolean(0.3, label="has_padding"):
        padding = d.choice([0, v - 1, -1], label="padding_idx")
    w = draw_values(d, (v, dim), dtype, "weight")
    if mode == "max" and d.limits.specials and d.boolean(0.3, label="weight.ties"):
        # Few distinct values: equal maxima from different rows, where the first must win.
        w = (w.double().sign() * (w.double().abs() > 0.5)).to(dtype)
    psw = None
    if mode == "sum" and d.boolean(0.5, label="has_psw"):
        psw = TensorArg(draw_values(d, (n,), dtype, "per_sample_weights"))
    return (
        dtype,
        draw_layout(d, w, READ_LAYOUTS, "weight"),
        TensorArg(indices.to(index_dtype)),
        TensorArg(offsets.to(index_dtype)),
        mode,
        psw,
        last,
        padding,
    )


def _draw_embedding_bag(d: Drawer) -> Sample:
    dtype, w, idx, off, mode, psw, last, pad = _draw_eb_common(d)
    return Sample([w, idx, off, mode, psw, last, pad], dtype=dtype)


def _eb_n_bags(off: TensorArg, last: bool) -> int:
    return off.values.shape[0] - (1 if last else 0)


def _draw_embedding_bag_backward(d: Drawer) -> Sample:
    dtype, w, idx, off, mode, psw, last, pad = _draw_eb_common(d)
    shape = (_eb_n_bags(off, last), w.values.shape[1])
    g = draw_layout(d, draw_values(d, shape, dtype, "grad_out"), LAYOUTS, "grad_out")
    return Sample([g, w, idx, off, mode, psw, last, pad], dtype=dtype)


def _eb_abs(t):
    return None if t is None else t.double().abs()


def _eb_tol(sample: Sample, index: int) -> Tolerance:
    """Scale: the same bag sums over |weight| and |per_sample_weights| (max: exact)."""
    w, idx, off, mode, psw, last, pad = (
        a.values if isinstance(a, TensorArg) else a for a in sample.args
    )
    terms = ref.embedding_bag(
        _eb_abs(w), idx, off, "sum" if mode == "max" else mode, _eb_abs(psw), last, pad
    )
    return tolerance(sample.dtype, _EB_C, scale=torch.nan_to_num(terms, nan=0.0, posinf=0.0))


def _eb_backward_tol(sample: Sample, index: int) -> Tolerance:
    """Scale: the backward of |grad_out| through |weight| and |per_sample_weights| ('max'
    bounded by 'sum': every occurrence of a row)."""
    g, w, idx, off, mode, psw, last, pad = (
        a.values if isinstance(a, TensorArg) else a for a in sample.args
    )
    terms = ref.embedding_bag_backward(
        _eb_abs(g), _eb_abs(w), idx, off, "sum" if mode == "max" else mode, _eb_abs(psw), last, pad
    )[index]
    return tolerance(sample.dtype, _EB_C, scale=torch.nan_to_num(terms, nan=0.0, posinf=0.0))


def _eb_edges(op: str) -> Callable[[], list[Sample]]:
    """Empty bags, a bag of only padding, equal maxima from different rows (the first wins, and
    takes the gradient), include_last_offset, no indices, no bags, D = 0."""

    def edges() -> list[Sample]:
        w = torch.tensor([[1.0, 5.0, -2.0], [1.0, 5.0, 3.0], [0.0, 1.0, 3.0], [-1.0, 0.0, 0.0]])
        t = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        cases = [
            (w, t(0, 1, 0, 2), t(0, 0, 2), False, None),
            (w, t(2, 2, 1, 3), t(0, 2), False, 2),
            (w, t(1, 0, 3, 2, 1), t(0, 2, 3, 5), True, None),
            (w, t(), t(0, 0), False, None),
            (w, t(), t(0), True, None),
            (torch.zeros(4, 0), t(0, 1), t(0, 1), False, None),
        ]
        out = []
        for wv, idx, off, last, pad in cases:
            for mode in _EB_MODES:
                psws = [None] + (
                    [TensorArg(torch.linspace(-1, 2, idx.numel()))] if mode == "sum" else []
                )
                for psw in psws:
                    args = [TensorArg(wv), TensorArg(idx), TensorArg(off), mode, psw, last, pad]
                    if op == "embedding_bag_backward":
                        bags = off.numel() - (1 if last else 0)
                        g = torch.arange(bags * wv.shape[1], dtype=torch.float32)
                        args = [TensorArg(g.reshape(bags, wv.shape[1]) - 2.5)] + args
                    out.append(Sample(args, dtype=torch.float32))
        return out

    return edges


def _bad_embedding_bag() -> dict[str, list[BadInput]]:
    w = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    t = lambda *v, dtype=torch.int64: torch.tensor(v, dtype=dtype)  # noqa: E731
    out: dict[str, list[BadInput]] = {}
    for op in ("embedding_bag", "embedding_bag_backward"):
        # The backward op takes grad_out [B, D] first; the rest are the forward's arguments.
        pre = (lambda: [w(2, 3)]) if op == "embedding_bag_backward" else (lambda: [])
        out[op] = [
            BadInput(
                "integer weight",
                lambda pre=pre: (
                    [*pre(), torch.ones(4, 3, dtype=torch.int32), t(0, 1), t(0, 1)],
                    {},
                ),
                TypeError,
                rf"metalcore\.{op}: 'weight' must be float16, bfloat16, float32 or float64, "
                r"got Int",
            ),
            BadInput(
                "1-D weight",
                lambda pre=pre: ([*pre(), w(4), t(0, 1), t(0, 1)], {}),
                ValueError,
                rf"metalcore\.{op}: 'weight' must be 2-D \[num_embeddings, embedding_dim\], got "
                r"shape \[4\]",
            ),
            BadInput(
                "float input",
                lambda pre=pre: ([*pre(), w(4, 3), w(2), t(0, 1)], {}),
                TypeError,
                rf"metalcore\.{op}: 'input' must be int64 or int32, got Float",
            ),
            BadInput(
                "2-D input",
                lambda pre=pre: (
                    [*pre(), w(4, 3), torch.zeros(2, 2, dtype=torch.int64), t(0, 1)],
                    {},
                ),
                ValueError,
                rf"metalcore\.{op}: 'input' must be 1-D, got shape \[2, 2\]",
            ),
            BadInput(
                "offsets of another integer dtype",
                lambda pre=pre: ([*pre(), w(4, 3), t(0, 1), t(0, 1, dtype=torch.int32)], {}),
                TypeError,
                rf"metalcore\.{op}: 'offsets' must have the same dtype as 'input' \(Long\), "
                r"got Int",
            ),
            BadInput(
                "unknown mode",
                lambda pre=pre: ([*pre(), w(4, 3), t(0, 1), t(0, 1), "min"], {}),
                ValueError,
                rf"metalcore\.{op}: 'mode' must be 'sum', 'mean' or 'max', got 'min'",
            ),
            BadInput(
                "per_sample_weights with mode 'mean'",
                lambda pre=pre: ([*pre(), w(4, 3), t(0, 1), t(0, 1), "mean", w(2)], {}),
                ValueError,
                rf"metalcore\.{op}: 'per_sample_weights' is only supported with mode 'sum'",
            ),
            BadInput(
                "per_sample_weights of another length",
                lambda pre=pre: ([*pre(), w(4, 3), t(0, 1), t(0, 1), "sum", w(3)], {}),
                ValueError,
                rf"metalcore\.{op}: 'per_sample_weights' must have the same shape as 'input'",
            ),
            BadInput(
                "per_sample_weights of another dtype",
                lambda pre=pre: (
                    [*pre(), w(4, 3), t(0, 1), t(0, 1), "sum", w(2, dtype=torch.float64)],
                    {},
                ),
                TypeError,
                rf"metalcore\.{op}: 'per_sample_weights' must have the same dtype as 'weight'",
            ),
            BadInput(
                "padding_idx out of range",
                lambda pre=pre: ([*pre(), w(4, 3), t(0, 1), t(0, 1), "sum", None, False, 4], {}),
                ValueError,
                rf"metalcore\.{op}: 'padding_idx' must be in \[-4, 4\) \(the rows of 'weight'\), "
                r"got 4",
            ),
            BadInput(
                "include_last_offset with no offsets",
                lambda pre=pre: ([*pre(), w(4, 3), t(0, 1), t(), "sum", None, True], {}),
                ValueError,
                rf"metalcore\.{op}: 'offsets' must have at least one element with "
                r"include_last_offset=True",
            ),
        ]
    out["embedding_bag_backward"] += [
        BadInput(
            "grad_out of another dtype",
            lambda: ([w(2, 3, dtype=torch.float64), w(4, 3), t(0, 1), t(0, 1)], {}),
            TypeError,
            r"metalcore\.embedding_bag_backward: 'grad_out' must have the same dtype as 'weight'",
        ),
        BadInput(
            "grad_out of the wrong shape",
            lambda: ([w(3, 3), w(4, 3), t(0, 1), t(0, 1)], {}),
            ValueError,
            r"metalcore\.embedding_bag_backward: 'grad_out' must have shape \[2, 3\] "
            r"\(bags x embedding_dim\), got \[3, 3\]",
        ),
    ]
    return out


def _ref_embedding_bag(weight, indices, offsets, mode, *rest):
    """F.embedding_bag in float64, except where a bag's sum leaves the opmath range: the kernel
    (as torch's own float32 kernel) sums in opmath before a mean divides, so that sum is +-inf
    there (8 rows of 1.7e38 average to inf in torch too)."""
    out = ref.embedding_bag(weight, indices, offsets, mode, *rest)
    if mode == "mean" and weight.dtype != torch.float64:
        total = ref.embedding_bag(weight, indices, offsets, "sum", *rest)
        big = torch.finfo(ROUNDING_OPMATH[weight.dtype]).max
        out = torch.where(total.abs() > big, total.sign() * math.inf, out)
    return (out,)


def _build_embedding_bag() -> dict[str, OpSpec]:
    bad = _bad_embedding_bag()
    specs = [
        OpSpec(
            "embedding_bag",
            _draw_embedding_bag,
            _ref_embedding_bag,
            _eb_tol,
            bad["embedding_bag"],
            gradient=Gradient(
                (0, 4), "embedding_bag_backward", lambda a, o, g: [g[0], *a[:7]], {0: 0, 4: 1}
            ),
            edges=_eb_edges("embedding_bag"),
        ),
        OpSpec(
            "embedding_bag_backward",
            _draw_embedding_bag_backward,
            lambda *a: ref.embedding_bag_backward(*a),
            _eb_backward_tol,
            bad["embedding_bag_backward"],
            edges=_eb_edges("embedding_bag_backward"),
        ),
    ]
    return {s.name: s for s in specs}


SPECS.update(_build_embedding_bag())


# --- LoRA linear ---------------------------------------------------------------------------------
# lora_linear(input [..., in], weight [out, in], lora_a [r, in], lora_b [out, r], scaling, bias)
# and its backward, against the float64 formula (tests/ops/test_lora.py also checks PEFT's
# formulation through torch.nn.Linear modules).

_LORA_FEATURES = (1, 2, 3, 5, 8, 16, 17, 33, 64)
_LORA_RANKS = (0, 1, 2, 4, 8)
_LORA_SCALINGS = (1.0, 0.5, 2.0, 0.0, -1.5)
# Specials capped so that float32 products cannot overflow where float64's do not.
_LORA_LARGE = 1e4
# Sums of up to ~100 products accumulated by BLAS in opmath (blocked, so the error grows slower
# than the term count): 32 units of the terms' absolute sum.
_LORA_C = 32


def _draw_lora_common(d: Drawer):
    dtype = draw_dtype(d)
    if d.large(0.1, label="large"):
        # Hundreds of tokens: BLAS splits the products across threads.
        lead = (d.size([257, 513], label="tokens"),)
        k = d.size([128], label="in_features")
        n = d.size([129], label="out_features")
        r = d.size([16], label="rank")
    else:
        nd = d.integer(0, 2, label="lead_ndim")
        lead = tuple(d.size(SMALL_SIZES[:10], label=f"lead{i}") for i in range(nd))
        k = d.size(_LORA_FEATURES, label="in_features")
        n = d.size(_LORA_FEATURES, label="out_features")
        r = d.size(_LORA_RANKS, label="rank")

    def arg(shape, label, layouts=READ_LAYOUTS):
        values = draw_values(d, shape, dtype, label, large=_LORA_LARGE)
        if dtype == torch.float16:
            # float16's range ends at 65504: sums of hundreds of products of drawn magnitudes
            # land next to it, where the intermediates' rounding to float16 overflows one step
            # before the float64 reference does. Values within +-2 keep every product far below.
            values = values.clamp(-2.0, 2.0)
        return draw_layout(d, values, layouts, label)

    x = arg((*lead, k), "input", LAYOUTS)
    w = arg((n, k), "weight")
    a = arg((r, k), "lora_a")
    b = arg((n, r), "lora_b")
    scaling = d.choice(list(_LORA_SCALINGS), label="scaling")
    bias = arg((n,), "bias") if d.boolean(0.5, label="has_bias") else None
    return dtype, lead, n, x, w, a, b, scaling, bias


def _draw_lora_linear(d: Drawer) -> Sample:
    dtype, _, _, x, w, a, b, s, bias = _draw_lora_common(d)
    return Sample([x, w, a, b, s, bias], dtype=dtype)


def _draw_lora_linear_backward(d: Drawer) -> Sample:
    dtype, lead, n, x, w, a, b, s, bias = _draw_lora_common(d)
    g_values = draw_values(d, (*lead, n), dtype, "grad_out", large=_LORA_LARGE)
    if dtype == torch.float16:
        g_values = g_values.clamp(-2.0, 2.0)  # as the other arguments (see arg above)
    g = draw_layout(d, g_values, LAYOUTS, "grad_out")
    weight_grad = d.boolean(0.5, label="weight_grad")
    return Sample([g, x, w, a, b, s, bias, weight_grad], dtype=dtype)


def _lora_abs(args):
    return [
        a.values.double().abs()
        if isinstance(a, TensorArg)
        else (abs(a) if isinstance(a, float) else a)
        for a in args
    ]


def _lora_scale(sample: Sample, terms: torch.Tensor) -> torch.Tensor:
    # 16-bit inputs: the base product, the [.., r] activations and the sum each round to the
    # dtype (as PEFT's own module does, with one rounding more), three roundings where the table
    # allows one.
    factor = 3.0 if sample.dtype in (torch.float16, torch.bfloat16) else 1.0
    return torch.nan_to_num(terms * factor, nan=0.0, posinf=0.0)


def _lora_floor(sample: Sample) -> torch.Tensor:
    """The [.., r] intermediates (x @ A^T, g @ B) of tiny inputs fall below the normal range,
    where they keep only the subnormal step; the next product multiplies that step by up to
    (largest |argument|) x |scaling| x (the summed dims)."""
    tensors = [a.values.double().abs() for a in sample.args if isinstance(a, TensorArg)]
    finite = [t[torch.isfinite(t)] for t in tensors]
    big = max([float(t.max()) for t in finite if t.numel()] + [1.0])
    dims = sum(t.shape[-1] for t in tensors if t.dim() == 2)
    scaling = max([abs(a) for a in sample.args if isinstance(a, float)] + [1.0])
    # The intermediates are stored in the input dtype (float16 for float16 inputs): its
    # subnormal step.
    fi = torch.finfo(sample.dtype)
    return torch.tensor(4 * fi.tiny * fi.eps * big * scaling * (1 + dims))


def _lora_tol(sample: Sample, index: int) -> Tolerance:
    """Scale: the same products over absolute values (each element's sum of |terms|)."""
    terms = ref.lora_linear(*_lora_abs(sample.args))
    return tolerance(
        sample.dtype, _LORA_C, scale=_lora_scale(sample, terms), floor=_lora_floor(sample)
    )


def _lora_backward_tol(sample: Sample, index: int) -> Tolerance:
    terms = ref.lora_linear_backward(*_lora_abs(sample.args))[index]
    return tolerance(
        sample.dtype, _LORA_C, scale=_lora_scale(sample, terms), floor=_lora_floor(sample)
    )


def _lora_edges(op: str) -> Callable[[], list[Sample]]:
    """Rank 0, no tokens, scaling 0, no input features, a 1-D input."""

    def edges() -> list[Sample]:
        cases = [
            ((3,), 4, 5, 0, 1.0),
            ((0,), 4, 5, 2, 1.0),
            ((2, 3), 4, 5, 2, 0.0),
            ((3,), 0, 5, 2, 2.0),
            ((), 4, 5, 2, 0.5),
        ]
        out = []
        for lead, k, n, r, s in cases:
            for with_bias in (False, True):
                args = [
                    TensorArg(_seeded((*lead, k), seed=1)),
                    TensorArg(_seeded((n, k), seed=2)),
                    TensorArg(_seeded((r, k), seed=3)),
                    TensorArg(_seeded((n, r), seed=4)),
                    s,
                    TensorArg(_seeded((n,), seed=5)) if with_bias else None,
                ]
                if op == "lora_linear_backward":
                    args = [TensorArg(_seeded((*lead, n), seed=6)), *args, True]
                out.append(Sample(args, dtype=torch.float32))
        return out

    return edges


def _bad_lora() -> dict[str, list[BadInput]]:
    x = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    out: dict[str, list[BadInput]] = {}
    for op in ("lora_linear", "lora_linear_backward"):
        # The backward op takes grad_out [..., out] first; the rest are the forward's arguments.
        pre = (lambda: [x(2, 5)]) if op == "lora_linear_backward" else (lambda: [])
        out[op] = [
            BadInput(
                "integer input",
                lambda pre=pre: (
                    [*pre(), torch.ones(2, 4, dtype=torch.int32), x(5, 4), x(3, 4), x(5, 3), 1.0],
                    {},
                ),
                TypeError,
                rf"metalcore\.{op}: 'input' must be float16, bfloat16, float32 or float64, "
                r"got Int",
            ),
            BadInput(
                "0-dim input",
                lambda pre=pre: ([*pre(), x(()), x(5, 4), x(3, 4), x(5, 3), 1.0], {}),
                ValueError,
                rf"metalcore\.{op}: 'input' must have at least 1 dimension\(s\)",
            ),
            BadInput(
                "weight of another in_features",
                lambda pre=pre: ([*pre(), x(2, 4), x(5, 6), x(3, 4), x(5, 3), 1.0], {}),
                ValueError,
                rf"metalcore\.{op}: 'weight' must have shape \[out_features, 4\] \(the last dim "
                r"of 'input'\), got \[5, 6\]",
            ),
            BadInput(
                "lora_a transposed (not PEFT's layout)",
                lambda pre=pre: ([*pre(), x(2, 4), x(5, 4), x(4, 3), x(5, 3), 1.0], {}),
                ValueError,
                rf"metalcore\.{op}: 'lora_a' must have shape \[r, 4\] \(PEFT's layout\), got "
                r"\[4, 3\]",
            ),
            BadInput(
                "lora_b transposed (not PEFT's layout)",
                lambda pre=pre: ([*pre(), x(2, 4), x(5, 4), x(3, 4), x(3, 5), 1.0], {}),
                ValueError,
                rf"metalcore\.{op}: 'lora_b' must have shape \[5, 3\] \(\[out_features, r\], "
                r"PEFT's layout\), got \[3, 5\]",
            ),
            BadInput(
                "lora_a of another dtype",
                lambda pre=pre: (
                    [*pre(), x(2, 4), x(5, 4), x(3, 4, dtype=torch.float64), x(5, 3), 1.0],
                    {},
                ),
                TypeError,
                rf"metalcore\.{op}: 'lora_a' must have the same dtype as 'input' \(Float\), "
                r"got Double",
            ),
            BadInput(
                "bias of another length",
                lambda pre=pre: ([*pre(), x(2, 4), x(5, 4), x(3, 4), x(5, 3), 1.0, x(4)], {}),
                ValueError,
                rf"metalcore\.{op}: 'bias' must have shape \[5\] \(out_features\), got \[4\]",
            ),
            BadInput(
                "infinite scaling",
                lambda pre=pre: ([*pre(), x(2, 4), x(5, 4), x(3, 4), x(5, 3), math.inf], {}),
                ValueError,
                rf"metalcore\.{op}: 'scaling' must be finite, got inf",
            ),
        ]
    out["lora_linear_backward"] += [
        BadInput(
            "grad_out of another dtype",
            lambda: (
                [x(2, 5, dtype=torch.float64), x(2, 4), x(5, 4), x(3, 4), x(5, 3), 1.0],
                {},
            ),
            TypeError,
            r"metalcore\.lora_linear_backward: 'grad_out' must have the same dtype as 'input'",
        ),
        BadInput(
            "grad_out of the wrong shape",
            lambda: ([x(2, 4), x(2, 4), x(5, 4), x(3, 4), x(5, 3), 1.0], {}),
            ValueError,
            r"metalcore\.lora_linear_backward: 'grad_out' must have shape \[2, 5\] \(the "
            r"output's\), got \[2, 4\]",
        ),
    ]
    return out


def _build_lora() -> dict[str, OpSpec]:
    bad = _bad_lora()
    specs = [
        OpSpec(
            "lora_linear",
            _draw_lora_linear,
            lambda *a: (ref.lora_linear(*a),),
            _lora_tol,
            bad["lora_linear"],
            # Autograd's leaves all require grad, so the weight's gradient is asked for.
            gradient=Gradient(
                (0, 1, 2, 3, 5),
                "lora_linear_backward",
                lambda a, o, g: [g[0], *a[:6], True],
                {0: 0, 1: 1, 2: 2, 3: 3, 5: 4},
                large=_LORA_LARGE,
            ),
            edges=_lora_edges("lora_linear"),
        ),
        OpSpec(
            "lora_linear_backward",
            _draw_lora_linear_backward,
            lambda *a: ref.lora_linear_backward(*a),
            _lora_backward_tol,
            bad["lora_linear_backward"],
            edges=_lora_edges("lora_linear_backward"),
        ),
    ]
    return {s.name: s for s in specs}


SPECS.update(_build_lora())

# --- Linear algebra, second slice: QR, LU, solve -----------------------------------------------
# Same drawers' helpers as the block above. QR's factors are unique only up to the signs of R's
# rows where A's leading columns are rank deficient, so its outputs are checked by invariants.


def _draw_qr(d: Drawer) -> Sample:
    dtype = d.dtype(FLOAT_DTYPES, "dtype")
    batch, m, n = _la_batch(d), d.size(LA_SIZES, "m"), d.size(LA_SIZES, "n")
    mode = d.choice(["reduced", "complete", "r"], "mode")
    g = _la_gen(d, "A")
    A = torch.randn((*batch, m, n), generator=g, dtype=torch.float64) * _la_scale(d, "A")
    if min(m, n) > 1 and d.boolean(0.2, label="A.rank_deficient"):
        if d.boolean(label="A.zero_column"):
            A[..., :, 0] = 0.0  # the first reflector is the identity (tau = 0)
        else:
            A[..., :, -1] = A[..., :, 0]
    A = _la_specials(d, A, "A")
    a = draw_layout(d, A.to(dtype), READ_LAYOUTS, "A")
    return Sample([a, mode], dtype=_la_out_dtype(dtype))


def _check_qr(sample: Sample, outs, expected, where: str) -> None:
    Q, R = (o.detach().cpu() for o in outs)
    eQ, eR = expected
    for got, want, what in ((Q, eQ, "Q"), (R, eR, "R")):
        if tuple(got.shape) != tuple(want.shape):
            raise AssertionError(f"{where}: {what} shape {tuple(got.shape)} != {tuple(want.shape)}")
    A = sample.args[0].values.double()
    mode = sample.args[1]
    m, n = A.shape[-2], A.shape[-1]
    k = min(m, n)
    if R.numel() and (R.tril(-1) != 0).any():
        raise AssertionError(f"{where}: R's strict lower triangle is not exactly 0")
    if A.numel() == 0 or k == 0:
        if Q.numel() and not torch.equal(Q.double(), eQ):
            raise AssertionError(f"{where}: Q of an empty factorization is not the identity")
        return
    ok = torch.isfinite(A).flatten(-2).all(-1)
    upper = torch.ones(R.shape[-2:], dtype=torch.bool).triu()
    if (~ok).any() and not R[~ok][..., upper].isnan().all():
        raise AssertionError(f"{where}: R of a non-finite matrix is not NaN on its triangle")
    if mode != "r":
        _la_check_nan_rows(where, Q, ok, "Q")
    if not ok.any():
        return
    A, R = A[ok], R[ok].double()
    norm = torch.linalg.matrix_norm(A, ord=2).clamp_min(torch.finfo(torch.float64).tiny)
    bound = _LA_C * max(m, n) * _la_units(sample)
    # R^T R = A^T A holds for every QR (any signs), so it checks mode 'r' too.
    gram = ((R.mT @ R - A.mT @ A).abs().amax((-2, -1)) / norm**2).max().item()
    if gram > bound:
        _la_fail(where, "|R^T R - A^T A| / |A|^2", gram, bound)
    if mode == "r":
        return
    Q = Q[ok].double()
    rec = ((Q[..., :k] @ R[..., :k, :] - A).abs().amax((-2, -1)) / norm).max().item()
    if rec > bound:
        _la_fail(where, "|Q R - A| / |A|", rec, bound)
    orth = (Q.mT @ Q - torch.eye(Q.shape[-1], dtype=torch.float64)).abs().max().item()
    if orth > bound:
        _la_fail(where, "|Q^T Q - I|", orth, bound)


def _la_edges_qr() -> list[Sample]:
    A = torch.arange(12.0).reshape(3, 4)  # rank 2
    nan = A.clone()
    nan[1, 2] = float("nan")
    out = []
    for mode in ("reduced", "complete", "r"):
        out += [
            Sample([TensorArg(torch.stack([A, nan, torch.zeros(3, 4)])), mode]),
            Sample([TensorArg(torch.stack([A.mT, nan.mT, torch.eye(4, 3)])), mode]),
            Sample([TensorArg(torch.zeros(2, 0, 3)), mode]),
            Sample([TensorArg(torch.zeros(2, 3, 0)), mode]),
            Sample([TensorArg(torch.zeros(0, 3, 2)), mode]),
            Sample([TensorArg(torch.eye(4)[:, :2] * 1e-30), mode]),
            Sample([TensorArg(torch.full((2, 2), 1e30)), mode]),
        ]
    return out


def _la_bad_qr() -> list[BadInput]:
    out = _la_bad("svd", lambda A: ([A], {}))  # svd's checks: any matrix, no squareness
    for b in out:
        b.match = b.match.replace("svd", "qr")
    out.append(
        BadInput(
            "mode 'full'",
            lambda: ([torch.eye(2), "full"], {}),
            ValueError,
            r"metalcore\.qr: 'mode' must be 'reduced', 'complete' or 'r', got 'full'",
        )
    )
    return out


def _build_linalg2() -> dict[str, OpSpec]:
    specs = [
        OpSpec(
            "qr",
            _draw_qr,
            ref.qr,
            _la_tol(0.0),
            _la_bad_qr(),
            edges=_la_edges_qr,
            check_outputs=_check_qr,
        ),
    ]
    return {s.name: s for s in specs}


SPECS.update(_build_linalg2())


def _la_well_conditioned(d: Drawer, batch, n: int, g) -> torch.Tensor:
    """Off-diagonal entries small against a diagonal of magnitude [1, 2] (random signs), rows
    shuffled so that partial pivoting has work to do: condition number O(1)."""
    A = torch.randn((*batch, n, n), generator=g, dtype=torch.float64) / (2 * max(n, 1) ** 0.5)
    diag = (1 + torch.rand((*batch, n), generator=g, dtype=torch.float64)) * torch.where(
        torch.rand((*batch, n), generator=g) < 0.5, -1.0, 1.0
    )
    A = A + torch.diag_embed(diag)
    return A[..., torch.randperm(n, generator=g), :]


def _la_singular(d: Drawer, A: torch.Tensor, label: str) -> torch.Tensor:
    """Sometimes an exactly singular matrix whose elimination meets an exactly zero pivot in
    any precision and any elimination order: a zero column stays zero under row operations. (A
    repeated row does not: blocked LAPACK updates the two copies in different orders.)"""
    n = A.shape[-1]
    if n < 2 or not d.boolean(0.15, label=f"{label}.singular"):
        return A
    A = A.clone()
    A[..., :, d.integer(0, n - 1, label=f"{label}.singular_at")] = 0.0
    return A


def _draw_lu_factor_ex(d: Drawer) -> Sample:
    dtype = d.dtype(FLOAT_DTYPES, "dtype")
    batch, m, n = _la_batch(d), d.size(LA_SIZES, "m"), d.size(LA_SIZES, "n")
    g = _la_gen(d, "A")
    A = torch.randn((*batch, m, n), generator=g, dtype=torch.float64) * _la_scale(d, "A")
    if m == n:
        A = _la_singular(d, A, "A")
    A = _la_specials(d, A, "A")
    a = draw_layout(d, A.to(dtype), READ_LAYOUTS, "A")
    return Sample([a], dtype=_la_out_dtype(dtype))


def _check_lu_factor_ex(sample: Sample, outs, expected, where: str) -> None:
    """P L U = A within c * max(m, n) * u * |A|, |L| <= 1, valid pivots, info = the first
    exactly zero U_ii; non-finite matrices follow metalcore's rule exactly."""
    LU, piv, info = (o.detach().cpu() for o in outs)
    eLU, epiv, einfo = expected
    A = sample.args[0].values.double()
    m, n = A.shape[-2], A.shape[-1]
    k = min(m, n)
    for got, want, what in ((LU, eLU, "LU"), (piv, epiv, "pivots"), (info, einfo, "info")):
        if tuple(got.shape) != tuple(want.shape) or got.dtype != (
            want.dtype if what != "LU" else sample.dtype
        ):
            raise AssertionError(f"{where}: {what} shape/dtype {got.shape} {got.dtype}")
    if A.numel() == 0:
        return
    A, LU, piv, info = (
        t.reshape(-1, *t.shape[-2:]) for t in (A, LU, piv[..., None], info[..., None, None])
    )
    piv, info = piv[..., 0], info[..., 0, 0]
    ok = torch.isfinite(A).flatten(-2).all(-1)
    # (info is not compared with LAPACK's: whether an exactly zero pivot appears in a singular
    # matrix with repeated rows depends on the elimination order; it must match U instead.)
    lo = torch.arange(1, k + 1, dtype=torch.int32)
    if ((piv < lo) | (piv > m)).any():
        raise AssertionError(f"{where}: pivots outside [i, m]")
    if (~ok).any():
        if not LU[~ok].isnan().all() or not torch.equal(piv[~ok], lo.expand_as(piv[~ok])):
            raise AssertionError(f"{where}: a non-finite matrix must give NaN LU, no swaps")
        if (info[~ok] != 0).any():
            raise AssertionError(f"{where}: a non-finite matrix must give info 0")
    if not ok.any():
        return
    A, LU, piv, info = A[ok], LU[ok].double(), piv[ok], info[ok]
    diag = LU.diagonal(dim1=-2, dim2=-1)
    zero = diag == 0
    first = torch.where(zero.any(-1), zero.int().argmax(-1) + 1, 0).to(torch.int32)
    if not torch.equal(first, info):
        raise AssertionError(f"{where}: info {info.tolist()} is not the first zero U_ii")
    P, L, U = torch.lu_unpack(LU, piv)
    if (L.abs() > 1).any():
        raise AssertionError(f"{where}: |L| > 1 (the pivot is not the largest entry)")
    norm = A.abs().amax((-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)
    bound = _LA_C * max(m, n) * _la_units(sample)
    rec = ((P @ L @ U - A).abs().amax((-2, -1)) / norm).max().item()
    if rec > bound * max(k, 1):  # growth factor of partial pivoting: O(k) on random input
        _la_fail(where, "|P L U - A| / max|A|", rec, bound * max(k, 1))


def _draw_lu_solve(d: Drawer) -> Sample:
    dtype = d.dtype(FLOAT_DTYPES, "dtype")
    batch, n, k = _la_batch(d), d.size(LA_SIZES, "n"), d.size(LA_SIZES, "k")
    left, adjoint = d.boolean(label="left"), d.boolean(label="adjoint")
    g = _la_gen(d, "A")
    A = _la_well_conditioned(d, batch, n, g)
    LU, piv = torch.linalg.lu_factor(A)
    b_batch = list(batch)
    if b_batch and d.boolean(0.3, label="B.broadcast"):
        b_batch = b_batch[1:] if d.boolean(label="B.drop") else [1, *b_batch[1:]]
    shape = (*b_batch, n, k) if left else (*b_batch, k, n)
    B = torch.randn(shape, generator=g, dtype=torch.float64) * _la_scale(d, "B")
    # Not "expanded" for LU: a repeated row is not an LU factorization of a well-conditioned A.
    lu_layouts = tuple(lay for lay in READ_LAYOUTS if lay != "expanded")
    lu = draw_layout(d, LU.to(dtype), lu_layouts, "LU")
    b = draw_layout(d, B.to(dtype), READ_LAYOUTS, "B")
    return Sample([lu, TensorArg(piv), b, left, adjoint], dtype=_la_out_dtype(dtype))


def _la_solve_tol(per_n: float, lu: bool):
    """The table's tolerance (per_n * n + 16 units) scaled element-wise by the terms each entry of
    X is computed from: |A^-1| |B| (|B| |A^-1| for left=False), the componentwise (Skeel) bound of
    a backward-stable solve. An entry that is small next to those terms (a cancellation, e.g.
    -5.2e-5 from terms of order 1) carries their rounding, not its own."""

    def tol(sample: Sample, index: int) -> Tolerance:
        a = sample.args[0].values.double()
        n = a.shape[-1]
        base = tolerance(sample.dtype, per_n * n + 16)
        if index != 0 or a.numel() == 0:
            return base
        if lu:
            b, left, adjoint = sample.args[2].values.double(), sample.args[3], sample.args[4]
            p, lower, upper = torch.lu_unpack(a, sample.args[1].values)
            a = p @ lower @ upper
            if adjoint:
                a = a.mH
        else:
            b, left = sample.args[1].values.double(), sample.args[2]
        inv = torch.linalg.inv_ex(a)[0].abs()
        scale = inv @ b.abs() if left else b.abs() @ inv
        return replace(base, scale=scale)

    return tol


def _draw_solve_ex(d: Drawer) -> Sample:
    dtype = d.dtype(FLOAT_DTYPES, "dtype")
    batch, n, k = _la_batch(d), d.size(LA_SIZES, "n"), d.size(LA_SIZES, "k")
    left = d.boolean(label="left")
    g = _la_gen(d, "A")
    A = _la_singular(d, _la_well_conditioned(d, batch, n, g), "A")
    A = _la_specials(d, A, "A")
    b_batch = list(batch)
    if b_batch and d.boolean(0.3, label="B.broadcast"):
        b_batch = b_batch[1:] if d.boolean(label="B.drop") else [1, *b_batch[1:]]
    shape = (*b_batch, n, k) if left else (*b_batch, k, n)
    B = torch.randn(shape, generator=g, dtype=torch.float64) * _la_scale(d, "B")
    a_layouts = tuple(lay for lay in READ_LAYOUTS if lay != "expanded")
    a = draw_layout(d, A.to(dtype), a_layouts, "A")
    b = draw_layout(d, B.to(dtype), READ_LAYOUTS, "B")
    return Sample([a, b, left], dtype=_la_out_dtype(dtype))


def _la_edges_lu() -> list[Sample]:
    eye = torch.eye(3)
    sing = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 0.0, 1.0]])
    nan = eye.clone()
    nan[1, 0] = float("nan")
    return [
        Sample([TensorArg(torch.stack([eye, sing, torch.zeros(3, 3), nan]))]),
        Sample([TensorArg(torch.zeros(0, 3, 3))]),
        Sample([TensorArg(torch.zeros(2, 0, 3))]),
        Sample([TensorArg(torch.zeros(2, 3, 0))]),
        Sample([TensorArg(torch.full((2, 2), 1e30))]),
    ]


def _la_edges_solve() -> list[Sample]:
    A = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    sing = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    out = []
    for left in (True, False):
        out += [
            Sample(
                [
                    TensorArg(torch.stack([A, sing, torch.zeros(2, 2)])),
                    TensorArg(torch.ones(3, 2, 2)),
                    left,
                ]
            ),
            Sample([TensorArg(A), TensorArg(torch.ones(4, 2, 2)), left]),
            Sample([TensorArg(torch.zeros(0, 2, 2)), TensorArg(torch.ones(2, 2)), left]),
            Sample([TensorArg(torch.zeros(3, 0, 0)), TensorArg(torch.ones(3, 0, 0)), left]),
            Sample(
                [
                    TensorArg(torch.stack([A, sing])),
                    TensorArg(torch.zeros(2, 2, 0) if left else torch.zeros(2, 0, 2)),
                    left,
                ]
            ),
        ]
    return out


def _la_edges_lu_solve() -> list[Sample]:
    LU, piv = torch.linalg.lu_factor(torch.tensor([[0.0, 2.0], [3.0, 1.0]]))
    return [
        Sample([TensorArg(LU), TensorArg(piv), TensorArg(torch.ones(3, 2, 1)), True, adj])
        for adj in (False, True)
    ] + [
        Sample(
            [
                TensorArg(torch.zeros(0, 2, 2)),
                TensorArg(torch.ones(0, 2, dtype=torch.int32)),
                TensorArg(torch.ones(2, 1)),
                True,
                False,
            ]
        ),
        Sample([TensorArg(LU), TensorArg(piv), TensorArg(torch.ones(0, 2)), False, True]),
    ]


def _la_bad_solve(op: str) -> list[BadInput]:
    first = "LU" if op == "lu_solve" else "A"
    piv = [torch.ones(3, dtype=torch.int32)] if op == "lu_solve" else []

    def call(A, B, *rest):
        return ([A, *piv, B, *rest], {})

    out = _la_bad(op, lambda A: call(A, torch.ones(3, 2)))
    for b in out:
        b.match = b.match.replace("'A'", f"'{first}'")
    out += [
        BadInput(
            "B of another dtype",
            lambda: call(torch.eye(3), torch.ones(3, 2, dtype=torch.float64)),
            TypeError,
            rf"metalcore\.{op}: 'B' must have the same dtype as '{first}' \(Float\), got Double",
        ),
        BadInput(
            "B with the wrong rows",
            lambda: call(torch.eye(3), torch.ones(4, 2)),
            ValueError,
            rf"metalcore\.{op}: 'B' must have 3 rows \(A X = B with A of size 3\), "
            r"got shape \[4, 2\]",
        ),
        BadInput(
            "B with the wrong columns (left=False)",
            lambda: call(torch.eye(3), torch.ones(3, 2), False),
            ValueError,
            rf"metalcore\.{op}: 'B' must have 3 columns",
        ),
        BadInput(
            "B on meta",
            lambda: call(torch.eye(3), torch.ones(3, 2, device="meta")),
            RuntimeError,
            rf"metalcore\.{op}: 'B' must be on the same device as '{first}' \(cpu\), got meta",
        ),
    ]
    if op == "solve_ex":
        out.append(
            BadInput(
                "batch dims that do not broadcast",
                lambda: call(torch.eye(3).expand(2, 3, 3), torch.ones(3, 3, 1)),
                ValueError,
                r"metalcore\.solve_ex: the batch dims of 'A' \[2, 3, 3\] and 'B' \[3, 3, 1\] "
                r"must broadcast",
            )
        )
    else:
        out += [
            BadInput(
                "int64 pivots",
                lambda: ([torch.eye(3), torch.ones(3, dtype=torch.int64), torch.ones(3, 2)], {}),
                TypeError,
                r"metalcore\.lu_solve: 'pivots' must be int32 \(as lu_factor returns them\), "
                r"got Long",
            ),
            BadInput(
                "pivots of the wrong shape",
                lambda: ([torch.eye(3), torch.ones(2, 3, dtype=torch.int32), torch.ones(3, 2)], {}),
                ValueError,
                r"metalcore\.lu_solve: 'pivots' must have shape \[3\] \(LU's batch and size\), "
                r"got \[2, 3\]",
            ),
            BadInput(
                "pivots out of range",
                lambda: (
                    [torch.eye(3), torch.tensor([1, 4, 3], dtype=torch.int32), torch.ones(3, 2)],
                    {},
                ),
                ValueError,
                r"metalcore\.lu_solve: 'pivots' must hold row numbers in \[1, 3\]",
            ),
            BadInput(
                "batch dims that do not broadcast",
                lambda: (
                    [
                        torch.eye(3).expand(2, 3, 3),
                        torch.ones(2, 3, dtype=torch.int32),
                        torch.ones(3, 3, 1),
                    ],
                    {},
                ),
                ValueError,
                r"metalcore\.lu_solve: the batch dims of 'LU' \[2, 3, 3\] and 'B' \[3, 3, 1\] "
                r"must broadcast",
            ),
        ]
    return out


def _build_linalg2_lu() -> dict[str, OpSpec]:
    specs = [
        OpSpec(
            "lu_factor_ex",
            _draw_lu_factor_ex,
            ref.lu_factor_ex,
            _la_tol(2.0),
            _la_bad("svd", lambda A: ([A], {})),
            edges=_la_edges_lu,
            check_outputs=_check_lu_factor_ex,
        ),
        OpSpec(
            "lu_solve",
            _draw_lu_solve,
            lambda *a: (ref.lu_solve(*a),),
            _la_solve_tol(4.0, lu=True),
            _la_bad_solve("lu_solve"),
            edges=_la_edges_lu_solve,
        ),
        OpSpec(
            "solve_ex",
            _draw_solve_ex,
            ref.solve_ex,
            _la_solve_tol(4.0, lu=False),
            _la_bad_solve("solve_ex"),
            edges=_la_edges_solve,
        ),
    ]
    for b in specs[0].bad_inputs:
        b.match = b.match.replace("svd", "lu_factor_ex")
    return {s.name: s for s in specs}


SPECS.update(_build_linalg2_lu())
