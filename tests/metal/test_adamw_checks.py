"""adamw's shared checks through the Metal launch layer (msim on CPU tensors): tensors sharing
memory with a tensor the step writes are rejected as on the CPU, memory shared without overlap is
stepped like the CPU kernel steps it, and a CPU lr is range-checked on the host."""

import pytest
import torch

HYPER = (0.9, 0.999, 0.01, 1e-8)  # beta1, beta2, weight_decay, eps


def lists(n=2, numel=40):
    gen = torch.Generator().manual_seed(n * numel)
    return [
        [torch.randn(numel, generator=gen) for _ in range(n)],
        [torch.randn(numel, generator=gen) for _ in range(n)],
        [torch.randn(numel, generator=gen) * 0.1 for _ in range(n)],
        [torch.rand(numel, generator=gen) * 0.01 for _ in range(n)],
        [],
        [torch.tensor(float(i)) for i in range(n)],
    ]


def run(op, args, lr=1e-3):
    op(*args, torch.tensor(lr), *HYPER, False)


def test_shared_state_is_rejected_with_the_cpu_error(mops):
    errors = []
    for op in (torch.ops.metalcore.adamw, mops.adamw):
        args = lists()
        args[3][1] = args[2][1]  # exp_avg_sqs[1] is exp_avgs[1]
        before = [t.clone() for t in args[0] + args[5]]
        with pytest.raises(ValueError) as info:
            run(op, args)
        assert all(torch.equal(a, b) for a, b in zip(args[0] + args[5], before))
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert errors[0].startswith("metalcore.adamw: 'exp_avgs[1]' and 'exp_avg_sqs[1]' overlap")


def test_disjoint_views_of_one_buffer_match_the_cpu_kernel(mops):
    # Two params as slices of one flat buffer, their states as slices of another.
    def flat_views():
        gen = torch.Generator().manual_seed(0)
        p, g = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
        states = torch.rand(200, generator=gen) * 0.01
        steps = torch.tensor([2.0, 0.0])
        cut = [(0, 37), (37, 100)]
        return [
            [p[a:b] for a, b in cut],
            [g[a:b] for a, b in cut],
            [states[a:b] for a, b in cut],
            [states[100 + a : 100 + b] for a, b in cut],
            [],
            [steps[0], steps[1]],
        ]

    on_msim, on_cpu = flat_views(), flat_views()
    run(mops.adamw, on_msim)
    run(torch.ops.metalcore.adamw, on_cpu)
    for got, want in zip(on_msim[0] + on_msim[2] + on_msim[3], on_cpu[0] + on_cpu[2] + on_cpu[3]):
        torch.testing.assert_close(got, want, rtol=4e-6, atol=4e-6)
    assert [float(s) for s in on_msim[5]] == [3.0, 1.0] == [float(s) for s in on_cpu[5]]


def test_negative_cpu_lr_is_rejected_on_the_host(mops):
    # msim's device is the CPU, so its lr is read by the kernel; a CPU lr is still range-checked.
    args = lists()
    with pytest.raises(ValueError, match=r"^metalcore\.adamw: 'lr' must be >= 0, got -0.001"):
        run(mops.adamw, args, lr=-1e-3)
    assert [float(s) for s in args[5]] == [0.0, 1.0]
