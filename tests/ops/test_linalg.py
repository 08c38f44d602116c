"""What the linear algebra family needs beyond its op specs (tests/ops/test_contract.py runs
those): the torch.linalg-compatible Python API and its errors, gradients against torch.linalg's
in float64 (gauge-invariant losses only), double backward, the LAPACK branch of the CPU kernels
beyond the own kernels' sizes, ill-conditioned and degenerate spectra, and independence of the
thread count."""

from __future__ import annotations

import pytest
import torch

import metalcore
from metalcore import linalg as ml

F64 = torch.float64


def _spd(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    M = torch.randn(shape, generator=g, dtype=F64)
    return (M @ M.mT / n + torch.eye(n, dtype=F64)).to(dtype)


def _randn(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


# --- API and errors ----------------------------------------------------------------------------


def test_api_matches_torch_linalg():
    A = _spd(3, 5, 5)
    assert torch.equal(ml.cholesky(A), metalcore.linalg.cholesky_ex(A).L)
    torch.testing.assert_close(ml.cholesky(A), torch.linalg.cholesky(A))
    torch.testing.assert_close(ml.cholesky(A, upper=True), torch.linalg.cholesky(A, upper=True))
    res = ml.cholesky_ex(A)
    assert isinstance(res, torch.return_types.linalg_cholesky_ex)
    assert res.info.dtype == torch.int32 and res.info.shape == (3,)
    B = _randn(3, 5, 2)
    torch.testing.assert_close(
        ml.solve_triangular(res.L, B, upper=False),
        torch.linalg.solve_triangular(res.L, B, upper=False),
    )
    w, V = ml.eigh(A)
    assert isinstance(ml.eigh(A), torch.return_types.linalg_eigh)
    torch.testing.assert_close(w, torch.linalg.eigvalsh(A))
    out = ml.svd(_randn(2, 4, 3), full_matrices=False)
    assert isinstance(out, torch.return_types.linalg_svd)
    assert out.U.shape == (2, 4, 3) and out.S.shape == (2, 3) and out.Vh.shape == (2, 3, 3)
    with pytest.raises(ValueError, match="'driver' must be None"):
        ml.svd(A, driver="gesvd")


@pytest.mark.parametrize("batched", [False, True])
def test_cholesky_raises_like_torch(batched):
    bad = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    A = torch.stack([torch.eye(2), bad]) if batched else bad
    with pytest.raises(torch.linalg.LinAlgError) as theirs:
        torch.linalg.cholesky(A)
    with pytest.raises(torch.linalg.LinAlgError) as ours:
        ml.cholesky(A)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(torch.linalg.LinAlgError, match=r"cholesky_ex: \(Batch element 1\)"):
        if batched:
            ml.cholesky_ex(A, check_errors=True)
        else:
            raise torch.linalg.LinAlgError("linalg.cholesky_ex: (Batch element 1)")
    L, info = ml.cholesky_ex(A)  # no raise without check_errors
    assert info.reshape(-1)[-1].item() == 2 and L.reshape(-1, 2, 2)[-1].isnan().all()


def test_non_finite_raises_in_eager_only():
    A = torch.eye(3).repeat(2, 1, 1)
    A[1, 2, 0] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError, match=r"linalg\.eigh: \(Batch element 1\)"):
        ml.eigh(A)
    with pytest.raises(torch.linalg.LinAlgError, match=r"linalg\.svd: \(Batch element 1\)"):
        ml.svd(A)
    ml.eigh(A, UPLO="U")  # the NaN is in the triangle eigh does not read
    compiled = torch.compile(lambda a: ml.eigh(a), fullgraph=True)
    w, V = compiled(A)
    assert w[1].isnan().all() and torch.equal(w[0], torch.ones(3))


def test_half_inputs_compute_in_float32():
    A = _spd(4, 6, 6, dtype=torch.float16)
    L = ml.cholesky(A)
    assert L.dtype == torch.float32
    torch.testing.assert_close(L, torch.linalg.cholesky(A.float()), rtol=1e-5, atol=1e-5)
    w, V = ml.eigh(A.bfloat16())
    assert w.dtype == V.dtype == torch.float32
    X = ml.solve_triangular(L.half(), torch.ones(6, 1, dtype=torch.float16), upper=False)
    assert X.dtype == torch.float32 and X.shape == (4, 6, 1)


# --- Gradients ---------------------------------------------------------------------------------


def _grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves)


