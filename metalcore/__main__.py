"""``python -m metalcore`` (console script ``metalcore``): the main job.

On the best device present (mps, cuda, else cpu) it
1. self-checks every op against its float64 reference: reproducible samples of the op's spec
   (``metalcore.testing.op_specs``: shapes, dtypes, layouts, special values) checked by
   ``metalcore.testing.backends.check_sample``, the check the reliability tests run;
2. times each op against eager PyTorch and ``torch.compile`` of the same math (adamw: against
   ``torch.optim.AdamW`` with ``foreach=True`` and ``fused=True``) with the package's benchmark
   harness (``metalcore.testing.bench``), and says where metalcore is the slower one;
3. trains a tiny Llama-style model for a few steps with metalcore (modules + fused AdamW) and
   without (torch modules + ``torch.optim.AdamW``) from the same initialisation;
4. writes ``report.md``, ``loss.png`` (the two loss curves and their difference) and
   ``speedup.png`` (speed-up per op, machine named) to ``--out``; the plots need matplotlib.

The default run takes about a minute on a 2-core CPU, most of it compiling the torch.compile
baselines (``--no-compile`` skips them); ``--full`` checks more samples, times larger shapes and
bfloat16 too, and trains longer. Exit status 1 means a self-check failed.
"""

from __future__ import annotations

import argparse
import math
import platform
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
from metalcore.testing import backends, op_specs
from metalcore.testing import bench as h
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
    status: str = "ok"  # ok | FAIL | n/a
    samples: int = 0
    dtypes: list[str] = field(default_factory=list)
    detail: str = ""


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _samples_for(spec: op_specs.OpSpec, backend: backends.Backend, count: int) -> list:
    """``count`` of the spec's typical samples that this backend can run (Metal has no
    float64), one of each dtype first, so that a few samples still cover every dtype."""
    pool = [s for s in op_specs.typical_samples(spec, 4 * count) if backend.supports(s) is None]
    first = {}
    for s in pool:
        first.setdefault(s.dtype, s)
    picked = list(first.values())[:count]
    return picked + [s for s in pool if all(s is not p for p in picked)][: count - len(picked)]


def run_selfcheck(device: torch.device, full: bool) -> list[Check]:
    """Every op of the spec registry on ``device``: ``count`` reproducible samples each, checked
    against the float64 reference (values, NaN/Inf, shapes, dtypes, untouched inputs)."""
    count = 12 if full else 4
    try:
        backend = backends.backend(device.type)
    except KeyError:
        backend = None
    bar = Progress(len(op_specs.SPECS), "self-check")
    results = []
    for name, spec in op_specs.SPECS.items():
        check = Check(name)
        why = (
            f"no metalcore backend for {device.type}"
            if backend is None
            else backend.op_unavailable(name)
        )
        if why:
            check.status, check.detail = "n/a", why
        else:
            samples = _samples_for(spec, backend, count)
            check.dtypes = sorted({_short(s.dtype) for s in samples})
            for s in samples:
                try:
                    backends.check_sample(spec, backend, s)
                except Exception as e:  # a wrong value or a crash: a failed check, with why
                    check.status = "FAIL"
                    check.detail = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    break
                check.samples += 1
        results.append(check)
        status = check.status + (f" ({check.detail})" if check.detail else "")
        if check.status == "ok":
            status += f" ({check.samples} samples: {', '.join(check.dtypes)})"
        bar.step(name, status)
    return results


# --- Benchmarks ------------------------------------------------------------------------------

PROVIDERS = ("metalcore", "eager", "compile")


@dataclass
class BenchRow:
    op: str
    shape: str
    dtype: str
    ms: dict[str, float | None]  # provider -> median ms (None: failed or not run)
    baselines: str = ""  # what "eager" and "compile" are, where not the plain torch math
    notes: list[str] = field(default_factory=list)

    def speedup(self, provider: str) -> float | None:
        mine, theirs = self.ms.get("metalcore"), self.ms.get(provider)
        return theirs / mine if mine and theirs else None


def _copies_of(tensors: list[torch.Tensor]) -> Callable[[], tuple]:
    """An input-set factory for the harness's rotation: fresh memory per set (what keeps the
    timed calls out of the cache) at the cost of a copy, not of drawing random numbers again."""
    return lambda: tuple(t.clone() for t in tensors)


