"""What DART does at paper scale (ResNet-50 on a GPU, image files, 10,000 steps), checked on tiny data: no host reads
of tensor values in the training steps beyond the attacks' own input checks, image files decoded by worker processes
(same batches as without), pinned batches for CUDA, one read per evaluation, and UDA+VAT's pseudo-labelled target
batch with a single confident sample."""

import copy
import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ScalarReads
from torch.utils.data import TensorDataset

from urda_fast.dart import PretrainConfig, RobustifyConfig, pretrain, robustify
from urda_fast.dart.common import accuracy
from urda_fast.dart.pretrain import UdaTask
from urda_fast.dart.robustify import DartTask
from urda_fast.data import ImageList, train_stream
from urda_fast.models import ModelSpec
from urda_fast.uda import create_method

STEPS = 3


def _spec():
    return ModelSpec(backbone="digits_cnn", num_classes=10, bottleneck_dim=16)


class _CountedAttack:
    """The task's attack, counting the reads of tensor values it makes (its input checks) apart from the task's."""

    def __init__(self, attack):
        self.attack, self.reads = attack, 0

    def __call__(self, *args, **kwargs):
        with ScalarReads() as reads:
            out = self.attack(*args, **kwargs)
        self.reads += reads.count
        return out


def _reads_per_step(task):
    """(reads of the task's own, reads inside its attack) of each of STEPS steps after a first one (which may set
    up caches)."""
    task.training_step()
    if task.attack is not None:
        task.attack = _CountedAttack(task.attack)
    own, in_attack = [], []
    for _ in range(STEPS):
        before = task.attack.reads if task.attack is not None else 0
        with ScalarReads() as reads:
            task.training_step()["loss"].backward()
        attack = (task.attack.reads if task.attack is not None else 0) - before
        own.append(reads.count - attack)
        in_attack.append(attack)
    return own, in_attack


def _batches():
    torch.manual_seed(0)
    return torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))


@pytest.mark.parametrize("forward", ["split-bn", "separate"])
@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_dart_step_reads_no_tensor_values(forward, space):
    x, _ = _batches()
    teacher, student = _spec().build(), _spec().build()
    student.load_state_dict(teacher.state_dict())
    cfg = RobustifyConfig(attack_steps=3, forward=forward, attack_space=space)
    task = DartTask(cfg, teacher, student, itertools.repeat((x,)), None)
    own, in_attack = _reads_per_step(task)
    assert own == [0] * STEPS, own
    assert len(set(in_attack)) == 1, in_attack  # the attack's input checks: a fixed count per call, whatever the step


@pytest.mark.parametrize("vat", ["", "vat", "vat+target"])
@pytest.mark.parametrize("method, options", [("source-only", {}), ("dann", {}), ("cdan", {}),
                                             ("cdan", {"entropy_conditioning": True}), ("mdd", {})])
def test_uda_steps_read_no_tensor_values(method, options, vat):
    x, y = _batches()
    cfg = PretrainConfig(method=method, vat=bool(vat), vat_target=vat == "vat+target", vat_steps=2,
                         vat_threshold=0.0, **options)
    task = UdaTask(cfg, create_method(method, _spec().build(), **options), itertools.repeat((x, y)),
                   itertools.repeat((x, y)), None)
    own, in_attack = _reads_per_step(task)
    assert own == [0] * STEPS, own
    assert len(set(in_attack)) == 1, in_attack
    assert (in_attack[0] == 0) == (not vat)


def _vat_target_task(threshold):
    x, y = _batches()
    torch.manual_seed(1)
    method = create_method("dann", _spec().build())
    cfg = PretrainConfig(method="dann", vat=True, vat_target=True, vat_steps=1, vat_threshold=threshold)
    task = UdaTask(cfg, method, itertools.repeat((x, y)), itertools.repeat((x, y)), None)
    task.attack = lambda images, labels: images  # the pseudo-label term alone, on known inputs
    return task, method.model, x


