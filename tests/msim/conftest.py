"""Shared fixtures for msim tests: the test-kernel library is built once per session (cached)."""

import shutil

import pytest
from msim_paths import KERNELS

import msim

HAVE_CLANG = bool(shutil.which("clang++-19") or shutil.which("clang++"))


def pytest_configure(config):
    config.addinivalue_line("markers", "msim: runs Metal kernels under msim (needs clang-19)")
    config.addinivalue_line("markers", "msim_race: msim race mode (ThreadSanitizer child process)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="msim needs clang-19 (apt-get install clang-19)")
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        if "tests/msim/" not in path:
            continue
        item.add_marker(pytest.mark.msim)
        if path.endswith("test_race.py"):
            item.add_marker(pytest.mark.msim_race)
        if not HAVE_CLANG:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lib():
    """All well-formed test kernels in one library."""
    return msim.load(sorted(KERNELS.glob("*.metal")))


@pytest.fixture(scope="session")
def bugs():
    """Deliberately broken kernels and their fixed twins."""
    return msim.load([KERNELS / "bugs" / "bugs.metal"])
