"""Backends the reliability harness runs ops on, and the check of one sample against the float64
reference.

Backends are pluggable: each says whether it can run at all on this machine and whether a given
op has a kernel there, with a reason when not, so tests skip (never silently pass) what cannot
run. ``cpu`` always runs. ``msim`` runs the Metal kernels in the simulator through the test-only
op library (same schemas, namespace :data:`MSIM_NAMESPACE`, CPU tensors in and out;
``libmetalcore_msim_ops`` next to the package or named by ``METALCORE_MSIM_LIBRARY``) when msim
and clang-19 are present; the kernels are compiled from ``kernels/`` by msim, as the Metal-path
tests do. ``cuda`` and ``mps`` run where torch has the device and metalcore has a kernel for its
dispatch key.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .op_specs import Limits, OpSpec, Sample, Tolerance, numel

# Namespace of the simulator's test-only ops (the Metal kernels run on CPU tensors).
MSIM_NAMESPACE = "metalcore_msim"


@dataclass
class Backend:
    name: str
    device: str
    dispatch_key: str | None = None  # None: ops come from another namespace (msim)
    namespace: str | None = None  # None: the spec's own namespace
    # Metal has no float64; the simulator runs one fiber per GPU thread, so its samples stay small.
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    max_numel: int | None = None
    # What running here needs, for skip messages and the test log's summary of skipped groups.
    needs: str = ""
    # The simulator's test-only ops are plain CPU kernels: no autograd, fakes or compile.
    traceable: bool = True

    def __str__(self) -> str:
        return self.name

    @property
    def ops(self):
        """The op namespace to call on this backend (``torch.ops.metalcore`` or msim's)."""
        return getattr(torch.ops, self.namespace or "metalcore")

    @property
    def limits(self) -> Limits:
        """What specs may draw for this backend."""
        return Limits(dtypes=self.dtypes)

    def supports(self, sample: Sample) -> str | None:
        """Why this backend cannot run ``sample`` (a dtype it lacks, a size it is too slow
        for), or None."""
        if sample.dtype not in self.dtypes:
            return f"{self.name} has no {sample.dtype}"
        if self.max_numel is not None and numel(sample) > self.max_numel:
            return f"{self.name} runs at most {self.max_numel} elements per sample"
        return None

    def unavailable(self) -> str | None:
        """Why this backend cannot run here ("needs <what>: <why>"), or None."""
        why = self._missing()
        return f"needs {self.needs}: {why}" if why else None

    def _missing(self) -> str | None:
        if self.name == "cpu":
            return None
        if self.name == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if self.name == "mps":
            mps = getattr(torch.backends, "mps", None)
            return None if mps is not None and mps.is_available() else "no MPS device"
        if self.name == "msim":
            if os.environ.get("METALCORE_FUZZ_MSIM") == "0":
                return "the msim device is switched off (METALCORE_FUZZ_MSIM=0)"
            return load_msim()
        return f"unknown backend {self.name}"

    def op_unavailable(self, op: str) -> str | None:
        """Why ``op`` cannot run on this backend, or None."""
        why = self.unavailable()
        if why:
            return why
        if self.dispatch_key is None:
            if op not in _ops_in(self.namespace):
                return f"{self.namespace}::{op} is not registered"
            # The schema comes from the op table; the kernel only once the family has a Metal
            # launch layer.
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{self.namespace}::{op}", "CPU"):
                return f"{self.namespace}::{op} has no kernel (no Metal launch layer yet)"
            return None
        if not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"metalcore::{op}", self.dispatch_key
        ):
            return f"metalcore::{op} has no {self.dispatch_key} kernel"
        return None

    def call(self, spec: OpSpec, args: list, kwargs: dict):
        return spec.overload(self.namespace)(*args, **kwargs)


_NO_FP64 = (torch.float32, torch.float16, torch.bfloat16)

BACKENDS = [
    Backend("cpu", "cpu", "CPU"),
    Backend(
        "msim",
        "cpu",
        None,
        MSIM_NAMESPACE,
        _NO_FP64,
        max_numel=1 << 15,
        needs="msim (clang-19 and the simulator op library)",
        traceable=False,
    ),
    Backend("cuda", "cuda", "CUDA", needs="CUDA (an NVIDIA GPU and metalcore's CUDA kernels)"),
    Backend("mps", "mps", "MPS", dtypes=_NO_FP64, needs="an Apple GPU (MPS)"),
]


def _ops_in(namespace: str) -> set[str]:
    prefix = f"{namespace}::"
    return {
        n[len(prefix) :].split(".")[0]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith(prefix)
    }


