"""``python -m metalcore``: runs end to end on CPU and writes a report with content."""

import ast
import os
import platform
import re
import subprocess
import sys

# The test extra installs matplotlib: the report's plots are tested, never skipped.
import matplotlib  # noqa: F401
import torch

from metalcore import __main__ as cli
from metalcore.testing import backends, op_specs
from tests.support import REPO


def test_main_command_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "report"
    # --no-compile: inductor would add about 20 CPU-seconds; the compiled column has its own test.
    args = ["--device", "cpu", "--out", str(out), "--steps", "8", "--no-compile"]
    proc = subprocess.run(
        [sys.executable, "-m", "metalcore", *args],
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
    assert re.search(r"^- machine: CPU .+ \(\d+ threads?, \w+\), torch ", report, flags=re.M)
    # The self-check is the specs': one row per op of the registry, each with samples checked.
    rows = re.findall(r"^\| (\w+) \| (\d+) \| ([\w, ]*) \| (ok|n/a|FAIL) \|", report, flags=re.M)
    assert {op for op, *_ in rows} == set(op_specs.SPECS)
    assert all(status == "ok" and int(n) > 0 for _, n, _, status in rows), rows
    assert "| FAIL |" not in report
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert "CPU timings keep freed memory in the process" in report
    # The benchmark: every op against eager PyTorch (adamw: also AdamW(fused=True)).
    bench = re.findall(
        r"^\| (\w+) \| [^|]+ \| float32 \| ([\d.]+) \| ([\d.]+) \| ([\d.—]+) \| ", report, re.M
    )
    assert {op for op, *_ in bench} == set(BENCH_OPS)
    assert [c for op, _, _, c in bench if op == "adamw"] != ["—"]
    losses = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", report, flags=re.M)
    assert losses[0][0] == "1" and losses[-1][0] == "8"
    assert float(losses[-1][1]) < float(losses[0][1])  # it trains
    assert abs(float(losses[-1][1]) - float(losses[-1][2])) < 1e-3  # and matches PyTorch
    for png in ("loss.png", "speedup.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in report


def test_without_matplotlib_the_plots_are_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rc = cli.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "3", "--no-bench"])
    assert rc == 0
    report = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in report and not (tmp_path / "loss.png").exists()
    assert "skipped (--no-bench)" in report


def test_failed_self_check_gives_exit_status_1(tmp_path, monkeypatch):
    # A kernel returning wrong values must fail the self-check, not pass it.
    call = backends.Backend.call

    def wrong_silu(self, spec, args, kwargs):
        out = call(self, spec, args, kwargs)
        return out * 1.01 if spec.name == "silu" else out

    monkeypatch.setattr(backends.Backend, "call", wrong_silu)
    rc = cli.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "2", "--no-bench"])
    assert rc == 1
    report = (tmp_path / "report.md").read_text()
    assert re.search(r"^\| silu \| 0 \| .* \| FAIL \| Mismatch: metalcore.silu", report, re.M)
    assert re.search(r"^\| silu_backward \| [1-9]\d* \| .* \| ok \|", report, re.M)


BENCH_OPS = ("rmsnorm", "fused_add_rmsnorm", "silu", "gelu", "swiglu", "rope", "adamw")


def test_benchmark_times_every_op_against_eager_and_compiled_baselines(monkeypatch):
    # The compiled baselines through dynamo's eager backend: the plumbing without inductor's
    # C++ compile time (the main command uses the default backend). gelu's compile fails, as
    # inductor does on a machine without a C++ compiler: a note in its row, not a crash.
    def compiled(fn):
        if fn is torch.nn.functional.gelu:

            def broken(*args):
                raise RuntimeError("no C++ compiler found")

            return broken
        return torch.compile(fn, backend="eager", dynamic=False)

    monkeypatch.setattr(cli.h, "compiled", compiled)
    rows, source = cli.run_benchmarks(cli.detect_device("cpu"), full=False, shapes=[(64, 256)])
    assert [r.op for r in rows] == list(BENCH_OPS)
    for r in rows:
        assert r.ms["metalcore"] > 0 and r.ms["eager"] > 0 and r.speedup("eager") > 0
        if r.op == "gelu":
            assert r.ms["compile"] is None and r.speedup("compile") is None
            assert r.notes == ["compile failed: RuntimeError: no C++ compiler found"]
        else:
            assert r.ms["compile"] > 0 and r.speedup("compile") > 0 and not r.notes, r
    assert "fused=True" in rows[-1].baselines and "metalcore.testing.bench" in source


def _synthetic_rows():
    row = cli.BenchRow
    return [
        row("rmsnorm", "2048x1024", "float32", {"metalcore": 1.0, "eager": 4.0, "compile": 1.1}),
        row("gelu", "512x2048", "float32", {"metalcore": 2.0, "eager": 0.84, "compile": 2.5}),
        row("silu", "512x2048", "float32", {"metalcore": 1.0, "eager": 0.996, "compile": None}),
    ]


def test_report_names_every_op_slower_than_pytorch_and_hides_no_row(tmp_path):
    train = cli.TrainResult(4, [3.0, 2.5, 2.0, 1.5], [3.0, 2.5, 2.0 + 2.4e-7, 1.5])
    bench = _synthetic_rows()
    plots = cli.write_plots(train, bench, tmp_path, "CPU test (2 threads, AVX2), torch x")
    assert plots == ["loss.png", "speedup.png"]
    cpu = cli.detect_device("cpu")
    path = cli.write_report(tmp_path, cpu, "CPU", [], bench, "synthetic", train, plots, None, 1)
    report = path.read_text()
    assert len(re.findall(r"^\| (rmsnorm|gelu|silu) \| ", report, re.M)) == 3  # none hidden
    assert "| **0.42x** |" in report  # gelu vs eager, in bold
    assert "Where metalcore is slower on this machine" in report
    assert "gelu at 512x2048 float32: 0.42x of eager PyTorch" in report
    assert "rmsnorm at" not in report.split("Where metalcore is slower")[1].split("\n")[0]
    # 0.996 prints as 1.00x: even, not flagged
    assert "silu at" not in report and "| 1.00x |" in report
    assert "![speed-up per op](speedup.png)" in report
    assert "![loss curves and their difference](loss.png)" in report


def test_report_says_so_when_nothing_is_slower(tmp_path):
    train = cli.TrainResult(2, [3.0, 2.0], [3.0, 2.0])
    bench = _synthetic_rows()[:1]
    bench[0].ms["compile"] = 1.5
    path = cli.write_report(
        tmp_path, cli.detect_device("cpu"), "CPU", [], bench, "synthetic", train, [], "n", 1
    )
    assert "at least as fast as every PyTorch baseline" in path.read_text()


def test_bench_subcommand_points_to_the_suite_of_a_source_checkout(capsys):
    assert cli.main(["bench", "--device", "cpu"]) == 2
    assert "python bench/run.py --device cpu" in capsys.readouterr().err


def test_the_package_imports_nothing_from_the_source_tree():
    # `bench/` and `tests/` are not installed: the main command must not reach for them.
    for path in (REPO / "metalcore").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("bench", "tests"), (path, name)
        assert 'importlib.import_module("bench' not in path.read_text(), path


def test_device_detection():
    assert cli.detect_device("cpu").type == "cpu"
    assert cli.detect_device("auto").type in ("cpu", "cuda", "mps")
