"""RMSNorm on CUDA at wide rows: the committed streaming kernels against the wide-row kernels
(METALCORE_CUDA_WIDE_ROWS=1) and eager PyTorch, in one run on one GPU.

    PYTHONPATH=. python bench/studies/rmsnorm_wide_rows.py OUT.json [--shapes 2048x65536,16384x4096]

The wide-row switch is read once per process, so each metalcore variant is timed in its own
worker process (this script run with --worker); eager is timed in the first. Each worker times
forward, backward (autograd, retained graph), forward+backward and the backward op alone
(torch.ops.metalcore.rmsnorm_backward: the kernels without autograd's bookkeeping) with the
package's harness, metalcore.testing.bench (triton's do_bench, L2 flushed, medians), lists the
CUDA kernels one forward and backward launched (so each row says which path it measured), and
checks the outputs at the timed shape against float64. The parent prints a table and writes
every row to OUT.json. Rows of 4096 (16384x4096) stay on the register plans either way: the control.

The validation run on a GPU machine, writing to $OUT: build from scratch, tests/cuda with the
wide-row kernels on, tests/cuda/test_rmsnorm_wide_rows.py with them off, then this benchmark.

    export METALCORE_CUDA_WIDE_ROWS=1 SKIP_BENCH=1
    export TEST_ARGS="$(python3 -c 'import xdist' 2>/dev/null && printf '%s' '-n 8')"
    bash scripts/gpu_check.sh "$OUT" && unset METALCORE_CUDA_WIDE_ROWS && \
    PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider $TEST_ARGS \
        tests/cuda/test_rmsnorm_wide_rows.py > "$OUT/tests-default.log" 2>&1; \
    tail -3 "$OUT/tests-default.log"; \
    PYTHONPATH=. python3 bench/studies/rmsnorm_wide_rows.py "$OUT/rmsnorm_wide_rows.json"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EPS = 1e-6
MODES = {"committed": "0", "wide": "1"}  # provider label -> METALCORE_CUDA_WIDE_ROWS


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def kernel_names(fn) -> list[str]:
    """Names (without template arguments) of the CUDA kernels one call of fn launches."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            # "void metalcore::(anonymous namespace)::rmsnorm_bwd_tile_kernel<...>(...)"
            short = e.name.split("<")[0].split("::")[-1].replace("void ", "").strip()
            if short not in names:
                names.append(short)
    return names


def errors_vs_float64(m: int, n: int, dtype) -> dict:
    """max |metalcore - float64| / max |float64| for y, dx and dw at the timed shape."""
    import torch

    from metalcore.testing import reference as ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    g = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device="cuda", generator=gen)).to(dtype)
    y = torch.ops.metalcore.rmsnorm(x, w, EPS)
    dx, dw = torch.ops.metalcore.rmsnorm_backward(g, x, w, EPS)
    out = {}
    y64 = ref.rmsnorm(x.double(), w.double(), EPS)
    out["y"] = float((y.double() - y64).abs().max() / y64.abs().max())
    del y64
    dx64, dw64 = ref.rmsnorm_backward(g, x, w, EPS)
    out["dx"] = float((dx.double() - dx64).abs().max() / dx64.abs().max())
    out["dw"] = float((dw.double() - dw64).abs().max() / dw64.abs().max())
    return out


def backward_op(suite, label: str, case: str, m: int, n: int, dtype) -> list[str]:
    """Times the backward op alone and returns the kernels one forward and backward launch."""
    import torch

    x = torch.randn(m, n, device="cuda", dtype=dtype)
    g = torch.randn_like(x)
    w = 1 + 0.1 * torch.randn(n, device="cuda", dtype=dtype)
    op = torch.ops.metalcore
    suite.measure(
        "rmsnorm",
        case,
        "bwd-op",
        label,
        dtype,
        lambda: op.rmsnorm_backward(g, x, w, EPS),
        3 * m * n * 2,
    )
    return kernel_names(lambda: (op.rmsnorm(x, w, EPS), op.rmsnorm_backward(g, x, w, EPS)))


