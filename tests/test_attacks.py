"""Attacks: agreement with the textbook loop, real effect on a model trained here on real digits, invariants,
model state, errors, and the robust-accuracy table."""

import copy
import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ScalarReads

from urda_fast.attacks import BIM, FGSM, PGD, PGDL2
from urda_fast.attacks.reference import textbook_attack
from urda_fast.evaluate import robust_accuracy

EPS = 0.15  # in [0, 1] pixel units: enough to break an undefended 8x8-digits classifier (0.1 leaves ~47%)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 4 * 4, 10))


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 1,797 handwritten 8x8 digits (UCI), scaled to [0, 1]; a CNN trained on 1,400 of them."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = sklearn_datasets.load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=gen)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for batch in train[torch.randperm(len(train), generator=gen)].split(64):
            opt.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            opt.step()
    model.eval()
    return model, images[test][:256], labels[test][:256]


class DictModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"logits": self.model(x)}


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize(
    "make, norm, kwargs",
    [
        (lambda m: FGSM(m, eps=EPS), "linf", dict(eps=EPS, alpha=EPS, steps=1)),
        (lambda m: BIM(m, eps=EPS, alpha=0.02, steps=7), "linf", dict(eps=EPS, alpha=0.02, steps=7)),
        (lambda m: PGD(m, eps=EPS, alpha=0.02, steps=7, random_start=False), "linf", dict(eps=EPS, alpha=0.02, steps=7)),
        (lambda m: PGDL2(m, eps=1.0, alpha=0.25, steps=7, random_start=False), "l2", dict(eps=1.0, alpha=0.25, steps=7)),
    ],
    ids=["fgsm", "bim", "pgd", "pgdl2"],
)
def test_attack_matches_textbook_loop(digits, make, norm, kwargs):
    model, x, y = digits
    ours = make(model)(x, y)
    want = textbook_attack(model, x, y, norm=norm, **kwargs)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls, norm, eps", [(PGD, "linf", EPS), (PGDL2, "l2", 1.0)])
def test_random_start_matches_textbook_under_one_generator(digits, cls, norm, eps):
    model, x, y = digits
    ours = cls(model, eps=eps, alpha=eps / 4, steps=5, seed=7)(x, y)
    want = textbook_attack(model, x, y, eps=eps, alpha=eps / 4, steps=5, norm=norm, random_start=True,
                           generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    assert accuracy(model, ours, y) == accuracy(model, want, y)


@pytest.mark.parametrize("cls, eps", [(PGD, EPS), (PGDL2, 1.0)])
def test_restarts_give_the_same_examples_however_max_batch_groups_them(digits, cls, eps):
    """max_batch is a memory knob: one restart per chunk, two, or all three at once draw the same random starts (each
    restart its own noise, in turn) and so give the same examples. L2 drew directions for the whole chunk, then radii:
    other draws per chunking."""
    model, x, y = digits
    x, y = x[:40], y[:40]
    runs = [cls(model, eps=eps, alpha=eps / 4, steps=3, restarts=3, seed=5, max_batch=size)(x, y)
            for size in (None, 40, 80)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], atol=1e-6, rtol=0)
    # restart 0 starts where the single-restart attack with that seed does, so three break at least what it breaks
    single = cls(model, eps=eps, alpha=eps / 4, steps=3, seed=5)(x, y)
    assert accuracy(model, runs[0], y) <= accuracy(model, single, y)


def test_pgd_breaks_the_model_and_more_steps_never_help_it(digits):
    model, x, y = digits
    clean = accuracy(model, x, y)
    assert clean > 0.9
    accs = [accuracy(model, BIM(model, eps=EPS, alpha=EPS / 4, steps=k, early_stop=True)(x, y), y) for k in (1, 3, 10)]
    assert accs[-1] < 0.3 < clean
    assert accs == sorted(accs, reverse=True), accs
    strong = accuracy(model, PGD(model, eps=EPS, alpha=EPS / 4, steps=10, restarts=3, seed=0)(x, y), y)
    assert strong <= accs[-1] + 0.02


