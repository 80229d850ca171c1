"""``pgd_step`` / ``pgd_step_``: one fused projected-gradient step of an adversarial attack."""

from __future__ import annotations

import math

import torch

from . import _backends, _checks, reference

NORMS = ("linf", "l2")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Float parameters as (count,) tensors, made once per (value, count, dtype, device): an attack passes the same floats
# every step, and each torch.full is an allocation (and on a GPU a kernel launch). The kernels only read them.
_FLOAT_PARAMS: dict[tuple, torch.Tensor] = {}
_FLOAT_PARAMS_MAX = 256


def _param_vector(value, count: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a 1/``count``-element tensor as a contiguous (count,) tensor in the kernels' accumulation dtype."""
    dtype = _acc_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device=like.device, dtype=dtype).reshape(-1)
        return t.expand(count).contiguous() if t.numel() == 1 else t.contiguous()
    value = float(value)
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        # traced, or under a dispatch mode (FakeTensorMode, make_fx, ...): a fresh tensor of that mode, never cached
        return torch.full((count,), value, dtype=dtype, device=like.device)
    key = (value, math.copysign(1.0, value), count, dtype, like.device)  # -0.0 and 0.0 are equal keys otherwise
    cached = _FLOAT_PARAMS.get(key)
    if cached is None:
        if len(_FLOAT_PARAMS) >= _FLOAT_PARAMS_MAX:
            _FLOAT_PARAMS.clear()
        with torch.inference_mode(False):  # a normal tensor even if first asked for under inference_mode
            # made on the CPU and copied with a blocking copy: on a GPU its values are in place before any stream
            # reads it (a fill queued on a busy stream could still be pending when another stream uses the tensor)
            cached = _FLOAT_PARAMS[key] = torch.full((count,), value, dtype=dtype).to(like.device)
    return cached


def _prepare(x_adv, grad, x_orig, step_size, eps, norm, lower, upper):
    _checks.check_tensor(x_adv, "x_adv")
    _checks.check_same(x_adv, "x_adv", grad, "grad")
    _checks.check_same(x_adv, "x_adv", x_orig, "x_orig")
    if x_adv.dim() == 0:
        raise ValueError("urda_fast: x_adv must have a batch dimension (dim 0), got a 0-d tensor")
    _checks.check_choice(norm, "norm", NORMS)
    for value, name in ((step_size, "step_size"), (eps, "eps"), (lower, "lower"), (upper, "upper")):
        if isinstance(value, torch.Tensor) and value.device.type == "meta" and x_adv.device.type != "meta":
            raise ValueError(f"urda_fast: {name} is a meta tensor (a shape without values) but x_adv is on "
                             f"{x_adv.device}; pass a float or a tensor that holds the values")
    batch = x_adv.shape[0]
    channels = x_adv.shape[1] if x_adv.dim() >= 2 else 1
    _checks.check_nonneg(step_size, "step_size", count=batch, count_name="sample", finite=True)
    _checks.check_nonneg(eps, "eps", count=batch, count_name="sample")
    _checks.check_bounds(lower, upper, channels)
    params = (_param_vector(step_size, batch, x_adv), _param_vector(eps, batch, x_adv),
              _param_vector(lower, channels, x_adv), _param_vector(upper, channels, x_adv))
    return params


def _channels_last_views(x_adv, grad, x_orig, params, lower, upper):
    """(x_adv, grad, x_orig, params) as contiguous (N, H, W, C) views when all three are channels_last and the box is
    the same for every channel, else None. The step is per element, and per sample for its budget and L2 norms, so
    it reads the NHWC storage as it is instead of three NCHW copies (and a copy back, in place); per-channel bounds
    would need the channel of each element, so they take the copies."""
    if x_adv.dim() != 4 or x_adv.is_contiguous() or not all(
            t.is_contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x_orig)):
        return None
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (lower, upper)):
        return None
    views = [t.permute(0, 2, 3, 1) for t in (x_adv, grad, x_orig)]
    rows = views[0].shape[1]  # the op's dim 1 is now H: bounds per "channel" of the view, all alike
    return (*views, (*params[:2], _param_vector(lower, rows, x_adv), _param_vector(upper, rows, x_adv)))


