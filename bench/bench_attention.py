"""attention: metalcore.scaled_dot_product_attention vs torch's F.scaled_dot_product_attention
(eager, and torch.compile of it) at the issue's shapes: causal prefill B1 H8 S2048 D128
forward and forward+backward, and GQA 8:1 decode (one query over 8192 cached keys).

Attention is compute-bound (prefill) or bandwidth-bound (decode): rows carry the bytes of q, k,
v and out; ``python bench/bench_attention.py`` prints milliseconds, effective GFLOP/s
(4 * Lq * Lk * D per head, halved for causal, x3.5 for forward+backward) and the ratios to
torch side by side, in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metalcore  # noqa: E402
from metalcore._dispatch import has_kernel  # noqa: E402
from metalcore.testing import bench as h  # noqa: E402


def _sdpa(causal: bool, gqa: bool):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return fn


def _ours(causal: bool, gqa: bool):
    def fn(q, k, v):
        return metalcore.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return fn


def cases(device: str, quick: bool) -> list[dict]:
    """(name, B, Hq, Hkv, Lq, Lk, D, causal, directions) of the issue's targets."""
    s = 512 if quick else 2048
    lk = 2048 if quick else 8192
    return [
        dict(name=f"B1 H8 S{s} D128 causal", b=1, hq=8, hkv=8, lq=s, lk=s, d=128, causal=True,
             dirs=("fwd", "fwd+bwd")),
        dict(name=f"decode B1 Hq32 Hkv4 Lk{lk} D128", b=1, hq=32, hkv=4, lq=1, lk=lk, d=128,
             causal=False, dirs=("fwd",)),
    ]  # fmt: skip


def flops(c: dict, direction: str) -> float:
    f = 4.0 * c["b"] * c["hq"] * c["lq"] * c["lk"] * c["d"]
    if c["causal"] and c["lq"] == c["lk"]:
        f /= 2
    return f * (3.5 if direction == "fwd+bwd" else 1.0)


def _make(c: dict, dtype: torch.dtype, device: str):
    def make():
        q = torch.randn(c["b"], c["hq"], c["lq"], c["d"], device=device, dtype=dtype)
        k = torch.randn(c["b"], c["hkv"], c["lk"], c["d"], device=device, dtype=dtype)
        v = torch.randn(c["b"], c["hkv"], c["lk"], c["d"], device=device, dtype=dtype)
        return tuple(t.requires_grad_() for t in (q, k, v))

    return make


def _nbytes(c: dict, dtype: torch.dtype) -> int:
    es = torch.finfo(dtype).bits // 8
    return es * c["d"] * (2 * c["b"] * c["hq"] * c["lq"] + 2 * c["b"] * c["hkv"] * c["lk"])


def run(suite: h.Suite) -> None:
    dev = suite.device
    dtypes = (torch.float32, torch.bfloat16) if dev == "cpu" else (torch.bfloat16,)
    for c in cases(dev, suite.quick):
        gqa = c["hq"] != c["hkv"]
        provs = {"eager": _sdpa(c["causal"], gqa), "compile": h.compiled(_sdpa(c["causal"], gqa))}
        if has_kernel("attention", dev):
            provs = {"metalcore": _ours(c["causal"], gqa), **provs}
        else:
            print(f"  attention: no metalcore kernel for {dev} in this build")
        for dtype in dtypes:
            nbytes = _nbytes(c, dtype)
            for name, fn in provs.items():
                h.timed_directions(
                    suite, "attention", c["name"], name, dtype, _make(c, dtype, dev), fn,
                    nbytes, 2 * nbytes, nbytes, c["dirs"], note="compute-bound; see GFLOP/s",
                )  # fmt: skip


def _time(fn, reps: int) -> float:
    fn()
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return sorted(best)[len(best) // 2] * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="S 512 and Lk 2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cases", default="all", help="'prefill', 'decode' or 'all'")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {h.cpu_model()}")
    for c in cases("cpu", args.quick):
        if args.cases != "all" and not c["name"].startswith(
            "decode" if args.cases == "decode" else "B"
        ):
            continue
        gqa = c["hq"] != c["hkv"]
        provs = {"metalcore": _ours(c["causal"], gqa), "eager": _sdpa(c["causal"], gqa)}
        if not args.no_compile:
            provs["compile"] = h.compiled(_sdpa(c["causal"], gqa))
        for dt_name in args.dtypes.split(","):
            dtype = getattr(torch, dt_name)
            q, k, v = _make(c, dtype, "cpu")()
            g = torch.randn(c["b"], c["hq"], c["lq"], c["d"], dtype=dtype)
            for direction in c["dirs"]:
                ms = {}
                for name, fn in provs.items():
                    if direction == "fwd":

                        def call(fn=fn, q=q, k=k, v=v):
                            with torch.no_grad():
                                fn(q, k, v)
                    else:

                        def call(fn=fn, q=q, k=k, v=v, g=g):
                            q.grad = k.grad = v.grad = None
                            fn(q, k, v).backward(g)

                    ms[name] = _time(call, args.reps)
                gf = flops(c, direction) / 1e6
                row = "  ".join(f"{n} {t:8.1f} ms ({gf / t:6.1f} GFLOP/s)" for n, t in ms.items())
                ratios = "  ".join(
                    f"x{ms[n] / ms['metalcore']:.2f} vs {n}" for n in ms if n != "metalcore"
                )
                print(f"{c['name']:34s} {dt_name:9s} {direction:8s} {row}  | {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
