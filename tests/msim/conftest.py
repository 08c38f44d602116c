"""Shared fixtures for msim tests: the test-kernel library is built once per session (cached)."""

import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS = Path(__file__).resolve().parent / "kernels"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import msim

HAVE_CLANG = bool(shutil.which("clang++-19") or shutil.which("clang++"))


def pytest_collection_modifyitems(config, items):
    if HAVE_CLANG:
        return
    skip = pytest.mark.skip(reason="msim needs clang-19 (apt-get install clang-19)")
    for item in items:
        if "tests/msim" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lib():
    """All well-formed test kernels in one library."""
    return msim.load(sorted(KERNELS.glob("*.metal")))


@pytest.fixture(scope="session")
def bugs():
    """Deliberately broken kernels and their fixed twins."""
    return msim.load([KERNELS / "bugs" / "bugs.metal"])
