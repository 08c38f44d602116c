"""Runs the metalcore benchmark suite on one device and writes JSON (+ PNG).

python bench/run.py --device cuda --out bench/results/h100.json
python bench/run.py --device cpu --quick --ops rmsnorm,activation

The timing machinery is the package's (metalcore.testing.bench), shared with python -m metalcore.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Every family's benchmark is a bench_<family>.py beside this file that defines run(suite) (the
# msim benchmark is a script of its own): the first four in the order the report shows them,
# then any other family by name.
_FIRST = ("rmsnorm", "activation", "rope", "adamw")
_FOUND = sorted(
    p.stem.removeprefix("bench_")
    for p in HERE.glob("bench_*.py")
    if "\ndef run(suite" in p.read_text()
)
OPS = tuple(o for o in _FIRST if o in _FOUND) + tuple(o for o in _FOUND if o not in _FIRST)


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "mps", "cpu"), default=None)
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    ap.add_argument("--quick", action="store_true", help="smaller shapes, shorter repetitions")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (PNG written beside it)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from metalcore.testing import bench as h

    device = args.device or default_device()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(ops) - set(OPS)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    if device == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    torch.manual_seed(0)
    t0 = time.time()
    out = args.out or HERE / "results" / f"{device}.json"
    png = None if args.no_plot else out.with_suffix(".png")
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    suite = h.Suite(device, args.quick)
    print(
        f"device {suite.env.get('device')} | torch {suite.env['torch']} | triton "
        f"{suite.env['triton']} | copy ceiling {suite.copy_gbps:.0f} GB/s"
    )
    for op in ops:
        mod = __import__(f"bench_{op}")
        print(f"[{op}]")
        try:
            mod.run(suite)
        except Exception as e:  # noqa: BLE001  (keep the other ops' results)
            import traceback

            traceback.print_exc()
            suite.add(
                h.Row(
                    op,
                    "-",
                    "-",
                    "-",
                    "-",
                    None,
                    None,
                    None,
                    None,
                    note=f"suite failed: {type(e).__name__}: {e}",
                )
            )
        if device == "cuda":
            torch.cuda.empty_cache()
        suite.write(out, None, command)  # partial results survive an interrupted run
    suite.write(out, png, command)
    print(f"wrote {out}" + (f" and {png}" if png else "") + f" in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
