"""Compiles the CUDA backend without a GPU or a CUDA build of torch: every CUDA source the build
compiles (the file patterns of METALCORE_CUDA_SOURCES in CMakeLists.txt), .cu files with nvcc for
one architecture (ptxas runs, so kernel resource use is checked too) and the host .cpp files with
the C++ compiler. CI has nvcc but no GPU; this keeps the CUDA kernels compiling between GPU runs.

    python scripts/cuda_compile_check.py [--arch 90] [--jobs 2]

Exits 0 with a note when nvcc is absent; 1 on any compile error or warning. Prints each kernel
that spills registers (not an error: a few fp64 instantiations spill a little).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cuda_sources() -> list[str]:
    """What the CUDA build compiles: the files matching the glob patterns of
    METALCORE_CUDA_SOURCES in CMakeLists.txt (csrc/<family>/<family>_cuda.cu and _cuda.cpp), read
    from there so the two cannot disagree."""
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"file\(GLOB METALCORE_CUDA_SOURCES CONFIGURE_DEPENDS\s+(.*?)\)", text, re.S)
    if not m:
        raise SystemExit("cuda_compile_check: no METALCORE_CUDA_SOURCES glob in CMakeLists.txt")
    found = {p.relative_to(ROOT).as_posix() for pat in m.group(1).split() for p in ROOT.glob(pat)}
    if not found:
        raise SystemExit(f"cuda_compile_check: no file matches {m.group(1).split()}")
    return sorted(found)


def include_flags(stub_dir: Path) -> list[str]:
    import torch

    inc = Path(torch.__file__).parent / "include"
    # A CPU build of torch ships the c10/cuda headers but not the header its CUDA build
    # generates; the stub says what that header says for a shared-library build.
    stub = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [
        f"-I{ROOT / 'csrc'}",
        f"-I{ROOT}",
        f"-I{stub_dir}",
        "-isystem",
        str(inc),
        "-isystem",
        str(inc / "torch" / "csrc" / "api" / "include"),
        "-isystem",
        sysconfig.get_paths()["include"],
    ]


def toolkit_includes(nvcc: str) -> list[str]:
    """The CUDA toolkit's include directories, as nvcc itself passes them (its dry run prints
    them; the toolkit layout differs between installs)."""
    r = subprocess.run(
        [nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True
    )
    dirs = re.findall(r'-I"?([^"\s]+)', r.stdout + r.stderr)
    dirs += re.findall(r'"-isystem" "([^"]+)"', r.stdout + r.stderr)
    return list(dict.fromkeys(dirs))


def compile_one(src: str, nvcc: str, arch: str, incs: list[str], out: Path) -> tuple[str, int, str]:
    obj = out / (src.replace("/", "_") + ".o")
    if src.endswith(".cu"):
        # The flags of CMakeLists.txt's CUDA target, for one architecture.
        cmd = [nvcc, "-c", "-std=c++17", "--expt-relaxed-constexpr", "-diag-suppress=3306"]
        cmd += [
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xptxas",
            "-v",
            "-Werror",
            "all-warnings",
        ]
    else:
        cxx = os.environ.get("CXX", "c++")
        cmd = [cxx, "-c", "-std=c++17", "-fPIC", "-Wall", "-Werror", "-DMETALCORE_WITH_CUDA"]
        cmd += [f"-isystem{d}" for d in toolkit_includes(nvcc)]
    cmd += incs + ["-o", str(obj), str(ROOT / src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return src, r.returncode, r.stdout + r.stderr


def spills(log: str) -> list[str]:
    """'kernel: N bytes spill stores' for each kernel ptxas reports spilling."""
    found, kernel = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and int(m.group(1)) > 0 and kernel:
            found.append(f"{kernel}: {m.group(1)} bytes spill stores")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="90", help="compute capability without the dot")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("cuda_compile_check: no nvcc on PATH; CUDA sources not compiled")
        return 0
    srcs = cuda_sources()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        incs = include_flags(tmp / "include")
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda s: compile_one(s, nvcc, args.arch, incs, tmp), srcs))
    failed = 0
    for src, rc, log in results:
        if rc != 0:
            failed += 1
            print(f"FAILED {src}\n{log[-6000:]}")
            continue
        found = spills(log)
        note = f" ({len(found)} kernels spill registers)" if found else ""
        print(f"ok     {src}{note}")
        for s in found:
            name = subprocess.run(["c++filt", s.split(":")[0]], capture_output=True, text=True)
            print(f"         {(name.stdout.strip() or s)[:140]}: {s.split(': ')[1]}")
    ok = len(srcs) - failed
    print(f"cuda_compile_check: {ok}/{len(srcs)} CUDA sources compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
