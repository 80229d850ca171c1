"""HPT at paper scale, on small stand-ins: text towers encoding many prompts, checkpoints as other code writes them
(OpenAI's TorchScript archives, open_clip's training checkpoints, the TeCoA / PMG-AFT code's image towers, another
ViT's weights), TinyImageNet's val layout, and evaluation loaders for a GPU."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from urda_fast.hpt import zero_shot
from urda_fast.hpt.clip_models import TINY_CONFIGS, load_clip
from urda_fast.hpt.zero_shot import ZeroShotClassifier


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return load_clip("urda-tiny-vit", None)


# ------------------------------------------------------------------------------------------------- text features
@pytest.mark.parametrize("cache_text", [True, False])
def test_prompts_go_through_the_text_tower_in_bounded_batches(tiny_clip, monkeypatch, cache_text):
    """ImageNet's 1000 classes x 80 templates as one text-tower batch needs ~145 GB for ViT-B-32: the prompts go
    through in batches of TEXT_BATCH, and the class embeddings are those of the whole set at once."""
    model, tokenizer = tiny_clip
    names, templates = ["zero", "one", "two", "three", "four"], ["a photo of the number {}", "the digit {}"]
    head = ZeroShotClassifier(model, tokenizer, names, templates, cache_text=cache_text)
    rows, encode = [], model.encode_text
    monkeypatch.setattr(zero_shot, "TEXT_BATCH", 4)
    monkeypatch.setattr(model, "encode_text", lambda tokens, **kw: rows.append(tokens.shape[0]) or encode(tokens, **kw))
    got = head.text_features()
    assert rows == [4, 4, 2]
    assert got.requires_grad != cache_text  # a trained text tower still gets its gradients through every batch
    monkeypatch.undo()
    with torch.no_grad():  # by hand, all ten prompts at once
        text = F.normalize(model.encode_text(tokenizer([t.format(n) for n in names for t in templates])), dim=-1)
        want = F.normalize(text.reshape(5, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- checkpoints
def _register(tmp_path, name, cfg):
    import open_clip

    folder = tmp_path / f"configs_{name}"
    folder.mkdir()
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder))


def _openai_archive(model, path):
    """A TorchScript archive as OpenAI released CLIP's weights (``clip.load``'s ViT-B-32.pt): a traced CLIP whose
    state dict holds the open_clip names, plus the constants their build_model pops, and no attention mask."""
    import copy

    traced = copy.deepcopy(model)
    traced._buffers.pop("attn_mask")
    traced.register_buffer("input_resolution", torch.tensor(32))
    image = torch.rand(1, 3, 32, 32)
    torch.jit.trace_module(traced, {"encode_image": image}, check_trace=False).save(str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # tracing the stand-in
def test_openais_torchscript_archives_load_under_a_quickgelu_architecture(tmp_path):
    import open_clip

    from urda_fast.hpt.clip_models import register_tiny_configs

    register_tiny_configs()
    _register(tmp_path, "urda-test-tiny-vit-quickgelu", {**TINY_CONFIGS["urda-tiny-vit"], "quick_gelu": True})
    torch.manual_seed(3)
    original = open_clip.create_model("urda-test-tiny-vit-quickgelu", pretrained=None).eval()
    _openai_archive(original, tmp_path / "ViT-T.pt")
    loaded, _ = load_clip("urda-test-tiny-vit-quickgelu", str(tmp_path / "ViT-T.pt"))
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), original.encode_image(x), rtol=1e-4, atol=1e-5)
    # the same weights under GELU would load without a word and compute another function
    with pytest.raises(ValueError, match="TorchScript archive, the format of OpenAI's released CLIP weights, which "
                                         "were trained with QuickGELU; .* use urda-tiny-vit-quickgelu"):
        load_clip("urda-tiny-vit", str(tmp_path / "ViT-T.pt"))
    # the archive's state_dict() saved as a plain file: its constants tell it apart, the same rule holds
    constants = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                 "vocab_size": torch.tensor(49408)}
    torch.save({**original.state_dict(), **constants}, tmp_path / "openai_state.pt")
    loaded, _ = load_clip("urda-test-tiny-vit-quickgelu", str(tmp_path / "openai_state.pt"))
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="holds the state dict of OpenAI's released CLIP weights, which were trained "
                                         "with QuickGELU; .* use urda-tiny-vit-quickgelu"):
        load_clip("urda-tiny-vit", str(tmp_path / "openai_state.pt"))


def test_open_clip_training_checkpoints_load_and_image_towers_alone_are_named(tiny_clip, tmp_path):
    model, _ = tiny_clip
    state = model.state_dict()
    # open_clip's training script: DDP's "module." names under "state_dict", beside the optimizer's state
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "epoch_3.pt")
    loaded, _ = load_clip("urda-tiny-vit", str(tmp_path / "epoch_3.pt"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    # the TeCoA / PMG-AFT code: model.visual's weights and an empty visual prompter's under "state_dict"
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    torch.save({"epoch": 10, "state_dict": {}, "add_prompter": {}, "vision_encoder_state_dict": visual,
                "best_acc1": 31.5, "optimizer": {}}, tmp_path / "model_best.pth.tar")
    with pytest.raises(ValueError, match=r"holds an image tower only \('vision_encoder_state_dict'.*TeCoA / PMG-AFT"
                                         r".*merge it into its base CLIP"):
        load_clip("urda-tiny-vit", str(tmp_path / "model_best.pth.tar"))


def test_vit_b_16_weights_given_as_vit_b_32_name_the_mismatch(tmp_path):
    import open_clip

    torch.manual_seed(0)
    b16 = open_clip.create_model("ViT-B-16", pretrained=None)
    torch.save({k: v.half() for k, v in b16.state_dict().items()}, tmp_path / "vitb16.pt")  # half: a smaller file
    del b16
    with pytest.raises(ValueError, match=r"does not hold weights for architecture ViT-B-32 \(2 shape mismatch\(es\): "
                                         r"visual\.positional_embedding \[197, 768\] in the file vs \[50, 768\] here, "
                                         r"visual\.conv1\.weight \[768, 3, 16, 16\] in the file vs \[768, 3, 32, 32\]"):
        load_clip("ViT-B-32", str(tmp_path / "vitb16.pt"))


# ------------------------------------------------------------------------------------------------- TinyImageNet
WNIDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra salamandra",
         "n02124075": "Egyptian cat"}
VAL = [("val_0.JPEG", "n02124075"), ("val_1.JPEG", "n01443537"), ("val_2.JPEG", "n02124075"),
       ("val_3.JPEG", "n01629819")]


@pytest.fixture
def tiny_imagenet(tmp_path):
    """tiny-imagenet-200.zip's layout, unpacked: 3 classes, 2 training images each, 4 val images in one folder."""
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    for wnid in WNIDS:
        (base / "train" / wnid / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
    (base / "val" / "images").mkdir(parents=True)
    for name, _ in VAL:
        Image.new("RGB", (64, 64)).save(base / "val" / "images" / name)
    (base / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t10\t10\n" for n, w in VAL))
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    (base / "words.txt").write_text("".join(f"{w}\t{words}\n" for w, words in WNIDS.items()) + "n09999999\tother\n")
    return tmp_path


def test_tinyimagenets_val_split_is_read_from_its_annotations(tiny_imagenet):
    from urda_fast.hpt.data import open_dataset, tinyimagenet

    train = tinyimagenet(str(tiny_imagenet))
    val = open_dataset("tinyimagenet", root=str(tiny_imagenet), image_size=32)
    order = sorted(WNIDS)  # ImageFolder's class order on train/
    assert val.classnames == train.classnames == ["goldfish", "european fire salamander", "egyptian cat"]
    assert len(val.dataset) == len(VAL) and len(train.dataset) == 6
    for index, (_, wnid) in enumerate(VAL):
        image, label = val.dataset[index]
        assert label == order.index(wnid) and image.shape == (3, 32, 32)


@pytest.mark.parametrize("sorted_layout", ["val/<wnid>/images", "val/<wnid>"])
def test_tinyimagenets_val_split_sorted_into_class_folders(tiny_imagenet, sorted_layout):
    """The val split after the widely used script that sorts it into class folders (val_annotations.txt kept); a
    listed image that is missing is an error when the set is opened, not at a run's first evaluation."""
    from urda_fast.hpt.data import open_dataset

    val = tiny_imagenet / "tiny-imagenet-200" / "val"
    for name, wnid in VAL:
        folder = val / wnid / "images" if sorted_layout.endswith("images") else val / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (val / "images" / name).rename(folder / name)
    (val / "images").rmdir()
    zs = open_dataset("tinyimagenet", root=str(tiny_imagenet), image_size=32)
    assert [label for _, label in zs.dataset.samples] == [sorted(WNIDS).index(w) for _, w in VAL]
    assert zs.dataset[3][0].shape == (3, 32, 32)
    os.remove(zs.dataset.samples[2][0])
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 images that val_annotations\.txt lists are missing, "
                                                r"e\.g\. .*val_2\.JPEG"):
        open_dataset("tinyimagenet", root=str(tiny_imagenet), image_size=32)


def test_tinyimagenet_val_annotations_that_are_empty_or_short_are_named(tiny_imagenet):
    from urda_fast.hpt.data import open_dataset

    annotations = tiny_imagenet / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    for text, match in (("\n", "lists no images"), ("val_0.JPEG\tn02124075\nval_1.JPEG\n", "entry 2 has no class")):
        annotations.write_text(text)
        with pytest.raises(ValueError, match=f"val_annotations.txt {match}: expected tab-separated lines"):
            open_dataset("tinyimagenet", root=str(tiny_imagenet))


def test_tinyimagenet_beside_imagenet_under_one_root(tiny_imagenet):
    """One --root for every set: ImageNet's train/ beside tiny-imagenet-200/ must not be taken for TinyImageNet's."""
    from urda_fast.hpt.data import open_dataset, tinyimagenet

    (tiny_imagenet / "train" / "n01440764").mkdir(parents=True)
    assert len(tinyimagenet(str(tiny_imagenet)).dataset) == 6
    assert len(open_dataset("tinyimagenet", root=str(tiny_imagenet)).dataset) == len(VAL)
    assert len(tinyimagenet(str(tiny_imagenet / "tiny-imagenet-200")).dataset) == 6  # the folder itself


def test_wordnet_class_names_that_collide_are_told_apart():
    """ImageNet's devkit: two synsets named only 'crane' (bird, machine), 'maillot' and 'maillot, tank suit'."""
    from urda_fast.hpt.data import wordnet_classnames

    wnids = ["n01440764", "n02012849", "n03126707", "n03710637", "n03710721"]
    synonyms = [("tench", "Tinca tinca"), ("crane",), ("crane",), ("maillot",), ("maillot", "tank suit")]
    assert wordnet_classnames("imagenet", wnids, synonyms) == ["tench", "crane bird", "construction crane", "maillot",
                                                               "tank suit"]
    with pytest.warns(UserWarning, match=r"share the zero-shot names \['ray'\]"):
        wordnet_classnames("other", ["n1", "n2"], [("ray",), ("ray",)])


def test_zero_shot_sets_pickle_for_spawned_loader_workers(tiny_imagenet):
    """Loader workers started by spawn / forkserver (macOS, Windows, Python 3.14's Linux default) pickle the set."""
    import pickle

    from PIL import Image

    from urda_fast.hpt.data import eval_transform, open_dataset, tinyimagenet

    for label in ("cat", "dog"):
        (tiny_imagenet / "pets" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (60 * i, 90, 0)).save(tiny_imagenet / "pets" / label / f"{i}.png")
    for zs in (open_dataset("tinyimagenet", root=str(tiny_imagenet), image_size=32),
               tinyimagenet(str(tiny_imagenet), eval_transform(32)),
               open_dataset(f"folder:{tiny_imagenet / 'pets'}", image_size=32)):
        copy = pickle.loads(pickle.dumps(zs.dataset))
        assert torch.equal(copy[1][0], zs.dataset[1][0]) and copy[1][1] == zs.dataset[1][1]


def test_an_unreadable_image_in_a_class_folder_set_is_one_line(tmp_path):
    from urda_fast.data.domains import ImageReadError
    from urda_fast.hpt.data import open_dataset

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=r"cannot read image .*cat/a\.jpg"):
        open_dataset(f"folder:{tmp_path}").dataset[0]


