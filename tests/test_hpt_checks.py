"""HPT command-line checks that need no pre-trained world: a fake world (random tiny CLIPs, class-sorted splits)
built in a second. Refused configurations, what `hpt eval` and the training-time evaluation see, protected inputs,
and the errors for unreadable or foreign checkpoints and datasets."""

import json
import os
import sys
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import hpt_train_config

from urda_fast.cli import main
from urda_fast.hpt import TrainConfig, train
from urda_fast.hpt.clip_models import load_clip
from urda_fast.hpt.config import EvalConfig
from urda_fast.data import subset
from urda_fast.hpt.data import open_dataset
from urda_fast.hpt.train import build_task, check_config
from urda_fast.hpt.world import SPLITS, World, WorldRecipe, build_world, classnames


@pytest.fixture(scope="module")
def fake_world(tmp_path_factory):
    """A world folder as `hpt demo` leaves one, with random-init tiny CLIPs and small splits whose labels are
    sorted by class (as an ImageFolder's or many torchvision sets' are)."""
    folder = tmp_path_factory.mktemp("fake_world")
    g = torch.Generator().manual_seed(0)
    data = {}
    for split in SPLITS:
        classes = len(classnames(split))
        labels = torch.arange(classes).repeat_interleave(4)
        data[split] = {"images": torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=g),
                       "labels": labels}
    torch.save(data, folder / "data.pt")
    for role, arch in (("target", "urda-tiny-vit"), ("proxy", "urda-tiny-rn")):
        torch.manual_seed(1)
        model, _ = load_clip(arch, None)
        torch.save(model.state_dict(), folder / f"{role}.pt")
    (folder / "world.json").write_text(json.dumps({"key": "fake"}))
    return World(str(folder))


def cfg_for(world, out, **kw):
    return hpt_train_config(world, out, **{**dict(iterations=2, warmup_steps=1, attack_steps=1, eval_every=2,
                                                  eval_steps=1), **kw})


# ------------------------------------------------------------------------------------------------ finding 1
def test_an_unknown_select_metric_is_refused_before_the_models_load(fake_world, tmp_path):
    missing_target = "urda-tiny-vit:" + str(tmp_path / "not_there.pt")  # would fail first if the models loaded
    with pytest.raises(ValueError, match=r"select_metric 'robust' is not one of .*robust_acc, digits_clean"):
        train(cfg_for(fake_world, tmp_path / "run", select_metric="robust", target=missing_target))
    assert not (tmp_path / "run").exists()
    # a per-set metric is one
    task = build_task(cfg_for(fake_world, tmp_path / "run", select_metric="style_robust"))[0]
    assert "style_robust" in task.metric_names() and "handwritten_clean" in task.metric_names()


def test_overwrite_replaces_the_earlier_runs_best_pt(fake_world, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(fake_world, out))
    before = torch.load(out / "best.pt", weights_only=False)
    # the new run stops before its first evaluation (a kill): no best.pt of the earlier run may stay
    train(cfg_for(fake_world, out, method="tecoa", overwrite=True, iterations=4, eval_every=4, stop_after=1))
    assert before["config"]["method"] == "hpt-gpd" and not (out / "best.pt").exists()
    assert torch.load(out / "last.pt", weights_only=False)["config"]["method"] == "tecoa"


# ------------------------------------------------------------------------------------------------ finding 2
@pytest.mark.parametrize("method,weights,phase", [
    ("hpt-gpd", dict(warmup_anchor_weight=0.0), "GPD warm-up phase"),
    ("hpt-gpd", dict(proxy_weight=0.0, anchor_weight=0.0), "HPT phase"),
    ("hpt", dict(proxy_weight=0.0, anchor_weight=0.0), "HPT phase")])
def test_a_phase_without_a_loss_term_is_a_config_error(method, weights, phase):
    cfg = TrainConfig(target="urda-tiny-vit:t.pt", proxy="urda-tiny-rn:p.pt", method=method, **weights)
    with pytest.raises(ValueError, match=f"every loss weight of the {phase} of method {method} is 0"):
        check_config(cfg)


