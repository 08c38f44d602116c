"""The benchmark harness of metalcore: timing per device, copy ceiling, input rotation, peak
memory, host overhead, result rows with the software and hardware versions, JSON and PNG output.

``python -m metalcore`` times its table with it, and the suite in a source checkout's ``bench/``
(``bench/run.py`` and one ``bench_<family>.py`` per op family) is built on it, so both measure
the same way.

Timing: CUDA uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between repetitions,
median) when Triton is present, else CUDA events around each repetition; MPS and CPU use a host
clock around each repetition with ``torch.mps.synchronize`` / nothing to wait for. Inputs are
random normal values (never zeros) and, when one set fits in the last-level cache, several sets
are rotated so that repetitions do not re-read cached data.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROTATE_BYTES = 256 << 20  # rotate input sets until this many bytes (> 5x the H100's 50 MB L2)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_model() -> str:
    """The host CPU's marketing name (``platform.processor()`` is only "x86_64" on Linux)."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        elif sys.platform == "darwin":
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if out.stdout.strip():
                return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Device, driver and library versions recorded in every result row."""
    env = {
        "device_type": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "triton": None,
        "driver": None,
        "cuda": torch.version.cuda,
    }
    if have_triton():
        import triton

        env["triton"] = triton.__version__
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["sms"] = props.multi_processor_count
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    elif device == "mps":
        env["device"] = platform.machine() + " (MPS)"
    else:
        env["device"] = env["cpu"]
    try:
        import metalcore

        env["metalcore"] = metalcore.__version__
    except ImportError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        env["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def machine_label(env: dict) -> str:
    """One line naming the machine of a run: device (the CPU with its threads and the vector
    capability torch dispatches to), host CPU for a GPU, torch version."""
    if env["device_type"] == "cpu":
        threads = f"{env['threads']} thread" + ("s" if env["threads"] != 1 else "")
        what = f"CPU {env['cpu']} ({threads}, {env['cpu_capability']})"
    else:
        what = f"{env['device_type'].upper()} {env.get('device')} (host {env['cpu']})"
    return f"{what}, torch {env['torch']}"


def time_ms(
    fn: Callable[[], object],
    device: str,
    *,
    grad_to_none: list[torch.Tensor] | None = None,
    warmup_ms: float = 25,
    rep_ms: float = 200,
) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device == "cuda" and have_triton():
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"
            )
        )
    # Estimate one call, then warm up and repeat for the requested durations.
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6) * 1e3
    n_warm = max(1, int(warmup_ms / est))
    n_rep = max(5, min(1000, int(rep_ms / est)))
    for _ in range(n_warm):
        fn()
    sync(device)
    times = []
    for _ in range(n_rep):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_ceiling_gbps(device: str, nbytes: int) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


class Rotating:
    """Cycles through ``count`` input sets made by ``make()`` so repeated calls miss the cache."""

    def __init__(self, make: Callable[[], tuple], set_bytes: int, max_sets: int = 8):
        count = max(1, min(max_sets, math.ceil(ROTATE_BYTES / max(set_bytes, 1))))
        self.sets = [make() for _ in range(count)]
        self.i = 0

    def next(self) -> tuple:
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    def leaves(self) -> list[torch.Tensor]:
        return [t for s in self.sets for t in s if isinstance(t, torch.Tensor) and t.requires_grad]


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Memory allocated by one call above what was allocated before it (CUDA/MPS), in MiB."""
    if device == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if device == "mps":
        sync(device)
        base = torch.mps.driver_allocated_memory()
        fn()
        sync(device)
        return max(0.0, (torch.mps.driver_allocated_memory() - base) / 2**20)
    return None


def host_pair_us(
    fn: Callable[[], object],
    bare: Callable[[], object],
    device: str,
    *,
    calls: int = 200,
    rounds: int = 31,
) -> tuple[float, float, float]:
    """Host microseconds per call of ``fn``, of a baseline ``bare``, and of their difference,
    with tiny inputs (the device keeps up, so this is the dispatch + launch cost the host pays).
    Interleaved: each round times a block of ``calls`` calls of each, in alternating order, and
    each result is a median over rounds (the difference: of the per-round differences). Host
    time drifts by microseconds within a run (clocks, other processes); pairing the blocks
    round by round cancels the drift that two separate long loops would each absorb."""
    fns = (fn, bare)
    for f in fns:
        for _ in range(50):
            f()
    sync(device)
    per: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            f = fns[i]
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            t1 = time.perf_counter()
            sync(device)  # the device drains outside the timed block
            per[i].append((t1 - t0) / calls * 1e6)
    diff = statistics.median(a - b for a, b in zip(per[0], per[1], strict=True))
    return statistics.median(per[0]), statistics.median(per[1]), diff


