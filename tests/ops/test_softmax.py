"""softmax and log_softmax beyond the op contract (tests/ops/test_contract.py runs numerics,
gradients, gradcheck, opcheck, compile, export and bad inputs from the specs): torch's own
softmax/log_softmax as a second reference over dims and dtypes, rows of -inf as torch treats
them, gradients against torch's autograd, forward-mode tangents."""

import pytest
import torch

import metalcore
from metalcore.testing import backends as bk
from metalcore.testing.op_specs import tolerance
from tests.support import seeded

SOFTMAX_C = 16  # the softmax spec's opmath units (metalcore/testing/op_specs.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,dim", [((3, 4099), -1), ((4, 37, 5), 1), ((6, 3, 40), 0)])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_matches_torch(dtype, shape, dim, log):
    x = seeded(*shape, dtype=dtype, seed=3, scale=4.0)
    mc = metalcore.log_softmax if log else metalcore.softmax
    th = torch.log_softmax if log else torch.softmax
    # torch's own op in float64 on the same (rounded) inputs: an independent implementation.
    expected = th(x.double(), dim)
    bk.compare(mc(x, dim), expected, tolerance(dtype, SOFTMAX_C), f"{mc.__name__} {dtype}")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_infinite_rows_as_torch(log):
    inf = float("inf")
    x = torch.tensor([[-inf, -inf, -inf], [-inf, 1.0, 2.0], [inf, 1.0, 2.0], [inf, inf, 0.0]])
    mc = metalcore.log_softmax if log else metalcore.softmax
    th = torch.log_softmax if log else torch.softmax
    for dim in (0, 1):
        got, want = mc(x, dim), th(x, dim)
        assert torch.equal(got.isnan(), want.isnan()), (dim, got, want)
        finite = ~want.isnan()
        torch.testing.assert_close(got[finite], want[finite])


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_gradients_match_torch_autograd(log, dim):
    x = seeded(3, 5, 7, dtype=torch.float64, seed=4).requires_grad_()
    g = seeded(3, 5, 7, dtype=torch.float64, seed=5)
    mc = metalcore.log_softmax if log else metalcore.softmax
    th = torch.log_softmax if log else torch.softmax
    (got,) = torch.autograd.grad(mc(x, dim), x, g)
    (want,) = torch.autograd.grad(th(x, dim), x, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_jvp_matches_torch(log):
    x = seeded(4, 9, dtype=torch.float64, seed=6)
    t = seeded(4, 9, dtype=torch.float64, seed=7)
    mc = metalcore.log_softmax if log else metalcore.softmax
    th = torch.log_softmax if log else torch.softmax
    _, got = torch.func.jvp(lambda a: mc(a, 1), (x,), (t,))
    _, want = torch.func.jvp(lambda a: th(a, 1), (x,), (t,))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_backward_graph_is_one_metalcore_node():
    x = seeded(2, 8).requires_grad_()
    y = metalcore.softmax(x, -1)
    assert y.grad_fn.name() == "MetalcoreSoftmaxBackward"
    assert metalcore.log_softmax(x, 0).grad_fn.name() == "MetalcoreLogSoftmaxBackward"