def _eval_confidence(model, x):
    with torch.no_grad():
        return torch.softmax(copy.deepcopy(model).eval()(x), 1).max(1)


@pytest.mark.parametrize("kept", [0, 1, 3, 8])
def test_vat_target_pseudo_loss_is_the_mean_over_confident_samples(kept):
    """With one confident target sample the kept batch was a batch of one, which train-mode BatchNorm refuses (the
    run ended); the term is the mean cross-entropy of the confident samples, the whole batch through the model."""
    task, model, x = _vat_target_task(0.0)
    confidence, pseudo = _eval_confidence(model, x)
    ranked = confidence.sort(descending=True).values
    threshold = 0.0 if kept == 8 else float(ranked[kept]) + 1e-7 if kept == 0 else float(
        (ranked[kept - 1] + ranked[kept]) / 2)
    task.cfg.vat_threshold = threshold
    keep = confidence >= threshold
    assert int(keep.sum()) == kept
    with torch.no_grad():
        per_sample = F.cross_entropy(copy.deepcopy(model).train()(x), pseudo, reduction="none")
    expected = per_sample[keep].mean() if kept else torch.zeros(())
    out = task.training_step()
    torch.testing.assert_close(out["pseudo_loss"], expected)
    assert float(out["pseudo_kept"]) == kept / 8
    out["loss"].backward()


def test_accuracy_reads_the_count_once_not_per_batch():
    torch.manual_seed(0)
    model = _spec().build()
    data = TensorDataset(torch.rand(300, 1, 16, 16), torch.randint(0, 10, (300,)))
    with torch.no_grad():
        expected = 100.0 * float((model.eval()(data.tensors[0]).argmax(1) == data.tensors[1]).sum()) / 300
    model.train()
    counts = []
    for batch_size in (64, 10):  # 5 and 30 batches
        with ScalarReads() as reads:
            got = accuracy(model, data, "cpu", batch_size=batch_size)
        counts.append(reads.count)
        assert got == pytest.approx(expected) and model.training
    assert counts[0] == counts[1], counts  # the count is read once (the loader reads its CPU seed once too)


def test_training_batches_for_cuda_are_pinned():
    data = TensorDataset(torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.int64))
    assert train_stream(data, 4, 0, torch.device("cuda")).loader.pin_memory
    assert not train_stream(data, 4, 0, torch.device("cpu")).loader.pin_memory


# ----------------------------------------------------------------------------- image files, decoded by worker processes


