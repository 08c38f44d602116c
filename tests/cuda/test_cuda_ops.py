"""CUDA beyond the op contract. The contract itself (float64 references, edge cases, gradients,
opcheck, compile, export, bad inputs with the CPU's exact errors) runs on the cuda device of
tests/ops/test_contract.py and tests/reliability/test_fuzz.py; this file pins the kernel
variants the specs' draws do not reach (rows wider than the register-cached plan, the cooperative
grad_weight reduction over many rows, rope grids beyond one block or 65535 batches), AdamW with
its step counters and lr on the host or the device, AdamW against torch's fused CUDA AdamW, and
CUDA graphs and streams. Skipped where no GPU (or no CUDA build of metalcore) is present."""

import pytest
import torch

import metalcore
from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, Sample, TensorArg, pinned
from tests.metal.test_adamw import adamw_sample
from tests.support import TOL, seeded

CUDA = bk.backend("cuda")
WHY = CUDA.unavailable() or CUDA.op_unavailable("rmsnorm")
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")

DEV = "cuda"
ops = torch.ops.metalcore
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --- RMSNorm ---------------------------------------------------------------------------------


def rms_case(op, rows, n, dtype, layout, weight=True, grad_res=True):
    """A spec-drawn ``op`` sample with ``rows`` x ``n`` inputs in ``layout`` ("offset": one
    element in, so never 16-byte aligned; "sliced": every other element of each row)."""
    pins = dict(dtype=dtype, large_rows=False, lead_ndim=1, lead0=rows, n=n, has_weight=weight)
    pins["has_grad_residual_out"] = grad_res
    pins["weight.layout"] = "contiguous"
    for name in ("input", "res", "g", "h", "grad_res"):
        pins[f"{name}.layout"] = layout
        pins[f"{name}.offset"] = 1
        pins[f"{name}.dim"], pins[f"{name}.step"] = 1, 2
    return pinned(op, 0, **pins)


# Rows up to and past the register-cached plan (the streaming path beyond it).
WIDE_ROWS = [(4, 1024), (7, 4096), (3, 8200), (2, 40000)]


@pytest.mark.parametrize("rows,n", WIDE_ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "sliced"])
def test_rmsnorm_wide_rows(rows, n, dtype, layout):
    for op in ("rmsnorm", "fused_add_rmsnorm"):
        for weight in (True, False):
            bk.check_sample(SPECS[op], CUDA, rms_case(op, rows, n, dtype, layout, weight))


# Many rows: the cooperative grad_weight reduction across blocks after a grid barrier.
@pytest.mark.parametrize("rows,n", WIDE_ROWS + [(20000, 256), (3000, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "sliced"])
def test_rmsnorm_backward_wide_rows_and_many_rows(rows, n, dtype, layout):
    for op in ("rmsnorm_backward", "fused_add_rmsnorm_backward"):
        for weight in (True, False):
            bk.check_sample(SPECS[op], CUDA, rms_case(op, rows, n, dtype, layout, weight))


# --- RoPE ------------------------------------------------------------------------------------

ROPE_CASES = [
    # b, hq, hk, s, d, rot, table form
    (1, 32, 8, 64, 128, 128, "batch1"),
    (2, 3, 1, 7, 64, 32, "3d"),  # partial rotary
    (1, 2, 2, 3, 10, 6, "2d"),  # rot/2 odd: scalar path
    (1, 7, 2, 3, 128, 64, "2d"),  # odd head count with several heads per thread
    (1, 33, 3, 2, 256, 256, "2d"),  # heads split over two blocks
    (3, 1, 1, 200, 4, 4, "2d"),  # 64 tokens per block, a partial last block
    (70000, 2, 1, 1, 8, 8, "3d"),  # batch beyond the grid's 65535 z-blocks: the batch loop
]


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
def test_rope_grids(case, dtype, interleaved, layout):
    b, hq, hk, s, d, rot, table = case
    pins = dict(batch=b, q_heads=hq, k_heads=hk, long_seq=False, seq=s, head_dim=d, rot=rot)
    pins.update(dtype=dtype, fp32_tables=True, table_form=table, interleaved=interleaved)
    for name in ("q", "k", "grad_q_out", "grad_k_out"):
        pins[f"{name}.layout"] = layout
        pins[f"{name}.dim_a"], pins[f"{name}.dim_b"] = 1, 2  # HF's [B, S, H, D].transpose(1, 2)
        pins[f"{name}.offset"] = 1
    for name in ("cos", "sin"):
        pins[f"{name}.layout"] = "contiguous"
    for op in ("rope", "rope_backward"):
        bk.check_sample(SPECS[op], CUDA, pinned(op, 0, **pins))


# --- AdamW -----------------------------------------------------------------------------------

ADAMW_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
]


