"""AdamW step on CPU: metalcore.adamw vs torch.optim.AdamW (foreach, fused, compiled foreach).

Every variant updates the same params with the same grads (each keeps its own moments). Times
are the median of --repeats steps after warm-up; GB/s counts the bytes an ideal single pass
moves (fp32 params and states: read p, g, m, v and write p, m, v = 28 bytes per param).

    python bench/bench_adamw.py --params 100e6 --tensors 64 --dtype fp32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import metalcore

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_sizes(total: int, count: int, seed: int = 0) -> list[int]:
    # Uneven sizes, none a multiple of the vector width, like a real model's parameter list.
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(count, generator=gen) + 0.5
    sizes = (weights / weights.sum() * total).long() | 1
    return [int(s) for s in sizes]


def time_steps(step, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def bench_metalcore(params, grads, state_dtype, lr, repeats, warmup) -> list[float]:
    m = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    v = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    lr_t = torch.tensor(lr, dtype=torch.float64)

    def step():
        metalcore.adamw_step(
            params, grads, m, v, steps, lr=lr_t, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8
        )

    return time_steps(step, repeats, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=100e6, help="total parameter count")
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument(
        "--state-dtype",
        choices=["param", "fp32"],
        default="param",
        help="metalcore's moment dtype (torch always keeps the param dtype)",
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(foreach)")
    args = ap.parse_args()

    dtype = DTYPES[args.dtype]
    state_dtype = torch.float32 if args.state_dtype == "fp32" else dtype
    sizes = make_sizes(int(args.params), args.tensors)
    n = sum(sizes)
    params = [torch.randn(s).to(dtype) for s in sizes]
    grads = [torch.randn(s).to(dtype) * 1e-2 for s in sizes]
    leaves = [torch.nn.Parameter(p, requires_grad=True) for p in params]
    for leaf, g in zip(leaves, grads, strict=True):
        leaf.grad = g
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

    psize, ssize = dtype.itemsize, state_dtype.itemsize
    ours_bytes = n * (3 * psize + 4 * ssize)  # p read+write, g read; m, v read+write
    torch_bytes = n * 7 * psize
    print(
        f"AdamW step, {n / 1e6:.1f}M {args.dtype} params in {len(sizes)} tensors, "
        f"metalcore states {state_dtype}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )

    results = {}

    with torch.no_grad():
        times = bench_metalcore(leaves, grads, state_dtype, hp["lr"], args.repeats, args.warmup)
    results["metalcore.adamw"] = (times, ours_bytes)

    variants = [("torch foreach", dict(foreach=True)), ("torch fused", dict(fused=True))]
    for name, kw in variants:
        opt = torch.optim.AdamW(leaves, **hp, **kw)
        results[name] = (time_steps(opt.step, args.repeats, args.warmup), torch_bytes)
        del opt

    if not args.no_compile:
        opt = torch.optim.AdamW(leaves, **hp, foreach=True)
        opt.step()  # creates the state outside the compiled region
        compiled = torch.compile(opt.step, fullgraph=False)
        t0 = time.perf_counter()
        compiled()
        print(f"torch.compile(foreach step): first call (compile) {time.perf_counter() - t0:.1f} s")
        results["torch.compile(foreach)"] = (
            time_steps(compiled, args.repeats, args.warmup),
            torch_bytes,
        )
        del opt, compiled

    base = statistics.median(results["torch foreach"][0])
    print(f"{'variant':<24}{'median ms':>11}{'min ms':>9}{'GB/s':>8}{'vs foreach':>12}")
    for name, (times, nbytes) in results.items():
        med = statistics.median(times)
        print(
            f"{name:<24}{med * 1e3:>11.1f}{min(times) * 1e3:>9.1f}"
            f"{nbytes / med / 1e9:>8.1f}{base / med:>11.2f}x"
        )


if __name__ == "__main__":
    main()
