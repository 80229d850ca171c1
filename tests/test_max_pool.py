"""max_pool2d: the CPU kernel gives torch's values and gradients exactly (ties, NaN, -inf, padding, overlapping
windows, half types), through autograd, opcheck and torch.compile; the module and the model swap; errors."""

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import urda_fast.ops as ops
from urda_fast.models import MaxPool2d, use_fast_pooling, use_torch_pooling

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the CPU extension is not built")

# (input shape, kernel, stride, padding): the 2x2 fast path (even and odd sizes), ResNet's stem, overlapping and
# non-square windows, a kernel the size of the padded input.
CASES = [((2, 3, 16, 16), 2, 2, 0), ((2, 3, 15, 17), 2, 2, 0), ((1, 2, 1, 9), (1, 2), (1, 2), 0),
         ((2, 3, 15, 17), 3, 2, 1), ((1, 4, 33, 32), 3, 2, 1), ((2, 2, 7, 9), 2, 1, 0),
         ((1, 3, 10, 11), (2, 3), (1, 2), (1, 1)), ((2, 1, 9, 8), 3, 3, 0), ((1, 1, 5, 5), 5, 3, 2)]


def both(x, *args, backend="cpu"):
    """(output, input gradient) of ours and of torch, for one random output gradient."""
    results = []
    for fn in (lambda t: ops.max_pool2d(t, *args, backend=backend), lambda t: F.max_pool2d(t, *args)):
        t = x.detach().clone().requires_grad_(True)
        out = fn(t)
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        out.backward(grad)
        results.append((out.detach(), t.grad))
    return results


@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_exactly(shape, kernel, stride, padding, dtype):
    x = torch.randn(shape, dtype=dtype)
    (out, grad), (want, want_grad) = both(x, kernel, stride, padding)
    assert torch.equal(out, want)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_ties_nan_and_minus_inf_follow_torch(shape, kernel, stride, padding):
    """Small integers make ties everywhere: the gradient must go where torch's sends it (the first max in row-major
    window order; a NaN wins; an all -inf window gives its first element)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, shape, generator=gen).double()
    x.view(-1)[::7] = float("-inf")
    x.view(-1)[5::13] = float("nan")
    (out, grad), (want, want_grad) = both(x, kernel, stride, padding)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["2x2", "3x3s2p1"])
def test_half_types(dtype, case):
    shape, kernel, stride, padding = case
    x = torch.randn(shape).to(dtype)
    (out, grad), (want, want_grad) = both(x, kernel, stride, padding)
    assert out.dtype == dtype and torch.equal(out, want)
    # Overlapping windows add gradients in the input's precision; torch may round the sums otherwise.
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=1e-2, atol=1e-2)


def test_layouts_and_shapes():
    x = torch.randn(2, 3, 12, 14)
    sliced = x[..., ::2]  # not contiguous: made contiguous for the kernel
    assert torch.equal(ops.max_pool2d(sliced, 2), F.max_pool2d(sliced, 2))
    last = x.contiguous(memory_format=torch.channels_last)  # torch's vectorised channels-last kernel runs it
    assert torch.equal(ops.max_pool2d(last, 3, 2, 1), F.max_pool2d(last, 3, 2, 1))
    assert torch.equal(ops.max_pool2d(x[0], 2), F.max_pool2d(x[0], 2))  # (C, H, W)
    empty = torch.zeros(0, 3, 8, 8, requires_grad=True)
    out = ops.max_pool2d(empty, 2)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def test_windows_over_255_elements_take_torchs_kernel():
    x = torch.randn(1, 2, 17, 17)
    assert torch.equal(ops.max_pool2d(x, 16), F.max_pool2d(x, 16))  # 256 elements: a one-byte index cannot name them
    with pytest.raises(ValueError, match="at most 255"):
        ops.max_pool2d(x, 16, backend="cpu")


def test_opcheck_and_compile():
    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    for args in (([2, 2], [2, 2], [0, 0]), ([3, 3], [2, 2], [1, 1])):
        torch.library.opcheck(torch.ops.urda_fast.max_pool2d_forward, (x, *args))
    compiled = torch.compile(lambda t: ops.max_pool2d(t, 3, 2, 1).square().sum(), fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(x), x)
    (want,) = torch.autograd.grad(F.max_pool2d(x, 3, 2, 1).square().sum(), x)
    torch.testing.assert_close(grad, want)


def test_second_order_backward_is_refused():
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(ops.max_pool2d(x, 2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad.sum().backward()


def test_the_module_pools_integer_tensors_as_torch_does():
    x = torch.randint(0, 9, (1, 2, 4, 4))
    assert torch.equal(MaxPool2d(2)(x), nn.MaxPool2d(2)(x))


def test_numpy_ints_and_one_element_tuples_are_sizes_as_in_torch():
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(ops.max_pool2d(x, np.int64(2), stride=(2,)), F.max_pool2d(x, 2, (2,)))


@pytest.mark.parametrize("call, error, match", [
    (lambda x: ops.max_pool2d(x.long(), 2), TypeError, "floating"),
    (lambda x: ops.max_pool2d(x[0, 0], 2), ValueError, r"\(N, C, H, W\)"),
    (lambda x: ops.max_pool2d(x, 2, padding=2), ValueError, "half the kernel"),
    (lambda x: ops.max_pool2d(x, 0), ValueError, ">= 1"),
    (lambda x: ops.max_pool2d(x, 9), ValueError, "smaller than its padded kernel"),
    (lambda x: ops.max_pool2d(x, (2, 2, 2)), TypeError, "pair of ints"),
    (lambda x: ops.max_pool2d(x, (2.0, 2)), TypeError, "pair of ints"),
    (lambda x: ops.max_pool2d(x, 2, backend="cuda"), ValueError, "no 'cuda' kernel"),
    (lambda x: ops.max_pool2d(x, 2, backend="bogus"), ValueError, "unknown backend"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(1, 2, 4, 4))


def test_module_and_model_swap():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Sequential(nn.MaxPool2d(3, 2, 1)),
                          nn.MaxPool2d(2, ceil_mode=True))
    x = torch.randn(2, 1, 17, 17)
    want = model(x)
    use_fast_pooling(model)
    assert [type(m) for m in model.modules()].count(MaxPool2d) == 3
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # ceil_mode: torch's kernel, through the subclass
    graph = torch.fx.symbolic_trace(model).graph
    assert sum(n.op == "call_function" and "fast_max_pool2d" in str(n.target) for n in graph.nodes) == 2
    use_torch_pooling(model)
    assert not any(isinstance(m, MaxPool2d) for m in model.modules())
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_backend_with_a_gpu_tensor_names_the_way_out():
    with pytest.raises(ValueError, match="CPU tensors only.*'reference'"):
        ops.max_pool2d(torch.randn(1, 2, 4, 4, device="cuda"), 2, backend="cpu")
