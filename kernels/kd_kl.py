"""Triton backend of ``kd_kl_forward`` (see docs/kernel-contract.md for the math).

One program per row, looping over the classes in BLOCK chunks: pass 1 runs an online max / sum-exp for the teacher
and the student row at once, pass 2 writes the KL terms and d_student, pass 3 (only when grad_teacher, it needs the
row's KL) writes d_teacher. Every exponent is taken of a max-shifted logit, so |logits| ~ 1e4 stay exact.
"""

import torch
import triton
import triton.language as tl
from urda_fast.kernels._registry import define_op, launch

_MAX_BLOCK = 4096


@triton.jit
def _div_rn(x, y):
    # Correctly rounded x / y, as torch divides: Triton's fp32 `/` is the 2-ulp div.full.f32, and with |logits| ~ 1e4
    # every ulp of t / T is a 1e-3 relative error in p. (fp64 `/` is already IEEE.)
    if x.dtype == tl.float32:
        return tl.math.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _load_scaled(row_ptr, cols, mask, T):
    # Logits / T in acc; the padded tail reads -inf, so it drops out of every max, sum and KL term.
    return _div_rn(tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(T.dtype), T)


@triton.jit
def _online_update(m, z, v):
    # Running (max, sum exp(x - max)) after chunk v. A row (or chunk) that is all -inf so far keeps max = -inf, so
    # shift by 0 instead: exp(-inf - (-inf)) would be NaN.
    m_new = tl.maximum(m, tl.max(v, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp(m - shift) + tl.sum(tl.exp(v - shift), 0)
    return m_new, z


@triton.jit
def _kd_kl_fwd_kernel(s_ptr, t_ptr, kl_ptr, ds_ptr, dt_ptr, C, temperature: tl.float64,
                      GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr):
    acc_t = kl_ptr.dtype.element_ty  # loss dtype == acc dtype
    # T is passed as fp64 (a plain float argument is rounded to fp32 even for fp64 inputs); tl.full rounds it to acc
    # once, and also accepts the raw Python float that the interpreter passes.
    T = tl.full([], temperature, acc_t)
    inv_t = _div_rn(tl.full([], 1.0, acc_t), T)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * C
    t_row = t_ptr + row * C

    m_t = tl.full([], float("-inf"), acc_t)
    m_s = tl.full([], float("-inf"), acc_t)
    z_t = tl.zeros([], acc_t)
    z_s = tl.zeros([], acc_t)
    for k in range(0, C, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        mask = cols < C
        a = _load_scaled(t_row, cols, mask, T)
        b = _load_scaled(s_row, cols, mask, T)
        m_t, z_t = _online_update(m_t, z_t, a)
        m_s, z_s = _online_update(m_s, z_s, b)
    # log p = (a - m_t) - log z_t: subtracting the max first keeps a - m_t exact (Sterbenz) for huge logits.
    log_z_t = tl.log(z_t)
    log_z_s = tl.log(z_s)

    kl_acc = tl.zeros([BLOCK], acc_t)
    for k in range(0, C, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        mask = cols < C
        a = _load_scaled(t_row, cols, mask, T)
        b = _load_scaled(s_row, cols, mask, T)
        log_p = (a - m_t) - log_z_t
        log_q = (b - m_s) - log_z_s
        p = tl.exp(log_p)
        # Teacher-masked (-inf) classes and the tail have p == 0 and contribute 0 (not 0 * inf = NaN).
        kl_acc += tl.where(p > 0, p * (log_p - log_q), 0.0)
        if GRAD_S:
            ds = (tl.exp(log_q) - p) * inv_t
            tl.store(ds_ptr + row * C + cols, ds.to(ds_ptr.dtype.element_ty), mask=mask)
    kl = tl.sum(kl_acc, 0)
    tl.store(kl_ptr + row, kl)

    if GRAD_T:
        for k in range(0, C, BLOCK):
            cols = k + tl.arange(0, BLOCK)
            mask = cols < C
            a = _load_scaled(t_row, cols, mask, T)
            b = _load_scaled(s_row, cols, mask, T)
            log_p = (a - m_t) - log_z_t
            log_q = (b - m_s) - log_z_s
            p = tl.exp(log_p)
            dt = tl.where(p > 0, p * (log_p - log_q - kl) * inv_t, 0.0)
            tl.store(dt_ptr + row * C + cols, dt.to(dt_ptr.dtype.element_ty), mask=mask)


def _kd_kl_settings(classes):
    """(BLOCK, num_warps): whole small rows in one chunk, 4096-wide chunks (16 fp32 per thread) for long rows."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(classes))
    return block, max(1, min(8, block // 256))


@define_op("urda_fast::kd_kl_forward_triton", mutates_args=())
def kd_kl_forward_triton(student: torch.Tensor, teacher: torch.Tensor, temperature: float, grad_student: bool,
                         grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, classes = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    kl = torch.empty((rows,), dtype=acc_dtype, device=student.device)
    d_student = torch.empty_like(student) if grad_student else student.new_empty((0,))
    d_teacher = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    if rows > 0:
        block, num_warps = _kd_kl_settings(classes)
        launch(_kd_kl_fwd_kernel)[(rows,)](
            student, teacher, kl, d_student, d_teacher, classes, float(temperature),
            GRAD_S=grad_student, GRAD_T=grad_teacher, BLOCK=block, num_warps=num_warps)
    return kl, d_student, d_teacher
