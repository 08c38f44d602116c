"""Batched linear algebra with ``torch.linalg``'s signatures, outputs and errors.

Each function runs one ``metalcore::`` op (CPU: the batch split across threads, own kernels for
small matrices, LAPACK for large ones), so compiled and exported graphs keep it as one node:

* :func:`cholesky`, :func:`cholesky_ex` (``upper``; only that triangle is read);
* :func:`solve_triangular` (``upper``, ``left``, ``unitriangular``; batch dims broadcast);
* :func:`eigh` (ascending eigenvalues; only the ``UPLO`` triangle is read);
* :func:`svd` (``U, S, Vh`` with ``A = U diag(S) Vh``, ``full_matrices``);
* :func:`qr` (Householder; ``mode`` ``'reduced'``, ``'complete'`` or ``'r'``);
* :func:`lu_factor`, :func:`lu_factor_ex` (partial pivoting, LAPACK's 1-based int32 pivots),
  :func:`lu_solve` (``left``, ``adjoint``), :func:`solve`, :func:`solve_ex` (``left``; vector
  right-hand sides as torch).

Differences from ``torch.linalg``, all deliberate: float16 and bfloat16 inputs are accepted and
computed and returned in float32 (torch rejects them); a matrix whose read part holds a NaN or an
Inf gives all-NaN outputs and ``info > 0`` (and the raising functions raise ``LinAlgError`` for
it, as ``torch.linalg.svd`` does); a matrix that is not positive definite gets an all-NaN
Cholesky factor in :func:`cholesky_ex` (torch returns a partial factor).

Errors are raised in eager mode only: raising needs ``info`` on the host. Under
``torch.compile`` the functions return the NaN results without checking (branching on ``info``
would break the graph); use :func:`cholesky_ex` and check ``info`` yourself where it matters.

Autograd uses ``torch.linalg``'s formulas (Murray 2016 for Cholesky; the skew-symmetric
projections of ``torch/csrc/autograd/FunctionsManual.cpp`` for eigh and SVD), written with
metalcore's triangular solve and plain torch ops, so they differentiate again (double backward)
and compile with the forward. Like torch, eigenvector and singular-vector gradients divide by
the gaps between eigenvalues (squared singular values): they are infinite for repeated ones, and
only gauge-invariant losses (not depending on the vectors' signs) have well-defined gradients.
"""

from __future__ import annotations

import collections

import torch

__all__ = [
    "cholesky",
    "cholesky_ex",
    "eigh",
    "enable_overrides",
    "LinalgOverrides",
    "lu_factor",
    "lu_factor_ex",
    "lu_solve",
    "qr",
    "solve",
    "solve_ex",
    "solve_triangular",
    "svd",
]

_ops = torch.ops.metalcore


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# Under torch.compile the wrappers return a namedtuple with the fields of torch's return type
# (``.LU``, ``.info``, ... keep working in compiled code); eager mode returns torch's own type.
_COMPILED_RESULTS: dict[str, type] = {}


def _result(result_type: type, fields: str, values: tuple):
    if not _compiling():
        return result_type(values)
    name = result_type.__name__
    twin = _COMPILED_RESULTS.get(name)
    if twin is None:
        twin = _COMPILED_RESULTS[name] = collections.namedtuple(name, fields)
    return twin(*values)


def _raise_first(info: torch.Tensor, api: str, message, error=torch.linalg.LinAlgError) -> None:
    """Raises ``torch.linalg.LinAlgError`` for the first nonzero entry of ``info`` (eager only),
    with torch's wording: ``(Batch element i): `` for batched inputs."""
    if _compiling() or info.numel() == 0:
        return
    bad = info.reshape(-1).nonzero()
    if bad.numel() == 0:
        return
    i = int(bad[0, 0])
    code = int(info.reshape(-1)[i])
    where = f"(Batch element {i}): " if info.dim() > 0 else ""
    raise error(f"{api}: {where}{message(code)}")


def _not_pd(code: int) -> str:
    return (
        "The factorization could not be completed because the input is not positive-definite "
        f"(the leading minor of order {code} is not positive-definite)."
    )


def _no_convergence(what: str):
    def message(code: int) -> str:
        return (
            "The algorithm failed to converge because the input matrix contained non-finite "
            f"values or is ill-conditioned or has too many repeated {what} (error code: {code})."
        )

    return message


