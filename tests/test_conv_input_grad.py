"""ops.conv2d and its input-gradient kernel (urda_fast::conv2d_input_grad) against torch's convolution in float64:
channels, kernels, strides, paddings, odd sizes, both of the kernel's staging paths; autograd, double backward,
opcheck, torch.compile; the fallbacks; FastConv2d and the models that use it."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import urda_fast.ops as ops
from urda_fast.models import FastConv2d, ImageClassifier, create_backbone

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the C++ extension is not built")


def torch_input_grad(grad_out, weight, input_size, stride, padding):
    x = grad_out.new_empty((grad_out.shape[0], weight.shape[1], *input_size))
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, [1, 1], False, [0, 0], 1,
                                               [True, False, False])[0]


def output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


GEOMETRIES = [  # (C, O, (kh, kw), (sh, sw), (ph, pw), (H, W))
    (c, o, k, s, p, hw)
    for c, o, k, s, p, hw in itertools.product(
        [1, 2, 3, 4], [5], [(1, 1), (3, 3), (7, 7), (3, 5)], [(1, 1), (2, 2), (3, 1)], [(0, 0), (1, 2), (3, 3)],
        [(5, 7), (33, 17)])
    if all(size + 2 * pad >= kern for size, pad, kern in zip(hw, p, k))
]


@pytest.mark.parametrize("batch", ["few", "many"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_input_grad_matches_torch_in_float64(channels, batch):
    """Fewer samples than twice the threads: bands of 16 input rows per task (33 rows: three bands, staged rows
    shared); more: one task per sample, all its rows staged once."""
    torch.manual_seed(channels)
    samples = 2 if batch == "few" else 2 * torch.get_num_threads() + 1
    for c, o, k, s, p, hw in (g for g in GEOMETRIES if g[0] == channels):
        out = [output_size(hw[i], k[i], s[i], p[i]) for i in range(2)]
        weight = torch.randn(o, c, *k, dtype=torch.float64)
        grad_out = torch.randn(samples, o, *out, dtype=torch.float64)
        got = torch.ops.urda_fast.conv2d_input_grad(grad_out, weight, list(hw), list(s), list(p))
        want = torch_input_grad(grad_out, weight, list(hw), list(s), list(p))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{(c, o, k, s, p, hw)}")


@pytest.mark.parametrize("shape", [(16, 3, 32, 32), (3, 3, 224, 224)], ids=["stem-32-whole", "stem-224-banded"])
def test_input_grad_of_resnet_stem_in_float32(shape):
    """ResNet's 7x7/2 stem with 64 output channels (o in blocks of 4): a 32x32 sample is one task (on up to 8
    threads), a 224x224 one (over 256 KiB staged) staged in bands of rows, a task each."""
    torch.manual_seed(0)
    weight = torch.randn(64, 3, 7, 7) * 0.1
    grad_out = torch.randn(shape[0], 64, shape[2] // 2, shape[3] // 2)
    got = torch.ops.urda_fast.conv2d_input_grad(grad_out, weight, list(shape[2:]), [2, 2], [3, 3])
    want = torch_input_grad(grad_out.double(), weight.double(), list(shape[2:]), [2, 2], [3, 3])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("geometry", [((3, 5), (1, 2), (1, 2), (150, 299)), ((5, 3), (3, 1), (2, 1), (301, 160))],
                         ids=["k3x5-s1x2", "k5x3-s3x1"])
def test_input_grad_banded_path_in_float64(geometry):
    """Samples whose staged grad_out is over 256 KiB are staged band by band (16 input rows per task): other kernels
    and strides than the stem's, in float64 against torch."""
    kernel, stride, padding, size = geometry
    torch.manual_seed(2)
    weight = torch.randn(64, 2, *kernel, dtype=torch.float64)
    out = [output_size(size[i], kernel[i], stride[i], padding[i]) for i in range(2)]
    grad_out = torch.randn(2, 64, *out, dtype=torch.float64)
    assert grad_out[0].numel() * 8 > 256 << 10
    got = torch.ops.urda_fast.conv2d_input_grad(grad_out, weight, list(size), list(stride), list(padding))
    want = torch_input_grad(grad_out, weight, list(size), list(stride), list(padding))
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_input_grad_empty_batch_and_bad_calls():
    weight = torch.randn(4, 3, 3, 3)
    assert torch.ops.urda_fast.conv2d_input_grad(torch.zeros(0, 4, 8, 8), weight, [8, 8], [1, 1], [1, 1]).shape == (
        0, 3, 8, 8)
    with pytest.raises(RuntimeError, match="1-4 input channels"):
        torch.ops.urda_fast.conv2d_input_grad(torch.zeros(1, 4, 8, 8), torch.randn(4, 5, 3, 3), [8, 8], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="is not the output of weight"):
        torch.ops.urda_fast.conv2d_input_grad(torch.zeros(1, 4, 7, 8), weight, [8, 8], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.urda_fast.conv2d_input_grad(torch.zeros(1, 4, 8, 8).bfloat16(), weight.bfloat16(), [8, 8], [1, 1],
                                              [1, 1])


def _inputs(dtype=torch.float64, channels=3):
    torch.manual_seed(1)
    x = torch.rand(3, channels, 11, 13, dtype=dtype, requires_grad=True)
    weight = torch.randn(6, channels, 5, 3, dtype=dtype, requires_grad=True)
    bias = torch.randn(6, dtype=dtype, requires_grad=True)
    return x, weight, bias


def test_conv2d_runs_the_kernel_and_matches_torch():
    x, weight, bias = _inputs()
    y = ops.conv2d(x, weight, bias, stride=(2, 1), padding=(2, 1))
    assert "conv2d_image_forward" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, (2, 1), (2, 1)), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda *a: ops.conv2d(*a, stride=(2, 1), padding=(2, 1)), (x, weight, bias))
    # create_graph=True takes torch's (differentiable) kernels: second derivatives exist
    assert torch.autograd.gradgradcheck(lambda *a: ops.conv2d(*a, stride=2, padding=1), (x, weight, bias))