def pgd_step(x_adv, grad, x_orig, *, step_size, eps, norm="linf", lower=0.0, upper=1.0, backend=None):
    r"""One PGD ascent step, projection and box clamp, fused into one pass (L-inf) or two (L2).

    L-inf: :math:`x' = \mathrm{clip}_{[l,u]}(\mathrm{clip}_{[x_0-\epsilon, x_0+\epsilon]}(x + \alpha\,\mathrm{sign}(g)))`.
    L2: :math:`x + \alpha g/\lVert g\rVert_2` per sample (no step for a zero gradient), then
    :math:`\delta = x - x_0` rescaled to :math:`\lVert\delta\rVert_2 \le \epsilon` per sample, then the box clamp.

    Args:
        x_adv, grad, x_orig: (B, ...) tensors of one floating dtype and device. Dim 0 is the batch, dim 1 the channel.
        step_size, eps: floats >= 0, or per-sample tensors of shape (B,).
        norm: ``"linf"`` or ``"l2"``.
        lower, upper: floats or per-channel tensors (C elements, e.g. shape (C,) or (1, C, 1, 1)), so attacks can
            work in normalised space.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``; default by device (see ``available_backends``).

    Returns:
        The new adversarial batch, same shape and dtype as ``x_adv`` (contiguous; channels_last when the three
        inputs are, and the bounds are floats).

    This is an optimizer step and has no gradient: backpropagating through it raises an error.

    Example::

        >>> x_adv = pgd_step(x_adv, x_adv_grad, x, step_size=2/255, eps=8/255)
    """
    params = _prepare(x_adv, grad, x_orig, step_size, eps, norm, lower, upper)
    name = _backends.resolve_backend(backend, x_adv.device)
    if name == "reference":
        with torch.no_grad():
            out = reference.pgd_step(x_adv, grad, x_orig, step_size=params[0], eps=params[1], norm=norm,
                                     lower=params[2], upper=params[3])
        inputs = [t for t in (x_adv, grad, x_orig) if t.requires_grad]
        # Not differentiable on any backend: a backward through the reference raises the same error.
        return _NotDifferentiable.apply(out, *inputs) if inputs and torch.is_grad_enabled() else out
    op = _backends.op_for(name, "pgd_step", "pgd_step", register)
    nhwc = _channels_last_views(x_adv, grad, x_orig, params, lower, upper)
    if nhwc is not None:
        return op(*nhwc[:3], *nhwc[3], norm).permute(0, 3, 1, 2)
    return op(x_adv.contiguous(), grad.contiguous(), x_orig.contiguous(), *params, norm)


def pgd_step_(x_adv, grad, x_orig, *, step_size, eps, norm="linf", lower=0.0, upper=1.0, backend=None):
    """In-place :func:`pgd_step`: writes the new batch into ``x_adv`` and returns it. Same arguments."""
    params = _prepare(x_adv, grad, x_orig, step_size, eps, norm, lower, upper)
    if x_adv.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("urda_fast: pgd_step_ writes into x_adv, which requires grad; call it on x_adv.detach() or "
                           "under torch.no_grad() (the step itself is not differentiable)")
    if not torch.compiler.is_compiling() and x_adv.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("urda_fast: pgd_step_ cannot write into x_adv, an inference tensor (made under "
                           "torch.inference_mode()), outside inference mode; clone it first or call it inside "
                           "torch.inference_mode()")
    name = _backends.resolve_backend(backend, x_adv.device)
    overlap = _partly_overlaps(x_adv, grad) or _partly_overlaps(x_adv, x_orig)
    nhwc = None if name == "reference" or overlap else _channels_last_views(x_adv, grad, x_orig, params, lower, upper)
    if nhwc is not None:
        op = _backends.op_for(name, "pgd_step", "pgd_step_", register)
        op(*nhwc[:3], *nhwc[3], norm)  # writes x_adv's own storage through the contiguous NHWC view
        return x_adv
    if name == "reference" or not x_adv.is_contiguous() or overlap:
        # The kernels write contiguous memory, element by element: a strided x_adv, or one that shares memory with
        # grad or x_orig at other offsets (they would read elements already written), gets the out-of-place result
        # copied back into its own layout.
        out = pgd_step(x_adv, grad, x_orig, step_size=step_size, eps=eps, norm=norm, lower=lower, upper=upper,
                       backend=name)
        return x_adv.copy_(out)
    op = _backends.op_for(name, "pgd_step", "pgd_step_", register)
    op(x_adv, grad.contiguous(), x_orig.contiguous(), *params, norm)
    return x_adv


def _partly_overlaps(written, read) -> bool:
    """Whether ``read`` shares memory with ``written`` other than as the very same view (which the kernels allow)."""
    if torch.compiler.is_compiling() or written.device.type == "meta" or written.numel() == 0 or read.numel() == 0:
        return False
    # Byte spans, not storages: two storages can share memory (torch.from_numpy of overlapping numpy views).
    if (written.data_ptr(), written.shape, written.stride()) == (read.data_ptr(), read.shape, read.stride()):
        return False
    (a0, a1), (b0, b1) = _byte_span(written), _byte_span(read)
    return a0 < b1 and b0 < a1


def _byte_span(t):
    return t.data_ptr(), t.data_ptr() + t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))


def _fake_pgd_step(x_adv, grad, x_orig, step_size, eps, lower, upper, norm):
    torch._check(grad.shape == x_adv.shape, lambda: "grad must have the shape of x_adv")
    torch._check(x_orig.shape == x_adv.shape, lambda: "x_orig must have the shape of x_adv")
    return torch.empty_like(x_adv, memory_format=torch.contiguous_format)


def _fake_pgd_step_(x_adv, grad, x_orig, step_size, eps, lower, upper, norm):
    return None


def _setup_context_pgd_step(ctx, inputs, output):
    pass


def _backward_pgd_step(ctx, grad_output):
    raise RuntimeError("urda_fast.ops.pgd_step is an optimizer step and is not differentiable: compute the attack "
                       "under torch.no_grad() or pass detached tensors (x_adv.detach(), grad.detach()).")


class _NotDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, *inputs):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        _backward_pgd_step(ctx, None)


def register(suffix: str, *, fake: bool) -> None:
    """Fake kernels (native ops) and the not-differentiable autograd rule for ``urda_fast::pgd_step{suffix}``."""
    qualname = f"urda_fast::pgd_step{suffix}"
    if fake:
        torch.library.register_fake(qualname)(_fake_pgd_step)
        torch.library.register_fake(qualname + "_")(_fake_pgd_step_)
    torch.library.register_autograd(qualname, _backward_pgd_step, setup_context=_setup_context_pgd_step)
