"""``python -m metalcore`` (console script ``metalcore``): the main job.

On the best device present (mps, cuda, else cpu) it
1. self-checks every op against a float64 reference (forward and backward),
2. times each op against its eager PyTorch equivalent (the benchmark suite when it is present,
   else a small built-in timer),
3. trains a tiny Llama-style model for a few steps with metalcore (modules + fused AdamW) and
   without (torch modules + ``torch.optim.AdamW``) from the same initialisation,
4. writes ``report.md`` and ``loss.png`` (when matplotlib is installed) to ``--out``.

The default run takes well under a minute on a laptop CPU; ``--full`` runs larger shapes, more
dtypes and more training steps. Exit status 1 means a self-check failed.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import runpy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import metalcore
from metalcore import functional as mf
from metalcore._dispatch import has_kernel
from metalcore.nn.rotary import apply_rotary_torch
from metalcore.testing import reference as ref
from metalcore.testing.heap import keep_freed_cpu_memory

# --- Device ----------------------------------------------------------------------------------


def detect_device(requested: str = "auto") -> torch.device:
    """``auto`` picks mps, then cuda, then cpu; an explicit device must be available."""
    if requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("metalcore: --device cuda requested but CUDA is not available")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise SystemExit("metalcore: --device mps requested but MPS is not available")
        return dev
    if torch.backends.mps.is_available():
        return torch.device("mps")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


# --- Progress --------------------------------------------------------------------------------


class Progress:
    """A one-line text progress bar (redrawn in place on a terminal, one line per item in logs)."""

    def __init__(self, total: int, label: str, stream=sys.stdout, width: int = 24) -> None:
        self.total, self.label, self.stream, self.width = total, label, stream, width
        self.done = 0
        self.tty = stream.isatty()

    def step(self, what: str, status: str) -> None:
        self.done += 1
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {what}: {status}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# --- Self-check ------------------------------------------------------------------------------


@dataclass
class Check:
    op: str
    what: str
    status: str = "ok"  # ok | FAIL | n/a
    max_err: float = 0.0
    detail: str = ""


def _err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).abs().max()) if a.numel() else 0.0


def _grads_of(fn: Callable, inputs: list[torch.Tensor], grad_out) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gos = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    torch.autograd.backward(outs, gos)
    return [t.grad for t in leaves]


def _selfcheck_cases(device: torch.device, dtype: torch.dtype, full: bool):
    """(op, what, kernel name, run) tuples; run() returns (actual list, expected list, tol)."""
    g = torch.Generator().manual_seed(0)
    rows, n = (64, 1024) if full else (16, 256)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    tol = {torch.float32: 2e-4, torch.float16: 4e-2, torch.bfloat16: 8e-2}[dtype]

    def on_dev(*ts):
        return [t.to(device=device, dtype=dtype) for t in ts]

    x64, r64, w64, g64 = rnd(rows, n), rnd(rows, n), rnd(n), rnd(rows, n)
    cases = []

    def rms_fwd():
        x, w = on_dev(x64, w64)
        xr, wr = x.double().cpu(), w.double().cpu()
        return [mf.rmsnorm(x, w, 1e-6)], [ref.rmsnorm(xr, wr, 1e-6)], tol

    def rms_bwd():
        x, w, go = on_dev(x64, w64, g64)
        act = _grads_of(lambda a, b: mf.rmsnorm(a, b, 1e-6), [x, w], go)
        exp = _grads_of(
            lambda a, b: ref.rmsnorm(a, b, 1e-6),
            [x.double().cpu(), w.double().cpu()],
            go.double().cpu(),
        )
        return act, exp, tol * math.sqrt(rows)

    def far_fwd():
        x, r, w = on_dev(x64, r64, w64)
        y, h = mf.fused_add_rmsnorm(x, r, w, 1e-6)
        ye, he = ref.fused_add_rmsnorm(x.cpu(), r.cpu(), w.cpu(), 1e-6)
        return [y, h], [ye, he], tol

    def far_bwd():
        x, r, w, go = on_dev(x64, r64, w64, g64)
        act = _grads_of(lambda a, b, c: mf.fused_add_rmsnorm(a, b, c, 1e-6), [x, r, w], (go, go))
        exp = _grads_of(
            lambda a, b, c: ref.fused_add_rmsnorm(a, b, c, 1e-6),
            [t.double().cpu() for t in (x, r, w)],
            (go.double().cpu(), go.double().cpu()),
        )
        return act, exp, tol * math.sqrt(rows)

    def act_fwd(name):
        def run():
            (x,) = on_dev(x64)
            xr = x.double().cpu()
            if name == "silu":
                return [mf.silu(x)], [ref.silu(xr)], tol
            if name == "swiglu":
                (u,) = on_dev(r64)
                return [mf.swiglu(x, u)], [ref.swiglu(xr, u.double().cpu())], tol
            approx = name.split("-")[1]
            return [mf.gelu(x, approx)], [ref.gelu(xr, approx)], tol

        return run

    def act_bwd(name):
        def run():
            x, u, go = on_dev(x64, r64, g64)
            cpu = [t.double().cpu() for t in (x, u, go)]
            if name == "swiglu":
                act = _grads_of(mf.swiglu, [x, u], go)
                exp = _grads_of(lambda a, b: F.silu(a) * b, cpu[:2], cpu[2])
            elif name == "silu":
                act, exp = _grads_of(mf.silu, [x], go), _grads_of(F.silu, cpu[:1], cpu[2])
            else:
                approx = name.split("-")[1]
                act = _grads_of(lambda a: mf.gelu(a, approx), [x], go)
                exp = _grads_of(lambda a: F.gelu(a, approximate=approx), cpu[:1], cpu[2])
            return act, exp, tol

        return run

    b, hq, hk, s, d = 2, 4, 2, 32 if not full else 256, 64
    pos = torch.arange(s, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    q64, k64 = rnd(b, hq, s, d), rnd(b, hk, s, d)

    def rope_fwd():
        q, k = on_dev(q64, k64)
        cos, sin = on_dev(ang.cos(), ang.sin())
        qo, ko = mf.rope(q, k, cos, sin)
        qe, ke = apply_rotary_torch(*(t.double().cpu() for t in (q, k, cos, sin)))
        return [qo, ko], [qe, ke], tol

    def rope_bwd():
        q, k = on_dev(q64, k64)
        cos, sin = on_dev(ang.cos(), ang.sin())
        gq, gk = on_dev(rnd(b, hq, s, d), rnd(b, hk, s, d))
        act = _grads_of(lambda a, c: mf.rope(a, c, cos, sin), [q, k], (gq, gk))
        cpu = [t.double().cpu() for t in (cos, sin, gq, gk)]
        exp = _grads_of(
            lambda a, c: apply_rotary_torch(a, c, cpu[0], cpu[1]),
            [q.double().cpu(), k.double().cpu()],
            (cpu[2], cpu[3]),
        )
        return act, exp, tol

    def adamw_steps():
        # Three steps of the optimizer vs torch.optim.AdamW on float32 copies (amsgrad on).
        p64 = [rnd(n), rnd(rows, n)]
        mine = [t.to(device=device, dtype=torch.float32).requires_grad_() for t in p64]
        theirs = [t.to(torch.float32).clone().requires_grad_() for t in p64]
        o1 = metalcore.optim.AdamW(mine, lr=1e-2, weight_decay=0.1, amsgrad=True)
        o2 = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)
        for _ in range(3):
            grads = [rnd(*t.shape) for t in p64]
            for p, q, gr in zip(mine, theirs, grads):
                p.grad = gr.to(device=device, dtype=torch.float32)
                q.grad = gr.to(torch.float32)
            o1.step()
            o2.step()
        return mine, theirs, 1e-5

    cases += [
        ("rmsnorm", "forward", "rmsnorm", rms_fwd),
        ("rmsnorm", "backward", "rmsnorm", rms_bwd),
        ("fused_add_rmsnorm", "forward", "fused_add_rmsnorm", far_fwd),
        ("fused_add_rmsnorm", "backward", "fused_add_rmsnorm", far_bwd),
        ("silu", "forward", "silu", act_fwd("silu")),
        ("silu", "backward", "silu", act_bwd("silu")),
        ("gelu", "forward (erf)", "gelu", act_fwd("gelu-none")),
        ("gelu", "backward (tanh)", "gelu", act_bwd("gelu-tanh")),
        ("swiglu", "forward", "swiglu", act_fwd("swiglu")),
        ("swiglu", "backward", "swiglu", act_bwd("swiglu")),
        ("rope", "forward", "rope", rope_fwd),
        ("rope", "backward", "rope", rope_bwd),
    ]
    if dtype == torch.float32:  # the optimizer check keeps float32 params whatever the dtype
        cases.append(("adamw", "3 steps vs torch.optim.AdamW", "adamw", adamw_steps))
    return cases


def run_selfcheck(device: torch.device, full: bool) -> list[Check]:
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if full else [torch.float32]
    cases = [(dt, c) for dt in dtypes for c in _selfcheck_cases(device, dt, full)]
    bar = Progress(len(cases), "self-check")
    results = []
    for dtype, (op, what, kernel, run) in cases:
        label = f"{op} {what}" + (f" [{str(dtype).split('.')[-1]}]" if full else "")
        check = Check(op, label)
        if not has_kernel(kernel, device.type):
            check.status, check.detail = "n/a", f"no {device.type} kernel in this build"
        else:
            try:
                actual, expected, tol = run()
                check.max_err = max(_err(a, e) for a, e in zip(actual, expected))
                scale = max(1.0, max(float(e.detach().abs().max()) for e in expected))
                if not check.max_err <= tol * scale:
                    check.status, check.detail = (
                        "FAIL",
                        f"max error {check.max_err:.3g} > {tol:.3g}",
                    )
            except Exception as e:  # a crash is a failed check, reported with its message
                check.status, check.detail = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0]
        results.append(check)
        bar.step(label, check.status + (f" ({check.detail})" if check.detail else ""))
    return results


# --- Benchmarks ------------------------------------------------------------------------------


@dataclass
class BenchRow:
    op: str
    shape: str
    dtype: str
    metalcore_ms: float
    eager_ms: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.metalcore_ms if self.metalcore_ms > 0 else float("nan")


def time_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.15) -> float:
    """Median wall time of ``fn`` in ms: 3 warm-up calls, then repeats for ``budget_s``."""
    for _ in range(3):
        fn()
    _sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def suite_benchmarks(device: torch.device, full: bool) -> tuple[list[BenchRow], str] | None:
    """Rows from the repository's benchmark suite (``bench/run.py``), when it is importable and
    provides ``collect(device: str, quick: bool) -> list[dict]`` with keys ``op``, ``shape``,
    ``dtype``, ``metalcore_ms`` and ``eager_ms``. ``None`` when it is not present."""
    try:
        run = importlib.import_module("bench.run")
    except ImportError:
        return None
    collect = getattr(run, "collect", None)
    if collect is None:
        return None
    rows = [
        BenchRow(
            str(r["op"]),
            str(r["shape"]),
            str(r["dtype"]),
            float(r["metalcore_ms"]),
            float(r["eager_ms"]),
        )
        for r in collect(device=str(device), quick=not full)
    ]
    return rows, "benchmark suite (bench/run.py)"


def inline_benchmarks(device: torch.device, full: bool) -> tuple[list[BenchRow], str]:
    """Each op vs its eager PyTorch equivalent, one shape (two with ``full``)."""
    shapes = [(2048, 1024)] + ([(8192, 4096)] if full else [])
    budget = 0.3 if full else 0.1
    rows: list[BenchRow] = []
    for m, n in shapes:
        rows += _bench_shape(device, m, n, full, budget)
    return rows, "built-in timer (median wall time; forward, and one step for adamw)"


def _bench_shape(device: torch.device, m: int, n: int, full: bool, budget: float):
    x, r, u = (torch.randn(m, n, device=device) for _ in range(3))
    w = torch.randn(n, device=device)
    pairs = {
        "rmsnorm": (lambda: mf.rmsnorm(x, w, 1e-6), lambda: F.rms_norm(x, (n,), w, 1e-6)),
        "fused_add_rmsnorm": (
            lambda: mf.fused_add_rmsnorm(x, r, w, 1e-6),
            lambda: F.rms_norm(x + r, (n,), w, 1e-6),
        ),
        "silu": (lambda: mf.silu(x), lambda: F.silu(x)),
        "gelu": (lambda: mf.gelu(x), lambda: F.gelu(x)),
        "swiglu": (lambda: mf.swiglu(x, u), lambda: F.silu(x) * u),
    }
    shapes = {op: f"{m}x{n}" for op in pairs}
    # rope: Llama-7B-like heads (32 query, 8 key/value, head_dim 128) at a short sequence.
    b, hq, hk, s, d = 1, 32, 8, (1024 if full else 256), 128
    q = torch.randn(b, hq, s, d, device=device)
    k = torch.randn(b, hk, s, d, device=device)
    ang = torch.randn(s, d, device=device)
    cos, sin = ang.cos(), ang.sin()
    pairs["rope"] = (lambda: mf.rope(q, k, cos, sin), lambda: apply_rotary_torch(q, k, cos, sin))
    shapes["rope"] = f"q {b}x{hq}x{s}x{d}"
    # adamw: 8 tensors of m*n/8 elements, the fused step vs torch's foreach step.
    if has_kernel("adamw", device.type):
        ps = [torch.randn(m * n // 8, device=device) for _ in range(8)]
        ps2 = [p.clone() for p in ps]
        for p, p2 in zip(ps, ps2):
            p.grad = torch.randn_like(p)
            p2.grad = p.grad.clone()
        mine = metalcore.optim.AdamW(ps, lr=1e-4)
        theirs = torch.optim.AdamW(ps2, lr=1e-4, foreach=True)
        pairs["adamw"] = (mine.step, theirs.step)
        shapes["adamw"] = f"8 x {m * n // 8}"
    return [
        BenchRow(
            op,
            shapes[op],
            "float32",
            time_ms(mine_fn, device, budget),
            time_ms(eager_fn, device, budget),
        )
        for op, (mine_fn, eager_fn) in pairs.items()
        if has_kernel(op, device.type)
    ]


def run_benchmarks(device: torch.device, full: bool) -> tuple[list[BenchRow], str]:
    note = ""
    if device.type == "cpu" and keep_freed_cpu_memory():
        note = (
            "; CPU timings keep freed memory in the process (glibc would otherwise hand it back"
            " and re-fault every page of each output and temporary on the next call)"
        )
    rows, source = suite_benchmarks(device, full) or inline_benchmarks(device, full)
    return rows, source + note


# --- Training comparison ---------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    losses_metalcore: list[float] = field(default_factory=list)
    losses_torch: list[float] = field(default_factory=list)
    seconds_metalcore: float = 0.0
    seconds_torch: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max(abs(a - b) for a, b in zip(self.losses_metalcore, self.losses_torch))


def _batch(step: int, cfg, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    # Learnable synthetic data: each sequence counts upwards by a per-sequence stride, so the
    # next token is predictable from the previous two and the loss falls within a few steps.
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    ids = (start + stride * torch.arange(seq + 1)) % cfg.vocab_size
    return ids.to(device)


def train_comparison(device: torch.device, steps: int, full: bool) -> TrainResult:
    from metalcore.nn import TinyLlama, TinyLlamaConfig

    cfg = TinyLlamaConfig(hidden_size=128 if full else 64, num_hidden_layers=4 if full else 2)
    batch, seq = (16, 128) if full else (8, 64)
    torch.manual_seed(0)
    fused = TinyLlama(cfg, kernels=True).to(device)
    plain = TinyLlama(cfg, kernels=False).to(device)
    plain.load_state_dict(fused.state_dict())
    sched = lambda opt: torch.optim.lr_scheduler.OneCycleLR(  # noqa: E731
        opt, max_lr=3e-3, total_steps=steps
    )
    result = TrainResult(steps)
    for model, opt_cls, losses in (
        (fused, metalcore.optim.AdamW, result.losses_metalcore),
        (plain, torch.optim.AdamW, result.losses_torch),
    ):
        opt = opt_cls(model.parameters(), lr=torch.tensor(3e-3), weight_decay=0.01)
        scheduler = sched(opt)
        t0 = time.perf_counter()
        for step in range(steps):
            ids = _batch(step, cfg, batch, seq, device)
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        _sync(device)
        elapsed = time.perf_counter() - t0
        if model is fused:
            result.seconds_metalcore = elapsed
        else:
            result.seconds_torch = elapsed
    return result


# --- Report ----------------------------------------------------------------------------------


def write_plot(result: TrainResult, path: Path) -> str | None:
    """Writes the loss curves; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = range(1, result.steps + 1)
    ax.plot(steps, result.losses_torch, label="torch modules + torch.optim.AdamW", lw=2.5)
    ax.plot(steps, result.losses_metalcore, "--", label="metalcore modules + AdamW", lw=1.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("TinyLlama training: metalcore vs PyTorch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write_report(out: Path, device, checks, bench, bench_source, train, plot_note, seconds) -> Path:
    lines = [
        "# metalcore report",
        "",
        f"- metalcore {metalcore.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.platform()}",
        f"- device: **{device}**",
        f"- total time: {seconds:.1f} s",
        "",
        "## Self-check (against float64 references)",
        "",
        "| op | check | status | max abs error | note |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(f"| {c.op} | {c.what} | {c.status} | {c.max_err:.2e} | {c.detail} |")
    failed = sum(c.status == "FAIL" for c in checks)
    skipped = sum(c.status == "n/a" for c in checks)
    lines += [
        "",
        f"{len(checks) - failed - skipped} passed, {failed} failed, {skipped} not available "
        f"on {device.type}.",
        "",
        "## Benchmark",
        "",
        f"Source: {bench_source}. Speed-up = eager time / metalcore time.",
        "",
        "| op | shape | dtype | metalcore (ms) | eager PyTorch (ms) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in bench:
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.metalcore_ms:.3f} | {r.eager_ms:.3f} "
            f"| {r.speedup:.2f}x |"
        )
    lines += [
        "",
        "## Training: TinyLlama, metalcore vs PyTorch",
        "",
        f"Same initialisation and data, {train.steps} steps, OneCycle LR schedule (tensor lr). "
        "metalcore: `metalcore.nn` modules and `metalcore.optim.AdamW`; PyTorch: "
        "`torch.nn.RMSNorm`, eager rotary/SwiGLU math and `torch.optim.AdamW`.",
        "",
        "| step | loss (metalcore) | loss (PyTorch) |",
        "|---|---|---|",
    ]
    marks = sorted({0, train.steps // 4, train.steps // 2, 3 * train.steps // 4, train.steps - 1})
    for i in marks:
        lines.append(f"| {i + 1} | {train.losses_metalcore[i]:.4f} | {train.losses_torch[i]:.4f} |")
    lines += [
        "",
        f"Max |loss difference| over all steps: {train.max_abs_diff:.2e}. "
        f"Time: {train.seconds_metalcore:.2f} s (metalcore), {train.seconds_torch:.2f} s "
        "(PyTorch).",
        "",
        plot_note or "![loss curves](loss.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run_bench_suite(argv: list[str]) -> int:
    """``python -m metalcore bench [...]``: the full benchmark suite of a source checkout."""
    run = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    if not run.is_file():
        print("metalcore bench: bench/run.py not found; run it from a source checkout")
        return 1
    sys.argv = [str(run), *argv]
    runpy.run_path(str(run), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return run_bench_suite(argv[1:])
    parser = argparse.ArgumentParser(
        prog="metalcore",
        description="Self-check, benchmark and training comparison of metalcore on this machine.",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, mps or cuda")
    parser.add_argument("--full", action="store_true", help="more dtypes, shapes and steps")
    parser.add_argument("--out", default="metalcore-report", help="report folder")
    parser.add_argument("--steps", type=int, default=None, help="training steps (30; --full 200)")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    device = detect_device(args.device)
    steps = args.steps or (200 if args.full else 30)
    if steps < 1:
        parser.error("--steps must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    print(f"metalcore {metalcore.__version__} | torch {torch.__version__} | device {device}")
    checks = run_selfcheck(device, args.full)
    failed = [c for c in checks if c.status == "FAIL"]

    if args.no_bench:
        bench, source = [], "skipped (--no-bench)"
    else:
        print("benchmark ...", flush=True)
        bench, source = run_benchmarks(device, args.full)
        print(f"  {'op':<18} {'shape':<20} {'metalcore ms':>12} {'eager ms':>10} {'speed-up':>9}")
        for r in bench:
            print(
                f"  {r.op:<18} {r.shape:<20} {r.metalcore_ms:>12.3f} {r.eager_ms:>10.3f} "
                f"{r.speedup:>8.2f}x"
            )

    print(f"training TinyLlama for {steps} steps (metalcore, then PyTorch) ...", flush=True)
    train = train_comparison(device, steps, args.full)
    print(
        f"  final loss: metalcore {train.losses_metalcore[-1]:.4f}, "
        f"PyTorch {train.losses_torch[-1]:.4f} (max |diff| {train.max_abs_diff:.2e})"
    )
    plot_note = write_plot(train, out / "loss.png")
    if plot_note:
        print(f"  {plot_note}")
    report = write_report(
        out, device, checks, bench, source, train, plot_note, time.perf_counter() - t0
    )
    print(f"report: {report}" + ("" if plot_note else f" and {out / 'loss.png'}"))
    if failed:
        print(f"{len(failed)} self-check(s) FAILED: " + ", ".join(c.what for c in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
