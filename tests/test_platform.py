"""Packaging and platform checks that need no build: the wheel's torch requirement (through
scikit-build-core's own metadata hook), the import-time torch check, and the macOS workflow's
invariants (every step fails on failure, Metal flags agree with the CMake build)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalcore import _library
from tests.support import REPO

_spec = importlib.util.spec_from_file_location("torch_pin", REPO / "cmake" / "torch_pin.py")
torch_pin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_pin)

WORKFLOW = REPO / ".github" / "workflows" / "macos-mps.yml"
RUNNING_MINOR = ".".join(torch.__version__.split(".")[:2])


# --- the wheel's torch requirement ------------------------------------------------------------


def test_wheel_metadata_requires_the_building_torch_minor(tmp_path):
    # scikit-build-core's PEP 517 hook, as pip calls it before building a wheel (no compile).
    pytest.importorskip("scikit_build_core")
    code = (
        "import sys\n"
        "from scikit_build_core import build\n"
        "print(build.prepare_metadata_for_build_wheel(sys.argv[1]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    dist_info = out.stdout.strip().splitlines()[-1]
    metadata = (tmp_path / dist_info / "METADATA").read_text()
    torch_lines = [ln for ln in metadata.splitlines() if ln.startswith("Requires-Dist: torch")]
    assert torch_lines == [f"Requires-Dist: torch=={RUNNING_MINOR}.*"]


def test_sdist_keeps_the_range_and_marks_it_dynamic():
    provider = torch_pin.TorchRequirement()
    provider.build_state("sdist")
    assert provider.dynamic_metadata({}, {}) == {"dependencies": ["torch>=2.11"]}
    assert provider.dynamic_wheel({}) == {"dependencies": True}


@pytest.mark.parametrize("state", ["wheel", "editable", "metadata_wheel", "metadata_editable"])
def test_every_binary_build_pins_the_minor(state):
    provider = torch_pin.TorchRequirement()
    provider.build_state(state)
    assert provider.dynamic_metadata({}, {}) == {"dependencies": [f"torch=={RUNNING_MINOR}.*"]}


def test_build_without_torch_says_how_to_build(tmp_path):
    # An isolated build environment has no torch: the provider stops with the right command.
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        f"sys.path.insert(0, {str(REPO / 'cmake')!r})\n"
        "import torch_pin\n"
        "torch_pin.TorchRequirement().dynamic_metadata({}, {})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "RuntimeError: metalcore: the build compiles against the torch installed" in out.stderr
    assert "--no-build-isolation" in out.stderr


def test_build_against_a_torch_older_than_the_floor_is_refused(monkeypatch):
    monkeypatch.setattr(torch_pin, "building_torch_version", lambda: "2.10.1+cpu")
    with pytest.raises(RuntimeError, match=r"needs torch>=2\.11, .* has torch 2\.10\.1\+cpu"):
        torch_pin.TorchRequirement().dynamic_metadata({}, {})


# --- the import-time torch check --------------------------------------------------------------


def _fake_library(folder: Path, built: str | None) -> Path:
    lib = folder / "libmetalcore_ops.so"
    lib.write_bytes(b"")  # never loaded: the check runs before the library is
    if built is not None:
        (folder / _library.BUILD_RECORD).write_text(json.dumps({"torch_version": built}))
    return lib


@pytest.mark.parametrize("built", ["2.12.0+cpu", "3.13.0", "2.1.0"])
def test_other_torch_minor_is_an_import_error_naming_both(tmp_path, built):
    lib = _fake_library(tmp_path, built)
    with pytest.raises(ImportError) as info:
        _library.check_torch_version(lib, running="2.13.0+cpu")
    message = str(info.value)
    assert f"built against torch {built}, but this process runs torch 2.13.0+cpu" in message
    assert str(lib) in message
    assert "pip install --no-build-isolation -e ." in message


@pytest.mark.parametrize("built", ["2.13.0+cpu", "2.13.1", "2.13.0+cu128", "2.13.0a0+git1234"])
def test_same_torch_minor_loads(tmp_path, built):
    _library.check_torch_version(_fake_library(tmp_path, built), running="2.13.0+cpu")


def test_library_without_a_record_is_not_checked(tmp_path):
    _library.check_torch_version(_fake_library(tmp_path, None), running="2.13.0")


def test_unreadable_record_is_an_import_error(tmp_path):
    lib = _fake_library(tmp_path, None)
    (tmp_path / _library.BUILD_RECORD).write_text("{not json")
    with pytest.raises(ImportError, match="cannot read the build record"):
        _library.check_torch_version(lib, running="2.13.0")


def test_import_metalcore_refuses_a_library_built_for_another_torch(tmp_path):
    # The real library under a faked record, picked through METALCORE_LIBRARY: `import metalcore`
    # must fail with the check's message before the library is loaded.
    lib = tmp_path / _library.library_path().name
    os.symlink(_library.library_path(), lib)
    (tmp_path / _library.BUILD_RECORD).write_text(json.dumps({"torch_version": "2.99.0"}))
    env = dict(os.environ, METALCORE_LIBRARY=str(lib), PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", "import metalcore"], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "ImportError: metalcore: the native library" in out.stderr
    assert f"built against torch 2.99.0, but this process runs torch {torch.__version__}" in (
        out.stderr
    )


def test_the_loaded_library_records_the_running_torch():
    record = _library.library_path().with_name(_library.BUILD_RECORD)
    if not record.is_file():
        pytest.skip(f"{record} is missing (a library built before build records existed)")
    assert json.loads(record.read_text()) == {"torch_version": torch.__version__}


# --- the macOS workflow -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workflow():
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(workflow):
    for name, job in workflow["jobs"].items():
        for step in job["steps"]:
            yield name, step


def test_workflow_runs_every_step_with_pipefail(workflow):
    # An explicit `shell: bash` is `bash --noprofile --norc -eo pipefail {0}` on GitHub's runners;
    # without it a step runs `bash -e {0}`, where `cmd | tee log` hides cmd's failure.
    assert workflow["defaults"]["run"]["shell"] == "bash"
    for job in workflow["jobs"].values():
        assert job.get("defaults", {}).get("run", {}).get("shell", "bash") == "bash"
    for _, step in _steps(workflow):
        assert step.get("shell", "bash") == "bash", step


def test_workflow_uploads_fail_when_files_are_missing(workflow):
    uploads = [s for _, s in _steps(workflow) if s.get("uses", "").startswith("actions/upload-")]
    assert uploads
    for step in uploads:
        assert step["with"]["if-no-files-found"] == "error", step


def test_workflow_metal_flags_match_the_cmake_build(workflow):
    text = (REPO / "cmake" / "metal.cmake").read_text()
    m = re.search(r"set\(METALCORE_METAL_FLAGS(.*?)\)", text, re.S)
    cmake_flags = [f for f in m.group(1).split() if not f.startswith(("-I", "${"))]
    assert workflow["env"]["METAL_FLAGS"].split() == cmake_flags


def test_hosted_job_compiles_loads_builds_and_tests_without_a_self_hosted_runner(workflow):
    hosted = workflow["jobs"]["hosted"]
    assert hosted["runs-on"] in ("macos-14", "macos-15")  # GitHub's Apple-silicon images
    runs = "\n".join(step.get("run", "") for step in hosted["steps"])
    assert "for src in kernels/*.metal" in runs and "xcrun -sdk macosx metal" in runs
    assert "metallib_check.swift" in runs
    assert "pip wheel --no-build-isolation --no-deps" in runs
    assert "import metalcore" in runs
    assert "pytest tests/ops" in runs
    gpu = workflow["jobs"]["mps-tests"]
    assert "self-hosted" in gpu["runs-on"]
    assert "vars.METALCORE_MPS_RUNNER" in gpu["if"]


def test_workflow_passes_actionlint():
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (scripts/setup.sh installs it)")
    out = subprocess.run([actionlint, str(WORKFLOW)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