@dataclass
class Row:
    op: str
    case: str
    direction: str  # fwd | bwd | fwd+bwd | step | host
    provider: str
    dtype: str
    ms: float | None
    gbps: float | None
    pct_copy: float | None
    bytes: int | None
    peak_mb: float | None = None
    host_us: float | None = None
    note: str = ""
    env: dict = field(default_factory=dict)


def failed_row(
    op: str,
    case: str,
    direction: str,
    provider: str,
    dtype: torch.dtype,
    error: BaseException,
    nbytes: int | None = None,
) -> Row:
    """The row of a measurement that raised: no time, the error's first line as its note."""
    first = str(error).splitlines()[0][:200] if str(error) else ""
    dt = str(dtype).replace("torch.", "")
    note = f"failed: {type(error).__name__}: {first}"
    return Row(op, case, direction, provider, dt, None, None, None, nbytes, note=note)


class Suite:
    """Collects rows for one device and writes them out."""

    def __init__(self, device: str, quick: bool, quiet: bool = False):
        self.device = device
        self.quick = quick
        self.quiet = quiet  # no line per measurement (callers that print their own table)
        self.env = environment(device)
        self.rows: list[Row] = []
        nbytes = {"cuda": 1 << 30, "mps": 256 << 20, "cpu": 64 << 20}[device]
        if quick and device != "cuda":
            nbytes //= 4
        self.copy_gbps = copy_ceiling_gbps(device, nbytes)
        self.add(
            Row(
                "copy",
                f"{nbytes >> 20} MiB",
                "copy",
                "torch",
                "float32",
                None,
                self.copy_gbps,
                100.0,
                2 * nbytes,
            )
        )

    def add(self, row: Row) -> Row:
        row.env = self.env
        self.rows.append(row)
        return row

    def measure(
        self,
        op: str,
        case: str,
        direction: str,
        provider: str,
        dtype: torch.dtype,
        fn: Callable[[], object],
        nbytes: int,
        *,
        grad_to_none: list[torch.Tensor] | None = None,
        note: str = "",
    ) -> Row:
        try:
            fn()  # compile / autotune outside the timed region
            sync(self.device)
            rep = 60 if self.quick else 200
            ms = time_ms(fn, self.device, grad_to_none=grad_to_none, rep_ms=rep)
            peak = peak_memory_mb(fn, self.device)
        except Exception as e:  # noqa: BLE001  (a failing baseline is recorded, not fatal)
            row = failed_row(op, case, direction, provider, dtype, e, nbytes)
            self.log(f"  {op:18s} {case:28s} {direction:8s} {provider:10s} {row.note.upper()}")
            return self.add(row)
        gbps = nbytes / (ms * 1e-3) / 1e9
        row = Row(
            op,
            case,
            direction,
            provider,
            str(dtype).replace("torch.", ""),
            ms,
            gbps,
            100 * gbps / self.copy_gbps,
            nbytes,
            peak,
            note=note,
        )
        self.log(
            f"  {op:18s} {case:28s} {direction:8s} {provider:10s} {ms:9.4f} ms "
            f"{gbps:8.1f} GB/s ({row.pct_copy:5.1f}% of copy)"
        )
        return self.add(row)

    def host(
        self, op: str, provider: str, fn: Callable[[], object], x: torch.Tensor, note: str = ""
    ) -> Row:
        """Host time per call of ``fn`` next to a bare one-kernel ATen op on ``x`` called the
        same way (``torch.ops.aten.neg.default``: the torch.ops entry, one allocation, one
        launch) and through its generated binding (``torch.neg``)."""
        us, bare_ops, over_ops = host_pair_us(
            fn, lambda: torch.ops.aten.neg.default(x), self.device
        )
        _, bare_fast, over_fast = host_pair_us(fn, lambda: torch.neg(x), self.device)
        row = Row(
            op,
            "tiny",
            "host",
            provider,
            str(x.dtype).replace("torch.", ""),
            None,
            None,
            None,
            None,
            host_us=us,
            note=f"bare torch.ops.aten.neg {bare_ops:.2f} us (over it {over_ops:+.2f})"
            f"; torch.neg {bare_fast:.2f} us (over it {over_fast:+.2f})"
            "; medians of 31 interleaved rounds of 200 calls" + (f"; {note}" if note else ""),
        )
        self.log(
            f"  {op:18s} host {provider:20s} {us:6.2f} us/call | bare torch.ops.aten.neg "
            f"{bare_ops:.2f} us, torch.neg {bare_fast:.2f} us"
        )
        return self.add(row)

    def log(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)

    def write(self, json_path: Path, png_path: Path | None, command: str) -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "command": command,
            "env": self.env,
            "copy_gbps": self.copy_gbps,
            "rows": [
                {k: v for k, v in asdict(r).items() if k != "env"} | {"env": r.env}
                for r in self.rows
            ],
        }
        json_path.write_text(json.dumps(data, indent=1))
        if png_path is not None:
            plot(self.rows, self.copy_gbps, png_path, self.env.get("device", self.device))


