"""BatchNorm folding for attacks: the folded model computes what the model computes (float64), follows the model as
it trains, leaves its parameters alone, and an attack with it makes the same adversarial examples; models it cannot
fold give clear errors (or, with "auto", a warning and the unfolded attack)."""

import copy

import pytest
import torch
import torch.nn as nn

from urda_fast.attacks import PGD, PGDL2
from urda_fast.attacks.fold import FoldedModel
from urda_fast.models import ImageClassifier, create_backbone


class Mixed(nn.Module):
    """Every case the folding has to tell apart: conv+BN (with and without conv bias), BN without affine, BN with
    batch statistics (not foldable), a conv whose output feeds two nodes (not foldable), linear+BN1d."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.conv4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc, self.bn5 = nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        y = self.conv4(x)
        x = self.bn4(y) + y
        return self.bn5(self.fc(x.flatten(1)))


def randomize_statistics(model, generator):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator, dtype=m.running_var.dtype) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.weight.shape, generator=generator, dtype=m.weight.dtype))
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=generator, dtype=m.bias.dtype))


@pytest.fixture
def mixed():
    torch.manual_seed(0)
    model = Mixed().double().eval()
    randomize_statistics(model, torch.Generator().manual_seed(1))
    return model


def test_folded_model_computes_what_the_model_computes(mixed):
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    folded = FoldedModel(mixed)
    folded.refresh()
    assert len(folded.layers) == 3  # conv1+bn1, conv2+bn2, fc+bn5; not bn3 (batch statistics) nor bn4 (y used twice)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), mixed(x), rtol=1e-12, atol=1e-12)
    # The folded copy shares the model's other parameters and owns none: nothing to keep in sync but the folds.
    own = {id(p) for p in mixed.parameters()}
    assert all(id(p) in own for p in folded.graph_module.parameters())


def test_a_batchnorm_in_training_mode_is_refused(mixed):
    """Folded with its running statistics, a training-mode BatchNorm would compute another function than the model
    (the attacks put the model in eval mode first; FoldedModel used directly must be told)."""
    mixed.bn1.train()
    with pytest.raises(ValueError, match="needs the model's BatchNorms in eval mode; in training mode: bn1; call"):
        FoldedModel(mixed)
    mixed.train()
    with pytest.raises(ValueError, match="call model.eval\\(\\) first"):
        FoldedModel(mixed)


def test_input_gradient_matches(mixed):
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    folded = FoldedModel(mixed)
    folded.refresh()
    weights = torch.randn(5, 8, dtype=torch.float64)
    (expected,) = torch.autograd.grad((mixed(x) * weights).sum(), x)
    (got,) = torch.autograd.grad((folded(x) * weights).sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_refresh_follows_training(mixed):
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    folded = FoldedModel(mixed)
    folded.refresh()
    randomize_statistics(mixed, torch.Generator().manual_seed(7))
    with torch.no_grad():
        mixed.conv1.weight.mul_(-2.0)
        mixed.fc.bias.add_(1.0)
        stale = folded(x)
        folded.refresh()
        torch.testing.assert_close(folded(x), mixed(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(stale, mixed(x))


def test_channels_last_and_half_weights_keep_their_format():
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    model = nn.Sequential(conv, nn.BatchNorm2d(8)).eval()
    folded = FoldedModel(model)
    folded.refresh()
    assert folded.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    model = model.to(torch.bfloat16)
    folded.refresh()
    assert folded.layers[0].weight.dtype == torch.bfloat16
    x = torch.rand(2, 3, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=5e-2, atol=5e-2)


def test_image_classifier_backbones_fold():
    torch.manual_seed(0)
    for backbone, shape in (("digits_cnn", (4, 1, 16, 16)), ("resnet18", (2, 3, 32, 32))):
        in_channels = shape[1]
        model = ImageClassifier(create_backbone(backbone, **({"in_channels": 1} if in_channels == 1 else {})), 10)
        model = model.double().eval()
        randomize_statistics(model, torch.Generator().manual_seed(2))
        folded = FoldedModel(model)
        folded.refresh()
        batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert len(folded.layers) == batchnorms, backbone  # every BatchNorm there follows a conv or linear layer
        x = torch.rand(shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls, eps, alpha", [(PGD, 0.05, 0.01), (PGDL2, 0.5, 0.1)])
def test_attack_with_folding_gives_the_same_examples(mixed, cls, eps, alpha):
    head = nn.Sequential(mixed, nn.Linear(8, 5)).double()
    x = torch.rand(6, 2, 6, 6, dtype=torch.float64)
    labels = torch.arange(6) % 5
    plain = cls(head, eps=eps, alpha=alpha, steps=5, random_start=True, seed=3)
    folding = cls(head, eps=eps, alpha=alpha, steps=5, random_start=True, seed=3, fold_batchnorm=True)
    state = copy.deepcopy(head.state_dict())
    head.train()
    flags = [p.requires_grad for p in head.parameters()]
    torch.testing.assert_close(folding(x, labels), plain(x, labels), rtol=0, atol=1e-12)
    assert len(folding._folded.layers) == 3
    assert head.training and flags == [p.requires_grad for p in head.parameters()]
    for name, value in head.state_dict().items():
        assert torch.equal(value, state[name]), name
    # The next call refolds from the model as it is now, and a replaced module is traced again.
    with torch.no_grad():
        mixed.conv1.weight.mul_(0.5)
    torch.testing.assert_close(folding(x, labels), plain(x, labels), rtol=0, atol=1e-12)
    first = folding._folded
    mixed.conv2 = nn.Conv2d(4, 4, 3, padding=1).double()
    torch.testing.assert_close(folding(x, labels), plain(x, labels), rtol=0, atol=1e-12)
    assert folding._folded is not first


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 4)

    def forward(self, x):
        x = self.bn(self.conv(x)).mean((2, 3))
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc(x)


class Counting(Untraceable):
    calls = 0

    def forward(self, x):  # traces, but tracing fixes the Python counter: the graph computes something else
        self.calls += 1
        return self.fc(self.bn(self.conv(x)).mean((2, 3))) * self.calls


@pytest.mark.parametrize("model_cls, match", [(Untraceable, "torch.fx can trace"), (Counting, "does not compute")])
def test_models_that_cannot_be_folded(model_cls, match):
    torch.manual_seed(0)
    model = model_cls().eval()
    x, y = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=match) as info:
        PGD(model, eps=0.1, alpha=0.05, steps=2, random_start=False, fold_batchnorm=True)(x, y)
    assert "fold_batchnorm=False" in str(info.value)
    auto = PGD(model, eps=0.1, alpha=0.05, steps=2, random_start=False, fold_batchnorm="auto")
    with pytest.warns(UserWarning, match="unfolded"):
        auto(x, y)
    assert auto.fold_batchnorm is False


def test_models_without_batchnorm_are_used_as_they_are():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    folded = FoldedModel(model)
    assert folded.graph_module is model and not folded.layers


def test_bad_fold_argument():
    with pytest.raises(ValueError, match="fold_batchnorm"):
        PGD(nn.Linear(2, 2), fold_batchnorm="yes")


def per_layer_fold(layer, norm):
    """The fold of one pair, written out: scale = w_bn / sqrt(var + eps), weight * scale, (b - mean) * scale + b_bn."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return layer.weight * scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1)), shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_refresh_equals_the_per_layer_fold_and_costs_few_ops(mixed, dtype):
    """The batched (torch._foreach) refresh gives each pair's fold bit for bit, and a ResNet-18's 21 folds take a few
    dozen calls from Python into torch (~10 per layer before: ~230). On CPU each foreach op still loops over its
    tensors inside torch; on a GPU it is one or a few kernel launches."""
    model = mixed.to(dtype)
    folded = FoldedModel(model)
    folded.refresh()
    assert len(folded.layers) == 3  # conv1+bn1, conv2+bn2 (no conv bias, no affine), fc+bn5
    for layer in folded.layers:
        weight, bias = per_layer_fold(*layer._pair)
        assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    resnet = ImageClassifier(create_backbone("resnet18"), 10).eval()
    folded = FoldedModel(resnet)
    with torch.profiler.profile() as prof:
        folded.refresh()
    calls = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    assert len(folded.layers) == 21 and calls < 100, (len(folded.layers), calls)