def test_zero_weights_of_a_phase_that_does_not_happen_are_fine():
    # no warm-up: its weights do not matter; plain `hpt` keeps the HPT weights through its warm-up
    for cfg in (TrainConfig(target="urda-tiny-vit:t.pt", proxy="urda-tiny-rn:p.pt", warmup_steps=0,
                            warmup_anchor_weight=0.0),
                TrainConfig(target="urda-tiny-vit:t.pt", proxy="urda-tiny-rn:p.pt", method="hpt",
                            warmup_anchor_weight=0.0)):
        check_config(cfg)


@pytest.mark.parametrize("target, proxy", [("ViT-B-32:t.pt", "ViT-B-32:p.pt"),
                                           ("ViT-B-32-quickgelu:t.pt", "ViT-B-32:p.pt")])
def test_a_proxy_of_the_targets_architecture_is_warned_about(target, proxy):
    """The QuickGELU variant is the same tower: no heterogeneous proxy either."""
    with pytest.warns(UserWarning, match="the proxy has the target's architecture"):
        check_config(TrainConfig(target=target, proxy=proxy, method="hpt"))


def test_settings_without_effect_are_warned_about():
    base = dict(target="urda-tiny-vit:t.pt", proxy="urda-tiny-rn:p.pt")
    with pytest.warns(UserWarning, match="hpt-gpd with --warmup-steps 0 has no anchored warm-up phase"):
        check_config(TrainConfig(**base, method="hpt-gpd", warmup_steps=0))
    with pytest.warns(UserWarning, match="--logit-scale-max 3.0 has no effect .*cosine logits"):
        check_config(TrainConfig(**base, logits="cosine", logit_scale_max=3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config(TrainConfig(**base, logits="clip", logit_scale_max=3.0))


# ------------------------------------------------------------------------------------------------ finding 3
def _fake_run(world, folder, **config):
    """A best.pt as `hpt train` writes it, holding the world's target, trained with ``config``'s head."""
    folder.mkdir()
    weights = torch.load(world.model_arg("target").split(":", 1)[1], weights_only=True)
    torch.save({"kind": "hpt", "arch": "urda-tiny-vit", "version": 1, "iteration": 1, "metrics": {},
                "config": {"method": "tecoa", **config}, "modules": {"target": weights}}, folder / "best.pt")
    return str(folder)


def test_hpt_eval_uses_each_runs_own_head_unless_a_flag_is_given(fake_world, tmp_path, capsys):
    """Each run with its training-time head; the plain --target CLIP with the head its runs share (scored with the
    default cosine head beside runs trained with CLIP logits, its PGD accuracy moved by points: another attack)."""
    from urda_fast.hpt.evaluate import zero_shot_robustness
    from urda_fast.hpt.report import evaluate_models

    trained = dict(logits="clip", preprocess="clip", templates="a {}|the number {}")
    run = _fake_run(fake_world, tmp_path / "run", **trained)
    common = ["--datasets", "world:digits", "--world", fake_world.folder, "--attack", "pgd1", "--batch-size", "16",
              "--max-batches", "1", "--device", "cpu", "--progress", "false"]
    assert main(["hpt", "eval", run, "--target", fake_world.model_arg("target"), "--out", str(tmp_path / "r")]
                + common) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert rows[0]["head"] == {**trained, "from": dict.fromkeys(("logits", "preprocess", "templates"), "runs")}
    assert rows[1]["head"] == {**trained, "from": dict.fromkeys(("logits", "preprocess", "templates"), "run")}
    out = capsys.readouterr().out
    assert "tecoa: logits 'clip' (run's), preprocess 'clip' (run's)" in out
    assert "zero-shot: logits 'clip' (the runs')" in out
    assert "averages over these 1 set\n" in out and "--datasets paper" not in out  # world sets: no papers' note
    # the numbers are those of the run's head
    clip, tokenizer = load_clip("urda-tiny-vit", run)
    zs = open_dataset("world:digits", world=fake_world)
    zs.dataset = subset(zs.dataset, 16)
    want = zero_shot_robustness(clip, tokenizer, [zs], attack="pgd1", batch_size=16,
                                templates=("a {}", "the number {}"), logits="clip", preprocess="clip", progress=False)
    assert rows[1]["per_dataset"] == json.loads(json.dumps(want["per_dataset"]))
    # a flag wins, for every model
    report = evaluate_models([("tecoa", f"urda-tiny-vit:{run}/best.pt")],
                             EvalConfig(datasets="world:digits", preprocess="imagenet", attack="none",
                                        batch_size=16, max_batches=1, device="cpu", progress=False), fake_world)
    head = report["rows"][0]["head"]
    assert head["preprocess"] == "imagenet" and head["from"]["preprocess"] == "flag" and head["logits"] == "clip"


def test_hpt_eval_runs_under_the_codes_autocast_when_asked(fake_world, monkeypatch):
    """--amp bf16 (fp16 is the code's, on a GPU): the attack and the scoring under autocast, the figures near float32's
    and the report saying which; a bad mode is refused before any model is read."""
    from urda_fast.hpt import report
    from urda_fast.hpt.report import evaluate_models

    seen, real = [], report.zero_shot_robustness

    def recording(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "zero_shot_robustness", recording)
    common = dict(datasets="world:digits", attack="pgd2", batch_size=16, max_batches=2, device="cpu", progress=False)
    target = fake_world.model_arg("target")
    full = evaluate_models([("zero-shot", target)], EvalConfig(**common), fake_world)
    half = evaluate_models([("zero-shot", target)], EvalConfig(amp="bf16", **common), fake_world)
    assert (full["amp"], half["amp"]) == ("none", "bf16") and seen == [None, torch.bfloat16]
    for key in ("clean", "robust"):
        assert abs(full["rows"][0][key] - half["rows"][0][key]) <= 10.0, key  # 32 images, bf16's 8-bit mantissa
    with pytest.raises(ValueError, match="amp must be one of 'auto', 'none', 'bf16', 'fp16', got 'fp8'"):
        evaluate_models([("zero-shot", "urda-tiny-vit:/missing.pt")], EvalConfig(amp="fp8", **common), fake_world)


def test_hpt_eval_warns_when_its_rows_have_different_heads(fake_world, tmp_path):
    from urda_fast.hpt.report import report_heads

    first = _fake_run(fake_world, tmp_path / "a", logits="clip", preprocess="imagenet")
    second = _fake_run(fake_world, tmp_path / "b", logits="cosine", preprocess="imagenet")
    plain = fake_world.model_arg("target")
    with pytest.warns(UserWarning, match="different zero-shot logits .*give --logits to score every row alike"):
        heads = report_heads(EvalConfig(), [plain, f"urda-tiny-vit:{first}", f"urda-tiny-vit:{second}"])
    assert [h["logits"] for h in heads] == ["cosine", "clip", "cosine"]  # the runs disagree: the default
    assert heads[0]["from"] == {"logits": "default", "preprocess": "runs", "templates": "default"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        heads = report_heads(EvalConfig(logits="clip"), [plain, f"urda-tiny-vit:{first}", f"urda-tiny-vit:{second}"])
    assert {h["logits"] for h in heads} == {"clip"}


# ------------------------------------------------------------------------------------------------ finding 4
def test_training_time_evaluation_sees_hpt_evals_seeded_sample(fake_world, tmp_path, monkeypatch):
    import urda_fast.hpt.evaluate as evaluate

    seen = []
    real = evaluate.robust_accuracy

    def spy(head, loader, attacks, **kw):
        for i, (_, y) in enumerate(loader):
            if kw.get("max_batches") and i >= kw["max_batches"]:
                break
            seen.extend(y.tolist())
        return real(head, loader, attacks, **kw)

    monkeypatch.setattr(evaluate, "robust_accuracy", spy)
    task = build_task(cfg_for(fake_world, tmp_path, val_data="world:digits", batch_size=8, eval_max_batches=1,
                              seed=3))[0]
    task.evaluate()
    _, labels = fake_world.split("digits")  # class-sorted: the first batch would be classes 0 and 1 only
    expected = [int(labels[i]) for i in subset(torch.utils.data.TensorDataset(labels), 8, 3).indices]
    assert seen == expected and len(set(seen)) > 2


def test_training_time_evaluation_prompts_as_hpt_eval_does(fake_world, tmp_path, monkeypatch):
    """A validation set with the code's own prompts (the HPT code's later commit watches dtd) is scored with them,
    as `hpt eval` scores it by default; the others with the run's templates."""
    from urda_fast.hpt.data import ZeroShotSet

    train_module = sys.modules["urda_fast.hpt.train"]  # the package's `train` is the function

    task = build_task(cfg_for(fake_world, tmp_path, val_data="world:digits", batch_size=8, eval_max_batches=1))[0]
    own = task.val_sets[0]
    task.val_sets = [ZeroShotSet("world:own", own.dataset, own.classnames,
                                 prompts=[f"a sketch of the number {c}" for c in own.classnames]), own]
    seen = []
    real = train_module.zero_shot_robustness

    def spy(clip, tokenizer, sets, **kw):
        seen.append(kw["prompts"])
        out = real(clip, tokenizer, sets, **kw)
        seen.append([row["prompts"] for row in out["per_dataset"].values()])
        return out

    monkeypatch.setattr(train_module, "zero_shot_robustness", spy)
    metrics = task.evaluate()
    assert seen == ["code", ["code", "template"]] and {"own_clean", "digits_clean"} <= set(metrics)


def test_training_time_evaluation_under_ddp_sees_the_global_batchs_sample(fake_world, tmp_path, monkeypatch):
    """batch_size is per process: W processes validate on eval_max_batches x W*B images (rank 0 evaluates), the
    sample one process with batch W*B takes."""
    from urda_fast import distributed
    from urda_fast.hpt.train import validation_sets

    cfg = cfg_for(fake_world, tmp_path, val_data="world:digits", batch_size=8, eval_max_batches=1, seed=3)
    (single,) = validation_sets(replace(cfg, batch_size=16), fake_world, None)
    monkeypatch.setattr(distributed, "context", lambda: distributed.Context(rank=0, world_size=2))
    (ddp,) = validation_sets(cfg, fake_world, None)
    assert len(ddp.dataset) == 16 and ddp.dataset.indices == single.dataset.indices


# ------------------------------------------------------------------------------------------------ finding 5
def test_a_world_folder_of_another_recipe_is_not_rebuilt_in_place(tmp_path):
    recipe = WorldRecipe().scaled(0.01)
    (tmp_path / "world.json").write_text(json.dumps({"key": "0123456789", "recipe": {"pretrain_images": 6000}}))
    with pytest.raises(ValueError, match=f"another recipe \\(key 0123456789\\) .*key {recipe.key()}: "
                                         f"pretrain_images 6000 -> {recipe.pretrain_images}"):
        build_world(str(tmp_path), recipe, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["world.json"]


# ------------------------------------------------------------------------------------------------ finding 6
def test_resume_refuses_a_changed_input_checkpoint(fake_world, tmp_path):
    target = tmp_path / "target.pt"
    target.write_bytes(open(fake_world.model_arg("target").split(":", 1)[1], "rb").read())
    cfg = cfg_for(fake_world, tmp_path / "run", target=f"urda-tiny-vit:{target}", stop_after=1)
    train(cfg)
    inputs = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["inputs"]
    assert set(inputs) == {"--target", "--proxy", "--world"} and inputs["--target"]["size"] == target.stat().st_size
    weights = torch.load(target, weights_only=True)
    weights["logit_scale"] += 1.0
    torch.save(weights, target)
    with pytest.raises(ValueError, match=f"--target '{target}' has changed since the run began"):
        train(replace(cfg, stop_after=0, resume=True))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["iteration"] == 1


# ------------------------------------------------------------------------------------------------ finding 7
def test_the_anchor_may_not_lie_where_the_run_writes(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"the anchor")
    cfg = TrainConfig(target="urda-tiny-vit:t.pt", proxy="urda-tiny-rn:p.pt", anchor=f"urda-tiny-vit:{tmp_path}",
                      out=str(tmp_path), overwrite=True, train_data="world", world=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="--anchor .* lies where this run writes its checkpoints"):
        train(cfg)
    assert (tmp_path / "best.pt").read_bytes() == b"the anchor"


# ------------------------------------------------------------------------------------------------ finding 8
def test_image_folders_whose_class_names_collide_are_an_error(tmp_path):
    from PIL import Image

    for name in ("Cat", "cat", "big_dog", "big-dog", "bird"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    with pytest.raises(ValueError, match="class folders 'Cat' and 'cat' -> 'cat'; 'big-dog' and 'big_dog' -> "
                                         "'big dog' give the same zero-shot class name"):
        open_dataset(f"folder:{tmp_path}")


def test_class_names_are_refined_as_the_code_does():
    """PMG-AFT's utils.refine_classname: lower case, '_', '-' and '/' as spaces (SUN397's 'apartment_building/outdoor');
    a torchvision Caltech-256 'NNN.' prefix dropped."""
    from urda_fast.hpt.data import refine_classname

    assert [refine_classname(n) for n in ("Abyssinian", "golden_retriever", "apartment_building/outdoor",
                                          "t-shirt", "001.ak47")] == \
        ["abyssinian", "golden retriever", "apartment building outdoor", "t shirt", "ak47"]


# ------------------------------------------------------------------------------------------------ finding 9
def test_a_cut_file_and_another_architectures_weights_name_their_cause(fake_world, tmp_path):
    import open_clip

    from urda_fast.hpt.clip_models import TINY_CONFIGS

    whole = open(fake_world.model_arg("target").split(":", 1)[1], "rb").read()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="not a CLIP checkpoint that torch or open_clip can read .*zip archive"):
        load_clip("urda-tiny-vit", str(tmp_path / "cut.pt"))
    # a CLIP whose text tower is narrower: open_clip's loader fails in an assertion (text pos_embed width changed!)
    narrow = {**TINY_CONFIGS["urda-tiny-vit"], "text_cfg": {**TINY_CONFIGS["urda-tiny-vit"]["text_cfg"], "width": 32,
                                                             "context_length": 8}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "urda-test-narrow-text.json").write_text(json.dumps(narrow))
    open_clip.add_model_config(str(tmp_path / "configs"))
    with pytest.raises(ValueError, match=r"does not hold weights for architecture urda-test-narrow-text \(.*shape "
                                         r"mismatch\(es\): positional_embedding \[16, 64\] in the file vs \[8, 32\]"):
        load_clip("urda-test-narrow-text", fake_world.model_arg("target").split(":", 1)[1])


# ----------------------------------------------------------------------------------------------- finding 10
def test_pcam_without_h5py_says_so_first(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` raises ImportError
    with pytest.raises(ImportError, match=r"pcam needs the h5py package, which is not installed: pip install h5py"):
        open_dataset("pcam", root=str(tmp_path))


# ------------------------------------------------------------------------------------- host syncs per training step
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
@pytest.mark.parametrize("method,phase", [("tecoa", "hpt"), ("pmg-aft", "hpt"), ("hpt", "hpt"), ("hpt-gpd", "warmup"),
                                          ("hpt-gpd", "hpt")])
def test_training_steps_read_no_tensor_values_beyond_the_attacks_checks(fake_world, tmp_path, method, phase):
    """Each read of a tensor value is a host sync on a GPU. A whole step (training_step, backward, SGD, scheduler,
    logit_scale clamp) reads only what the attack's input checks read once per call (urda_fast/attacks/base.py:
    images in range, labels in range, finite loss), whatever the step and the attack's length."""
    from conftest import ScalarReads

    per_step = []
    for attack_steps in (1, 3):
        task, optimizer, _, _ = build_task(cfg_for(fake_world, tmp_path / f"{method}{attack_steps}", method=method,
                                                   iterations=20, warmup_steps=3, attack_steps=attack_steps))
        if phase == "hpt":
            for _ in range(3):  # past the warm-up: GPD's HPT phase (the other methods ignore phases)
                task.scheduler.step()
        batches = [next(task.stream) for _ in range(3)]  # a new epoch's loader draws its seed (a read per epoch)
        task.stream = iter(batches)
        assert task.schedule.phase(task.scheduler.last_epoch) == phase
        attack, attack_reads = task.attack, []

        def counted_attack(*args, _attack=attack, **kwargs):
            with ScalarReads() as reads:
                result = _attack(*args, **kwargs)
            attack_reads.append(reads.count)
            return result

        task.attack = counted_attack
        for _ in range(3):
            with ScalarReads() as reads:
                loss = task.training_step()["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                task.scheduler.step()
                task.after_step()
            per_step.append((reads.count - attack_reads[-1], attack_reads[-1]))
    assert {own for own, _ in per_step} == {0}, per_step
    assert len({attack for _, attack in per_step}) == 1, per_step


@pytest.mark.parametrize("on", [True, False])
def test_cudnn_benchmark_reaches_the_loop(fake_world, tmp_path, on):
    settings = build_task(cfg_for(fake_world, tmp_path / "run", cudnn_benchmark=on))[2]
    assert settings.cudnn_benchmark is on


def test_a_resume_that_changes_the_runs_length_is_refused(fake_world, tmp_path):
    """GPD's phases and cosine decay are laid out over the run's total steps: another --iterations at a resume would
    make the learning rate jump (DART's schedule does not depend on the length; there it may change)."""
    cfg = cfg_for(fake_world, tmp_path / "run", iterations=3, stop_after=1)
    train(cfg)
    with pytest.raises(ValueError, match=r"total_steps 3 -> 5"):
        train(replace(cfg, iterations=5, stop_after=0, resume=True))
    train(replace(cfg, stop_after=0, resume=True))  # its own length resumes


def test_the_paper_preset_evaluates_the_papers_15_datasets(monkeypatch):
    from urda_fast.hpt import report
    from urda_fast.hpt.data import PAPER_DATASETS

    seen = []

    class Enough(Exception):
        pass

    def fake_open(name, *args):
        seen.append(name)
        if len(seen) == 16:
            raise Enough
        return object()

    monkeypatch.setattr(report, "open_dataset", fake_open)
    with pytest.raises(Enough):
        report.evaluate_models([("m", "urda-tiny-vit")], EvalConfig(datasets="paper,tinyimagenet"))
    assert seen == [*PAPER_DATASETS, "tinyimagenet:val"] and len(PAPER_DATASETS) == 15
    with pytest.raises(ValueError, match="datasets given more than once: cifar10"):  # one of the 15
        report.evaluate_models([("m", "urda-tiny-vit")], EvalConfig(datasets="paper,cifar10"))


def test_each_method_trains_what_its_code_trains_by_default():
    """The PMG-AFT code (which runs TeCoA too) fine-tunes model.visual; the HPT-GPD code trains every parameter."""
    assert {m: TrainConfig(method=m).trainable for m in ("tecoa", "pmg-aft", "hpt", "hpt-gpd")} == {
        "tecoa": "visual", "pmg-aft": "visual", "hpt": "all", "hpt-gpd": "all"}
    assert TrainConfig(method="tecoa", trainable="all").trainable == "all"


# ---------------------------------------------------------------------------------- 2026-12-08 audit of the CLI
def test_dataset_names_are_reported_as_opened_and_a_set_given_twice_is_refused(fake_world):
    from urda_fast.hpt.data import canonical_name
    from urda_fast.hpt.report import evaluate_models, to_markdown

    assert [canonical_name(n) for n in (" TinyImageNet", "flowers", "CIFAR10 ", "World:digits", "folder:/A/b")] == [
        "tinyimagenet:val", "flowers102", "cifar10", "world:digits", "folder:/A/b"]
    cfg = EvalConfig(datasets=" World:digits , world:style", attack="none", batch_size=16, max_batches=1,
                     device="cpu", progress=False)
    report = evaluate_models([("zero-shot", fake_world.model_arg("target"))], cfg, fake_world)
    assert report["datasets"] == ["world:digits", "world:style"]  # the per-set results' keys: the table reads them
    assert "| world:digits clean / robust | world:style clean / robust |" in to_markdown(report)
    with pytest.raises(ValueError, match="datasets given more than once: world:digits"):
        evaluate_models([("zero-shot", fake_world.model_arg("target"))],
                        replace(cfg, datasets="world:digits,world:style,WORLD:digits"), fake_world)


def test_rows_of_one_method_are_told_apart_by_their_run_folder(fake_world, tmp_path):
    from urda_fast.hpt.report import distinct_labels, evaluate_models, run_model

    runs = [run_model(_fake_run(fake_world, tmp_path / name)) for name in ("a", "b")]
    assert [label for label, _ in distinct_labels([("zero-shot", "x:t.pt"), *runs])] == [
        "zero-shot", "tecoa (a)", "tecoa (b)"]
    with pytest.raises(ValueError, match=r"the same model given more than once: tecoa \(a\)"):
        evaluate_models([runs[0], runs[0]], EvalConfig(datasets="world:digits"), fake_world)


@pytest.mark.parametrize("templates", ["{{}}", "a {} {name}", "a {} {0}", "a}b{}", "{0}", "{!r}", "a photo"])
def test_templates_must_put_the_class_name_in_once(templates):
    from urda_fast.hpt.zero_shot import parse_templates

    assert parse_templates("a photo of a {}.|{{{}}} in braces") == ("a photo of a {}.", "{{{}}} in braces")
    with pytest.raises(ValueError, match="exactly one '{}' for the class name and no other format field"):
        parse_templates(f"a {{}}|{templates}")


def test_non_finite_weights_are_refused_where_they_load(fake_world, tmp_path):
    weights = torch.load(fake_world.model_arg("proxy").split(":", 1)[1], weights_only=True)
    name = next(k for k in weights if k.startswith("visual.") and weights[k].is_floating_point())
    weights[name].view(-1)[0] = float("nan")
    torch.save(weights, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=f"holds non-finite \\(NaN / inf\\) weights in 1 tensor \\({name}\\)"):
        load_clip("urda-tiny-rn", str(tmp_path / "nan.pt"))


def test_a_dart_checkpoint_given_as_a_clip_is_named(tmp_path):
    from conftest import digits_uda_checkpoint

    path, _ = digits_uda_checkpoint(tmp_path, bottleneck_dim=8, steps=1)
    with pytest.raises(ValueError, match="is a `dart pretrain` / `dart robustify` checkpoint .*not a CLIP"):
        load_clip("urda-tiny-vit", str(path))


def test_a_run_folder_without_best_pt_says_what_it_has(fake_world, tmp_path):
    from urda_fast.dart.common import read_checkpoint
    from urda_fast.hpt.report import run_model

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no best.pt, only last.pt.*give .*run/last.pt"):
        run_model(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match=r"has no best.pt, only last.pt"):
        load_clip("urda-tiny-vit", str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match=r"has no best.pt, only last.pt"):
        read_checkpoint(str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no best.pt or last.pt"):
        run_model(str(tmp_path / "empty"))


def test_attack_names_without_steps_and_a_list_for_the_proxy_check_are_named(fake_world):
    from urda_fast.hpt.config import ProxyCheckConfig
    from urda_fast.hpt.evaluate import make_attack
    from urda_fast.hpt.report import proxy_check

    for name in ("pgd0", "cw0"):
        with pytest.raises(ValueError, match=f"attack '{name}' takes no step; give at least one"):
            make_attack(torch.nn.Linear(2, 2), name, 1 / 255, 1 / 255)
    with pytest.raises(ValueError, match="--data takes one set, got 'world:digits,world:style'"):
        proxy_check(ProxyCheckConfig(target=fake_world.model_arg("target"), proxy=fake_world.model_arg("proxy"),
                                     data="world:digits,world:style", device="cpu"), fake_world)


def test_an_empty_image_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hpt: folder:.*Couldn't find any class folder.*expected .*<class>"):
        open_dataset(f"folder:{tmp_path}")


def test_resume_refuses_another_worlds_images(fake_world, tmp_path):
    import shutil

    other = tmp_path / "other_world"
    shutil.copytree(fake_world.folder, other)
    data = torch.load(other / "data.pt", weights_only=True)
    data["train"]["images"] = 255 - data["train"]["images"]
    torch.save(data, other / "data.pt")
    cfg = cfg_for(fake_world, tmp_path / "run", stop_after=1)
    train(cfg)
    with pytest.raises(ValueError, match=r"--world '.*other_world/data.pt' has changed since the run began"):
        train(replace(cfg, stop_after=0, resume=True, world=str(other)))


def test_hpt_demo_checks_its_device_before_building_the_world(monkeypatch, tmp_path):
    demo_module = sys.modules["urda_fast.hpt.demo"]  # the package's `demo` is the function
    monkeypatch.setattr(demo_module, "build_world", lambda *a, **k: pytest.fail("built the world first"))
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        demo_module.demo(str(tmp_path / "d"), device="gpu", world_dir=str(tmp_path / "w"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
            demo_module.demo(str(tmp_path / "d"), device="cuda", world_dir=str(tmp_path / "w"))