def _office_like(root, count=12):
    """A tllib image list of ``count`` RGB PNGs, 3 classes, under ``root``."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(count):
        Image.new("RGB", (10, 8), (20 * i, 255 - 20 * i, 7 * i)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png {i % 3}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def readers(tmp_path, monkeypatch):
    """Which processes read image files: each read appends its process id to a file (workers are forked, so the
    patched loader is theirs too)."""
    from urda_fast.data import domains

    log, original = tmp_path / "readers.txt", domains.pil_loader

    def logged(path, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(domains, "pil_loader", logged)

    def read():
        pids = set(log.read_text().split()) if log.exists() else set()
        log.unlink(missing_ok=True)
        return pids

    return read


def test_evaluation_decodes_images_in_workers(tmp_path, readers):
    import torchvision.transforms as T

    _office_like(tmp_path / "office")
    data = ImageList(str(tmp_path / "office"), "list.txt", T.Compose([T.Grayscale(), T.Resize((16, 16)),
                                                                       T.ToTensor()]), 3)
    torch.manual_seed(0)
    model = ModelSpec(backbone="digits_cnn", num_classes=3, bottleneck_dim=8).build()
    results = {}
    for workers in (0, 2):
        results[workers] = accuracy(model, data, "cpu", batch_size=5, num_workers=workers)
        pids = readers()
        assert (pids == {str(os.getpid())}) == (workers == 0), pids
        assert len(pids) == max(workers, 1)
    assert results[0] == results[2]


def _digits_files(root):
    from PIL import Image

    for split in ("train", "test"):
        for digit in range(10):
            for k in range(2):
                path = root / "MNIST" / split / str(digit) / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (8, 8), 20 * digit + 3 * k).save(path)
    lines = []
    (root / "svhn_image").mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (8, 8), (12 * i, 0, 5 * i)).save(root / "svhn_image" / f"{i}.png")
        lines.append(f"svhn_image/{i}.png {i % 10}")
    (root / "image_list").mkdir()
    (root / "image_list" / "svhn_balanced.txt").write_text("\n".join(lines) + "\n")


def _weights(run):
    return torch.load(os.path.join(run, "last.pt"), weights_only=False)["modules"]


def test_runs_decode_images_in_workers_with_the_same_batches(tmp_path, readers):
    """Step 1 and step 2 on image files: with workers, the files are read by other processes than this one, and the
    weights come out bit for bit as without (the batches and their augmentation depend on the seed only)."""
    _digits_files(tmp_path / "digits")
    common = dict(data="digits-files", root=str(tmp_path / "digits"), iterations=6, batch_size=4, eval_every=3,
                  progress=False, tensorboard=False, device="cpu")
    for workers in (0, 2):
        pretrain(PretrainConfig(**common, source="SVHN", target="MNIST", method="dann", bottleneck_dim=8,
                                num_workers=workers, out=str(tmp_path / f"uda{workers}")))
        pids = readers()
        assert (pids == {str(os.getpid())}) == (workers == 0) and len(pids) >= max(workers, 1), pids
        robustify(RobustifyConfig(**common, teacher=str(tmp_path / f"uda{workers}"), attack_steps=2,
                                  num_workers=workers, out=str(tmp_path / f"dart{workers}")))
        pids = readers()
        assert (pids == {str(os.getpid())}) == (workers == 0) and len(pids) >= max(workers, 1), pids
    for run in ("uda", "dart"):
        a, b = _weights(tmp_path / f"{run}0"), _weights(tmp_path / f"{run}2")
        for name in a:
            for key in a[name]:
                torch.testing.assert_close(a[name][key], b[name][key], atol=0, rtol=0, msg=f"{run} {key}")


def test_num_workers_is_checked():
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        pretrain(PretrainConfig(num_workers=-1, progress=False))


@pytest.mark.parametrize("on", [True, False])
def test_cudnn_benchmark_reaches_the_loop(on, monkeypatch):
    from urda_fast.dart import common

    monkeypatch.setattr(common, "fit", lambda task, optimizer, scheduler, settings, **kw: settings)
    settings = common.run_loop(None, None, None, RobustifyConfig(cudnn_benchmark=on, out="unused"), "cpu", {})
    assert settings.cudnn_benchmark is on


def test_backbone_weights_from_training_scripts_load_and_other_networks_are_named(tmp_path):
    """ImageNet backbones come as torchvision state dicts, or inside a training script's checkpoint ({"state_dict":
    ...} with DistributedDataParallel's "module." prefix): both load. Another network's weights (a tensor of
    another shape) are one error naming the file, not load_state_dict's list of hundreds of lines."""
    import torchvision

    torch.manual_seed(0)
    weights = torchvision.models.resnet18().state_dict()
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, tmp_path / "ddp.pth")
    spec = dict(backbone="resnet18", num_classes=5, bottleneck_dim=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = ModelSpec(**spec, backbone_weights=str(tmp_path / "ddp.pth")).build()
    assert torch.equal(model.backbone.layer1[0].conv1.weight, weights["layer1.0.conv1.weight"])
    weights["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(weights, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth' is not a resnet18 checkpoint \(1 shape mismatch"):
        ModelSpec(**spec, backbone_weights=str(tmp_path / "other.pth")).build()