def worker(mode: str, shapes: list[tuple[int, int]], out: Path) -> None:
    import torch
    import torch.nn.functional as F

    import metalcore  # noqa: F401  (loads the ops)
    from metalcore.testing import bench as h

    torch.manual_seed(0)
    dtype = torch.bfloat16
    es = 2
    suite = h.Suite("cuda", quick=False)
    label = f"metalcore-{mode}"
    providers = {label: lambda x, w: torch.ops.metalcore.rmsnorm(x, w, EPS)}
    if mode == "committed":
        providers["eager"] = lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS)
    extra = {"kernels": {}, "errors": {}}
    for m, n in shapes:
        case = f"{m}x{n}"

        def make(m=m, n=n):
            x = torch.randn(m, n, device="cuda", dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, device="cuda", dtype=dtype)).requires_grad_()
            return x, w

        for name, fn in providers.items():
            h.timed_directions(
                suite,
                "rmsnorm",
                case,
                name,
                dtype,
                make,
                fn,
                2 * m * n * es,
                3 * m * n * es,
                2 * m * n * es,
            )
        extra["kernels"][case] = backward_op(suite, label, case, m, n, dtype)
        extra["errors"][case] = errors_vs_float64(m, n, dtype)
        torch.cuda.empty_cache()
    rows = [{k: v for k, v in asdict(r).items() if k != "env"} for r in suite.rows]
    out.write_text(
        json.dumps({"env": suite.env, "copy_gbps": suite.copy_gbps, "rows": rows} | extra)
    )


def report(results: dict, shapes: list[tuple[int, int]], command: str, out: Path) -> None:
    """Prints the side-by-side table and writes the workers' rows to ``out``."""
    rows = [row for res in results.values() for row in res["rows"] if row["op"] != "copy"]
    ms = {(r["case"], r["direction"], r["provider"]): r["ms"] for r in rows}
    print()
    ceiling = results["wide"]["copy_gbps"]
    print(f"bf16, medians in ms; copy ceiling {ceiling:.0f} GB/s (the wide-row worker's)")
    head = f"{'case':12s} {'direction':9s} {'committed':>10s} {'wide':>10s} {'eager':>10s}"
    print(head + f" {'committed/wide':>15s} {'eager/wide':>11s} {'wide GB/s':>10s}")
    gbps = {(r["case"], r["direction"], r["provider"]): r["gbps"] for r in rows}
    for m, n in shapes:
        case = f"{m}x{n}"
        for d in ("fwd", "bwd", "fwd+bwd", "bwd-op"):
            c = ms.get((case, d, "metalcore-committed"))
            w = ms.get((case, d, "metalcore-wide"))
            e = ms.get((case, d, "eager"))

            def f(v):
                return f"{v:10.4f}" if v else f"{'-':>10s}"

            ratio = f"{c / w:15.2f}" if c and w else f"{'-':>15s}"
            ratio_e = f"{e / w:11.2f}" if e and w else f"{'-':>11s}"
            bw = gbps.get((case, d, "metalcore-wide"))
            bw = f"{bw:10.0f}" if bw else f"{'-':>10s}"
            print(f"{case:12s} {d:9s} {f(c)} {f(w)} {f(e)} {ratio} {ratio_e} {bw}")
    for mode, res in results.items():
        for case, names in res["kernels"].items():
            print(f"kernels {mode:9s} {case}: {', '.join(names)}")
        for case, err in res["errors"].items():
            txt = ", ".join(f"{k} {v:.2e}" for k, v in err.items())
            print(f"max error / max |float64| {mode:9s} {case}: {txt}")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command,
                "env": results["wide"]["env"],
                "copy_gbps": {k: v["copy_gbps"] for k, v in results.items()},
                "kernels": {k: v["kernels"] for k, v in results.items()},
                "errors_vs_float64": {k: v["errors"] for k, v in results.items()},
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", help="JSON path for the results")
    ap.add_argument("--shapes", default="2048x65536,16384x4096", help="MxN list (bf16)")
    ap.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if args.worker:
        worker(args.worker, shapes, args.worker_out)
        return 0
    if args.out is None:
        ap.error("the output JSON path is required")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, flag in MODES.items():
            part = Path(tmp) / f"{mode}.json"
            env = dict(os.environ, METALCORE_CUDA_WIDE_ROWS=flag, PYTHONUNBUFFERED="1")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            cmd = [sys.executable, __file__, "--worker", mode, "--worker-out", str(part)]
            cmd += ["--shapes", args.shapes]
            print(f"== {mode} (METALCORE_CUDA_WIDE_ROWS={flag})", flush=True)
            r = subprocess.run(cmd, env=env, cwd=REPO)
            if r.returncode != 0:
                print(f"worker {mode} failed with exit code {r.returncode}")
                return 1
            results[mode] = json.loads(part.read_text())

    command = "python bench/studies/rmsnorm_wide_rows.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    report(results, shapes, command, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