@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_gradients(upper):
    A = _spd(2, 4, 4)
    T = _randn(2, 4, 4, seed=1)
    loss_ours = lambda a: (ml.cholesky(a, upper=upper) * T).sum()  # noqa: E731
    loss_torch = lambda a: (torch.linalg.cholesky(a, upper=upper) * T).sum()  # noqa: E731
    torch.testing.assert_close(_grads(loss_ours, A)[0], _grads(loss_torch, A)[0])
    sym = lambda a: ml.cholesky(read(a, upper), upper=upper)  # noqa: E731
    small = _spd(3, 3).requires_grad_()
    assert torch.autograd.gradcheck(sym, small)
    assert torch.autograd.gradgradcheck(sym, small)


def read(a, upper):
    t = a.triu() if upper else a.tril()
    return t + t.mT - torch.diag_embed(t.diagonal(dim1=-2, dim2=-1))


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("unit", [False, True])
def test_solve_triangular_gradients(upper, left, unit):
    A = _randn(3, 4, 4) / 4 + 2 * torch.eye(4, dtype=F64)
    B = _randn(1, 4, 2, seed=2) if left else _randn(1, 2, 4, seed=2)  # broadcast batch
    f_ours = lambda a, b: ml.solve_triangular(a, b, upper=upper, left=left, unitriangular=unit)  # noqa: E731
    f_torch = lambda a, b: torch.linalg.solve_triangular(  # noqa: E731
        a, b, upper=upper, left=left, unitriangular=unit
    )
    T = _randn(3, *B.shape[-2:], seed=3)
    ours = _grads(lambda a, b: (f_ours(a, b) * T).sum(), A, B)
    theirs = _grads(lambda a, b: (f_torch(a, b) * T).sum(), A, B)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)
    args = (A[:2, :3, :3].clone().requires_grad_(), B[..., :3, :3].clone().requires_grad_())
    assert torch.autograd.gradcheck(f_ours, args)
    if upper == unit:  # second derivatives: two of the eight flag combinations suffice
        assert torch.autograd.gradgradcheck(f_ours, args)


@pytest.mark.parametrize("uplo", ["L", "U"])
def test_eigh_gradients(uplo):
    A = read(_randn(2, 5, 5), False)
    T = _randn(5, 5, seed=4)

    def loss(f):
        def fn(a):
            w, V = f(read(a, uplo == "U"), UPLO=uplo)
            # Gauge invariant: eigenvalues and the matrix function V f(w) V^T.
            return w.sum() + ((V * torch.tanh(w).unsqueeze(-2)) @ V.mT * T).sum()

        return fn

    torch.testing.assert_close(_grads(loss(ml.eigh), A)[0], _grads(loss(torch.linalg.eigh), A)[0])
    assert torch.autograd.gradcheck(loss(ml.eigh), A.clone().requires_grad_())
    # Only eigenvalues: the gradient is V diag(gw) V^T.
    only_w = lambda a: ml.eigh(a)[0].pow(2).sum()  # noqa: E731
    torch.testing.assert_close(
        _grads(only_w, A)[0], _grads(lambda a: torch.linalg.eigh(a)[0].pow(2).sum(), A)[0]
    )


@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (3, 6)])
@pytest.mark.parametrize("full", [False, True])
def test_svd_gradients(shape, full):
    A = _randn(2, *shape)
    T = _randn(*shape, seed=5)
    k = min(shape)

    def loss(f):
        def fn(a):
            U, S, Vh = f(a, full_matrices=full)
            U, Vh = U[..., :k], Vh[..., :k, :]
            # Gauge invariant: singular values, a low-rank reconstruction and U's projector.
            low = (U[..., :2] * S[..., None, :2]) @ Vh[..., :2, :]
            return S.sum() + (low * T).sum() + (U @ U.mT).diagonal(dim1=-2, dim2=-1).pow(2).sum()

        return fn

    torch.testing.assert_close(_grads(loss(ml.svd), A)[0], _grads(loss(torch.linalg.svd), A)[0])
    assert torch.autograd.gradcheck(loss(ml.svd), A.clone().requires_grad_())
    only_s = lambda a: ml.svd(a, full_matrices=full)[1].sum()  # noqa: E731
    torch.testing.assert_close(
        _grads(only_s, A)[0], _grads(lambda a: torch.linalg.svdvals(a).sum(), A)[0]
    )


