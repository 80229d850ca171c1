"""``kd_kl_loss``: temperature-scaled distillation KL. The forward keeps each row's softmax statistics (B, 4); the
backward recomputes the softmaxes from them in one pass, so forward + backward needs no logits-sized buffer beyond
the gradients it returns. On the CPU backend a float32/float64 call that will need gradients writes them in the
forward instead (``kd_kl_forward_with_grad``: the exps, which bound the CPU kernel, are computed once), already
scaled by the row gradients a loss gradient of 1 gives (``unit_row_gradients``), so the usual backward hands the
buffer on untouched and any other scales it in place: still one (B, C) buffer per gradient, and no second pass over
it for large logits (``PRESCALE_FROM``). The CUDA backend has the same op (the logits read once instead of three
times, half types included); it has compiled but not yet run on a GPU, so it is used only when
``URDA_FAST_CUDA_KL_WITH_GRAD=1`` (``CUDA_WITH_GRAD``) until a GPU run has passed its tests."""

from __future__ import annotations

import os

import torch

from . import _backends, _checks, reference

REDUCTIONS = ("batchmean", "sum", "none")
# Logits from which the CPU forward writes its gradients prescaled (unit_row_gradients): the backward's pass over the
# (B, C) buffers it saves is 8-12% of forward + backward at 4096 x 1000 (from a cold cache), and the few (B,)-sized
# operations that make the scale cost more than that pass below about this size (256 x 1000: 0.95-1.0x).
PRESCALE_FROM = 1 << 18
CUDA_WITH_GRAD = os.environ.get("URDA_FAST_CUDA_KL_WITH_GRAD", "0") == "1"


TEMPERATURE_RANGE = (1e-6, 1e6)


def check_temperature_range(value, name: str = "temperature", who: str = "urda_fast") -> None:
    """A ValueError unless ``value`` lies in ``TEMPERATURE_RANGE``: beyond it float32 statistics and T^2 overflow or
    underflow (NaN or 0). For the ops and for callers that pass a temperature on (attacks, configs), before work."""
    low, high = TEMPERATURE_RANGE
    if not low <= float(value) <= high:
        raise ValueError(f"{who}: {name} must be in [{low:g}, {high:g}], got {value!r} (distillation uses about 0.1 "
                         "to 100; outside the range float32 rounding, not the softmax, decides the loss)")


def kd_kl_loss(student_logits, teacher_logits, *, temperature=1.0, weight=None, reduction="batchmean",
               t2_scale=False, backend=None):
    r"""Knowledge-distillation KL, fused per row.

    Per row :math:`KL_i = \sum_c p_{ic} (\log p_{ic} - \log q_{ic})` with :math:`p = \mathrm{softmax}(t/T)` (teacher)
    and :math:`q = \mathrm{softmax}(s/T)` (student); :math:`w_i KL_i` when ``weight`` is given; ``"batchmean"`` is
    :math:`\sum_i / B`, ``"sum"`` :math:`\sum_i`, ``"none"`` the (B,) vector; times :math:`T^2` when ``t2_scale``.

    Differentiable w.r.t. both logits (the teacher side matters when both come from the trained model, as in
    PMG-AFT); ``weight`` is a constant. Stable for large logits, T across its range, and teacher classes masked
    with -inf.

    Args:
        student_logits, teacher_logits: (B, C) floating tensors on one device. Different dtypes are promoted.
        temperature: T in [1e-6, 1e6] (``TEMPERATURE_RANGE``). In float32 the loss *value* is rounding-limited
            at large T (the KL is ~1/T^2 beside log-sums of ~1: about 2% off at T = 1000, as torch's ``kl_div``).
        weight: optional (B,) per-sample weights (detached).
        reduction: ``"batchmean"`` | ``"sum"`` | ``"none"``.
        t2_scale: multiply by :math:`T^2` (Hinton et al.), keeping gradient magnitudes independent of T.
        backend: see :func:`urda_fast.ops.available_backends`.

    Returns:
        A 0-d loss (or (B,) for ``"none"``) in float32 for half/float32 logits, float64 for float64 logits.

    Example::

        >>> loss = kd_kl_loss(student(x_adv), teacher_logits, temperature=2.0, weight=w)
    """
    _checks.check_tensor(student_logits, "student_logits")
    _checks.check_same(student_logits, "student_logits", teacher_logits, "teacher_logits", dtype=False)
    if student_logits.dim() != 2:
        raise ValueError(f"urda_fast: logits must be 2-D (batch, classes), got shape {tuple(student_logits.shape)}; "
                         "flatten extra dimensions into the batch first")
    if student_logits.shape[1] == 0:
        raise ValueError("urda_fast: logits need at least one class (got 0 columns)")
    _checks.check_positive_finite(temperature, "temperature")
    check_temperature_range(temperature)
    _checks.check_choice(reduction, "reduction", REDUCTIONS)
    if weight is not None:
        _checks.check_tensor(weight, "weight")
        if weight.shape != (student_logits.shape[0],):
            raise ValueError(f"urda_fast: weight must have shape ({student_logits.shape[0]},) (one per row), got "
                             f"{tuple(weight.shape)}")
        if weight.device != student_logits.device:
            raise ValueError(f"urda_fast: weight is on {weight.device} but the logits are on {student_logits.device}")
    name = _backends.resolve_backend(backend, student_logits.device)
    if name == "reference":
        return reference.kd_kl_loss(student_logits, teacher_logits, temperature=temperature, weight=weight,
                                    reduction=reduction, t2_scale=t2_scale)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    student = student_logits.to(dtype).contiguous()
    teacher = teacher_logits.to(dtype).contiguous()
    grad_student = torch.is_grad_enabled() and student.requires_grad
    grad_teacher = torch.is_grad_enabled() and teacher.requires_grad
    if _forward_writes_gradients(name, dtype) and (grad_student or grad_teacher):
        # Not on a GPU: there the backward's pass over the buffers is cheap, and the comparison that skips it
        # (_remaining_scale) a host sync.
        prescale = name == "cpu" and reduction != "none" and student.numel() >= PRESCALE_FROM
        row_scale = unit_row_gradients(student.shape[0], weight, reduction, t2_scale, temperature,
                                       torch.promote_types(dtype, torch.float32), student.device) if prescale else None
        rows = torch.ops.urda_fast.kd_kl_forward_with_grad(student, teacher, float(temperature), grad_student,
                                                           grad_teacher, row_scale)[0]
    else:
        op = _backends.op_for(name, "kd_kl", "kd_kl_forward", register)
        rows, _ = op(student, teacher, float(temperature))
    return reference.reduce_kd_rows(rows, weight, reduction, t2_scale, temperature)


