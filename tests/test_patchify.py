"""PatchConv2d: a patch embedding as a matmul gives the convolution's output and gradients (float64), keeps the
parameters and state dict, and leaves every other convolution alone."""

import pytest
import torch
import torch.nn as nn

from urda_fast.models import PatchConv2d, use_patch_matmul


@pytest.mark.parametrize("kernel, size, bias", [(8, (32, 32), False), (4, (30, 33), True), ((2, 3), (9, 12), True)])
def test_matches_the_convolution(kernel, size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=kernel, bias=bias).double()
    patch = PatchConv2d(3, 5, kernel, stride=kernel, bias=bias).double()
    patch.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    results = []
    for module in (conv, patch):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        grads = torch.autograd.grad(out, [xi] + list(module.parameters()), torch.linspace(-1, 1, out.numel(),
                                    dtype=out.dtype).reshape(out.shape))
        results.append((out, *grads))
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_swap_keeps_parameters_and_other_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1),
                          nn.Conv2d(8, 8, 2, stride=2, padding=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    want = model(x)
    use_patch_matmul(model)
    assert [type(m).__name__ for m in model] == ["PatchConv2d", "Conv2d", "Conv2d", "Conv2d"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    # A padded patch convolution is not a reshape: it runs as the convolution even when its class is swapped.
    padded = nn.Conv2d(8, 8, 2, stride=2, padding=1)
    padded.__class__ = PatchConv2d
    y = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(padded(y), nn.Conv2d.forward(padded, y))
