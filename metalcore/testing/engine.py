"""The op contract, one check per property, for any spec on any backend.

``tests/ops/test_contract.py`` runs every check below for every op of
:data:`metalcore.testing.op_specs.SPECS` on every device (``tests/mps`` reruns them on an Apple
GPU); nothing here knows an op by name. Samples come from the specs, so the checks hold for a
new op as soon as its spec exists:

* :func:`check_sample` (in :mod:`.backends`): values against the float64 reference, outputs
  fresh (allocations NaN-poisoned), inputs untouched;
* :func:`check_gradients`: autograd through the op on the device gives the backward op's results
  bit for bit and matches the float64 reference of the backward;
* :func:`check_gradcheck`: ``torch.autograd.gradcheck`` in float64 (CPU);
* :func:`check_opcheck`: ``torch.library.opcheck``;
* :func:`check_compile`: ``torch.compile(fullgraph=True, dynamic=True)`` gives eager's outputs
  (and gradients) at three sizes with no recompilation;
* :func:`export_programs` / :func:`check_exported`: ``torch.export`` with every dim dynamic,
  ``run_decompositions()`` keeps the op, and the saved program run in a fresh process on inputs
  of other sizes gives eager's results (one process for every op of a device);
* :func:`check_bad_input`: the spec's bad input raises its exception and message on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from . import backends as bk
from .op_specs import (
    SPECS,
    BadInput,
    Drawer,
    Limits,
    OpSpec,
    RecordingDrawer,
    ReplayDrawer,
    Sample,
    TensorArg,
    bigger_sizes,
    draw_layout,
    draw_values,
    run_autograd,
)

Mismatch = bk.Mismatch

# gradcheck differentiates numerically: small float64 samples of moderate magnitude, no special
# values and no stride-0 (expanded) inputs, whose elements gradcheck cannot perturb one by one.
GRADCHECK_LIMITS = Limits(
    dtypes=(torch.float64,),
    min_size=1,
    max_size=5,
    specials=False,
    layouts=("contiguous", "offset", "transposed", "sliced", "padded"),
    scales=(1.0, 3.0),
)
# torch specializes sizes 0 and 1 (a new one recompiles by design), so compile and export draw
# sizes from 2 up; small enough that a compile stays cheap.
DYNAMIC_LIMITS = Limits(min_size=2, max_size=33)
# A program exported with an input whose strides are not products of its sizes (a slice with a
# step, a narrow of a wider dim) does not load on torch 2.13 ("vr must not be None for symbol"
# in the deserializer): export draws the other layouts.
EXPORT_LAYOUTS = ("contiguous", "offset", "transposed", "expanded")


def _bitwise_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bk._bitwise_equal(a, b)


# --- Gradients ---------------------------------------------------------------------------------


def draw_grad_outputs(d: Drawer, spec: OpSpec, sample: Sample) -> list[TensorArg]:
    """Gradients for every output of ``sample``: drawn values (specials included) in drawn
    layouts, of each output's shape and dtype."""
    expected = bk.expected_outputs(spec, sample)
    out = []
    for i, e in enumerate(expected):
        values = draw_values(d, e.shape, sample.dtype, f"grad_out{i}", large=spec.gradient.large)
        if i == 0 and spec.gradient.inf_as_nan:
            values = torch.where(values.isinf(), torch.full_like(values, float("nan")), values)
        out.append(draw_layout(d, values, ("contiguous", "offset", "transposed"), f"grad_out{i}"))
    return out