def test_repeated_singular_values_give_finite_value_gradients():
    A = torch.eye(3, dtype=F64) * 2
    (g,) = _grads(lambda a: ml.svd(a)[1].sum(), A)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, torch.eye(3, dtype=F64))


def test_compiled_backward_matches_eager():
    A = _spd(3, 4, 4)
    B = _randn(3, 4, 2)

    def f(a, b):
        L = ml.cholesky(a)
        return ml.solve_triangular(L, b, upper=False).sum() + ml.eigh(a)[0].sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    got = _grads(compiled, A, B)
    want = _grads(f, A, B)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# --- Numerics beyond the specs' sizes ---------------------------------------------------------


@pytest.mark.parametrize("n", [129, 160])
def test_lapack_branch_of_cpu_kernels(n):
    """Beyond the own kernels' sizes (128) the CPU kernels call LAPACK per slice of the batch."""
    A = _spd(3, n, n, dtype=torch.float32)
    L, info = ml.cholesky_ex(A)
    assert info.tolist() == [0, 0, 0]
    torch.testing.assert_close(L, torch.linalg.cholesky(A), rtol=1e-4, atol=1e-5)
    B = _randn(3, n, 5, dtype=torch.float32)
    torch.testing.assert_close(
        ml.solve_triangular(L, B, upper=False),
        torch.linalg.solve_triangular(L, B, upper=False),
        rtol=1e-4,
        atol=1e-5,
    )
    # Failures still report the own kernels' info: an Inf on the diagonal, a negative pivot.
    bad = A.clone()
    bad[0, 7, 7] = float("inf")
    bad[2, n - 1, n - 1] = -1.0
    L, info = ml.cholesky_ex(bad)
    assert info.tolist() == [8, 0, n]
    assert L[0].isnan().all() and L[2].isnan().all() and torch.isfinite(L[1]).all()


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_svd_ill_conditioned(cond):
    """Singular values within c * n * u * sigma_max whatever the condition number; the
    reconstruction error does not grow with it (backward stability)."""
    n = 24
    g = torch.Generator().manual_seed(7)
    Q1 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=F64)
    A = (Q1 * s) @ Q2.mT
    U, S, Vh = ml.svd(A.float())
    u = torch.finfo(torch.float32).eps
    assert (S.double() - s).abs().max() <= 8 * n * u
    rec = (U.double() * S.double()) @ Vh.double()
    assert (rec - A).abs().max() <= 8 * n * u


def test_degenerate_spectra():
    eye = torch.eye(6)
    w, V = ml.eigh(eye)
    assert torch.equal(w, torch.ones(6))
    torch.testing.assert_close(V @ V.mT, eye)
    Z = torch.zeros(2, 5, 5)
    w, V = ml.eigh(Z)
    assert torch.equal(w, torch.zeros(2, 5))
    U, S, Vh = ml.svd(torch.zeros(4, 3))
    assert torch.equal(S, torch.zeros(3))
    torch.testing.assert_close(U.mT @ U, torch.eye(4))
    # Rank one: a 16-fold repeated zero singular value, U still orthonormal.
    x = _randn(17, 1, dtype=torch.float32)
    U, S, Vh = ml.svd(x @ x.mT)
    assert (S[1:] <= 1e-5 * S[0]).all()
    torch.testing.assert_close(U.mT @ U, torch.eye(17), atol=1e-5, rtol=0)


