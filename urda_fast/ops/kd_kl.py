"""``kd_kl_loss``: temperature-scaled distillation KL with the gradient written in the forward pass."""

from __future__ import annotations

import torch

from . import _backends, _checks, reference

REDUCTIONS = ("batchmean", "sum", "none")


def kd_kl_loss(student_logits, teacher_logits, *, temperature=1.0, weight=None, reduction="batchmean",
               t2_scale=False, backend=None):
    r"""Knowledge-distillation KL, one fused pass per row.

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
    grad_enabled = torch.is_grad_enabled()
    op = _backends.op_for(name, "kd_kl", "kd_kl_forward", register)
    rows, _, _ = op(student, teacher, float(temperature), grad_enabled and student.requires_grad,
                    grad_enabled and teacher.requires_grad)
    return reference.reduce_kd_rows(rows, weight, reduction, t2_scale, temperature)


def _fake_kd_kl_forward(student, teacher, temperature, grad_student, grad_teacher):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    torch._check(teacher.shape == student.shape, lambda: "teacher must have the shape of student")
    loss_dtype = torch.promote_types(student.dtype, torch.float32)
    rows = student.new_empty((student.shape[0],), dtype=loss_dtype)
    d_student = torch.empty_like(student) if grad_student else student.new_empty((0,))
    d_teacher = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    return rows, d_student, d_teacher


def _setup_context_kd_kl_forward(ctx, inputs, output):
    _, d_student, d_teacher = output
    ctx.save_for_backward(d_student, d_teacher)
    ctx.has_grads = (inputs[3], inputs[4])
    # The stored derivatives are outputs only so backward can reuse them; no gradient ever flows into them, and
    # not materialising zeros for them saves two logits-sized fills per backward.
    ctx.mark_non_differentiable(d_student, d_teacher)
    ctx.set_materialize_grads(False)


def _backward_kd_kl_forward(ctx, grad_rows, _grad_d_student, _grad_d_teacher):
    # The forward already holds d KL_i / d logits; backward only scales each row by the incoming gradient.
    d_student, d_teacher = ctx.saved_tensors
    if grad_rows is None:  # the loss did not use the KL values
        return None, None, None, None, None
    grads = []
    for needed, has, d in zip(ctx.needs_input_grad[:2], ctx.has_grads, (d_student, d_teacher)):
        if not needed:
            grads.append(None)
            continue
        if not has:
            raise RuntimeError("urda_fast: kd_kl_forward was called without the gradient flag for an input that "
                               "requires grad; call it through urda_fast.ops.kd_kl_loss")
        grads.append((grad_rows.unsqueeze(1) * d).to(d.dtype))
    return grads[0], grads[1], None, None, None


def register(suffix: str, *, fake: bool) -> None:
    """Fake kernel (native op) and autograd for ``urda_fast::kd_kl_forward{suffix}``."""
    qualname = f"urda_fast::kd_kl_forward{suffix}"
    if fake:
        torch.library.register_fake(qualname)(_fake_kd_kl_forward)
    torch.library.register_autograd(qualname, _backward_kd_kl_forward, setup_context=_setup_context_kd_kl_forward)