def cholesky_ex(A: torch.Tensor, *, upper: bool = False, check_errors: bool = False):
    """``torch.linalg.cholesky_ex``: ``(L, info)``, ``info[i] = k > 0`` when the leading minor of
    order k of matrix i is not positive definite (its L is then all NaN)."""
    L, info = _ops.cholesky_ex(A, upper)
    if check_errors:
        _raise_first(info, "linalg.cholesky_ex", _not_pd)
    return _result(torch.return_types.linalg_cholesky_ex, "L info", (L, info))


def cholesky(A: torch.Tensor, *, upper: bool = False) -> torch.Tensor:
    """``torch.linalg.cholesky``: the lower factor L with ``A = L L^T`` (``upper=True``: U with
    ``A = U^T U``, read from the upper triangle). Raises ``LinAlgError`` for a matrix that is not
    positive definite (eager mode)."""
    L, info = _ops.cholesky_ex(A, upper)
    _raise_first(info, "linalg.cholesky", _not_pd)
    return L


def solve_triangular(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    upper: bool,
    left: bool = True,
    unitriangular: bool = False,
) -> torch.Tensor:
    """``torch.linalg.solve_triangular``: X with ``A X = B`` (``left=False``: ``X A = B``) for a
    triangular A; only its ``upper`` or lower triangle is read, and not its diagonal when
    ``unitriangular``. Batch dims broadcast."""
    return _ops.solve_triangular(A, B, upper, left, unitriangular)


def eigh(A: torch.Tensor, UPLO: str = "L"):
    """``torch.linalg.eigh``: ``(eigenvalues, eigenvectors)``, eigenvalues ascending, from the
    ``UPLO`` triangle of the symmetric A. Raises ``LinAlgError`` for a matrix that has a
    non-finite entry there or does not converge (eager mode)."""
    w, V, info = _ops.eigh(A, UPLO)
    _raise_first(info, "linalg.eigh", _no_convergence("eigenvalues"))
    return _result(torch.return_types.linalg_eigh, "eigenvalues eigenvectors", (w, V))


def svd(A: torch.Tensor, full_matrices: bool = True, *, driver: str | None = None):
    """``torch.linalg.svd``: ``(U, S, Vh)`` with ``A = U diag(S) Vh`` (Vh, not V), S
    descending. ``driver`` is accepted for signature compatibility and must be None (it selects
    a cuSOLVER algorithm in torch). Raises ``LinAlgError`` for a matrix with a non-finite entry
    or no convergence (eager mode)."""
    if driver is not None:
        raise ValueError(f"metalcore.linalg.svd: 'driver' must be None, got {driver!r}")
    U, S, Vh, info = _ops.svd(A, full_matrices)
    _raise_first(info, "linalg.svd", _no_convergence("singular values"))
    return _result(torch.return_types.linalg_svd, "U S Vh", (U, S, Vh))


def qr(A: torch.Tensor, mode: str = "reduced"):
    """``torch.linalg.qr``: ``(Q, R)`` with ``A = Q R`` by Householder reflections (R's
    diagonal signs are LAPACK's, not normalized). ``mode='reduced'``: Q [m, k], R [k, n];
    ``'complete'``: Q [m, m], R [m, n]; ``'r'``: R only and an empty Q. A matrix with a NaN or
    Inf entry gets NaN factors."""
    Q, R = _ops.qr(A, mode)
    return _result(torch.return_types.linalg_qr, "Q R", (Q, R))


def _zero_pivot(code: int) -> str:
    return (
        f"U[{code},{code}] is zero and using it on lu_solve would result in a division by "
        "zero. If you still want to perform the factorization, consider calling "
        "linalg.lu(A, pivot) or linalg.lu_factor_ex(A, pivot)"
    )


def _singular(code: int) -> str:
    return "The solver failed because the input matrix is singular."


def _check_pivot(api: str, pivot: bool) -> None:
    if not pivot:
        raise ValueError(
            f"metalcore.linalg.{api}: 'pivot' must be True (LU without pivoting is not "
            "implemented; torch supports it on CUDA only)"
        )


