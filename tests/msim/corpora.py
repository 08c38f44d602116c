"""Third-party Metal corpora for msim's tests, fetched from the package index at test time.

Nothing of them enters the repository: pip downloads a pinned release (hash-checked) into a
cache folder and only the Metal sources are extracted.

* llama.cpp's ggml-metal kernels, from the `llama-cpp-python` source distribution
  (`vendor/llama.cpp/ggml/src/`: `ggml-metal/kernels/*.metal`, `ggml-metal-impl.h`,
  `ggml-common.h`);
* MLX's kernel headers, from the `mlx-metal` wheel (a macOS wheel; pip downloads it from Linux
  with `--platform`).

Environment: MSIM_CORPORA_CACHE (default ~/.cache/metalcore-msim-corpora) is the cache folder;
METALCORE_REQUIRE_CORPORA=1 turns "cannot download" skips into failures; MSIM_CORPORA_FULL=1
makes the tests compile every file instead of the quick subset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

REQUIRE = os.environ.get("METALCORE_REQUIRE_CORPORA") == "1"
FULL = os.environ.get("MSIM_CORPORA_FULL") == "1"


@dataclasses.dataclass(frozen=True)
class Corpus:
    package: str
    version: str
    sha256: str
    pip_args: tuple[str, ...]  # how to download exactly this archive
    select: tuple[str, ...]  # the parts of the archive to extract (folders or files in it)
    strip: str  # leading part of the archive paths dropped when extracting

    @property
    def folder(self) -> Path:
        return cache_root() / f"{self.package}-{self.version}"


LLAMA_CPP = Corpus(
    "llama-cpp-python",
    "0.3.36",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    ("--no-binary=:all:",),
    (
        "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-metal/",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-common.h",
    ),
    "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/",
)
MLX = Corpus(
    "mlx-metal",
    "0.32.4",
    "8019b2db622599267d66cc168b2f0dbf5af929790a6c3b3913e00eabc42a7947",
    ("--only-binary=:all:", "--platform", "macosx_14_0_arm64"),
    ("mlx/include/mlx/backend/metal/kernels/",),
    "mlx/include/",  # MLX's headers include each other as "mlx/backend/metal/kernels/..."
)


def cache_root() -> Path:
    default = Path.home() / ".cache" / "metalcore-msim-corpora"
    return Path(os.environ.get("MSIM_CORPORA_CACHE") or default).expanduser()


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:  # parallel test workers fetch once
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(corpus: Corpus, into: Path) -> Path:
    req = into / "requirements.txt"
    req.write_text(f"{corpus.package}=={corpus.version} --hash=sha256:{corpus.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-q"]
    cmd += [*corpus.pip_args, "-r", str(req), "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    archives = [p for p in into.iterdir() if p.suffix in (".gz", ".whl")]
    if proc.returncode or len(archives) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip download of {corpus.package}=={corpus.version} failed: {tail}")
    return archives[0]


def _extract(corpus: Corpus, archive: Path, dest: Path) -> None:
    def target(name: str) -> Path | None:
        if not name.startswith(corpus.select) or name.endswith("/"):
            return None
        rel = Path(name[len(corpus.strip) :])
        if rel.is_absolute() or ".." in rel.parts:
            raise RuntimeError(f"unsafe path {name!r} in {archive.name}")
        return dest / rel

    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                out = target(name)
                if out:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                out = target(m.name)
                if out and m.isfile():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(t.extractfile(m).read())


def fetch(corpus: Corpus) -> Path:
    """The corpus folder, downloading and extracting it once; raises RuntimeError if impossible."""
    done = corpus.folder / ".complete"
    if done.exists():
        return corpus.folder
    with _lock(cache_root() / f".{corpus.package}.lock"):
        if done.exists():
            return corpus.folder
        with tempfile.TemporaryDirectory(prefix="msim-corpus-") as tmp:
            archive = _download(corpus, Path(tmp))
            staging = corpus.folder.with_name(corpus.folder.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            _extract(corpus, archive, staging)
            if not any(staging.rglob("*")):
                raise RuntimeError(f"{archive.name} holds nothing under {corpus.select}")
            shutil.rmtree(corpus.folder, ignore_errors=True)
            staging.rename(corpus.folder)
            (corpus.folder / ".complete").write_text(f"{archive.name} sha256:{corpus.sha256}\n")
    return corpus.folder


def require(corpus: Corpus) -> Path:
    """fetch(), or skip the test with the reason (fail under METALCORE_REQUIRE_CORPORA=1)."""
    try:
        return fetch(corpus)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        msg = f"cannot fetch the {corpus.package} {corpus.version} corpus: {e}"
        if REQUIRE:
            pytest.fail(msg + " (METALCORE_REQUIRE_CORPORA=1)")
        pytest.skip(msg)
