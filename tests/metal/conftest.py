"""Fixtures for the Metal-path tests: the launch layer (csrc/*/<family>_launch.cpp) runs on CPU
tensors through msim, via the test-only ``metalcore_msim`` ops (csrc/mps/README.md).

The kernel library is compiled from ``kernels/*.metal`` by msim (cached by content). Set
``METALCORE_REQUIRE_MSIM=1`` (CI does) to fail instead of skipping when msim cannot run here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.support import REPO

KERNELS = REPO / "kernels"
REQUIRE = os.environ.get("METALCORE_REQUIRE_MSIM") == "1"


def _msim_ops_library() -> Path | None:
    from metalcore import _library

    for folder in {p.parent for p in _library._candidates()}:
        path = folder / "libmetalcore_msim_ops.so"
        if path.is_file():
            return path
    return None


def _unavailable() -> str | None:
    if importlib.util.find_spec("msim") is None:
        return "msim is not importable"
    if not (shutil.which("clang++-19") or shutil.which("clang++")):
        return "msim needs clang-19"
    if _msim_ops_library() is None:
        return "libmetalcore_msim_ops was not built (needs msim/include at build time)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _unavailable()
    if reason is None:
        return
    here = str(Path(__file__).parent)
    mine = [i for i in items if str(i.fspath).startswith(here)]
    if REQUIRE and mine:
        raise pytest.UsageError(f"METALCORE_REQUIRE_MSIM=1 but {reason}")
    for item in mine:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kernel_library() -> Path:
    import msim

    return msim.build([KERNELS], include_dirs=[KERNELS])


@pytest.fixture(scope="session")
def mops(kernel_library):
    """torch.ops.metalcore_msim with the kernel library loaded."""
    torch.ops.load_library(str(_msim_ops_library()))
    ops = torch.ops.metalcore_msim
    ops.load_kernels(str(kernel_library))
    # Bounds checking: buffers sit next to guard pages, so an out-of-range access faults.
    ops.set_option("guard", "1")
    return ops


@pytest.fixture
def max_threads(mops):
    """Lowers the threadgroup limit the launch layer sees (as a register-heavy Metal pipeline
    would), which moves every variant cutoff down to sizes msim runs quickly."""

    def set_limit(n: int) -> None:
        mops.set_option("max_threads", str(n))

    yield set_limit
    mops.set_option("max_threads", "1024")
