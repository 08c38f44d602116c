"""CUDA kernels of every metalcore op: float64 references, agreement with the CPU kernels, odd
sizes and tails, strided/offset (unaligned) inputs, opcheck, compile, export, CUDA graphs and bad
inputs. Skipped where no GPU (or no CUDA build of metalcore) is present."""

import pytest
import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import reference as ref
from tests.support import assert_close, export_roundtrip, raised, tensors_in

ops = torch.ops.metalcore


def _has_cuda_kernels() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "metalcore::rmsnorm", "CUDA"
    )


pytestmark = pytest.mark.skipif(not _has_cuda_kernels(), reason="needs a GPU and CUDA kernels")

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "offset", "transposed", "strided"]


def on_cuda(t: torch.Tensor, layout: str = "contiguous") -> torch.Tensor:
    """``t``'s values on the GPU in a given memory layout (see tests.support.make_layout)."""
    t = t.to(DEV)
    if layout == "contiguous":
        return t.contiguous()
    if layout == "offset":  # storage offset of one element: not 16-byte aligned
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v
    if layout == "transposed":
        return t if t.dim() < 2 else t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":
        big = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=DEV)
        v = big[..., ::2]
        v.copy_(t)
        return v
    raise ValueError(layout)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# --- RMSNorm ---------------------------------------------------------------------------------

# Rows from one element to the streaming path (wider than the register-cached plan).
RMS_SHAPES = [(1, 1), (3, 7), (5, 64), (2, 3, 100), (4, 1024), (7, 4096), (3, 8200), (2, 40000)]


@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rmsnorm_forward(shape, dtype, layout):
    n = shape[-1]
    x = rand(*shape, dtype=dtype)
    for w in (rand(n, dtype=dtype), None):
        y = ops.rmsnorm(on_cuda(x, layout), None if w is None else w.to(DEV), 1e-6)
        assert y.is_contiguous() and y.device.type == "cuda"
        assert_close(y.cpu(), ref.rmsnorm(x, w, 1e-6))
        assert_close(y.cpu(), ops.rmsnorm(x, w, 1e-6))


def _dw_tol(dtype, rows):
    base = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}
    return base[dtype] * max(1.0, rows**0.5)


