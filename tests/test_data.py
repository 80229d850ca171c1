"""Data layer: the offline digits shift (shapes, ranges, balance, determinism, cache, a real domain gap), tllib image
lists / ImageFolder trees on tiny PNGs written here, their error messages, and loaders that resume bit-for-bit."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from urda_fast.data import digits as D
from urda_fast.data import domains as M


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    return D.load_digits_shift(cache_dir=str(tmp_path_factory.mktemp("digits_cache")))


# ------------------------------------------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_balance(shift):
    assert shift.num_classes == 10 and shift.domains == ("printed", "handwritten")
    for ds, n in [(shift.source_train, 3000), (shift.target_train, 1257), (shift.target_test, 540)]:
        x, y = ds.tensors
        assert x.shape == (n, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
        assert set(y.tolist()) == set(range(10))
    assert torch.bincount(shift.source_train.tensors[1]).tolist() == [300] * 10
    # The stratified hold-out keeps every class at ~30% of its count.
    counts = torch.bincount(shift.target_test.tensors[1])
    assert counts.min() >= 50 and counts.max() <= 56
    assert "printed" in shift.describe() and "load_digits" in shift.describe()


def test_digits_sizes_and_no_blank_images(tmp_path):
    task = D.load_digits_shift(cache_dir=str(tmp_path), num_source=100, size=8)
    x = task.source_train.tensors[0]
    assert x.shape == (100, 1, 8, 8)
    # 8x8 is the raw sensor output: counts/16 on both domains; every printed digit has ink.
    assert torch.allclose(x * 16, (x * 16).round()) and (x.flatten(1).sum(1) > 0).all()
    assert torch.allclose(task.target_test.tensors[0] * 16, (task.target_test.tensors[0] * 16).round())


def test_digits_deterministic_per_seed(tmp_path):
    a = D.load_digits_shift(cache_dir=str(tmp_path / "a"), seed=3, num_source=200)
    b = D.load_digits_shift(cache_dir=str(tmp_path / "b"), seed=3, num_source=200)
    c = D.load_digits_shift(cache_dir=str(tmp_path / "c"), seed=4, num_source=200)
    for ta, tb in zip(a.source_train.tensors, b.source_train.tensors):
        assert torch.equal(ta, tb)
    assert not torch.equal(a.source_train.tensors[0], c.source_train.tensors[0])
    # The target split does not depend on the source seed.
    assert torch.equal(a.target_test.tensors[1], c.target_test.tensors[1])


def test_digits_cache_reused_and_versioned(tmp_path, monkeypatch):
    D.load_digits_shift(cache_dir=str(tmp_path), num_source=50)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".pt")  # no temporary file left behind

    def fail(*a, **k):
        raise AssertionError("rendered again although the cache holds this recipe")

    monkeypatch.setattr(D, "render_printed_digits", fail)
    D.load_digits_shift(cache_dir=str(tmp_path), num_source=50)
    monkeypatch.undo()
    # A new recipe version must not reuse the old file.
    monkeypatch.setattr(D, "RECIPE_VERSION", D.RECIPE_VERSION + 1)
    D.load_digits_shift(cache_dir=str(tmp_path), num_source=50)
    assert len(os.listdir(tmp_path)) == 2


def test_digits_cache_env_and_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("URDA_FAST_CACHE", str(tmp_path))
    D.load_digits_shift(num_source=20)
    (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable digits cache"):
        task = D.load_digits_shift(num_source=20)  # regenerates instead of failing
    assert len(task.source_train) == 20 and path.stat().st_size > 100


def test_digits_domain_gap(shift):
    # 5-nearest-neighbours (milliseconds; no solver to converge) fitted on printed digits beats chance on handwriting
    # but stays well below one fitted on handwriting: the shift is real. Measured: ~60% vs ~98% (a small CNN trained
    # 1,500 iterations: ~69-71% vs ~99.6%).
    from sklearn.neighbors import KNeighborsClassifier

    def fit_score(train):
        x, y = train.tensors
        model = KNeighborsClassifier(5).fit(x.flatten(1).numpy(), y.numpy())
        xt, yt = shift.target_test.tensors
        return model.score(xt.flatten(1).numpy(), yt.numpy())

    source_only, oracle = fit_score(shift.source_train), fit_score(shift.target_train)
    assert 0.3 < source_only < oracle - 0.2, (source_only, oracle)
    assert oracle > 0.9


# ------------------------------------------------------------------------------------------------- image lists/folders


def _png(path, value, size=(12, 10), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def _office_amazon(root, labels=(0, 1, 30)):
    lines = []
    for i, label in enumerate(labels):
        rel = f"amazon/images/class{label}/frame_{i:04d}.jpg"
        _png(os.path.join(root, rel), 40 * i)
        lines.append(f"{rel} {label}")
    os.makedirs(os.path.join(root, "image_list"), exist_ok=True)
    with open(os.path.join(root, "image_list", "amazon.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_image_list_reads_tllib_format(tmp_path):
    _office_amazon(str(tmp_path))
    ds = M.open_domain("Office31", str(tmp_path), "A", "train", transform=M.val_transform(32, 24))
    assert len(ds) == 3 and [ds[i][1] for i in range(3)] == [0, 1, 30]
    img, _ = ds[2]
    assert img.shape == (3, 24, 24) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert torch.allclose(img, torch.full_like(img, 80 / 255), atol=1 / 255)  # ToTensor only: no Normalize
    x, _ = M.open_domain("Office31", str(tmp_path), "A", "test", transform=M.train_transform(32, 16))[0]
    assert x.shape == (3, 16, 16)


def test_image_list_with_a_byte_order_mark_and_crlf_line_ends(tmp_path):
    """A list saved by a Windows editor: a UTF-8 byte-order mark before the first path, CRLF line ends."""
    _png(str(tmp_path / "img" / "a.png"), 0)
    _png(str(tmp_path / "img" / "b.png"), 0)
    (tmp_path / "list.txt").write_bytes("\ufeffimg/a.png 3\r\nimg/b.png 4\r\n".encode("utf-8"))
    ds = M.ImageList(str(tmp_path), "list.txt", num_classes=10)
    assert ds.samples == [(str(tmp_path / "img" / "a.png"), 3), (str(tmp_path / "img" / "b.png"), 4)]


def test_image_list_paths_with_spaces_and_grey_mode(tmp_path):
    _png(str(tmp_path / "my dir" / "a b.png"), 255, mode="L")
    (tmp_path / "list.txt").write_text("my dir/a b.png 7\n\n")
    ds = M.ImageList(str(tmp_path), "list.txt", M.val_transform(8, None), num_classes=10, mode="L")
    x, y = ds[0]
    assert y == 7 and x.shape == (1, 8, 8) and torch.allclose(x, torch.ones_like(x))


def test_image_list_keeps_runs_of_whitespace_in_paths_and_reads_other_encodings(tmp_path):
    """A path's inner runs of spaces and tabs are its own (the list was split on whitespace and joined with single
    spaces); a list saved in latin-1 names its files by their bytes (it raised a bare UnicodeDecodeError)."""
    _png(str(tmp_path / "two  spaces" / "a\tb.png"), 0)
    (tmp_path / "list.txt").write_text("two  spaces/a\tb.png 1\n")
    assert M.ImageList(str(tmp_path), "list.txt").samples == [(str(tmp_path / "two  spaces" / "a\tb.png"), 1)]
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    _png(os.fsdecode(name), 0)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9.png 2\n")
    ds = M.ImageList(str(tmp_path), "latin.txt", M.val_transform(8, None))
    assert os.fsencode(ds.samples[0][0]) == name and ds[0][1] == 2


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert clips a 16-bit grey image (mode I;16) at 255: a stroke at 0.61 of full scale read as white."""
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    for mode in ("L", "RGB"):
        got = np.asarray(M.pil_loader(str(tmp_path / "deep.png"), mode), dtype=np.float64)
        want = ramp.astype(np.float64) * 255 / 65535
        assert np.abs((got if mode == "L" else got[..., 1]) - want).max() <= 0.5
    Image.fromarray(ramp).save(tmp_path / "deep.pgm")  # opens as mode I, its rawmode I;16B
    got = np.asarray(M.pil_loader(str(tmp_path / "deep.pgm"), "L"), dtype=np.float64)
    assert np.abs(got - ramp.astype(np.float64) * 255 / 65535).max() <= 0.5
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "wide.tiff")
    with pytest.raises(M.ImageReadError, match=r"wide\.tiff' holds 32-bit integer pixels"):
        M.pil_loader(str(tmp_path / "wide.tiff"))
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(M.ImageReadError, match=r"float\.tiff' holds float pixels.*8-bit"):
        M.pil_loader(str(tmp_path / "float.tiff"))