def _small_classifier():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    backbone.out_features = 8
    model = ImageClassifier(backbone, 3, bottleneck_dim=0, mean=(0.5,) * 3, std=(0.5,) * 3).double().eval()
    randomize_statistics(model, torch.Generator().manual_seed(2))
    return model


def _attacks(model):
    kwargs = dict(eps=0.1, alpha=0.03, steps=3, random_start=True, seed=0)
    return PGD(model, fold_batchnorm="auto", **kwargs), PGD(model, fold_batchnorm=False, **kwargs)


def test_tensors_reassigned_after_tracing_are_followed():
    """load_state_dict(assign=True) and a buffer set anew replace tensor objects the traced graph read directly: the
    next attack traces again (before, it kept the old normalisation: 0.13-0.44 off)."""
    model = _small_classifier()
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    folding, plain = _attacks(model)
    folding(x, y)
    other = copy.deepcopy(model)
    other.normalize.mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, 3, 1, 1)
    model.load_state_dict(other.state_dict(), assign=True)
    torch.testing.assert_close(folding(x, y), plain(x, y), rtol=0, atol=1e-12)
    model.normalize.std = torch.full((1, 3, 1, 1), 0.1, dtype=torch.float64)
    torch.testing.assert_close(folding(x, y), plain(x, y), rtol=0, atol=1e-12)
    assert folding.fold_batchnorm == "auto" and folding._folded.layers


