"""The embedded offline world: two small CLIPs of different architectures, contrastively pre-trained on CPU on
image-caption pairs made from digits, plus labelled splits for robust fine-tuning and zero-shot evaluation.

No pretrained CLIP weights can be fetched offline, so ``hpt demo`` builds its own:

- Images (3, 32, 32) in [0, 1]: a digit mask -- printed (rendered from matplotlib's TrueType faces with size, offset,
  stroke and rotation jitter) or handwritten (scikit-learn's ``load_digits()``, upsampled) -- painted in a random
  bright colour on a random dark background, plus a little pixel noise.
- Captions say what the digit is (word or numeral) and, in some phrasings, whether it is printed or handwritten --
  among them "This is a photo of a number seven" and "This is a photo of a handwritten number", so the zero-shot
  prompt "This is a photo of a {}" is in-distribution. Colours are never named: in a first try, captions that named
  them let both models learn colour and stall on shape for hundreds of steps.
- ``target`` = ``urda-tiny-vit`` (ViT, 8x8 patches) and ``proxy`` = ``urda-tiny-rn`` (ModifiedResNet), each trained
  from scratch with the CLIP loss and AdamW; a caption counts as a positive of every image in the batch it is true of.
- Splits, none seen in pre-training: ``train`` (printed digits, classes = digits: the TinyImageNet of this world) and
  the zero-shot sets ``digits`` (printed), ``handwritten`` (from the held-out 30% of load_digits(): a domain shift)
  and ``style`` (printed vs. handwritten: another label space, which fine-tuning on digit names can erode).

A world is a folder: ``target.pt``, ``proxy.pt`` (open_clip state dicts), ``data.pt`` (uint8 images, labels) and
``world.json`` (recipe, class names, pre-training log). ``build_world`` reuses a complete folder of the same recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from urda_fast.files import atomic_write_json
from urda_fast.run_files import atomic_save

from .clip_models import load_clip

WORLD_VERSION = 1
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("printed", "handwritten")
# Bright digits on dark backgrounds: one polarity, so shape is learnable in minutes by tiny models from scratch.
FOREGROUNDS = ((0.95, 0.18, 0.15), (0.25, 0.85, 0.30), (0.30, 0.50, 1.00), (0.98, 0.90, 0.20), (0.97, 0.97, 0.97),
               (1.00, 0.55, 0.80))
BACKGROUNDS = ((0.04, 0.04, 0.04), (0.05, 0.07, 0.32), (0.32, 0.05, 0.06), (0.04, 0.26, 0.08), (0.30, 0.18, 0.07))
CAPTIONS = ("This is a photo of a number {d}", "a photo of the number {d}", "the digit {n}", "a {s} number {d}",
            "This is a photo of a {s} number", "a {s} digit {n}", "the number {d}")
CAPTIONS_PER_IMAGE = 3
SPLITS = ("train", "digits", "handwritten", "style")
ARCHS = {"target": "urda-tiny-vit", "proxy": "urda-tiny-rn"}


@dataclass(frozen=True)
class WorldRecipe:
    """Everything that decides a world; its hash names the cache folder."""

    pretrain_images: int = 6000  # printed; plus the handwritten train part (70% of load_digits(), 1257 images)
    train_images: int = 3000  # labelled split for robust fine-tuning
    eval_images: int = 500  # per zero-shot set (handwritten: at most the 540 held out)
    pretrain_steps: int = 700
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    noise: float = 0.03
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({**asdict(self), "version": WORLD_VERSION, "archs": ARCHS}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def scaled(self, scale: float) -> "WorldRecipe":
        """A smaller (tests) or larger world: sizes and steps times ``scale``."""
        sizes = ("pretrain_images", "train_images", "eval_images", "pretrain_steps")
        return WorldRecipe(**{**asdict(self), **{k: max(16, int(getattr(self, k) * scale)) for k in sizes},
                              "batch_size": max(16, min(self.batch_size, int(self.batch_size * scale * 4)))})


# ------------------------------------------------------------------------------------------------------------ images
def printed_masks(num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(num, 32, 32) float32 masks in [0, 1] of digits rendered from matplotlib's fonts, and their labels."""
    from PIL import Image, ImageDraw, ImageFont

    from urda_fast.data.digits import FONT_FILES, font_dir

    paths = [os.path.join(font_dir(), f) for f in FONT_FILES if os.path.isfile(os.path.join(font_dir(), f))]
    if not paths:
        raise FileNotFoundError(f"hpt world: no TrueType fonts in {font_dir()} (matplotlib's fonts are needed)")
    fonts = {}
    labels = rng.integers(0, 10, num)
    masks = np.zeros((num, 32, 32), dtype=np.float32)
    for i, label in enumerate(labels):
        key = (int(rng.integers(len(paths))), int(rng.integers(36, 54)))  # render at 64x64, then halve
        font = fonts.get(key) or fonts.setdefault(key, ImageFont.truetype(paths[key[0]], key[1]))
        img = Image.new("L", (64, 64), 0)
        offset = rng.integers(-6, 7, 2)
        ImageDraw.Draw(img).text((32 + int(offset[0]), 32 + int(offset[1])), str(label), fill=255, font=font,
                                 anchor="mm", stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
        img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR).resize((32, 32), Image.BILINEAR)
        masks[i] = np.asarray(img, dtype=np.float32) / 255.0
    return masks, labels.astype(np.int64)