def lu_factor_ex(A: torch.Tensor, *, pivot: bool = True, check_errors: bool = False):
    """``torch.linalg.lu_factor_ex``: ``(LU, pivots, info)`` of any m x n A with partial
    pivoting: LU packs the unit lower L and U, pivots are int32 and 1-based (row i was swapped
    with row ``pivots[i]``), ``info = i > 0`` when ``U[i-1, i-1]`` is exactly zero."""
    _check_pivot("lu_factor_ex", pivot)
    LU, pivots, info = _ops.lu_factor_ex(A)
    if check_errors:
        _raise_first(info, "torch.linalg.lu_factor_ex", _zero_pivot, RuntimeError)
    return _result(torch.return_types.linalg_lu_factor_ex, "LU pivots info", (LU, pivots, info))


def lu_factor(A: torch.Tensor, *, pivot: bool = True):
    """``torch.linalg.lu_factor``: ``(LU, pivots)``; raises ``RuntimeError`` (as torch) for an
    exactly singular matrix (eager mode)."""
    _check_pivot("lu_factor", pivot)
    LU, pivots, info = _ops.lu_factor_ex(A)
    _raise_first(info, "torch.linalg.lu_factor", _zero_pivot, RuntimeError)
    return _result(torch.return_types.linalg_lu_factor, "LU pivots", (LU, pivots))


def lu_solve(
    LU: torch.Tensor,
    pivots: torch.Tensor,
    B: torch.Tensor,
    *,
    left: bool = True,
    adjoint: bool = False,
) -> torch.Tensor:
    """``torch.linalg.lu_solve``: X with ``A X = B`` for ``A = P L U`` given by
    :func:`lu_factor` (``left=False``: ``X A = B``; ``adjoint=True``: A^T in place of A). Batch
    dims broadcast."""
    return _ops.lu_solve(LU, pivots, B, left, adjoint)


def _vector_rhs(A: torch.Tensor, B: torch.Tensor) -> bool:
    # torch.linalg.solve's rule: B is a (batch of) vector(s) if it is 1-D or has A's shape
    # without its last dim.
    return B.dim() == 1 or (B.dim() == A.dim() - 1 and tuple(B.shape) == tuple(A.shape[:-1]))


def solve_ex(A: torch.Tensor, B: torch.Tensor, *, left: bool = True, check_errors: bool = False):
    """``torch.linalg.solve_ex``: ``(result, info)`` with ``A X = B`` (``left=False``:
    ``X A = B``) by LU with partial pivoting; ``info > 0`` for an exactly singular A, whose
    result is all NaN. B may be a (batch of) vector(s) as in torch."""
    # (torch makes a vector a column whatever `left` is, so X A = b fails as it does there.)
    vector = _vector_rhs(A, B)
    X, info = _ops.solve_ex(A, B.unsqueeze(-1) if vector else B, left)
    if vector:
        X = X.squeeze(-1)
    if check_errors:
        _raise_first(info, "torch.linalg.solve_ex", _singular)
    return _result(torch.return_types.linalg_solve_ex, "result info", (X, info))


def solve(A: torch.Tensor, B: torch.Tensor, *, left: bool = True) -> torch.Tensor:
    """``torch.linalg.solve``: X with ``A X = B`` (``left=False``: ``X A = B``); raises
    ``LinAlgError`` for an exactly singular A (eager mode; compiled code gets NaN)."""
    X, info = solve_ex(A, B, left=left)
    _raise_first(info, "torch.linalg.solve", _singular)
    return X


# --- Autograd ------------------------------------------------------------------------------
# torch.linalg's formulas (tools/autograd/derivatives.yaml), registered on the metalcore ops so
# that every caller (the functions above, torch.ops.metalcore.*, compiled and exported graphs)
# gets them. Saved tensors are the outputs; undefined output gradients stay None
# (set_materialize_grads(False)), so unused outputs cost nothing.


def _sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Reduces a gradient over broadcast batch dims back to an input's shape."""
    if tuple(g.shape) == tuple(shape):
        return g
    lead = g.dim() - len(shape)
    g = g.sum(dim=tuple(range(lead))) if lead > 0 else g
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def _cholesky_setup(ctx, inputs, output):
    _, upper = inputs
    L, _ = output
    ctx.upper = upper
    ctx.save_for_backward(L)
    ctx.set_materialize_grads(False)