def test_a_corrupt_torchvision_set_is_not_called_missing(tmp_path):
    from urda_fast.hpt.data import open_dataset

    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"truncated")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py is there, but torchvision found it incomplete "
                                                "or corrupted"):
        open_dataset("cifar10", root=str(tmp_path))


def test_an_image_folder_without_class_folders_is_an_error(tiny_imagenet):
    """TinyImageNet's val/ as an ImageFolder: one class, "images", so every prediction is right (100%)."""
    from urda_fast.hpt.data import open_dataset

    base = tiny_imagenet / "tiny-imagenet-200"
    with pytest.raises(ValueError, match=r"1 class folder\(s\) \['images'\]: a zero-shot set needs at least 2"):
        open_dataset(f"folder:{base / 'val'}")
    with pytest.raises(ValueError, match="class folders are WordNet ids .*use the dataset names imagenet or "
                                         "tinyimagenet"):
        open_dataset(f"folder:{base / 'train'}")  # "a photo of a n01443537"


def test_training_on_tinyimagenet_is_validated_on_its_val_split(tiny_imagenet, tmp_path):
    from urda_fast.hpt import TrainConfig
    from urda_fast.hpt.train import training_set, validation_sets

    cfg = TrainConfig(train_data="tinyimagenet", root=str(tiny_imagenet), image_size=32, eval_max_batches=0)
    sets = validation_sets(cfg, None, training_set(cfg, None))
    assert [zs.name for zs in sets] == ["tinyimagenet:val"] and len(sets[0].dataset) == len(VAL)
    assert [label for _, label in sets[0].dataset.samples] == [sorted(WNIDS).index(w) for _, w in VAL]


