"""Throughput of ``max_pool2d`` (forward + backward to the input) against eager ``F.max_pool2d`` and torch.compile of
it. A CPU op: on a GPU torch's own pooling runs (the module skips there). Shapes: the digits CNN's two pools at the
DART batch (2x2) and ResNet's stem pool (3x3, stride 2, padding 1) at CIFAR and ImageNet sizes."""

import functools

import pytest
import torch
import torch.nn.functional as F

import urda_fast.ops as ops

pytestmark = pytest.mark.bench

SHAPES = {"small": [((64, 32, 16, 16), 2, 2, 0), ((64, 64, 8, 8), 2, 2, 0), ((32, 64, 16, 16), 3, 2, 1),
                    ((8, 64, 112, 112), 3, 2, 1)]}
SHAPES["large"] = SHAPES["small"]


def pytest_generate_tests(metafunc):
    # Own parameter names: conftest's hook parametrizes "shape"/"provider" with the fused ops' values.
    if "case" in metafunc.fixturenames:
        cases = SHAPES["small"]
        metafunc.parametrize("case", cases, ids=[f"{'x'.join(map(str, s))}-k{k}s{st}p{p}" for s, k, st, p in cases])
        metafunc.parametrize("impl", ["eager", "compile", "cpu"])


def test_max_pool2d(bench, case, impl):
    if bench.device.type != "cpu":
        pytest.skip("max_pool2d has a CPU kernel only; GPUs run torch's own pooling")
    shape, kernel, stride, padding = case
    x = torch.randn(shape, dtype=bench.dtype, requires_grad=True)
    pool = bench.provider_fn(impl, F.max_pool2d, functools.partial(ops.max_pool2d))
    out_shape = F.max_pool2d(x.detach(), kernel, stride, padding).shape
    grad = torch.randn(out_shape, dtype=bench.dtype)

    def fn():
        torch.autograd.grad(pool(x, kernel, stride, padding), x, grad)

    # Compulsory traffic: forward reads x and writes the output; backward reads x (or indices) and the output
    # gradient and writes x's gradient.
    nbytes = x.numel() * x.element_size()
    out_bytes = grad.numel() * grad.element_size()
    bench.run(fn, op="max_pool2d", variant=f"k{kernel}s{stride}p{padding}", mode="full", shape=shape, provider=impl,
              bytes_moved=3 * nbytes + 2 * out_bytes, copy_numel=x.numel())