@pytest.mark.parametrize("make", [
    lambda m, **k: PGD(m, eps=EPS, alpha=EPS / 4, steps=10, seed=1, **k),
    lambda m, **k: PGD(m, eps=EPS / 2, alpha=EPS / 2, steps=8, random_start=False, loss="cw", **k),
    lambda m, **k: PGDL2(m, eps=1.0, alpha=0.5, steps=10, seed=2, **k),
    lambda m, **k: PGD(m, eps=EPS, alpha=EPS / 3, steps=6, restarts=2, seed=3, **k),
    lambda m, **k: BIM(m, eps=EPS / 2, alpha=EPS / 4, steps=5, **k),
], ids=["pgd", "pgd-cw", "pgdl2", "pgd-restarts", "bim"])
def test_early_stop_reports_the_full_attacks_accuracy_under_one_convention(digits, make):
    """Early stop computes keep_first_hit's examples (float64 model: no argmax flip from a batch-size-dependent
    reassociation); keep_first_hit breaks every sample the last iterate breaks."""
    model, x, y = digits
    model, x = copy.deepcopy(model).double(), x.double()
    early = make(model, early_stop=True)(x, y)
    first = make(model, keep_first_hit=True)(x, y)
    last = make(model)(x, y)
    torch.testing.assert_close(early, first, atol=1e-12, rtol=0)
    with torch.no_grad():
        broken = {name: model(adv).argmax(1) != y for name, adv in (("early", early), ("first", first), ("last", last))}
    assert torch.equal(broken["early"], broken["first"])
    assert bool((broken["first"] | ~broken["last"]).all()), "a sample broken at the last iterate was not kept broken"


def test_keep_first_hit_counts_samples_the_last_iterate_lets_go(digits):
    """Steps as large as the budget make samples cross the boundary and come back: the two conventions differ."""
    model, x, y = digits
    last, first = (PGD(model, eps=0.05, alpha=0.05, steps=10, random_start=False, keep_first_hit=keep)(x, y)
                   for keep in (False, True))
    assert accuracy(model, first, y) < accuracy(model, last, y)


def test_keep_first_hit_targeted_holds_samples_at_their_target(digits):
    model, x, y = digits
    target = (y + 1) % 10
    attack = PGD(model, eps=EPS, alpha=EPS / 4, steps=10, seed=0, keep_first_hit=True)
    adv = attack(x, target, targeted=True)
    early = PGD(model, eps=EPS, alpha=EPS / 4, steps=10, seed=0, early_stop=True)(x, target, targeted=True)
    torch.testing.assert_close(adv, early, atol=1e-6, rtol=0)
    last = PGD(model, eps=EPS, alpha=EPS / 4, steps=10, seed=0)(x, target, targeted=True)
    with torch.no_grad():
        reached, reached_last = model(adv).argmax(1) == target, model(last).argmax(1) == target
    assert bool((reached | ~reached_last).all()) and int(reached.sum()) > 0.3 * len(y)


@pytest.mark.parametrize("attack_cls, norm", [(PGD, "linf"), (PGDL2, "l2"), (FGSM, "linf"), (BIM, "linf")])
def test_budget_and_box_always_hold(digits, attack_cls, norm):
    model, x, y = digits
    eps = 1.0 if norm == "l2" else EPS
    adv = attack_cls(model, eps=eps)(x, y)
    assert adv.min() >= 0 and adv.max() <= 1
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5)


def test_normalized_space_respects_per_channel_range():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    pixels = torch.rand(6, 3, 8, 8)
    images = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    model(images)
    adv = PGD(model, eps=0.1, alpha=0.05, steps=5, space="normalized", mean=mean, std=std)(images, torch.arange(6) % 5)
    back = adv * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    assert float((adv - images).abs().max()) <= 0.1 + 1e-6