def _forward_writes_gradients(backend: str, dtype: torch.dtype) -> bool:
    if backend == "cpu":
        return dtype in (torch.float32, torch.float64)
    return backend == "cuda" and CUDA_WITH_GRAD


def unit_row_gradients(rows, weight, reduction, t2_scale, temperature, dtype, device=None):
    """d loss / d rows_i of ``reference.reduce_kd_rows`` for a loss gradient of 1, computed with the operations
    autograd runs backwards through it (div by B, expand, times T^2, times weight), so that a backward whose loss
    gradient is 1 receives exactly these row gradients. The with-grad forward writes its gradients scaled by them;
    the backward then only compares (B values) instead of scaling the (B, C) buffers."""
    grad = torch.ones((), dtype=dtype, device=device)
    if reduction == "batchmean":
        grad = grad / rows
    grad = grad.expand(rows)
    if t2_scale:
        grad = grad * (temperature * temperature)
    if weight is not None:
        grad = grad * weight.detach().to(dtype)
    return grad.contiguous()


def _fake_kd_kl_forward(student, teacher, temperature):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    torch._check(teacher.shape == student.shape, lambda: "teacher must have the shape of student")
    acc_dtype = torch.promote_types(student.dtype, torch.float32)
    return (student.new_empty((student.shape[0],), dtype=acc_dtype),
            student.new_empty((student.shape[0], 4), dtype=acc_dtype))


def _fake_kd_kl_backward(grad_rows, student, teacher, kl, stats, temperature, grad_student, grad_teacher):
    return (torch.empty_like(student) if grad_student else student.new_empty((0,)),
            torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,)))


def _fake_kd_kl_forward_with_grad(student, teacher, temperature, grad_student, grad_teacher, row_scale=None):
    kl, stats = _fake_kd_kl_forward(student, teacher, temperature)
    return (kl, stats, torch.empty_like(student) if grad_student else student.new_empty((0,)),
            torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,)))


def _setup_context_kd_kl_forward(ctx, inputs, output):
    student, teacher, temperature = inputs
    kl, stats = output
    # The logits are saved by reference (no copy); the backward needs only them and the (B, 4) statistics.
    ctx.save_for_backward(student, teacher, kl, stats)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _setup_context_kd_kl_forward_with_grad(ctx, inputs, output):
    student, teacher, temperature, grad_student, grad_teacher, row_scale = inputs
    kl, stats, d_student, d_teacher = output
    _setup_context_kd_kl_forward(ctx, (student, teacher, temperature), (kl, stats))
    ctx.mark_non_differentiable(d_student, d_teacher)
    # Not saved tensors: the first backward scales them in place and hands them on (saved ones would be
    # version-checked, and kept alive until the graph is freed).
    ctx.row_gradients = (d_student if grad_student else None, d_teacher if grad_teacher else None)
    ctx.row_scale = row_scale  # what the buffers are already scaled by (None: 1)


