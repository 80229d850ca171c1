"""HPT-GPD: losses against methods.md written out in float64, the GPD schedule, zero-shot text caching, clear errors,
every command on a tiny embedded world, and resume-after-kill."""

import importlib
import json
import math
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import hpt_train_config

from urda_fast.cli import main
from urda_fast.hpt import losses
from urda_fast.hpt.clip_models import load_clip, parse_model_arg
from urda_fast.hpt.schedule import GPDSchedule
from urda_fast.hpt.zero_shot import ZeroShotClassifier


def kl_sum(teacher, student):
    """methods.md: sum over the batch of KL(softmax(teacher) || softmax(student)), in float64."""
    p = torch.softmax(teacher.double(), 1)
    return (p * (p.log() - torch.log_softmax(student.double(), 1))).sum()


def _logits(b=6, c=5, scale=3.0, grad=True):
    return (torch.randn(b, c, dtype=torch.float64) * scale).requires_grad_(grad)


def _check(total, expected, inputs):
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(total, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_tecoa_loss_is_cross_entropy_on_adversarial_logits():
    adv, y = _logits(), torch.tensor([0, 1, 2, 3, 4, 0])
    total, parts = losses.tecoa_loss(adv, y)
    expected = -torch.log_softmax(adv, 1)[torch.arange(6), y].mean()
    _check(total, expected, (adv,))
    assert parts["ce_loss"] == pytest.approx(float(expected.detach()), rel=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_pmg_aft_loss_matches_methods_md(reduction):
    adv, clean, original = _logits(), _logits(), _logits(grad=False)
    y = torch.tensor([4, 3, 2, 1, 0, 0])
    total, parts = losses.pmg_aft_loss(adv, y, original, clean, original_weight=0.7, clean_weight=1.3,
                                       reduction=reduction)
    per = 1.0 if reduction == "sum" else 1 / 6
    # CE(adv) + KL(orig(adv) || target(adv)) + KL(target(clean) || target(adv)); both target sides are trained.
    expected = F.cross_entropy(adv, y) + 0.7 * per * kl_sum(original, adv) + 1.3 * per * kl_sum(clean, adv)
    _check(total, expected, (adv, clean))
    assert parts["clean_loss"] == pytest.approx(per * float(kl_sum(clean, adv).detach()), rel=1e-5)
    # the PMG-AFT code's direction: KLDivLoss(log_softmax(other), softmax(target(adv))) = KL(target(adv) || other)
    total, parts = losses.pmg_aft_loss(adv, y, original, clean, original_weight=0.7, clean_weight=1.3,
                                       reduction=reduction, direction="code")
    expected = F.cross_entropy(adv, y) + 0.7 * per * kl_sum(adv, original) + 1.3 * per * kl_sum(adv, clean)
    _check(total, expected, (adv, clean))
    assert parts["original_loss"] == pytest.approx(per * float(kl_sum(adv, original).detach()), rel=1e-5)
    with pytest.raises(ValueError, match="pmg_kl_direction must be one of"):
        losses.pmg_aft_loss(adv, y, original, clean, direction="reverse")


def test_hpt_loss_matches_methods_md_and_skips_zero_weight_terms():
    adv, proxy, anchor = _logits(), _logits(grad=False), _logits(grad=False)
    total, parts = losses.hpt_loss(adv, proxy, anchor)  # code v1: 1 and 0.001, sums over the batch
    _check(total, kl_sum(proxy, adv) + 0.001 * kl_sum(anchor, adv), (adv,))
    total, parts = losses.hpt_loss(adv, None, anchor, proxy_weight=0.0, anchor_weight=1.0)
    _check(total, kl_sum(anchor, adv), (adv,))
    assert float(parts["proxy_loss"]) == 0.0
    anchor_only = losses.anchor_loss(adv, anchor, reduction="batchmean")
    torch.testing.assert_close(anchor_only.double(), kl_sum(anchor, adv) / 6, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no proxy logits"):
        losses.hpt_loss(adv, None, anchor)
    with pytest.raises(ValueError, match="kl_reduction"):
        losses.hpt_loss(adv, proxy, anchor, reduction="mean")


def test_gpd_schedule_lr_and_phase_weights_at_chosen_steps():
    s = GPDSchedule(total_steps=110, warmup_steps=10, lr=1.0, warmup_lr=0.2, warmup_weights=(0.0, 1.0),
                    hpt_weights=(1.0, 0.001))
    assert s.lr_at(0) == pytest.approx(0.02) and s.lr_at(9) == pytest.approx(0.2)  # low, rising
    assert s.lr_at(10) == pytest.approx(1.0)  # phase (b) starts at the peak
    assert s.lr_at(60) == pytest.approx(0.5)  # half-way through the cosine
    assert s.lr_at(109) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert s.phase(9) == "warmup" and s.phase(10) == "hpt"
    assert s.weights_at(9) == (0.0, 1.0) and s.weights_at(10) == (1.0, 0.001)
    # The LambdaLR gives the optimiser lr_at(step) for the step it is about to take.
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = s.scheduler(opt)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([s.lr_at(i) for i in range(12)])
    # The code's schedule: one ramp to lr (open_clip cosine_lr).
    code = GPDSchedule(total_steps=3000, warmup_steps=1000, lr=5e-5)
    assert code.lr_at(499) == pytest.approx(2.5e-5) and code.lr_at(2000) == pytest.approx(2.5e-5)
    with pytest.raises(ValueError, match="warmup_steps"):
        GPDSchedule(total_steps=10, warmup_steps=10, lr=1.0)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return load_clip("urda-tiny-vit", None)


@pytest.mark.parametrize("mode", ["cosine", "clip"])
def test_text_feature_cache_gives_the_recomputed_logits(tiny_clip, mode):
    model, tokenizer = tiny_clip
    names, templates = ["zero", "one", "two"], ["a photo of the number {}", "the digit {}"]
    cached = ZeroShotClassifier(model, tokenizer, names, templates, logits=mode, cache_text=True)
    fresh = ZeroShotClassifier(model, tokenizer, names, templates, logits=mode, cache_text=False)
    x = torch.rand(5, 3, 32, 32)
    with torch.inference_mode():  # a cache filled in inference mode must still serve a training forward later
        first = cached(x)
    torch.testing.assert_close(cached(x), fresh(x), rtol=0, atol=0)
    torch.testing.assert_close(first, fresh(x), rtol=1e-5, atol=1e-6)  # inference mode may take other kernels
    assert cached.cached_text is not None and not cached.cached_text.requires_grad
    assert fresh.text_features().requires_grad  # the uncached head trains the text tower
    # by hand: cosine of unit image features with the template-averaged unit class embeddings
    text = F.normalize(model.encode_text(tokenizer([t.format(n) for n in names for t in templates])), dim=-1)
    text = F.normalize(text.reshape(3, 2, -1).mean(1), dim=-1)
    norm = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    want = F.normalize(model.encode_image(norm), dim=-1) @ text.t() * (model.logit_scale.exp() if mode == "clip" else 1)
    torch.testing.assert_close(cached(x), want, rtol=1e-5, atol=1e-5)


def test_missing_checkpoint_and_unknown_architecture_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_clip("urda-tiny-vit", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'.*list_models"):
        load_clip("ViT-Q-99", None)
    with pytest.raises(ValueError, match="ARCH:CHECKPOINT"):
        parse_model_arg("ckpts/vitb32.pt", "target")
    assert parse_model_arg("ViT-B-32:c:/x.pt") == ("ViT-B-32", "c:/x.pt")
    model, _ = load_clip("urda-tiny-rn", None)
    torch.save(model.state_dict(), tmp_path / "rn.pt")
    with pytest.raises(ValueError, match="does not hold weights for architecture urda-tiny-vit") as other:
        load_clip("urda-tiny-vit", str(tmp_path / "rn.pt"))
    # counts and a few names, not torch's list of every key (hundreds for a real CLIP)
    assert re.search(r"\d+ missing key\(s\): visual\.class_embedding, .*\d+ unexpected key\(s\): visual\.bn1",
                     str(other.value)) and len(str(other.value)) < 600
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a CLIP checkpoint that torch or open_clip can read"):
        load_clip("urda-tiny-vit", str(tmp_path / "notes.pt"))
    again, _ = load_clip("urda-tiny-rn", str(tmp_path / "rn.pt"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- the embedded world
WORLD_SCALE = 0.02  # 120 pre-training images, 16 pre-training steps per model: seconds, not minutes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from urda_fast.hpt.world import WorldRecipe, build_world

    return build_world(str(tmp_path_factory.mktemp("world")), WorldRecipe().scaled(WORLD_SCALE), progress=False)


train_cfg = hpt_train_config


def test_world_is_reused_and_its_splits_have_the_documented_shapes(world):
    from urda_fast.hpt.world import SPLITS, build_world

    again = build_world(world.folder, __import__("urda_fast.hpt.world", fromlist=["WorldRecipe"]).WorldRecipe()
                        .scaled(WORLD_SCALE), progress=False)
    assert again.info["key"] == world.info["key"]  # a complete world of the same recipe is not rebuilt
    for split in SPLITS:
        images, labels = world.split(split)
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert 0 <= float(images.min()) and float(images.max()) <= 1
        assert int(labels.max()) < len(world.classnames(split))
    with pytest.raises(ValueError, match="splits"):
        world.split("test")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")  # moved to a step, no optimizer
def test_head_and_its_eager_twin_upsample_small_images_alike(world, tmp_path):
    """CIFAR-sized images reach the model bicubically upsampled (the code's F.interpolate), in our head and in the
    eager twin the benchmarks and the step test compare against."""
    from urda_fast.hpt.reference_step import EagerZeroShot
    from urda_fast.hpt.train import build_task

    head = build_task(train_cfg(world, tmp_path, method="hpt"))[0].head
    small = torch.rand(3, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    eager = EagerZeroShot(head.clip, head.tokens, len(head.classnames), head.mode)
    with torch.no_grad():
        torch.testing.assert_close(head(small), eager(small), rtol=1e-4, atol=1e-5)
        bilinear = F.interpolate(small, size=head.image_size, mode="bilinear", align_corners=False)
        assert not torch.allclose(head(small), head(bilinear), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,weights,logits,style", [
    ("hpt-gpd", "warmup", "clip", "code"), ("hpt-gpd", "hpt", "clip", "lean"), ("hpt", "hpt", "clip", "code"),
    ("hpt", "hpt", "cosine", "lean")])
def test_training_step_equals_the_eager_reference_step(world, tmp_path, method, weights, logits, style):
    """Our step (text once per step, cached frozen heads, fused KL and PGD) gives the reference code's loss and
    gradients, in the warm-up phase (anchor only) and in the HPT phase (proxy + anchor)."""
    import copy

    from urda_fast.hpt.reference_step import EagerZeroShot, eager_hpt_loss
    from urda_fast.hpt.train import build_task
    from urda_fast.models import plain_torch

    cfg = train_cfg(world, tmp_path, method=method, attack_random_start=False, anchor_weight=0.5, logits=logits)
    task = build_task(cfg)[0]
    step = 0 if weights == "warmup" else cfg.warmup_steps
    for _ in range(step):
        task.scheduler.step()
    proxy_w, anchor_w = task.schedule.weights_at(step)
    assert (proxy_w, anchor_w) == ((0.0, 1.0) if method == "hpt-gpd" and weights == "warmup" else (1.0, 0.5))
    with torch.no_grad():  # a target that has moved away from its anchor, as during training
        for param in task.head.clip.parameters():
            param.add_(0.05 * torch.randn_like(param))
    state = copy.deepcopy(task.stream.state_dict())
    # The reference runs plain-PyTorch twins (torch's own convolution, attention and transformer blocks; the same
    # weights), so a wrong fused layer in ours cannot hide by running in the reference too.
    target_copy, proxy_copy, anchor_copy = (plain_torch(copy.deepcopy(m))
                                            for m in (task.head.clip, task.proxy.clip, task.anchor.clip))
    assert not [type(m) for c in (target_copy, proxy_copy, anchor_copy) for m in c.modules()
                if type(m).__module__.startswith("urda_fast.")]
    ours = task.training_step()["loss"]
    ours_grads = torch.autograd.grad(ours, [p for p in task.head.clip.parameters()], allow_unused=True)

    task.stream.load_state_dict(state)
    x, y = next(task.stream)
    tokens, n = task.head.tokens, len(task.head.classnames)
    eager = [EagerZeroShot(m, tokens, n, logits) for m in (target_copy, proxy_copy, anchor_copy)]
    want = eager_hpt_loss(*eager, x, y, cfg, proxy_w, anchor_w, style=style)
    want_grads = torch.autograd.grad(want, list(target_copy.parameters()), allow_unused=True)
    # float32, fused vs torch's layers: measured loss within 1.4e-6 (rel 6e-6; 1.6e-4 of the ~3e-3 cosine loss),
    # gradients within 3.9e-6 (rel 7e-5 beyond atol); a block output off by 2% moves the loss 2.3%.
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-6)
    assert logits == "cosine" or float(want.detach()) > 1e-3
    for got, expected in zip(ours_grads, want_grads):
        if expected is None:
            assert got is None or float(got.abs().max()) == 0
        else:
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def test_every_method_trains_and_the_cli_commands_run(world, tmp_path, capsys):

    target, proxy = world.model_arg("target"), world.model_arg("proxy")
    common = ["--world", world.folder, "--device", "cpu", "--progress", "false"]
    assert main(["hpt", "proxy-check", "--target", target, "--proxy", proxy, "--data", "world:digits",
                 "--eps", "1/255", "--batch-size", "8", "--max-batches", "1", "--out", str(tmp_path / "pc")]
                + common) == 0
    check = json.loads((tmp_path / "pc" / "proxy_check.json").read_text())
    assert check["count"] == 8 and abs(check["eps"] - 1 / 255) < 1e-12
    assert check["target_whitebox"] <= check["target_clean"]  # PGD never helps the model it attacks
    runs = []
    for method in ("tecoa", "pmg-aft", "hpt", "hpt-gpd"):
        out = tmp_path / method
        assert main(["hpt", "train", "--target", target, "--proxy", proxy, "--train-data", "world", "--method",
                     method, "--out", str(out), "--iterations", "3", "--batch-size", "8", "--warmup-steps", "1",
                     "--attack-steps", "1", "--eval-every", "3", "--eval-steps", "1", "--eval-max-batches", "1",
                     "--tensorboard", "false"] + common
                    + (["--pmg-kl-direction", "code"] if method == "pmg-aft" else [])) == 0
        best = torch.load(out / "best.pt", weights_only=False)
        assert best["kind"] == "hpt" and best["config"]["method"] == method and best["arch"] == "urda-tiny-vit"
        rows = list(csv_rows(out / "log.csv"))
        assert [r["iteration"] for r in rows if r.get("loss")] == ["3"]
        assert all(math.isfinite(float(r["loss"])) for r in rows if r.get("loss"))
        runs.append(str(out))
    capsys.readouterr()
    assert main(["hpt", "eval", *runs, "--target", target, "--datasets", "world:digits,world:style", "--attack",
                 "pgd2", "--batch-size", "16", "--max-batches", "1", "--out", str(tmp_path / "eval")] + common) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["zero-shot", "tecoa", "pmg-aft", "hpt", "hpt-gpd"]
    for row in report["rows"]:
        assert set(row["per_dataset"]) == {"world:digits", "world:style"}
        assert row["robust"] <= row["clean"] + 1e-9
    assert "zero-shot" in capsys.readouterr().out and (tmp_path / "eval" / "report.png").stat().st_size > 0


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_resume_after_a_kill_equals_an_uninterrupted_run(world, tmp_path):
    """Killed inside the warm-up, resumed into the HPT phase: the same weights, bit for bit, and the same log."""
    from urda_fast.hpt import train

    full = train_cfg(world, tmp_path / "full", iterations=5, warmup_steps=2, eval_every=2)
    train(full)
    killed = train_cfg(world, tmp_path / "killed", iterations=5, warmup_steps=2, eval_every=2, stop_after=1)
    train(killed)
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["iteration"] == 1
    from dataclasses import replace

    train(replace(killed, stop_after=0, resume=True))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["modules"]["target"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["modules"]["target"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(csv_rows(tmp_path / "full" / "log.csv")) == strip(csv_rows(tmp_path / "killed" / "log.csv"))


def test_visual_only_training_keeps_the_text_tower_and_clamps_logit_scale(world, tmp_path):
    from urda_fast.hpt import load_clip, train

    cfg = train_cfg(world, tmp_path, trainable="visual", logits="clip", iterations=2, warmup_steps=1, eval_every=2,
                    logit_scale_max=1.0)
    train(cfg)
    before, _ = load_clip(*parse_model_arg(world.model_arg("target")))
    after = torch.load(tmp_path / "last.pt", weights_only=False)["modules"]["target"]
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith("visual.") for k in changed - {"logit_scale"})
    assert float(after["logit_scale"]) <= 1.0  # clamped after every step


@pytest.mark.parametrize("method, weights, loaded", [
    ("hpt", dict(anchor_weight=0.0), ["target", "proxy"]),  # hpt has no warm-up: its warm-up weights do not count
    ("hpt", dict(proxy_weight=0.0), ["target", "anchor"]),  # the GPD two-run protocol's second run
    ("hpt-gpd", dict(anchor_weight=0.0), ["target", "proxy", "anchor"]),  # the warm-up's anchor
    ("hpt-gpd", dict(warmup_steps=0, anchor_weight=0.0), ["target", "proxy"])])  # no warm-up phase
def test_frozen_clips_of_weight_zero_throughout_are_not_loaded(world, tmp_path, monkeypatch, method, weights, loaded):
    """A frozen CLIP no phase of the run reads costs its memory for nothing (a ViT-B on a GPU)."""
    from urda_fast.hpt import train

    module = sys.modules["urda_fast.hpt.train"]
    real, roles = module.load_clip_arg, []

    def load_clip_arg(arg, role, device):
        roles.append(role)
        return real(arg, role, device)

    monkeypatch.setattr(module, "load_clip_arg", load_clip_arg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hpt-gpd without a warm-up trains as hpt: said, and meant here
        train(train_cfg(world, tmp_path, method=method, **{**dict(iterations=2, warmup_steps=1, eval_every=2),
                                                           **weights}))
    assert roles == loaded


def test_last_n_trains_only_the_last_visual_parameter_tensors(tiny_clip):
    """trainable="last:N" is the code's --last_num_ft N: list(model.visual.parameters())[-N:]."""
    from urda_fast.hpt import TrainConfig
    from urda_fast.hpt.train import make_optimizer

    model, _ = tiny_clip
    expected = list(model.visual.parameters())[-3:]
    optimizer = make_optimizer(model, TrainConfig(trainable="last:3"))
    trained = optimizer.param_groups[0]["params"]
    assert [id(p) for p in trained] == [id(p) for p in expected]
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in expected}
    everything = make_optimizer(model, TrainConfig(trainable="all")).param_groups[0]["params"]
    assert len(everything) == len(list(model.parameters()))
    for bad in ("last:0", "last:x", "last", "text"):
        with pytest.raises(ValueError, match="trainable must be 'all', 'visual' or 'last:N'"):
            make_optimizer(model, TrainConfig(trainable=bad))
    with pytest.raises(ValueError, match="more parameter tensors than the target's visual tower has"):
        make_optimizer(model, TrainConfig(trainable="last:100000"))


def test_last_n_training_changes_only_those_tensors(world, tmp_path):
    from urda_fast.hpt import load_clip, train

    train(train_cfg(world, tmp_path, trainable="last:2", iterations=2, warmup_steps=1, eval_every=2))
    before, _ = load_clip(*parse_model_arg(world.model_arg("target")))
    last_two = [name for name, _ in before.named_parameters() if name.startswith("visual.")][-2:]
    after = torch.load(tmp_path / "last.pt", weights_only=False)["modules"]["target"]
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}
    assert changed == set(last_two)


def test_bad_configs_and_dataset_layouts_are_clear_errors(world, tmp_path):
    from urda_fast.hpt import train
    from urda_fast.hpt.data import open_dataset, tinyimagenet

    with pytest.raises(ValueError, match="--proxy"):
        train(train_cfg(world, tmp_path, method="hpt", proxy=""))
    with pytest.raises(ValueError, match="method must be one of"):
        train(train_cfg(world, tmp_path, method="trades"))
    with pytest.raises(ValueError, match="attack_eps must be > 0"):
        train(train_cfg(world, tmp_path, attack_eps=-1 / 255))
    with pytest.raises(ValueError, match="proxy_weight must be >= 0, got -1.0"):
        train(train_cfg(world, tmp_path, proxy_weight=-1.0))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        train(train_cfg(world, tmp_path, momentum=1.5))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"an earlier run's weights")
    with pytest.raises(ValueError, match="--target .* lies where this run writes its checkpoints"):
        train(train_cfg(world, tmp_path / "run", target=f"urda-tiny-vit:{tmp_path / 'run'}"))
    assert (tmp_path / "run" / "best.pt").read_bytes() == b"an earlier run's weights"
    with pytest.raises(ValueError, match="warmup_steps"):
        train(train_cfg(world, tmp_path, warmup_steps=10, iterations=4))
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as missing:
        open_dataset("cifar10", root=str(tmp_path / "data"))
    assert "download=True" not in str(missing.value)  # torchvision's advice; nothing is downloaded here
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200"):
        tinyimagenet(str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="<class>"):
        open_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
        open_dataset("cifar11", root=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="not a built world"):
        train(train_cfg(world, tmp_path, world=str(tmp_path / "data")))
    with pytest.raises(ValueError, match="does not hold weights"):  # a checkpoint of the other architecture
        train(train_cfg(world, tmp_path, target="urda-tiny-vit:" + world.model_arg("proxy").split(":", 1)[1]))


def test_demo_writes_the_documented_report(world, tmp_path):
    from urda_fast.hpt import demo

    report = demo(str(tmp_path / "demo"), scale=WORLD_SCALE, device="cpu", world_dir=world.folder, progress=False)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert [r["method"] for r in saved["rows"]] == ["zero-shot", "tecoa", "pmg-aft", "hpt", "hpt-gpd"]
    assert set(saved["proxy_check"]) >= {"target_whitebox", "proxy_on_target_adv"}
    for row in saved["rows"]:
        assert 0 <= row["robust"] <= row["clean"] <= 100 and set(row["per_dataset"]) == {
            "world:digits", "world:handwritten", "world:style"}
    assert (tmp_path / "demo" / "report.md").read_text().startswith("Zero-shot accuracy")


def test_cli_demo_seed_reaches_every_fine_tuning_run(world, tmp_path, monkeypatch):
    demo_module = importlib.import_module("urda_fast.hpt.demo")  # the package's `demo` is the function
    seen = []
    monkeypatch.setattr(demo_module, "proxy_check", lambda *a, **k: dict.fromkeys(
        ("target_whitebox", "proxy_on_target_adv", "target_clean", "proxy_clean"), 0.0))
    monkeypatch.setattr(demo_module, "train", lambda cfg: seen.append(cfg) or {"last": {}})
    monkeypatch.setattr(demo_module, "run_model", lambda out: ("hpt", "urda-tiny-vit:x.pt"))
    monkeypatch.setattr(demo_module, "evaluate_models", lambda *a, **k: {"rows": []})
    monkeypatch.setattr(demo_module, "write_report", lambda *a: None)
    monkeypatch.setattr(demo_module, "to_markdown", lambda report: "")
    # --scale: the fixture's recipe (another one is refused, not rebuilt in place over the shared world)
    assert main(["hpt", "demo", "--out", str(tmp_path), "--world", world.folder, "--device", "cpu",
                 "--scale", str(WORLD_SCALE), "--seed", "5"]) == 0
    assert [(cfg.method, cfg.seed) for cfg in seen] == [(m, 5) for m in ("tecoa", "pmg-aft", "hpt", "hpt-gpd")]


def test_compiled_image_towers_train_as_the_eager_ones():
    """compile=True: the towers run through torch.compile (in place: same modules, same state dict keys) and two
    training steps give the eager run's losses and weights, up to float rounding."""
    from urda_fast.hpt.step_builder import build_hpt_step, load_step_models, step_config

    runs = []
    for compiled in (False, True):
        models = load_step_models("urda-tiny-vit", "urda-tiny-rn", device="cpu", seed=0)
        keys = list(models.target.state_dict())
        built = build_hpt_step(models, step_config(attack_steps=2, compile=compiled), batch_size=8, num_classes=4)
        losses_ = [float(built.step()) for _ in range(2)]
        towers = (built.task.head, built.task.proxy, built.task.anchor)
        assert all((head.clip.visual._compiled_call_impl is not None) == compiled for head in towers)
        assert list(models.target.state_dict()) == keys
        runs.append((losses_, models.target.state_dict()))
    (eager_losses, eager_state), (compiled_losses, compiled_state) = runs
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-6)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
