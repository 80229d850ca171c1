"""``kd_kl_loss``: temperature-scaled distillation KL. The forward keeps each row's softmax statistics (B, 4); the
backward recomputes the softmaxes from them in one pass, so forward + backward needs no logits-sized buffer beyond
the gradients it returns."""

from __future__ import annotations

import torch

from . import _backends, _checks, reference

REDUCTIONS = ("batchmean", "sum", "none")


def kd_kl_loss(student_logits, teacher_logits, *, temperature=1.0, weight=None, reduction="batchmean",
               t2_scale=False, backend=None):
    r"""Knowledge-distillation KL, fused per row.

    Per row :math:`KL_i = \sum_c p_{ic} (\log p_{ic} - \log q_{ic})` with :math:`p = \mathrm{softmax}(t/T)` (teacher)
    and :math:`q = \mathrm{softmax}(s/T)` (student); :math:`w_i KL_i` when ``weight`` is given; ``"batchmean"`` is
    :math:`\sum_i / B`, ``"sum"`` :math:`\sum_i`, ``"none"`` the (B,) vector; times :math:`T^2` when ``t2_scale``.

    Differentiable w.r.t. both logits (the teacher side matters when both come from the trained model, as in
    PMG-AFT); ``weight`` is a constant. Stable for large logits, any T > 0, and teacher classes masked with -inf.

    Args:
        student_logits, teacher_logits: (B, C) floating tensors on one device. Different dtypes are promoted.
        temperature: T > 0.
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
    op = _backends.op_for(name, "kd_kl", "kd_kl_forward", register)
    rows, _ = op(student, teacher, float(temperature))
    return reference.reduce_kd_rows(rows, weight, reduction, t2_scale, temperature)


def _fake_kd_kl_forward(student, teacher, temperature):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    torch._check(teacher.shape == student.shape, lambda: "teacher must have the shape of student")
    acc_dtype = torch.promote_types(student.dtype, torch.float32)
    return (student.new_empty((student.shape[0],), dtype=acc_dtype),
            student.new_empty((student.shape[0], 4), dtype=acc_dtype))


def _fake_kd_kl_backward(grad_rows, student, teacher, kl, stats, temperature, grad_student, grad_teacher):
    return (torch.empty_like(student) if grad_student else student.new_empty((0,)),
            torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,)))


def _setup_context_kd_kl_forward(ctx, inputs, output):
    student, teacher, temperature = inputs
    kl, stats = output
    # The logits are saved by reference (no copy); the backward needs only them and the (B, 4) statistics.
    ctx.save_for_backward(student, teacher, kl, stats)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def register(suffix: str, *, fake: bool) -> None:
    """Fake kernels (native ops) and autograd for ``urda_fast::kd_kl_forward{suffix}``; backward runs the same
    backend's ``kd_kl_backward{suffix}``."""
    forward = f"urda_fast::kd_kl_forward{suffix}"
    backward_op = getattr(torch.ops.urda_fast, f"kd_kl_backward{suffix}")
    if fake:
        torch.library.register_fake(forward)(_fake_kd_kl_forward)
        torch.library.register_fake(f"urda_fast::kd_kl_backward{suffix}")(_fake_kd_kl_backward)

    def backward(ctx, grad_rows, _grad_stats):
        need_student, need_teacher = ctx.needs_input_grad[:2]
        if grad_rows is None or not (need_student or need_teacher):  # the loss did not use the KL values
            return None, None, None
        student, teacher, kl, stats = ctx.saved_tensors
        d_student, d_teacher = backward_op(grad_rows.to(kl.dtype).contiguous(), student, teacher, kl, stats,
                                           ctx.temperature, need_student, need_teacher)
        return (d_student if need_student else None), (d_teacher if need_teacher else None), None

    torch.library.register_autograd(forward, backward, setup_context=_setup_context_kd_kl_forward)
    _backends.forbid_double_backward(f"urda_fast::kd_kl_backward{suffix}", "kd_kl_loss")
