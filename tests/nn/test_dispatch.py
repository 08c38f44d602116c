"""metalcore._dispatch.kernel_applies: the one "does an op's kernel cover these tensors" test."""

import pytest
import torch

import metalcore
from metalcore._dispatch import KERNEL_DTYPES, has_kernel, kernel_applies


def test_kernel_dtypes_on_cpu_apply():
    for dtype in KERNEL_DTYPES:
        x = torch.ones(2, 4, dtype=dtype)
        assert kernel_applies("rmsnorm", x, torch.ones(4, dtype=dtype))
        assert kernel_applies("rmsnorm", x, None)  # an absent optional argument
    assert has_kernel("rmsnorm", "cpu") and has_kernel("rmsnorm", "meta")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_everything_a_kernel_does_not_take_is_refused():
    x = torch.ones(2, 4)
    assert not kernel_applies("rmsnorm")  # no tensor at all
    assert not kernel_applies("rmsnorm", None)
    assert not kernel_applies("rmsnorm", x.long())  # not a kernel dtype
    assert not kernel_applies("rmsnorm", x.to(torch.complex64))
    assert not kernel_applies("rmsnorm", x, torch.ones(4, dtype=torch.float64))  # mixed dtypes
    assert kernel_applies("rope", x, x.double(), same_dtype=False)  # unless allowed
    assert not kernel_applies("rmsnorm", x, torch.ones(4, device="meta"))  # two devices
    assert kernel_applies("rmsnorm", x.to("meta"))  # the fakes
    assert not kernel_applies("rmsnorm", x.to_sparse())
    nested = torch.nested.nested_tensor([torch.ones(3), torch.ones(2)])
    assert not kernel_applies("silu", nested)
    assert not has_kernel("rmsnorm", "xla")  # a device type without a metalcore backend


def test_compiles_to_a_constant_without_graph_breaks():
    from torch._dynamo.testing import CompileCounter

    def f(x, w):
        if kernel_applies("rmsnorm", x, w):
            return metalcore.rmsnorm(x, w, 1e-6)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6)

    counter = CompileCounter()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    x, w = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(compiled(x, w), f(x, w))
    assert counter.frame_count == 1 and counter.op_count == 1  # just the metalcore op


def test_an_unknown_op_name_is_an_error_not_a_silent_fallback():
    with pytest.raises(RuntimeError, match="no_such_op"):
        kernel_applies("no_such_op", torch.ones(2))
