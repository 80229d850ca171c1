"""UDA methods (urda_fast.uda): the losses against hand-computed small cases, and every method's training step on a toy
model. Expected numbers are written out from the formulas with plain math, never by calling the modules under test."""

import io
import math

import pytest
import torch
import torch.nn as nn

from urda_fast.models import DigitsCNN, ImageClassifier
from urda_fast.uda import (
    METHODS,
    ClassificationMarginDisparityDiscrepancy,
    ConditionalDomainAdversarialLoss,
    DomainAdversarialLoss,
    GradientReverseLayer,
    MultiLinearMap,
    RandomizedMultiLinearMap,
    UDAMethod,
    WarmStartGradientReverseLayer,
    binary_accuracy,
    create_method,
    domain_bce,
    entropy,
    entropy_weights,
    shift_log,
)


def close(actual, expected, atol=1e-6, rtol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=rtol)


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- gradient reversal

# lambda_i = 2 (hi - lo) / (1 + exp(-alpha i / N)) - (hi - lo) + lo; with lo = 0 this is hi * tanh(alpha i / 2N).
DANN_SCHEDULE = [(0, 0.0), (1000, 0.46211715726000974), (3000, 0.9051482536448664)]  # alpha 1, hi 1, N 1000
MDD_SCHEDULE = [(0, 0.0), (500, 0.024491866240370915), (1000, 0.046211715726000974)]  # alpha 1, hi 0.1, N 1000


@pytest.mark.parametrize("hi,schedule", [(1.0, DANN_SCHEDULE), (0.1, MDD_SCHEDULE)], ids=["dann", "mdd"])
def test_grl_forward_identity_backward_warm_start(hi, schedule):
    grl = WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=hi, max_iters=1000, auto_step=True)
    for i, expected in schedule:
        assert expected == pytest.approx(2 * hi / (1 + math.exp(-i / 1000)) - hi, abs=1e-15)
        assert expected == pytest.approx(hi * math.tanh(i / 2000), abs=1e-15)
        grl.iter_num.fill_(i)
        x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
        out = grl(x)
        assert torch.equal(out, x.detach())
        out.backward(torch.tensor([0.5, 1.0, -2.0]))
        close(x.grad, [-0.5 * expected, -1.0 * expected, 2.0 * expected])
        assert int(grl.iter_num) == i + 1  # auto_step: the counter moves after the coefficient is read


def test_grl_counter_steps_and_survives_state_dict():
    grl = WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=1.0, max_iters=1000, auto_step=True)
    x = torch.ones(2, requires_grad=True)
    for _ in range(3):
        grl(x)
    state = grl.state_dict()
    assert set(state) == {"iter_num"} and int(state["iter_num"]) == 3
    fresh = WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=1.0, max_iters=1000, auto_step=True)
    fresh.load_state_dict(state)
    y = torch.ones(2, requires_grad=True)
    fresh(y).sum().backward()
    lam3 = 2 / (1 + math.exp(-3 / 1000)) - 1
    close(y.grad, [-lam3, -lam3])
    assert int(fresh.iter_num) == 4


def test_grl_without_auto_step_and_fixed():
    grl = WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=1.0, max_iters=1000, auto_step=False)
    grl.iter_num.fill_(1000)
    x = torch.tensor([2.0], requires_grad=True)
    grl(x).backward()
    close(x.grad, [-0.46211715726000974])
    assert int(grl.iter_num) == 1000
    grl.step()
    assert int(grl.iter_num) == 1001
    x = torch.tensor([2.0, 4.0], requires_grad=True)
    GradientReverseLayer(0.5)(x).backward(torch.tensor([1.0, -3.0]))
    close(x.grad, [-0.5, 1.5])


# ---------------------------------------------------------------- DANN


def test_dann_domain_loss_on_fixed_discriminator_outputs():
    d_s, d_t = torch.tensor([[0.9], [0.6]]), torch.tensor([[0.2], [0.7]])
    # 0.5 * (mean_i -log d_s_i + mean_j -log(1 - d_t_j))
    expected = 0.5 * ((-math.log(0.9) - math.log(0.6)) / 2 + (-math.log(0.8) - math.log(0.3)) / 2)
    close(domain_bce(d_s, d_t), expected)
    weighted = 0.5 * ((2 * -math.log(0.9) + 0) / 2 + (-math.log(0.8) - math.log(0.3)) / 2)
    close(domain_bce(d_s, d_t, torch.tensor([2.0, 0.0]), torch.ones(2)), weighted)
    # source predicted as source when d >= 0.5: 2/2 right; target: 0.2 right, 0.7 wrong
    close(binary_accuracy(d_s, torch.ones(2, 1)), 100.0)
    close(binary_accuracy(d_t, torch.zeros(2, 1)), 50.0)