def _advertorch_bim(model, x, y, eps, alpha, steps, clip_min, clip_max):
    """advertorch's perturb_iterative for LinfBasicIterativeAttack (no random start, summed CE), written out in
    float64: the step on delta, delta kept in the eps-ball, then x + delta clipped to [clip_min, clip_max]."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += alpha * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(clip_min, clip_max) - x)
    return (x + delta).clamp(clip_min, clip_max).detach()


def test_clip_reproduces_an_attack_that_clips_normalised_images_to_0_1():
    """DART's code (advertorch, clip_min=0, clip_max=1 on normalised images): the same iterates, though the clean
    images lie outside [0, 1] and the clip moves them far beyond eps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double().eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    images = (pixels - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    labels = torch.arange(6) % 5
    ours = PGD(model, eps=0.1, alpha=0.05, steps=4, random_start=False, space="normalized", mean=mean, std=std,
               clip=(0, 1))(images, labels)
    want = _advertorch_bim(model, images, labels, 0.1, 0.05, 4, 0.0, 1.0)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)
    assert ours.min() >= 0 and ours.max() <= 1 and float((ours - images).abs().max()) > 1.0  # far beyond eps
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images contain NaN"):
        PGD(model, eps=0.1, alpha=0.05, steps=1, space="normalized", mean=mean, std=std, clip=(0, 1))(bad, labels)
    with pytest.raises(ValueError, match=r"clip must be \(lower, upper\) with lower < upper"):
        PGD(model, eps=0.1, alpha=0.05, clip=(1, 0))


def test_targeted_attack_reaches_its_targets(digits):
    model, x, y = digits
    targets = (y + 1) % 10
    adv = PGD(model, eps=0.2, alpha=0.02, steps=20, seed=0)(x, targets, targeted=True)
    assert accuracy(model, adv, targets) > 0.5  # chance is 0.1


def test_kl_attack_moves_the_student_away_from_soft_targets(digits):
    model, x, y = digits
    with torch.no_grad():
        teacher_logits = model(x)
    # Soft targets equal to the model's own output make the KL gradient exactly 0 at x: it needs the random start.
    still = BIM(model, eps=EPS, alpha=EPS / 4, steps=10, loss="kl")(x, soft_targets=teacher_logits)
    torch.testing.assert_close(still, x, atol=0, rtol=0)
    adv = PGD(model, eps=EPS, alpha=EPS / 4, steps=10, loss="kl", temperature=2.0, seed=0)(x, soft_targets=teacher_logits)
    assert accuracy(model, adv, teacher_logits.argmax(1)) < 0.5


def test_targeted_kl_attack_pulls_the_student_to_the_soft_targets(digits):
    """Targeted, the KL attack descends the KL: towards other soft targets, and early stop counts reaching them."""
    model, x, y = digits
    targets = (y + 1) % 10
    soft = F.one_hot(targets, 10).float() * 20  # confident teachers for the next class
    for early_stop in (False, True):
        adv = PGD(model, eps=0.2, alpha=0.02, steps=20, loss="kl", seed=0, early_stop=early_stop)(
            x, soft_targets=soft, targeted=True)
        assert accuracy(model, adv, targets) > 0.5  # chance is 0.1


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_give_the_int64_result(digits, dtype):
    model, x, y = digits
    for loss in ("ce", "cw"):
        want = PGD(model, eps=EPS, steps=3, loss=loss, seed=0)(x[:16], y[:16])
        torch.testing.assert_close(PGD(model, eps=EPS, steps=3, loss=loss, seed=0)(x[:16], y[:16].to(dtype)), want)


def test_cw_loss_attack_breaks_the_model(digits):
    model, x, y = digits
    adv = PGD(model, eps=EPS, alpha=EPS / 4, steps=10, loss="cw", kappa=5.0, seed=0)(x, y)
    assert accuracy(model, adv, y) < 0.3


def test_model_state_is_untouched(digits):
    model, x, y = digits
    model.train()
    model[1].eval()  # a module in a different mode than its parent must keep it
    model[0].weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        PGD(model, eps=EPS, steps=3)(x[:32], y[:32])
        assert model.training and not model[1].training and model[2].training
        assert not model[0].weight.requires_grad and model[4].weight.requires_grad
        assert all(p.grad is None for p in model.parameters())
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)
        with pytest.raises(ValueError):
            PGD(model, eps=EPS)(x[:4], torch.tensor([0, 1, 2, 99]))
        assert model.training and not model[1].training
    finally:
        model[0].weight.requires_grad_(True)
        model.eval()