def _cholesky_backward(ctx, gL, _ginfo):
    # gA = L^-T Phi(L^T gL) L^-1 with Phi = the lower triangle, diagonal halved, mirrored
    # (Murray 2016; torch's cholesky_backward).
    if gL is None:
        return None, None
    (L,) = ctx.saved_tensors
    if ctx.upper:
        L, gL = L.mT, gL.mT
    gA = (L.mT @ gL).tril()
    gA = 0.5 * (gA + gA.tril(-1).mT)
    gA = _ops.solve_triangular(L.mT, gA, True, True, False)
    gA = _ops.solve_triangular(L, gA, False, False, False)
    return gA, None


def _trsm_setup(ctx, inputs, output):
    A, B, upper, left, unit = inputs
    ctx.flags = (upper, left, unit)
    ctx.shapes = (A.shape, B.shape)
    ctx.save_for_backward(A, output)
    ctx.set_materialize_grads(False)


def _trsm_backward(ctx, gX):
    # gB = A^-T gX (left) or gX A^-T; gA = -gB X^T (left) or -X^T gB, on A's read triangle
    # (torch's linalg_solve_triangular_backward).
    if gX is None:
        return None, None, None, None, None
    A, X = ctx.saved_tensors
    upper, left, unit = ctx.flags
    a_shape, b_shape = ctx.shapes
    gB = _ops.solve_triangular(A.mT, gX, not upper, left, unit)
    gA = None
    if ctx.needs_input_grad[0]:
        gA = -(gB @ X.mT) if left else -(X.mT @ gB)
        gA = gA.triu(1 if unit else 0) if upper else gA.tril(-1 if unit else 0)
        gA = _sum_to(gA, a_shape)
    return gA, _sum_to(gB, b_shape) if ctx.needs_input_grad[1] else None, None, None, None


def _eigh_setup(ctx, inputs, output):
    w, V, _ = output
    ctx.save_for_backward(w, V)
    ctx.set_materialize_grads(False)


def _eigh_backward(ctx, gw, gV, _ginfo):
    # gA = V (skew(V^T gV) / E + diag(gw)) V^T with E_ij = w_j - w_i: a full symmetric matrix
    # whatever UPLO is (torch's linalg_eig_backward with is_hermitian).
    if gw is None and gV is None:
        return None, None
    w, V = ctx.saved_tensors
    if gV is None:
        return (V * gw.unsqueeze(-2)) @ V.mT, None
    inner = V.mT @ gV
    inner = 0.5 * (inner - inner.mT)
    E = w.unsqueeze(-2) - w.unsqueeze(-1)
    E.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    inner = inner / E
    if gw is not None:  # the skew part's diagonal is zero
        inner = inner + torch.diag_embed(gw)
    return V @ inner @ V.mT, None


def _svd_setup(ctx, inputs, output):
    A, full = inputs
    U, S, Vh, _ = output
    ctx.shape = A.shape
    ctx.save_for_backward(U, S, Vh)
    ctx.set_materialize_grads(False)


def _svd_backward(ctx, gU, gS, gVh, _ginfo):
    # torch's svd_backward on the thin factors (the completion columns of full_matrices get no
    # gradient): with skew(X) = X - X^T and E_jk = S_k^2 - S_j^2,
    #   inner = (skew(U^T gU) S + S skew(V^T gV)) / E + diag(gS),
    #   gA = U inner Vh + (I - U U^T) gU S^-1 Vh (m > k) + U S^-1 gVh (I - V V^T) (n > k).
    if gU is None and gS is None and gVh is None:
        return None, None
    U, S, Vh = ctx.saved_tensors
    m, n = ctx.shape[-2], ctx.shape[-1]
    k = S.shape[-1]
    U, Vh = U[..., :k], Vh[..., :k, :]
    gU = None if gU is None else gU[..., :k]
    gVh = None if gVh is None else gVh[..., :k, :]
    if gU is None and gVh is None:
        return (U * gS.unsqueeze(-2)) @ Vh, None
    V = Vh.mT
    gV = None if gVh is None else gVh.mT
    S2 = S * S
    E = S2.unsqueeze(-2) - S2.unsqueeze(-1)
    E.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    if gU is not None:
        UhgU = U.mT @ gU
        UhgU = UhgU - UhgU.mT
    if gV is not None:
        VhgV = V.mT @ gV
        VhgV = VhgV - VhgV.mT
    if gU is not None and gV is not None:
        inner = (UhgU * S.unsqueeze(-2) + S.unsqueeze(-1) * VhgV) / E
    elif gU is not None:
        inner = (UhgU / E) * S.unsqueeze(-2)
    else:
        inner = S.unsqueeze(-1) * (VhgV / E)
    if gS is not None:
        inner = inner + torch.diag_embed(gS)
    if m > k and gU is not None:
        gA = U @ inner
        gUSinv = gU / S.unsqueeze(-2)
        gA = gA + gUSinv - U @ (U.mT @ gUSinv)
        gA = gA @ Vh
    elif n > k and gV is not None:
        gA = inner @ Vh
        SinvgVh = gVh / S.unsqueeze(-1)
        gA = gA + SinvgVh - (SinvgVh @ V) @ Vh
        gA = U @ gA
    else:
        gA = U @ (inner @ Vh)
    return gA, None


