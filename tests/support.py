"""Helpers shared by the op tests: tolerances, strided inputs, compile and export checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Per-dtype tolerances for outputs compared against a float64 reference computed from the same
# (low-precision) inputs: one rounding of the output plus fp32 accumulation.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, dtype=None, **overrides):
    tol = dict(TOL[dtype or actual.dtype])
    tol.update({k: v for k, v in overrides.items() if v is not None})
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


def make_layout(t: torch.Tensor, layout: str, device=None) -> torch.Tensor:
    """Same values as ``t`` in another memory layout: 'contiguous', 'offset' (a view with a
    storage offset), 'transposed' (non-contiguous, leading dims swapped) or 'strided' (every
    other element of the last dim); on ``device`` (default: t's)."""
    device = t.device if device is None else torch.device(device)
    t = t.to(device)
    if layout == "contiguous":
        return t.contiguous()
    if layout == "offset":
        buf = torch.empty(t.numel() + 7, dtype=t.dtype, device=device)
        v = buf[7:].view(t.shape)
        v.copy_(t)
        return v
    if layout == "transposed":
        if t.dim() < 2:
            return t
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":
        big = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=device)
        v = big[..., ::2]
        v.copy_(t)
        return v
    raise ValueError(layout)


LAYOUTS = ["contiguous", "offset", "transposed", "strided"]


def check_compile_no_recompile(fn, make_args, sizes):
    """Compiles ``fn`` (fullgraph, dynamic) on the first size and asserts that the others run
    without recompiling and match eager."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    first = make_args(sizes[0])
    torch.testing.assert_close(compiled(*first), fn(*first))
    with torch.compiler.set_stance("fail_on_recompile"):
        for s in sizes[1:]:
            args = make_args(s)
            torch.testing.assert_close(compiled(*args), fn(*args))


def export_roundtrip(module, args, dynamic_shapes, other_args, tmp_path, expect_ops):
    """torch.export with dynamic shapes -> save -> load in a fresh process (only `import
    metalcore`) -> run on ``other_args`` -> compare with eager. Also checks that the metalcore ops
    survive run_decompositions()."""
    ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    decomposed = ep.run_decompositions()
    targets = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    for op in expect_ops:
        assert any(op in t for t in targets), f"{op} missing after run_decompositions: {targets}"
    pt2 = tmp_path / "model.pt2"
    torch.export.save(ep, pt2)
    inputs = tmp_path / "inputs.pt"
    outputs = tmp_path / "outputs.pt"
    torch.save(other_args, inputs)
    script = textwrap.dedent(
        f"""
        import torch, metalcore
        ep = torch.export.load({str(pt2)!r})
        args = torch.load({str(inputs)!r})
        torch.save(ep.module()(*args), {str(outputs)!r})
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    loaded_out = torch.load(outputs)
    torch.testing.assert_close(loaded_out, module(*other_args))


def raised(fn, *args, **kwargs) -> BaseException | None:
    """The exception ``fn(*args, **kwargs)`` raises, or None (for comparing backends' errors)."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # every exception is data here
        return e
    return None


def tensors_in(obj):
    """Every tensor in nested lists, tuples and dict values."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors_in(o)
