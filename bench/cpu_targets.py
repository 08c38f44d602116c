"""CPU benchmark at the realistic sizes of the foundation issue, side by side in one run:
metalcore vs PyTorch eager vs torch.compile of the plain formulation.

python bench/cpu_targets.py [--rows 16384] [--hidden 4096] [--params 100e6] [--repeats 5]

Writes bench/results/cpu-targets.json and prints a Markdown table (median wall ms, achieved
GB/s from the fewest bytes each op must move, speed-ups). Inputs are random bf16 activations of
8x2048x4096 (16384 rows of 4096) and a 100M-parameter fp32 AdamW step over 64 tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import metalcore  # noqa: E402
from metalcore.testing import bench as h  # noqa: E402
from metalcore.testing import reference as ref  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn, inputs, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cpu-targets.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    m, n, bf = args.rows, args.hidden, torch.bfloat16
    x, r, u, g = (torch.randn(m, n, dtype=bf) for _ in range(4))
    w = 1 + 0.1 * torch.randn(n, dtype=bf)
    act_bytes = m * n * 2

    def rms_eager(a, b):
        return F.rms_norm(a, (n,), b, 1e-6)

    def add_rms_eager(a, res, b):
        return F.rms_norm(a + res, (n,), b, 1e-6)

    def swiglu_eager(a, b):
        return F.silu(a) * b

    # RoPE: HF layout, GQA 32/8 heads, head_dim 128, seq 2048.
    b_, s_, hq, hk, d = 1, 2048, 32, 8, 128
    q = torch.randn(b_, hq, s_, d, dtype=bf)
    k = torch.randn(b_, hk, s_, d, dtype=bf)
    cos, sin = torch.randn(s_, d, dtype=bf), torch.randn(s_, d, dtype=bf)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    qk_bytes = (q.numel() + k.numel()) * 2

    def rope_eager(a, b):
        return ref.hf_apply_rotary_pos_emb(a, b, cos, sin)

    def rope_fb(fn):
        qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
        oq, ok = fn(qq, kk)
        torch.autograd.backward((oq, ok), (gq, gk))

    cases = []
    c = {
        name: torch.compile(f)
        for name, f in [
            ("rms", rms_eager),
            ("add", add_rms_eager),
            ("swiglu", swiglu_eager),
            ("rope", rope_eager),
        ]
    }
    cases += [
        (
            "rmsnorm fwd",
            2 * act_bytes,
            lambda: metalcore.rmsnorm(x, w, 1e-6),
            lambda: rms_eager(x, w),
            lambda: c["rms"](x, w),
        ),
        (
            "rmsnorm fwd+bwd",
            5 * act_bytes,
            lambda: fwd_bwd(lambda a, b: metalcore.rmsnorm(a, b, 1e-6), (x, w), g),
            lambda: fwd_bwd(rms_eager, (x, w), g),
            lambda: fwd_bwd(c["rms"], (x, w), g),
        ),
        (
            "fused_add_rmsnorm fwd",
            4 * act_bytes,
            lambda: metalcore.fused_add_rmsnorm(x, r, w, 1e-6),
            lambda: add_rms_eager(x, r, w),
            lambda: c["add"](x, r, w),
        ),
        (
            "swiglu fwd",
            3 * act_bytes,
            lambda: metalcore.swiglu(x, u),
            lambda: swiglu_eager(x, u),
            lambda: c["swiglu"](x, u),
        ),
        (
            "swiglu fwd+bwd",
            8 * act_bytes,
            lambda: fwd_bwd(metalcore.swiglu, (x, u), g),
            lambda: fwd_bwd(swiglu_eager, (x, u), g),
            lambda: fwd_bwd(c["swiglu"], (x, u), g),
        ),
        (
            "rope fwd",
            2 * qk_bytes,
            lambda: metalcore.rope(q, k, cos, sin),
            lambda: rope_eager(q, k),
            lambda: c["rope"](q, k),
        ),
        (
            "rope fwd+bwd",
            4 * qk_bytes,
            lambda: rope_fb(lambda a, b: metalcore.rope(a, b, cos, sin)),
            lambda: rope_fb(rope_eager),
            lambda: rope_fb(c["rope"]),
        ),
    ]

    # AdamW: 64 fp32 tensors, ~params in total; 28 bytes/param (read p, g, m, v; write p, m, v).
    sizes = [int(args.params) // 64 + (i % 7) * 13 for i in range(64)]
    params = [torch.randn(s) for s in sizes]
    grads = [torch.randn(s) for s in sizes]
    p_torch = [torch.nn.Parameter(p.clone()) for p in params]
    for p, gr in zip(p_torch, grads):
        p.grad = gr.clone()
    opt_foreach = torch.optim.AdamW(p_torch, lr=1e-3, foreach=True)
    opt_fused = torch.optim.AdamW(p_torch, lr=1e-3, fused=True)
    m_s = [torch.zeros(s) for s in sizes]
    v_s = [torch.zeros(s) for s in sizes]
    steps = [torch.zeros(()) for _ in sizes]
    lr = torch.tensor(1e-3)
    adam_bytes = 28 * sum(sizes)
    cases.append(
        (
            "adamw step (fp32, %.0fM params)" % (sum(sizes) / 1e6),
            adam_bytes,
            lambda: metalcore.adamw_step(params, grads, m_s, v_s, steps, lr=lr, weight_decay=0.01),
            opt_foreach.step,
            opt_fused.step,
        )
    )

    rows = []
    env = h.environment("cpu")
    print(h.machine_label(env))
    header = (
        "| op | metalcore ms | GB/s | eager ms | torch.compile ms | vs eager | vs compile |",
        "|---|---|---|---|---|---|---|",
    )
    print("\n".join(header), flush=True)
    for name, nbytes, mine, eager, compiled in cases:
        t_m = median_ms(mine, args.repeats)
        t_e = median_ms(eager, args.repeats)
        t_c = median_ms(compiled, args.repeats)
        row = dict(
            op=name,
            metalcore_ms=t_m,
            eager_ms=t_e,
            compile_ms=t_c,
            gbps=nbytes / t_m / 1e6,
            speedup_eager=t_e / t_m,
            speedup_compile=t_c / t_m,
        )
        if name.startswith("adamw"):
            row["compile_ms_note"] = "torch.optim.AdamW(fused=True) in the compile column"
        rows.append(row)
        print(
            f"| {name} | {t_m:.1f} | {row['gbps']:.1f} | {t_e:.1f} | {t_c:.1f} | "
            f"{row['speedup_eager']:.2f}x | {row['speedup_compile']:.2f}x |",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            dict(
                command="python bench/cpu_targets.py " + " ".join(sys.argv[1:]),
                torch=torch.__version__,
                threads=torch.get_num_threads(),
                capability=torch.backends.cpu.get_cpu_capability(),
                env=env,
                rows=rows,
            ),
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