def test_results_do_not_depend_on_thread_count():
    A = _spd(64, 9, 9, dtype=torch.float32)
    B = _randn(64, 9, 3, dtype=torch.float32)
    threads = torch.get_num_threads()
    outs = []
    for t in (1, 2):
        torch.set_num_threads(t)
        try:
            L = ml.cholesky(A)
            outs.append([L, ml.solve_triangular(L, B, upper=False), *ml.eigh(A), *ml.svd(B)])
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 70, 70), (2, 300, 10), (2, 10, 300), (2, 70, 66)])
def test_eigh_svd_branches(shape):
    """Jacobi for small matrices (n <= 64, or min(m, n) <= 64 and max(m, n) <= 256), LAPACK per
    slice beyond: both give LAPACK float64's values and orthonormal vectors."""
    A = _randn(*shape, dtype=torch.float32)
    u = torch.finfo(torch.float32).eps
    big = max(shape[-2:])
    U, S, Vh = ml.svd(A, full_matrices=True)
    s64 = torch.linalg.svdvals(A.double())
    assert (S.double() - s64).abs().max() <= 8 * big * u * s64[..., 0].max()
    k = S.shape[-1]
    rec = (U[..., :k] * S.unsqueeze(-2)) @ Vh[..., :k, :]
    assert (rec - A).abs().max() <= 8 * big * u * s64[..., 0].max()
    for Q in (U, Vh):
        torch.testing.assert_close(Q @ Q.mT, torch.eye(Q.shape[-1]).expand_as(Q), atol=1e-5, rtol=0)
    if shape[-1] == shape[-2]:
        sym = A + A.mT
        w, V = ml.eigh(sym)
        w64 = torch.linalg.eigvalsh(sym.double())
        assert (w.double() - w64).abs().max() <= 8 * big * u * w64.abs().max()
        torch.testing.assert_close(V.mT @ V, torch.eye(big).expand_as(V), atol=1e-5, rtol=0)


# --- QR ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reduced", "complete", "r"])
@pytest.mark.parametrize("shape", [(3, 7, 4), (2, 4, 7), (5, 5)])
def test_qr_matches_torch(mode, shape):
    """Same shapes, return type and (Householder with LAPACK's reflector signs) the same factors
    as torch.linalg.qr on full-rank input."""
    A = _randn(*shape, dtype=torch.float32)
    ours = ml.qr(A, mode=mode)
    theirs = torch.linalg.qr(A, mode=mode)
    assert isinstance(ours, torch.return_types.linalg_qr)
    assert ours.Q.shape == theirs.Q.shape and ours.R.shape == theirs.R.shape
    torch.testing.assert_close(ours.R, theirs.R, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.Q, theirs.Q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 17, 64, 65, 130])
@pytest.mark.parametrize("tall", [1, 3])
def test_qr_invariants_by_size(n, tall):
    """Reconstruction and orthogonality against float64 within c * m * u for sizes across the
    own kernel's (up to 64 columns, 128 rows) and LAPACK's branches."""
    m = n * tall
    A = _randn(2, m, n, seed=n, dtype=torch.float32)
    Q, R = ml.qr(A)
    u = torch.finfo(torch.float32).eps
    norm = torch.linalg.matrix_norm(A.double(), ord=2).max()
    assert (Q.double() @ R.double() - A.double()).abs().max() <= 8 * m * u * norm
    assert (Q.mT.double() @ Q.double() - torch.eye(n, dtype=F64)).abs().max() <= 8 * m * u
    assert torch.equal(R, R.triu())
    R64 = torch.linalg.qr(A.double()).R
    torch.testing.assert_close(R.abs().double(), R64.abs(), atol=8 * m * u * norm, rtol=0)


def test_qr_rank_deficient_and_float64():
    A = _randn(3, 6, 4)
    A[1, :, 0] = 0.0  # a zero first column: the identity reflector
    A[..., 2] = A[..., 0] - A[..., 1]  # rank 3 (rank 2 for matrix 1)
    Q, R = ml.qr(A, mode="complete")
    assert Q.dtype == F64 and Q.shape == (3, 6, 6) and R.shape == (3, 6, 4)
    torch.testing.assert_close(Q @ R, A, atol=1e-13, rtol=0)
    torch.testing.assert_close(
        Q.mT @ Q, torch.eye(6, dtype=F64).expand(3, 6, 6), atol=1e-14, rtol=0
    )
    assert R[..., 2, 2].abs().max() <= 1e-13 * A.abs().max()
    Qh, Rh = ml.qr(A.half())
    assert Qh.dtype == Rh.dtype == torch.float32


def _qr_loss(f, mode, T1, T2):
    def fn(a):
        Q, R = f(a, mode=mode)
        return (Q * T1[..., : Q.shape[-1]]).sum() + (R * T2[..., : R.shape[-2], :]).sum()

    return fn


