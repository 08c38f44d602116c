"""embedding_bag beyond the op contract (tests/ops/test_contract.py runs numerics, gradients,
gradcheck, opcheck, compile, export and bad inputs from the spec): torch.nn.functional.embedding_bag
itself as the reference through the public wrapper (1-D input with offsets and 2-D input), the
data checks the fakes cannot make (index range, offsets), equal maxima and their gradient as
torch routes it, float32 accumulation of 16-bit weights, and a weight gradient that is the same
bit for bit whatever the thread count."""

import pytest
import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS
from tests.support import seeded


def _bags(n_bags, max_len, v, seed, empty_share=0.2):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=g)
    lengths[torch.rand(n_bags, generator=g) < empty_share] = 0
    offsets = torch.cumsum(lengths, 0) - lengths
    indices = torch.randint(0, v, (int(lengths.sum()),), generator=g)
    return indices, offsets


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 3, -1])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_matches_torch_float64(mode, padding_idx, include_last_offset):
    v, d = 20, 37
    indices, offsets = _bags(33, 7, v, seed=1)
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([indices.numel()])])
    w = seeded(v, d, dtype=torch.float64, seed=2).requires_grad_()
    kw = dict(mode=mode, include_last_offset=include_last_offset, padding_idx=padding_idx)
    got = metalcore.embedding_bag(indices, w, offsets, **kw)
    want = F.embedding_bag(indices, w, offsets, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = seeded(*want.shape, dtype=torch.float64, seed=3)
    (gw,) = torch.autograd.grad(got, w, g)
    (ww,) = torch.autograd.grad(want, w, g)
    torch.testing.assert_close(gw, ww, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_per_sample_weights_and_their_gradient_match_torch(padding_idx):
    v, d = 11, 24
    indices, offsets = _bags(17, 6, v, seed=4)
    w = seeded(v, d, dtype=torch.float64, seed=5).requires_grad_()
    psw = seeded(indices.numel(), dtype=torch.float64, seed=6).requires_grad_()
    kw = dict(mode="sum", per_sample_weights=psw, padding_idx=padding_idx)
    got = metalcore.embedding_bag(indices, w, offsets, **kw)
    want = F.embedding_bag(indices, w, offsets, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = seeded(*want.shape, dtype=torch.float64, seed=7)
    got_grads = torch.autograd.grad(got, (w, psw), g)
    want_grads = torch.autograd.grad(want, (w, psw), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_2d_input_is_bags_of_equal_length(mode):
    w = seeded(9, 5, dtype=torch.float64, seed=8).requires_grad_()
    x = torch.randint(0, 9, (4, 3), generator=torch.Generator().manual_seed(9))
    psw = seeded(4, 3, dtype=torch.float64, seed=10) if mode == "sum" else None
    got = metalcore.embedding_bag(x, w, mode=mode, per_sample_weights=psw)
    want = F.embedding_bag(x, w, mode=mode, per_sample_weights=psw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_offsets_with_2d_input_or_none_with_1d_input_are_errors():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"metalcore\.embedding_bag: 'offsets' must be None"):
        metalcore.embedding_bag(torch.zeros(2, 2, dtype=torch.long), w, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"metalcore\.embedding_bag: 'offsets' must be given"):
        metalcore.embedding_bag(torch.tensor([0, 1]), w)


def test_empty_bags_give_zeros_in_every_mode():
    w = seeded(5, 4, seed=11) + 10  # all positive: a max or mean of nothing is not a row's value
    indices = torch.tensor([1, 2, 2])
    offsets = torch.tensor([0, 0, 3, 3])  # bags 0, 2 and 3 are empty
    for mode in ("sum", "mean", "max"):
        out = metalcore.embedding_bag(indices, w, offsets, mode=mode)
        assert torch.equal(out[[0, 2, 3]], torch.zeros(3, 4)), mode
        torch.testing.assert_close(out, F.embedding_bag(indices, w, offsets, mode=mode))
    # A bag of padding only is empty too ('mean' does not divide by zero).
    out = metalcore.embedding_bag(torch.tensor([4, 4]), w, torch.tensor([0]), padding_idx=4)
    assert torch.equal(out, torch.zeros(1, 4))


def test_equal_maxima_take_the_first_row_and_its_gradient_as_torch():
    # Rows 0 and 1 tie in columns 0 and 1; row 3 ties row 0 in column 2 later in the bag.
    w = torch.tensor([[1.0, 5.0, 2.0], [1.0, 5.0, -3.0], [0.0, 1.0, 0.0], [0.5, 0.0, 2.0]])
    indices = torch.tensor([0, 1, 2, 3, 1, 0, 0])
    offsets = torch.tensor([0, 4])  # bag 1 repeats row 0: its gradient arrives once
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        mine = w.to(dtype).clone().requires_grad_()
        theirs = w.to(dtype).clone().requires_grad_()
        out = metalcore.embedding_bag(indices, mine, offsets, mode="max")
        want = F.embedding_bag(indices, theirs, offsets, mode="max")
        assert torch.equal(out, want)
        g = torch.arange(1.0, 7.0).reshape(2, 3).to(dtype)
        out.backward(g)
        want.backward(g)
        assert torch.equal(mine.grad, theirs.grad), (mine.grad, theirs.grad)


def test_nan_rows_in_max_mode_as_torch():
    nan = float("nan")
    w = torch.tensor([[nan, 1.0], [2.0, nan], [0.0, 3.0]])
    indices = torch.tensor([0, 2, 2, 1, 1, 0])
    offsets = torch.tensor([0, 2, 4])
    out = metalcore.embedding_bag(indices, w, offsets, mode="max")
    want = F.embedding_bag(indices, w, offsets, mode="max")
    torch.testing.assert_close(out, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_low_precision_weights_accumulate_in_float32(dtype, mode):
    # 64 rows per bag of values near 1: a 16-bit running sum would drift by several units of its
    # last place; float32 accumulation leaves only the output's rounding.
    w = (seeded(100, 64, seed=12) * 0.1 + 1).to(dtype)
    indices = torch.randint(0, 100, (8 * 64,), generator=torch.Generator().manual_seed(13))
    offsets = torch.arange(0, 8 * 64, 64)
    got = metalcore.embedding_bag(indices, w, offsets, mode=mode)
    want = F.embedding_bag(indices, w.double(), offsets, mode=mode)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert ((got.double() - want).abs() <= eps * want.abs()).all()


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_weight_gradient_is_bitwise_the_same_for_any_thread_count(mode):
    # Hot rows (a few indices hit very often) are where atomics or per-thread partial sums would
    # reorder the additions.
    g = torch.Generator().manual_seed(14)
    v, d = 300, 96
    indices = torch.randint(0, 8, (4000,), generator=g)
    indices[::3] = torch.randint(0, v, (1334,), generator=g)
    offsets = torch.arange(0, 4000, 10)
    w = seeded(v, d, seed=15).requires_grad_()
    grad_out = seeded(offsets.numel(), d, seed=16)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for _ in range(2):
                w.grad = None
                metalcore.embedding_bag(indices, w, offsets, mode=mode).backward(grad_out)
                grads.append(w.grad.clone())
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert torch.equal(grads[0].view(torch.int32), other.view(torch.int32))
    want = torch.autograd.grad(
        F.embedding_bag(indices, w.double(), offsets, mode=mode), w, grad_out.double()
    )[0]
    torch.testing.assert_close(grads[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["embedding_bag", "embedding_bag_backward"])
@pytest.mark.parametrize("bad", [-1, 5, 1000])
def test_out_of_range_indices_are_a_clear_error(device, op, bad):
    if device.op_unavailable(op):
        pytest.skip(device.op_unavailable(op))
    indices = torch.tensor([0, 1, bad, 2])
    args = [torch.randn(5, 3), indices, torch.tensor([0, 2])]
    if op == "embedding_bag_backward":
        args = [torch.randn(2, 3), *args]
    args = bk.to_device(args, device.device)
    with pytest.raises(
        ValueError,
        match=rf"metalcore\.{op}: 'input' must be in \[0, 5\) \(the rows of 'weight'\), got "
        rf"{bad} at position 2",
    ):
        device.call(SPECS[op], args, {})


@pytest.mark.parametrize(
    "offsets,last,message",
    [
        (
            [1, 2],
            False,
            r"'offsets' must start at 0 \(the first bag starts at the first index\), "
            r"got offsets\[0\] = 1",
        ),
        (
            [0, 3, 2],
            False,
            r"'offsets' must be non-decreasing, got offsets\[2\] = 2 after "
            r"offsets\[1\] = 3",
        ),
        ([0, 5], False, r"'offsets' must be at most len\(input\) = 4, got 5"),
        ([0, 2, 6], True, r"'offsets' must be at most len\(input\) = 4, got 6"),
        # torch's own kernels disagree on indices past the last offset: refused.
        (
            [0, 2, 3],
            True,
            r"with include_last_offset=True the last offset must be len\(input\) = 4 \(CSR "
            r"layout\), got 3",
        ),
    ],
)
def test_malformed_offsets_are_a_clear_error(device, offsets, last, message):
    op = "embedding_bag"
    if device.op_unavailable(op):
        pytest.skip(device.op_unavailable(op))
    args = [torch.randn(5, 3), torch.tensor([0, 1, 2, 3]), torch.tensor(offsets)]
    args = bk.to_device(args, device.device)
    with pytest.raises(ValueError, match=rf"metalcore\.{op}: {message}"):
        device.call(SPECS[op], args, {"include_last_offset": last})


def test_int32_indices_and_offsets():
    w = seeded(7, 4, dtype=torch.float64, seed=17)
    indices, offsets = _bags(9, 4, 7, seed=18)
    got = metalcore.embedding_bag(indices.int(), w, offsets.int(), mode="sum")
    torch.testing.assert_close(got, F.embedding_bag(indices, w, offsets, mode="sum"))