_msim_state: dict[str, str | None] = {}


def _msim_library() -> Path | None:
    env = os.environ.get("METALCORE_MSIM_LIBRARY")
    if env:
        return Path(env)
    from metalcore import _library

    # In the order import metalcore searches (a set would pick one at random where several exist).
    for folder in dict.fromkeys(p.parent for p in _library._candidates()):
        path = folder / "libmetalcore_msim_ops.so"
        if path.is_file():
            return path
    return None


def msim_missing() -> str | None:
    """Why the simulator cannot run here (cheap checks, nothing loaded), or None."""
    kernels = Path(__file__).resolve().parents[2] / "kernels"
    if importlib.util.find_spec("msim") is None:
        return "msim is not importable"
    if not (shutil.which("clang++-19") or shutil.which("clang++")):
        return "msim needs clang-19"
    if not kernels.is_dir():
        return "no kernels/ sources (msim runs from a source checkout)"
    if _msim_library() is None:
        return f"no simulator op library ({MSIM_NAMESPACE}, libmetalcore_msim_ops)"
    return None


def load_msim() -> str | None:
    """Loads the simulator's test ops and the Metal kernels compiled by msim from kernels/
    (cached by content), with guard pages around every buffer; returns why that is impossible
    here, or None once loaded."""
    if "reason" in _msim_state:
        return _msim_state["reason"]
    reason = msim_missing()
    if reason is None:
        import msim

        kernels = Path(__file__).resolve().parents[2] / "kernels"
        if not _ops_in(MSIM_NAMESPACE):
            torch.ops.load_library(str(_msim_library()))
        ops = getattr(torch.ops, MSIM_NAMESPACE)
        ops.load_kernels(str(msim.build([kernels], include_dirs=[kernels])))
        ops.set_option("guard", "1")  # buffers next to guard pages: out-of-range accesses fault
    _msim_state["reason"] = reason
    return reason


@contextmanager
def poisoned_allocations():
    """Makes torch fill every freshly allocated float tensor with NaN (its deterministic mode),
    so an output element a kernel forgets to write reads as NaN instead of stale memory that
    may happen to hold the right value."""
    import torch.utils.deterministic as det

    prev_alg = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_alg, warn_only=prev_warn)
        det.fill_uninitialized_memory = prev_fill


class Mismatch(AssertionError):
    pass


def _scale(expected: torch.Tensor, per_row: bool) -> torch.Tensor:
    mag = expected.abs()
    mag = torch.where(torch.isfinite(mag) & (mag > 0), mag, torch.full_like(mag, float("nan")))
    if per_row and expected.dim() >= 1:
        s = mag.nanmedian(dim=-1, keepdim=True).values
    else:
        s = mag.nanmedian()
    return torch.nan_to_num(s, nan=1.0)


