"""Command line: ``python -m metalcore bench [options]`` runs the benchmark suite (bench/run.py of
a source checkout; see ``bench --help``)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("bench",):
        print("usage: python -m metalcore bench [--device cuda|mps|cpu] [--quick] [--ops ...]")
        return 2
    run = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    if not run.is_file():
        print("metalcore bench: bench/run.py not found; run it from a source checkout")
        return 1
    sys.argv = [str(run), *argv[1:]]
    runpy.run_path(str(run), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