def handwritten_masks() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's load_digits() as 32x32 masks: (train 70%, test 30%) stratified, each (masks, labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    masks = F.interpolate(torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None], size=(32, 32),
                          mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    train, test = train_test_split(np.arange(len(masks)), test_size=0.3, stratify=digits.target, random_state=0)
    return (masks[train], digits.target[train]), (masks[test], digits.target[test])


def paint(masks: np.ndarray, rng: np.random.Generator, noise: float) -> torch.Tensor:
    """Masks (N, 32, 32) -> uint8 images (N, 3, 32, 32): random bright digit on a random dark background."""
    fgs, bgs = (np.array(p, dtype=np.float32)[:, :, None, None] for p in (FOREGROUNDS, BACKGROUNDS))
    fg, bg = rng.integers(0, len(fgs), len(masks)), rng.integers(0, len(bgs), len(masks))
    jitter = lambda: rng.uniform(-0.05, 0.05, (len(masks), 3, 1, 1)).astype(np.float32)  # noqa: E731
    m = masks[:, None]
    images = (fgs[fg] + jitter()) * m + (bgs[bg] + jitter()) * (1 - m)
    images += noise * rng.standard_normal(images.shape, dtype=np.float32)
    return torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8))


def caption(digit: int, style: int, rng: np.random.Generator) -> tuple[str, list]:
    """A random caption of a digit image, and what it claims: [digit, style] with -1 for what it does not mention."""
    template = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
    text = template.format(d=DIGIT_WORDS[digit], n=digit, s=STYLES[style])
    return text, [digit if "{d}" in template or "{n}" in template else -1, style if "{s}" in template else -1]