@pytest.mark.parametrize("pair", ADAMW_PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("where", ["steps-and-lr-on-gpu", "steps-and-lr-on-cpu"])
def test_adamw_steps_and_lr_on_either_side(pair, amsgrad, maximize, where):
    # The step counters and lr may live on the host (read there) or on the GPU (read by the
    # kernel, which also increments the steps): both against the float64 reference.
    sizes = [1, 7, 4099, 3 * 8192 + 5, 64 * 1000]
    sample = adamw_sample([(n, *pair) for n in sizes], amsgrad, maximize)
    spec = SPECS["adamw"]
    expected = bk.expected_outputs(spec, sample)
    args, _ = sample.materialize(DEV)
    if where == "steps-and-lr-on-cpu":
        args[5] = [t.cpu() for t in args[5]]
        args[6] = args[6].cpu()
    ops.adamw(*args)
    for i, (got, want) in enumerate(zip(spec.outputs(args, None), expected)):
        bk.compare(got, want, spec.tolerances(sample, i), f"adamw, {where}: output {i}")


def test_adamw_many_tensors_and_noncontiguous():
    # 300 tensors: more than one parameter block; every 7th (with its grad and states) dense
    # but transposed, updated in place in storage order like on the CPU.
    specs = [(15, torch.float32, torch.float32, i % 7 == 0) for i in range(300)]
    bk.check_sample(SPECS["adamw"], CUDA, adamw_sample(specs, amsgrad=False, maximize=False))


def test_adamw_matches_torch_fused():
    ps = [seeded(1000, 33, seed=i) for i in range(5)]
    torch_ps = [torch.nn.Parameter(p.to(DEV)) for p in ps]
    opt = torch.optim.AdamW(torch_ps, lr=3e-3, weight_decay=0.05, fused=True)
    ours = [p.to(DEV) for p in ps]
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    steps = [torch.zeros((), device=DEV) for _ in ours]
    for k in range(3):
        grads = [seeded(*p.shape, seed=100 + 10 * k + i, device=DEV) for i, p in enumerate(ours)]
        for tp, g in zip(torch_ps, grads):
            tp.grad = g.clone()
        opt.step()
        metalcore.adamw_step(
            ours, grads, m, v, steps, lr=torch.tensor(3e-3, device=DEV), weight_decay=0.05
        )
    for a, b in zip(ours, torch_ps):
        torch.testing.assert_close(a, b.detach(), **TOL[torch.float32])


# --- Graphs and streams ----------------------------------------------------------------------


def test_cuda_graph_capture():
    # Cooperative kernels (rmsnorm backward, adamw) must be capturable and replayable.
    x, g = seeded(512, 1024, seed=1, device=DEV), seeded(512, 1024, seed=2, device=DEV)
    w = seeded(1024, seed=3, device=DEV)
    p = [seeded(4096, seed=4, device=DEV)]
    gr, m, v = (
        [seeded(4096, seed=5, device=DEV)],
        [torch.zeros(4096, device=DEV)],
        [torch.zeros(4096, device=DEV)],
    )
    st = [torch.zeros((), device=DEV)]
    lr = torch.tensor(1e-3, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.rmsnorm_backward(g, x, w, 1e-6)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dx, dw = ops.rmsnorm_backward(g, x, w, 1e-6)
        metalcore.adamw_step(p, gr, m, v, st, lr=lr)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    spec = SPECS["rmsnorm_backward"]
    sample = Sample([TensorArg(t.cpu()) for t in (g, x, w)] + [1e-6])
    for i, (got, want) in enumerate(zip((dx, dw), bk.expected_outputs(spec, sample))):
        bk.compare(got, want, spec.tolerances(sample, i), f"replayed rmsnorm_backward {i}")
    assert float(st[0]) == 2.0


def test_adamw_sign_off_counters_across_streams_and_graphs():
    # Each stream reuses one sign-off counter that the kernel resets; a captured step gets its
    # own. Steps alternate between two streams, eager and graph replays, and must match the CPU.
    sizes = [4096, 3, 70000]
    p_cpu = [seeded(n, seed=i) for i, n in enumerate(sizes)]
    g_cpu = [seeded(n, seed=10 + i) for i, n in enumerate(sizes)]
    cpu = dict(p=[t.clone() for t in p_cpu], m=[torch.zeros(n) for n in sizes])
    cpu.update(v=[torch.zeros(n) for n in sizes], st=[torch.zeros(()) for _ in sizes])
    dev = {k: [t.to(DEV) for t in ts] for k, ts in cpu.items()}
    g_dev = [t.to(DEV) for t in g_cpu]
    lr = torch.tensor(1e-2, device=DEV)

    def step(state, grads, lr_):
        metalcore.adamw_step(state["p"], grads, state["m"], state["v"], state["st"], lr=lr_)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    n_steps = 0
    for _ in range(3):
        step(dev, g_dev, lr)
        with torch.cuda.stream(side):
            step(dev, g_dev, lr)
        side.synchronize()
        n_steps += 2
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(dev, g_dev, lr)
    for _ in range(3):
        graph.replay()
        step(dev, g_dev, lr)
        n_steps += 2
    torch.cuda.synchronize()
    for _ in range(n_steps):
        step(cpu, g_cpu, torch.tensor(1e-2))
    assert [float(s) for s in dev["st"]] == [float(n_steps)] * len(sizes)
    for a, b in zip(dev["p"], cpu["p"]):
        torch.testing.assert_close(a.cpu(), b, **TOL[torch.float32])
