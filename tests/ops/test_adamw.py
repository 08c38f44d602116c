"""adamw beyond the op contract (tests/ops/test_contract.py runs numerics, opcheck, compile,
export and bad inputs for every op from its spec): step-for-step parity with torch.optim.AdamW
over many steps, bounds safety of views into one buffer, lr schedules with a tensor lr and no
recompiles, channels-last params, validation of every tensor before any update, version
counters."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metalcore
from metalcore.testing import reference as ref
from tests.support import seeded

ops = torch.ops.metalcore

# Tail sizes around the 8/16-lane vectors and odd lengths that broke the earlier kernel's tails.
SIZES = [1, 7, 255, 1000, 4093]


def make_state(sizes, dtype, state_dtype=None, amsgrad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    return dict(
        params=params,
        exp_avgs=[torch.zeros(n, dtype=state_dtype) for n in sizes],
        exp_avg_sqs=[torch.zeros(n, dtype=state_dtype) for n in sizes],
        max_exp_avg_sqs=[torch.zeros(n, dtype=state_dtype) for n in sizes] if amsgrad else [],
        state_steps=[torch.tensor(0.0) for _ in sizes],
    )


def clone_state(state):
    return {k: [t.clone() for t in v] for k, v in state.items()}


def run_op(state, grads, **hp):
    metalcore.adamw_step(
        state["params"],
        grads,
        state["exp_avgs"],
        state["exp_avg_sqs"],
        state["state_steps"],
        max_exp_avg_sqs=state["max_exp_avg_sqs"],
        **hp,
    )


def run_ref(state, grads, **hp):
    ref.adamw_step_reference(
        state["params"],
        grads,
        state["exp_avgs"],
        state["exp_avg_sqs"],
        state["max_exp_avg_sqs"],
        state["state_steps"],
        **hp,
    )


def random_grads(params, gen, scale=1.0):
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def torch_optimizer(params, impl, lr, betas, weight_decay, eps, amsgrad, maximize):
    kw = dict(
        lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize
    )
    if impl == "fused":
        kw["fused"] = True
    else:
        kw["foreach"] = False
    opt = torch.optim.AdamW(params, **kw)
    assert bool(opt.defaults.get("fused")) == (impl == "fused")
    return opt


hyper = dict(
    lr=st.sampled_from([1e-4, 1e-3, 1e-2, 0.1]),
    beta1=st.sampled_from([0.0, 0.5, 0.9, 0.95]),
    beta2=st.sampled_from([0.9, 0.99, 0.999]),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.1]),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
)


@pytest.mark.parametrize("impl", ["single_tensor", "fused"])
@given(**hyper)
def test_fp32_matches_torch_adamw_for_50_steps(
    impl, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize
):
    state = make_state(SIZES, torch.float32, amsgrad=amsgrad)
    leaves = [p.clone().requires_grad_() for p in state["params"]]
    opt = torch_optimizer(leaves, impl, lr, (beta1, beta2), weight_decay, eps, amsgrad, maximize)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        grads = random_grads(leaves, gen)
        for leaf, g in zip(leaves, grads, strict=True):
            leaf.grad = g.clone()
        opt.step()
        run_op(
            state,
            grads,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=amsgrad,
            maximize=maximize,
        )
    for i, leaf in enumerate(leaves):
        s = opt.state[leaf]
        torch.testing.assert_close(state["params"][i], leaf.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state["exp_avgs"][i], s["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sqs"][i], s["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        if amsgrad:
            torch.testing.assert_close(
                state["max_exp_avg_sqs"][i], s["max_exp_avg_sq"], rtol=1e-6, atol=1e-9
            )
        assert torch.equal(state["state_steps"][i], s["step"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", ["fp32", "param"])
@given(**hyper)
def test_low_precision_matches_float64_reference(
    dtype, state_dtype, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize
):
    sdt = torch.float32 if state_dtype == "fp32" else dtype
    ours = make_state(SIZES, dtype, sdt, amsgrad)
    hp = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=amsgrad,
        maximize=maximize,
    )
    gen = torch.Generator().manual_seed(2)
    ulp = torch.finfo(dtype).eps  # relative spacing of the stored values
    for _ in range(50):
        # Each step starts the reference from our state: one rounding apart at most.
        theirs = clone_state(ours)
        decayed = [p.double() * (1 - lr * weight_decay) for p in theirs["params"]]
        grads = random_grads(ours["params"], gen)
        run_op(ours, grads, **hp)
        run_ref(theirs, grads, **hp)
        for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            for a, b in zip(ours[key], theirs[key], strict=True):
                assert a.dtype == b.dtype
                tol = ulp if a.dtype == dtype else 1e-5
                torch.testing.assert_close(a, b, rtol=tol, atol=1e-7)
        for a, b, d in zip(ours["params"], theirs["params"], decayed, strict=True):
            # Stored low-precision moments may round one ulp apart (float32 vs float64 math
            # before rounding); that moves the update by ~1.5 ulp of its own size.
            a, b = a.double(), b.double()
            bound = ulp * b.abs() + 2 * ulp * (d - b).abs() + 1e-7
            assert ((a - b).abs() <= bound).all(), (a - b).abs().max()
        assert all(
            torch.equal(a, b)
            for a, b in zip(ours["state_steps"], theirs["state_steps"], strict=True)
        )


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_bf16_close_to_torch_adamw(state_dtype):
    # torch keeps bf16 states and rounds the param twice per step (decay, then update), so
    # single elements drift apart by many ulps; compare trajectories against the exact (float64)
    # one instead: ours must be at least as close to it as torch's own bf16 AdamW, and move the
    # same way.
    lr, hp = 1e-2, dict(beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8)
    ours = make_state(SIZES, torch.bfloat16, state_dtype)
    exact = make_state(SIZES, torch.float64)
    for e, p in zip(exact["params"], ours["params"], strict=True):
        e.copy_(p)
    start = torch.cat([p.double() for p in ours["params"]])
    leaves = [p.clone().requires_grad_() for p in ours["params"]]
    opt = torch.optim.AdamW(leaves, lr=lr, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        grads = random_grads(leaves, gen)
        for leaf, g in zip(leaves, grads, strict=True):
            leaf.grad = g.clone()
        opt.step()
        run_op(ours, grads, lr=lr, **hp)
        run_ref(exact, [g.double() for g in grads], lr=lr, **hp)
    assert opt.state[leaves[0]]["exp_avg"].dtype == torch.bfloat16
    mine = torch.cat([p.double() for p in ours["params"]])
    theirs = torch.cat([leaf.detach().double() for leaf in leaves])
    want = torch.cat(exact["params"])
    assert (mine - want).abs().mean() <= 1.1 * (theirs - want).abs().mean()

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a - start, b - start, dim=0)

    # bf16 rounding of 50 updates leaves ~0.8 similarity even for torch against exact math.
    assert cos(mine, want) >= cos(theirs, want)
    assert cos(mine, theirs) > 0.8


def test_float64_params_match_reference_tightly():
    ours = make_state(SIZES, torch.float64, amsgrad=True)
    theirs = clone_state(ours)
    gen = torch.Generator().manual_seed(4)
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.05, eps=1e-8, amsgrad=True)
    for _ in range(20):
        grads = random_grads(ours["params"], gen)
        run_op(ours, grads, **hp)
        run_ref(theirs, grads, **hp)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for a, b in zip(ours[key], theirs[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_views_into_one_buffer_never_write_outside(dtype, amsgrad):
    # Every tensor is a view into one large buffer, separated by sentinel gaps of odd length:
    # any out-of-bounds read shows up as NaN-free garbage, any write as a changed sentinel.
    sentinel = 12345.0
    gap = 13

    def carve(fill):
        total = sum(SIZES) + gap * (len(SIZES) + 1)
        buf = torch.full((total,), sentinel, dtype=dtype)
        views, pos = [], gap
        for n in SIZES:
            views.append(buf[pos : pos + n])
            pos += n + gap
        for v, f in zip(views, fill, strict=True):
            v.copy_(f)
        return buf, views

    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    zeros = [torch.zeros(n, dtype=dtype) for n in SIZES]
    pbuf, params = carve(init)
    mbuf, exp_avgs = carve(zeros)
    vbuf, exp_avg_sqs = carve(zeros)
    xbuf, maxes = carve(zeros)
    bufs = [pbuf, mbuf, vbuf] + ([xbuf] if amsgrad else [])
    dense = make_state(SIZES, dtype, amsgrad=amsgrad)
    for d, p in zip(dense["params"], init, strict=True):
        d.copy_(p)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad)
    steps = [torch.tensor(0.0) for _ in SIZES]
    for _ in range(30):
        grads = random_grads(init, gen)
        gbuf, gviews = carve(grads)
        metalcore.adamw_step(
            params,
            gviews,
            exp_avgs,
            exp_avg_sqs,
            steps,
            max_exp_avg_sqs=maxes if amsgrad else [],
            **hp,
        )
        run_op(dense, grads, **hp)
        bufs.append(gbuf)
    for buf in bufs:
        mask = torch.ones_like(buf, dtype=torch.bool)
        pos = gap
        for n in SIZES:
            mask[pos : pos + n] = False
            pos += n + gap
        assert (buf[mask] == sentinel).all(), "a sentinel around the tensors was overwritten"
    for a, b in zip(params, dense["params"], strict=True):
        assert torch.equal(a, b)  # storage offsets change nothing


def test_lr_tensor_schedule_matches_torch_float_lr():
    lrs = [1e-3 * (0.9**k) + 1e-4 * (k % 3) for k in range(25)]
    state = make_state(SIZES, torch.float32)
    leaves = [p.clone().requires_grad_() for p in state["params"]]
    opt = torch.optim.AdamW(leaves, lr=lrs[0], weight_decay=0.1, foreach=False)
    lr = torch.tensor(0.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    for value in lrs:
        grads = random_grads(leaves, gen)
        for leaf, g in zip(leaves, grads, strict=True):
            leaf.grad = g.clone()
        opt.param_groups[0]["lr"] = value
        opt.step()
        lr.fill_(value)  # the same tensor object, changed in place like a scheduler would
        run_op(state, grads, lr=lr, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8)
    for p, leaf in zip(state["params"], leaves, strict=True):
        torch.testing.assert_close(p, leaf.detach(), rtol=1e-6, atol=1e-6)


def test_compile_lr_tensor_compiles_once_and_matches_eager():
    def step(params, grads, exp_avgs, exp_avg_sqs, steps, lr):
        ops.adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr, 0.9, 0.999, 0.01, 1e-8)

    compiled = torch.compile(step, fullgraph=True)
    eager = make_state(SIZES, torch.float32)
    comp = clone_state(eager)
    lr = torch.tensor(1e-3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)

    def one(value):
        grads = random_grads(eager["params"], gen)
        lr.fill_(value)
        step(
            eager["params"],
            grads,
            eager["exp_avgs"],
            eager["exp_avg_sqs"],
            eager["state_steps"],
            lr,
        )
        compiled(
            comp["params"], grads, comp["exp_avgs"], comp["exp_avg_sqs"], comp["state_steps"], lr
        )

    one(1e-3)
    with torch.compiler.set_stance("fail_on_recompile"):
        for value in [5e-4, 2e-3, 1e-2, 0.0]:
            one(value)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for a, b in zip(comp[key], eager[key], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_channels_last_params_match_contiguous():
    p = seeded(2, 3, 5, 7, seed=1)
    g = seeded(2, 3, 5, 7, seed=2)
    cl = [t.to(memory_format=torch.channels_last) for t in (p, g)]
    a = dict(
        params=[p.clone()],
        exp_avgs=[torch.zeros_like(p)],
        exp_avg_sqs=[torch.zeros_like(p)],
        max_exp_avg_sqs=[],
        state_steps=[torch.tensor(0.0)],
    )
    b = dict(
        params=[cl[0]],
        exp_avgs=[torch.zeros_like(cl[0])],
        exp_avg_sqs=[torch.zeros_like(cl[0])],
        max_exp_avg_sqs=[],
        state_steps=[torch.tensor(0.0)],
    )
    for _ in range(3):
        run_op(a, [g], lr=1e-2)
        run_op(b, [cl[1]], lr=1e-2)
    assert b["params"][0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b["params"][0], a["params"][0], rtol=0, atol=0)


def test_bad_input_fails_before_mutating_anything():
    state = make_state([5, 9, 3], torch.float32)
    grads = random_grads(state["params"], torch.Generator().manual_seed(8))
    grads[2] = seeded(4)  # only the last tensor is wrong
    before = clone_state(state)
    with pytest.raises(ValueError, match=r"'grads\[2\]' must have the same shape"):
        run_op(state, grads, lr=1e-2)
    for key, tensors in state.items():
        for a, b in zip(tensors, before[key], strict=True):
            assert torch.equal(a, b), f"{key} was modified by a failing call"


def test_step_bumps_version_counters_like_torch_inplace_ops():
    state = make_state([5, 3], torch.float32, amsgrad=True)
    grads = [seeded(5, seed=1), seeded(3, seed=2)]
    mutated = [
        t
        for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
        for t in state[k]
    ]
    before = [t._version for t in mutated]
    run_op(state, grads, lr=1e-3, amsgrad=True)
    assert [t._version for t in mutated] == [v + 1 for v in before]
    assert [g._version for g in grads] == [0, 0]  # read, not written
    # A rejected call mutates nothing, so it bumps nothing.
    with pytest.raises(ValueError):
        run_op(state, grads[:1], lr=1e-3, amsgrad=True)
    assert [t._version for t in mutated] == [v + 1 for v in before]


def test_step_on_a_tensor_saved_for_backward_raises_instead_of_a_wrong_gradient():
    w = seeded(4).requires_grad_()
    loss = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        metalcore.adamw_step(
            [w], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)], lr=0.1
        )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