def make_data(recipe: WorldRecipe) -> dict:
    """Every split of the world as uint8 images and int64 labels, plus the pre-training captions."""
    rng = np.random.default_rng(recipe.seed)
    (hw_train, hw_train_y), (hw_test, hw_test_y) = handwritten_masks()
    masks, labels = printed_masks(recipe.pretrain_images, rng)
    attrs = np.stack([np.concatenate([labels, hw_train_y]),
                      np.array([0] * recipe.pretrain_images + [1] * len(hw_train))], 1)
    pairs = [[caption(int(d), int(s), rng) for _ in range(CAPTIONS_PER_IMAGE)] for d, s in attrs]
    data = {"pretrain": {"images": paint(np.concatenate([masks, hw_train]), rng, recipe.noise),
                         "attrs": torch.from_numpy(attrs), "captions": [[text for text, _ in row] for row in pairs],
                         "claims": torch.tensor([[claims for _, claims in row] for row in pairs])}}
    for split, num in (("train", recipe.train_images), ("digits", recipe.eval_images)):
        m, y = printed_masks(num, rng)
        data[split] = {"images": paint(m, rng, recipe.noise), "labels": torch.from_numpy(y)}
    keep = rng.permutation(len(hw_test))[: recipe.eval_images]
    data["handwritten"] = {"images": paint(hw_test[keep], rng, recipe.noise),
                           "labels": torch.from_numpy(hw_test_y[keep])}
    # style: half printed (new renders), half handwritten (held-out, may overlap the handwritten set: other labels)
    half = recipe.eval_images // 2
    printed, _ = printed_masks(half, rng)
    hand = hw_test[rng.permutation(len(hw_test))[:half]]
    order = rng.permutation(2 * half)
    data["style"] = {"images": paint(np.concatenate([printed, hand])[order], rng, recipe.noise),
                     "labels": torch.from_numpy(np.array([0] * half + [1] * half)[order])}
    return data


def classnames(split: str) -> list:
    """Class names of a world split, for the prompt "This is a photo of a {}"."""
    if split == "style":
        return [f"{s} number" for s in STYLES]
    return [f"number {w}" for w in DIGIT_WORDS]