def _elementwise_cases(device: torch.device, m: int, n: int, dtype: torch.dtype):
    """(op, input-set factory, metalcore call, torch formulation, bytes moved) for the row-wise
    and activation ops; eager and compiled baselines both run the torch formulation."""
    es = torch.finfo(dtype).bits // 8

    def make(count: int, with_weight: bool = False):
        base = [torch.randn(m, n, device=device, dtype=dtype) for _ in range(count)]
        if with_weight:
            base.append(1 + 0.1 * torch.randn(n, device=device, dtype=dtype))
        return _copies_of(base)

    def rms(x, w):
        return F.rms_norm(x, (n,), w, 1e-6)

    def add_rms(x, r, w):
        s = x + r
        return F.rms_norm(s, (n,), w, 1e-6), s

    def sw(a, b):
        return F.silu(a) * b

    mn = m * n * es
    return [
        ("rmsnorm", make(1, True), lambda x, w: mf.rmsnorm(x, w, 1e-6), rms, 2 * mn),
        (
            "fused_add_rmsnorm",
            make(2, True),
            lambda x, r, w: mf.fused_add_rmsnorm(x, r, w, 1e-6),
            add_rms,
            4 * mn,
        ),
        ("silu", make(1), mf.silu, F.silu, 2 * mn),
        ("gelu", make(1), mf.gelu, F.gelu, 2 * mn),
        ("swiglu", make(2), mf.swiglu, sw, 3 * mn),
    ]


def _bench_shape(suite: h.Suite, device, m: int, n: int, dtype, full: bool, compile_: bool):
    """Times every op at one size and dtype; returns the rows of the report's table."""
    rows: list[BenchRow] = []
    providers = PROVIDERS if compile_ else PROVIDERS[:2]
    shape = f"{m}x{n}"

    def record(op, case, make, mine, plain, nbytes, baselines=""):
        fns = {"metalcore": mine, "eager": plain}
        if "compile" in providers:
            fns["compile"] = h.compiled(plain)
        start = len(suite.rows)
        for provider in providers:
            h.timed_directions(
                suite, op, case, provider, dtype, make, fns[provider], nbytes, 0, nbytes, ("fwd",)
            )
        rows.append(_row(op, case, dtype, suite.rows[start:], baselines))

    for op, make, mine, plain, nbytes in _elementwise_cases(device, m, n, dtype):
        if has_kernel(op, device.type):
            record(op, shape, make, mine, plain, nbytes)

    # rope: Llama-7B-like heads (32 query, 8 key/value, head_dim 128) at a short sequence.
    b, hq, hk, s, d = 1, 32, 8, (1024 if full else 256), 128
    if has_kernel("rope", device.type):
        ang = torch.randn(s, d, device=device)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

        make_qk = _copies_of(
            [
                torch.randn(b, hq, s, d, device=device, dtype=dtype),
                torch.randn(b, hk, s, d, device=device, dtype=dtype),
            ]
        )

        qk_bytes = 2 * b * (hq + hk) * s * d * torch.finfo(dtype).bits // 8
        record(
            "rope",
            f"q {b}x{hq}x{s}x{d}",
            make_qk,
            lambda q, k: mf.rope(q, k, cos, sin),
            lambda q, k: apply_rotary_torch(q, k, cos, sin),
            qk_bytes,
            "eager: Hugging Face's rotate_half math",
        )

    # adamw: one step over 8 float32 tensors of m*n/8 elements; PyTorch's counterparts are its
    # own optimizers (foreach, and fused=True, its fastest), not a compiled formula.
    if dtype == torch.float32 and has_kernel("adamw", device.type):
        numel = m * n // 8
        grads = [torch.randn(numel, device=device) for _ in range(8)]
        start = len(suite.rows)
        case = f"8 x {numel}"
        for provider, make_opt in (
            ("metalcore", lambda ps: metalcore.optim.AdamW(ps, lr=1e-4)),
            ("eager", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)),
            ("compile", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        ):
            params = [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(8)]
            for p, g in zip(params, grads):
                p.grad = g
            try:
                opt = make_opt(params)
            except Exception as e:  # noqa: BLE001  (no fused AdamW on this device: a note)
                suite.add(h.failed_row("adamw", case, "step", provider, torch.float32, e))
                continue
            suite.measure("adamw", case, "step", provider, torch.float32, opt.step, 28 * 8 * numel)
            del opt, params
        rows.append(
            _row(
                "adamw",
                case,
                torch.float32,
                suite.rows[start:],
                "eager: torch.optim.AdamW(foreach=True); compile: AdamW(fused=True)",
            )
        )
    return rows


def _row(op: str, case: str, dtype: torch.dtype, measured: list[h.Row], baselines: str):
    row = BenchRow(op, case, _short(dtype), {r.provider: r.ms for r in measured}, baselines)
    for r in measured:
        if r.ms is None and r.note:
            row.notes.append(f"{r.provider} {r.note}")
    return row


