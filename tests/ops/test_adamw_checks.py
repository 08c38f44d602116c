"""adamw's argument checks that need more than one tensor to go wrong: tensors that share memory
with a tensor the step writes, the devices of lr and state_steps in the kernel itself, and the
exception types of state_steps. Memory shared without overlap (views of one flat buffer) and
grads shared between params stay accepted, checked against torch.optim.AdamW."""

import pytest
import torch

ops = torch.ops.metalcore
HYPER = (0.9, 0.999, 0.01, 1e-8)  # beta1, beta2, weight_decay, eps


def state(n=2, numel=8):
    return dict(
        params=[torch.randn(numel) for _ in range(n)],
        grads=[torch.randn(numel) for _ in range(n)],
        exp_avgs=[torch.zeros(numel) for _ in range(n)],
        exp_avg_sqs=[torch.rand(numel) for _ in range(n)],
        max_exp_avg_sqs=[],
        state_steps=[torch.tensor(float(i)) for i in range(n)],
    )


def call(s, lr=None, amsgrad=False, op=None):
    lr = torch.tensor(1e-3) if lr is None else lr
    args = [s[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")]
    (op or ops.adamw)(*args, s["state_steps"], lr, *HYPER, amsgrad)


def alias(dst, dst_i, src, src_i):
    def edit(s):
        s[dst][dst_i] = s[src][src_i]

    return edit


def overlapping_states(s):
    buf = torch.zeros(12)
    s["exp_avgs"][0], s["exp_avg_sqs"][0] = buf[:8], buf[4:]  # 4 elements in common


def amsgrad_state(s):
    s["max_exp_avg_sqs"] = [s["exp_avg_sqs"][0], torch.zeros(8)]


# (edit of a valid state, amsgrad, the two arguments the message must name)
ALIASED = {
    "exp_avg_sqs is exp_avgs": (alias("exp_avg_sqs", 0, "exp_avgs", 0), False,
                                ("exp_avgs[0]", "exp_avg_sqs[0]")),
    "exp_avgs is the param": (alias("exp_avgs", 1, "params", 1), False,
                              ("params[1]", "exp_avgs[1]")),
    "grad is the param": (alias("grads", 0, "params", 0), False, ("params[0]", "grads[0]")),
    "grad is another param's state": (alias("grads", 0, "exp_avgs", 1), False,
                                      ("grads[0]", "exp_avgs[1]")),
    "one param twice": (alias("params", 1, "params", 0), False, ("params[0]", "params[1]")),
    "one step counter twice": (alias("state_steps", 1, "state_steps", 0), False,
                               ("state_steps[0]", "state_steps[1]")),
    "partly overlapping states": (overlapping_states, False, ("exp_avgs[0]", "exp_avg_sqs[0]")),
    "max_exp_avg_sqs is exp_avg_sqs": (amsgrad_state, True,
                                       ("exp_avg_sqs[0]", "max_exp_avg_sqs[0]")),
}  # fmt: skip


@pytest.mark.parametrize("case", ALIASED)
def test_shared_memory_with_a_written_tensor_is_rejected_before_any_write(case):
    edit, amsgrad, (first, second) = ALIASED[case]
    s = state()
    if amsgrad:
        s["max_exp_avg_sqs"] = [torch.zeros(8) for _ in range(2)]
    edit(s)
    before = {k: [t.clone() for t in v] for k, v in s.items()}
    with pytest.raises(ValueError) as info:
        call(s, amsgrad=amsgrad)
    first, second = (a.replace("[", r"\[").replace("]", r"\]") for a in (first, second))
    info.match(rf"^metalcore\.adamw: '{first}' and '{second}' overlap in memory; every tensor")
    for key, tensors in s.items():
        for t, b in zip(tensors, before[key]):
            assert torch.equal(t, b), f"{key} was written by a rejected call"


def torch_reference(s, lr):
    """The params after one torch.optim.AdamW step from the state `s` (copied)."""
    copies = [torch.nn.Parameter(p.clone()) for p in s["params"]]
    beta1, beta2, weight_decay, eps = HYPER
    opt = torch.optim.AdamW(copies, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                            eps=eps, foreach=False)  # fmt: skip
    for i, c in enumerate(copies):
        c.grad = s["grads"][i].clone()
        opt.state[c] = dict(step=s["state_steps"][i].clone(), exp_avg=s["exp_avgs"][i].clone(),
                            exp_avg_sq=s["exp_avg_sqs"][i].clone())  # fmt: skip
    opt.step()
    return [c.detach() for c in copies]


def test_disjoint_views_of_one_buffer_are_accepted():
    # Flat-buffer layouts (one storage, disjoint slices) are how FSDP-style code keeps params.
    sizes = [5, 8, 3]
    offsets = [0, 5, 13]
    flat_p, flat_g = torch.randn(16), torch.randn(16)
    flat_state = torch.zeros(2 * 16)
    steps = torch.tensor([0.0, 3.0, 1.0])
    params = [flat_p[o : o + n] for o, n in zip(offsets, sizes)]
    grads = [flat_g[o : o + n] for o, n in zip(offsets, sizes)]
    s = dict(
        params=params,
        grads=grads,
        exp_avgs=[flat_state[o : o + n] for o, n in zip(offsets, sizes)],
        exp_avg_sqs=[flat_state[16 + o : 16 + o + n] for o, n in zip(offsets, sizes)],
        max_exp_avg_sqs=[],
        state_steps=[steps[i] for i in range(3)],  # 0-dim views of one tensor
    )
    flat_state.uniform_()  # nonzero states, so a mix-up between the slices shows
    expected = torch_reference(s, 1e-2)
    call(s, lr=torch.tensor(1e-2))
    for got, want in zip(params, expected):
        torch.testing.assert_close(got, want)
    assert steps.tolist() == [1.0, 4.0, 2.0]


def test_one_grad_read_for_two_params_is_accepted():
    s = state()
    s["grads"][1] = s["grads"][0]  # grads are only read
    expected = torch_reference(s, 1e-3)
    call(s)
    for got, want in zip(s["params"], expected):
        torch.testing.assert_close(got, want)


def test_state_step_dtype_is_a_type_error_and_shape_a_value_error():
    s = state()
    s["state_steps"][1] = torch.tensor(0)
    with pytest.raises(TypeError, match=r"'state_steps\[1\]' must be a 0-dim float32 or float64"):
        call(s)
    s["state_steps"][1] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"'state_steps\[1\]' must be a 0-dim float32 or float64"):
        call(s)


# The CPU kernel's own device checks. Called through the op, a meta tensor sends the call to the
# fake (Meta outranks CPU in dispatch), so these redispatch to the CPU kernel directly.
CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def cpu_kernel(*args):
    return ops.adamw.default.redispatch(CPU_KERNEL, *args)


@pytest.mark.parametrize(
    "where,message",
    [
        ("lr", r"'lr' must be on the params' device \(cpu\), got meta"),
        ("state_steps", r"'state_steps\[1\]' must be on the CPU, got meta"),
        ("everything", r"'params\[0\]' must be a CPU tensor for the CPU kernel, got meta"),
    ],
)
def test_cpu_kernel_rejects_tensors_on_another_device(where, message):
    s = state()
    lr = torch.tensor(1e-3)
    if where == "lr":
        lr = lr.to("meta")
    elif where == "state_steps":
        s["state_steps"][1] = s["state_steps"][1].to("meta")
    else:
        s = {k: [t.to("meta") for t in v] for k, v in s.items()}
    before = [t.clone() for t in s["params"]]
    with pytest.raises(RuntimeError, match=r"^metalcore\.adamw: " + message):
        call(s, lr=lr, op=cpu_kernel)
    if where != "everything":
        assert all(torch.equal(a, b) for a, b in zip(s["params"], before))
