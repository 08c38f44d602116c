"""Mutation check of the test suite: plants plausible bugs one at a time and runs the tests that
should catch each.

    python scripts/mutate.py              # every mutant (C++ ones rebuild: about a minute each)
    python scripts/mutate.py --only rmsnorm-cpu-drops-eps --only wrapper-swiglu-swaps-arguments
    python scripts/mutate.py --list

Works on a scratch copy of the tree (the tracked and untracked files of this checkout, in a
temporary folder unless --scratch names one), built once with CMake + Ninja (ccache makes the
rebuild after a C++ mutant about a minute). For each mutant: the edit is applied (its text must
occur exactly once, or the mutant is reported as stale), the copy is rebuilt if a C++ source
changed, the mutant's tests run, and the edit is undone. A mutant is caught when its tests fail.
Prints one line per mutant and exits non-zero if any was missed or no longer applies. Not part
of CI: run it after changing the test engine or adding an op family, and add mutants for the
new family here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = "build-mutate"


@dataclass
class Mutant:
    name: str
    path: str  # relative to the repository root
    find: str  # must occur exactly once
    replace: str
    tests: list[str]  # pytest arguments selecting the tests that should catch it
    why: str  # the bug it stands for

    @property
    def native(self) -> bool:
        return Path(self.path).suffix in (".cpp", ".h", ".cu", ".cuh", ".mm")


FUZZ = "tests/reliability/test_fuzz.py"
CONTRACT = "tests/ops/test_contract.py"

MUTANTS = [
    Mutant(
        "rmsnorm-cpu-drops-eps",
        "csrc/rmsnorm/rmsnorm_cpu_kernel.cpp",
        "std::sqrt(ss / static_cast<acc_t>(n) + eps)",
        "std::sqrt(ss / static_cast<acc_t>(n))",
        [FUZZ, "-k", "float64_reference and cpu-rmsnorm]", "tests/ops/test_rmsnorm.py"],
        "the forward kernel forgets eps (caught before only by the module tests)",
    ),
    Mutant(
        "rmsnorm-cpu-leaves-row-tail",
        "csrc/rmsnorm/rmsnorm_cpu_kernel.cpp",
        "        store_chunk(yr + j, y, c);\n      }\n    }\n  });",
        "        if (c == C) store_chunk(yr + j, y, c);\n      }\n    }\n  });",
        [FUZZ, "-k", "float64_reference and (cpu-rmsnorm] or cpu-fused_add_rmsnorm])"],
        "the last partial vector of each row is never written",
    ),
    Mutant(
        "rope-backward-wrong-sin-index",
        "csrc/rope/rope_cpu_kernel.cpp",
        "b[i] = transpose ? sp : -sj;",
        "b[i] = transpose ? sj : -sj;",
        [FUZZ, "-k", "float64_reference and cpu-rope_backward", "tests/ops/test_rope.py"],
        "the transposed map takes sin of the wrong pair element (equal in HF tables)",
    ),
    Mutant(
        "gelu-tanh-coefficient-typo",
        "csrc/activation/activation_cpu_kernel.cpp",
        "constexpr double kTanhCoef = 0.044715;",
        "constexpr double kTanhCoef = 0.04715;",
        [FUZZ, "-k", "float64_reference and cpu-gelu"],
        "a mistyped constant of the tanh approximation",
    ),
    Mutant(
        "adamw-bias-correction-from-beta1",
        "csrc/adamw/adamw_cpu.cpp",
        "const double bias_correction2 = 1.0 - std::pow(beta2, step);",
        "const double bias_correction2 = 1.0 - std::pow(beta1, step);",
        [FUZZ, "-k", "float64_reference and cpu-adamw"],
        "a copy-pasted bias correction",
    ),
    Mutant(
        "swiglu-autograd-swaps-gradients",
        "csrc/activation/activation_autograd.cpp",
        "return {grad_gate, grad_up};",
        "return {grad_up, grad_gate};",
        [CONTRACT, "-k", "cpu and swiglu and (gradients or gradcheck)"],
        "autograd hands each input the other's gradient",
    ),
    Mutant(
        "metal-silu-backward-drops-a-term",
        "kernels/activation.metal",
        "return g * s * (1.0f + x * (1.0f - s));",
        "return g * s * (1.0f + x * s);",
        [FUZZ, "-k", "float64_reference and msim-silu_backward", "tests/metal/test_activation.py"],
        "a Metal kernel's derivative with a wrong term (run by msim)",
    ),
    Mutant(
        "fake-rmsnorm-backward-grad-weight-shape",
        "metalcore/_fakes.py",
        "n = input.shape[-1] if weight is not None else 0",
        "n = input.shape[-1]",
        [CONTRACT, "-k", "cpu-rmsnorm_backward and (opcheck or compile or export)"],
        "the fake's grad_weight shape differs from the kernel's without a weight",
    ),
    Mutant(
        "fake-silu-specializes-sizes",
        "metalcore/_fakes.py",
        '@register_fake("metalcore::silu")\ndef _silu(input):\n'
        "    return input.new_empty(input.shape)",
        '@register_fake("metalcore::silu")\ndef _silu(input):\n'
        "    return input.new_empty([int(s) for s in input.shape])",
        [CONTRACT, "-k", "cpu-silu] and (compile or export)"],
        "the fake turns symbolic sizes into constants: a new size recompiles",
    ),
    Mutant(
        "wrapper-swiglu-swaps-arguments",
        "metalcore/functional.py",
        "return _ops.swiglu(gate, up)",
        "return _ops.swiglu(up, gate)",
        ["tests/ops/test_activation.py"],
        "the Python wrapper passes its arguments in the wrong order",
    ),
    Mutant(
        "wrapper-gelu-default-tanh",
        "metalcore/functional.py",
        'def gelu(input: Tensor, approximate: str = "none")',
        'def gelu(input: Tensor, approximate: str = "tanh")',
        ["tests/ops/test_activation.py"],
        "the wrapper's default differs from torch.nn.functional.gelu's",
    ),
]


def run(cmd, cwd, env=None, log=None) -> int:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    return out.returncode


def copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def build(scratch: Path, log: Path) -> bool:
    # Paths under the scratch folder hash as relative ones, so ccache reuses objects across
    # scratch copies and the rebuild after undoing a mutant is a cache hit.
    env = dict(os.environ, CCACHE_BASEDIR=str(scratch))
    if not (scratch / BUILD / "build.ninja").exists():
        cmake = [
            "cmake", "-S", ".", "-B", BUILD, "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]  # fmt: skip
        if shutil.which("ccache"):
            cmake.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
        if run(cmake, scratch, env=env, log=log):
            return False
    return run(["ninja", "-C", BUILD], scratch, env=env, log=log) == 0


def first_failure(log: str) -> str:
    for line in log.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line.split(" - ")[0]
    return log.strip().splitlines()[-1] if log.strip() else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--scratch", type=Path, help="scratch folder (kept; reused if it exists)")
    a = p.parse_args(argv)

    if a.list:
        for m in MUTANTS:
            print(f"{m.name:40s} {m.path}: {m.why}")
        return 0
    chosen = [m for m in MUTANTS if not a.only or m.name in a.only]
    unknown = set(a.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {sorted(unknown)}")
        return 2

    scratch = a.scratch or Path(tempfile.mkdtemp(prefix="metalcore-mutate-"))
    scratch.mkdir(parents=True, exist_ok=True)
    logs = scratch / "mutate-logs"
    logs.mkdir(exist_ok=True)
    copy_tree(scratch)
    print(f"scratch copy: {scratch}", flush=True)
    if not build(scratch, logs / "build.log"):
        print(f"the unmodified copy does not build: {logs / 'build.log'}")
        return 2
    env = dict(os.environ, PYTHONPATH=str(scratch), METALCORE_REQUIRE_MSIM="1")
    env.pop("METALCORE_LIBRARY", None)

    results = []
    for m in chosen:
        t0 = time.perf_counter()
        path = scratch / m.path
        original = path.read_text()
        if original.count(m.find) != 1:
            results.append((m, "STALE", f"the text to mutate occurs {original.count(m.find)}x"))
            print(f"{m.name}: STALE", flush=True)
            continue
        path.write_text(original.replace(m.find, m.replace))
        try:
            log = logs / f"{m.name}.log"
            if m.native and not build(scratch, log):
                results.append((m, "CAUGHT", "by the build"))
            else:
                cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
                rc = run(cmd + m.tests, scratch, env=env, log=log)
                text = log.read_text()
                if rc == 0:
                    results.append((m, "MISSED", "every test passed"))
                elif rc in (1, 3):  # tests failed / an internal error from the planted bug
                    results.append((m, "CAUGHT", first_failure(text)))
                else:
                    results.append((m, "ERROR", f"pytest exit {rc}: {first_failure(text)}"))
        finally:
            path.write_text(original)
        print(f"{m.name}: {results[-1][1]} ({time.perf_counter() - t0:.0f}s)", flush=True)

    print()
    width = max(len(m.name) for m, _, _ in results)
    for m, verdict, detail in results:
        print(f"{verdict:7s} {m.name:{width}s}  {detail}")
    caught = sum(v == "CAUGHT" for _, v, _ in results)
    print(f"\n{caught} of {len(results)} mutants caught (logs: {logs})")
    if not a.scratch:
        print(f"scratch copy kept for inspection: {scratch}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