def check_gradients(
    spec: OpSpec, backend: bk.Backend, sample: Sample, grad_outputs: Sequence[TensorArg]
) -> None:
    """Autograd through the op on ``backend``: the gradients are the backward op's outputs bit
    for bit (autograd runs the backward op, nothing else), and they match the float64 reference
    of the backward op within its tolerance."""
    gradient = spec.gradient
    assert gradient is not None, f"{spec.name} is not differentiable"
    bwd = SPECS[gradient.op]
    where = f"metalcore.{spec.name} backward on {backend.name} with {sample.describe()}"
    args, kwargs = sample.materialize(backend.device)
    gos = [g.materialize(backend.device) for g in grad_outputs]
    positions = [i for i in gradient.inputs if isinstance(args[i], torch.Tensor)]
    result = run_autograd(spec, args, kwargs, gos)
    n_out = len(result) - len(positions)
    outs, grads = result[:n_out], result[n_out:]

    direct_args = gradient.args(args, [o.detach() for o in outs], gos)
    direct = bwd.outputs(direct_args, bwd.overload()(*direct_args))
    for pos, g in zip(positions, grads):
        want = direct[gradient.grads[pos]]
        if g is None or not _bitwise_same(g, want):
            raise Mismatch(
                f"{where}: the gradient of argument {pos} is not metalcore.{gradient.op}'s "
                f"output {gradient.grads[pos]}"
            )

    cpu_args, _ = sample.materialize("cpu")
    cpu_outs = [o.detach().cpu() for o in outs]
    bwd_args = gradient.args(cpu_args, cpu_outs, [g.values for g in grad_outputs])
    expected = bwd.reference(*bwd_args)
    bwd_sample = Sample(
        [TensorArg(a.contiguous()) if isinstance(a, torch.Tensor) else a for a in bwd_args],
        dtype=sample.dtype,
        info=sample.info,
    )
    for pos, g in zip(positions, grads):
        index = gradient.grads[pos]
        bk.compare(
            g, expected[index], bwd.tolerances(bwd_sample, index), f"{where}: grad of arg {pos}"
        )


def check_gradcheck(spec: OpSpec, sample: Sample) -> None:
    """``gradcheck`` of every output together and of each output alone (the others then get no
    gradient, which the backward must handle), in float64 on the CPU."""
    assert spec.gradient is not None
    args, kwargs = sample.materialize("cpu")
    positions = [i for i in spec.gradient.inputs if isinstance(args[i], torch.Tensor)]
    leaves = [args[i].detach().requires_grad_() for i in positions]

    def call(*ls):
        full = list(args)
        for i, leaf in zip(positions, ls):
            full[i] = leaf
        return spec.outputs(full, spec.overload()(*full, **kwargs))

    n_out = len(call(*leaves))
    assert torch.autograd.gradcheck(call, leaves), spec.name
    if n_out > 1:
        for k in range(n_out):
            assert torch.autograd.gradcheck(lambda *ls, k=k: call(*ls)[k], leaves), (spec.name, k)


# --- opcheck -----------------------------------------------------------------------------------


def check_opcheck(spec: OpSpec, backend: bk.Backend, sample: Sample, requires_grad: bool) -> None:
    """``torch.library.opcheck`` (schema, autograd registration, fake tensor, AOT dispatch with
    dynamic shapes) on ``sample``, with the differentiable inputs requiring grad or not."""
    args, kwargs = sample.materialize(backend.device)
    if requires_grad and spec.gradient is not None:
        for i in spec.gradient.inputs:
            if isinstance(args[i], torch.Tensor):
                args[i] = args[i].detach().requires_grad_()
    options = {} if spec.opcheck_utils is None else {"test_utils": spec.opcheck_utils}
    torch.library.opcheck(spec.overload(), tuple(args), kwargs, **options)


# --- compile -----------------------------------------------------------------------------------


def _is_tensor_arg(a) -> bool:
    return isinstance(a, TensorArg) or (
        isinstance(a, (list, tuple)) and bool(a) and isinstance(a[0], TensorArg)
    )


def _tensor_positions(sample: Sample) -> list[int]:
    return [i for i, a in enumerate(sample.args) if _is_tensor_arg(a)]


