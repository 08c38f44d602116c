"""Race mode: every kernel that uses threadgroup memory runs through the launch layer under
ThreadSanitizer (msim's race build), and TSan must report nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO

from .conftest import KERNELS

# Kernels with threadgroup memory (two-level reductions): all in kernels/rmsnorm.metal.
RACE_KERNELS = [
    f"rmsnorm_{variant}{width}"
    for variant in ("single", "looped", "bwd_single", "bwd_looped")
    for width in ("", "_vec4")
]


def test_threadgroup_kernels_are_race_free(mops):
    import msim

    lib = msim.build([KERNELS], include_dirs=[KERNELS], mode="tsan")
    env = dict(os.environ, LD_PRELOAD=msim.tsan_runtime())
    env["TSAN_OPTIONS"] = "halt_on_error=0 report_signal_unsafe=0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.metal.race_child", str(lib)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert "ThreadSanitizer" not in log, log[-6000:]
    assert proc.returncode == 0, log[-6000:]
    dispatched = log.split("dispatched:", 1)[1].split()
    for kernel in RACE_KERNELS:
        for dtype in ("float32", "float16", "bfloat16"):
            assert f"{kernel}_{dtype}" in dispatched