torch.library.register_autograd(
    "metalcore::cholesky_ex", _cholesky_backward, setup_context=_cholesky_setup
)
torch.library.register_autograd(
    "metalcore::solve_triangular", _trsm_backward, setup_context=_trsm_setup
)
torch.library.register_autograd("metalcore::eigh", _eigh_backward, setup_context=_eigh_setup)
torch.library.register_autograd("metalcore::svd", _svd_backward, setup_context=_svd_setup)


def _qr_setup(ctx, inputs, output):
    A, mode = inputs
    Q, R = output
    ctx.mode = mode
    ctx.save_for_backward(A, Q, R)
    ctx.set_materialize_grads(False)


def _qr_square_backward(gQ, gR, Q, R):
    # m >= n (torch's linalg_qr_backward): M = R gR^T - gQ^T Q,
    # gA = (gQ + Q copyltu(M)) R^-T, copyltu mirroring the lower triangle up.
    M = torch.zeros_like(R)
    if gR is not None:
        M = M + R @ gR.mT
    if gQ is not None:
        M = M - gQ.mT @ Q
    M = M.tril()
    M = M + M.tril(-1).mT
    gA = Q @ M
    if gQ is not None:
        gA = gA + gQ
    # X R^T = gA: a right-hand solve with the lower triangular R^T.
    return _ops.solve_triangular(R.mT, gA, False, False, False)


def _qr_backward(ctx, gQ, gR):
    if gQ is None and gR is None:
        return None, None
    A, Q, R = ctx.saved_tensors
    m, n = A.shape[-2], A.shape[-1]
    if ctx.mode == "r":
        raise RuntimeError(
            "metalcore.qr: the derivative depends on Q, which mode='r' does not compute; use "
            "mode='reduced' to differentiate through qr"
        )
    if ctx.mode == "complete" and m > n:
        raise RuntimeError(
            "metalcore.qr: the QR decomposition is not differentiable when mode='complete' and "
            "the matrix has more rows than columns"
        )
    if m >= n:
        return _qr_square_backward(gQ, gR, Q, R), None
    # Wide A = [X | Y], R = [U | V]: X = Q U is a square QR, Y = Q V gives V = Q^T Y, so
    # Y's gradient is Q gV and X's is the square formula with gQ + Y gV^T.
    U = R[..., :m]
    gU = None if gR is None else gR[..., :m]
    gV = None if gR is None else gR[..., m:]
    if gV is not None:
        Y = A[..., m:].to(Q.dtype)
        gQ = Y @ gV.mT if gQ is None else gQ + Y @ gV.mT
        gY = Q @ gV
    else:
        gY = torch.zeros_like(Q[..., :1]).expand(*Q.shape[:-1], n - m)
    gX = _qr_square_backward(gQ, gU, Q, U)
    return torch.cat([gX, gY], dim=-1), None


torch.library.register_autograd("metalcore::qr", _qr_backward, setup_context=_qr_setup)


def _lu_factor_setup(ctx, inputs, output):
    LU, pivots, _ = output
    ctx.save_for_backward(LU, pivots)
    ctx.set_materialize_grads(False)