def run_benchmarks(
    device: torch.device,
    full: bool,
    compile_: bool = True,
    shapes: list[tuple[int, int]] | None = None,
) -> tuple[list[BenchRow], str]:
    """The benchmark table: every op at each (rows, hidden) shape (default 2048x1024, and
    8192x4096 with ``full``) in float32 (and bfloat16 with ``full``)."""
    note = ""
    if device.type == "cpu" and keep_freed_cpu_memory():
        note = (
            "; CPU timings keep freed memory in the process (glibc would otherwise hand it back"
            " and re-fault every page of each output and temporary on the next call)"
        )
    suite = h.Suite(device.type, quick=not full, quiet=True)
    shapes = shapes or [(2048, 1024)] + ([(8192, 4096)] if full else [])
    dtypes = [torch.float32] + ([torch.bfloat16] if full else [])
    rows: list[BenchRow] = []
    for m, n in shapes:
        for dtype in dtypes:
            rows += _bench_shape(suite, device, m, n, dtype, full, compile_)
    source = (
        "the package's benchmark harness (`metalcore.testing.bench`): median wall time of the "
        "forward (one step for adamw), rotating copies of the inputs (up to 256 MB) so that "
        "repeated calls do not run from the cache"
    )
    return rows, source + note


def is_slower(speedup: float | None) -> bool:
    """metalcore slower than the baseline, as the report prints it (0.996 reads 1.00x: even)."""
    return speedup is not None and round(speedup, 2) < 1.0


def slower_rows(rows: list[BenchRow]) -> list[tuple[BenchRow, str, float]]:
    """(row, baseline, speed-up) wherever metalcore measured slower than a PyTorch baseline."""
    out = []
    for r in rows:
        for provider in PROVIDERS[1:]:
            s = r.speedup(provider)
            if is_slower(s):
                out.append((r, provider, s))
    return out


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
        h.sync(device.type)
        elapsed = time.perf_counter() - t0
        if model is fused:
            result.seconds_metalcore = elapsed
        else:
            result.seconds_torch = elapsed
    return result


# --- Plots -----------------------------------------------------------------------------------


def plot_losses(result: TrainResult, path: Path, machine: str) -> None:
    """The two loss curves on top, their difference below: the curves alone lie on top of each
    other, so the second panel shows how far apart they are at every step."""
    plt = h.pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    steps = list(range(1, result.steps + 1))
    diff = [a - b for a, b in zip(result.losses_metalcore, result.losses_torch)]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 5.2), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    top.plot(steps, result.losses_torch, lw=3, color="#9ecae1", label="PyTorch modules + AdamW")
    top.plot(
        steps,
        result.losses_metalcore,
        "--",
        lw=1.4,
        color="#d94801",
        label="metalcore modules + AdamW",
    )
    top.set_ylabel("cross-entropy loss")
    top.set_title(f"TinyLlama training, same initialisation and data\n{machine}", fontsize=9)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.axhline(0.0, color="k", lw=0.8)
    bottom.plot(steps, diff, "o-", ms=3, lw=1, color="#d94801")
    bottom.set_ylabel("metalcore − PyTorch")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    # One float32 rounding step (ulp) of the loss at each step: differences inside the band
    # are the two implementations rounding differently, not training diverging.
    eps = torch.finfo(torch.float32).eps
    ulps = [eps * 2.0 ** math.floor(math.log2(abs(v))) if v else eps for v in result.losses_torch]
    bottom.fill_between(
        steps,
        [-u for u in ulps],
        ulps,
        color="#9ecae1",
        alpha=0.35,
        lw=0,
        step="mid",
        label="±1 float32 ulp of the loss",
    )
    worst = max(abs(d) for d in diff)
    in_ulps = max(abs(d) / u for d, u in zip(diff, ulps))
    text = (
        "identical to the last bit"
        if worst == 0
        else f"max |difference| {worst:.2g}, at most {in_ulps:.3g} float32 ulp of the loss"
    )
    ulp = max(ulps)
    bottom.set_title(text, fontsize=8, loc="left")
    bottom.legend(fontsize=7, loc="lower right")
    bottom.set_ylim(-max(worst, ulp) * 1.6, max(worst, ulp) * 1.6)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_speedups(rows: list[BenchRow], path: Path, machine: str) -> None:
    """Speed-up per op against eager PyTorch and torch.compile: bars grow from the 1x line on a
    log axis, right where metalcore is faster and left (hatched, value in red) where it is
    slower, so 0.5x reads as far from even as 2x."""
    plt = h.pyplot()
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if r.speedup("eager") or r.speedup("compile")]
    if not rows:
        return
    colors = {"eager": "#3182bd", "compile": "#31a354"}
    height = 0.38
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.55 * len(rows)), dpi=120)
    ys = list(range(len(rows)))[::-1]
    values = [1.0]
    for j, provider in enumerate(("eager", "compile")):
        for y, r in zip(ys, rows):
            s = r.speedup(provider)
            if s is None:
                continue
            values.append(s)
            yy = y + (0.5 - j) * height
            slower = is_slower(s)
            ax.barh(
                yy,
                s - 1,
                height,
                left=1,
                color=colors[provider],
                hatch="////" if slower else None,
                edgecolor="#a50f15" if slower else "k",
                lw=0.6,
            )
            ax.text(
                s / 1.04 if slower else s * 1.04,
                yy,
                f"{s:.2f}x",
                va="center",
                ha="right" if slower else "left",
                fontsize=7,
                color="#a50f15" if slower else "k",
            )
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 1.6, max(values) * 1.6)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r.op}\n{r.shape} {r.dtype}" for r in rows], fontsize=7)
    ax.set_xlabel("speed-up: PyTorch time / metalcore time (right of 1x: metalcore faster)")
    ax.set_title(f"metalcore speed-up per op\n{machine}", fontsize=9)
    ax.legend(
        handles=[
            Patch(color=colors["eager"], label="vs eager PyTorch (adamw: foreach)"),
            Patch(color=colors["compile"], label="vs torch.compile (adamw: fused=True)"),
            Patch(facecolor="white", edgecolor="#a50f15", hatch="////", label="metalcore slower"),
        ],
        fontsize=7,
        loc="best",
    )
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(train: TrainResult, bench: list[BenchRow], out: Path, machine: str) -> list[str]:
    """Writes loss.png and (with benchmark rows) speedup.png; returns the files written, or
    raises ImportError when matplotlib is missing."""
    if h.pyplot() is None:
        raise ImportError("matplotlib")
    plot_losses(train, out / "loss.png", machine)
    written = ["loss.png"]
    if any(r.speedup("eager") or r.speedup("compile") for r in bench):
        plot_speedups(bench, out / "speedup.png", machine)
        written.append("speedup.png")
    return written


