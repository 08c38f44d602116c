"""msim on its own: the package installs from msim/ without metalcore and runs from any folder,
a missing or old clang is a clear error, and a dispatch can be described in a JSON file."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from msim_paths import KERNELS, REPO_ROOT

import msim

BUILD = sys.modules["msim.build"]  # the module (the package re-exports build() over its name)
EXAMPLES = REPO_ROOT / "msim" / "examples"


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    # pip builds the wheel as `pip install ./msim` would (setuptools from the package index).
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
        + [str(REPO_ROOT / "msim")],
        capture_output=True,
        text=True,
    )
    for leftover in ("build", "msim.egg-info"):  # setuptools builds in the source tree
        shutil.rmtree(REPO_ROOT / "msim" / leftover, ignore_errors=True)
    if built.returncode:
        pytest.skip(f"pip cannot build the msim wheel here: {built.stderr.strip()[-300:]}")
    (wheel,) = wheels.glob("msim-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "msim = msim.__main__:main" in z.read(entry).decode()
        z.extractall(site)
    for needed in ("msim/include/metal_stdlib", "msim/runtime/scheduler.cpp", "msim/spec.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "msim/tests/")) for n in names)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(EXAMPLES / "saxpy.metal", work)
    shutil.copy(EXAMPLES / "saxpy.json", work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MSIM_BUILD_DIR")}
    env.update(PYTHONPATH=str(site), MSIM_BUILD_DIR=str(tmp_path / "cache"))
    run = subprocess.run(
        [sys.executable, "-m", "msim", "run", "--spec", "saxpy.json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "buffer(1): float32[16] first [1.0, 3.5, 6.0, 8.5]" in run.stdout
    assert (
        str(site)
        in subprocess.run(
            [sys.executable, "-c", "import msim; print(msim.__file__)"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    )


def test_missing_clang_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MSIM_CLANG", raising=False)
    monkeypatch.setattr(BUILD.shutil, "which", lambda name: None)
    with pytest.raises(msim.BuildError, match=r"msim needs clang 19 .*apt-get install clang-19"):
        BUILD.clang()


def test_old_clang_is_a_clear_error(monkeypatch, tmp_path):
    fake = tmp_path / "clang++"
    fake.write_text("#!/bin/sh\necho 'Debian clang version 14.0.6'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MSIM_CLANG", str(fake))
    with pytest.raises(msim.BuildError, match=r"needs clang 17 or newer .* is clang 14"):
        BUILD.clang()


def test_doctor_lists_the_toolchain():
    out = subprocess.run(
        [sys.executable, "-m", "msim", "doctor"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for what in ("clang++", "Boost.Context", "compiler-rt", "objdump"):
        assert what in out.stdout
    assert "msim doctor: ready" in out.stdout


def _run_spec(tmp_path, spec: dict, name="spec.json"):
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return subprocess.run(
        [sys.executable, "-m", "msim", "run", "--spec", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )


def test_json_dispatch_with_a_struct_save_and_check(tmp_path):
    inc = KERNELS / "include"
    spec = {
        "source": str(inc / "scale.metal"),
        "include": [str(inc)],
        "kernel": "scale_params",
        "threads": [130],
        "threads_per_threadgroup": [64],
        "buffers": {
            "0": {"dtype": "float32", "shape": [130], "fill": "arange"},
            "1": {"dtype": "float32", "shape": [130], "fill": "zeros"},
            "2": {"struct": [["n", "uint32", 130], ["alpha", "float32", 2.0], ["beta", "f4", 0.5]]},
        },
        "save": {"1": "y.npy"},
    }
    out = _run_spec(tmp_path, spec)
    assert out.returncode == 0, out.stderr
    x = np.arange(130, dtype=np.float32)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), 2 * x + 0.5 + np.arange(130) // 64)
    spec["check"] = {"1": {"npy": "y.npy"}}
    spec["buffers"]["2"]["struct"][1][2] = 3.0  # a different alpha fails the check
    out = _run_spec(tmp_path, spec, "bad.json")
    assert out.returncode == 1 and "check of buffer(1) failed" in out.stderr


@pytest.mark.parametrize(
    "spec,error",
    [
        ({"kernel": "k", "threads": [1], "threads_per_threadgroup": [1]}, "missing 'source'"),
        (
            {"source": "a.metal", "kernel": "k", "threads_per_threadgroup": [1]},
            "exactly one of 'threads' and 'threadgroups'",
        ),
        (
            {"source": "a", "kernel": "k", "threads": [1], "threads_per_threadgroup": [1], "x": 1},
            r"unknown key\(s\) \['x'\]",
        ),
    ],
)
def test_json_dispatch_errors_name_the_key(tmp_path, spec, error):
    out = _run_spec(tmp_path, spec)
    assert out.returncode == 1
    assert re.search(error, out.stderr), out.stderr


def test_readme_examples_run():
    # The commands msim/README.md shows, on the example that ships with msim.
    for cmd in (
        ["run", "msim/examples/saxpy.metal", "saxpy", "--threads", "1000", "--tg", "64"]
        + ["--set", "3=2.5"],
        ["run", "--spec", "msim/examples/saxpy.json"],
        ["list", "msim/examples/saxpy.metal"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "msim", *cmd], cwd=REPO_ROOT, capture_output=True, text=True
        )
        assert out.returncode == 0, (cmd, out.stderr)