def test_digits_image_folder_tree(tmp_path):
    for digit in range(10):
        _png(str(tmp_path / "MNIST" / "train" / str(digit) / "0.png"), 25 * digit, size=(28, 28), mode="L")
    train_t, _ = M.default_transforms("Digits")
    ds = M.open_domain("Digits", str(tmp_path), "MNIST", "train", transform=train_t)
    assert len(ds) == 10 and sorted(ds[i][1] for i in range(10)) == list(range(10))
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and torch.allclose(x, torch.full_like(x, 25 * y / 255), atol=1 / 255)


def test_digits_in_tllibs_folder_per_domain(tmp_path, monkeypatch):
    """tllib's data/digits: each domain's lists in <root>/<DOMAIN>/image_list/, paths relative to <root>/<DOMAIN>;
    the error for a missing one names both layouts, and a root given with ~ is expanded."""
    for domain, prefix in (("MNIST", "mnist_train"), ("USPS", "usps_train")):
        lines = []
        for digit in (3, 7):
            rel = f"{prefix}_image/{digit}.png"
            _png(str(tmp_path / "digits" / domain / rel), 20 * digit, size=(28, 28), mode="L")
            lines.append(f"{rel} {digit}")
        os.makedirs(tmp_path / "digits" / domain / "image_list")
        (tmp_path / "digits" / domain / "image_list" / f"{prefix}.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    for domain in ("MNIST", "USPS"):
        ds = M.open_domain("Digits", "~/digits", domain, "train", transform=M.default_transforms("Digits")[1])
        assert [ds[i][1] for i in range(2)] == [3, 7] and ds[1][0].shape == (1, 28, 28)
        assert torch.allclose(ds[1][0], torch.full((1, 28, 28), 140 / 255), atol=1 / 255)
    with pytest.raises(FileNotFoundError, match=r"image_list/svhn_balanced\.txt.*digits/SVHN/image_list"):
        M.open_domain("Digits", str(tmp_path / "digits"), "SVHN", "train")


def test_rgb_digit_domains_read_their_own_folder_or_the_grey_domains(tmp_path):
    """tllib downloads SVHNRGB into <root>/SVHNRGB/; the same files under <root>/SVHN/ serve too. Either way the
    images come as RGB at 32x32, and a missing one names every place looked at."""
    rel = "svhn_image/0.png"
    for root, colour in (("a", (10, 20, 30)), ("b", (40, 50, 60))):
        domain = tmp_path / root / ("SVHN" if root == "a" else "SVHNRGB")
        (domain / "svhn_image").mkdir(parents=True)
        Image.new("RGB", (28, 28), colour).save(domain / rel)
        folder = domain / "image_list"
        folder.mkdir()
        (folder / "svhn_balanced.txt").write_text(f"{rel} 4\n")
        ds = M.open_domain("Digits", str(tmp_path / root), "SVHNRGB", "test",
                           transform=M.default_transforms("Digits", "SVHNRGB")[1])
        x, y = ds[0]
        assert y == 4 and x.shape == (3, 32, 32)
        assert torch.allclose(x, torch.tensor(colour).view(3, 1, 1) / 255 * torch.ones(3, 32, 32), atol=1 / 255)
    grey = M.open_domain("Digits", str(tmp_path / "a"), "SVHN", "test", transform=M.default_transforms("Digits")[1])
    assert grey[0][0].shape == (1, 28, 28)
    with pytest.raises(FileNotFoundError, match=r"a/MNISTRGB/image_list/mnist_test\.txt.*"
                                                r"a/MNIST/image_list/mnist_test\.txt.*a/MNIST/test/<digit>"):
        M.open_domain("Digits", str(tmp_path / "a"), "MNISTRGB", "test")


def test_missing_image_is_named_with_its_line(tmp_path):
    _png(str(tmp_path / "a.png"), 0)
    (tmp_path / "list.txt").write_text("\na.png 1\n\nb.png 2\n")
    with pytest.raises(FileNotFoundError, match=r"b\.png.*\(line 4\)"):
        M.ImageList(str(tmp_path), "list.txt", num_classes=10)


def test_digit_folders_must_be_digits(tmp_path):
    for name in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]:
        _png(str(tmp_path / "USPS" / "test" / name / "0.png"), 0, mode="L")
    with pytest.raises(ValueError, match="0..9"):
        M.open_domain("Digits", str(tmp_path), "USPS", "test")