def pyplot():
    """matplotlib's pyplot on its file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(rows: list[Row], copy_gbps: float, path: Path, title: str) -> None:
    """Grouped bars of GB/s per (op, case, direction), one colour per provider."""
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    rows = [r for r in rows if r.gbps is not None and r.op != "copy"]
    groups = list(dict.fromkeys(f"{r.op}\n{r.case}\n{r.direction}" for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    if not groups:
        return
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(groups)), 5.5))
    for j, p in enumerate(providers):
        xs, ys = [], []
        for i, g in enumerate(groups):
            for r in rows:
                if r.provider == p and f"{r.op}\n{r.case}\n{r.direction}" == g:
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(r.gbps)
        ax.bar(xs, ys, width, label=p)
    ax.axhline(copy_gbps, color="k", linestyle="--", linewidth=1, label="device copy")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=6, rotation=90)
    ax.set_ylabel("model GB/s (fewest bytes / median time)")
    ax.set_title(f"metalcore benchmarks on {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def try_liger():
    """The liger_kernel.ops module namespace when Liger-Kernel is installed, else None."""
    try:
        import liger_kernel.ops  # noqa: F401
    except Exception:  # noqa: BLE001  (missing or broken: the provider is skipped)
        return None
    import liger_kernel.ops as lk

    return lk


def compiled(fn: Callable) -> Callable:
    """torch.compile with static shapes; the recompile limit is raised so that a baseline timed at
    many shapes never silently falls back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(fn, dynamic=False)


def timed_directions(
    suite: Suite,
    op: str,
    case: str,
    provider: str,
    dtype: torch.dtype,
    make: Callable[[], tuple],
    forward: Callable[..., object],
    bytes_fwd: int,
    bytes_bwd: int,
    set_bytes: int,
    directions: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd"),
    note: str = "",
) -> None:
    """Times forward (no grad), backward alone (a retained graph, grads reset each repetition)
    and forward+backward for ``forward(*inputs)``; ``make()`` returns leaf tensors that require
    grad plus any constants. The output's first tensor is backpropagated with a random grad."""

    def first(out):
        return out[0] if isinstance(out, tuple | list) else out

    rot = Rotating(make, set_bytes)
    leaves = rot.leaves()
    if "fwd" in directions:

        def fwd():
            with torch.no_grad():
                return forward(*rot.next())

        suite.measure(op, case, "fwd", provider, dtype, fwd, bytes_fwd, note=note)
    if "bwd" in directions or "fwd+bwd" in directions:
        outs = []
        try:
            for s in rot.sets:
                y = first(forward(*s))
                outs.append((y, torch.randn_like(y)))
        except Exception as e:  # noqa: BLE001  (recorded as a failed row)
            for d in ("bwd", "fwd+bwd"):
                if d in directions:
                    suite.add(failed_row(op, case, d, provider, dtype, e))
            return
        k = {"i": 0}

        def bwd():
            y, dy = outs[k["i"]]
            k["i"] = (k["i"] + 1) % len(outs)
            y.backward(dy, retain_graph=True)

        def full():
            s = rot.next()
            y = first(forward(*s))
            y.backward(outs[0][1])

        if "bwd" in directions:
            suite.measure(
                op, case, "bwd", provider, dtype, bwd, bytes_bwd, grad_to_none=leaves, note=note
            )
        if "fwd+bwd" in directions:
            suite.measure(
                op,
                case,
                "fwd+bwd",
                provider,
                dtype,
                full,
                bytes_fwd + bytes_bwd,
                grad_to_none=leaves,
                note=note,
            )
        del outs