def _linear_sigmoid_discriminator(weights):
    linear = nn.Linear(len(weights), 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([weights]))
        linear.bias.zero_()
    return nn.Sequential(linear, nn.Sigmoid())


def test_domain_adversarial_loss_values_and_reversed_feature_gradient():
    grl = WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=1.0, max_iters=1000, auto_step=True)
    grl.iter_num.fill_(1000)
    lam = 0.46211715726000974
    loss_fn = DomainAdversarialLoss(_linear_sigmoid_discriminator([1.0, -1.0]), grl)
    f_s = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)  # z = f0 - f1 = 2, -1
    f_t = torch.tensor([[0.0, 0.0], [1.0, 3.0]], requires_grad=True)  # z = 0, -2
    loss, domain_acc = loss_fn(f_s, f_t)
    # -log sigmoid(z) = log(1 + e^-z), -log(1 - sigmoid(z)) = log(1 + e^z)
    expected = 0.5 * ((math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2
                      + (math.log(2) + math.log1p(math.exp(-2))) / 2)
    close(loss, expected)
    # source: z=2 right, z=-1 wrong; target: sigmoid(0) = 0.5 counts as source (wrong), z=-2 right
    close(domain_acc, 50.0)
    assert not domain_acc.requires_grad
    loss.backward()
    # d loss / dz: source -0.25 (1 - sigmoid(z)), target 0.25 sigmoid(z); dz/df = (1, -1); the GRL multiplies by -lam
    for f, zs, sign in ((f_s, (2.0, -1.0), -1), (f_t, (0.0, -2.0), 1)):
        for row, z in enumerate(zs):
            dz = 0.25 * (1 - sigmoid(z)) * sign if sign < 0 else 0.25 * sigmoid(z)
            close(f.grad[row], [-lam * dz, lam * dz])
    # the discriminator itself is not reversed: dL/dw = sum_n dL/dz_n * f_n
    dzs = [-0.25 * (1 - sigmoid(2.0)), -0.25 * (1 - sigmoid(-1.0)), 0.25 * sigmoid(0.0), 0.25 * sigmoid(-2.0)]
    feats = [(2.0, 0.0), (0.0, 1.0), (0.0, 0.0), (1.0, 3.0)]
    expected_w = [sum(dz * f[k] for dz, f in zip(dzs, feats)) for k in range(2)]
    close(loss_fn.domain_discriminator[0].weight.grad[0], expected_w)


# ---------------------------------------------------------------- CDAN


def test_cdan_multilinear_map():
    f = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]])
    g = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    out = MultiLinearMap()(f, g)
    assert out.shape == (2, 6)  # (N, C * F), index c * F + j = g_c f_j
    close(out, [[0.25, 0.5, 0.75, 0.75, 1.5, 2.25], [0.0, -1.0, 2.0, 0.0, 0.0, 0.0]])


def test_cdan_randomized_map():
    rmap = RandomizedMultiLinearMap(features_dim=3, num_classes=2, output_dim=2)
    assert set(rmap.state_dict()) == {"Rf", "Rg"}  # fixed random matrices are saved with the checkpoint
    rmap.Rf.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    rmap.Rg.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    f = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]])
    g = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    # f Rf = [4, 5], [2, 1]; g Rg = [2.5, -0.25], [1, 2]; product / sqrt(2)
    r2 = math.sqrt(2.0)
    close(rmap(f, g), [[10.0 / r2, -1.25 / r2], [2.0 / r2, 2.0 / r2]])


def test_cdan_entropy_weights():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # H = -sum p log(p + 1e-5), so exp(-H) = prod (p + 1e-5)^p: 0.50001 and 1.00001
    close(entropy(probs), [-math.log(0.50001), -math.log(1.00001)])
    w = [1 + 0.50001, 1 + 1.00001]
    close(entropy_weights(probs), [2 * w[0] / sum(w), 2 * w[1] / sum(w)])