def test_error_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image_list/amazon\.txt.*amazon/images/back_pack/frame_0001\.jpg 0"):
        M.open_domain("Office31", str(tmp_path / "nowhere"), "A")


def test_error_missing_list_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image_list/Art\.txt.*Art/"):
        M.open_domain("OfficeHome", str(tmp_path), "Ar")
    with pytest.raises(FileNotFoundError, match=r"image_list/mnist_test\.txt.*ImageFolder tree .*MNIST/test"):
        M.open_domain("Digits", str(tmp_path), "MNIST", "test")


def test_error_missing_image_names_first(tmp_path):
    _office_amazon(str(tmp_path))
    os.remove(tmp_path / "amazon/images/class1/frame_0001.jpg")
    os.remove(tmp_path / "amazon/images/class30/frame_0002.jpg")
    with pytest.raises(FileNotFoundError, match=r"class1/frame_0001\.jpg"):
        M.open_domain("Office31", str(tmp_path), "A")


@pytest.mark.parametrize("line, match", [("x.png 31", "out of range"), ("x.png -1", "label from 0 up"),
                                         ("x.png cat", "label from 0 up"), ("x.png", "label from 0 up"),
                                         ("x.png +2", "label from 0 up"), ("x.png 1_0", "label from 0 up"),
                                         ("x.png 1.0", "label from 0 up")])