def _lu_factor_backward(ctx, gLU, _gpiv, _ginfo):
    # A = P L U with L m x k unit lower, U k x n upper (k = min(m, n)); gLU packs the gradients
    # of L (strictly below the diagonal) and U (on and above it), as torch's
    # lu_factor_ex_backward reads them. With P^T dA split into a k x k leading block (X1 =
    # L1^-1 dB1 U1^-1 = L1^-1 dL1 + dU1 U1^-1) and the rest, pairing the gradients with
    # dL1 = L1 tril(X1, -1) and dU1 = triu(X1) U1 gives
    #   square: gA = P L^-T G U^-T,  G = tril(L^T gL, -1) + triu(gU U^T);
    #   wide (m < n, U = [U1 U2]): G = tril(L^T gL - gU2 U2^T, -1) + triu(gU1 U1^T),
    #     gA = P L^-T [G U1^-T | gU2];
    #   tall (m > n, L = [L1; L2]): G = tril(L1^T gL1, -1) + triu(gU U^T - L2^T gL2),
    #     gA = P [L1^-T G U^-T; gL2 U^-T].
    # The triangular solves are metalcore ops, so compiled backward graphs keep them.
    if gLU is None:
        return None
    LU, pivots = ctx.saved_tensors
    m, n = LU.shape[-2], LU.shape[-1]
    k = min(m, n)
    gLU = gLU.to(LU.dtype)
    P, L, U = torch.lu_unpack(LU, pivots)
    L1, U1 = L[..., :k, :], U[..., :, :k]
    gL1 = gLU[..., :k, :k].tril(-1)
    gU1 = gLU[..., :k, :k].triu()
    G_low = L1.mT @ gL1
    G_up = gU1 @ U1.mT
    if n > k:
        gU2 = gLU[..., :k, k:]
        G_low = G_low - gU2 @ U[..., :, k:].mT
    if m > k:
        gL2 = gLU[..., k:, :k]
        G_up = G_up - L[..., k:, :].mT @ gL2
    G = G_low.tril(-1) + G_up.triu()
    # X U1^T = G (a right-hand solve with the lower triangular U1^T), then L1^T Y = X.
    top = _ops.solve_triangular(U1.mT, G, False, False, False)
    top = _ops.solve_triangular(L1.mT, top, True, True, True)
    if n > k:
        gA = torch.cat([top, _ops.solve_triangular(L1.mT, gU2, True, True, True)], dim=-1)
    elif m > k:
        gA = torch.cat([top, _ops.solve_triangular(U1.mT, gL2, False, False, False)], dim=-2)
    else:
        gA = top
    return P @ gA


torch.library.register_autograd(
    "metalcore::lu_factor_ex", _lu_factor_backward, setup_context=_lu_factor_setup
)


def _lu_solve_setup(ctx, inputs, output):
    LU, pivots, B, left, adjoint = inputs
    ctx.flags = (left, adjoint)
    ctx.shapes = (LU.shape, B.shape)
    ctx.save_for_backward(LU, pivots, output)
    ctx.set_materialize_grads(False)


def _lu_solve_backward(ctx, gX):
    # With op(A) = A or A^T (adjoint) and A = P L U (torch's linalg_lu_solve formulas):
    #   gB = op(A)^-T gX (left) or gX op(A)^-T: lu_solve with the other adjoint;
    #   g op(A) = -gB X^T (left) or -X^T gB, and gA pushed through A = P L U:
    #   gL = tril(P^T gA U^T, -1), gU = triu(L^T P^T gA), packed like LU.
    if gX is None:
        return None, None, None, None, None
    LU, pivots, X = ctx.saved_tensors
    left, adjoint = ctx.flags
    lu_shape, b_shape = ctx.shapes
    LUc = LU.to(X.dtype)
    gB = _ops.lu_solve(LUc, pivots, gX, left, not adjoint)
    gLU = None
    if ctx.needs_input_grad[0]:
        g_op = -(gB @ X.mT) if left else -(X.mT @ gB)
        gA = g_op.mT if adjoint else g_op
        P, L, U = torch.lu_unpack(LUc, pivots)
        PtgA = P.mT @ gA
        gLU = _sum_to((PtgA @ U.mT).tril(-1) + (L.mT @ PtgA).triu(), lu_shape)
    gB = _sum_to(gB, b_shape) if ctx.needs_input_grad[2] else None
    return gLU, None, gB, None, None


def _solve_setup(ctx, inputs, output):
    A, B, left = inputs
    X, _ = output
    ctx.left = left
    ctx.shapes = (A.shape, B.shape)
    ctx.save_for_backward(A, X)
    ctx.set_materialize_grads(False)