def test_seed_makes_attacks_deterministic(digits):
    model, x, y = digits
    a = PGD(model, eps=EPS, steps=3, seed=11)(x[:32], y[:32])
    b = PGD(model, eps=EPS, steps=3, seed=11)(x[:32], y[:32])
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_autocast_and_channels_last_inputs(digits):
    model, x, y = digits
    adv = PGD(model, eps=EPS, steps=3, seed=0)(x.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(adv, PGD(model, eps=EPS, steps=3, seed=0)(x, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv_bf16 = PGD(model, eps=EPS, alpha=EPS / 4, steps=5, seed=0)(x, y)
    assert adv_bf16.dtype == x.dtype and float((adv_bf16 - x).abs().max()) <= EPS + 1e-6
    assert accuracy(model, adv_bf16, y) < 0.5


def test_l2_steps_are_whole_for_a_confidently_classified_sample():
    """At a logit gap of 40 the input gradient's norm is 4e-16: the L2 step's 1e-12 floor made its steps 4e-4 of the
    step size, and the sample looked robust (gradient masking). Its direction is what the step takes, whole."""
    torch.manual_seed(0)
    direction = torch.ones(12) / 12 ** 0.5
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():  # logits +-100 (u.x - c): a gap of 40 at x = 0.5, flipped 0.5 along -u
        model[1].weight.copy_(torch.stack([direction, -direction]) * 100)
        c = 0.5 * 12 ** 0.5 - 0.2
        model[1].bias.copy_(torch.tensor([-100 * c, 100 * c]))
    x = torch.full((4, 3, 2, 2), 0.5) + torch.randn(4, 3, 2, 2) * 1e-3
    y = torch.zeros(4, dtype=torch.long)
    assert (model(x).argmax(1) == 0).all()
    adv = PGDL2(model, eps=0.5, alpha=0.1, steps=10, random_start=False)(x, y)
    assert (model(adv).argmax(1) == 1).all()
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attack, eps", [(PGD, 1 / 255), (PGD, 8 / 255), (PGDL2, 0.1)])
def test_half_precision_images_stay_inside_the_budget(dtype, attack, eps):
    """The step rounds the projected point to the images' dtype: bfloat16 images at 1/255 reached 1.49 eps, an
    L2 budget 1.06 eps, before the rounding went towards the clean image where it crossed the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).to(dtype)
    x, y = torch.rand(64, 3, 16, 16).to(dtype), torch.randint(0, 10, (64,))
    adv = attack(model, eps=eps, alpha=eps / 2, steps=4, seed=0)(x, y)
    delta = adv.double() - x.double()
    size = delta.abs().amax() if attack is PGD else delta.flatten(1).norm(dim=1).max()
    assert adv.dtype == dtype and 0.95 * eps < float(size) <= eps and 0 <= adv.min() and adv.max() <= 1
    if attack is PGD:  # (an L2 step of 0.1 over 768 pixels moves many by less than half a bfloat16 unit)
        assert float((delta != 0).double().mean()) > 0.99  # every pixel still moves
    # clip: clean values outside it are farther than eps from any valid point; the box wins, as in the step (moving
    # them towards the clean image put them one unit past the clip bound)
    wide = (torch.rand(64, 3, 16, 16) * 3 - 1).to(dtype)
    adv = attack(model, eps=eps, alpha=eps / 2, steps=4, seed=0, clip=(0.0, 1.0))(wide, y)
    assert float(adv.min()) == 0.0 and float(adv.max()) == 1.0


@pytest.mark.parametrize(
    "make, call, match",
    [
        (lambda m: PGD(m, eps=0.0), None, "eps must be > 0"),
        (lambda m: PGD(m, eps=-1.0), None, "eps must be > 0"),
        (lambda m: PGD(m, steps=0), None, "steps must be an integer >= 1"),
        (lambda m: PGD(m, loss="hinge"), None, "loss must be one of"),
        (lambda m: PGD(m, loss="kl", temperature=1e9), None, r"temperature must be in \[1e-06, 1e\+06\]"),
        (lambda m: PGD(m, space="normalized"), None, "needs the mean and std"),
        (lambda m: PGD(m), lambda a, x, y: a(x * 2 + 0.5, y), "must lie in"),
        (lambda m: PGD(m), lambda a, x, y: a(x, y[:-1]), "labels have shape"),
        (lambda m: PGD(m), lambda a, x, y: a(x, y + 10), r"labels must lie in \[0, 10\)"),
        (lambda m: PGD(m), lambda a, x, y: a(x, y.float()), "labels must be an integer tensor"),
        (lambda m: PGD(m, loss="kl"), lambda a, x, y: a(x, y), "needs soft_targets"),
        (lambda m: PGD(m), lambda a, x, y: a(x.masked_fill(x > 0.5, float("nan")), y), "images contain NaN"),
        (lambda m: PGD(lambda t: m(t)), None, "model must be a torch.nn.Module .* got function"),
        (lambda m: PGD(m, random_start="yes"), None, "random_start must be True or False"),
        (lambda m: PGD(m, max_batch=0), None, "max_batch must be None or an integer >= 1"),
        (lambda m: PGD(m, seed="a"), None, "seed must be None or an integer"),
        (lambda m: PGD(DictModel(m)), lambda a, x, y: a(x, y), "must return logits .* got dict"),
        (lambda m: PGD(nn.Sequential(m, nn.Flatten(0))), lambda a, x, y: a(x, y),
         r"must return \(batch, classes\) logits, got shape \(80,\)"),
        (lambda m: PGD(m, alpha=float("inf")), None, "alpha must be finite"),
    ],
)
def test_bad_input_is_rejected_before_any_work(digits, make, call, match):
    model, x, y = digits
    with pytest.raises((ValueError, TypeError), match=match):
        attack = make(model)
        call(attack, x[:8], y[:8])


def test_robust_accuracy_table(digits, tmp_path):
    model, x, y = digits
    loader = list(zip(x.split(64), y.split(64)))
    attacks = {"clean": None, "FGSM": FGSM(model, eps=EPS), "PGD-10": PGD(model, eps=EPS, alpha=EPS / 4, seed=0)}
    paths = [str(tmp_path / f"table.{ext}") for ext in ("csv", "json", "md")]
    table = robust_accuracy(model, loader, attacks, progress=False, save=paths)
    assert [r.attack for r in table.rows] == ["clean", "FGSM", "PGD-10"]
    assert table["clean"].count == len(y)
    assert table["clean"].accuracy == pytest.approx(100 * accuracy(model, x, y))
    assert table["PGD-10"].accuracy <= table["FGSM"].accuracy < table["clean"].accuracy
    assert robust_accuracy(model, loader, {"clean": None}, device="cpu", progress=False, save=str(tmp_path / "c.md"))[
        "clean"].accuracy == table["clean"].accuracy  # a device name, one path
    assert (tmp_path / "c.md").exists()
    with pytest.raises(KeyError, match=r"'PGD-20': the table has \['clean', 'FGSM', 'PGD-10'"):
        table["PGD-20"]
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["rows"][2]["attack"] == "PGD-10"
    assert (tmp_path / "table.csv").read_text().startswith("attack,accuracy")
    assert "| PGD-10 |" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("batches, attacks, error, match", [
    ("dicts", {"clean": None}, ValueError, r"\(images, labels\) pairs of tensors, got a dict with keys \['image'"),
    ("triples", {"clean": None}, ValueError, "got a tuple of 3 items"),
    ("none", {"clean": None}, ValueError, "yielded no images"),  # not a row of 0% accuracy
    ("pairs", {"PGD": 10}, TypeError, r"attacks\['PGD'\] must be None .* got int"),
    ("column labels", {"clean": None}, ValueError, r"labels must have shape \(batch,\) = \(8,\), got \(8, 1\)"),
    ("float labels", {"clean": None}, TypeError, "labels must be integer class indices"),
    ("pairs", {1: None}, TypeError, "attack names .* must be strings, got 1"),
    ("only empty batches", {"clean": None}, ValueError, "yielded no images"),
])
def test_robust_accuracy_names_bad_loaders_and_attacks(digits, batches, attacks, error, match):
    model, x, y = digits
    loader = {"dicts": [{"image": x[:8], "label": y[:8]}], "triples": [(x[:8], y[:8], y[:8])], "none": [],
              "pairs": [(x[:8], y[:8])], "column labels": [(x[:8], y[:8, None])],
              "float labels": [(x[:8], y[:8].float())], "only empty batches": [(x[:0], y[:0])] * 2}[batches]
    with pytest.raises(error, match=match):
        robust_accuracy(model, loader, attacks, progress=False)


def test_robust_accuracy_refuses_an_unknown_table_format_before_any_work(digits, tmp_path):
    model, x, y = digits
    with pytest.raises(ValueError, match=r"unknown table format '.txt'"):
        robust_accuracy(model, [(x[:8], y[:8])], {"boom": lambda *a: pytest.fail("evaluated first")}, progress=False,
                        save=(str(tmp_path / "t.md"), str(tmp_path / "t.txt")))
    assert not list(tmp_path.iterdir())


def test_robust_accuracy_of_a_model_without_parameters_needs_a_device():
    with pytest.raises(ValueError, match="no parameters or buffers .* device="):
        robust_accuracy(nn.Flatten(), [(torch.rand(2, 4), torch.zeros(2, dtype=torch.long))], {"clean": None},
                        progress=False)


def test_pgd_matches_torchattacks(digits):
    """Same adversarial examples as torchattacks' PGD (no random start) for the same settings."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    theirs = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=5, random_start=False)(x, y)
    ours = PGD(model, eps=EPS, alpha=EPS / 4, steps=5, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["FGSM", "BIM", "PGDL2"])
def test_fgsm_bim_and_l2_pgd_match_torchattacks(digits, name):
    """torchattacks' FGSM, BIM (I-FGSM) and PGD-L2 (no random start) give the same adversarial examples. Its PGD-L2
    divides the batch-mean CE gradient by its norm + 1e-10, which shortens the steps of confidently classified samples
    (their mean gradient is small: 8% shorter at a summed-gradient norm of 3e-7 in this batch of 256) and makes the
    step depend on the batch size; ours normalises exactly, so the comparison sets that term to 1e-30."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    settings = {"FGSM": dict(eps=EPS), "BIM": dict(eps=EPS, alpha=EPS / 4, steps=5),
                "PGDL2": dict(eps=1.0, alpha=0.25, steps=5, random_start=False)}[name]
    attack = getattr(torchattacks, name)(model, **settings)
    if name == "PGDL2":
        attack.eps_for_division = 1e-30
    theirs = attack(x, y)
    ours = {"FGSM": FGSM, "BIM": BIM, "PGDL2": PGDL2}[name](model, **settings)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert float((ours - x).abs().max()) > 0.01  # the attack moved the images


def test_autoattack_adapter_runs_or_says_how_to_install(digits, monkeypatch):
    from urda_fast.attacks import AutoAttack, autoattack

    model, x, y = digits
    if autoattack.autoattack_backend() is None:
        with pytest.raises(ImportError, match="pip install"):
            AutoAttack(model, eps=EPS)
        return
    adv = AutoAttack(model, eps=EPS, num_classes=10)(x[:16], y[:16])
    assert not adv.requires_grad
    assert float((adv - x[:16]).abs().max()) <= EPS + 1e-6
    assert accuracy(model, adv, y[:16]) <= accuracy(model, x[:16], y[:16])
    monkeypatch.setattr(autoattack, "autoattack_backend", lambda: None)
    with pytest.raises(ImportError, match="pip install"):
        AutoAttack(model, eps=EPS)


@pytest.mark.parametrize("space, keep_first_hit", [("pixel", False), ("normalized", False), ("pixel", True)])
def test_attack_steps_read_no_tensor_values(digits, space, keep_first_hit):
    """Input checks read values once per call; the steps themselves never do (no host sync per step on a GPU), so
    the count does not grow with the number of steps; holding broken samples in place does not add one."""
    model, x, y = digits
    stats = dict(space="normalized", mean=torch.tensor([0.3]), std=torch.tensor([0.4])) if space == "normalized" else {}
    norm_model = nn.Sequential(nn.Identity(), model) if space == "pixel" else model
    images = x[:32] if space == "pixel" else (x[:32] - 0.3) / 0.4
    counts = []
    for steps in (2, 8):
        attack = PGD(norm_model, eps=EPS, alpha=0.02, steps=steps, seed=0, fold_batchnorm=False,
                     keep_first_hit=keep_first_hit, **stats)
        with ScalarReads() as reads:
            attack(images, y[:32])
        counts.append(reads.count)
    assert counts[0] == counts[1], counts


def test_non_finite_loss_is_a_clear_error(digits):
    model, x, y = digits
    nan_model = nn.Sequential(model, nn.Threshold(float("inf"), float("nan")))  # every logit becomes NaN
    with pytest.raises(FloatingPointError, match="not finite during the attack"):
        PGD(nan_model, eps=EPS, alpha=0.02, steps=3)(x[:8], y[:8])


def test_inference_mode_is_named_and_no_grad_is_fine(digits):
    model, x, y = digits
    attack = PGD(model, eps=EPS, alpha=0.02, steps=2, random_start=False)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch\.inference_mode\(\)"):
        attack(x[:8], y[:8])
    with torch.no_grad():
        inside = attack(x[:8], y[:8])
    assert torch.equal(inside, attack(x[:8], y[:8])) and (inside != x[:8]).any()


class _NanGradientAt(torch.autograd.Function):
    """Identity forward; a NaN input gradient for sample 0 in backward (finite logits and loss throughout)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[0] = float("nan")
        return grad


def test_non_finite_input_gradient_at_the_last_l2_step_is_a_clear_error(digits):
    model, x, y = digits

    class NanGradient(nn.Module):
        def forward(self, t):
            return model(_NanGradientAt.apply(t))

    with pytest.raises(FloatingPointError, match="loss or input gradient was not finite"):
        PGDL2(NanGradient(), eps=1.0, alpha=0.25, steps=1, random_start=False)(x[:8], y[:8])


@pytest.mark.parametrize("classes, targets", [(10, 9), (200, 9), (4, 3)])
def test_autoattack_port_is_the_standard_suite(classes, targets):
    """torchattacks' AutoAttack leaves APGD / APGD-T / FAB-T at 10 steps (the standard suite runs 100) and attacks
    num_classes - 1 targets (the standard suite 9): the adapter builds the suite with the authors' settings."""
    from urda_fast.attacks import AutoAttack, autoattack

    if autoattack.autoattack_backend() != "torchattacks":
        pytest.skip("checks torchattacks' port, which the authors' package (installed) takes precedence over")
    suite = AutoAttack(nn.Linear(4, classes), eps=EPS, num_classes=classes)._attack.attacks
    assert [type(a).__name__ for a in suite] == ["APGD", "APGDT", "FAB", "Square"]
    assert [getattr(a, "steps", None) for a in suite[:3]] == [100, 100, 100] and suite[3].n_queries == 5000
    assert suite[1].n_target_classes == targets and suite[2].n_target_classes == targets


@pytest.mark.parametrize("classes", [2, 3])
def test_autoattack_port_runs_on_two_and_three_classes(classes):
    """APGD-T's targeted DLR loss ranks four classes (an IndexError after APGD-CE, on the samples it left): below four
    the suite runs without it, and says so. PCAM, of HPT's evaluation sets, has two."""
    from urda_fast.attacks import AutoAttack, autoattack

    if autoattack.autoattack_backend() != "torchattacks":
        pytest.skip("checks torchattacks' port, which the authors' package (installed) takes precedence over")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, classes)).eval()
    x = torch.rand(8, 3, 2, 2)
    y = model(x).argmax(1)
    with pytest.warns(UserWarning, match=f"without APGD-T on a {classes}-class model"):
        attack = AutoAttack(model, eps=0.02, num_classes=classes)
    assert [type(a).__name__ for a in attack._attack.attacks] == ["APGD", "FAB", "Square"]
    adv = attack(x, y)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 0.02 + 1e-6


def test_autoattack_authors_package_is_set_up_for_the_models_device_and_classes(monkeypatch):
    """The authors' AutoAttack defaults to device='cuda' and its standard version attacks 9 target classes (an
    IndexError below ten): the adapter passes the model's device and at most num_classes - 1 targets. A stand-in for
    the package (not installable from PyPI) records what it is given."""
    import types

    from urda_fast.attacks import AutoAttack, autoattack

    class Official:
        def __init__(self, model, norm, eps, version, seed, verbose, device):
            self.device = device
            self.apgd_targeted, self.fab = types.SimpleNamespace(n_target_classes=9), types.SimpleNamespace()
            self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=Official))
    monkeypatch.setattr(autoattack, "autoattack_backend", lambda: "autoattack")
    suite = AutoAttack(nn.Linear(4, 6), eps=EPS, num_classes=6)._attack
    assert suite.device == torch.device("cpu") and suite.attacks_to_run[1] == "apgd-t"
    assert suite.apgd_targeted.n_target_classes == suite.fab.n_target_classes == 5
    with pytest.warns(UserWarning, match="without APGD-T"):
        suite = AutoAttack(nn.Linear(4, 2), eps=EPS, num_classes=2)._attack
    assert suite.attacks_to_run == ["apgd-ce", "fab-t", "square"] and suite.fab.n_target_classes == 1


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), True])
def test_autoattack_refuses_a_bad_budget(eps):
    from urda_fast.attacks import AutoAttack, autoattack

    if autoattack.autoattack_backend() is None:
        pytest.skip("no AutoAttack implementation installed (its absence is tested above)")
    with pytest.raises(ValueError, match="eps must be positive"):
        AutoAttack(nn.Linear(4, 3), eps=eps, num_classes=3)