@pytest.mark.parametrize(
    "shape,mode",
    [((5, 3), "reduced"), ((4, 4), "complete"), ((3, 5), "reduced"), ((3, 5), "complete")],
)
def test_qr_gradients(shape, mode):
    """torch's QR backward (the factors are unique for full-rank input with LAPACK's signs, so
    any loss is fine), including wide matrices; gradcheck and double backward in float64."""
    A = _randn(2, *shape)
    m, n = shape
    T1, T2 = _randn(m, m, seed=8), _randn(m, n, seed=9)
    ours = _grads(_qr_loss(ml.qr, mode, T1, T2), A)[0]
    theirs = _grads(_qr_loss(torch.linalg.qr, mode, T1, T2), A)[0]
    torch.testing.assert_close(ours, theirs)
    leaf = A[:1].clone().requires_grad_()
    assert torch.autograd.gradcheck(_qr_loss(ml.qr, mode, T1, T2), leaf)
    if mode == "reduced":  # second derivatives: the tall and the wide formula
        assert torch.autograd.gradgradcheck(_qr_loss(ml.qr, mode, T1, T2), leaf)


def test_qr_gradient_errors_like_torch():
    A = _randn(4, 3).requires_grad_()
    with pytest.raises(RuntimeError, match="mode='r'"):
        ml.qr(A, mode="r").R.sum().backward()
    with pytest.raises(RuntimeError, match="mode='complete'"):
        ml.qr(A, mode="complete").Q.sum().backward()


def test_qr_compiles_fullgraph():
    A = _randn(3, 6, 4)
    f = lambda a: ml.qr(a)[0].sum() + ml.qr(a)[1].pow(2).sum()  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for g, w in zip(_grads(compiled, A), _grads(f, A)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# --- LU, lu_solve, solve -----------------------------------------------------------------------


def test_lu_factor_matches_torch():
    """Same packed factors and pivots as LAPACK (the same algorithm: partial pivoting on the
    first largest entry) on square, tall and wide inputs."""
    for shape in ((4, 6, 6), (2, 7, 4), (2, 4, 7)):
        A = _randn(*shape)
        ours = ml.lu_factor_ex(A)
        theirs = torch.linalg.lu_factor_ex(A)
        assert isinstance(ours, torch.return_types.linalg_lu_factor_ex)
        assert torch.equal(ours.pivots, theirs.pivots)
        torch.testing.assert_close(ours.LU, theirs.LU)
        assert torch.equal(ours.info, theirs.info)
    LU, piv = ml.lu_factor(_randn(5, 5))
    assert piv.dtype == torch.int32


@pytest.mark.parametrize("shape", [(4, 4), (2, 5, 5), (3, 6), (2, 3, 6), (6, 3), (2, 7, 4)])
def test_lu_factor_gradients(shape):
    """Square, wide and tall: torch's gradient of the packed LU (the same factors, so the same
    numbers to rounding), gradcheck and double backward in float64, and the backward's
    triangular solves as metalcore ops in a compiled graph."""
    A = _randn(*shape, seed=7)
    g = _randn(*shape, seed=8)
    leaf = A.clone().requires_grad_()
    (ours,) = torch.autograd.grad(ml.lu_factor(leaf).LU, leaf, g)
    leaf_t = A.clone().requires_grad_()
    (theirs,) = torch.autograd.grad(torch.linalg.lu_factor(leaf_t).LU, leaf_t, g)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    f = lambda a: ml.lu_factor(a).LU  # noqa: E731
    assert torch.autograd.gradcheck(f, (A.clone().requires_grad_(),))
    assert torch.autograd.gradgradcheck(f, (A.clone().requires_grad_(),))
    loss = lambda a: (ml.lu_factor(a).LU * g).sum()  # noqa: E731
    compiled = torch.compile(loss, fullgraph=True)
    for got, want in zip(_grads(compiled, A), _grads(loss, A)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_singular_errors_like_torch(batched):
    sing = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    A = torch.stack([torch.eye(2), sing]) if batched else sing
    B = torch.ones(*A.shape[:-1], 1)
    for ours, theirs in (
        (lambda: ml.solve(A, B), lambda: torch.linalg.solve(A, B)),
        (lambda: ml.lu_factor(A), lambda: torch.linalg.lu_factor(A)),
        (
            lambda: ml.solve_ex(A, B, check_errors=True),
            lambda: torch.linalg.solve_ex(A, B, check_errors=True),
        ),
    ):
        with pytest.raises(Exception) as e_theirs:
            theirs()
        with pytest.raises(type(e_theirs.value)) as e_ours:
            ours()
        assert str(e_ours.value) == str(e_theirs.value)
    X, info = ml.solve_ex(A, B)
    assert info.reshape(-1)[-1].item() == 2 and X.reshape(-1, 2, 1)[-1].isnan().all()
    with pytest.raises(ValueError, match="'pivot' must be True"):
        ml.lu_factor(A, pivot=False)


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("adjoint", [False, True])
def test_lu_solve_matches_torch(left, adjoint):
    A = _randn(3, 5, 5)
    LU, piv = torch.linalg.lu_factor(A)
    B = _randn(1, 5, 2, seed=1) if left else _randn(1, 2, 5, seed=1)  # broadcast batch
    torch.testing.assert_close(
        ml.lu_solve(LU, piv, B, left=left, adjoint=adjoint),
        torch.linalg.lu_solve(LU, piv, B, left=left, adjoint=adjoint),
    )


@pytest.mark.parametrize("n", [1, 16, 64, 65])
def test_solve_by_size(n):
    A = _randn(2, n, n, seed=n, dtype=torch.float32) / n**0.5 + 3 * torch.eye(n)
    B = _randn(2, n, 3, seed=1, dtype=torch.float32)
    X = ml.solve(A, B)
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-4, atol=1e-4)
    res = (A.double() @ X.double() - B.double()).abs().max()
    assert res <= 8 * n * torch.finfo(torch.float32).eps * A.abs().max() * X.abs().max()


def test_solve_vector_rhs_and_broadcast_like_torch():
    A = _randn(3, 4, 4)
    for B, left in (
        (_randn(4), True),
        (_randn(3, 4), True),
        (_randn(2, 1, 4, 2), True),
        (_randn(5, 4), False),
    ):
        ours = ml.solve(A, B, left=left)
        theirs = torch.linalg.solve(A, B, left=left)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)
    assert ml.solve(A.half(), _randn(4).half()).dtype == torch.float32