# --- Report ----------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _x(v: float | None) -> str:
    if v is None:
        return "—"
    return f"**{v:.2f}x**" if is_slower(v) else f"{v:.2f}x"


def _bench_section(bench: list[BenchRow], source: str) -> list[str]:
    lines = [
        "## Benchmark",
        "",
        f"Source: {source}. Speed-up = PyTorch time / metalcore time; bold: metalcore is the "
        "slower one. Baselines are the plain torch formulation of each op, eager and under "
        "`torch.compile`; for adamw, `torch.optim.AdamW` with `foreach=True` and `fused=True`.",
        "",
        "| op | shape | dtype | metalcore (ms) | eager (ms) | torch.compile (ms) "
        "| vs eager | vs compile | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench:
        note = "; ".join([r.baselines] + r.notes if r.baselines else r.notes)
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {_ms(r.ms.get('metalcore'))} "
            f"| {_ms(r.ms.get('eager'))} | {_ms(r.ms.get('compile'))} "
            f"| {_x(r.speedup('eager'))} | {_x(r.speedup('compile'))} | {note} |"
        )
    slow = slower_rows(bench)
    lines.append("")
    if slow:
        names = {"eager": "eager PyTorch", "compile": "torch.compile"}
        items = "; ".join(
            f"{r.op} at {r.shape} {r.dtype}: {s:.2f}x of {names[p]}" for r, p, s in slow
        )
        lines += [
            f"**Where metalcore is slower on this machine** (as measured, rows kept): {items}. "
            "At these sizes, on this machine, PyTorch's own kernel for the op (or the code "
            "torch.compile generates) is faster than metalcore's. Timings on a busy machine "
            "also move by tens of percent between runs, so a ratio near 1x can land on either "
            "side.",
            "",
        ]
    elif bench:
        lines += ["metalcore is at least as fast as every PyTorch baseline in this table.", ""]
    return lines


