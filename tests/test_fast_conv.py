"""FastConv2d: its CPU fast paths (patch embedding as a matmul, a single output position as a linear layer on the
window it reads) give the convolution's output and gradients (float64), keep the parameters and state dict, and
every other case runs the convolution."""

import copy
import re
import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from urda_fast.models import FastConv2d, plain_torch, use_fast_conv
from urda_fast.ops._memo import memo_scope


def outputs_and_grads(module, x):
    xi = x.clone().requires_grad_(True)
    out = module(xi)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out, *torch.autograd.grad(out, [xi] + list(module.parameters()), weights))


@pytest.mark.parametrize("conv_args, size, path", [
    (dict(kernel_size=8, stride=8, bias=False), (32, 32), "patch"),  # the tiny ViT's patch embedding
    (dict(kernel_size=4, stride=4), (30, 33), "patch"),  # floor mode crops
    (dict(kernel_size=(2, 3), stride=(2, 3)), (9, 12), "patch"),
    (dict(kernel_size=3, padding=1), (1, 1), "window"),  # ResNet's last stage at 32x32: centre tap
    (dict(kernel_size=3, padding=1, stride=2), (1, 1), "window"),
    (dict(kernel_size=(3, 5), padding=(1, 2), bias=False), (1, 1), "window"),
    (dict(kernel_size=3, padding=1, stride=2), (2, 2), "window"),  # its first, 2x2 -> 1x1: a 2x2 block of taps
    (dict(kernel_size=1, stride=2), (2, 2), "window"),  # its downsampling: reads the corner only
    (dict(kernel_size=3, padding=2, stride=3), (1, 1), "window"),  # one corner tap
    (dict(kernel_size=(5, 3), padding=(2, 0), stride=(4, 2)), (3, 4), "window"),  # a 3x3 window of a 5x3 kernel
    (dict(kernel_size=3, padding=1), (2, 2), "conv"),  # no fast path: the convolution
    (dict(kernel_size=(3, 5), padding=(1, 2), stride=2), (2, 3), "conv"),  # 1x2 outputs: the convolution
    (dict(kernel_size=3, padding=0, stride=3), (1, 1), "conv"),  # too small for its kernel: the convolution's error
])
def test_matches_the_convolution(conv_args, size, path, monkeypatch):
    """Each case takes the path named (the fallback gives the same numbers, so the path is checked itself): the patch
    embedding runs FastConv2d._patch_embedding and no convolution, a single output position the linear layer (no
    convolution either), anything else torch's convolution once."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **conv_args).double()
    fast = FastConv2d(3, 5, **conv_args).double()
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    try:
        want = outputs_and_grads(conv, x)
    except RuntimeError as err:
        with pytest.raises(RuntimeError, match=re.escape(str(err).split("\n")[0][:40])):
            outputs_and_grads(fast, x)
        return
    patch_calls, patch_embedding = [], FastConv2d._patch_embedding
    monkeypatch.setattr(FastConv2d, "_patch_embedding",
                        lambda self, *a: patch_calls.append(1) or patch_embedding(self, *a))
    with torch.profiler.profile() as prof:
        got = outputs_and_grads(fast, x)
    convolutions = sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")
    assert (len(patch_calls), convolutions) == {"patch": (1, 0), "window": (0, 0), "conv": (0, 1)}[path]
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_swap_keeps_parameters_and_plain_torch_restores_the_modules():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(4),
                          nn.Conv2d(8, 8, 3, padding=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    want = model(x)
    use_fast_conv(model)
    assert [type(m).__name__ for m in model] == ["FastConv2d", "FastConv2d", "MaxPool2d", "FastConv2d"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    plain_torch(model)
    assert all(type(m) in (nn.Conv2d, nn.MaxPool2d) for m in model)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])  # frozen: HPT's proxy and anchor
def test_compiles_fullgraph_with_both_fast_paths(frozen):
    model = use_fast_conv(nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                        nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten()))
    model.requires_grad_(not frozen)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (want,) = torch.autograd.grad(model(x).square().sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


def test_window_weight_of_a_frozen_weight_is_reused_until_the_weight_changes():
    """The frozen weight's contiguous block of taps is copied once inside a memo scope (attacks); an in-place update,
    another input size, a swapped weight or a weight that needs its gradient always gets the current block."""
    import urda_fast.models.conv as conv_module

    torch.manual_seed(1)
    conv = nn.Conv2d(6, 4, 3, padding=1, stride=2).double()
    fast = FastConv2d(6, 4, 3, padding=1, stride=2).double()
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(3, 6, 1, 1, dtype=torch.float64)
    for module in (conv, fast):
        module.requires_grad_(False)
    with memo_scope():  # as inside an attack
        first = fast(x)
        entry = conv_module._WINDOW_WEIGHTS.get((fast.weight,))
        torch.testing.assert_close(fast(x), conv(x), rtol=1e-12, atol=1e-12)
        assert entry is not None and conv_module._WINDOW_WEIGHTS.get((fast.weight,)) is entry  # reused, no new copy
        x2 = torch.randn(3, 6, 2, 2, dtype=torch.float64)  # the same weight on a 2x2 map: a 2x2 block, then back
        torch.testing.assert_close(fast(x2), conv(x2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast(x), conv(x), rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            for module in (conv, fast):
                module.weight.mul_(-2.0)  # in place: the version counter moves
        torch.testing.assert_close(fast(x), conv(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast(x), -2.0 * first + 3.0 * fast.bias.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)
        other = torch.randn_like(fast.weight)  # another weight through the same module (the attacks' BN folding)
        torch.testing.assert_close(fast._conv_forward(x, other, None), conv._conv_forward(x, other, None), rtol=1e-12,
                                   atol=1e-12)
        del other
        fast._conv_forward(x, torch.randn_like(fast.weight), None)  # a temporary: dead after the call
        # Dead weights' blocks are dropped at the next insert: only the temporary's is left.
        assert sum(refs[0]() is None for _, refs, _, _ in conv_module._WINDOW_WEIGHTS.entries.values()) == 1
    fast.requires_grad_(True)  # a weight that trains: no cached copy, its gradient flows
    (grad,) = torch.autograd.grad(fast(x).sum(), fast.weight)
    assert grad[:, :, 1, 1].abs().sum() > 0 and grad[:, :, 0].abs().sum() == 0


def test_torch_fx_traces_through_fast_conv():
    """torch.fx (feature extractors, quantisation) traces a model with FastConv2d as it traces torch's layers; the
    traced graph runs torch's convolution."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 4, 2), nn.Flatten()).eval()
    x = torch.rand(2, 3, 8, 8)
    traced = torch.fx.symbolic_trace(use_fast_conv(copy.deepcopy(model)))
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_takes_torchs_convolution_for_the_input_gradient(dtype):
    """Under CPU autocast (``--amp bf16|fp16``) the first layer's input gradient is torch's: our kernel takes
    float32/float64 only, and autocast runs the convolution in its own dtype (an attack crashed there)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 4, stride=4), nn.Flatten())
    fast = use_fast_conv(copy.deepcopy(model))
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    grads = []
    for net in (model, fast):
        with torch.autocast("cpu", dtype=dtype):
            out = net(x)
        grads.append(torch.autograd.grad(out.float().square().sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_a_jit_trace_records_torchs_convolution():
    """A trace records one branch: the fast paths branch on the input's size (a single output position) and grad
    mode, so under tracing FastConv2d is torch's convolution and the trace runs at other sizes."""
    torch.manual_seed(0)
    conv = FastConv2d(8, 4, 3, padding=1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(conv, torch.rand(2, 8, 1, 1, dtype=torch.float64))
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(traced(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
