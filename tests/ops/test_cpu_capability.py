"""Every CPU capability build of the kernels (default, AVX2, AVX512) gives the same results.

Kernel files are compiled once per CPU capability and follow ATen's choice, which
ATEN_CPU_CAPABILITY overrides; this test runs fresh processes with it and compares outputs."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support import REPO

SCRIPT = textwrap.dedent(
    """
    import sys, torch, metalcore
    ops = torch.ops.metalcore
    torch.manual_seed(0)
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.randn(5, 3, 77, dtype=dt)
        w = torch.randn(77, dtype=dt)
        out[f"rms{dt}"] = ops.rmsnorm(x, w, 1e-6)
        out[f"rmsb{dt}"] = ops.rmsnorm_backward(x, x, w, 1e-6)
        out[f"add{dt}"] = ops.fused_add_rmsnorm(x, x, w, 1e-6)
        out[f"silu{dt}"] = ops.silu(x)
        out[f"gelu{dt}"] = ops.gelu(x, "tanh")
        out[f"swiglu_b{dt}"] = ops.swiglu_backward(x, x, x)
        # rope with q in HF's layout, partial rotary (36 of 40), both pairings.
        q = torch.randn(2, 9, 3, 40, dtype=dt).transpose(1, 2)
        k = torch.randn(2, 1, 9, 40, dtype=dt)
        cos, sin = torch.randn(9, 36, dtype=dt), torch.randn(9, 36, dtype=dt)
        for inter in (False, True):
            out[f"rope{dt}{inter}"] = ops.rope(q, k, cos, sin, inter)
            out[f"rope_b{dt}{inter}"] = ops.rope_backward(q, k, cos, sin, inter)
    torch.save(out, sys.argv[1])
    """
)


def _run(path, capability):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if capability is None:
        env.pop("ATEN_CPU_CAPABILITY", None)
    else:
        env["ATEN_CPU_CAPABILITY"] = capability
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=env, timeout=300)
    return torch.load(path)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The results of the build this machine picks, computed once for every capability."""
    return _run(tmp_path_factory.mktemp("native") / "native.pt", None)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_capability_builds_match_native(tmp_path, capability, native):
    other = _run(tmp_path / f"{capability}.pt", capability)
    assert native.keys() == other.keys()
    for key in native:
        # Vector math (exp, erf, tanh) differs in the last bits between builds: 16-bit outputs
        # may differ by one rounding step, float32/float64 only in the last bits.
        torch.testing.assert_close(native[key], other[key], msg=key)
