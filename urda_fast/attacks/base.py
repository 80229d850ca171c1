"""The ``Attack`` base: model-mode bookkeeping, input checks, losses, random starts, restarts and early stop.

Subclasses only set their norm and defaults; every step goes through :func:`urda_fast.ops.pgd_step_`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import torch
import torch.nn.functional as F

from urda_fast import ops
from urda_fast.ops._memo import memo_scope
from urda_fast.ops.kd_kl import check_temperature_range

from .fold import FoldedModel

LOSSES = ("ce", "cw", "kl")
SPACES = ("pixel", "normalized")
# converted to int64, which torch's losses take
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _positive(value, name, allow_zero=False, finite=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"urda_fast.attacks: {name} must be a number, got {type(value).__name__}")
    if value != value or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"urda_fast.attacks: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    if finite and value == math.inf:
        raise ValueError(f"urda_fast.attacks: {name} must be finite, got inf")


@contextlib.contextmanager
def frozen_eval(model: torch.nn.Module):
    """Eval mode and no parameter gradients for the attack; every module's mode and every flag restored after,
    also on error."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _per_sample(values, like):
    """(B,) ``values`` shaped to broadcast over ``like``'s samples."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def _per_channel(bound, like):
    """A bound (a float, or (C,) per channel) shaped to broadcast over ``like``'s (B, C, ...) channels."""
    if not isinstance(bound, torch.Tensor):
        return bound
    return bound.to(like.device).reshape((1, -1) + (1,) * (like.dim() - 2))


def _scaled_to_unit_max(grad):
    """``grad`` divided per sample by its largest magnitude: the L2 step's direction, with a norm the step's floor
    (1e-12) cannot shorten. A confidently classified sample's input gradient can be far smaller (2e-16 at a logit gap
    of 40), which the floor turned into a step of 2e-4 of the step size: robustness from gradient masking."""
    peak = grad.flatten(1).abs().amax(1).clamp_min(torch.finfo(grad.dtype).tiny)
    return grad / _per_sample(peak, grad)


