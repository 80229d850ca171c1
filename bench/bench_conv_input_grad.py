"""Throughput of ``conv2d`` forward + input gradient (an image model's first layer under attack: no weight gradient)
against eager ``F.conv2d`` and torch.compile of it. CPU only (GPUs run torch's convolutions). Shapes: the digits
CNN's 1->32 3x3 layer at the DART batch, ResNet's 7x7/2 stem at 32x32 (the attack benchmark's batch) and at 224x224."""

import functools

import pytest
import torch
import torch.nn.functional as F

import urda_fast.ops as ops

pytestmark = pytest.mark.bench

# (input shape, out channels, kernel, stride, padding)
CASES = [((64, 1, 16, 16), 32, 3, 1, 1), ((16, 3, 32, 32), 64, 7, 2, 3), ((8, 3, 224, 224), 64, 7, 2, 3)]


def pytest_generate_tests(metafunc):
    # Own parameter names: conftest's hook parametrizes "shape"/"provider" with the fused ops' values.
    if "case" in metafunc.fixturenames:
        ids = [f"{'x'.join(map(str, s))}-o{o}k{k}s{st}p{p}" for s, o, k, st, p in CASES]
        metafunc.parametrize("case", CASES, ids=ids)
        metafunc.parametrize("impl", ["eager", "compile", "cpu"])


def test_conv2d_input_grad(bench, case, impl):
    if bench.device.type != "cpu":
        pytest.skip("conv2d's input-gradient kernel is CPU only; GPUs run torch's convolutions")
    shape, out_channels, kernel, stride, padding = case
    x = torch.rand(shape, dtype=bench.dtype, requires_grad=True)
    weight = torch.randn(out_channels, shape[1], kernel, kernel, dtype=bench.dtype) * 0.1
    conv = bench.provider_fn(impl, ops.reference.conv2d, functools.partial(ops.conv2d, backend="cpu"))
    grad = torch.randn(F.conv2d(x.detach(), weight, None, stride, padding).shape, dtype=bench.dtype)

    def fn():
        torch.autograd.grad(conv(x, weight, None, stride, padding), x, grad)

    # Compulsory traffic: forward reads x, writes the output; backward reads the output gradient, writes x's.
    x_bytes, out_bytes = x.numel() * x.element_size(), grad.numel() * grad.element_size()
    bench.run(fn, op="conv2d_input_grad", variant=f"o{out_channels}k{kernel}s{stride}p{padding}", mode="full",
              shape=shape, provider=impl, bytes_moved=2 * x_bytes + 2 * out_bytes, copy_numel=x.numel())
