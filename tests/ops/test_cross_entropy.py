"""cross_entropy and fused_linear_cross_entropy beyond the op contract
(tests/ops/test_contract.py runs numerics, gradients, gradcheck, opcheck, compile, export and bad
inputs from the specs): torch.nn.functional.cross_entropy itself as the reference in float64 and
on bfloat16 logits, all-ignored batches as torch, out-of-range targets, the fused LM head + loss
against F.linear + F.cross_entropy over several chunks, LinearCrossEntropyLoss, and the memory
the fused op saves."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, tolerance
from tests.support import REPO, seeded

CE_C = 16  # the cross_entropy spec's opmath units (metalcore/testing/op_specs.py)


def _targets(n, c, seed, ignore_index=-100, ignored=0.25):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, c, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = ignore_index
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_matches_torch_float64(reduction, label_smoothing, ignore_index):
    x = seeded(37, 1000, dtype=torch.float64, seed=1, scale=3.0).requires_grad_()
    t = _targets(37, 1000, seed=2, ignore_index=ignore_index)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    got = metalcore.cross_entropy(x, t, **kw)
    want = F.cross_entropy(x, t, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.rand_like(want)
    (gx,) = torch.autograd.grad(got, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_logits_accumulate_in_float32(dtype, reduction):
    x = seeded(64, 32000, dtype=dtype, seed=3, scale=5.0).requires_grad_()
    t = _targets(64, 32000, seed=4)
    got = metalcore.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    # torch's cross-entropy in float64 on the same rounded logits: only the output's rounding and
    # float32 accumulation separate the two.
    want = F.cross_entropy(x.double(), t, reduction=reduction, label_smoothing=0.1)
    assert got.dtype == dtype
    scale = want.abs().detach() + 1
    bk.compare(got, want, tolerance(dtype, CE_C, scale=scale), f"cross_entropy {dtype}")
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    # Per row, the gradient's entries are p - onehot scaled: compare on the row's largest entry.
    row_scale = wx.abs().amax(1, keepdim=True).expand_as(wx)
    bk.compare(gx, wx, tolerance(dtype, CE_C, scale=row_scale), f"grad {dtype}")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_all_ignored_batch_matches_torch(label_smoothing):
    x = seeded(4, 6, dtype=torch.float64, seed=5).requires_grad_()
    t = torch.full((4,), -100)
    for reduction in ("mean", "sum", "none"):
        kw = dict(reduction=reduction, label_smoothing=label_smoothing)
        got, want = metalcore.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw)
        torch.testing.assert_close(got, want, equal_nan=True)  # mean: 0 / 0 = NaN in both
        (gx,) = torch.autograd.grad(got.sum(), x)
        (wx,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(gx, wx, equal_nan=True)


@pytest.mark.parametrize("op", ["cross_entropy", "fused_linear_cross_entropy"])
@pytest.mark.parametrize("bad,pos", [(7, 1), (-1, 2), (5, 0)])
def test_out_of_range_target_is_a_clear_error(device, op, bad, pos):
    if device.op_unavailable(op):
        pytest.skip(device.op_unavailable(op))
    t = torch.tensor([0, 1, 2, 3])
    t[pos] = bad
    x = torch.randn(4, 5)
    args = [x, t] if op == "cross_entropy" else [torch.randn(4, 3), torch.randn(5, 3), t]
    args = bk.to_device(args, device.device)
    with pytest.raises(
        ValueError,
        match=rf"metalcore\.{op}: 'target' must hold class indices in \[0, 5\) or ignore_index "
        rf"\(-100\), got {bad} at position {pos}",
    ):
        device.call(SPECS[op], args, {})


# --- Fused linear + cross-entropy -------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_matches_unfused_over_several_chunks(reduction, with_bias):
    # 130 tokens x 40000 classes: chunks of 2^21 logits are 52 tokens, so three chunks (one
    # partial), with the 'mean' count spanning all.
    n, h, v = 130, 8, 40000
    x = seeded(n, h, dtype=torch.float64, seed=6).requires_grad_()
    w = seeded(v, h, dtype=torch.float64, seed=7, scale=0.5).requires_grad_()
    b = seeded(v, dtype=torch.float64, seed=8).requires_grad_() if with_bias else None
    t = _targets(n, v, seed=9)
    kw = dict(reduction=reduction, label_smoothing=0.05)
    got = metalcore.fused_linear_cross_entropy(x, w, t, b, **kw)
    want = F.cross_entropy(F.linear(x, w, b), t, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    leaves = [x, w] + ([b] if with_bias else [])
    g = torch.rand_like(want)
    for a, e in zip(
        torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), strict=True
    ):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_fused_linear_bfloat16_is_close_to_unfused():
    n, h, v = 96, 64, 5000
    x = seeded(n, h, dtype=torch.bfloat16, seed=10).requires_grad_()
    w = seeded(v, h, dtype=torch.bfloat16, seed=11, scale=0.2).requires_grad_()
    t = _targets(n, v, seed=12)
    got = metalcore.fused_linear_cross_entropy(x, w, t)
    want = F.cross_entropy(F.linear(x.double(), w.double()), t)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    gx, gw = torch.autograd.grad(got, [x, w])
    wx, ww = torch.autograd.grad(want, [x, w])
    assert gx.dtype == gw.dtype == torch.bfloat16
    for a, e in ((gx, wx), (gw, ww)):
        err = (a.double() - e).abs().max() / e.abs().max()
        assert err < 3e-2, err


def test_linear_cross_entropy_loss_module():
    loss_fn = metalcore.nn.LinearCrossEntropyLoss(ignore_index=0, label_smoothing=0.1)
    x = seeded(2, 5, 16, seed=13).requires_grad_()  # [batch, seq, hidden]
    head = torch.nn.Linear(16, 50, bias=True)
    t = _targets(10, 50, seed=14, ignore_index=0).reshape(2, 5)
    got = loss_fn(x, head.weight, t, head.bias)
    want = torch.nn.CrossEntropyLoss(ignore_index=0, label_smoothing=0.1)(
        head(x).reshape(-1, 50), t.reshape(-1)
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert got.grad_fn.name() == "MetalcoreFusedLinearCrossEntropyBackward"
    none = metalcore.nn.LinearCrossEntropyLoss(reduction="none")(x, head.weight, t)
    assert none.shape == (2, 5)


_MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch, metalcore
    torch.manual_seed(0)
    n, v, h = 4096, 32000, 64
    x = torch.randn(n, h).requires_grad_()
    w = (torch.randn(v, h) * 0.05).requires_grad_()
    t = torch.randint(0, v, (n,))
    # A small call first: one-time allocations (thread pools, kernels) are not the op's.
    metalcore.fused_linear_cross_entropy(x[:8], w[:64], t[:8] % 64).backward()
    x.grad = w.grad = None

    def status_kib(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])

    # VmHWM is this process's resident-set high-water mark (unlike getrusage's ru_maxrss, it
    # does not inherit the parent's RSS across fork + exec); writing 5 to clear_refs resets it
    # to the current RSS, so the peak covers the measured calls only.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    loss = metalcore.fused_linear_cross_entropy(x, w, t)
    loss.backward()
    peak = status_kib("VmHWM")
    json.dump({"growth": (peak - before) * 1024, "logits": n * v * 4}, sys.stdout)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_fused_linear_memory_stays_below_a_quarter_of_the_logits():
    # torch's CPU allocator has no peak counter: a child process's resident-set high-water mark
    # (VmHWM, reset just before the call) against its resident set then measures every page the
    # forward and backward touch, gradients included.
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    r = json.loads(out.stdout)
    # Unfused, the logits alone (524 MB) and their gradient would be resident together.
    assert r["growth"] < r["logits"] / 4, r
