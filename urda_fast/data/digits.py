"""The embedded default benchmark, printed -> handwritten digits, built offline in seconds.

Target (handwritten): scikit-learn's ``load_digits()`` -- 1,797 digits from the UCI "Optical Recognition of
Handwritten Digits" set. Each was a 32x32 binary bitmap with the digit scaled to fill the box, reduced to 8x8 by
counting the set pixels of 4x4 blocks (values 0..16). A fixed, stratified 30% is held out as the labelled target test
split; the other 70% is the (unlabelled) target training domain.

Source (printed): the digits 0-9 rendered from the text TrueType faces shipped inside matplotlib and put through
*the same sensor* as the target (render large, small rotation and stroke-width jitter, crop to the glyph, scale it to
fill a 32x32 box with a jittered aspect ratio, binarise, count 4x4 blocks -> 8x8 in 0..16). Without the shared
sensor the shift would be mostly scale and blur; with it, what is left is printed-vs-handwritten shape.

Both domains are then upsampled identically (bilinear, 8x8 -> ``size`` x ``size``) and scaled to [0, 1].
The source's 8x8 counts are cached (one small file per recipe version, seed and size of the set), so only the first
call pays the ~5 s of rendering.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

# Bump when the rendering recipe changes: the cache file name and its contents carry it, so old files are ignored.
RECIPE_VERSION = 1

# Text faces only: the symbol fonts in the same folder (cmex10, cmsy10, STIXSize*, STIXNonUni*, ...) have no digit
# glyphs and would render blanks or boxes. cmmi10/cmti10 are skipped too (math italic: old-style digits).
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf",
)

# The rendering recipe; every value here goes into the cache key.
RECIPE = {
    "version": RECIPE_VERSION,
    "render_px": 96,              # font size of the large rendering, before the sensor reduces it
    "max_rotation_deg": 8.0,      # small rotation, uniform in [-max, max]
    "max_stroke_px": 5,           # extra stroke width at render size, uniform integer in [0, max]
    "aspect_jitter": (0.8, 1.25),  # width multiplier of the glyph's own aspect ratio, log-uniform
    "threshold": 128,             # binarisation of the 32x32 box (0..255 grey)
}
DOMAINS = ("printed", "handwritten")
TARGET_TEST_FRACTION = 0.3


@dataclass
class DigitsShift:
    """The printed -> handwritten digits task.

    Attributes:
        source_train: TensorDataset of (images (N_s, 1, size, size) float32 in [0, 1], labels (N_s,) int64), printed.
        target_train: the same for 70% of load_digits() (handwritten); used without labels for adaptation.
        target_test: the held-out 30% of load_digits(), for evaluation only.
        num_classes: 10.
        domains: ("printed", "handwritten").
    """

    source_train: TensorDataset
    target_train: TensorDataset
    target_test: TensorDataset
    num_classes: int = 10
    domains: tuple = DOMAINS
    info: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One paragraph for a README or report."""
        size = self.source_train.tensors[0].shape[-1]
        return (f"Digits printed -> handwritten (offline): source = {len(self.source_train)} digits rendered from "
                f"{self.info.get('num_fonts', len(FONT_FILES))} matplotlib TrueType faces (seed "
                f"{self.info.get('seed')}, recipe v{RECIPE_VERSION}); target = scikit-learn load_digits(), "
                f"{len(self.target_train)} unlabelled train / {len(self.target_test)} test (stratified "
                f"{TARGET_TEST_FRACTION:.0%} hold-out). Both domains pass the same sensor (32x32 binary box -> 8x8 "
                f"counts of 4x4 blocks) and are upsampled bilinearly to {size}x{size}, in [0, 1], "
                f"{self.num_classes} classes.")


def font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _sensor(glyph: np.ndarray, aspect: float, threshold: int) -> np.ndarray:
    """UCI's sensor: grey glyph crop (H, W) uint8 -> 8x8 counts in 0..16, digit scaled to fill a 32x32 box."""
    from PIL import Image

    h, w = glyph.shape
    # Fill the box along the longer side; the other side keeps the glyph's (jittered) aspect ratio.
    ratio = (w / h) * aspect
    out_h, out_w = (32, max(2, min(32, round(32 * ratio)))) if ratio <= 1 else (max(2, min(32, round(32 / ratio))), 32)
    small = np.asarray(Image.fromarray(glyph).resize((out_w, out_h), Image.BILINEAR))
    box = np.zeros((32, 32), dtype=np.uint8)
    top, left = (32 - out_h) // 2, (32 - out_w) // 2
    box[top:top + out_h, left:left + out_w] = small >= threshold
    return box.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(np.uint8)


