"""batch_norm_eval and FastSequential: eval-mode BatchNorm (+ ReLU) in one pass each way gives torch's values and
input gradients (bit for bit where the attack needs them), against a float64 reference too, through autograd,
opcheck, torch.compile and double backward; its constants follow in-place updates; the module swap keeps the model's
function, state dict, hooks, training mode and torch.fx tracing; the attack is unchanged; errors."""

import copy
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import urda_fast.models.batch_norm as fast_bn
import urda_fast.ops as ops
from urda_fast.attacks import PGD
from urda_fast.attacks.fold import FoldedModel
from urda_fast.models import DigitsCNN, FastSequential, ImageClassifier, plain_torch

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the CPU extension is not built")

# (input shape): NCHW, (N, C) as BatchNorm1d's, (N, C, L), odd sizes, a 5-D input.
SHAPES = [(4, 6, 9, 7), (33, 20), (5, 7, 3), (3, 5, 2, 3, 2)]


def norm_stats(channels, dtype, seed=0, affine=True):
    """Random running statistics, weight and bias (no gradients: the attack's frozen model)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(channels, generator=g, dtype=dtype)
    var = torch.rand(channels, generator=g, dtype=dtype) * 3 + 0.01
    weight = torch.randn(channels, generator=g, dtype=dtype) if affine else None
    bias = torch.randn(channels, generator=g, dtype=dtype) if affine else None
    return mean, var, weight, bias


def value_and_grad(fn, x, grad):
    t = x.detach().clone().requires_grad_(True)
    out = fn(t)
    (grad_in,) = torch.autograd.grad(out, t, grad)
    return out.detach(), grad_in


def torch_pair(stats, relu, eps=1e-5):
    return lambda t: (lambda y: F.relu(y) if relu else y)(F.batch_norm(t, *stats, training=False, eps=eps))


def vector_isa() -> bool:
    # torch's vectorised BatchNorm uses a fused multiply-add on AVX2 / AVX-512; its scalar build rounds twice.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_torch_and_a_float64_reference(shape, dtype, relu, affine):
    stats = norm_stats(shape[1], dtype, affine=affine)
    x = torch.randn(shape, dtype=dtype)
    grad = torch.randn(shape, dtype=dtype)
    got = value_and_grad(lambda t: ops.batch_norm_eval(t, *stats, relu=relu, backend="cpu"), x, grad)
    want = value_and_grad(torch_pair(stats, relu), x, grad)
    exact = dtype == torch.float32 and vector_isa()
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=4 * torch.finfo(dtype).eps, atol=1e-30)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)
    # An independent float64 reference (the formula, not torch's kernel).
    x64, grad64 = x.double(), grad.double()
    mean, var, weight, bias = (None if t is None else t.double() for t in stats)
    shape_c = (1, -1) + (1,) * (len(shape) - 2)
    scale = (var + 1e-5).rsqrt() * (1 if weight is None else weight)
    out64 = (x64 - mean.reshape(shape_c)) * scale.reshape(shape_c) + (0 if bias is None else bias.reshape(shape_c))
    grad_in64 = grad64 * scale.reshape(shape_c)
    if relu:
        grad_in64 = torch.where(out64 > 0, grad_in64, 0)
        out64 = out64.clamp_min(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got[0].double(), out64, rtol=tol, atol=tol)
    clear = out64.abs() > tol  # where rounding cannot move the pre-activation across 0 (the ReLU's mask)
    torch.testing.assert_close(got[1].double()[clear], grad_in64[clear], rtol=tol, atol=tol)


def test_digits_cnn_sizes_bit_for_bit():
    """The digits CNN's first block at the attack benchmark's batch: forward and input gradient equal torch's."""
    stats = norm_stats(32, torch.float32, seed=3)
    x, grad = torch.randn(64, 32, 16, 16), torch.randn(64, 32, 16, 16)
    got = value_and_grad(lambda t: ops.batch_norm_eval(t, *stats, relu=True, backend="cpu"), x, grad)
    want = value_and_grad(torch_pair(stats, True), x, grad)
    if not vector_isa():
        pytest.skip("bit equality holds against torch's vectorised kernels (AVX2 / AVX-512) only")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last(dtype):
    """A channels-last input runs the kernel in its layout: torch's values and gradients, output and input gradient
    channels-last, also when autograd hands over a contiguous output gradient."""
    stats = norm_stats(12, dtype, seed=4)
    x = torch.randn(3, 12, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    for grad in (torch.randn(3, 12, 5, 7, dtype=dtype), torch.randn(3, 12, 5, 7, dtype=dtype).contiguous(
            memory_format=torch.channels_last)):
        got = value_and_grad(lambda t: ops.batch_norm_eval(t, *stats, relu=True, backend="cpu"), x, grad)
        want = value_and_grad(torch_pair(stats, True), x, grad)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        exact = dtype == torch.float32 and vector_isa()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **(dict(rtol=0, atol=0) if exact else {}))