# ------------------------------------------------------------------------------------------------- evaluation
def test_evaluation_batches_are_pinned_for_a_gpu():
    from urda_fast.data import eval_loader

    data = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    assert eval_loader(data, 2, 4, torch.device("cuda")).pin_memory
    assert not eval_loader(data, 2, 4, "cpu").pin_memory
    assert eval_loader(data, 2, 4, "cpu").num_workers == 0  # in-memory tensors: no worker processes


def test_cifar_and_stl10_are_read_at_their_own_resolution(monkeypatch):
    """The PMG-AFT / HPT-GPD protocol: CIFAR and STL-10 as ToTensor images (32x32, 96x96), resized bicubically for
    the model inside the attacked head, so the eps-ball lives at their resolution; the other sets Resize(256) and
    CenterCrop(224). Before, every set was resized to 224 first: another, stronger threat model."""
    from PIL import Image

    from urda_fast.hpt import data

    class FakeSet(torch.utils.data.Dataset):
        classes = ["airplane", "automobile"]

        def __init__(self, transform, size):
            self.transform, self.size = transform, size

        def __len__(self):
            return 2

        def __getitem__(self, index):
            return self.transform(Image.new("RGB", self.size, (10 * index, 0, 0))), index

    for name, size, want in (("cifar10", (32, 32), (32, 32)), ("stl10", (96, 96), (96, 96)),
                             ("dtd", (300, 200), (224, 224))):
        monkeypatch.setitem(data.EVAL_DATASETS, name, (lambda root, tf, size=size: FakeSet(tf, size), "x/"))
        assert tuple(data.open_dataset(name, root="/unused").dataset[0][0].shape) == (3, *want), name


def test_the_head_resizes_bicubically(tiny_clip):
    model, tokenizer = tiny_clip
    head = ZeroShotClassifier(model, tokenizer, ["zero", "one"], ["a photo of the number {}"])
    images = torch.rand(2, 3, 8, 8)
    want = (F.interpolate(images, size=head.image_size, mode="bicubic", align_corners=False) - head.mean) / head.std
    torch.testing.assert_close(head.normalize(images), want)
