"""adamw: one optimizer step over many fp32 tensors. metalcore vs torch.optim.AdamW foreach,
fused=True, and torch.compile of the foreach step. Byte model: 28 B/param (read p, g, m, v;
write p, m, v)."""

from __future__ import annotations

import torch

import metalcore
from metalcore._dispatch import has_kernel
from metalcore.testing import bench as h


def config(device: str, quick: bool):
    if device == "cuda":
        return (64, 4 * 1024 * 1024) if not quick else (64, 1024 * 1024)  # ~268M / ~67M params
    if device == "mps":
        return (64, 512 * 1024)
    return (16, 256 * 1024) if quick else (64, 256 * 1024)


def run(suite: h.Suite) -> None:
    dev = suite.device
    count, size = config(dev, suite.quick)
    nparams = count * size
    case = f"{nparams / 1e6:.0f}M params in {count} tensors"
    nbytes = 28 * nparams
    dtype = torch.float32

    params = [torch.randn(size, device=dev) for _ in range(count)]
    grads = [torch.randn(size, device=dev) for _ in range(count)]
    m = [torch.randn(size, device=dev) * 0.01 for _ in range(count)]
    v = [torch.rand(size, device=dev) * 0.01 for _ in range(count)]
    steps = [torch.zeros((), device=dev) for _ in range(count)]
    lr = torch.tensor(1e-4, device=dev)

    def mc():
        metalcore.adamw_step(params, grads, m, v, steps, lr=lr, weight_decay=0.01)

    mc_ok = has_kernel("adamw", dev)
    if mc_ok:
        suite.measure("adamw", case, "step", "metalcore", dtype, mc, nbytes)
    else:
        print(f"  adamw: no metalcore kernel for {dev} in this build")
    for lst in (params, m, v, steps):
        lst.clear()  # free the memory before the baselines allocate theirs

    def torch_opt(**kw):
        ps = [torch.nn.Parameter(torch.randn(size, device=dev)) for _ in range(count)]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = torch.optim.AdamW(
            ps, lr=torch.tensor(1e-4) if kw.get("fused") else 1e-4, weight_decay=0.01, **kw
        )
        opt.step()
        return opt

    variants = [("torch foreach", dict(foreach=True))]
    if dev in ("cuda", "mps"):
        variants.append(("torch fused", dict(fused=True)))
    for name, kw in variants:
        try:
            opt = torch_opt(**kw)
        except Exception as e:  # noqa: BLE001
            print(f"  adamw {name}: {e}")
            continue
        suite.measure("adamw", case, "step", name, dtype, opt.step, nbytes)
        del opt
    if dev == "cuda" and not suite.quick:
        opt = torch_opt(foreach=True)
        step = torch.compile(opt.step)
        suite.measure(
            "adamw",
            case,
            "step",
            "compile",
            dtype,
            step,
            nbytes,
            note="torch.compile(AdamW(foreach=True).step)",
        )
        del opt, step

    if not mc_ok:
        return
    p1 = [torch.randn(16, device=dev)]
    g1, m1, v1 = (
        [torch.randn(16, device=dev)],
        [torch.zeros(16, device=dev)],
        [torch.zeros(16, device=dev)],
    )
    s1 = [torch.zeros((), device=dev)]
    suite.host(
        "adamw",
        "metalcore",
        lambda: torch.ops.metalcore.adamw(p1, g1, m1, v1, [], s1, lr, 0.9, 0.999, 0.0, 1e-8),
        p1[0],
    )