def _solve_backward(ctx, gX, _ginfo):
    # gB = A^-T gX (left) or gX A^-T, gA = -gB X^T or -X^T gB (torch's linalg_solve backward).
    # A^T is factored again (not the forward's LU reused) so that the backward is itself a
    # differentiable function of A: double backward then needs nothing else.
    if gX is None:
        return None, None, None
    A, X = ctx.saved_tensors
    left = ctx.left
    a_shape, b_shape = ctx.shapes
    gB, _ = _ops.solve_ex(A.to(X.dtype).mT, gX, left)
    gA = None
    if ctx.needs_input_grad[0]:
        gA = _sum_to(-(gB @ X.mT) if left else -(X.mT @ gB), a_shape)
    gB = _sum_to(gB, b_shape) if ctx.needs_input_grad[1] else None
    return gA, gB, None


torch.library.register_autograd(
    "metalcore::lu_solve", _lu_solve_backward, setup_context=_lu_solve_setup
)
torch.library.register_autograd("metalcore::solve_ex", _solve_backward, setup_context=_solve_setup)


# --- Opt-in overrides of torch.linalg ----------------------------------------------------------
# Code that calls torch.linalg directly (a model, a library) can be routed to metalcore's
# kernels without edits: enable_overrides() registers kernels for aten's linalg ops at one
# dispatch key (MPS by default) through torch.library.Library("aten", "IMPL"). Each kernel
# checks whether metalcore handles the call (dtype, sizes, a metalcore kernel on that device);
# otherwise it runs PyTorch's own kernel through the op's out= overload, a separate dispatcher
# entry the override leaves alone. torch's autograd formulas stay in place (they sit at the
# Autograd key, above the overridden one). Nothing is overridden on import, and disable()
# restores PyTorch's kernels (the Library's registrations are removed).


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"metalcore::{op}", key)