def _recomputing_backward(ctx, grad_rows, backward_op):
    need_student, need_teacher = ctx.needs_input_grad[:2]
    student, teacher, kl, stats = ctx.saved_tensors
    d_student, d_teacher = backward_op(grad_rows.to(kl.dtype).contiguous(), student, teacher, kl, stats,
                                       ctx.temperature, need_student, need_teacher)
    return (d_student if need_student else None), (d_teacher if need_teacher else None)


def _scale_rows(gradient, scale):
    # In place on the real buffer the forward made (only this ctx holds it); out of place on the functional / fake
    # tensors of torch.compile's and opcheck's tracing, which do not allow mutating a backward's input.
    return gradient.mul_(scale) if type(gradient) is torch.Tensor else gradient * scale


def _remaining_scale(grad_rows, row_scale):
    """What buffers written scaled by ``row_scale`` still need for row gradients ``grad_rows``: None when they are
    equal (a loss gradient of 1, the usual case: nothing to do), else grad_rows / row_scale, 0 where row_scale is 0
    (a zero weight: its rows are 0 and stay so)."""
    # Real tensors only: compile's traced backward must not branch on data.
    if type(grad_rows) is torch.Tensor and torch.equal(grad_rows, row_scale):
        return None
    return torch.where(row_scale != 0, grad_rows / row_scale, torch.zeros_like(grad_rows))


def _backward_kd_kl_forward_with_grad(ctx, grad_rows, _grad_stats, _grad_d_student, _grad_d_teacher):
    need_student, need_teacher = ctx.needs_input_grad[:2]
    row_gradients, ctx.row_gradients = ctx.row_gradients, None
    no_grads = (None,) * 4  # temperature, grad_student, grad_teacher, row_scale
    if grad_rows is None or not (need_student or need_teacher):
        return None, None, *no_grads
    if torch.is_grad_enabled():
        # create_graph=True: kd_kl_backward's autograd refuses a second derivative clearly, where a scaled buffer
        # would silently have none.
        return *_recomputing_backward(ctx, grad_rows, torch.ops.urda_fast.kd_kl_backward), *no_grads
    grad_rows = grad_rows.to(ctx.saved_tensors[2].dtype)
    if (row_gradients is None or (need_student and row_gradients[0] is None)
            or (need_teacher and row_gradients[1] is None)):
        # A second backward through the graph (retain_graph=True): the buffers are spent. The same kernel makes
        # them again, so every backward gives the same bits.
        student, teacher = ctx.saved_tensors[:2]
        row_gradients = torch.ops.urda_fast.kd_kl_forward_with_grad(student, teacher, ctx.temperature, need_student,
                                                                    need_teacher, ctx.row_scale)[2:]
    scale = grad_rows if ctx.row_scale is None else _remaining_scale(grad_rows, ctx.row_scale)
    if scale is None:
        return (row_gradients[0] if need_student else None), (row_gradients[1] if need_teacher else None), *no_grads
    scale = scale.unsqueeze(1)
    return (_scale_rows(row_gradients[0], scale) if need_student else None,
            _scale_rows(row_gradients[1], scale) if need_teacher else None, *no_grads)


def register(suffix: str, *, fake: bool) -> None:
    """Fake kernels (native ops) and autograd for ``urda_fast::kd_kl_forward{suffix}``; backward runs the same
    backend's ``kd_kl_backward{suffix}``."""
    forward = f"urda_fast::kd_kl_forward{suffix}"
    backward_op = getattr(torch.ops.urda_fast, f"kd_kl_backward{suffix}")
    if fake:
        torch.library.register_fake(forward)(_fake_kd_kl_forward)
        torch.library.register_fake(f"urda_fast::kd_kl_backward{suffix}")(_fake_kd_kl_backward)

    def backward(ctx, grad_rows, _grad_stats):
        if grad_rows is None or not any(ctx.needs_input_grad[:2]):  # the loss did not use the KL values
            return None, None, None
        return *_recomputing_backward(ctx, grad_rows, backward_op), None

    torch.library.register_autograd(forward, backward, setup_context=_setup_context_kd_kl_forward)
    if suffix == "":  # the CPU and CUDA op has no Triton twin
        with_grad = "urda_fast::kd_kl_forward_with_grad"
        if fake:
            torch.library.register_fake(with_grad)(_fake_kd_kl_forward_with_grad)
        torch.library.register_autograd(with_grad, _backward_kd_kl_forward_with_grad,
                                        setup_context=_setup_context_kd_kl_forward_with_grad)
    _backends.forbid_double_backward(f"urda_fast::kd_kl_backward{suffix}", "kd_kl_loss")
