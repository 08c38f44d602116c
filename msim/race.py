"""Race mode: run one dispatch under ThreadSanitizer with fibers, in a child process.

TSan must be loaded before anything else (LD_PRELOAD), so the dispatch runs in a fresh Python
process; inputs and outputs travel through an .npz file. Only barriers, simd-group collectives,
atomics and the end of the dispatch order memory accesses, so TSan reports missing barriers
inside a threadgroup and unsynchronised device accesses across threadgroups, with .metal lines.
Keep threadgroups small (<= 224 threads): TSan tracks a limited number of concurrent fibers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .build import build, tsan_runtime
from .host import Buffer, Library, MetalError

MAX_RACE_THREADS = 224  # measured: races found at 224 threads per threadgroup, missed at 256
_SUMMARY = re.compile(r"SUMMARY: ThreadSanitizer: (.*)")


@dataclasses.dataclass
class RaceReport:
    races: list  # one "data race file:line:col in kernel" summary per report
    outputs: dict  # buffer index -> array after the dispatch
    log: str  # TSan's full output

    @property
    def clean(self) -> bool:
        return not self.races


def race_check(
    metal_files,
    name: str,
    args,
    threads_per_threadgroup,
    *,
    threadgroups=None,
    threads=None,
    tg_mem=None,
    include_dirs=(),
    defines=(),
    **options,
) -> RaceReport:
    """Like Library.dispatch, but under TSan; returns the races found (never raises for them)."""
    if int(np.prod(threads_per_threadgroup)) > MAX_RACE_THREADS:
        raise ValueError(
            f"race mode needs <= {MAX_RACE_THREADS} threads per threadgroup (TSan tracks a "
            "limited number of live fibers and silently misses races beyond that)"
        )
    lib = build(metal_files, include_dirs, mode="tsan", defines=defines)
    items = args.items() if isinstance(args, dict) else enumerate(args)
    arrays, scalars = {}, {}
    for index, arg in items:
        if isinstance(arg, Buffer):
            raise MetalError("race_check binds whole arrays; slice the array instead of Buffer()")
        if isinstance(arg, np.ndarray):
            arrays[f"a{index}"] = arg
        elif isinstance(arg, np.generic):
            arrays[f"s{index}"] = np.array(arg)
        else:
            scalars[str(index)] = arg
    spec = {
        "lib": str(lib),
        "name": name,
        "tpg": list(np.atleast_1d(threads_per_threadgroup)),
        "threadgroups": threadgroups and list(np.atleast_1d(threadgroups)),
        "threads": threads and list(np.atleast_1d(threads)),
        "tg_mem": {str(k): int(v) for k, v in (tg_mem or {}).items()},
        "scalars": scalars,
        "options": options,
    }
    with tempfile.TemporaryDirectory(prefix="msim-race-") as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, **arrays)
        (Path(tmp) / "spec.json").write_text(json.dumps(spec, default=int))
        env = dict(os.environ, LD_PRELOAD=tsan_runtime())
        opts = "halt_on_error=0 report_signal_unsafe=0"
        symbolizer = shutil.which("llvm-symbolizer-19")  # reports name .metal lines through it
        if symbolizer:
            opts += f" external_symbolizer_path={symbolizer}"
        env.setdefault("TSAN_OPTIONS", opts)
        proc = subprocess.run(
            [sys.executable, "-m", "msim.race", tmp],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode not in (0, 66):
            raise MetalError(f"race-mode dispatch of '{name}' failed:\n{log.strip()[-4000:]}")
        outputs = {int(k[1:]): v for k, v in np.load(out).items()} if out.exists() else {}
    return RaceReport(_SUMMARY.findall(log), outputs, log)


def _child(tmp: str) -> int:
    spec = json.loads((Path(tmp) / "spec.json").read_text())
    data = dict(np.load(Path(tmp) / "in.npz"))
    args = {int(k[1:]): (v if k[0] == "a" else v[()]) for k, v in data.items()}
    args.update({int(k): v for k, v in spec["scalars"].items()})
    lib = Library(spec["lib"])
    grid = (
        {"threadgroups": spec["threadgroups"]}
        if spec["threadgroups"]
        else {"threads": spec["threads"]}
    )
    try:
        lib.dispatch(
            spec["name"], args, spec["tpg"], tg_mem=spec["tg_mem"], **grid, **spec["options"]
        )
    except MetalError as e:
        print(e, file=sys.stderr)
        return 3
    np.savez(
        Path(tmp) / "out.npz",
        **{f"a{k}": v for k, v in args.items() if isinstance(v, np.ndarray) and v.ndim},
    )
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