def compare(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, what: str) -> None:
    """Raises :class:`Mismatch` unless ``actual`` matches ``expected`` within ``tol``: NaN where
    the reference is NaN, the same infinities, and finite values within tolerance."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise Mismatch(f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}")
    if actual.numel() == 0:
        return
    if not actual.is_floating_point():  # integer outputs (linalg's info) match exactly
        a, e = actual.detach().cpu(), expected.detach().cpu().to(actual.dtype)
        if not torch.equal(a, e):
            idx = (a != e).nonzero()[0].tolist()
            raise Mismatch(
                f"{what}: got {a[tuple(idx)].item()!r} at {idx}, expected {e[tuple(idx)].item()!r}"
            )
        return
    a = actual.detach().to("cpu", torch.float64)
    # The reference rounded once to the output dtype (overflow to inf included), as a kernel
    # computing in higher precision rounds its result.
    e = expected.detach().to("cpu", actual.dtype).to(torch.float64)
    # Denormal outputs are only representable to the dtype's subnormal step.
    fi = torch.finfo(actual.dtype)
    floor = 4 * fi.smallest_normal * fi.eps
    scale = _scale(e, tol.per_row) if tol.scale is None else tol.scale.double()
    # A non-finite scale would accept anything; those elements must then match exactly.
    scale = torch.nan_to_num(scale, nan=0.0, posinf=0.0, neginf=0.0)
    atol = tol.atol * scale + floor
    if tol.floor is not None:
        atol = atol + tol.floor.double()
    with torch.no_grad():
        close = (a - e).abs() <= atol + tol.rtol * e.abs()
        same = (a == e) | (a.isnan() & e.isnan())
        bad = ~(close | same)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        n_bad = int(bad.sum())
        raise Mismatch(
            f"{what}: {n_bad} of {a.numel()} elements differ; first at {idx}: "
            f"got {a[tuple(idx)].item()!r}, expected {e[tuple(idx)].item()!r} "
            f"(rtol={tol.rtol}, atol={float(atol.max() if atol.dim() else atol):.3g})"
        )


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_floating_point():
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def _flat_tensors(args: list) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def run_sample(spec: OpSpec, backend: Backend, sample: Sample) -> tuple[torch.Tensor, ...]:
    """Runs ``sample`` on ``backend`` and returns the outputs (on the backend's device)."""
    args, kwargs = sample.materialize(backend.device)
    result = backend.call(spec, args, kwargs)
    return spec.outputs(args, result)


def expected_outputs(spec: OpSpec, sample: Sample) -> tuple[torch.Tensor, ...]:
    """The float64 reference's outputs for ``sample`` (computed on CPU)."""
    ref_args, ref_kwargs = sample.materialize("cpu")
    expected = spec.reference(*ref_args, **ref_kwargs)
    if spec.mutated_args and expected is None:
        expected = spec.outputs(ref_args, None)
    return tuple(expected)


def compare_outputs(
    spec: OpSpec,
    backend: Backend,
    sample: Sample,
    outs: tuple[torch.Tensor, ...],
    expected: tuple[torch.Tensor, ...],
    where: str,
) -> None:
    """Output count, device, dtype and contiguity of ``outs`` (for functional ops), and values
    within ``spec``'s tolerance of ``expected``; raises :class:`Mismatch` naming ``where``."""
    if len(outs) != len(expected):
        raise Mismatch(f"{where}: {len(outs)} outputs, expected {len(expected)}")
    for i, (out, exp) in enumerate(zip(outs, expected)):
        what = f"{where}: output {i}"
        if out.device.type != torch.device(backend.device).type:
            raise Mismatch(f"{what}: on {out.device}, expected {backend.device}")
        if not spec.mutated_args:
            # An output's dtype is the sample's, unless the sample's info names another
            # (attention's float32 lse for 16-bit inputs) or the reference is an integer
            # (linalg's info), whose dtype it keeps.
            default = sample.dtype if exp.is_floating_point() else exp.dtype
            want = sample.info.get("out_dtypes", {}).get(i, default)
            if out.dtype != want:
                raise Mismatch(f"{what}: dtype {out.dtype}, expected {want}")
            if not out.is_contiguous():
                raise Mismatch(f"{what}: not contiguous (strides {out.stride()})")
        if spec.check_outputs is None:
            compare(out, exp, spec.tolerances(sample, i), what)
    if spec.check_outputs is not None:
        spec.check_outputs(sample, outs, expected, where)


def check_sample(spec: OpSpec, backend: Backend, sample: Sample) -> None:
    """Runs ``sample`` on ``backend`` and checks it against the float64 reference: output count,
    shapes, dtypes, devices, contiguity, untouched inputs, and values within tolerance. Raises
    :class:`Mismatch` with the sample's description on any difference."""
    expected = expected_outputs(spec, sample)
    args, kwargs = sample.materialize(backend.device)
    # Every argument the schema does not mark as written must come back bit-identical.
    read_only = [a for i, a in enumerate(args) if i not in spec.mutated_args]
    before = [t.detach().clone() for t in _flat_tensors(read_only)]
    with poisoned_allocations():
        result = backend.call(spec, args, kwargs)
    outs = spec.outputs(args, result)
    where = f"metalcore.{spec.name} on {backend.name} with {sample.describe()}"
    for i, (b, t) in enumerate(zip(before, _flat_tensors(read_only))):
        if not _bitwise_equal(b, t):
            raise Mismatch(f"{where}: read-only tensor argument {i} was modified")
    compare_outputs(spec, backend, sample, outs, expected, where)


def to_device(obj, device: str):
    """``obj`` (tensors in nested lists and tuples) on ``device``, each tensor keeping its
    strides (``Tensor.to`` would make a sliced view contiguous, hiding a non-dense case);
    tensors already off the CPU (meta) stay where they are."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu" or torch.device(device).type == "cpu":
            return obj
        if obj.layout != torch.strided:  # sparse and friends have no strides to keep
            return obj.to(device)
        out = torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device=device)
        return out.copy_(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    return obj


def available_backends() -> list[Backend]:
    return [b for b in BACKENDS if b.unavailable() is None]


def backend(name: str) -> Backend:
    for b in BACKENDS:
        if b.name == name:
            return b
    raise KeyError(name)
