"""Benchmark metalcore.rope on CPU against the eager Hugging Face formulation and its
torch.compile, forward, backward and forward+backward.

    python bench/bench_rope.py --dtype bf16 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import metalcore
from metalcore.testing import reference as ref

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def hf_tables(b: int, s: int, d: int, dtype: torch.dtype):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(s, dtype=torch.float32)[None, :, None].expand(b, s, 1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def fwd_fn(fn):
    def make(q, k, cos, sin, g_q, g_k):
        return lambda: fn(q, k, cos, sin)

    return make


def grad_fn(fn):
    """Backward only: the graph is built once and replayed (retain_graph)."""

    def make(q, k, cos, sin, g_q, g_k):
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        outs = fn(q, k, cos, sin)
        return lambda: torch.autograd.grad(outs, (q, k), (g_q, g_k), retain_graph=True)

    return make


def fwd_bwd_fn(fn):
    def make(q, k, cos, sin, g_q, g_k):
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        return lambda: torch.autograd.grad(fn(q, k, cos, sin), (q, k), (g_q, g_k))

    return make


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), action="append")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args()
    dtypes = args.dtype or ["bf16", "fp32"]
    batches = args.batch or [1, 2]
    hq, hk, s, d = 32, 8, 2048, 128

    def metalcore_fn(q, k, cos, sin):
        return metalcore.rope(q, k, cos, sin)

    impls = {"eager": ref.hf_apply_rotary_pos_emb, "metalcore": metalcore_fn}
    if not args.no_compile:
        impls["compile"] = torch.compile(ref.hf_apply_rotary_pos_emb, fullgraph=True)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, Hq={hq} Hk={hk} S={s} D={d}"
    )
    print(f"{'dtype':>5} {'B':>2} {'pass':>8} {'impl':>10} {'ms':>9} {'GB/s':>7} {'speedup':>8}")
    for name in dtypes:
        dtype = DTYPES[name]
        for b in batches:
            q = torch.randn(b, hq, s, d, dtype=dtype)
            k = torch.randn(b, hk, s, d, dtype=dtype)
            cos, sin = hf_tables(b, s, d, dtype)
            g_q, g_k = torch.randn_like(q), torch.randn_like(k)
            # One pass reads q, k, cos, sin and writes q_out, k_out.
            nbytes = (2 * (q.numel() + k.numel()) + 2 * cos.numel()) * q.element_size()
            passes = {"fwd": (fwd_fn, 1), "bwd": (grad_fn, 1), "fwd+bwd": (fwd_bwd_fn, 2)}
            for pass_name, (maker, n_pass) in passes.items():
                base = {}
                for impl, fn in impls.items():
                    run = maker(fn)(q, k, cos, sin, g_q, g_k)
                    ms = median_ms(run, args.repeats)
                    base[impl] = ms
                    gbs = n_pass * nbytes / (ms * 1e-3) / 1e9
                    speedup = base["eager"] / ms
                    print(
                        f"{name:>5} {b:>2} {pass_name:>8} {impl:>10} {ms:9.2f} {gbs:7.1f} "
                        f"{'' if impl == 'eager' else f'{speedup:7.2f}x':>8}"
                    )


if __name__ == "__main__":
    main()
