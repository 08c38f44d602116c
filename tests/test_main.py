"""``python -m metalcore``: runs end to end on CPU and writes a report with content."""

import os
import platform
import re
import subprocess
import sys

import pytest

from metalcore import __main__ as cli
from tests.support import REPO


def test_main_command_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "metalcore", "--device", "cpu", "--out", str(out), "--steps", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "self-check [" in proc.stdout and "final loss" in proc.stdout
    report = (out / "report.md").read_text()
    for heading in ("# metalcore report", "## Self-check", "## Benchmark", "## Training"):
        assert heading in report
    assert "device: **cpu**" in report
    assert "| FAIL |" not in report
    rows = re.findall(r"^\| (\w+) \| .* \| (ok|n/a|FAIL) \|", report, flags=re.M)
    assert {op for op, _ in rows} >= {
        "rmsnorm",
        "fused_add_rmsnorm",
        "silu",
        "gelu",
        "swiglu",
        "rope",
        "adamw",
    }
    assert all(status == "ok" for op, status in rows if op in ("rmsnorm", "swiglu", "gelu"))
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert "CPU timings keep freed memory in the process" in report
    bench_ops = re.findall(r"^\| (\w+) \| \S+ \| float32 \|", report, flags=re.M)
    assert "rmsnorm" in bench_ops and "swiglu" in bench_ops
    losses = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", report, flags=re.M)
    assert losses[0][0] == "1" and losses[-1][0] == "8"
    assert float(losses[-1][1]) < float(losses[0][1])  # it trains
    assert abs(float(losses[-1][1]) - float(losses[-1][2])) < 1e-3  # and matches PyTorch
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").stat().st_size > 1000 and "![loss curves](loss.png)" in report


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rc = cli.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "3", "--no-bench"])
    assert rc == 0
    report = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in report and not (tmp_path / "loss.png").exists()
    assert "skipped (--no-bench)" in report


def test_failed_self_check_gives_exit_status_1(tmp_path, monkeypatch):
    # A kernel returning wrong values must fail the self-check, not pass it.
    monkeypatch.setattr(cli.mf, "silu", lambda x: x)
    rc = cli.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "2", "--no-bench"])
    assert rc == 1
    assert "| silu | silu forward | FAIL |" in (tmp_path / "report.md").read_text()


def test_device_detection():
    assert cli.detect_device("cpu").type == "cpu"
    assert cli.detect_device("auto").type in ("cpu", "cuda", "mps")
