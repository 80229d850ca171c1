"""Attack throughput (images/s) of PGD-10 (L-inf) and PGD-L2-10: ours (``urda_fast.attacks``) against the textbook
eager loop (``urda_fast.attacks.reference``) and torchattacks, in the same run, on the digits CNN and ResNet-18.

``eager`` and torchattacks run the model with torch's own pooling and convolution modules, ours with urda_fast's
(``MaxPool2d``, ``FastConv2d``: same values and gradients, float rounding aside). No random start anywhere, so every
provider runs the same deterministic attack and the adversarial accuracy of ours must equal the eager loop's
(asserted; that is a correctness check, the speed is only recorded). ``ours_early_stop`` is our attack with
``early_stop=True`` (samples already misclassified stop being attacked, as in evaluation): less work than the others,
so its speed-up is the evaluation use case's, not a like-for-like one. ``ours_fold`` is our attack with
``fold_batchnorm=True`` (each conv -> BatchNorm pair run as one layer: the same function in eval mode; its adversarial
accuracy may differ from the eager loop's by at most one sample, where float rounding flips the sign of a near-zero
gradient component, and that is asserted). The models have random weights: their BatchNorm statistics are set from the
benchmark batch and the labels are the model's own clean predictions (clean accuracy 100%), and each budget is chosen
so that roughly half the samples survive, which makes the accuracy check meaningful. Throughput does not depend on the
budget. ``ours_amp`` (CUDA only) is ``ours`` under bf16 autocast with the model and images in channels_last, the GPU
report the issue asks for; its accuracy is recorded, not asserted (bf16 rounding changes the attack). ``eager_cl`` and
``ours_cl`` (CPU only) are the textbook loop and ours with the model and images in channels_last, float32: torch's
channels-last CPU kernels are vectorised where its NCHW pooling is not, so this shows what the layout alone buys
and what ours adds to it; their accuracy may differ from the NCHW eager loop's by one sample (the layouts' kernels
round differently), which is asserted.
"""

import copy
import functools
import sys
import time

import pytest
import torch
import torch.nn as nn

from urda_fast.attacks import PGD, PGDL2
from urda_fast.attacks.reference import textbook_attack
from urda_fast.models import ImageClassifier, create_backbone, plain_torch

pytestmark = pytest.mark.bench

try:
    import torchattacks
except ImportError:  # optional baseline
    torchattacks = None

STEPS = 10
# (backbone, images per attack batch x C x H x W). The digits CNN at the size the DART digits pipeline uses (16x16).
# The small batches keep the whole file under 2 minutes on 2 idle CPU cores (one attack call: ~0.3-0.6 s).
CASES = {"small": [("digits_cnn", (64, 1, 16, 16)), ("resnet18", (16, 3, 32, 32))],
         "large": [("digits_cnn", (256, 1, 16, 16)), ("resnet18", (128, 3, 32, 32)), ("resnet18", (16, 3, 224, 224))]}
# Budgets per (backbone, side) so that about half the samples survive PGD-10 on these random-weight models (small
# cases, CPU: 50-69% survive; the large batches calibrate BatchNorm on other images, so theirs may differ);
# alpha = eps / 4. A large image is broken by a far smaller L-inf budget than a small one.
EPS = {("digits_cnn", 16): {"linf": 0.5 / 255, "l2": 0.03}, ("resnet18", 32): {"linf": 0.05 / 255, "l2": 0.01},
       ("resnet18", 224): {"linf": 0.005 / 255, "l2": 0.006}}
PROVIDERS = (["eager", "ours", "ours_fold", "ours_early_stop", "ours_amp", "eager_cl", "ours_cl"]
             + (["torchattacks"] if torchattacks is not None else []))
# Each call is 10 forward+backward passes (~0.5 s on 2 idle CPU cores) and every non-eager round is paired with an
# eager one: a few rounds, not conftest's 10+.
TARGET_SECONDS, MIN_ROUNDS, MAX_ROUNDS = 1.0, 3, 20

_EAGER_ACCURACY = {}  # (backbone, shape, norm) -> adversarial accuracy of the eager loop, for ours' check


def pytest_generate_tests(metafunc):
    # Own parameter names: conftest's hook parametrizes "shape"/"provider" with the op benchmarks' values.
    if "case" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size") or ("large" if torch.cuda.is_available() else "small")
        cases = CASES[size]
        metafunc.parametrize("case", cases, ids=[f"{m}-{'x'.join(map(str, s))}" for m, s in cases])
        metafunc.parametrize("impl", PROVIDERS)