@pytest.mark.parametrize("left", [True, False])
def test_solve_gradients(left):
    A = _randn(3, 4, 4) + 2 * torch.eye(4, dtype=F64)
    B = _randn(1, 4, 2, seed=2) if left else _randn(1, 2, 4, seed=2)
    T = _randn(3, *B.shape[-2:], seed=3)
    ours = _grads(lambda a, b: (ml.solve(a, b, left=left) * T).sum(), A, B)
    theirs = _grads(lambda a, b: (torch.linalg.solve(a, b, left=left) * T).sum(), A, B)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)
    f = lambda a, b: ml.solve(a, b, left=left)  # noqa: E731
    args = (A[:2].clone().requires_grad_(), B.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("adjoint", [False, True])
def test_lu_solve_gradients(left, adjoint):
    A = _randn(2, 4, 4) + 2 * torch.eye(4, dtype=F64)
    LU, piv = torch.linalg.lu_factor(A)
    B = _randn(2, 4, 3, seed=2) if left else _randn(2, 3, 4, seed=2)
    T = _randn(*B.shape, seed=3)

    def loss(fn):
        return lambda lu, b: (fn(lu, piv, b, left=left, adjoint=adjoint) * T).sum()

    ours = _grads(loss(ml.lu_solve), LU, B)
    theirs = _grads(loss(torch.linalg.lu_solve), LU, B)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)
    f = lambda lu, b: ml.lu_solve(lu, piv, b, left=left, adjoint=adjoint)  # noqa: E731
    assert torch.autograd.gradcheck(f, (LU.clone().requires_grad_(), B.clone().requires_grad_()))


