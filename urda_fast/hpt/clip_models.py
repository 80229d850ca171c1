"""CLIP models through open_clip, from an architecture name and a local checkpoint -- never a download.

    model, tokenizer = load_clip("ViT-B-32-quickgelu", "ckpts/openai_vitb32.pt")     # OpenAI weights: -quickgelu
    model, tokenizer = load_clip("urda-tiny-vit", None)                               # random init (the world)
    arch, path = parse_model_arg("ViT-B-16:ckpts/vitb16.pt")

Besides open_clip's own architectures (``open_clip.list_models()``), the tiny configurations of the embedded world
(``TINY_CONFIGS``) are registered with open_clip on first use, so they are built by the same factory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
import zipfile

import torch

from urda_fast.files import missing_best_hint, reading_error, state_dict_mismatch
from urda_fast.models import use_fast_attention, use_fast_conv

# Two small CLIPs of different architectures for the embedded world (32x32 images, 16-token captions): a ViT with
# 8x8 patches (the target, as the code's ViT-B/32) and a ModifiedResNet (the heterogeneous proxy).
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
TINY_CONFIGS = {
    "urda-tiny-vit": {"embed_dim": 64, "text_cfg": _TEXT,
                      "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8}},
    "urda-tiny-rn": {"embed_dim": 64, "text_cfg": _TEXT,
                     "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32}},
}
_REGISTERED = False
LIST_HINT = ("see the names with `python -c \"import open_clip; print(open_clip.list_models())\"` (plus "
             "urda-tiny-vit, urda-tiny-rn)")


def register_tiny_configs() -> None:
    """Make ``TINY_CONFIGS`` known to open_clip (idempotent). open_clip reads architectures from JSON files only, so
    they are written once per process to a private temporary folder."""
    global _REGISTERED
    if _REGISTERED:
        return
    import open_clip

    folder = tempfile.mkdtemp(prefix="urda_fast_open_clip_")
    for name, cfg in TINY_CONFIGS.items():
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(cfg, f)
    open_clip.add_model_config(folder)
    _REGISTERED = True


def parse_model_arg(text: str, what: str = "model") -> tuple[str, str]:
    """``"ARCH:CHECKPOINT"`` -> (arch, checkpoint). The first colon splits, so checkpoint paths may hold colons."""
    if not text or ":" not in text:
        raise ValueError(f"hpt: --{what} must be ARCH:CHECKPOINT, e.g. ViT-B-32:ckpts/vitb32.pt (got {text!r}); "
                         f"ARCH is an open_clip architecture ({LIST_HINT})")
    arch, path = text.split(":", 1)
    if arch in ("hf-hub", "local-dir"):
        raise ValueError(f"hpt: --{what} {text!r}: open_clip schemas are not supported (they may download); give an "
                         f"architecture name and a local file, e.g. ViT-B-32:ckpts/vitb32.pt")
    return arch, os.path.expanduser(path)


@contextlib.contextmanager
def _quiet_open_clip():
    # create_model logs a warning for every randomly initialised model; the world builds several on purpose.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_architecture(arch: str) -> dict:
    """The open_clip config of ``arch``; a ValueError naming how to list the valid names if it is unknown, or if the
    architecture would need files from the internet (Hugging Face text towers and tokenizers)."""
    import open_clip

    register_tiny_configs()
    cfg = open_clip.get_model_config(arch) if arch else None
    if cfg is None:
        raise ValueError(f"hpt: unknown architecture {arch!r}; {LIST_HINT}")
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"hpt: architecture {arch!r} builds its text tower or tokenizer from Hugging Face "
                         f"({text_cfg.get('hf_model_name') or text_cfg.get('hf_tokenizer_name')}), which needs a "
                         "download; choose an architecture with open_clip's own text transformer (e.g. ViT-B-32)")
    return cfg


class CheckpointRefused(ValueError):
    """A readable checkpoint that would load in part, or into another function: said as it is (not re-read as a
    load failure by ``_checkpoint_error``)."""


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive, the format of OpenAI's released CLIP weights (``clip.load``'s
    ViT-B-32.pt): ``torch.load(weights_only=True)``, and so open_clip's ``load_checkpoint``, refuses them."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:  # torch.serialization._is_torchscript_zip's test, without torch's reader
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


# The constants OpenAI's archives keep beside the weights (their build_model pops them): in a plain state dict they
# mark one taken from such an archive.
OPENAI_CONSTANTS = ("input_resolution", "context_length", "vocab_size")


def _refuse_gelu(path: str, arch: str | None, what: str) -> None:
    if arch is not None and not check_architecture(arch).get("quick_gelu"):
        raise CheckpointRefused(f"hpt: {path!r} {what} OpenAI's released CLIP weights, which were trained with "
                                f"QuickGELU; architecture {arch} uses GELU, so every activation would differ from the "
                                f"weights' own: use {arch}-quickgelu")


def _without_openai_constants(state: dict) -> dict:
    return {key: value for key, value in state.items() if key not in OPENAI_CONSTANTS}


def _state_dict_of(path: str, arch: str | None = None) -> dict | None:
    """The open_clip weights of the files open_clip's loader cannot read -- a urda_fast HPT run checkpoint (its
    target), a TorchScript archive or its state dict -- else None (left to open_clip's loader). ``CheckpointRefused``
    for the TeCoA / PMG-AFT code's checkpoints (an image tower only) and, with ``arch``, for OpenAI's weights under an
    architecture without QuickGELU: they would load without a word and compute another function."""
    if is_torchscript(path):
        _refuse_gelu(path, arch, "is a TorchScript archive, the format of")
        with warnings.catch_warnings():  # torch's deprecation of TorchScript: the archives are what OpenAI released
            warnings.filterwarnings("ignore", category=FutureWarning)
            state = torch.jit.load(path, map_location="cpu").state_dict()
        return _without_openai_constants(state)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- safetensors, legacy pickles, ...: left to open_clip's loader
        return None
    if not isinstance(state, dict):
        return None
    if any(key in state for key in OPENAI_CONSTANTS):  # an archive's state_dict() saved as a plain file
        _refuse_gelu(path, arch, "holds the state dict of")
        return _without_openai_constants(state)
    if isinstance(state.get("modules"), dict) and "target" in state["modules"]:
        return state["modules"]["target"]
    if isinstance(state.get("modules"), dict) and "spec" in state:
        raise CheckpointRefused(f"hpt: {path!r} is a `dart pretrain` / `dart robustify` checkpoint (an image "
                                "classifier), not a CLIP; give an open_clip checkpoint or an `hpt train` run")
    if isinstance(state.get("vision_encoder_state_dict"), dict):
        # Their 'state_dict' is the (empty) visual prompter's: open_clip's loader would read it and fail on nothing.
        raise CheckpointRefused(f"hpt: {path!r} holds an image tower only ('vision_encoder_state_dict', the "
                                "checkpoint format of the TeCoA / PMG-AFT code, which fine-tunes model.visual), "
                                "without the text tower and logit_scale a zero-shot CLIP needs; merge it into its "
                                "base CLIP first: model.visual.load_state_dict(ckpt['vision_encoder_state_dict']) on "
                                "the base model, then torch.save(model.state_dict(), PATH)")
    return None


def _checkpoint_error(model, arch: str, checkpoint: str, err: Exception) -> ValueError:
    """Why loading ``checkpoint`` into ``model`` (``arch``) failed, told by reading the file again on its own. Loading
    mixes two causes in the same exception types -- torch's zip reader raises RuntimeError for a cut file, as
    load_state_dict does for weights of another model, and open_clip's resizing of position embeddings raises an
    AssertionError ("text pos_embed width changed!") for another architecture's weights."""
    from open_clip.factory import load_state_dict  # the reading half of open_clip.load_checkpoint

    try:
        state = _state_dict_of(checkpoint) or load_state_dict(checkpoint)
    except Exception as read_err:  # noqa: BLE001 -- UnpicklingError, RuntimeError (zip), EOFError, StopIteration...
        return ValueError(f"hpt: {checkpoint!r} is not a CLIP checkpoint that torch or open_clip can read "
                          f"({reading_error(read_err)}); is it the right file, and was it copied whole?")
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        return ValueError(f"hpt: {checkpoint!r} holds no weights (a {type(state).__name__}, not a state dict of "
                          "tensors); is it the right file?")
    try:
        model.load_state_dict(state)  # the file as it is (open_clip's conversions aside): which names and shapes
    except RuntimeError as fit_err:
        detail = state_dict_mismatch(fit_err)
    else:
        detail = reading_error(err)
    return ValueError(f"hpt: {checkpoint!r} does not hold weights for architecture {arch} ({detail}); check the ARCH "
                      "part of ARCH:CHECKPOINT")


def compile_image_tower(clip) -> None:
    """``torch.compile`` the image tower of ``clip`` in place (``nn.Module.compile``: the same module, parameters and
    state dict, so checkpoints and the optimizer are unaffected). The attack's steps and the training forwards all
    run it; the text tower runs once per step at most and stays eager. The first calls compile (once per input shape
    and per ``requires_grad`` pattern: the attack's frozen parameters, the training step's trained ones)."""
    clip.visual.compile()


def load_clip(arch: str, checkpoint: str | None, device: str | torch.device = "cpu"):
    """An open_clip model (float32, eval mode) and its tokenizer.

    Args:
        arch: an open_clip architecture name (OpenAI's released weights need the ``-quickgelu`` variants) or one of
            ``TINY_CONFIGS``.
        checkpoint: a local weights file -- an open_clip/OpenAI state dict (.pt/.bin/.safetensors), open_clip's
            training checkpoint, OpenAI's TorchScript archive (with a ``-quickgelu`` architecture), or a run folder /
            ``best.pt`` / ``last.pt`` written by ``hpt train``; None = random initialisation.
        device: where to put the model.

    Raises:
        FileNotFoundError: the checkpoint does not exist (nothing is ever downloaded).
        ValueError: unknown architecture, weights that do not fit it, or an image tower without its CLIP.
    """
    import open_clip

    check_architecture(arch)
    if checkpoint is not None:
        if os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "best.pt")):
            checkpoint = os.path.join(checkpoint, "best.pt")
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"hpt: checkpoint {checkpoint!r} for {arch} not found"
                                    f"{missing_best_hint(checkpoint)}; give a local weights file (urda_fast never "
                                    "downloads weights)")
    with _quiet_open_clip():
        # pretrained=None: open_clip resolves a string first as a release *tag* (a download), so weights are loaded
        # below from the file instead; pretrained_text/image=False keep the towers from fetching base weights.
        model = open_clip.create_model(arch, pretrained=None, pretrained_image=False, pretrained_text=False,
                                       device="cpu")
    if checkpoint is not None:
        try:
            own = _state_dict_of(checkpoint, arch)
            if own is not None:
                model.load_state_dict(own)
            else:
                open_clip.load_checkpoint(model, checkpoint)
        except CheckpointRefused:
            raise
        except Exception as err:  # noqa: BLE001 -- classified by what the file holds: see _checkpoint_error
            raise _checkpoint_error(model, arch, checkpoint, err) from err
        _check_finite_weights(model, checkpoint)
    tokenizer = open_clip.get_tokenizer(arch)
    # A ViT's patch embedding as a matmul, short-sequence self-attention and whole transformer blocks as fused ops,
    # on CPU (urda_fast.models.conv, .attention, .transformer): same parameters, same function.
    from urda_fast.models.transformer import use_fast_blocks

    return use_fast_blocks(use_fast_attention(use_fast_conv(model.float().to(device).eval()))), tokenizer


def _check_finite_weights(model, checkpoint: str) -> None:
    """NaN / inf weights make NaN logits, whose argmax still counts as predictions: plausible accuracies, or a
    training run that fails later with an error about the target."""
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(p.isfinite().all())]
    if bad:
        raise ValueError(f"hpt: checkpoint {checkpoint!r} holds non-finite (NaN / inf) weights in {len(bad)} "
                         f"tensor{'s' * (len(bad) > 1)} ({', '.join(bad[:3])}{', ...' * (len(bad) > 3)}): a run that "
                         "diverged, or a damaged file; use an earlier checkpoint")


def load_clip_arg(text: str, what: str, device="cpu"):
    """``load_clip`` from an ``"ARCH:CHECKPOINT"`` command-line value; returns (model, tokenizer, arch)."""
    arch, path = parse_model_arg(text, what)
    model, tokenizer = load_clip(arch, path, device)
    return model, tokenizer, arch