def _calibrate_batchnorm(model, images):
    """Running statistics = this batch's (one cumulative-average pass in train mode), so activations are normalised as
    in a trained model and the random-weight predictions vary across classes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    for m in norms:
        m.momentum = 0.1
    model.eval()


@functools.cache
def _setup(backbone, shape, device):
    torch.manual_seed(0)
    if backbone == "digits_cnn":
        model = ImageClassifier(create_backbone(backbone, in_channels=shape[1]), 10)
    else:
        model = ImageClassifier(create_backbone(backbone), 10, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = model.to(device)
    images = torch.rand(shape, device=device)
    _calibrate_batchnorm(model, images)
    with torch.no_grad():
        labels = model(images).argmax(1)
    return model, images, labels


_TWINS = {}


def _plain(model):
    """The model with torch's own pooling and convolution modules: what the plain-PyTorch baselines run (urda_fast's
    backbones use its own, which compute the same values and gradients)."""
    if ("plain", id(model)) not in _TWINS:
        _TWINS[("plain", id(model))] = plain_torch(copy.deepcopy(model))
    return _TWINS[("plain", id(model))]


def _channels_last(model):
    """A copy of ``model`` with its weights in channels_last (made once per model)."""
    if ("cl", id(model)) not in _TWINS:
        _TWINS[("cl", id(model))] = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return _TWINS[("cl", id(model))]


def _attack_fn(impl, model, images, labels, norm, eps, alpha):
    if impl in ("eager", "eager_cl"):
        plain = _plain(model) if impl == "eager" else _channels_last(_plain(model))
        x = images if impl == "eager" else images.contiguous(memory_format=torch.channels_last)
        return lambda: textbook_attack(plain, x, labels, eps=eps, alpha=alpha, steps=STEPS, norm=norm)
    if impl == "ours_cl":
        cls = PGD if norm == "linf" else PGDL2
        attack = cls(_channels_last(model), eps=eps, alpha=alpha, steps=STEPS, random_start=False)
        cl_images = images.contiguous(memory_format=torch.channels_last)
        return lambda: attack(cl_images, labels)
    if impl == "ours_amp":
        cls = PGD if norm == "linf" else PGDL2
        attack = cls(copy.deepcopy(model).to(memory_format=torch.channels_last), eps=eps, alpha=alpha, steps=STEPS,
                     random_start=False)
        cl_images = images.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return attack(cl_images, labels)

        return run
    if impl.startswith("ours"):
        cls = PGD if norm == "linf" else PGDL2
        attack = cls(model, eps=eps, alpha=alpha, steps=STEPS, random_start=False, early_stop=impl.endswith("stop"),
                     fold_batchnorm=impl == "ours_fold")
        return lambda: attack(images, labels)
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    attack = cls(_plain(model), eps=eps, alpha=alpha, steps=STEPS, random_start=False)
    return lambda: attack(images, labels)


def _accuracy(model, images, labels):
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack(bench, benchmark, norm, case, impl):
    if impl == "ours_amp" and bench.device.type != "cuda":
        pytest.skip("ours_amp (bf16 autocast + channels_last) is timed on CUDA only")
    if impl in ("eager_cl", "ours_cl") and bench.device.type != "cpu":
        pytest.skip(f"{impl} (float32 channels_last) is timed on CPU only; on a GPU ours_amp is the channels_last run")
    backbone, shape = case
    model, images, labels = _setup(backbone, shape, bench.device)
    eps = EPS[(backbone, shape[-1])][norm]
    attack = _attack_fn(impl, model, images, labels, norm, eps, eps / 4)
    conftest = sys.modules[type(bench).__module__]  # bench/conftest.py: synchronize
    benchmark.group = f"pgd_attack {norm}"  # one report table per norm; the case is backbone-shape

    # A first call (first-call allocations, oneDNN primitive caches) gives the rounds estimate (an overestimate, so at
    # worst fewer rounds) and the adversarial images: the attack is deterministic.
    start = time.perf_counter()
    adversarial = attack()
    conftest.synchronize()
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_SECONDS / (time.perf_counter() - start))))
    # Every round of a non-eager provider is paired with an eager round just before it (bench.run's paired ratio).
    eager = None if impl == "eager" else _attack_fn("eager", model, images, labels, norm, eps, eps / 4)
    adv_acc = _accuracy(model, adversarial, labels)
    if impl == "eager":
        _EAGER_ACCURACY[(backbone, shape, norm)] = adv_acc
    benchmark.extra_info.update(steps=STEPS, eps=eps, alpha=eps / 4, images=shape[0],
                                clean_acc=_accuracy(model, images, labels), adv_acc=adv_acc)
    if impl == "ours_amp":
        benchmark.extra_info["dtype"] = "bfloat16 autocast"

    if impl in ("ours", "ours_fold", "eager_cl", "ours_cl"):
        key = (backbone, shape, norm)
        if key not in _EAGER_ACCURACY:  # e.g. run with -k ours
            _EAGER_ACCURACY[key] = _accuracy(model, _attack_fn("eager", model, images, labels, norm, eps, eps / 4)(),
                                             labels)
        allowed = 0.0 if impl == "ours" else 1.0 / shape[0]
        assert abs(adv_acc - _EAGER_ACCURACY[key]) <= allowed + 1e-9, (
            f"adversarial accuracy of {impl} ({adv_acc}) differs from the textbook eager loop's ({_EAGER_ACCURACY[key]}) "
            f"on the same deterministic {norm} attack of {backbone} by more than {allowed}: a different attack "
            "(compare PGD/PGDL2 step by step with urda_fast.attacks.reference.textbook_attack) or, for the "
            "channels_last runs, a model that computes something else in that layout")
    # Timed after the accuracy check: a failing case must not reach the tables as a speed-up.
    bench.run(attack, op="pgd_attack", variant=norm, mode=backbone, shape=shape, provider=impl, images=shape[0],
              memory=True, paired=eager, rounds=rounds)