class LinalgOverrides:
    """The handle :func:`enable_overrides` returns: ``disable()`` (or leaving a ``with``
    block) restores PyTorch's kernels; ``calls`` counts the calls metalcore handled per aten
    op, ``fallbacks`` those it passed on to PyTorch."""

    def __init__(self, dispatch_key: str, min_batch: int, max_size: int):
        import warnings

        self.dispatch_key = dispatch_key
        self.min_batch = min_batch
        self.max_size = max_size
        self.calls: dict[str, int] = {}
        self._active = 0
        self.fallbacks: dict[str, int] = {}
        self._lib = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            # Replacing PyTorch's kernel is the point; its "overriding a previously registered
            # kernel" warning says nothing here.
            warnings.simplefilter("ignore")
            for name, kernel in self._kernels().items():
                self._lib.impl(name, kernel, dispatch_key)

    def disable(self) -> None:
        if self._lib is not None:
            self._lib._destroy()
            self._lib = None

    @property
    def enabled(self) -> bool:
        return self._lib is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def _ours(self, aten: str, op: str, *mats: torch.Tensor) -> bool:
        """Whether metalcore takes this call: float32/float64, a metalcore kernel at the key,
        no matrix side above max_size, at least min_batch matrices, and not a call made by a
        metalcore kernel itself (its LAPACK branch on CPU calls aten: it must get PyTorch's
        kernel, not recurse)."""
        A = mats[0]
        ok = (
            self._active == 0
            and all(m.dim() >= 2 and m.dtype == A.dtype for m in mats)
            and A.dtype in (torch.float32, torch.float64)
            and _has_kernel(op, self.dispatch_key)
            and max(max(m.shape[-2:]) for m in mats) <= self.max_size
            and A[..., 0, 0].numel() >= self.min_batch
        )
        table = self.calls if ok else self.fallbacks
        table[aten] = table.get(aten, 0) + 1
        return ok

    def _run(self, fn, *args):
        # A process-wide count, not a thread-local one: the CPU kernels call LAPACK from
        # at::parallel_for's worker threads (the call releases the GIL, so those threads can
        # reach these kernels while the outer call runs).
        self._active += 1
        try:
            return fn(*args)
        finally:
            self._active -= 1

    def _kernels(self) -> dict:
        aten = torch.ops.aten

        def linalg_qr(A, mode="reduced"):
            if self._ours("linalg_qr", "qr", A):
                return self._run(_ops.qr, A, mode)
            Q, R = A.new_empty(0), A.new_empty(0)
            return aten.linalg_qr.out(A, mode, Q=Q, R=R)

        def linalg_cholesky_ex(A, *, upper=False, check_errors=False):
            if self._ours("linalg_cholesky_ex", "cholesky_ex", A):
                L, info = self._run(_ops.cholesky_ex, A, upper)
                # torch's error message (and its partial factor) come from its own kernel.
                if not (check_errors and bool((info != 0).any())):
                    return L, info
            L, info = A.new_empty(0), A.new_empty(0, dtype=torch.int32)
            return aten.linalg_cholesky_ex.L(
                A, upper=upper, check_errors=check_errors, L=L, info=info
            )

        def linalg_eigh(A, UPLO="L", compute_v=True):
            if compute_v and self._ours("_linalg_eigh", "eigh", A):
                w, V, info = self._run(_ops.eigh, A, UPLO)
                if not bool((info != 0).any()):  # torch raises; its kernel says how
                    return w, V
            w, V = A.new_empty(0), A.new_empty(0)
            return aten._linalg_eigh.eigenvalues(A, UPLO, compute_v, eigenvalues=w, eigenvectors=V)

        def linalg_svd(A, full_matrices=False, compute_uv=True, *, driver=None):
            if compute_uv and driver is None and self._ours("_linalg_svd", "svd", A):
                U, S, Vh, info = self._run(_ops.svd, A, full_matrices)
                if not bool((info != 0).any()):
                    return U, S, Vh
            U, S, Vh = A.new_empty(0), A.new_empty(0), A.new_empty(0)
            return aten._linalg_svd.U(A, full_matrices, compute_uv, driver=driver, U=U, S=S, Vh=Vh)

        def linalg_solve_triangular(A, B, *, upper, left=True, unitriangular=False):
            if self._ours("linalg_solve_triangular", "solve_triangular", A, B):
                return self._run(_ops.solve_triangular, A, B, upper, left, unitriangular)
            out = A.new_empty(0)
            return aten.linalg_solve_triangular.out(
                A, B, upper=upper, left=left, unitriangular=unitriangular, out=out
            )

        def linalg_lu_factor_ex(A, *, pivot=True, check_errors=False):
            if pivot and self._ours("linalg_lu_factor_ex", "lu_factor_ex", A):
                LU, piv, info = self._run(_ops.lu_factor_ex, A)
                if not (check_errors and bool((info != 0).any())):
                    return LU, piv, info
            LU = A.new_empty(0)
            piv, info = A.new_empty(0, dtype=torch.int32), A.new_empty(0, dtype=torch.int32)
            return aten.linalg_lu_factor_ex.out(
                A, pivot=pivot, check_errors=check_errors, LU=LU, pivots=piv, info=info
            )

        def linalg_lu_solve(LU, pivots, B, *, left=True, adjoint=False):
            if pivots.dtype == torch.int32 and self._ours("linalg_lu_solve", "lu_solve", LU, B):
                return self._run(_ops.lu_solve, LU, pivots, B, left, adjoint)
            out = LU.new_empty(0)
            return aten.linalg_lu_solve.out(LU, pivots, B, left=left, adjoint=adjoint, out=out)

        return {
            "linalg_qr": linalg_qr,
            "linalg_cholesky_ex": linalg_cholesky_ex,
            "_linalg_eigh": linalg_eigh,
            "_linalg_svd": linalg_svd,
            "linalg_solve_triangular": linalg_solve_triangular,
            "linalg_lu_factor_ex": linalg_lu_factor_ex,
            "linalg_lu_solve": linalg_lu_solve,
        }


def enable_overrides(
    *, min_batch: int = 1, max_size: int = 128, _dispatch_key: str = "MPS"
) -> LinalgOverrides:
    """Routes ``torch.linalg`` calls on MPS tensors (QR, Cholesky, eigh, SVD, triangular solve,
    LU factor and solve) to metalcore's kernels, until ``disable()`` is called on the returned
    handle (or its ``with`` block ends). A call goes to metalcore when its dtype is float32 or
    float64, every matrix side is at most ``max_size``, the batch holds at least ``min_batch``
    matrices and metalcore has a kernel for the op on the device; every other call runs
    PyTorch's own kernel. ``_dispatch_key`` exists for tests on machines without MPS (the
    mechanism on CPU tensors)."""
    return LinalgOverrides(_dispatch_key, min_batch, max_size)
