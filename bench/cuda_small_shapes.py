"""Small CUDA shapes and host time: what CUDA graphs give, and what the host pays per op.

At 1024-4096 rows of 4096, rmsnorm forward + backward is host-bound in eager mode (the GPU work
is a few microseconds; dispatch, autograd and launches are more). A CUDA graph of the training
step removes the host from the loop. This script times, in one run, one training step of a
norm layer (y = rmsnorm(x, w); y.backward(g)) for:

- eager PyTorch (``F.rms_norm``) and eager metalcore;
- ``torch.compile`` (default mode) of each;
- ``torch.compile(mode="reduce-overhead")`` (CUDA graph trees) of each, and whether Inductor
  skipped the graph for any reason (``cudagraph_skips``: a metalcore op that kept a step out of
  a captured graph would show there).

Then the host time per call of each op over a bare aten op, with tiny inputs, by the
interleaved method (``host_pair_us``: median of per-round differences over 31 rounds).

    python bench/cuda_small_shapes.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import bench as h

ops = torch.ops.metalcore


def step_time_us(step, iters: int = 200, rounds: int = 7) -> float:
    """Wall microseconds per training step (host and device, synchronized per round)."""
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(per)


errors: dict[str, str] = {}


def training_steps(rows: int, n: int, dtype: torch.dtype) -> dict[str, float]:
    x = torch.randn(rows, n, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(rows, n, device="cuda", dtype=dtype)

    def torch_norm(a, b):
        return F.rms_norm(a, (n,), b, 1e-6)

    def mc_norm(a, b):
        return ops.rmsnorm(a, b, 1e-6)

    providers = {
        "torch eager": torch_norm,
        "metalcore eager": mc_norm,
        "torch compile": torch.compile(torch_norm),
        "metalcore compile": torch.compile(mc_norm),
        "torch reduce-overhead": torch.compile(torch_norm, mode="reduce-overhead"),
        "metalcore reduce-overhead": torch.compile(mc_norm, mode="reduce-overhead"),
    }
    out = {}
    for name, fn in providers.items():

        def step(fn=fn):
            x.grad = None
            w.grad = None
            fn(x, w).backward(g)

        out[name] = step_time_us(step)
    # The whole step (forward, autograd backward, grads) captured by hand in one CUDA graph, as
    # PyTorch's whole-network capture recipe does: replay is one launch, no host work per op. A
    # failed capture leaves the CUDA context unusable, so each runs in a child process.
    for name in ("metalcore", "torch"):
        out[f"{name} cuda graph"] = captured_in_child(name, rows, n)
    return out


def captured_in_child(provider: str, rows: int, n: int) -> float:
    cmd = [sys.executable, __file__, "--capture", provider, "--rows", str(rows), "--n", str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return float(lines[-1])
    err = [ln for ln in proc.stderr.strip().splitlines() if "Error" in ln]
    errors[f"{provider} cuda graph {rows}x{n}"] = err[-1] if err else proc.stderr[-300:]
    return float("nan")


def capture_main(provider: str, rows: int, n: int) -> None:
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    if provider == "torch":
        fn = lambda a, b: F.rms_norm(a, (n,), b, 1e-6)  # noqa: E731
    else:
        fn = lambda a, b: ops.rmsnorm(a, b, 1e-6)  # noqa: E731
    print(step_time_us(captured_step(fn, x, w, g)))


def captured_step(fn, x, w, g):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (autograd and allocator state)
            x.grad = None
            w.grad = None
            fn(x, w).backward(g)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x, w).backward(g)
    return graph.replay


def host_overheads() -> dict[str, tuple[float, float, float]]:
    dt = torch.bfloat16
    x = torch.randn(1, 8, device="cuda", dtype=dt)
    w = torch.randn(8, device="cuda", dtype=dt)
    q = torch.randn(1, 1, 1, 8, device="cuda", dtype=dt)
    cos = torch.randn(1, 8, device="cuda", dtype=dt)
    p = [torch.randn(8, device="cuda")]
    gr = [torch.randn(8, device="cuda")]
    m = [torch.zeros(8, device="cuda")]
    v = [torch.zeros(8, device="cuda")]
    st = [torch.zeros((), device="cuda")]
    lr = torch.tensor(1e-3, device="cuda")
    bare = lambda: torch.ops.aten.neg.default(x)  # noqa: E731
    cases = {
        "rmsnorm": lambda: ops.rmsnorm.default(x, w, 1e-6),
        "swiglu": lambda: ops.swiglu.default(x, x),
        "rope": lambda: ops.rope.default(q, q, cos, cos, False),
        "adamw": lambda: ops.adamw.default(p, gr, m, v, [], st, lr, 0.9, 0.999, 0.0, 1e-8),
        "aten._fused_adamw_": lambda: torch.ops.aten._fused_adamw_.default(
            p,
            gr,
            m,
            v,
            [],
            st,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.0,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        ),
    }
    return {name: h.host_pair_us(fn, bare, "cuda") for name, fn in cases.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--capture", choices=("torch", "metalcore"), help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.capture:
        capture_main(args.capture, args.rows, args.n)
        return 0
    if args.out is None:
        ap.error("--out is required")
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    torch._inductor.config.triton.cudagraph_skip_dynamic_graphs = False
    result = {"env": h.environment("cuda"), "metalcore": metalcore.__version__, "steps": {}}
    for rows in (1024, 2048, 4096):
        key = f"{rows}x4096 bf16"
        result["steps"][key] = training_steps(rows, 4096, torch.bfloat16)
        torch._dynamo.reset()
    from torch._dynamo.utils import counters

    result["cudagraph_skips"] = dict(counters["inductor"].get("cudagraph_skips", {}) or {})
    result["capture_errors"] = errors
    result["host_us"] = host_overheads()

    print("training step of one norm layer (us per step, wall, host + device):")
    names = list(next(iter(result["steps"].values())))
    print(f"{'shape':>16} " + " ".join(f"{n:>26}" for n in names))
    for key, row in result["steps"].items():
        print(f"{key:>16} " + " ".join(f"{row[n]:>26.1f}" for n in names))
    print("cudagraph skips:", result["cudagraph_skips"] or "none")
    print("capture errors:", errors or "none")
    print("host us per call (op, bare aten.neg, median paired difference):")
    for name, (a, b, d) in result["host_us"].items():
        print(f"  {name:>20}: {a:7.2f} {b:7.2f} {d:+7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