def write_report(
    out: Path,
    device,
    machine: str,
    checks: list[Check],
    bench: list[BenchRow],
    bench_source: str,
    train: TrainResult,
    plots: list[str],
    plot_note: str | None,
    seconds: float,
) -> Path:
    lines = [
        "# metalcore report",
        "",
        f"- metalcore {metalcore.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.platform()}",
        f"- device: **{device}**",
        f"- machine: {machine}",
        f"- total time: {seconds:.1f} s",
        "",
        "## Self-check (against float64 references)",
        "",
        "Each op runs reproducible samples of its spec (`metalcore.testing.op_specs`: shapes, "
        "dtypes, memory layouts and special values) and is compared with its float64 "
        "reference within the spec's per-dtype tolerance; inputs must come back untouched. "
        "Backward ops are checked as ops of their own. Rerun one op with "
        "`python -m metalcore.testing.smoke --op NAME`.",
        "",
        "| op | samples | dtypes | status | note |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(f"| {c.op} | {c.samples} | {', '.join(c.dtypes)} | {c.status} | {c.detail} |")
    failed = sum(c.status == "FAIL" for c in checks)
    skipped = sum(c.status == "n/a" for c in checks)
    lines += [
        "",
        f"{len(checks) - failed - skipped} passed, {failed} failed, {skipped} not available "
        f"on {device.type}.",
        "",
    ]
    lines += _bench_section(bench, bench_source)
    if "speedup.png" in plots:
        lines += ["![speed-up per op](speedup.png)", ""]
    lines += [
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
        f"Max |loss difference| over all steps: {train.max_abs_diff:.2e} (the kernels round "
        "differently from PyTorch's unfused math, by float32 roundings). "
        f"Time: {train.seconds_metalcore:.2f} s (metalcore), {train.seconds_torch:.2f} s "
        "(PyTorch).",
        "",
        plot_note or "![loss curves and their difference](loss.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --- Command ---------------------------------------------------------------------------------


def _print_bench(bench: list[BenchRow]) -> None:
    print(
        f"  {'op':<18} {'shape':<16} {'dtype':<9} {'metalcore ms':>12} {'eager ms':>9} "
        f"{'compile ms':>10} {'vs eager':>8} {'vs compile':>10}"
    )
    for r in bench:
        print(
            f"  {r.op:<18} {r.shape:<16} {r.dtype:<9} {_ms(r.ms.get('metalcore')):>12} "
            f"{_ms(r.ms.get('eager')):>9} {_ms(r.ms.get('compile')):>10} "
            f"{_x(r.speedup('eager')).strip('*'):>8} {_x(r.speedup('compile')).strip('*'):>10}"
        )
    for r, provider, s in slower_rows(bench):
        print(f"  note: metalcore {r.op} ({r.shape} {r.dtype}) is {s:.2f}x of {provider} here")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        print(
            "metalcore: the benchmark suite runs from a source checkout: python bench/run.py "
            + " ".join(argv[1:])
            + "\n(python -m metalcore --full times every op from an installed package)",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="metalcore",
        description="Self-check, benchmark and training comparison of metalcore on this machine.",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, mps or cuda")
    parser.add_argument("--full", action="store_true", help="more samples, shapes, steps; bf16")
    parser.add_argument("--out", default="metalcore-report", help="report folder")
    parser.add_argument("--steps", type=int, default=None, help="training steps (30; --full 200)")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile baselines (faster)"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    device = detect_device(args.device)
    steps = args.steps or (200 if args.full else 30)
    if steps < 1:
        parser.error("--steps must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    machine = h.machine_label(h.environment(device.type))

    print(f"metalcore {metalcore.__version__} | {machine} | device {device}")
    checks = run_selfcheck(device, args.full)
    failed = [c for c in checks if c.status == "FAIL"]

    if args.no_bench:
        bench, source = [], "skipped (--no-bench)"
    else:
        what = "" if args.no_compile else " (compiling the torch.compile baselines first)"
        print(f"benchmark{what} ...", flush=True)
        bench, source = run_benchmarks(device, args.full, compile_=not args.no_compile)
        _print_bench(bench)

    print(f"training TinyLlama for {steps} steps (metalcore, then PyTorch) ...", flush=True)
    train = train_comparison(device, steps, args.full)
    print(
        f"  final loss: metalcore {train.losses_metalcore[-1]:.4f}, "
        f"PyTorch {train.losses_torch[-1]:.4f} (max |diff| {train.max_abs_diff:.2e})"
    )
    try:
        plots, plot_note = write_plots(train, bench, out, machine), None
    except ImportError:
        plots = []
        plot_note = "matplotlib is not installed: no plots (pip install matplotlib)"
        print(f"  {plot_note}")
    report = write_report(
        out,
        device,
        machine,
        checks,
        bench,
        source,
        train,
        plots,
        plot_note,
        time.perf_counter() - t0,
    )
    print(f"report: {report}" + "".join(f" and {out / p}" for p in plots))
    if failed:
        print(f"{len(failed)} self-check(s) FAILED: " + ", ".join(c.op for c in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
