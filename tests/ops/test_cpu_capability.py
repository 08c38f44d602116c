"""The portable (non-AVX2) build of every CPU kernel gives the same results as the AVX2 one.

Kernel files are compiled once per CPU capability; ATEN_CPU_CAPABILITY=default selects the
portable build, so this test runs a fresh process with it and compares outputs."""

import os
import subprocess
import sys
import textwrap

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


def test_default_capability_matches_native(tmp_path):
    native = _run(tmp_path / "native.pt", None)
    portable = _run(tmp_path / "portable.pt", "default")
    assert native.keys() == portable.keys()
    for key in native:
        # Vector math functions (exp, erf, tanh) differ in the last bits between builds.
        torch.testing.assert_close(native[key], portable[key], rtol=2e-6, atol=2e-6, msg=key)