def draw_sized_samples(spec: OpSpec, d: Drawer, count: int = 3) -> list[Sample]:
    """``count`` samples of one case (dtype, layouts, flags, seeds) at ``count`` different sizes:
    drawn once under :data:`DYNAMIC_LIMITS` (and ``d``'s dtypes), then replayed with bigger
    sizes. Non-tensor arguments (eps, flags) are the first sample's in all of them."""
    limits = dataclasses.replace(
        d.limits, min_size=DYNAMIC_LIMITS.min_size, max_size=DYNAMIC_LIMITS.max_size
    )
    d.limits = limits
    rec = RecordingDrawer(d)
    first = spec.draw(rec)
    out = [first]
    for step in range(1, count):
        s = spec.draw(ReplayDrawer(rec.record, bigger_sizes(step), limits))
        args = [a if _is_tensor_arg(a) else b for a, b in zip(s.args, first.args)]
        out.append(Sample(args, dict(first.kwargs), first.dtype, first.info))
    return out


@contextlib.contextmanager
def _no_duck_sizing():
    # Sizes that happen to be equal in the first call must not become one symbol (a guard that
    # the next size breaks); the fakes' own checks still tie the sizes that must be equal.
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False):
        yield


def _split(sample: Sample, args: list):
    """The tensor arguments (inputs of a traced function) and a function that rebuilds the full
    argument list from them with ``sample``'s constants."""
    positions = _tensor_positions(sample)

    def rebuild(tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return full

    return [args[i] for i in positions], rebuild


def _clone_args(args):
    return [
        a.detach().clone()
        if isinstance(a, torch.Tensor)
        else [t.detach().clone() for t in a]
        if isinstance(a, list)
        else a
        for a in args
    ]


def check_compile(
    spec: OpSpec,
    backend: bk.Backend,
    samples: Sequence[Sample],
    grad_outputs: Sequence[Sequence[TensorArg]] | None = None,
) -> None:
    """Compiles a call of the op (fullgraph, dynamic) on the first sample and runs the others
    under ``fail_on_recompile``: outputs (the mutated arguments of an in-place op) are eager's bit
    for bit, and with ``grad_outputs`` so are the gradients through the compiled backward."""
    op = spec.overload()
    first_args, _ = samples[0].materialize("cpu")
    _, rebuild0 = _split(samples[0], first_args)

    def call(*tensors):
        return op(*rebuild0(list(tensors)))

    differentiable = grad_outputs is not None and spec.gradient is not None
    torch._dynamo.reset()
    with _no_duck_sizing():
        compiled = torch.compile(call, fullgraph=True, dynamic=True)
        for k, s in enumerate(samples):
            stance = "fail_on_recompile" if k else "default"
            args, _ = s.materialize(backend.device)
            tensors, rebuild = _split(s, args)
            where = f"metalcore.{spec.name} compiled on {backend.name}, size {k}: {s.describe()}"
            eager_args = _clone_args(args)
            if differentiable:
                gos = [g.materialize(backend.device) for g in grad_outputs[k]]
                leaves_at = [
                    j
                    for j, i in enumerate(_tensor_positions(s))
                    if i in spec.gradient.inputs and isinstance(args[i], torch.Tensor)
                ]
                tensors = [
                    t.detach().requires_grad_() if j in leaves_at else t
                    for j, t in enumerate(tensors)
                ]
                eager_tensors, _ = _split(s, eager_args)
                eager_tensors = [
                    t.detach().requires_grad_() if j in leaves_at else t
                    for j, t in enumerate(eager_tensors)
                ]
                with torch.compiler.set_stance(stance):
                    got = spec.outputs(rebuild(tensors), compiled(*tensors))
                    torch.autograd.backward(got, gos)
                want = spec.outputs(eager_args, op(*rebuild(eager_tensors)))
                torch.autograd.backward(want, gos)
                pairs = [(g.detach(), w.detach()) for g, w in zip(got, want)]
                pairs += [(tensors[j].grad, eager_tensors[j].grad) for j in leaves_at]
            else:
                with torch.compiler.set_stance(stance):
                    got = spec.outputs(args, compiled(*tensors))
                eager_tensors, _ = _split(s, eager_args)
                want = spec.outputs(eager_args, op(*rebuild(eager_tensors)))
                pairs = list(zip(got, want))
            for i, (g, w) in enumerate(pairs):
                if g is None or not _bitwise_same(g, w):
                    raise Mismatch(f"{where}: result {i} differs from eager")


# --- export ------------------------------------------------------------------------------------


class _Call(torch.nn.Module):
    """One op call with the sample's constants baked in; the tensor arguments are inputs."""

    def __init__(self, spec: OpSpec, sample: Sample, args: list):
        super().__init__()
        self.spec = spec
        _, self.rebuild = _split(sample, args)

    def forward(self, *tensors):
        args = self.rebuild(list(tensors))
        result = self.spec.overload()(*args)
        return result if not self.spec.mutated_args else None


def _dynamic(t):
    from torch.export import Dim

    if isinstance(t, (list, tuple)):
        return [_dynamic(x) for x in t]
    return {d: Dim.AUTO for d in range(t.dim())}


def _flat(tensors) -> list[torch.Tensor]:
    return [t for a in tensors for t in (a if isinstance(a, (list, tuple)) else [a])]


def export_programs(
    cases: dict[str, tuple[Sample, Sample]], backend: bk.Backend, folder: Path
) -> dict[str, object]:
    """Exports each op's call on its first sample with every dim dynamic, checks that
    ``run_decompositions()`` keeps the op, saves the program and the second (other-sized)
    sample's inputs, and records eager's results on them: the outputs, or for an in-place op
    every tensor input after the call. Returns per op those results, or the exception raised
    (reported by that op's test, not by the others')."""
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    for name, (first, other) in cases.items():
        spec = SPECS[name]
        try:
            args, _ = first.materialize(backend.device)
            tensors, _ = _split(first, args)
            module = _Call(spec, first, args)
            with _no_duck_sizing():
                # forward(*tensors): one varargs input, whose dynamic shapes are one tuple.
                dynamic = (tuple(_dynamic(t) for t in tensors),)
                ep = torch.export.export(module, tuple(tensors), dynamic_shapes=dynamic)
            graph = str(ep.run_decompositions().graph)
            if f"metalcore.{name}.default" not in graph:
                raise Mismatch(f"metalcore.{name} is missing after run_decompositions():\n{graph}")
            torch.export.save(ep, folder / f"{name}.pt2")
            other_args, _ = other.materialize(backend.device)
            torch.save(_split(other, other_args)[0], folder / f"{name}.in.pt")
            eager_args = _clone_args(other_args)
            eager_tensors, rebuild = _split(other, eager_args)
            result = spec.overload()(*rebuild(eager_tensors))
            outs = _flat(eager_tensors) if spec.mutated_args else spec.outputs(eager_args, result)
            results[name] = [t.detach().cpu() for t in outs]
        except Exception as e:
            results[name] = e
    return results


_CHILD = textwrap.dedent(
    """
    import sys, torch, metalcore
    from pathlib import Path
    from metalcore.testing.op_specs import SPECS
    folder = Path(sys.argv[1])
    for name in sys.argv[2:]:
        try:
            ep = torch.export.load(folder / f"{name}.pt2")
            tensors = torch.load(folder / f"{name}.in.pt")
            result = ep.module()(*tensors)
            if SPECS[name].mutated_args:  # every input after the call
                outs = [t for a in tensors for t in (a if isinstance(a, list) else [a])]
            else:
                outs = [result] if isinstance(result, torch.Tensor) else list(result)
            torch.save([t.cpu() for t in outs], folder / f"{name}.out.pt")
        except Exception as e:
            (folder / f"{name}.err").write_text(f"{type(e).__name__}: {e}")
    """
)


def run_exported_in_fresh_process(folder: Path, names: Sequence[str]) -> None:
    """Loads and runs the saved programs of ``names`` in one new interpreter that imports only
    torch and metalcore (as a user's process would)."""
    import metalcore

    env = dict(os.environ)
    package_root = str(Path(metalcore.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), *names], check=True, env=env, timeout=600
    )


