import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings

import metalcore  # noqa: F401  (registers the ops)
from metalcore.testing import backends as bk
from tests.metal import coverage

pytest_sessionfinish = coverage.pytest_sessionfinish  # the msim coverage gate

# Hypothesis profiles: "ci" keeps the suite within its time budget on 2 cores; "long" is the
# on-demand fuzz profile (METALCORE_HYPOTHESIS_PROFILE=long).
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
    print_blob=True,
)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=300)
settings.load_profile(os.environ.get("METALCORE_HYPOTHESIS_PROFILE", "ci"))


# --- The device fixture ------------------------------------------------------------------------

# Every backend of metalcore.testing.backends; METALCORE_TEST_DEVICES=cuda,cpu narrows a run.
DEVICES = [b.name for b in bk.BACKENDS]
if os.environ.get("METALCORE_TEST_DEVICES"):
    _wanted = os.environ["METALCORE_TEST_DEVICES"].split(",")
    DEVICES = [d for d in DEVICES if d in _wanted]
# CI sets these so that a device it expects to run cannot silently skip.
REQUIRED = {
    "msim": os.environ.get("METALCORE_REQUIRE_MSIM") == "1",
    "cuda": os.environ.get("METALCORE_REQUIRE_CUDA") == "1",
    "mps": os.environ.get("METALCORE_REQUIRE_MPS") == "1",
}


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> bk.Backend:
    """One backend per parameter (cpu, msim, cuda, mps); unavailable ones skip with what they
    need, or fail where METALCORE_REQUIRE_<DEVICE>=1."""
    backend = bk.backend(request.param)
    why = backend.unavailable()
    if why:
        if REQUIRED.get(backend.name):
            pytest.fail(f"METALCORE_REQUIRE_{backend.name.upper()}=1 but it {why}")
        pytest.skip(why)
    return backend


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()


# --- A quiet test log: skipped tests as groups -------------------------------------------------

# Skips whose reason starts with one of these are counted per group instead of listed.
SKIP_GROUPS = {
    "needs CUDA": "CUDA (an NVIDIA GPU)",
    "needs an Apple GPU": "an Apple GPU (MPS)",
    "needs msim": "msim (clang-19 and the simulator op library)",
}


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    coverage.pytest_configure(config)
    # -ra lists every skip location; unless skips were asked for explicitly (-rs), the summary
    # below reports them as groups.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and "s" not in config.option.reportchars.replace("a", ""):
        reporter.reportchars = reporter.reportchars.replace("s", "")
        config._metalcore_group_skips = True


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not getattr(config, "_metalcore_group_skips", False):
        return
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    groups: Counter[str] = Counter()
    others: Counter[str] = Counter()
    for report in skipped:
        reason = _skip_reason(report)
        group = next((g for prefix, g in SKIP_GROUPS.items() if reason.startswith(prefix)), None)
        if group:
            groups[group] += 1
        else:
            where = report.location[0] if report.location else "?"
            others[f"{where}: {reason}"] += 1
    terminalreporter.write_sep("=", "skipped (-rs lists every test)", cyan=True)
    for group, n in groups.most_common():
        terminalreporter.write_line(f"{n} tests need {group}, which this machine lacks")
    for reason, n in sorted(others.items()):
        terminalreporter.write_line(f"[{n}] {reason}")
