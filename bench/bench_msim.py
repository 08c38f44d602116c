"""msim throughput benchmark (not a test): context-switch rate and kernel wall times.

python bench/bench_msim.py            # prints a markdown table (copied into msim/README.md)
                                      # about a minute on the 2-core VM
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import msim

KERNELS = Path(__file__).resolve().parents[1] / "tests" / "msim" / "kernels"

SWITCH_KERNEL = """\
#include <metal_stdlib>
using namespace metal;
// Pure synchronisation: every barrier costs each simulated thread two fiber switches.
kernel void barriers(device uint* out [[buffer(0)]], constant uint& iters [[buffer(1)]],
                     uint tid [[thread_index_in_threadgroup]]) {
  uint acc = 0;
  for (uint i = 0; i < iters; ++i) {
    acc += i ^ tid;
    threadgroup_barrier(mem_flags::mem_none);
  }
  out[tid] = acc;
}
"""


CPU = []  # CPU seconds (all threads) of the best run, next to its wall time


def best_of(fn, *args, repeat=3, **kwargs) -> float:
    """Best wall time; CPU time is recorded too since shared CI machines inflate wall time."""
    best = None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(*args, **kwargs)
        t, c = time.perf_counter() - t0, time.process_time() - c0
        if best is None or t < best[0]:
            best = (t, c)
    CPU.append(best[1])
    return best[0]


def main() -> None:
    lib = msim.load(sorted(KERNELS.glob("*.metal")))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "switch.metal"
        src.write_text(SWITCH_KERNEL)
        sw = msim.load([src])
    rows = []
    workers = os.cpu_count() or 1

    out = np.zeros(1024, np.uint32)
    iters = 2000
    t = best_of(sw.dispatch, "barriers", [out, iters], (1024,), threadgroups=(workers,))
    switches = 2 * 1024 * iters * workers
    rows.append(
        (
            "context switches (1024 threads x 2000 barriers per worker)",
            f"{t * 1e3:.0f} ms",
            f"{switches / t / 1e6:.0f} M switches/s",
        )
    )

    for rows_, cols in ((64, 4096), (4096, 4096)):
        x = np.random.default_rng(0).standard_normal((rows_, cols)).astype(np.float32)
        w = np.ones(cols, np.float32)
        y = np.empty_like(x)
        for tpg in (256, 1024):
            for guard in (1, 0):
                args = [x, w, y, cols, np.float32(1e-6)]
                t = best_of(
                    lib.dispatch,
                    "rmsnorm_float",
                    args,
                    (tpg,),
                    threadgroups=(rows_,),
                    guard=guard,
                    repeat=3 if rows_ == 64 else 1,
                )
                rows.append(
                    (
                        f"RMSNorm fp32 {rows_}x{cols}, {tpg} threads/tg, guard={guard}",
                        f"{t * 1e3:.1f} ms",
                        "",
                    )
                )
    n = 16 * 1024 * 1024
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    y = np.empty_like(x)
    for name, threads in (("silu_float", n), ("silu_vec4", n // 4)):
        t = best_of(lib.dispatch, name, [x, y, n], (256,), threads=(threads,), repeat=1)
        rows.append(
            (
                f"{name} 16M elements ({threads} threads)",
                f"{t * 1e3:.0f} ms",
                f"{threads / t / 1e6:.0f} M threads/s",
            )
        )
    # ulp mode's price: every bounded math call goes through the runtime hook (SiLU: one exp).
    n = 1024 * 1024
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    y = np.empty_like(x)
    for mode in ("off", "random"):
        t = best_of(lib.dispatch, "silu_float", [x, y, n], (256,), threads=(n,), ulp=mode)
        rows.append((f"silu_float 1M elements, ulp={mode}", f"{t * 1e3:.0f} ms", ""))
    print(f"| workload ({workers} workers) | wall time | CPU time | rate (wall) |")
    print("| --- | --- | --- | --- |")
    for r, cpu in zip(rows, CPU):
        print(f"| {r[0]} | {r[1]} | {cpu * 1e3:.0f} ms | {r[2]} |")


if __name__ == "__main__":
    main()