def check_exported(name: str, backend: bk.Backend, expected, folder: Path) -> None:
    """The fresh process's results for ``name`` against eager's, bit for bit."""
    if isinstance(expected, Exception):
        raise expected
    where = f"metalcore.{name} exported on {backend.name}"
    err = folder / f"{name}.err"
    if err.exists():
        raise Mismatch(f"{where}: {err.read_text()}")
    got = torch.load(folder / f"{name}.out.pt")
    if len(got) != len(expected):
        raise Mismatch(f"{where}: {len(got)} results, expected {len(expected)}")
    for i, (g, w) in enumerate(zip(got, expected)):
        if not _bitwise_same(g, w):
            raise Mismatch(f"{where}: result {i} differs from eager")


# --- Bad inputs --------------------------------------------------------------------------------


def raised(fn, *args, **kwargs) -> BaseException | None:
    """The exception ``fn(*args, **kwargs)`` raises, or None."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # every exception is data here
        return e
    return None


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def bad_input_skip(spec: OpSpec, backend: bk.Backend, bad: BadInput) -> str | None:
    """Why ``bad`` does not apply to ``backend`` as written, or None."""
    if backend.name == "cpu":
        return None
    if spec.name == "adamw" and bad.description == "negative lr":
        return (
            f"a {backend.name} lr tensor is read by the kernel on the device, so the host "
            "does not range-check it (msim's device is the CPU, so a CPU lr is one there)"
        )
    args, kwargs = bad.make()
    if backend.dispatch_key is None and any(
        t.device.type != "cpu" or t.layout != torch.strided for t in _tensors([args, kwargs])
    ):
        return (
            "the msim ops only have CPU-key kernels; routing other devices and layouts (meta, "
            "sparse) is the dispatcher's"
        )
    return None


def check_bad_input(spec: OpSpec, backend: bk.Backend, bad: BadInput) -> str | None:
    """``bad`` raises its exception type and message on ``backend``; off the CPU also the CPU's
    exact message (one set of checks for every backend), unless it names devices. Returns a
    reason when the backend rejects the input earlier by design (Metal: float64)."""
    args, kwargs = bad.make()
    mixed = any(t.device.type != "cpu" for t in _tensors([args, kwargs]))
    cpu_err = raised(spec.overload(), *args, **kwargs) if backend.name != "cpu" else None
    args, kwargs = bad.make()
    args, kwargs = bk.to_device(args, backend.device), bk.to_device(kwargs, backend.device)
    written = [t for i in spec.mutated_args if i < len(args) for t in _tensors(args[i])]
    before = [t.detach().clone() for t in written]
    err = raised(backend.call, spec, args, kwargs)
    where = f"metalcore.{spec.name} on {backend.name}: {bad.description}"
    if err is None:
        raise Mismatch(f"{where} was accepted")
    # A rejected call must not have written anything (a check after a partial update would
    # leave an optimizer half stepped).
    for t, b in zip(written, before):
        if t.layout == torch.strided and t.device.type != "meta" and not _bitwise_same(t, b):
            raise Mismatch(f"{where}: an argument was modified before the error")
    if "on the Metal backend" in str(err) and backend.dispatch_key in (None, "MPS"):
        return f"the Metal backend rejects this input earlier: {err}"
    if type(err) is not bad.error:
        raise Mismatch(
            f"{where}: raised {type(err).__name__}: {err}, expected {bad.error.__name__}"
        )
    if not re.search(bad.match, str(err)):
        raise Mismatch(f"{where}: message {str(err)!r} does not match {bad.match!r}")
    if cpu_err is not None and not mixed and str(err) != str(cpu_err):
        raise Mismatch(f"{where}: message {str(err)!r}, the CPU's is {str(cpu_err)!r}")
    return None
