"""The plain C ABI works from gcc-compiled code (the op layer's msim encoder), and coverage of
dispatched host names reaches the file CI unions."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from msim_paths import KERNELS, REPO_ROOT

import msim

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_c_abi_from_gcc(tmp_path, lib, bugs):
    exe = tmp_path / "host_abi_check"
    inc = REPO_ROOT / "msim" / "include"
    subprocess.run(
        [
            "gcc",
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{inc}",
            str(HERE / "host_abi_check.c"),
            "-o",
            str(exe),
            "-ldl",
            "-lm",
        ],
        check=True,
    )
    # The header is also valid C++ for g++ (the op layer is C++).
    subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Werror",
            "-x",
            "c++",
            f"-I{inc}",
            str(HERE / "host_abi_check.c"),
        ],
        check=True,
    )
    cov = tmp_path / "coverage.txt"
    env = dict(os.environ, MSIM_COVERAGE_FILE=str(cov))
    out = subprocess.run(
        [str(exe), str(lib.path), str(bugs.path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "host ABI ok" in out.stdout
    # Each library appends the names it ran when it unloads; CI unions these files.
    assert sorted(cov.read_text().split()) == ["oob_bug", "silu_float"]


def test_coverage_cli_fails_on_undispatched_kernels(tmp_path, lib):
    x = np.zeros(4, np.float32)
    lib.dispatch("silu_float", [x, x.copy(), 4], (4,), threads=(4,))
    assert "silu_float" in lib.coverage()
    cov = tmp_path / "cov.txt"
    # Only this dispatch counts: other tests in this process share the library's coverage.
    cov.write_text("silu_float\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "msim", "coverage", str(KERNELS / "elementwise.metal"), str(cov)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert out.returncode == 1
    assert "kernel 'silu_half' was never dispatched" in out.stdout
    every = msim.load([KERNELS / "elementwise.metal"]).kernels
    cov.write_text("\n".join(every) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "msim", "coverage", str(KERNELS / "elementwise.metal"), str(cov)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_list_and_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "msim"]
    out = subprocess.run(
        [*cmd, "list", str(KERNELS / "rmsnorm.metal")],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert (
        out.returncode == 0 and "rmsnorm_bfloat(device const bfloat * x [[buffer(0)]]" in out.stdout
    )
    out = subprocess.run(
        [
            *cmd,
            "run",
            str(KERNELS / "rmsnorm.metal"),
            "rmsnorm_half",
            "--threadgroups",
            "2",
            "--tg",
            "64",
            "--n",
            "256",
            "--set",
            "3=128",
            "--set",
            "4=1e-6",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "rmsnorm_half ok" in out.stdout
    out = subprocess.run(
        [*cmd, "check", str(KERNELS)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert out.returncode == 0 and "compile in strict address-space mode" in out.stdout
