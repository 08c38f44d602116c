"""metalcore.optim.AdamW as a drop-in for torch.optim.AdamW."""

import copy

import pytest
import torch

from metalcore.optim import AdamW
from tests.users_support import OpCounter, needs_kernel

pytestmark = needs_kernel("adamw")


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.Linear(24, 6, bias=False)
    ).to(dtype)


def _loss(model, step, dtype):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=g).to(dtype)
    return (model(x).float() ** 2).mean()


def _train(model, opt, sched, steps, dtype, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        _loss(model, step, dtype).backward()
        opt.step()
        if sched is not None:
            sched.step()


SCHEDULERS = {
    "none": None,
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=100),
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.7),
}
CONFIGS = [
    dict(),
    dict(amsgrad=True, weight_decay=0.1),
    dict(maximize=True, weight_decay=0.0, betas=(0.8, 0.95), eps=1e-6),
    dict(amsgrad=True, maximize=True, weight_decay=0.3),
]


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_100_steps_equal_torch_adamw(sched, cfg, tensor_lr):
    kw = dict(CONFIGS[cfg], lr=torch.tensor(3e-3) if tensor_lr else 3e-3)
    ours_m, theirs_m = _model(), _model()
    ours = AdamW(ours_m.parameters(), **copy.deepcopy(kw))
    theirs = torch.optim.AdamW(theirs_m.parameters(), **copy.deepcopy(kw), foreach=False)
    s1 = SCHEDULERS[sched] and SCHEDULERS[sched](ours)
    s2 = SCHEDULERS[sched] and SCHEDULERS[sched](theirs)
    _train(ours_m, ours, s1, 100, torch.float32)
    _train(theirs_m, theirs, s2, 100, torch.float32)
    for p, q in zip(ours_m.parameters(), theirs_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in theirs.state[q]:
            # Moments follow the gradients, which follow the (1e-5-equal) parameters:
            # compare them relative to their own scale.
            expected = theirs.state[q][key]
            scale = float(expected.abs().max())
            torch.testing.assert_close(ours.state[p][key], expected, rtol=1e-4, atol=1e-4 * scale)


def test_bf16_params_track_torch_adamw():
    ours_m, theirs_m = _model(torch.bfloat16), _model(torch.bfloat16)
    ours = AdamW(ours_m.parameters(), lr=1e-3, weight_decay=0.1)
    theirs = torch.optim.AdamW(theirs_m.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    _train(ours_m, ours, None, 20, torch.bfloat16)
    _train(theirs_m, theirs, None, 20, torch.bfloat16)
    for p, q in zip(ours_m.parameters(), theirs_m.parameters()):
        assert p.dtype == torch.bfloat16 and ours.state[p]["exp_avg"].dtype == torch.bfloat16
        # torch rounds each intermediate to bf16, the kernel once: allow a few bf16 ulps.
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-2)


def test_param_groups_and_state_layout_match_torch():
    m1, m2 = _model(), _model()
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "weight_decay": 0.0},
        {"params": m[2].parameters(), "lr": 1e-2},
    ]
    ours = AdamW(groups(m1), lr=1e-3, amsgrad=True)
    theirs = torch.optim.AdamW(groups(m2), lr=1e-3, amsgrad=True)
    assert isinstance(ours, torch.optim.AdamW)
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert {k: v for k, v in a.items() if k != "params"} == {
            k: v for k, v in b.items() if k != "params"
        }
    _train(m1, ours, None, 2, torch.float32)
    _train(m2, theirs, None, 2, torch.float32)
    sd1, sd2 = ours.state_dict(), theirs.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    for i in sd2["state"]:
        assert sd1["state"][i].keys() == sd2["state"][i].keys()
        for k, v in sd2["state"][i].items():
            assert (
                sd1["state"][i][k].dtype,
                sd1["state"][i][k].shape,
                sd1["state"][i][k].device,
            ) == (
                v.dtype,
                v.shape,
                v.device,
            )
    assert sd1["state"][0]["step"].item() == 2.0


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_round_trip_continues_identically(direction):
    first, second = (AdamW, torch.optim.AdamW)
    if direction == "torch_to_ours":
        first, second = second, first
    kw = dict(lr=2e-3, weight_decay=0.05, amsgrad=True)
    m = _model()
    opt = first(m.parameters(), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _train(m, opt, sched, 7, torch.float32)
    # Continue with the same optimizer class and, from the saved state, with the other class.
    m_same, m_other = copy.deepcopy(m), copy.deepcopy(m)
    o_same, o_other = first(m_same.parameters(), **kw), second(m_other.parameters(), **kw)
    for o in (o_same, o_other):
        o.load_state_dict(copy.deepcopy(opt.state_dict()))
    s_same = torch.optim.lr_scheduler.StepLR(o_same, step_size=3, gamma=0.5)
    s_other = torch.optim.lr_scheduler.StepLR(o_other, step_size=3, gamma=0.5)
    s_same.load_state_dict(sched.state_dict())
    s_other.load_state_dict(sched.state_dict())
    _train(m_same, o_same, s_same, 10, torch.float32, start=7)
    _train(m_other, o_other, s_other, 10, torch.float32, start=7)
    for p, q in zip(m_same.parameters(), m_other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert o_other.state_dict()["state"][0]["step"].item() == 17.0


@pytest.mark.parametrize("amsgrad", [False, True])
def test_loads_integer_steps_as_torch_adamw_does(amsgrad):
    # A torch.optim.AdamW state_dict whose steps are int64 tensors: torch's AdamW steps on from
    # them, and so must ours, with the same parameters as torch's.
    kw = dict(lr=2e-3, weight_decay=0.05, amsgrad=amsgrad)
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), **kw)
    _train(m, opt, None, 5, torch.float32)
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        state["step"] = state["step"].to(torch.int64)
    results = []
    for cls in (torch.optim.AdamW, AdamW):
        model = copy.deepcopy(m)
        o = cls(model.parameters(), **kw)
        o.load_state_dict(copy.deepcopy(sd))
        assert o.state_dict()["state"][0]["step"].dtype == torch.int64
        with OpCounter() as counter:
            _train(model, o, None, 4, torch.float32, start=5)
        results.append((model, o, counter.counts))
    (theirs_m, theirs, _), (ours_m, ours, counts) = results
    assert counts["adamw"] == 4  # the fused op ran
    for p, q in zip(ours_m.parameters(), theirs_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert ours.state[p]["step"].dtype == torch.float32
        assert ours.state[p]["step"].item() == theirs.state[q]["step"].item() == 9


def test_one_fused_launch_per_param_group():
    m = _model()
    opt = AdamW([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 1e-2}], lr=1e-3)
    _loss(m, 0, torch.float32).backward()
    with OpCounter() as counter:
        opt.step()
    assert counter.counts == {"adamw": 2}