@pytest.mark.parametrize("shape", RMS_SHAPES + [(20000, 256), (3000, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
def test_rmsnorm_backward(shape, dtype, layout):
    n = shape[-1]
    x, g = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    for w in (rand(n, dtype=dtype), None):
        dx, dw = ops.rmsnorm_backward(
            on_cuda(g, layout), on_cuda(x, layout), None if w is None else w.to(DEV), 1e-5
        )
        x64 = x.detach().double().clone().requires_grad_()
        w64 = w.detach().double().clone().requires_grad_() if w is not None else None
        ref.rmsnorm(x64, w64, 1e-5).backward(g.double())
        # bf16: one more rounding; float64: dx cancels to ~0 for very short rows.
        slack = {torch.bfloat16: 3 * 1.6e-2, torch.float64: 1e-6}.get(dtype)
        assert_close(dx.cpu(), x64.grad, dtype, rtol=slack, atol=slack)
        if w is None:
            assert dw.shape == (0,)
        else:
            tol = _dw_tol(dtype, x.numel() // n)
            torch.testing.assert_close(dw.cpu().double(), w64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(3, 7), (4, 1024), (33, 4096), (2, 40000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_grad_res", [True, False])
def test_fused_add_rmsnorm(shape, dtype, with_grad_res):
    n = shape[-1]
    x, r, w = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype), rand(n, dtype=dtype)
    y, h = ops.fused_add_rmsnorm(on_cuda(x, "offset"), on_cuda(r), w.to(DEV), 1e-6)
    y_ref, h_ref = ref.fused_add_rmsnorm(x, r, w, 1e-6)
    torch.testing.assert_close(h.cpu(), h_ref, rtol=0, atol=0)  # one rounding, as unfused
    assert_close(y.cpu(), y_ref)
    g, gr = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    gr_arg = gr.to(DEV) if with_grad_res else None
    dx, dw = ops.fused_add_rmsnorm_backward(g.to(DEV), gr_arg, h, w.to(DEV), 1e-6)
    dx_cpu, dw_cpu = ops.fused_add_rmsnorm_backward(
        g, gr if with_grad_res else None, h.cpu(), w, 1e-6
    )
    slack = 3 * 1.6e-2 if dtype == torch.bfloat16 else None
    assert_close(dx.cpu(), dx_cpu.double(), dtype, rtol=slack, atol=slack)
    tol = _dw_tol(dtype, x.numel() // n)
    torch.testing.assert_close(dw.cpu().double(), dw_cpu.double(), rtol=tol, atol=tol)


def test_rmsnorm_autograd_matches_cpu():
    x = rand(64, 512, dtype=torch.float32)
    w = rand(512)
    r = rand(64, 512)
    grads = {}
    for dev in ("cpu", DEV):
        xs = x.to(dev).clone().requires_grad_()
        ws = w.to(dev).clone().requires_grad_()
        rs = r.to(dev).clone().requires_grad_()
        y, h = metalcore.fused_add_rmsnorm(xs, rs, ws, 1e-6)
        (metalcore.rmsnorm(y, ws, 1e-6).square().sum() + h.sum()).backward()
        grads[dev] = [t.grad.cpu() for t in (xs, ws, rs)]
    for a, b in zip(grads["cpu"], grads[DEV]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# --- Activations -----------------------------------------------------------------------------

ACT_SIZES = [1, 7, 8, 9, 1000, 4099, 65536 + 3]


@pytest.mark.parametrize("n", ACT_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
def test_activations_forward_backward(n, dtype, layout):
    shape = (2, n)
    x, u, g = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    xc, uc, gc = on_cuda(x, layout), on_cuda(u, layout), on_cuda(g, layout)
    assert_close(ops.silu(xc).cpu(), ref.silu(x))
    for approx in ("none", "tanh"):
        assert_close(ops.gelu(xc, approx).cpu(), ref.gelu(x, approx))
    assert_close(ops.swiglu(xc, uc).cpu(), ref.swiglu(x, u))

    x64 = x.detach().double().clone().requires_grad_()
    u64 = u.detach().double().clone().requires_grad_()
    (F.silu(x64) * g.double()).sum().backward()
    assert_close(ops.silu_backward(gc, xc).cpu(), x64.grad, dtype)
    for approx in ("none", "tanh"):
        x64.grad = None
        (F.gelu(x64, approximate=approx) * g.double()).sum().backward()
        assert_close(ops.gelu_backward(gc, xc, approx).cpu(), x64.grad, dtype)
    x64.grad = None
    (F.silu(x64) * u64 * g.double()).sum().backward()
    dg, du = ops.swiglu_backward(gc, xc, uc)
    assert_close(dg.cpu(), x64.grad, dtype)
    assert_close(du.cpu(), u64.grad, dtype)
    # The CPU kernels compute the same function.
    assert_close(ops.swiglu(xc, uc).cpu(), ops.swiglu(x, u).double(), dtype)


# --- RoPE ------------------------------------------------------------------------------------


def rope_ref(q, k, cos, sin, interleaved):
    """float64 rotary embedding (HF rotate_half, or GPT-J pairs), partial rotary supported."""

    def rot(x):
        if interleaved:
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    c, s = cos.double(), sin.double()
    if c.dim() == 3:
        c, s = c.unsqueeze(1), s.unsqueeze(1)
    r = c.shape[-1]
    outs = []
    for x in (q.double(), k.double()):
        xr = x[..., :r]
        outs.append(torch.cat((xr * c + rot(xr) * s, x[..., r:]), dim=-1))
    return outs


def rope_inputs(b, hq, hk, s, d, r, dtype, table_dtype, table_batch, layout):
    q = rand(b, s, hq, d, dtype=dtype).transpose(1, 2)  # HF layout: a transposed view
    k = rand(b, hk, s, d, dtype=dtype)
    tshape = (s, r) if table_batch is None else (table_batch, s, r)
    ang = torch.rand(*tshape, dtype=torch.float64) * 6.28
    cos, sin = ang.cos().to(table_dtype), ang.sin().to(table_dtype)
    qc = q.to(DEV) if layout == "transposed" else on_cuda(q.contiguous(), layout)
    return q, k, cos, sin, qc, on_cuda(k, layout if layout != "transposed" else "contiguous")


ROPE_CASES = [
    # b, hq, hk, s, d, r, table_batch
    (2, 4, 2, 5, 16, 16, None),
    (1, 32, 8, 64, 128, 128, 1),
    (2, 3, 1, 7, 64, 32, 2),  # partial rotary
    (1, 2, 2, 3, 10, 6, None),  # rot/2 odd: scalar path
    (1, 7, 2, 3, 128, 64, None),  # odd head count with several heads per thread
    (1, 33, 3, 2, 256, 256, None),  # heads split over two blocks
    (3, 1, 1, 200, 4, 4, None),  # 64 tokens per block, a partial last block
    (70000, 2, 1, 1, 8, 8, 70000),  # batch beyond the grid's 65535 z-blocks: the batch loop
]


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
def test_rope_forward_backward(case, dtype, interleaved, layout):
    b, hq, hk, s, d, r, tb = case
    table_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, cos, sin, qc, kc = rope_inputs(b, hq, hk, s, d, r, dtype, table_dtype, tb, layout)
    qo, ko = ops.rope(qc, kc, cos.to(DEV), sin.to(DEV), interleaved)
    assert qo.is_contiguous() and ko.is_contiguous()
    q_ref, k_ref = rope_ref(q, k, cos, sin, interleaved)
    assert_close(qo.cpu(), q_ref)
    assert_close(ko.cpu(), k_ref)
    # Backward: the transpose of the rotation, checked against float64 autograd.
    gq, gk = rand(*q.shape, dtype=dtype), rand(*k.shape, dtype=dtype)
    q64 = q.detach().double().clone().requires_grad_()
    k64 = k.detach().double().clone().requires_grad_()
    a, bb = rope_ref(q64, k64, cos, sin, interleaved)
    ((a * gq.double()).sum() + (bb * gk.double()).sum()).backward()
    dq, dk = ops.rope_backward(
        on_cuda(gq, layout if layout != "transposed" else "offset"),
        gk.to(DEV),
        cos.to(DEV),
        sin.to(DEV),
        interleaved,
    )
    assert_close(dq.cpu(), q64.grad, dtype)
    assert_close(dk.cpu(), k64.grad, dtype)


def test_rope_same_dtype_tables():
    q, k, cos, sin, qc, kc = rope_inputs(
        2, 4, 4, 9, 64, 64, torch.bfloat16, torch.bfloat16, 2, "contiguous"
    )
    qo, ko = ops.rope(qc, kc, cos.to(DEV), sin.to(DEV), False)
    q_ref, k_ref = rope_ref(q, k, cos, sin, False)
    assert_close(qo.cpu(), q_ref)
    assert_close(ko.cpu(), k_ref)


# --- AdamW -----------------------------------------------------------------------------------


def adamw_ref(p, g, m, v, mv, step, lr, b1, b2, wd, eps, amsgrad, maximize):
    """One AdamW step in float64 (torch.optim.AdamW's math); returns new p, m, v, mv."""
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    if maximize:
        g = -g
    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    if amsgrad:
        mv = torch.maximum(mv.double(), v)
        denom = mv.sqrt() / bc2**0.5 + eps
    else:
        denom = v.sqrt() / bc2**0.5 + eps
    return p - lr / bc1 * m / denom, m, v, mv


@pytest.mark.parametrize(
    "pdtype,sdtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("where", ["cuda-steps-cuda-lr", "cpu-steps-cpu-lr"])
def test_adamw_matches_float64(pdtype, sdtype, amsgrad, maximize, where):
    sizes = [1, 7, 4099, 3 * 8192 + 5, 64 * 1000]
    lr, b1, b2, wd, eps = 1e-2, 0.9, 0.95, 0.1, 1e-8
    dev_steps = where.startswith("cuda")
    ps = [rand(n, dtype=pdtype) for n in sizes]
    gs = [rand(n, dtype=pdtype) for n in sizes]
    ms = [rand(n).to(sdtype) * 0.1 for n in sizes]
    vs = [rand(n).abs().to(sdtype) * 0.1 for n in sizes]
    mvs = [v.clone() + 0.01 for v in vs] if amsgrad else []
    steps = [torch.tensor(float(i + 1)) for i in range(len(sizes))]
    cp = [on_cuda(t, "offset" if i == 1 else "contiguous") for i, t in enumerate(ps)]
    cg, cm, cv = [t.to(DEV) for t in gs], [t.to(DEV) for t in ms], [t.to(DEV) for t in vs]
    cmv = [t.to(DEV) for t in mvs]
    csteps = [s.to(DEV) if dev_steps else s.clone() for s in steps]
    # float64 lr: a float32 0.01 is off by 2e-9, more than the float64 tolerance.
    lr_t = torch.tensor(lr, dtype=torch.float64, device=DEV if dev_steps else "cpu")
    metalcore.adamw_step(
        cp,
        cg,
        cm,
        cv,
        csteps,
        lr=lr_t,
        beta1=b1,
        beta2=b2,
        weight_decay=wd,
        eps=eps,
        amsgrad=amsgrad,
        max_exp_avg_sqs=cmv,
        maximize=maximize,
    )
    for i in range(len(sizes)):
        assert float(csteps[i]) == float(steps[i]) + 1
        p_ref, m_ref, v_ref, mv_ref = adamw_ref(
            ps[i],
            gs[i],
            ms[i],
            vs[i],
            mvs[i] if amsgrad else None,
            float(steps[i]) + 1,
            lr,
            b1,
            b2,
            wd,
            eps,
            amsgrad,
            maximize,
        )
        assert_close(cp[i].cpu(), p_ref)
        assert_close(cm[i].cpu(), m_ref)
        assert_close(cv[i].cpu(), v_ref)
        if amsgrad:
            assert_close(cmv[i].cpu(), mv_ref)


def test_adamw_many_tensors_and_noncontiguous():
    # 300 tensors: more than one parameter block. Every 7th parameter is transposed with its
    # gradient and states (dense, same memory order as the param: updated in place in storage
    # order, like on the CPU).
    n = 300

    def layout(t, i):
        return t.to(DEV) if i % 7 else t.t().contiguous().to(DEV).t()

    ps = [rand(5, 3) for _ in range(n)]
    gs, ms, vs = [rand(5, 3) for _ in ps], [rand(5, 3) for _ in ps], [rand(5, 3).abs() for _ in ps]
    steps = [torch.tensor(3.0) for _ in ps]
    cp, cg = [layout(t, i) for i, t in enumerate(ps)], [layout(t, i) for i, t in enumerate(gs)]
    cm, cv = [layout(t, i) for i, t in enumerate(ms)], [layout(t, i) for i, t in enumerate(vs)]
    assert not all(t.is_contiguous() for t in cp)
    cs = [s.to(DEV) for s in steps]
    metalcore.adamw_step(cp, cg, cm, cv, cs, lr=torch.tensor(1e-3, device=DEV))
    for i in range(n):
        p_ref, m_ref, v_ref, _ = adamw_ref(
            ps[i], gs[i], ms[i], vs[i], None, 4.0, 1e-3, 0.9, 0.999, 1e-2, 1e-8, False, False
        )
        assert_close(cp[i].cpu(), p_ref)
        assert_close(cm[i].cpu(), m_ref)
        assert float(cs[i]) == 4.0


def test_adamw_rejects_mismatched_layouts_before_mutating():
    p = rand(5, 3).t().contiguous().to(DEV).t()  # dense, transposed, shape (5, 3)
    g, m, v = (torch.randn(5, 3, device=DEV) for _ in range(3))  # contiguous
    st = torch.zeros((), device=DEV)
    before = p.clone()
    with pytest.raises(ValueError, match=r"'grads\[0\]' must have the same memory"):
        metalcore.adamw_step([p], [g], [m], [v], [st], lr=torch.tensor(1e-3, device=DEV))
    assert torch.equal(p, before) and float(st) == 0.0


def test_adamw_matches_torch_fused():
    ps = [rand(1000, 33) for _ in range(5)]
    torch_ps = [torch.nn.Parameter(p.to(DEV)) for p in ps]
    opt = torch.optim.AdamW(torch_ps, lr=3e-3, weight_decay=0.05, fused=True)
    ours = [p.to(DEV) for p in ps]
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    steps = [torch.zeros((), device=DEV) for _ in ours]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for tp, g in zip(torch_ps, grads):
            tp.grad = g.clone()
        opt.step()
        metalcore.adamw_step(
            ours, grads, m, v, steps, lr=torch.tensor(3e-3, device=DEV), weight_decay=0.05
        )
    for a, b in zip(ours, torch_ps):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


# --- Graph capture, opcheck, compile, export --------------------------------------------------


def test_cuda_graph_capture():
    # Cooperative kernels (rmsnorm backward, adamw) must be capturable and replayable.
    x = torch.randn(512, 1024, device=DEV)
    g = torch.randn_like(x)
    w = torch.randn(1024, device=DEV)
    p = [torch.randn(4096, device=DEV)]
    gr, m, v = (
        [torch.randn(4096, device=DEV)],
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
    dx_ref, dw_ref = ops.rmsnorm_backward(g.cpu(), x.cpu(), w.cpu(), 1e-6)
    torch.testing.assert_close(dx.cpu(), dx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw.cpu(), dw_ref, rtol=1e-3, atol=1e-3)
    assert float(st[0]) == 2.0


def test_adamw_sign_off_counters_across_streams_and_graphs():
    # Each stream reuses one sign-off counter that the kernel resets; a captured step gets its
    # own. Steps alternate between two streams, eager and graph replays, and must match the CPU.
    gen = torch.Generator().manual_seed(0)
    sizes = [4096, 3, 70000]
    p_cpu = [torch.randn(n, generator=gen) for n in sizes]
    g_cpu = [torch.randn(n, generator=gen) for n in sizes]
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
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(3, 5, 64, device=DEV, dtype=dtype)
    r, g, w = torch.randn_like(x), torch.randn_like(x), torch.randn(64, device=DEV, dtype=dtype)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    rr = r.clone().requires_grad_()
    torch.library.opcheck(ops.rmsnorm.default, (xr, wr, 1e-6))
    torch.library.opcheck(ops.rmsnorm.default, (x, None, 1e-6))
    torch.library.opcheck(ops.fused_add_rmsnorm.default, (xr, rr, wr, 1e-6))
    torch.library.opcheck(ops.rmsnorm_backward.default, (g, x, w, 1e-6))
    torch.library.opcheck(ops.fused_add_rmsnorm_backward.default, (g, g, x, w, 1e-6))
    torch.library.opcheck(ops.fused_add_rmsnorm_backward.default, (g, None, x, None, 1e-6))
    torch.library.opcheck(ops.silu.default, (xr,))
    torch.library.opcheck(ops.silu_backward.default, (g, x))
    torch.library.opcheck(ops.gelu.default, (xr, "tanh"))
    torch.library.opcheck(ops.gelu_backward.default, (g, x, "none"))
    torch.library.opcheck(ops.swiglu.default, (xr, rr))
    torch.library.opcheck(ops.swiglu_backward.default, (g, x, r))
    q = torch.randn(2, 4, 6, 16, device=DEV, dtype=dtype)
    k = torch.randn(2, 2, 6, 16, device=DEV, dtype=dtype)
    cos, sin = torch.randn(6, 16, device=DEV), torch.randn(6, 16, device=DEV)
    torch.library.opcheck(ops.rope.default, (q, k, cos, sin, False))
    torch.library.opcheck(ops.rope_backward.default, (q, k, cos, sin, True))
    ps = [torch.randn(10, device=DEV), torch.randn(3, 4, device=DEV)]
    args = (
        ps,
        [torch.randn_like(p) for p in ps],
        [torch.zeros_like(p) for p in ps],
        [torch.zeros_like(p) for p in ps],
        [],
        [torch.zeros((), device=DEV) for _ in ps],
        torch.tensor(1e-3, device=DEV),
        0.9,
        0.999,
        0.01,
        1e-8,
    )
    torch.library.opcheck(ops.adamw.default, args)


def test_compile_fullgraph_dynamic():
    def block(x, r, w, gate, up):
        y, h = ops.fused_add_rmsnorm(x, r, w, 1e-6)
        return ops.rmsnorm(y, w, 1e-6) + h, ops.swiglu(gate, up) + ops.gelu(gate, "tanh")

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for rows in (8, 17, 33):
        x, r = torch.randn(rows, 256, device=DEV), torch.randn(rows, 256, device=DEV)
        w = torch.randn(256, device=DEV)
        gate, up = torch.randn(rows, 512, device=DEV), torch.randn(rows, 512, device=DEV)
        with torch.compiler.set_stance("fail_on_recompile" if rows != 8 else "default"):
            out = compiled(x, r, w, gate, up)
        torch.testing.assert_close(out, block(x, r, w, gate, up))


def test_compile_backward_and_rope():
    def f(x, w, q, k, cos, sin):
        qo, ko = ops.rope(q, k, cos, sin, False)
        return ops.rmsnorm(x, w, 1e-6).sum() + qo.sum() + ko.sum()

    torch._dynamo.reset()
    x = torch.randn(16, 128, device=DEV, requires_grad=True)
    w = torch.randn(128, device=DEV, requires_grad=True)
    q = torch.randn(1, 4, 8, 32, device=DEV)
    k = torch.randn(1, 2, 8, 32, device=DEV)
    cos, sin = torch.randn(8, 32, device=DEV), torch.randn(8, 32, device=DEV)
    torch.compile(f, fullgraph=True)(x, w, q, k, cos, sin).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    f(x, w, q, k, cos, sin).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64))

    def forward(self, x, r, gate, up):
        y, h = ops.fused_add_rmsnorm(x, r, self.w, 1e-6)
        return ops.rmsnorm(y, self.w, 1e-6), h, ops.swiglu(gate, up)


def test_export_roundtrip(tmp_path):
    m = _Block().to(DEV)
    rows = torch.export.Dim("rows", min=2, max=4096)

    def args(n):
        return (
            torch.randn(n, 64, device=DEV),
            torch.randn(n, 64, device=DEV),
            torch.randn(n, 96, device=DEV),
            torch.randn(n, 96, device=DEV),
        )

    export_roundtrip(
        m,
        args(8),
        ({0: rows}, {0: rows}, {0: rows}, {0: rows}),
        args(19),
        tmp_path,
        ["metalcore.fused_add_rmsnorm", "metalcore.rmsnorm", "metalcore.swiglu"],
    )


# --- Bad inputs ------------------------------------------------------------------------------


def test_bad_inputs():
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(RuntimeError, match="same device"):
        ops.rmsnorm(x, torch.randn(8), 1e-6)  # weight on the CPU
    with pytest.raises(RuntimeError, match="same device"):
        ops.rmsnorm(x.cpu(), torch.randn(8, device=DEV), 1e-6)
    with pytest.raises(TypeError, match="dtype"):
        ops.rmsnorm(x, torch.randn(8, device=DEV, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="shape"):
        ops.rmsnorm(x, torch.randn(9, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        ops.rmsnorm(x, None, -1.0)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        ops.rmsnorm(x.int(), None, 1e-6)
    with pytest.raises(RuntimeError, match="same device"):
        ops.fused_add_rmsnorm(x, x.cpu(), None, 1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ops.rmsnorm_backward(torch.randn(4, 9, device=DEV), x, None, 1e-6)
    with pytest.raises(RuntimeError, match="same device"):
        ops.swiglu(x, x.cpu())
    with pytest.raises(ValueError, match="same shape"):
        ops.swiglu(x, torch.randn(4, 9, device=DEV))
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(x, "fast")
    q = torch.randn(1, 2, 4, 8, device=DEV)
    with pytest.raises(RuntimeError, match="same device"):
        ops.rope(q, q, torch.randn(4, 8), torch.randn(4, 8), False)
    with pytest.raises(ValueError, match="even"):
        ops.rope(q, q, torch.randn(4, 7, device=DEV), torch.randn(4, 7, device=DEV), False)
    p = [torch.randn(4, device=DEV)]
    zeros = [torch.zeros(4, device=DEV)]
    st = [torch.zeros((), device=DEV)]
    lr = torch.tensor(1e-3, device=DEV)

    def adamw(grads, lr=lr):
        ops.adamw(p, grads, zeros, zeros, [], st, lr, 0.9, 0.999, 0.0, 1e-8)

    with pytest.raises(ValueError, match="grads"):
        adamw([])
    with pytest.raises(RuntimeError, match="same device"):
        adamw([torch.randn(4)])
    with pytest.raises(ValueError, match="same shape"):
        adamw([torch.randn(5, device=DEV)])
    with pytest.raises(ValueError, match="0-dim"):
        adamw([torch.randn(4, device=DEV)], lr=torch.ones(2, device=DEV))


# --- Numerics at the edges (the fuzzer's findings on the other backends) ---------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_negative_tail_keeps_relative_accuracy(approximate):
    x = torch.linspace(-9.0, -3.0, 601)
    g = torch.ones_like(x)
    y = metalcore.gelu(x.to(DEV), approximate=approximate).cpu().double()
    d = ops.gelu_backward(g.to(DEV), x.to(DEV), approximate).cpu().double()
    y_ref = ref.gelu(x.double(), approximate)
    d_ref = ref.gelu_backward(g.double(), x.double(), approximate)
    assert ((y - y_ref) / y_ref).abs().max() < 1e-5
    assert ((d - d_ref) / d_ref).abs().max() < 1e-5
    inf = torch.full((1,), float("inf"), device=DEV)
    assert ops.gelu_backward(inf, x[:1].to(DEV), approximate).item() == float("-inf")


def test_swiglu_backward_has_no_overflowing_intermediates():
    # g * gate and g * up overflow float32 here; the gradients themselves are finite.
    g = torch.tensor([1e37, 1e37], device=DEV)
    gate = torch.tensor([-40.0, 2.0], device=DEV)
    up = torch.tensor([1.0, 30.0], device=DEV)
    dg, du = ops.swiglu_backward(g, gate, up)
    rg, ru = ref.swiglu_backward(g.cpu(), gate.cpu(), up.cpu())
    assert torch.isfinite(dg).all() and torch.isfinite(du).all()
    assert_close(dg.cpu(), rg.float())
    assert_close(du.cpu(), ru.float())


# --- One set of entry points: the CUDA path raises the CPU's errors ---------------------------


def _moved(obj):
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            return obj
        # Keep the layout (Tensor.to makes a sliced view contiguous, hiding a non-dense case).
        return torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device=DEV).copy_(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(o) for o in obj)
    return obj


def test_bad_inputs_raise_the_cpu_errors():
    from metalcore.testing.op_specs import SPECS

    checked = 0
    for name, spec in sorted(SPECS.items()):
        if spec.namespace != "metalcore":
            continue
        for bad in spec.bad_inputs:
            args, kwargs = bad.make()
            if kwargs or any(t.device.type != "cpu" for t in tensors_in(args)):
                continue  # device-mixing cases route differently by design
            cpu_err = raised(spec.overload(), *args)
            cuda_err = raised(spec.overload(), *_moved(args))
            if cpu_err is None or "lr" in bad.description:
                continue  # a CUDA lr tensor is read by the kernel, not range-checked on the host
            assert cuda_err is not None, f"{name}: CUDA accepted {bad.description}"
            assert type(cuda_err) is type(cpu_err), (name, bad.description, cuda_err)
            assert str(cuda_err) == str(cpu_err), (name, bad.description)
            checked += 1
    assert checked > 20