class _FixedDiscriminator(nn.Module):
    """Returns fixed probabilities (kept connected to the input), and records the input's shape."""

    def __init__(self, probs):
        super().__init__()
        self.probs = torch.tensor(probs)
        self.seen = None

    def forward(self, h):
        self.seen = tuple(h.shape)
        return h.sum(dim=1, keepdim=True) * 0.0 + self.probs


@pytest.mark.parametrize("entropy_conditioning", [False, True], ids=["cdan", "cdan+e"])
def test_cdan_loss_on_fixed_discriminator_outputs(entropy_conditioning):
    discriminator = _FixedDiscriminator([[0.8], [0.4]])
    loss_fn = ConditionalDomainAdversarialLoss(discriminator, entropy_conditioning=entropy_conditioning)
    g_s, g_t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # softmax: (.5, .5), (.75, .25)
    f_s, f_t = torch.randn(1, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)
    loss, domain_acc = loss_fn(g_s, f_s, g_t, f_t)
    assert discriminator.seen == (2, 6)
    bce = [-math.log(0.8), -math.log(1 - 0.4)]  # source label 1, target label 0
    if entropy_conditioning:
        w = [1 + 0.50001, 1 + 0.75001 ** 0.75 * 0.25001 ** 0.25]
        w = [2 * wi / sum(w) for wi in w]
    else:
        w = [1.0, 1.0]
    close(loss, (w[0] * bce[0] + w[1] * bce[1]) / 2)
    close(domain_acc, 100.0)


# ---------------------------------------------------------------- MDD


def test_shift_log():
    close(shift_log(torch.tensor([1.0, 0.0, 0.5])), [0.0, math.log(1e-6), math.log(0.5 + 1e-6)])


def test_mdd_discrepancy_on_fixed_logits():
    y_s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])  # main head predicts 0, 2
    y_s_adv = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y_t = torch.tensor([[0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])  # main head predicts 1, 0
    y_t_adv = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0]])  # softmax: (1/3, 1/3, 1/3), (.6, .2, .2)
    lse = math.log(math.e + 2)  # logsumexp of (1, 0, 0)
    ce_s = [lse - 1.0, lse - 0.0]  # CE(adv_s, pred_s)
    log_t = [math.log(1 - 1 / 3 + 1e-6), math.log(1 - 0.6 + 1e-6)]  # log(1 - p_adv_t[pred_t] + 1e-6)
    expected = -4.0 * sum(ce_s) / 2 + sum(log_t) / 2
    mdd = ClassificationMarginDisparityDiscrepancy(margin=4.0)
    close(mdd(y_s, y_s_adv, y_t, y_t_adv), expected)
    per_sample = ClassificationMarginDisparityDiscrepancy(margin=4.0, reduction="none")(y_s, y_s_adv, y_t, y_t_adv)
    close(per_sample, [-4.0 * ce_s[0] + log_t[0], -4.0 * ce_s[1] + log_t[1]])
    close(ClassificationMarginDisparityDiscrepancy(margin=1.0)(y_s, y_s_adv, y_t, y_t_adv),
          -sum(ce_s) / 2 + sum(log_t) / 2)