def test_conv2d_only_input_gradient_and_no_bias():
    x, weight, _ = _inputs(torch.float32)
    weight = weight.detach()
    (got,) = torch.autograd.grad(ops.conv2d(x, weight, None, 2, 3).square().sum(), x)
    xr = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(xr, weight.double(), None, 2, 3).square().sum(), xr)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_conv2d_opcheck_and_compile():
    x, weight, bias = _inputs(torch.float32)
    torch.library.opcheck(torch.ops.urda_fast.conv2d_image_forward, (x, weight, bias, [2, 1], [1, 1]))
    torch.library.opcheck(torch.ops.urda_fast.conv2d_input_grad,
                          (torch.randn(3, 6, 5, 13), weight.detach(), [11, 13], [2, 1], [1, 1]))

    def loss(x, w, b):
        return ops.conv2d(x, w, b, 2, 1).square().sum()

    eager = torch.autograd.grad(loss(x, weight, bias), (x, weight, bias))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, weight, bias), (x, weight, bias))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["no-grad", "5-channels", "channels-last", "bfloat16", "same-padding", "reference"])
def test_conv2d_falls_back_to_torch(case):
    x, weight, bias = _inputs(torch.float32, channels=5 if case == "5-channels" else 3)
    padding, backend = ("same" if case == "same-padding" else 1), ("reference" if case == "reference" else None)
    if case == "no-grad":
        x = x.detach()
    if case == "channels-last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    if case == "bfloat16":
        x, weight, bias = (t.detach().bfloat16().requires_grad_() for t in (x, weight, bias))
    y = ops.conv2d(x, weight, bias, 1, padding, backend=backend)
    assert y.grad_fn is None or "conv2d_image_forward" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, 1, padding), rtol=0, atol=0)
    if case == "no-grad":  # asked for, the kernel's op runs anyway (same values)
        torch.testing.assert_close(ops.conv2d(x, weight, bias, 1, padding, backend="cpu"), y, rtol=0, atol=0)
    elif case != "reference":
        with pytest.raises(ValueError, match="conv2d's CPU kernel cannot run this call"):
            ops.conv2d(x, weight, bias, 1, padding, backend="cpu")


def test_one_element_stride_and_padding_are_pairs_as_in_f_conv2d():
    x, weight, bias = _inputs(torch.float64)
    x = x.detach().requires_grad_()
    for stride, padding in (((2,), (1,)), (np.int64(2), [np.int64(1)])):
        got = ops.conv2d(x, weight, bias, stride=stride, padding=padding)
        assert "conv2d_image_forward" in type(got.grad_fn).__name__
        want = F.conv2d(x, weight, bias, stride=2, padding=1)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.square().sum(), x)[0],
                                   torch.autograd.grad(want.square().sum(), x)[0])
    with pytest.raises(TypeError, match="conv2d's stride must be an int or a pair of ints"):
        ops.conv2d(x, weight, bias, stride=(1, 1, 1))


def test_conv2d_backend_errors():
    x, weight, bias = _inputs(torch.float32)
    with pytest.raises(ValueError, match="conv2d has no 'triton' kernel"):
        ops.conv2d(x, weight, bias, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.conv2d(x, weight, bias, backend="gpu")


@pytest.mark.parametrize("backbone,shape", [("digits_cnn", (4, 1, 16, 16)), ("resnet18", (2, 3, 32, 32))])
def test_models_first_layer_input_gradient(backbone, shape):
    """The models' first layer is a FastConv2d that takes the kernel for an input that requires grad: the model's
    input gradient equals the same model's with torch's convolutions (float64)."""
    torch.manual_seed(0)
    model = ImageClassifier(create_backbone(backbone), num_classes=10).double().eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert isinstance(first, FastConv2d)
    x = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
    assert "conv2d_image_forward" in type(first(x).grad_fn).__name__
    (got,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    first.__class__ = torch.nn.Conv2d
    (want,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
