"""msim command line.

python -m msim check kernels/ -I kernels          # strict address-space compile of every .metal
python -m msim list kernels/rmsnorm.metal -I kernels
python -m msim run msim/examples/saxpy.metal saxpy --threads 1000 --tg 64 --set 3=2.5
python -m msim run --spec msim/examples/saxpy.json  # a dispatch described in JSON (msim/spec.py)
python -m msim run ... --race                      # same, under ThreadSanitizer
python -m msim coverage kernels/ cov.txt           # fail if a host name was never dispatched
python -m msim doctor                              # is every tool msim needs installed?
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import spec as S
from .host import _NP_TYPES, Library, MetalError

B = importlib.import_module("msim.build")  # the package re-exports build() over the module name

_RACE_ENV = "MSIM_RACE_CHILD"


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _cmd_check(args) -> int:
    files = B.check(args.paths, args.include, args.define, mode=args.mode)
    what = "strict address-space mode" if args.mode == "strict" else "default mode (syntax only)"
    print(f"msim check: {len(files)} file(s) compile in {what}")
    return 0


def _cmd_build(args) -> int:
    print(B.build(args.paths, args.include, mode=args.mode, defines=args.define))
    return 0


def _cmd_list(args) -> int:
    lib = Library(B.build(args.paths, args.include, defines=args.define))
    for k in lib.kernels.values():
        print(f"{k.location}: {k.signature()}")
    return 0


def _random_args(lib: Library, name: str, n: int, sets: dict[int, str], rng, constants) -> dict:
    args = {}
    for p in lib.kernels[name].params:
        if p.kind != "buffer" or (p.cond and not constants.get(int(p.cond))):
            continue
        idx = int(p.index)
        base = p.type.replace("*", " ").replace("&", " ").split()[-1]
        width = int(base[-1]) if base[-1] in "234" and base.rstrip("234") in _NP_TYPES else 1
        np_type = _NP_TYPES.get(p.scalar) or np.uint16  # bfloat: raw bits
        if idx in sets:
            args[idx] = np.array(float(sets[idx])).astype(np_type)
        elif p.is_pointer:
            if np.issubdtype(np_type, np.floating):
                args[idx] = rng.standard_normal(n * width).astype(np_type)
            else:
                args[idx] = rng.integers(0, 16, n * width).astype(np_type)
        elif np_type is not None and width == 1:
            args[idx] = np_type(n)  # scalar constants default to the element count
        else:
            raise MetalError(f"give --set {idx}=VALUE for '{p.type} {p.name}'")
    return args


def _print_buffers(buffers: dict) -> None:
    for idx, buf in sorted(buffers.items()):
        if isinstance(buf, np.ndarray) and buf.size > 1:
            print(f"  buffer({idx}): {buf.dtype}[{buf.size}] first {buf.reshape(-1)[:4].tolist()}")


def _cmd_run(args) -> int:
    mode = "tsan" if args.race else "default"
    if args.spec:
        if args.file or args.kernel:
            raise S.SpecError("give either --spec or FILE KERNEL, not both")
        spec, base = S.load(args.spec)
        lib_path = S.library_path(spec, base, mode)
    elif not (args.file and args.kernel):
        raise S.SpecError("msim run needs FILE KERNEL or --spec FILE.json")
    else:
        lib_path = B.build([args.file], args.include, mode=mode, defines=args.define)
    if args.race and os.environ.get(_RACE_ENV) != "1":
        env = dict(os.environ, LD_PRELOAD=B.tsan_runtime(), **{_RACE_ENV: "1"})
        symbolizer = shutil.which("llvm-symbolizer-19")
        env.setdefault(
            "TSAN_OPTIONS",
            "exitcode=66" + (f" external_symbolizer_path={symbolizer}" if symbolizer else ""),
        )
        return subprocess.run(
            [sys.executable, "-m", "msim", *args.argv], env=env, check=False
        ).returncode
    lib = Library(lib_path)
    if args.spec:
        t0 = time.perf_counter()
        buffers = S.run(spec, base, lib)
        dt = time.perf_counter() - t0
        print(f"msim run: {spec['kernel']} ok in {dt * 1e3:.1f} ms")
        _print_buffers(buffers)
        return 0
    sets = dict(s.split("=", 1) for s in args.set)
    tg_mem = {int(k): int(v) for k, v in (s.split("=", 1) for s in args.tg_mem)}
    constants = {int(k): float(v) for k, v in (s.split("=", 1) for s in args.fc)}
    buffers = _random_args(
        lib,
        args.kernel,
        args.n,
        {int(k): v for k, v in sets.items()},
        np.random.default_rng(args.seed),
        constants,
    )
    grid = (
        {"threads": _dims(args.threads)}
        if args.threads
        else {"threadgroups": _dims(args.threadgroups or "1")}
    )
    t0 = time.perf_counter()
    lib.dispatch(
        args.kernel,
        buffers,
        _dims(args.tg),
        lane_order=args.lane_order,
        tg_mem=tg_mem,
        constants=constants,
        **grid,
    )
    dt = time.perf_counter() - t0
    print(f"msim run: {args.kernel} ok in {dt * 1e3:.1f} ms")
    _print_buffers(buffers)
    return 0


def _cmd_doctor(args) -> int:
    report = B.toolchain_report()
    for what, ok, detail in report:
        print(f"{'ok ' if ok else 'MISSING'} {what}: {detail}")
    required = [r for r in report if "optional" not in r[0] and "race mode" not in r[0]]
    missing = [r for r in required if not r[1]]
    print("msim doctor: " + ("ready" if not missing else f"{len(missing)} requirement(s) missing"))
    return 1 if missing else 0


def _cmd_coverage(args) -> int:
    lib = Library(B.build(args.kernels, args.include, defines=args.define))
    seen: set[str] = set()
    for f in args.files:
        seen |= set(Path(f).read_text().split())
    missing = sorted(set(lib.kernels) - seen)
    for name in missing:
        print(f"{lib.kernels[name].location}: kernel '{name}' was never dispatched by the tests")
    print(f"msim coverage: {len(lib.kernels) - len(missing)}/{len(lib.kernels)} host names run")
    return 1 if missing else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m msim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("-I", "--include", action="append", default=[], help="include directory")
        p.add_argument("-D", "--define", action="append", default=[], help="preprocessor define")

    p = sub.add_parser("check", help="strict address-space compile check (CI lint)")
    p.add_argument("paths", nargs="+")
    p.add_argument(
        "--mode",
        default="strict",
        choices=["strict", "syntax"],
        help="strict: address spaces kept apart (default); syntax: what `build` compiles",
    )
    common(p)
    p = sub.add_parser("build", help="build (cached) and print the kernel library path")
    p.add_argument("paths", nargs="+")
    p.add_argument("--mode", default="default", choices=["default", "tsan"])
    common(p)
    p = sub.add_parser("list", help="list host names and their signatures")
    p.add_argument("paths", nargs="+")
    common(p)
    p = sub.add_parser("run", help="run one kernel on random inputs, or a JSON-described dispatch")
    p.add_argument("file", nargs="?")
    p.add_argument("kernel", nargs="?")
    p.add_argument("--spec", help="a JSON file describing the dispatch (see msim/spec.py)")
    p.add_argument("--threads", help="dispatch_threads grid, e.g. 1000 or 64,64")
    p.add_argument("--threadgroups", help="dispatch_threadgroups grid (default 1)")
    p.add_argument("--tg", default="64", help="threads per threadgroup, e.g. 256 or 16,16")
    p.add_argument("--n", type=int, default=1024, help="elements per buffer")
    p.add_argument("--set", action="append", default=[], help="INDEX=VALUE for a constant")
    p.add_argument("--tg-mem", action="append", default=[], help="INDEX=BYTES for [[threadgroup]]")
    p.add_argument("--fc", action="append", default=[], help="INDEX=VALUE function constant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lane-order", default="forward", choices=["forward", "reverse", "random"])
    p.add_argument(
        "--race", action="store_true", help="run under ThreadSanitizer (exit 66 on race)"
    )
    common(p)
    sub.add_parser("doctor", help="check that clang, Boost.Context and the other tools exist")
    p = sub.add_parser("coverage", help="fail when a kernel was never dispatched")
    p.add_argument("kernels", nargs="+", help="a .metal folder, then coverage files")
    common(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    args.argv = argv  # race mode reruns the same command under ThreadSanitizer
    if args.cmd == "coverage":
        args.files = [a for a in args.kernels if not a.endswith(".metal") and Path(a).is_file()]
        args.kernels = [a for a in args.kernels if a not in args.files]
    handlers = {
        "build": _cmd_build,
        "check": _cmd_check,
        "list": _cmd_list,
        "run": _cmd_run,
        "coverage": _cmd_coverage,
        "doctor": _cmd_doctor,
    }
    try:
        return handlers[args.cmd](args)
    except (B.BuildError, MetalError, S.SpecError) as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