class Attack:
    """Base of the L-inf / L2 iterative attacks.

    Arguments:
        model: maps images (B, C, H, W) to logits (B, K) (a tuple's first element is taken).
        eps: perturbation budget (> 0), in the units of ``space``.
        alpha: step size (> 0). steps: number of steps (>= 1).
        random_start: start uniformly in the eps-ball (L-inf) or at a random point of it (L2).
        restarts: random restarts; a sample counts as broken if any restart breaks it.
        loss: ``"ce"`` (cross-entropy), ``"cw"`` (CW margin, confidence ``kappa``), ``"kl"`` (KL to soft targets,
            ``temperature``), for attacks on distillation students. At soft targets equal to the model's own
            output the KL gradient is exactly 0, so the KL attack needs ``random_start``. Targeted, the KL attack
            descends the KL: it pulls the model's output towards the soft targets.
        space: ``"pixel"`` (images in [0, 1]; the model normalises) or ``"normalized"`` (images already normalised
            with ``mean``/``std``; bounds become per-channel and eps is in normalised units).
        keep_first_hit: return, for each sample, the first iterate that breaks it (misclassified, or at its target),
            else the last one: a sample then counts as broken if any iterate broke it (APGD's convention). Without
            it the last iterate decides (the textbook loop's and torchattacks'), and a sample that crosses the
            boundary and comes back counts as robust: on the digits CNN 11 of 24 PGD settings gave 0.4-2.0 points
            more accuracy that way. Broken samples get zero gradients; no host read is added.
        early_stop: ``keep_first_hit``, computed cheaply for evaluation: samples already broken leave the batch, so
            later steps run on the rest only. It implies ``keep_first_hit`` and gives the same examples and the same
            accuracy as the full attack with ``keep_first_hit=True``; one host read per step (the count left).
        max_batch: largest batch run at once when batching restarts together (restarts of one batch never split
            a batch; ``None``: all restarts at once).
        seed: seed of the random start, for reproducible attacks (else the global RNG is used).
        fold_batchnorm: run the attack on the model with every conv/linear -> BatchNorm pair folded into one layer
            (the same function in eval mode, fewer passes; see :mod:`urda_fast.attacks.fold`). The model is traced
            with torch.fx once and its folded weights recomputed at every call; a model torch.fx cannot trace, or
            whose traced graph computes something else, gives a clear error. ``"auto"``: fold when that works,
            else warn once and attack the model as it is.
        clip: ``(lower, upper)``, the range every iterate is clipped to instead of the space's valid range
            (advertorch's ``clip_min`` / ``clip_max``). Images outside it are taken as they are and clipped by the
            first step: with normalised images and ``(0, 1)`` this reproduces code that clips normalised values to
            [0, 1] (DART's ``--attack-space code``), a threat model far beyond eps for every value outside that range.
    """

    norm = "linf"

    def __init__(self, model, *, eps, alpha, steps, random_start, restarts=1, loss="ce", kappa=0.0, temperature=1.0,
                 space="pixel", mean=None, std=None, early_stop=False, keep_first_hit=False, max_batch=None,
                 seed=None, fold_batchnorm=False, clip=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"urda_fast.attacks: model must be a torch.nn.Module (its train/eval mode and parameter "
                            f"flags are saved and restored around the attack), got {type(model).__name__}; wrap a "
                            "function in an nn.Module whose forward calls it")
        _positive(eps, "eps")
        _positive(alpha, "alpha", finite=True)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"urda_fast.attacks: steps must be an integer >= 1, got {steps!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"urda_fast.attacks: restarts must be an integer >= 1, got {restarts!r}")
        if restarts > 1 and not random_start:
            raise ValueError(f"urda_fast.attacks: restarts={restarts} without a random start would repeat the same "
                             "attack; pass random_start=True")
        if loss not in LOSSES:
            raise ValueError(f"urda_fast.attacks: loss must be one of {LOSSES}, got {loss!r}")
        if space not in SPACES:
            raise ValueError(f"urda_fast.attacks: space must be one of {SPACES}, got {space!r}")
        if space == "normalized" and (mean is None or std is None):
            raise ValueError("urda_fast.attacks: space='normalized' needs the mean and std the images were "
                             "normalised with, to know the valid range of each channel")
        _positive(kappa, "kappa", allow_zero=True)
        for flag, value in (("random_start", random_start), ("early_stop", early_stop),
                            ("keep_first_hit", keep_first_hit)):
            if not isinstance(value, bool):
                raise TypeError(f"urda_fast.attacks: {flag} must be True or False, got {value!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"urda_fast.attacks: max_batch must be None or an integer >= 1, got {max_batch!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"urda_fast.attacks: seed must be None or an integer, got {seed!r}")
        _positive(temperature, "temperature", finite=True)
        check_temperature_range(temperature, who="urda_fast.attacks")  # kd_kl_loss's, before any work
        self.model, self.eps, self.alpha, self.steps = model, float(eps), float(alpha), steps
        self.random_start, self.restarts, self.loss = random_start, restarts, loss
        self.kappa, self.temperature, self.space = float(kappa), float(temperature), space
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if self.std is not None and bool((self.std <= 0).any()):
            raise ValueError("urda_fast.attacks: std must be > 0")
        self.early_stop, self.max_batch, self.seed = early_stop, max_batch, seed
        self.keep_first_hit = keep_first_hit or early_stop
        if fold_batchnorm not in (False, True, "auto"):
            raise ValueError(f"urda_fast.attacks: fold_batchnorm must be False, True or 'auto', got {fold_batchnorm!r}")
        self.fold_batchnorm = fold_batchnorm
        if clip is not None:
            lower, upper = (float(v) for v in clip)
            if not -math.inf < lower < upper < math.inf:
                raise ValueError(f"urda_fast.attacks: clip must be (lower, upper) with lower < upper, finite, got "
                                 f"{tuple(clip)!r}")
            clip = (lower, upper)
        self.clip = clip
        self._folded: FoldedModel | None = None
        self._forward = model

    def __repr__(self):
        keys = ("eps", "alpha", "steps", "random_start", "restarts", "loss", "space", "early_stop", "keep_first_hit",
                "fold_batchnorm")
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    # ----------------------------------------------------------------------------------------------------------
    def bounds(self, images: torch.Tensor):
        """The valid range of each channel: [0, 1] in pixel space, [(0-mean)/std, (1-mean)/std] normalised, or
        ``clip`` when given."""
        if self.clip is not None:
            return self.clip
        if self.space == "pixel":
            return 0.0, 1.0
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        if images.dim() < 2 or mean.numel() not in (1, images.shape[1]):
            raise ValueError(f"urda_fast.attacks: mean/std have {mean.numel()} channels but the images have shape "
                             f"{tuple(images.shape)}")
        return (0 - mean) / std, (1 - mean) / std

    def _check(self, images, labels, soft_targets):
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError("urda_fast.attacks: images must be a floating-point tensor (B, C, H, W)")
        if self.loss == "kl":
            if not isinstance(soft_targets, torch.Tensor) or soft_targets.dim() != 2 or \
                    soft_targets.shape[0] != images.shape[0]:
                raise ValueError("urda_fast.attacks: loss='kl' needs soft_targets (B, K) logits, one row per image")
        if (self.loss != "kl" or labels is not None) and (
                not isinstance(labels, torch.Tensor) or labels.dtype not in INDEX_DTYPES):
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"urda_fast.attacks: labels must be an integer tensor of shape (B,), got {got}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"urda_fast.attacks: {images.shape[0]} images but labels have shape "
                             f"{tuple(labels.shape)}")
        if images.numel() == 0:
            return
        if self.clip is not None:  # images outside the clip range are the point: the first step clips them
            if bool(torch.isnan(images).any()):
                raise ValueError("urda_fast.attacks: images contain NaN; check the data pipeline (a division by zero "
                                 "in a normalisation, a corrupt file)")
            return
        lower, upper = self.bounds(images)
        lo, hi = _per_channel(lower, images), _per_channel(upper, images)
        tol = 1e-5
        # One reduction (one host sync on a GPU) for valid images; NaN fails both comparisons, so it lands here too.
        if not bool(((images >= lo - tol) & (images <= hi + tol)).all()):
            if bool(torch.isnan(images).any()):
                raise ValueError("urda_fast.attacks: images contain NaN; check the data pipeline (a division by zero "
                                 "in a normalisation, a corrupt file)")
            where = "[0, 1]" if self.space == "pixel" else "the range that mean/std give each channel"
            raise ValueError(f"urda_fast.attacks: images must lie in {where} (got min {images.min().item():.4g}, max "
                             f"{images.max().item():.4g}); in pixel space pass unnormalised images and let the "
                             "model normalise, or use space='normalized' with mean/std")

    def _logits(self, x):
        out = self._forward(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"urda_fast.attacks: the model must return logits (B, K) or a tuple whose first element "
                            f"they are, got {type(out).__name__}; wrap it in an nn.Module whose forward returns them")
        return out

    def _objective(self, logits, labels, soft_targets, targeted):
        """The quantity to ascend (summed over the batch, so each sample's gradient is independent of B)."""
        logits = logits if logits.dtype == torch.float64 else logits.float()  # half logits: float32 losses
        if self.loss == "kl":
            kl = ops.kd_kl_loss(logits, soft_targets, temperature=self.temperature, reduction="sum")
            return -kl if targeted else kl
        if self.loss == "ce":
            ce = F.cross_entropy(logits, labels, reduction="sum")
            return -ce if targeted else ce
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
        margin = true - other if targeted else other - true
        return margin.clamp(max=self.kappa).sum()

    def _random_start(self, x0, lower, upper, generator, restarts=1):
        """A random point of the budget around each sample of ``x0`` (``restarts`` stacked copies of one batch). Each
        restart draws its own noise in turn, so the starts are the same however ``max_batch`` groups the restarts."""
        delta = torch.cat([self._random_delta(part, generator) for part in x0.chunk(restarts)])
        x = ops.pgd_step(x0 + delta, torch.zeros_like(x0), x0, step_size=0.0, eps=self.eps, norm=self.norm,
                         lower=lower, upper=upper)
        self._round_into_budget_(x, x0, lower, upper)
        return x

    def _round_into_budget_(self, x, x0, lower, upper):
        """Half and bfloat16 images: the projected point is rounded to the images' dtype, which can land up to half a
        unit in the last place outside the budget (1.5 eps at bfloat16's 8/255 ... 1/255 near 1). Elements past it
        (L-inf), or every element of a sample past it (L2), move one representable value towards ``x0``: each
        coordinate then lies no farther from ``x0`` than the exact projection did, so the budget holds. Not where
        that would leave [lower, upper]: with ``clip`` a clean value outside it is farther than eps from any valid
        point, and the box wins, as in the step."""
        if x.dtype not in (torch.float16, torch.bfloat16):
            return
        delta = x.double() - x0.double()
        if self.norm == "linf":
            outside = delta.abs() > self.eps
        else:
            outside = _per_sample(delta.flatten(1).norm(dim=1) > self.eps, x)
        moved = torch.nextafter(x, x0)
        inside_box = (moved.double() >= _per_channel(lower, x)) & (moved.double() <= _per_channel(upper, x))
        x.copy_(torch.where(outside & inside_box, moved, x))

    def _random_delta(self, x0, generator):
        if self.norm == "linf":
            noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1
            return noise * self.eps
        direction = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        norms = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
        radius = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype) * self.eps
        return direction * _per_sample(radius / norms, x0)

    def _generator(self, device):
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    # ----------------------------------------------------------------------------------------------------------
    def __call__(self, images, labels=None, *, targeted=False, soft_targets=None, generator=None):
        """Adversarial images for ``images`` (B, C, H, W), same shape and dtype.

        ``labels`` are the true classes (untargeted) or the targets (``targeted=True``); ``soft_targets`` are the
        teacher logits for ``loss="kl"``. ``generator`` overrides ``seed`` for the random start.
        """
        if torch.is_inference_mode_enabled():  # torch.enable_grad() cannot lift it: no input gradient could exist
            raise RuntimeError("urda_fast.attacks: called under torch.inference_mode(), where no input gradient can "
                               "be taken; call the attack outside it (under torch.no_grad() it works)")
        self._check(images, labels, soft_targets)
        if generator is not None and (not isinstance(generator, torch.Generator)
                                      or generator.device.type != images.device.type):
            raise TypeError(f"urda_fast.attacks: generator must be a torch.Generator on the images' device "
                            f"({images.device.type}), got {generator!r}")
        labels = labels if labels is None else labels.long()
        if images.shape[0] == 0:
            return images.clone()
        images = images.detach()
        soft_targets = None if soft_targets is None else soft_targets.detach()
        generator = generator if generator is not None else self._generator(images.device)
        lower, upper = self.bounds(images)
        # memo_scope: the frozen model's derived constants (BatchNorm, conv weight blocks, bound checks) are kept
        # across the attack's forwards; the model cannot change between them.
        with frozen_eval(self.model), memo_scope():
            self._forward = self._folded_model(images) if self.fold_batchnorm else self.model
            try:
                if self.restarts == 1:
                    return self._attack_once(images, labels, soft_targets, targeted, lower, upper, generator)
                return self._attack_restarts(images, labels, soft_targets, targeted, lower, upper, generator)
            finally:
                if self._forward is not self.model:
                    self._forward.release()  # the folded weights live for the call only
                self._forward = self.model

    def _folded_model(self, images):
        """The folded model (built on the first call, rebuilt when the model or its modules were replaced), with
        weights recomputed from the model as it is now."""
        folded = self._folded
        if folded is None or folded.model is not self.model or folded.stale():
            try:
                folded = FoldedModel(self.model)
                folded.refresh()
                folded.check(images)
            except Exception as err:  # noqa: BLE001 -- folding is only a speed-up: 'auto' attacks the model as it is
                if self.fold_batchnorm is True:
                    raise
                warnings.warn(f"{err}; fold_batchnorm='auto' attacks the model unfolded", stacklevel=3)
                self.fold_batchnorm = False
                return self.model
            self._folded = folded
        else:
            folded.refresh()
        return folded

    def _attack_restarts(self, images, labels, soft_targets, targeted, lower, upper, generator):
        """Run the restarts as few large batches as ``max_batch`` allows; keep, per sample, the first restart that
        breaks it (else the last one)."""
        batch = images.shape[0]
        per_chunk = max(1, min(self.restarts, (self.max_batch or batch * self.restarts) // batch))
        best, broken = images.clone(), torch.zeros(batch, dtype=torch.bool, device=images.device)
        done = 0
        while done < self.restarts:
            count = min(per_chunk, self.restarts - done)
            x0 = images.repeat((count,) + (1,) * (images.dim() - 1))
            y = None if labels is None else labels.repeat(count)
            soft = None if soft_targets is None else soft_targets.repeat(count, 1)
            x_adv = self._attack_once(x0, y, soft, targeted, lower, upper, generator, restarts=count)
            with torch.no_grad():
                hit = self._hit(self._logits(x_adv), y, soft, targeted).reshape(count, batch)
            for r in range(count):
                take = ~broken if done + r == self.restarts - 1 else hit[r] & ~broken
                best[take] = x_adv[r * batch:(r + 1) * batch][take]
                broken |= hit[r]
            done += count
        return best

    def _hit(self, logits, labels, soft_targets, targeted):
        """Which samples the attack has broken: misclassified (untargeted), at the target (targeted), or, for the
        KL attack, predicting another class than the soft targets do."""
        reference = labels if labels is not None else soft_targets.argmax(1)
        pred = logits.argmax(1)
        return pred == reference if targeted else pred != reference

    def _check_labels(self, labels, logits):
        if logits.dim() != 2:
            raise ValueError(f"urda_fast.attacks: the model must return (batch, classes) logits, got shape "
                             f"{tuple(logits.shape)}")
        classes = logits.shape[1]
        if labels is None or not labels.numel():
            return
        low, high = torch.stack(torch.aminmax(labels)).tolist()  # one host read for both ends
        if high >= classes or low < 0:
            raise ValueError(f"urda_fast.attacks: labels must lie in [0, {classes}) for this {classes}-class model, "
                             f"got [{low}, {high}]")

    def _attack_once(self, x0, labels, soft_targets, targeted, lower, upper, generator, restarts=1):
        x = self._random_start(x0, lower, upper, generator, restarts) if self.random_start else x0.clone()
        idx = None  # indices still being updated under early stop; None = the whole batch
        broken = None  # keep_first_hit without early stop: samples broken at an earlier iterate, held there
        finite = None  # all objectives finite so far, on the device: read once at the end, not a host sync per step
        for step in range(self.steps):
            x_in = (x if idx is None else x[idx]).detach().requires_grad_(True)
            y = labels if labels is None or idx is None else labels[idx]
            soft = soft_targets if soft_targets is None or idx is None else soft_targets[idx]
            with torch.enable_grad():
                logits = self._logits(x_in)
                if step == 0:
                    self._check_labels(labels, logits)
                objective = self._objective(logits, y, soft, targeted)
                (grad,) = torch.autograd.grad(objective, x_in)
            finite = torch.isfinite(objective.detach()) if finite is None else finite & torch.isfinite(objective)
            with torch.no_grad():
                hit = None
                if self.keep_first_hit:
                    # Broken samples keep their current point: a zero gradient (no step, L-inf or L2) now, and from
                    # the next step on either out of the batch (early stop) or held by zero gradients. Zeroing the
                    # gradient, not the step size, keeps the step size a float: a tensor one is value-checked (a
                    # host read) by every step.
                    hit = self._hit(logits.detach(), y, soft, targeted)
                    if broken is not None:
                        hit |= broken
                    grad = grad.masked_fill(_per_sample(hit, grad), 0)  # autograd's may be a view
                if self.norm == "l2":
                    grad = _scaled_to_unit_max(grad)
                kwargs = dict(step_size=self.alpha, eps=self.eps, norm=self.norm, lower=lower, upper=upper)
                if idx is None:
                    ops.pgd_step_(x, grad, x0, **kwargs)
                else:
                    x[idx] = ops.pgd_step(x_in.detach(), grad, x0[idx], **kwargs)
                self._round_into_budget_(x, x0, lower, upper)
                if hit is not None and not self.early_stop:
                    broken = hit
                elif hit is not None:
                    keep = (~hit).nonzero().squeeze(1)
                    idx = keep if idx is None else idx[keep]
                    if idx.numel() == 0:
                        break
        # The images too, once: an L2 step makes a sample NaN where its input gradient was not finite.
        if finite is not None and not bool(finite & torch.isfinite(x).all()):
            raise FloatingPointError("urda_fast.attacks: the model's loss or input gradient was not finite during the "
                                     "attack (NaN/Inf logits?); check the model and the inputs")
        return x.detach()
