"""Helpers shared by the tests: tolerances from the one table, seeded values, the fresh-process
export round trip of whole models. The per-op checks themselves are metalcore.testing.engine's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from metalcore.testing.op_specs import tolerance

REPO = Path(__file__).resolve().parent.parent


def _two_implementations(dtype: torch.dtype) -> dict:
    # Two implementations that each round once from float32 (float64) math, like rmsnorm and
    # torch.nn.RMSNorm, are at most twice the table's single-result tolerance apart.
    t = 2 * tolerance(dtype, 3).rtol
    return dict(rtol=t, atol=t)


# torch.testing.assert_close tolerances for comparing metalcore with another implementation of
# the same function (derived from metalcore.testing.op_specs.ROUNDING, the one table).
TOL = {
    dt: _two_implementations(dt)
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}


def seeded(*shape, dtype=torch.float32, seed=0, scale=1.0, device="cpu") -> torch.Tensor:
    """Reproducible normal values (no test draws unseeded values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def run_examples(request, count: int, body) -> None:
    """Runs ``body(data)`` (data: hypothesis' ``st.data()``) for ``count`` examples, a count a
    test may choose per device; the example database is keyed by the calling test's id, so a
    saved failure replays for the op and device it came from."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    runner = settings(max_examples=count)(given(data=st.data())(body))
    # What hypothesis' pytest plugin does for a parametrized module-level @given test.
    runner.hypothesis.inner_test._hypothesis_internal_add_digest = request.node.nodeid.encode()
    runner()


def runs_op(device, op: str) -> None:
    """Skips the calling test when ``device`` has no kernel for ``op``."""
    import pytest

    why = device.op_unavailable(op)
    if why:
        pytest.skip(why)


def export_roundtrip(module, args, dynamic_shapes, other_args, tmp_path, expect_ops):
    """torch.export with dynamic shapes -> save -> load in a fresh process (only `import
    metalcore`) -> run on ``other_args`` -> compare with eager. Also checks that the metalcore ops
    survive run_decompositions(). For whole models; single ops are the op contract's
    (metalcore.testing.engine)."""
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