def test_nan_inf_and_empty():
    stats = norm_stats(3, torch.float32)
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0], x[1, 2, 3, 3], x[0, 1, 1, 1] = float("nan"), float("inf"), -float("inf")
    grad = torch.randn_like(x)
    for relu in (True, False):
        got = value_and_grad(lambda t: ops.batch_norm_eval(t, *stats, relu=relu, backend="cpu"), x, grad)
        want = value_and_grad(torch_pair(stats, relu), x, grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, equal_nan=True)
        assert got[0][0, 0, 0, 0].isnan()  # NaN stays NaN through the ReLU, as in torch
    empty = torch.zeros(0, 3, 4, 4, requires_grad=True)
    out = ops.batch_norm_eval(empty, *stats, relu=True, backend="cpu")
    assert out.shape == empty.shape
    assert torch.autograd.grad(out.sum(), empty)[0].shape == empty.shape


def test_non_contiguous_runs_torch_and_cpu_backend_says_why():
    stats = norm_stats(4, torch.float32)
    x = torch.randn(3, 8, 5, 4)[:, ::2]
    torch.testing.assert_close(ops.batch_norm_eval(x, *stats, relu=True), torch_pair(stats, True)(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="neither contiguous nor channels-last"):
        ops.batch_norm_eval(x, *stats, backend="cpu")
    with pytest.raises(ValueError, match="running_mean is None"):
        ops.batch_norm_eval(x.contiguous(), None, None, backend="cpu")
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.batch_norm_eval(x.contiguous().half(), *(t.half() for t in stats), backend="cpu")
    with pytest.raises(ValueError, match="no 'cuda' kernel"):
        ops.batch_norm_eval(x, *stats, backend="cuda")
    with pytest.raises(RuntimeError, match=r"grad_factors must have shape \(2, 4\)"):
        torch.ops.urda_fast.batch_norm_eval_forward(x.contiguous(), stats[0], stats[1], torch.ones(2, 3), True)


def test_weight_that_needs_a_gradient_runs_torch():
    mean, var, weight, bias = norm_stats(4, torch.float64)
    weight.requires_grad_(True)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    out = ops.batch_norm_eval(x, mean, var, weight, bias, relu=True)
    (grad_weight,) = torch.autograd.grad(out.sum(), weight)
    (want,) = torch.autograd.grad(torch_pair((mean, var, weight, bias), True)(x).sum(), weight)
    torch.testing.assert_close(grad_weight, want)
    with pytest.raises(ValueError, match="weight or bias requires grad"):
        ops.batch_norm_eval(x, mean, var, weight, bias, backend="cpu")


def test_opcheck_compile_and_double_backward():
    stats = norm_stats(5, torch.float64)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    from urda_fast.ops.batch_norm import torch_batch_norm_constants
    constants = torch_batch_norm_constants(*stats, 1e-5)
    for relu in (True, False):
        torch.library.opcheck(torch.ops.urda_fast.batch_norm_eval_forward, (x, *constants, relu))
    compiled = torch.compile(lambda t: ops.batch_norm_eval(t, *stats, relu=True).square().sum(), fullgraph=True)
    (got,) = torch.autograd.grad(compiled(x), x)
    (want,) = torch.autograd.grad(torch_pair(stats, True)(x).square().sum(), x)
    torch.testing.assert_close(got, want)
    # create_graph: the backward in torch operations, differentiable again (here w.r.t. the output gradient).
    grad = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (lambda t: ops.batch_norm_eval(t, *stats, relu=True, backend="cpu"), torch_pair(stats, True)):
        (grad_in,) = torch.autograd.grad(fn(x), x, grad, create_graph=True)
        results.append((grad_in, torch.autograd.grad(grad_in.square().sum(), grad)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_constants_follow_in_place_updates_and_inference_mode():
    bn = nn.BatchNorm2d(4).eval().requires_grad_(False)
    x = torch.randn(2, 4, 3, 3)

    def ours():
        return ops.batch_norm_eval(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, backend="cpu")

    with torch.inference_mode():  # constants made here must serve a later autograd call
        torch.testing.assert_close(ours(), bn(x), rtol=0, atol=0)
    with torch.no_grad():
        bn.running_var.mul_(3)
        bn.weight.add_(0.5)
    torch.testing.assert_close(ours(), bn(x), rtol=0, atol=0)
    bn.eps = 0.1  # same tensors, another eps
    torch.testing.assert_close(ours(), bn(x), rtol=0, atol=0)
    t = x.clone().requires_grad_(True)
    ops.batch_norm_eval(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps).sum().backward()
    assert t.grad is not None


def digits_pair(seed=0):
    """A DigitsCNN with non-trivial statistics and its plain-PyTorch twin, both in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    model.train()
    with torch.no_grad():
        model(torch.rand(128, 1, 16, 16))
    model.eval()
    return model, plain_torch(copy.deepcopy(model))


def test_digits_cnn_fuses_and_matches_its_torch_twin():
    model, twin = digits_pair()
    assert type(model.net) is FastSequential and type(twin.net) is nn.Sequential
    assert model.state_dict().keys() == twin.state_dict().keys()
    x, calls = torch.rand(64, 1, 16, 16), []
    original = fast_bn.ops.batch_norm_eval
    fast_bn.ops.batch_norm_eval = lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    try:
        got = value_and_grad(model, x, torch.ones(64, 256))
        assert len(calls) == 3  # all three BatchNorm -> ReLU pairs at this batch
        calls.clear()
        model(x[:2])
        assert not calls  # below MIN_NUMEL: torch's modules
    finally:
        fast_bn.ops.batch_norm_eval = original
    want = value_and_grad(twin, x, torch.ones(64, 256))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the first layer's input gradient is urda's kernel


def test_training_mode_hooks_and_fx_tracing_keep_torch_semantics():
    model, twin = digits_pair(1)
    x = torch.rand(64, 1, 16, 16)
    model.train(), twin.train()
    torch.testing.assert_close(model(x), twin(x))  # batch statistics, and running statistics updated alike
    torch.testing.assert_close(model.net[1].running_mean, twin.net[1].running_mean)
    model.eval(), twin.eval()
    seen = []
    handle = model.net[1].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    try:
        model(x)
    finally:
        handle.remove()
    assert seen == [(64, 32, 16, 16)]  # the hooked BatchNorm ran as a module
    folded = FoldedModel(model)  # torch.fx traces through FastSequential's unfused path
    folded.refresh()
    folded.check(x)


@pytest.mark.parametrize("subclassed", ["norm", "relu", "norm_instance", "relu_instance"])
def test_subclasses_with_a_forward_of_their_own_run_it(subclassed):
    """A BatchNorm or ReLU subclass that overrides forward (or an instance whose forward was replaced) computes
    something else than the fused op: the pair was fused anyway (isinstance), silently skipping that forward."""

    class HalvedNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 0.5

    class HalvedReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) * 0.5

    torch.manual_seed(2)
    norm = HalvedNorm(32) if subclassed == "norm" else nn.BatchNorm2d(32)
    relu = HalvedReLU() if subclassed == "relu" else nn.ReLU()
    if subclassed.endswith("_instance"):
        patched = norm if subclassed == "norm_instance" else relu
        patched.forward = functools.partial(lambda m, t: type(m).forward(m, t) * 0.5, patched)
    twin = nn.Sequential(norm, relu).eval()
    twin[0].running_mean.normal_()
    model = fast_bn.use_fast_batch_norm(copy.deepcopy(twin))
    assert type(model) is FastSequential
    x = torch.randn(64, 32, 8, 8)
    assert x.numel() >= fast_bn.MIN_NUMEL
    torch.testing.assert_close(model(x), twin(x))


def test_attack_is_unchanged_by_the_fusion():
    """PGD on the digits classifier: the same adversarial images, bit for bit, with and without FastSequential."""
    torch.manual_seed(0)
    model = ImageClassifier(DigitsCNN(), 10).eval()
    with torch.no_grad():
        model.train()(torch.rand(128, 1, 16, 16))
    model.eval()
    unfused = copy.deepcopy(model)
    unfused.backbone.net.__class__ = nn.Sequential
    x = torch.rand(64, 1, 16, 16)
    labels = model(x).argmax(1)
    adversarial = [PGD(m, eps=2 / 255, alpha=0.5 / 255, steps=5, random_start=False)(x, labels)
                   for m in (model, unfused)]
    if not vector_isa():
        pytest.skip("bit equality holds against torch's vectorised kernels (AVX2 / AVX-512) only")
    assert torch.equal(*adversarial)


def resnet_pair(arch):
    """A random-init torchvision ResNet as create_backbone builds it (eval mode, calibrated running statistics) and its
    plain-PyTorch twin."""
    from urda_fast.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(arch)
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 64, 64))
    model.eval()
    return model, plain_torch(copy.deepcopy(model))


def expected_fused_norms(twin, x):
    """(relu, input shape) of each BatchNorm the fast ResNet runs as the op on ``x``, in forward order, from its
    plain twin: every BatchNorm2d but the downsample paths' whose input reaches MIN_NUMEL; the ReLU fused but for a
    block's last BatchNorm (BasicBlock's bn2, Bottleneck's bn3), which precedes the residual sum."""
    from torchvision.models import resnet

    residual = {f"{name}.{'bn2' if type(m) is resnet.BasicBlock else 'bn3'}" for name, m in twin.named_modules()
                if type(m) in (resnet.BasicBlock, resnet.Bottleneck)}
    seen, handles = [], []
    for name, m in twin.named_modules():
        if isinstance(m, nn.BatchNorm2d) and "downsample" not in name:
            handles.append(m.register_forward_pre_hook(
                lambda module, args, name=name: seen.append((name not in residual, tuple(args[0].shape)))))
    try:
        with torch.no_grad():
            twin(x)
    finally:
        for handle in handles:
            handle.remove()
    return [(relu, shape) for relu, shape in seen if math.prod(shape) >= fast_bn.MIN_NUMEL]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnets_fuse_and_match_their_torch_twins(arch):
    """Every BatchNorm of a ResNet whose input reaches MIN_NUMEL runs the op (with its ReLU where one follows): stem,
    blocks (residual BatchNorms alone), downsample paths aside (torch's Sequential of conv + BatchNorm, no ReLU).
    Values and input gradients match torchvision's modules; train mode, small inputs and the twin run torch's; the
    state dict is untouched and plain_torch gives torchvision's classes back."""
    from torchvision.models import resnet

    model, twin = resnet_pair(arch)
    assert type(model) is fast_bn.FastResNet and type(twin) is resnet.ResNet
    block = fast_bn.FastBasicBlock if arch == "resnet18" else fast_bn.FastBottleneck
    assert type(model.layer1[0]) is block and type(twin.layer1[0]) is block.__bases__[0]
    assert model.state_dict().keys() == twin.state_dict().keys()
    x, calls = torch.rand(2, 3, 224, 224), []
    expected = expected_fused_norms(twin, x)
    # At 2 x 3 x 224 x 224 (MIN_NUMEL 131072) the stem (2x64x112x112), layer1 and layer2 (2x128x28x28 = 200704) run
    # the op in full; a 2x256x14x14 input (100352) does not reach it, so ResNet-18's layer3 and layer4 run torch's.
    # ResNet-50's first block of layer3 and of layer4 has bn1 at the stride-1 size (2x256x28x28, 2x512x14x14), and
    # its bn3 are 1024 and 2048 wide: those reach it. ResNet-18: 1 + 4 + 4 of its 17 non-downsample BatchNorms;
    # ResNet-50: 1 + 9 + 12 + (1 + 6) + (1 + 3) of its 49.
    assert len(expected) == {"resnet18": 9, "resnet50": 33}[arch]
    original = fast_bn.ops.batch_norm_eval
    fast_bn.ops.batch_norm_eval = lambda *a, **k: calls.append((k["relu"], tuple(a[0].shape))) or original(*a, **k)
    try:
        got = value_and_grad(model, x, torch.ones(2, model.out_features))
        assert calls == expected
        calls.clear()
        small = x[:, :, :32, :32]
        model(small)
        assert calls == expected_fused_norms(twin, small) == []  # small inputs: torch's modules (stem 2x64x16x16)
        calls.clear()
        model.train()(x)
        assert not calls
        model.eval()
    finally:
        fast_bn.ops.batch_norm_eval = original
    want = value_and_grad(twin, x, torch.ones(2, model.out_features))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_resnet_attack_and_folding_are_unchanged_by_the_fusion():
    """PGD on a ResNet-18 classifier at 224: the fused model gives the plain model's adversarial images; the attacks'
    BatchNorm folding traces the fused blocks (torch.fx takes their unfused path) and folds every BatchNorm."""
    from urda_fast.models import create_backbone

    torch.manual_seed(0)
    model = ImageClassifier(create_backbone("resnet18"), 10, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 64, 64))
    model.eval()
    twin = plain_torch(copy.deepcopy(model))
    x = torch.rand(2, 3, 224, 224)
    labels = model(x).argmax(1)
    adversarial = [PGD(m, eps=1 / 255, alpha=0.25 / 255, steps=2, random_start=False)(x, labels)
                   for m in (model, twin)]
    torch.testing.assert_close(adversarial[0], adversarial[1], rtol=0, atol=1e-6)
    folded = FoldedModel(model)
    # the backbone's 20 BatchNorm2d and the classifier's bottleneck BatchNorm1d, as before the fusion
    assert len(folded.layers) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == 21
    folded.refresh()
    folded.check(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tensors_run_torch():
    """On a GPU the op is torch's BatchNorm (+ ReLU), FastSequential does not fuse, and backend='cpu' says why."""
    stats = tuple(t.cuda() for t in norm_stats(8, torch.float32))
    x = torch.randn(4, 8, 64, 64, device="cuda")
    torch.testing.assert_close(ops.batch_norm_eval(x, *stats, relu=True), torch_pair(stats, True)(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="CPU tensors only"):
        ops.batch_norm_eval(x, *stats, backend="cpu")
    model, twin = (m.cuda() for m in digits_pair())
    images = torch.rand(64, 1, 16, 16, device="cuda")
    torch.testing.assert_close(model(images), twin(images), rtol=0, atol=0)
