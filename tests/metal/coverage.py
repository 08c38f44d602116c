"""msim coverage gate, hooked into the root tests/conftest.py (the controlling pytest-xdist
process never collects tests/metal, so its own conftest would not run there).

Every process that ran Metal-path tests appends the host names it compiled and dispatched to a
file shared by the run; with ``METALCORE_REQUIRE_COVERAGE=1`` the controlling process fails the
run unless every host name compiled from kernels/ was dispatched (through the launch layer).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from tests.support import REPO

_RUN_VAR = "METALCORE_MSIM_COVERAGE_RUN"


def pytest_configure(config):
    # Set before pytest-xdist starts its workers, which inherit the environment.
    if not hasattr(config, "workerinput"):
        os.environ.setdefault(_RUN_VAR, uuid.uuid4().hex)


def _coverage_file() -> Path:
    run = os.environ.get(_RUN_VAR) or f"pid{os.getpid()}"
    return REPO / "build" / "msim-coverage" / f"{run}.txt"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("METALCORE_REQUIRE_COVERAGE") != "1":
        return
    path = _coverage_file()
    try:
        ops = torch.ops.metalcore_msim
        lines = [f"compiled {n}" for n in ops.library_kernel_names()]
        lines += [f"dispatched {n}" for n in ops.dispatched_kernel_names()]
    except (AttributeError, RuntimeError):
        lines = []  # the Metal-path tests did not run in this process
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("\n".join(lines) + "\n")
    if hasattr(session.config, "workerinput"):
        return  # the controlling process checks the union of every worker's names
    seen = path.read_text().split("\n") if path.exists() else []
    path.unlink(missing_ok=True)
    compiled = {ln.split()[1] for ln in seen if ln.startswith("compiled ")}
    dispatched = {ln.split()[1] for ln in seen if ln.startswith("dispatched ")}
    missing = sorted(compiled - dispatched)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not compiled:
        reporter.write_line("msim coverage: no Metal-path tests ran", red=True)
        session.exitstatus = 1
    elif missing:
        reporter.write_line(
            f"msim coverage: {len(missing)} host name(s) never dispatched: {', '.join(missing)}",
            red=True,
        )
        session.exitstatus = 1
    else:
        reporter.write_line(f"msim coverage: all {len(compiled)} host names dispatched")