# ------------------------------------------------------------------------------------------------------ pre-training
def clip_loss(image_features, text_features, logit_scale, image_attrs, caption_claims):
    """Symmetric CLIP loss in which a caption is a positive of every image it is true of (``caption_claims`` (B, A)
    match ``image_attrs`` (B, A) wherever they are not -1). Plain CLIP would push "a handwritten number seven" away
    from every other handwritten seven of the batch: false negatives, when captions share so few words."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    claims = caption_claims[None, :, :]
    positives = ((claims == -1) | (claims == image_attrs[:, None, :])).all(-1).float()  # [image i, caption j]
    image_to_text = F.cross_entropy(logits, positives / positives.sum(1, keepdim=True))
    text_to_image = F.cross_entropy(logits.t(), positives.t() / positives.t().sum(1, keepdim=True))
    return 0.5 * (image_to_text + text_to_image)


def pretrain_clip(arch: str, pretrain: dict, recipe: WorldRecipe, seed: int, progress: bool = True):
    """Train ``arch`` from scratch with the CLIP loss on the world's pre-training pairs (``make_data()["pretrain"]``);
    returns (model in eval mode, {"loss", "seconds"})."""
    from tqdm.auto import tqdm

    from .zero_shot import CLIP_MEAN, CLIP_STD

    torch.manual_seed(seed)
    model, tokenizer = load_clip(arch, None)
    model.train()
    images, attrs, claims = pretrain["images"], pretrain["attrs"], pretrain["claims"]
    tokens = tokenizer([t for row in pretrain["captions"] for t in row]).reshape(len(images), CAPTIONS_PER_IMAGE, -1)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, recipe.pretrain_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * max(0, s - warmup) / max(1, recipe.pretrain_steps - warmup)))))
    # CLIP's statistics, as OpenAI pre-trained with; fine-tuning keeps the code's ImageNet ones (--preprocess), as the
    # code does with OpenAI's weights
    mean, std = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1), torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    tic, losses = time.perf_counter(), []
    for _ in tqdm(range(recipe.pretrain_steps), desc=f"pre-train {arch}", disable=not progress):
        idx = torch.randint(0, len(images), (recipe.batch_size,), generator=generator)
        pick = torch.randint(0, CAPTIONS_PER_IMAGE, (recipe.batch_size,), generator=generator)
        x = (images[idx].float() / 255 - mean) / std
        loss = clip_loss(model.encode_image(x), model.encode_text(tokens[idx, pick]), model.logit_scale, attrs[idx],
                         claims[idx, pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
    tail = losses[-max(1, len(losses) // 10):]
    return model.eval(), {"loss": sum(tail) / len(tail), "seconds": time.perf_counter() - tic}


# ------------------------------------------------------------------------------------------------------------ worlds
def default_world_dir(recipe: WorldRecipe) -> str:
    base = os.environ.get("URDA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "urda_fast")
    return os.path.join(base, "hpt_world", recipe.key())


class World:
    """A built world folder: model arguments ``"ARCH:CHECKPOINT"`` for ``target``/``proxy`` and its labelled splits."""

    def __init__(self, folder: str):
        meta = os.path.join(folder, "world.json")
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"hpt: {folder!r} is not a built world (no world.json); build one with "
                                    "`urda-fast hpt demo` or urda_fast.hpt.world.build_world()")
        with open(meta) as f:
            self.info = json.load(f)
        self.folder = folder
        self._data = None

    def model_arg(self, role: str) -> str:
        if role not in ARCHS:
            raise ValueError(f"hpt: a world has models {tuple(ARCHS)}, not {role!r}")
        return f"{ARCHS[role]}:{os.path.join(self.folder, role + '.pt')}"

    def split(self, name: str):
        """(images (N, 3, 32, 32) float32 in [0, 1], labels (N,) int64) of a split."""
        if name not in SPLITS:
            raise ValueError(f"hpt: the world has splits {', '.join(SPLITS)}, not {name!r}")
        if self._data is None:
            self._data = torch.load(os.path.join(self.folder, "data.pt"), weights_only=True)
        return self._data[name]["images"].float() / 255, self._data[name]["labels"]

    def classnames(self, name: str) -> list:
        return classnames(name)


def build_world(folder: str | None = None, recipe: WorldRecipe = WorldRecipe(), *, progress: bool = True) -> World:
    """Build (or reuse) the world of ``recipe`` in ``folder`` (default: a cache folder named by the recipe). A folder
    that holds a complete world of another recipe is an error naming both: never rebuilt in place."""
    folder = folder or default_world_dir(recipe)
    meta = os.path.join(folder, "world.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            found = json.load(f)
        if found.get("key") == recipe.key():
            return World(folder)
        # another recipe's world (e.g. `hpt demo --world DIR --scale 0.1` on a full one): rebuilding it in place
        # would silently replace the models and data that runs in other folders were trained and evaluated on
        old = found.get("recipe") or {}
        changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in asdict(recipe).items() if k in old and old[k] != v]
        raise ValueError(f"hpt: {folder} holds a world of another recipe (key {found.get('key')}) than the one asked "
                         f"for (key {recipe.key()}{': ' + ', '.join(changed) if changed else ''}); give another "
                         "--world folder (or none: a cache folder named by the recipe), or delete this one to "
                         "rebuild it")
    os.makedirs(folder, exist_ok=True)
    tic = time.perf_counter()
    data = make_data(recipe)
    atomic_save({k: {"images": v["images"], "labels": v["labels"]} for k, v in data.items() if k != "pretrain"},
                os.path.join(folder, "data.pt"))
    log = {"data_seconds": round(time.perf_counter() - tic, 1)}
    for seed, (role, arch) in enumerate(ARCHS.items()):
        model, stats = pretrain_clip(arch, data["pretrain"], recipe, seed=recipe.seed * 10 + seed, progress=progress)
        atomic_save(model.state_dict(), os.path.join(folder, f"{role}.pt"))
        log[role] = {"arch": arch, **{k: round(v, 4) for k, v in stats.items()}}
    # world.json last: its presence marks a complete world.
    info = {"key": recipe.key(), "version": WORLD_VERSION, "recipe": asdict(recipe), "archs": ARCHS,
            "splits": {k: len(v["images"]) for k, v in data.items()}, "pretraining": log,
            "classnames": {s: classnames(s) for s in SPLITS}}
    atomic_write_json(meta, info)
    return World(folder)