@pytest.mark.parametrize("cls, option", [(FGSM, "random_start"), (FGSM, "steps"), (BIM, "random_start")])
def test_options_an_attack_fixes_are_refused_by_name(cls, option):
    with pytest.raises(TypeError, match=f"takes no {option}"):
        cls(nn.Linear(2, 2), eps=0.1, **{option: True if option == "random_start" else 3})


def test_robust_accuracy_max_batches_zero_means_all(digits):
    model, x, y = digits
    loader = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50)]
    table = robust_accuracy(model, loader, {"clean": None}, max_batches=0, progress=False)
    assert table["clean"].count == 200
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_batches must be None or an integer >= 0"):
            robust_accuracy(model, loader, {"clean": None}, max_batches=bad, progress=False)


def test_robust_accuracy_skips_empty_batches(digits):
    """A filtered loader's empty batch is neither attacked nor counted (its progress figure divided by zero)."""
    model, x, y = digits
    attacks = {"clean": None, "PGD": PGD(model, eps=EPS, alpha=EPS / 4, steps=3, seed=0)}
    with_empty = robust_accuracy(model, [(x[:0], y[:0]), (x[:40], y[:40]), (x[:0], y[:0])], attacks, progress=True)
    plain = robust_accuracy(model, [(x[:40], y[:40])], attacks, progress=False)
    assert [(r.correct, r.count) for r in with_empty.rows] == [(r.correct, r.count) for r in plain.rows]