def test_mdd_classifier_layout_is_tllibs():
    """tllib's MDD ImageClassifier: Linear(N(0, .005), bias .1)-BN-ReLU-Dropout(.5) bottleneck, then a
    Linear-ReLU-Dropout(.5)-Linear head (N(0, .01), biases 0) as wide as the bottleneck; dropout only in training."""
    torch.manual_seed(0)
    model = ImageClassifier(DigitsCNN(), 10, bottleneck_dim=512, layout="mdd")
    kinds = [type(m) for m in model.bottleneck], [type(m) for m in model.head]
    assert kinds == ([nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout], [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear])
    linear, first, last = model.bottleneck[0], model.head[0], model.head[3]
    assert model.bottleneck[3].p == 0.5 and model.head[2].p == 0.5
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (512, 512, 512, 10)
    assert torch.all(linear.bias == 0.1) and torch.all(first.bias == 0) and torch.all(last.bias == 0)
    for layer, std in ((linear, 0.005), (first, 0.01), (last, 0.01)):
        assert abs(layer.weight.std().item() - std) < 0.1 * std and abs(layer.weight.mean().item()) < 0.1 * std
    x = torch.rand(8, 1, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    _, features = model(x, return_features=True)
    assert (features == 0).float().mean() > 0.4  # half the ReLU outputs dropped on top of the ReLU's own zeros
    heads = [g["params"] for g in model.param_groups(0.01)]
    assert sum(p.numel() for group in heads for p in group) == sum(p.numel() for p in model.parameters())
    # the standard layout is untouched: Linear-BN-ReLU and a linear head
    standard = ImageClassifier(DigitsCNN(), 10, bottleneck_dim=32)
    assert [type(m) for m in standard.bottleneck] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert isinstance(standard.head, nn.Linear)


def test_mdd_layout_errors_and_adversarial_head_width():
    with pytest.raises(ValueError, match="unknown classifier layout 'tllib'; choose one of standard, mdd"):
        ImageClassifier(DigitsCNN(), 10, layout="tllib")
    with pytest.raises(ValueError, match="'mdd' classifier layout needs a bottleneck"):
        ImageClassifier(DigitsCNN(), 10, bottleneck_dim=0, layout="mdd")
    method = create_method("mdd", ImageClassifier(DigitsCNN(), 10, bottleneck_dim=48, layout="mdd"))
    assert method.adv_head[0].out_features == 48  # tllib's script: the heads as wide as the bottleneck
    narrow = create_method("mdd", ImageClassifier(DigitsCNN(), 10, bottleneck_dim=48), width=20)
    assert narrow.adv_head[0].out_features == 20


# ---------------------------------------------------------------- the methods on a toy model

CASES = {
    "source-only": ("source-only", {}),
    "dann": ("dann", {}),
    "cdan": ("cdan", {}),
    "cdan+e": ("cdan", {"entropy_conditioning": True}),
    "cdan-randomized": ("cdan", {"randomized": True, "randomized_dim": 64}),
    "mdd": ("mdd", {"width": 64}),
}
ADVERSARIAL = [k for k in CASES if k != "source-only"]


def make_method(case, seed=0, **options):
    name, defaults = CASES[case]
    torch.manual_seed(seed)
    return create_method(name, ImageClassifier(DigitsCNN(), 10, bottleneck_dim=32), **{**defaults, **options})


def batch(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.rand(n, 1, 16, 16, generator=g))


def own_parameters(method):
    return [p for name, p in method.named_parameters() if not name.startswith("model.")]


def set_grl_counters(method, value):
    for module in method.modules():
        if isinstance(module, WarmStartGradientReverseLayer):
            module.iter_num.fill_(value)


def test_registry_and_unknown_name():
    assert set(METHODS) == {"source-only", "dann", "cdan", "mdd"}
    assert all(issubclass(cls, UDAMethod) and cls.name == name for name, cls in METHODS.items())
    model = ImageClassifier(DigitsCNN(), 10, bottleneck_dim=32)
    with pytest.raises(ValueError, match="unknown UDA method 'dan'.*cdan, dann, mdd, source-only"):
        create_method("dan", model)
    with pytest.raises(TypeError):
        create_method("dann", model, margin=4.0)  # an option of another method is an error, not ignored


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_keys_finite_detached(case):
    method = make_method(case)
    out = method.training_step(*batch())
    required = {"loss", "cls_loss", "transfer_loss", "cls_acc"}
    assert required <= set(out)
    if case != "source-only":
        assert "grl_coeff" in out and ("mdd" in out if case == "mdd" else "domain_acc" in out)
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
        assert value.requires_grad == (key == "loss"), key
    close(out["loss"].detach(), out["cls_loss"] + method.trade_off * out["transfer_loss"])
    if case == "mdd":
        close(out["transfer_loss"], -out["mdd"])


def test_source_only_ignores_target():
    x_s, y_s, x_t = batch()
    a = make_method("source-only").training_step(x_s, y_s, x_t)
    b = make_method("source-only").training_step(x_s, y_s, torch.rand(7, 1, 16, 16))
    assert torch.equal(a["loss"], b["loss"]) and float(a["transfer_loss"]) == 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_backbone_and_own_modules(case):
    method = make_method(case)
    set_grl_counters(method, 1000)  # lambda > 0, so the reversed gradient is not zero
    method.training_step(*batch())["loss"].backward()
    for part in (method.model.backbone, method.model.bottleneck, method.model.head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    for p in own_parameters(method):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("case", ADVERSARIAL)
def test_transfer_loss_reaches_backbone(case):
    """The adversarial term changes the backbone's gradient (through the reversal): trade_off 1 vs 0."""
    grads = []
    for trade_off in (1.0, 0.0):
        method = make_method(case, trade_off=trade_off)
        set_grl_counters(method, 1000)
        method.training_step(*batch())["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in method.model.backbone.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("case", list(CASES))
def test_param_groups_cover_every_parameter_once(case):
    method = make_method(case)
    groups = method.param_groups(0.01)
    seen = [p for g in groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(method.parameters()))
    assert all(g["lr"] == g["initial_lr"] for g in groups)
    backbone = {id(p) for p in method.model.backbone.parameters()}
    for g in groups:
        params = list(g["params"])
        assert g["lr"] == pytest.approx(0.001 if id(params[0]) in backbone else 0.01)
    assert (len(groups) == 4) == (case != "source-only")


@pytest.mark.parametrize("case", list(CASES))
def test_one_sgd_step_changes_parameters(case):
    method = make_method(case)
    optimizer = torch.optim.SGD(method.param_groups(0.1), lr=0.1, momentum=0.9)
    parts = {"backbone": method.model.backbone, "bottleneck": method.model.bottleneck, "head": method.model.head}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in parts.items()}
    own_before = [p.detach().clone() for p in own_parameters(method)]
    out = method.training_step(*batch())
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    for k, m in parts.items():
        assert any(not torch.equal(a, p) for a, p in zip(before[k], m.parameters())), k
    assert all(not torch.equal(a, p) for a, p in zip(own_before, own_parameters(method)))


@pytest.mark.parametrize("case", ADVERSARIAL)
def test_state_dict_resumes_bit_for_bit(case):
    """Two steps, a checkpoint round trip into a differently initialised method, then one more step on each."""
    method = make_method(case, seed=0)
    optimizer = torch.optim.SGD(method.param_groups(0.05), lr=0.05, momentum=0.9, nesterov=True)

    def step(m, opt, seed):
        torch.manual_seed(seed)  # dropout (MDD's adversarial head)
        out = m.training_step(*batch(seed))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        return out

    for seed in (1, 2):
        step(method, optimizer, seed)
    buffer = io.BytesIO()  # through bytes, as a checkpoint file: no tensor shared with the running method
    torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    state, opt_state = saved["method"], saved["optimizer"]
    counters = [k for k in state if k.endswith("iter_num")]
    assert counters and all(int(state[k]) == 2 for k in counters)
    resumed = make_method(case, seed=123)
    resumed.load_state_dict(state)
    resumed_opt = torch.optim.SGD(resumed.param_groups(0.05), lr=0.05, momentum=0.9, nesterov=True)
    resumed_opt.load_state_dict(opt_state)
    a, b = step(method, optimizer, 3), step(resumed, resumed_opt, 3)
    for key in a:
        assert torch.equal(a[key].detach(), b[key].detach()), key
    for (name, p), q in zip(method.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("case", ADVERSARIAL)
def test_training_step_under_bf16_autocast(case):
    method = make_method(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(*batch())
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()


def test_the_domain_loss_of_a_diverged_discriminator_is_nan_not_a_range_error():
    """NaN probabilities (a run whose lr made the discriminator diverge): the BCE kernel would raise "all elements
    of input should be between 0 and 1" before the training loop could name the iteration; now the loss is NaN."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    d_s, d_t, w_s = torch.rand(5, 1), torch.rand(3, 1), torch.rand(5)  # domain_bce computes in float32
    for args in ((d_s, d_t), (d_s, d_t, w_s)):
        leaves = [a.clone().requires_grad_() for a in args[:2]]
        got = domain_bce(*leaves, *args[2:])
        want_leaves = [a.clone().requires_grad_() for a in args[:2]]
        ws = args[2].view(-1, 1) if len(args) > 2 else None
        want = 0.5 * (F.binary_cross_entropy(want_leaves[0], torch.ones_like(d_s), weight=ws)
                      + F.binary_cross_entropy(want_leaves[1], torch.zeros_like(d_t)))
        assert torch.equal(got, want)
        for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, want_leaves)):
            assert torch.equal(g, w)
    d_s[2] = float("nan")
    assert torch.isnan(domain_bce(d_s, d_t))
    discriminator = nn.Sequential(nn.Linear(8 * 4, 1), nn.Sigmoid())
    nn.init.constant_(discriminator[0].weight, float("nan"))
    loss, _ = ConditionalDomainAdversarialLoss(discriminator)(torch.randn(3, 4), torch.randn(3, 8),
                                                               torch.randn(2, 4), torch.randn(2, 8))
    assert torch.isnan(loss)