def test_params_without_grad_skipped_float64_fused_odd_layouts_use_torch_math():
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(5))
    c = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    d = torch.nn.Parameter(torch.randn(4, 6))
    c_ref, d_ref = (t.detach().clone().requires_grad_() for t in (c, d))
    opt = AdamW([a, b, c, d], lr=1e-2)
    ref = torch.optim.AdamW([c_ref, d_ref], lr=1e-2, foreach=False)
    a.grad = torch.randn(5)
    c.grad = c_ref.grad = torch.linspace(-1, 1, 5, dtype=torch.float64)
    d.grad = torch.randn(6, 4).t()  # a grad with other strides than its param
    d_ref.grad = d.grad.clone()
    b_before = b.detach().clone()
    with OpCounter() as counter:
        opt.step()
    ref.step()
    assert counter.counts == {"adamw": 1}  # a and c in one launch; d on torch's path
    assert torch.equal(b, b_before) and b not in opt.state
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, d_ref, rtol=0, atol=0)


def test_unsupported_options_and_inputs_are_clear_errors():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(NotImplementedError, match="capturable"):
        AdamW(p, capturable=True)
    with pytest.raises(NotImplementedError, match="differentiable"):
        AdamW(p, differentiable=True)
    with pytest.raises(TypeError, match="complex"):
        AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    # foreach/fused are accepted (always fused) and stored as torch's defaults.
    opt = AdamW(p, foreach=True, fused=True)
    assert opt.param_groups[0]["foreach"] is None and opt.param_groups[0]["fused"] is None


def test_compiled_step_with_tensor_lr_and_scheduler_does_not_recompile():
    # The recipe of PyTorch's "compiled optimizer with LR scheduler" tutorial: a tensor lr, and
    # optimizer and scheduler steps in one compiled function (the scheduler's step wrapper is
    # not traceable, so this is not fullgraph; the optimizer step itself is one graph).
    from torch._dynamo.testing import CompileCounterWithBackend, EagerAndRecordGraphs

    m = _model()
    ref_m = copy.deepcopy(m)
    opt = AdamW(m.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1)
    ref = AdamW(ref_m.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1)
    make = lambda o: torch.optim.lr_scheduler.LinearLR(  # noqa: E731
        o, start_factor=1.0, end_factor=0.1, total_iters=6
    )
    sched, ref_sched = make(opt), make(ref)
    recorder = EagerAndRecordGraphs()
    counter = CompileCounterWithBackend(recorder)

    @torch.compile(backend=counter)
    def step():
        opt.step()
        sched.step()

    for i in range(6):
        for model in (m, ref_m):
            model.zero_grad()
            _loss(model, i, torch.float32).backward()
        if i < 2:
            step()
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                step()
        ref.step()
        ref_sched.step()
    for p, q in zip(m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(p, q)
    # Graphs: the first step (which also creates the state), then the steady-state step.
    steady = [str(n.target) for n in recorder.graphs[-1].graph.nodes]
    assert steady.count("metalcore.adamw") == 1