def test_nan_logits_are_an_error_not_predictions(digits):
    """NaN logits have an argmax (torch puts NaN first), which would count as predictions: plausible accuracies."""
    model, x, y = digits
    broken = copy.deepcopy(model)
    next(broken.parameters()).data.view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match="logits contain NaN \\(on the clean images\\)"):
        robust_accuracy(broken, [(x[:8], y[:8])], {"clean": None}, progress=False)
    masked = nn.Sequential(model, MaskLastClass())  # -inf logits are fine: masked classes
    assert robust_accuracy(masked, [(x[:8], y[:8])], {"clean": None}, progress=False)["clean"].count == 8


class MaskLastClass(nn.Module):
    def forward(self, logits):
        return logits.index_fill(1, torch.tensor([logits.shape[1] - 1]), float("-inf"))


def test_int8_labels_are_class_indices(digits):
    model, x, y = digits
    attack = PGD(model, eps=EPS, alpha=EPS / 4, steps=2, seed=0)
    torch.testing.assert_close(attack(x[:8], y[:8].to(torch.int8)), attack(x[:8], y[:8]))


@pytest.mark.parametrize("options, call, match", [
    (dict(steps=True), {}, "steps must be an integer"),
    (dict(restarts=3, random_start=False), {}, "without a random start"),
    (dict(loss="kl"), dict(labels=torch.tensor([0.5, 1.5]), soft_targets=torch.zeros(2, 3)), "integer tensor"),
    (dict(loss="kl"), dict(soft_targets=[[0.0, 1.0, 2.0]] * 2), "soft_targets"),
    ({}, dict(labels=torch.tensor([0, 1]), generator="seed 3"), "torch.Generator"),
])
def test_more_bad_arguments_are_named(options, call, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises((TypeError, ValueError), match=match):
        attack = PGD(model, eps=0.1, alpha=0.05, **{"steps": 2, **options})
        labels = call.pop("labels", None)
        attack(torch.rand(2, 1, 2, 2), labels, **call)
