"""Throughput of ``batch_norm_eval`` with ReLU, forward + input gradient (an eval-mode BatchNorm -> ReLU pair under
attack: no weight gradient), against eager ``F.batch_norm`` + ``F.relu`` and torch.compile of them. CPU only (GPUs
run torch's BatchNorm). Shapes: the digits CNN's first two blocks and its third at the attack benchmark's batch, and
a ResNet-18 first-stage map at 224x224."""

import functools

import pytest
import torch

import urda_fast.ops as ops

pytestmark = pytest.mark.bench

CASES = [(64, 32, 16, 16), (64, 64, 8, 8), (8, 64, 56, 56)]


def pytest_generate_tests(metafunc):
    # Own parameter names: conftest's hook parametrizes "shape"/"provider" with the fused ops' values.
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=["x".join(map(str, s)) for s in CASES])
        metafunc.parametrize("impl", ["eager", "compile", "cpu"])


def test_batch_norm_relu(bench, case, impl):
    if bench.device.type != "cpu":
        pytest.skip("batch_norm_eval's kernel is CPU only; GPUs run torch's BatchNorm")
    channels = case[1]
    generator = torch.Generator().manual_seed(0)
    stats = (torch.randn(channels, generator=generator, dtype=bench.dtype),
             torch.rand(channels, generator=generator, dtype=bench.dtype) + 0.5,
             torch.randn(channels, generator=generator, dtype=bench.dtype),
             torch.randn(channels, generator=generator, dtype=bench.dtype))
    x = torch.randn(case, generator=generator, dtype=bench.dtype).requires_grad_(True)
    grad = torch.randn(case, generator=generator, dtype=bench.dtype)
    reference = functools.partial(ops.reference.batch_norm_eval, relu=True)
    norm = bench.provider_fn(impl, reference, functools.partial(ops.batch_norm_eval, relu=True))

    def fn():
        torch.autograd.grad(norm(x, *stats), x, grad)

    # Compulsory traffic: forward reads x, writes the output; backward reads the gradient and the output (the ReLU's
    # mask), writes x's gradient.
    numel_bytes = x.numel() * x.element_size()
    bench.run(fn, op="batch_norm_relu", variant="eval", mode="full", shape=case, provider=impl,
              bytes_moved=5 * numel_bytes, copy_numel=x.numel())