def test_error_bad_labels(tmp_path, line, match):
    _png(str(tmp_path / "x.png"), 0)
    os.makedirs(tmp_path / "image_list")
    (tmp_path / "image_list" / "webcam.txt").write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        M.open_domain("Office31", str(tmp_path), "W")


def test_error_unknown_dataset_and_domain(tmp_path):
    with pytest.raises(ValueError, match="Office31"):
        M.open_domain("Office32", str(tmp_path), "A")
    with pytest.raises(ValueError, match="Synthetic, Real"):
        M.open_domain("VisDA2017", str(tmp_path), "A")


def test_relative_root_reads_image_lists(tmp_path, monkeypatch):
    """A relative root works as an absolute one: the list's path was joined to the root twice
    ('office31/office31/image_list/amazon.txt')."""
    _office_amazon(str(tmp_path / "office31"))
    monkeypatch.chdir(tmp_path)
    ds = M.open_domain("Office31", "office31", "A", "train", transform=M.val_transform(8, None))
    assert len(ds) == 3 and ds[2][1] == 30 and ds[0][0].shape == (3, 8, 8)
    assert ds.list_file == os.path.join("office31", "image_list", "amazon.txt")


def test_unreadable_image_names_the_file_and_the_list(tmp_path):
    """A corrupt image is one line naming the file (and the list and line that point at it), of a type the command
    line reports as bad input: not PIL's UnidentifiedImageError traceback at the first batch that holds it."""
    from urda_fast.cli import _is_user_error

    _office_amazon(str(tmp_path))
    (tmp_path / "amazon/images/class1/frame_0001.jpg").write_bytes(b"not an image")
    ds = M.open_domain("Office31", str(tmp_path), "A", "train", transform=M.val_transform(8, None))
    ds[0]
    with pytest.raises(M.ImageReadError, match=r"class1/frame_0001\.jpg' \(line 2 of image list .*amazon\.txt\) "
                                               r"\(PIL does not recognise it") as err:
        ds[1]
    assert _is_user_error(err.value) and "\n" not in str(err.value)
    for digit in range(10):
        _png(str(tmp_path / "USPS" / "train" / str(digit) / "0.png"), 0, mode="L")
    (tmp_path / "USPS" / "train" / "3" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    folder = M.open_domain("Digits", str(tmp_path), "USPS", "train")
    with pytest.raises(M.ImageReadError, match=r"cannot read image '.*USPS/train/3/0\.png'"):
        folder[3]


def test_unreadable_image_read_by_a_loader_worker_is_the_same_one_line(tmp_path):
    """DataLoader re-raises a worker's error with the worker's traceback (PIL's too) as its message: the error a
    training run or an evaluation with --num-workers shows must be the line the file's own read gives."""
    _office_amazon(str(tmp_path))
    (tmp_path / "amazon/images/class1/frame_0001.jpg").write_bytes(b"not an image")
    ds = M.open_domain("Office31", str(tmp_path), "A", "train", transform=M.val_transform(8, None))
    with pytest.raises(M.ImageReadError) as direct:
        ds[1]
    stream = M.train_stream(ds, 3, 0, "cpu", num_workers=2)
    with pytest.raises(M.ImageReadError) as through_worker:
        next(stream)
    assert str(through_worker.value) == str(direct.value)


class _ReadBy(torch.utils.data.Dataset):
    """Each sample: its index, a draw of its (reseeded) random transform, and the pid of the process that read it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([float(i), float(torch.rand(())), float(os.getpid())])


def test_train_stream_workers_persist_across_epochs_and_batches_do_not_depend_on_them():
    """Workers are started once per stream, not once per epoch (a small domain's epoch is a few dozen steps); the
    batches, across epochs and a mid-epoch resume that drops prefetched ones, are those of a stream without them."""
    def run(workers, resume_at=None):
        stream = M.train_stream(_ReadBy(), 2, 0, "cpu", num_workers=workers)
        batches = []
        for step in range(12):  # 3 epochs of 4 batches
            if step == resume_at:
                stream.load_state_dict(stream.state_dict())
            batches.append(next(stream))
        return torch.stack(batches)

    plain, with_workers, resumed = run(0), run(2), run(2, resume_at=6)
    assert torch.equal(plain[..., :2], with_workers[..., :2]) and torch.equal(plain[..., :2], resumed[..., :2])
    readers = set(with_workers[..., 2].flatten().tolist())
    assert len(readers) == 2 and os.getpid() not in readers, readers


_GROUP_SIGNAL_RUN = """
import os, signal, sys
import torch
from torch.utils.data import Dataset
from urda_fast.data import train_stream

class Groups(Dataset):  # each sample: the process group of the process that read it
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return torch.tensor(os.getpgrp())

received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # as the training loop's handler
stream = train_stream(Groups(), 2, 0, "cpu", num_workers=2)
groups = [next(stream), next(stream)]  # one batch from each worker: both are set up
os.killpg(os.getpgrp(), signal.SIGTERM)  # a preemption / `timeout` / `kill -- -PGID`: the whole process group
groups += [next(stream) for _ in range(8)]  # the step goes on, into the next epochs
assert received == [signal.SIGTERM], received
assert os.getpgrp() not in torch.cat(groups).tolist()
print("ok")
"""


def test_loader_workers_outlive_a_signal_to_the_process_group(tmp_path):
    """A SIGTERM (or Ctrl-C) to the process group killed the loader workers, and torch then raised in the main process
    at once: the training loop could not finish its step and save last.pt. Workers leave the group."""
    (tmp_path / "run.py").write_text(_GROUP_SIGNAL_RUN)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_empty_list_or_class_folder_names_it(tmp_path):
    os.makedirs(tmp_path / "image_list")
    (tmp_path / "image_list" / "webcam.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"image list .*image_list/webcam\.txt holds no images"):
        M.open_domain("Office31", str(tmp_path), "W")
    for digit in range(9):
        _png(str(tmp_path / "MNIST" / "test" / str(digit) / "0.png"), 0, mode="L")
    os.makedirs(tmp_path / "MNIST" / "test" / "9")  # a class folder without images
    with pytest.raises(FileNotFoundError, match=r"image folder '.*MNIST/test': Found no valid file for the classes 9"):
        M.open_domain("Digits", str(tmp_path), "MNIST", "test")


# ------------------------------------------------------------------------------------------------------------ loaders


def _indexed(n=10):
    return torch.utils.data.TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.int64))


def test_forever_iterator_crosses_epochs():
    loader = M.make_loader(_indexed(10), batch_size=4, train=True, seed=1)
    it = M.ForeverDataIterator(loader)
    assert len(it) == 2  # drop_last: 10 samples make 2 full batches
    epochs = [torch.cat([next(it)[0] for _ in range(2)]) for _ in range(3)]
    for e in epochs:
        assert len(set(e.tolist())) == 8
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_loader_seeded_and_leaves_global_rng_alone():
    def order(seed):
        return torch.cat([b[0] for b in M.make_loader(_indexed(), 3, train=True, seed=seed, drop_last=False)])

    state = torch.get_rng_state()
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert sorted(order(5).tolist()) == list(range(10))
    assert torch.equal(torch.get_rng_state(), state)
    test = M.make_loader(_indexed(), 4, train=False)
    assert torch.cat([b[0] for b in test]).tolist() == list(range(10))


class _Augmented(torch.utils.data.Dataset):
    """Index plus a random number drawn in __getitem__, like a random crop would."""

    def __len__(self):
        return 11

    def __getitem__(self, i):
        return torch.tensor(i), torch.rand(())


@pytest.mark.parametrize("drop_last, stop_after", [(True, 3), (True, 4), (False, 2), (False, 8)])
def test_resume_mid_epoch_matches_uninterrupted(drop_last, stop_after):
    def run(n, state=None):
        it = M.ForeverDataIterator(M.make_loader(_Augmented(), 3, train=True, seed=7, drop_last=drop_last))
        if state is not None:
            it.load_state_dict(state)
        return [next(it) for _ in range(n)], it.state_dict()

    full, _ = run(12)
    head, state = run(stop_after)
    torch.manual_seed(123)  # a different global RNG must not matter: augmentations are seeded per sample
    tail, _ = run(12 - stop_after, state)
    for (i_a, r_a), (i_b, r_b) in zip(full, head + tail):
        assert torch.equal(i_a, i_b) and torch.equal(r_a, r_b)


def test_sampler_state_roundtrip_and_checks():
    s = M.ResumableSampler(6, seed=2)
    first = list(s)
    s.load_state_dict({"epoch": 0, "position": 4, "seed": 2})
    assert list(s) == first[4:] and s.state_dict() == {"epoch": 1, "position": 0, "seed": 2}
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 3})
    with pytest.raises(TypeError):
        M.ForeverDataIterator(M.make_loader(_indexed(), 2, train=False)).state_dict()


def test_forever_iterator_moves_to_device():
    it = M.ForeverDataIterator(M.make_loader(_indexed(), 2, train=False), device="cpu")
    x, _ = next(it)
    assert x.device.type == "cpu" and x.tolist() == [0, 1]
    assert np.array_equal(next(it)[0].numpy(), [2, 3])


def test_per_sample_reseeding_leaves_the_gpu_generators_alone(monkeypatch):
    """torch.manual_seed also reseeds every GPU generator, which fork_rng(devices=[]) does not restore: the training's
    dropout and random starts on a GPU would restart at each sample read in the main process."""
    from urda_fast.data import SeededItems

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    items = SeededItems(torch.utils.data.TensorDataset(torch.arange(4.0)))
    before = torch.random.get_rng_state()
    assert items[(2, 12345)][0] == 2.0
    assert calls == [] and torch.equal(torch.random.get_rng_state(), before)