def render_printed_digits(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render ``num`` printed digits (classes balanced: label i % 10, then shuffled) through the sensor.

    Returns:
        counts (num, 8, 8) uint8 in 0..16 and labels (num,) int64. Deterministic for a seed (and a FreeType build).
    """
    from PIL import Image, ImageDraw, ImageFont

    directory = font_dir()
    paths = [os.path.join(directory, f) for f in FONT_FILES if os.path.isfile(os.path.join(directory, f))]
    if not paths:
        raise FileNotFoundError(f"urda_fast: no TrueType fonts found in {directory}; matplotlib's fonts are needed to "
                                f"render the printed digits")
    rng = np.random.default_rng(seed)
    size = RECIPE["render_px"]
    fonts = [ImageFont.truetype(p, size) for p in paths]
    labels = rng.permutation(np.arange(num) % 10).astype(np.int64)
    counts = np.zeros((num, 8, 8), dtype=np.uint8)
    canvas_px = 2 * size
    lo, hi = np.log(RECIPE["aspect_jitter"][0]), np.log(RECIPE["aspect_jitter"][1])
    for i, label in enumerate(labels):
        font = fonts[rng.integers(len(fonts))]
        stroke = int(rng.integers(RECIPE["max_stroke_px"] + 1))
        angle = rng.uniform(-RECIPE["max_rotation_deg"], RECIPE["max_rotation_deg"])
        aspect = float(np.exp(rng.uniform(lo, hi)))
        img = Image.new("L", (canvas_px, canvas_px), 0)
        ImageDraw.Draw(img).text((canvas_px // 2, canvas_px // 2), str(label), fill=255, font=font, anchor="mm",
                                 stroke_width=stroke, stroke_fill=255)
        img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=0)
        bbox = img.getbbox()
        if bbox is None:  # a face without this glyph; every listed face has digits, so this is a bug
            raise RuntimeError(f"urda_fast: font {font.path} rendered digit {label} blank")
        counts[i] = _sensor(np.asarray(img.crop(bbox)), aspect, RECIPE["threshold"])
    return counts, labels


def _cache_path(cache_dir: str, seed: int, num: int) -> str:
    key = json.dumps({**RECIPE, "fonts": FONT_FILES, "seed": seed, "num": num}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"printed_v{RECIPE_VERSION}_seed{seed}_n{num}_{digest}.pt")


def default_cache_dir() -> str:
    return os.environ.get("URDA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "urda_fast", "digits")


def load_printed_counts(cache_dir: str | None = None, seed: int = 0, num: int = 3000):
    """The source's 8x8 counts (num, 8, 8) uint8 and labels (num,) int64, from the cache or freshly rendered."""
    cache_dir = cache_dir or default_cache_dir()
    path = _cache_path(cache_dir, seed, num)
    if os.path.isfile(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("version") == RECIPE_VERSION:
                return blob["counts"].numpy(), blob["labels"].numpy()
        except Exception as err:  # noqa: BLE001
            # A truncated or foreign file fails in many ways (torch.load raises IndexError, UnpicklingError, ...):
            # regenerate it rather than fail.
            warnings.warn(f"urda_fast: ignoring unreadable digits cache {path} ({err}); regenerating", stacklevel=2)
    counts, labels = render_printed_digits(num, seed)
    os.makedirs(cache_dir, exist_ok=True)
    # Write to a temporary file in the same folder, then rename: readers never see a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": RECIPE_VERSION, "recipe": json.dumps(RECIPE), "counts": torch.from_numpy(counts),
                        "labels": torch.from_numpy(labels)}, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache may be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return counts, labels


def counts_to_images(counts: np.ndarray, size: int = 16) -> torch.Tensor:
    """8x8 counts (N, 8, 8) in 0..16 -> (N, 1, size, size) float32 in [0, 1], the same upsampling for both domains."""
    x = torch.as_tensor(np.asarray(counts), dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).contiguous()


def load_digits_shift(cache_dir: str | None = None, seed: int = 0, size: int = 16, num_source: int = 3000,
                      split_seed: int = 0) -> DigitsShift:
    """Build the printed -> handwritten task.

    Args:
        cache_dir: where the rendered source is cached; default $URDA_FAST_CACHE or ~/.cache/urda_fast/digits.
        seed: seed of the source rendering (which fonts, jitters and order).
        size: output side; images are (N, 1, size, size).
        num_source: number of printed digits (balanced over the 10 classes).
        split_seed: seed of the stratified target train/test split; keep it fixed to compare runs.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    counts, labels = load_printed_counts(cache_dir, seed, num_source)
    digits = load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(digits.target)), test_size=TARGET_TEST_FRACTION,
                                           stratify=digits.target, random_state=split_seed)
    target = counts_to_images(digits.images.astype(np.float32), size)
    target_labels = torch.as_tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = torch.as_tensor(np.sort(idx_train)), torch.as_tensor(np.sort(idx_test))
    return DigitsShift(
        source_train=TensorDataset(counts_to_images(counts, size), torch.as_tensor(labels, dtype=torch.int64)),
        target_train=TensorDataset(target[idx_train], target_labels[idx_train]),
        target_test=TensorDataset(target[idx_test], target_labels[idx_test]),
        info={"seed": seed, "split_seed": split_seed, "num_fonts": len(FONT_FILES), "recipe": dict(RECIPE)},
    )