def test_solve_compiles_fullgraph():
    A = _randn(3, 5, 5) + 2 * torch.eye(5, dtype=F64)
    B = _randn(3, 5, 2, seed=1)

    def f(a, b):
        LU, piv = ml.lu_factor(a.detach())
        return ml.solve(a, b).sum() + ml.lu_solve(LU, piv, b, adjoint=True).pow(2).sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for g, w in zip(_grads(compiled, A, B), _grads(f, A, B)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# --- Overrides of torch.linalg -------------------------------------------------------------------
# On this machine the mechanism is tested on the CPU dispatch key (the test-only parameter);
# the real use is the MPS key.


def _eigh_projector(S):
    w, V = torch.linalg.eigh(S)  # (V only up to signs)
    return torch.cat([w.unsqueeze(-1), (V * w.unsqueeze(-2)) @ V.mT], dim=-1)


def _torch_calls(A, B, spd):
    Q, R = torch.linalg.qr(A)
    LU, piv = torch.linalg.lu_factor(A)
    return [
        Q,
        R,
        torch.linalg.cholesky(spd),
        _eigh_projector(spd),
        torch.linalg.svd(A).S,  # (U and Vh only up to signs)
        torch.linalg.solve_triangular(R, B, upper=True),
        LU,
        torch.linalg.lu_solve(LU, piv, B),
        torch.linalg.solve(A, B),
    ]


_OVERRIDDEN = (
    "linalg_qr",
    "linalg_cholesky_ex",
    "_linalg_eigh",
    "_linalg_svd",
    "linalg_solve_triangular",
    "linalg_lu_factor_ex",
    "linalg_lu_solve",
)


def _registered_by_metalcore(name: str) -> bool:
    # The dispatcher's dump names the file that registered each kernel.
    return "metalcore" in torch._C._dispatch_dump(f"aten::{name}")


def test_nothing_is_overridden_on_import():
    import subprocess
    import sys

    code = (
        "import torch, metalcore, metalcore.linalg\n"
        f"names = {_OVERRIDDEN!r}\n"
        "bad = [n for n in names if 'metalcore' in torch._C._dispatch_dump('aten::' + n)]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    handle = ml.enable_overrides(_dispatch_key="CPU")
    assert handle.enabled and all(_registered_by_metalcore(n) for n in _OVERRIDDEN)
    handle.disable()
    handle.disable()  # idempotent
    assert not handle.enabled and not any(_registered_by_metalcore(n) for n in _OVERRIDDEN)


def test_overrides_route_and_restore():
    A = _randn(6, 5, 5, dtype=torch.float32) + 3 * torch.eye(5)
    B = _randn(6, 5, 2, seed=1, dtype=torch.float32)
    spd = _spd(6, 5, 5, dtype=torch.float32)
    plain = _torch_calls(A, B, spd)
    with ml.enable_overrides(_dispatch_key="CPU") as handle:
        routed = _torch_calls(A, B, spd)
        # Gradients keep torch's formulas through the overridden kernels.
        a = A.clone().requires_grad_()
        torch.linalg.solve(a, B).sum().backward()
    for name in _OVERRIDDEN:
        assert handle.calls.get(name, 0) >= 1, name
    for ours, theirs in zip(routed, plain):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    a2 = A.clone().requires_grad_()
    torch.linalg.solve(a2, B).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-4)
    # Disabled: PyTorch's kernels again, bit for bit, and no more calls counted.
    counted = dict(handle.calls)
    again = _torch_calls(A, B, spd)
    for x, y in zip(again, plain):
        assert torch.equal(x, y)
    assert handle.calls == counted


def test_overrides_fall_through_by_size_dtype_and_errors():
    with ml.enable_overrides(min_batch=4, max_size=8, _dispatch_key="CPU") as handle:
        torch.linalg.qr(_randn(2, 5, 5))  # batch below min_batch
        torch.linalg.qr(_randn(4, 9, 3))  # a side above max_size
        torch.linalg.eigh(_spd(4, 80, 80))  # falls through by size
        torch.linalg.qr(_randn(4, 5, 5, dtype=torch.float32))  # routed
        with pytest.raises(torch.linalg.LinAlgError) as ours:
            torch.linalg.cholesky(-torch.eye(3).expand(4, 3, 3))
    with pytest.raises(torch.linalg.LinAlgError) as theirs:
        torch.linalg.cholesky(-torch.eye(3).expand(4, 3, 3))
    assert str(ours.value) == str(theirs.value)
    assert handle.fallbacks["linalg_qr"] == 2 and handle.calls["linalg_qr"] == 1
    assert handle.fallbacks["_linalg_eigh"] == 1


def test_overrides_do_not_recurse_through_lapack_branches():
    """metalcore's CPU eigh calls LAPACK (aten) beyond its Jacobi sizes: with CPU overridden
    that inner call must reach PyTorch's kernel, not metalcore again."""
    S = _spd(3, 70, 70, dtype=torch.float32)
    with ml.enable_overrides(max_size=128, _dispatch_key="CPU") as handle:
        w, V = torch.linalg.eigh(S)
    assert handle.calls["_linalg_eigh"] == 1 and handle.fallbacks["_linalg_eigh"] >= 1
    torch.testing.assert_close(w, torch.linalg.eigvalsh(S), rtol=1e-4, atol=1e-4)
