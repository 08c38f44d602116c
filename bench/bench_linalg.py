"""Batched linear algebra: metalcore.linalg vs torch.linalg eager and torch.compile of it.

CPU cases are the issue's: 4096 matrices of 32 x 32 (SVD, eigh, QR, Cholesky, LU, solve,
triangular solve with 32 right-hand sides), plus 512 of 64 x 64. torch.linalg on CPU factors a
batch one matrix after another; metalcore splits it across threads and runs its own kernels for
small matrices (Golub-Kahan SVD, tridiagonal QL eigh, Householder QR, unblocked LU). Bytes
are the input and output sizes (these ops are compute bound, so the GB/s column only says how
far from memory speed they are).

    PYTHONPATH=. python bench/bench_linalg.py [--quick] [--ops svd,eigh]
"""

from __future__ import annotations

import argparse

import torch

from metalcore import linalg as ml
from metalcore.testing import bench as h


def cases(device: str, quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(1024, 32)]
    return [(4096, 32), (512, 64)]


def _inputs(batch: int, n: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    spd = (M @ M.mT / n + torch.eye(n, dtype=torch.float64)).to(device, dtype)
    sym = (M + M.mT).to(device, dtype)
    A = M.to(device, dtype)
    L = torch.linalg.cholesky(spd)
    B = torch.randn(batch, n, n, generator=g, dtype=torch.float64).to(device, dtype)
    return spd, sym, A, L, B


def run(suite: h.Suite) -> None:
    dev = suite.device
    dtype = torch.float32
    for batch, n in cases(dev, suite.quick):
        spd, sym, A, L, B = _inputs(batch, n, dev, dtype)
        case = f"{batch}x{n}x{n}"
        mat = batch * n * n * 4
        table = {
            "svd": (
                lambda a: ml.svd(a, full_matrices=False),
                lambda a: torch.linalg.svd(a, full_matrices=False),
                (A,),
                mat * 3,
            ),
            "eigh": (ml.eigh, torch.linalg.eigh, (sym,), mat * 2),
            "qr": (ml.qr, torch.linalg.qr, (A,), mat * 3),
            "cholesky": (ml.cholesky_ex, torch.linalg.cholesky_ex, (spd,), mat * 2),
            "lu_factor": (ml.lu_factor_ex, torch.linalg.lu_factor_ex, (A,), mat * 2),
            "solve": (ml.solve, torch.linalg.solve, (spd, B), mat * 3),
            "solve_triangular": (
                lambda a, b: ml.solve_triangular(a, b, upper=False),
                lambda a, b: torch.linalg.solve_triangular(a, b, upper=False),
                (L, B),
                mat * 3,
            ),
        }
        for op, (ours, torch_fn, args, nbytes) in table.items():
            compiled = h.compiled(torch_fn)
            for provider, fn in (("metalcore", ours), ("eager", torch_fn), ("compile", compiled)):
                suite.measure(op, case, "fwd", provider, dtype, lambda f=fn, a=args: f(*a), nbytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one smaller case")
    ap.add_argument("--ops", default="", help="comma-separated ops to run (default: all)")
    args = ap.parse_args()
    suite = h.Suite("cpu", args.quick)
    if args.ops:
        wanted = set(args.ops.split(","))
        measure = suite.measure
        suite.measure = lambda op, *a, **k: measure(op, *a, **k) if op in wanted else None
    run(suite)
    print(f"\nthreads: {torch.get_num_threads()}; ratio = torch time / metalcore time")
    rows = [r for r in suite.rows if r.op != "copy" and r.ms is not None]
    for op, case in dict.fromkeys((r.op, r.case) for r in rows):
        t = {r.provider: r.ms for r in rows if (r.op, r.case) == (op, case)}
        if "metalcore" in t:
            ratios = ", ".join(
                f"{p} {t[p]:.1f} ms ({t[p] / t['metalcore']:.2f}x)" for p in ("eager", "compile")
            )
            print(f"  {op:17s} {case:12s} metalcore {t['metalcore']:.1f} ms; {ratios}")


if __name__ == "__main__":
    main()