def test_hooks_the_graph_would_skip_are_refused():
    """A hook on a module tracing inlines (a feature probe on a block) would never run in the traced graph."""
    model = _small_classifier()
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    folding, plain = _attacks(model)
    folding(x, y)
    model.backbone.register_forward_hook(lambda module, inputs, out: out * 0)
    with pytest.warns(UserWarning, match="hooks"):
        got = folding(x, y)
    torch.testing.assert_close(got, plain(x, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="hooks"):
        PGD(model, eps=0.1, alpha=0.03, steps=1, fold_batchnorm=True)(x, y)


class Pairs(nn.Module):
    """Pairs the fold must leave alone or get right: old-style weight_norm (its hook recomputes the weight), a
    BatchNorm subclass with its own forward, a hooked BatchNorm, conv -> BN -> BN, and a linear layer before a
    BatchNorm1d on (N, C, L) input (it normalises dim 1, not the linear's output features)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.utils.weight_norm(nn.Conv2d(2, 4, 3, padding=1))
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), ScaledBatchNorm(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn3.register_forward_hook(lambda module, inputs, out: out + 1)
        self.conv4, self.bn4, self.bn4b = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.fc, self.bn5 = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        x = self.bn4b(self.bn4(self.conv4(x)))
        return self.bn5(self.fc(x.flatten(2)))  # (N, 6, L=6): fc mixes positions, bn5 normalises channels


class ScaledBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated")
def test_pairs_with_their_own_computation_fold_right_or_stay():
    torch.manual_seed(0)
    model = Pairs().double().eval()
    randomize_statistics(model, torch.Generator().manual_seed(3))
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64)  # 6 positions: the linear layer reads them
    folded = FoldedModel(model)
    folded.refresh()
    assert [pair[1] for pair in (layer._pair for layer in folded.layers)] == [model.bn4, model.bn5]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
        model.conv1.weight_v.mul_(1.5)  # weight_norm's hook recomputes conv1.weight at the next forward
        randomize_statistics(model, torch.Generator().manual_seed(4))  # bn5's statistics move after the trace
        folded.refresh()
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_batch_statistics_switched_on_after_tracing_are_followed():
    """A BatchNorm set to batch statistics after the first attack (test-time adaptation: running_mean = None)."""
    model = _small_classifier()
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    folding, plain = _attacks(model)
    folding(x, y)
    norm = model.backbone[1]
    norm.track_running_stats, norm.running_mean, norm.running_var = False, None, None
    torch.testing.assert_close(folding(x, y), plain(x, y), rtol=0, atol=0)
