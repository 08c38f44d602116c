"""Fixtures for the Metal-path tests: the launch layer (csrc/*/<family>_launch.cpp) runs on CPU
tensors through msim, via the test-only ``metalcore_msim`` ops (csrc/mps/README.md), loaded by
the msim backend of metalcore.testing.backends (the op contract's msim device).

The kernel library is compiled from ``kernels/*.metal`` by msim (cached by content). Set
``METALCORE_REQUIRE_MSIM=1`` (CI does) to fail instead of skipping when msim cannot run here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metalcore.testing import backends as bk
from tests.support import REPO

KERNELS = REPO / "kernels"
REQUIRE = os.environ.get("METALCORE_REQUIRE_MSIM") == "1"


def _msim_ops_library() -> Path | None:
    return bk._msim_library()


def pytest_collection_modifyitems(config, items):
    reason = bk.msim_missing()
    if reason is None:
        return
    here = str(Path(__file__).parent)
    mine = [i for i in items if str(i.fspath).startswith(here)]
    if REQUIRE and mine:
        raise pytest.UsageError(f"METALCORE_REQUIRE_MSIM=1 but {reason}")
    for item in mine:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def msim_backend() -> bk.Backend:
    """The msim backend (the op contract's msim device): the Metal kernels, compiled by msim,
    behind the launch layer, with guard pages around every buffer."""
    reason = bk.load_msim()
    if reason:
        pytest.fail(reason)
    return bk.backend("msim")


@pytest.fixture(scope="session")
def mops(msim_backend):
    """torch.ops.metalcore_msim with the kernel library loaded."""
    return msim_backend.ops


@pytest.fixture
def max_threads(mops):
    """Lowers the threadgroup limit the launch layer sees (as a register-heavy Metal pipeline
    would), which moves every variant cutoff down to sizes msim runs quickly."""

    def set_limit(n: int) -> None:
        mops.set_option("max_threads", str(n))

    yield set_limit
    mops.set_option("max_threads", "1024")


# Other lane and threadgroup orders, with msim's uninitialised-threadgroup-memory check (each
# dispatch rerun with another poison byte): a kernel that depends on an order Metal does not
# guarantee, or reads a slot no thread wrote, fails under them.
SCHEDULES = {
    "reverse": {"lane_order": "reverse", "tg_order": "reverse", "uninit_check": "1"},
    "random": {"lane_order": "random", "tg_order": "random", "seed": "7", "uninit_check": "1"},
}
_SCHEDULE_DEFAULTS = {"lane_order": "forward", "tg_order": "forward", "uninit_check": "0"}


@pytest.fixture(params=list(SCHEDULES), ids=list(SCHEDULES))
def schedule(mops, request):
    """Runs the test under each of SCHEDULES, then restores msim's defaults."""
    try:
        for key, value in SCHEDULES[request.param].items():
            mops.set_option(key, value)
        yield request.param
    finally:
        for key, value in _SCHEDULE_DEFAULTS.items():
            mops.set_option(key, value)


def run_race_child(*argv: str) -> list[str]:
    """Runs ``python argv... <race-mode kernel library>`` in a fresh process under
    ThreadSanitizer (msim's race build: every threadgroup-memory access is instrumented), fails
    on any report, and returns the kernel host names the child dispatched (it prints them after
    ``dispatched:``)."""
    import subprocess
    import sys

    import msim

    lib = msim.build([KERNELS], include_dirs=[KERNELS], mode="tsan")
    env = dict(os.environ, LD_PRELOAD=msim.tsan_runtime())
    env["TSAN_OPTIONS"] = "halt_on_error=0 report_signal_unsafe=0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, *argv, str(lib)],
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
    return log.split("dispatched:", 1)[1].split()
