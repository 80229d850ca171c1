"""Triton backend of ``kd_kl_forward`` / ``kd_kl_backward`` (see docs/kernel-contract.md for the math).

One program per row, looping over the classes in BLOCK chunks. Forward: one pass that keeps an online max / sum-exp
of the teacher and the student row and the KL numerator at once (so a long row is read once); it stores the row's
statistics [max_t, log_sum_t, max_s, log_sum_s]. Backward: one pass that recomputes p and q from them and writes
the gradients asked for. The max is taken of the raw logits and only max-shifted differences are scaled by 1/T, so
|logits| ~ 1e4 stay exact.
"""

import torch
import triton
import triton.language as tl
from urda_fast.kernels._registry import define_op, launch
from urda_fast.kernels._rounding import div_rn

_MAX_BLOCK = 4096


@triton.jit
def _load(row_ptr, cols, mask, acc_t: tl.constexpr):
    # The padded tail reads -inf, so it drops out of every max, sum and KL term.
    return tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(acc_t)


@triton.jit
def _inv_temperature(temperature, acc_t: tl.constexpr):
    # T is passed as fp64 (a plain float argument is rounded to fp32 even for fp64 inputs); tl.full rounds it to acc
    # once, and also accepts the raw Python float that the interpreter passes. 1/T correctly rounded, as torch does.
    return div_rn(tl.full([], 1.0, acc_t), tl.full([], temperature, acc_t))


@triton.jit
def _shift(m):
    # The row's shift: its max so far, or 0 while it is all -inf (-inf - -inf would be NaN).
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _kd_kl_fwd_kernel(s_ptr, t_ptr, kl_ptr, stats_ptr, C, temperature: tl.float64, BLOCK: tl.constexpr):
    # One pass over the row: with a = (t - shift_t) / T, b = (s - shift_s) / T and e = exp(a),
    # kl = sum e (a - b) / sum e - log sum e + log sum exp(b). The running sums are kept relative to the shifts so
    # far; when a chunk raises a max they are rescaled (e by exp(old - new shift), and every a - b moves by the same
    # shift difference, hence the z_t term). Long rows are read once instead of twice (statistics, then KL terms).
    acc_t = kl_ptr.dtype.element_ty  # loss dtype == acc dtype
    inv_t = _inv_temperature(temperature, acc_t)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * C
    t_row = t_ptr + row * C

    m_t = tl.full([], float("-inf"), acc_t)
    m_s = tl.full([], float("-inf"), acc_t)
    z_t = tl.zeros([], acc_t)
    z_s = tl.zeros([], acc_t)
    w = tl.zeros([], acc_t)
    for k in range(0, C, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        mask = cols < C
        vt = _load(t_row, cols, mask, acc_t)
        vs = _load(s_row, cols, mask, acc_t)
        new_m_t = tl.maximum(m_t, tl.max(vt, 0))
        new_m_s = tl.maximum(m_s, tl.max(vs, 0))
        sh_t = _shift(new_m_t)
        sh_s = _shift(new_m_s)
        moved_t = (_shift(m_t) - sh_t) * inv_t
        moved_s = (_shift(m_s) - sh_s) * inv_t
        # Nothing accumulated yet (z == 0) rescales to 0 and never forms 0 * inf; a NaN z stays NaN. A rescale that
        # underflows to 0 (the max rose by > ~88 T in float32) zeroes w too: w may be +inf (a student-masked class
        # under teacher mass), and 0 * inf would be NaN where the classes it held now have p == 0.
        rescale_t = tl.where(z_t == 0, 0.0, tl.exp(moved_t))
        w = tl.where(rescale_t == 0, 0.0, rescale_t * (w + (moved_t - moved_s) * z_t))
        z_t = z_t * rescale_t
        z_s = tl.where(z_s == 0, 0.0, z_s * tl.exp(moved_s))
        a = (vt - sh_t) * inv_t
        b = (vs - sh_s) * inv_t
        e_t = tl.exp(a)
        z_t += tl.sum(e_t, 0)
        z_s += tl.sum(tl.exp(b), 0)
        # Teacher-masked (-inf) classes and the tail have e == 0 and add 0 (not 0 * inf = NaN); a NaN e keeps it.
        w += tl.sum(tl.where(e_t <= 0, 0.0, e_t * (a - b)), 0)
        m_t = new_m_t
        m_s = new_m_s
    log_z_t = tl.log(z_t)
    log_z_s = tl.log(z_s)
    tl.store(kl_ptr + row, w / z_t - log_z_t + log_z_s)
    tl.store(stats_ptr + row * 4, m_t)
    tl.store(stats_ptr + row * 4 + 1, log_z_t)
    tl.store(stats_ptr + row * 4 + 2, m_s)
    tl.store(stats_ptr + row * 4 + 3, log_z_s)


@triton.jit
def _kd_kl_bwd_kernel(g_ptr, s_ptr, t_ptr, kl_ptr, stats_ptr, ds_ptr, dt_ptr, C, temperature: tl.float64,
                      GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr):
    acc_t = kl_ptr.dtype.element_ty
    inv_t = _inv_temperature(temperature, acc_t)
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(g_ptr + row) * inv_t
    kl = tl.load(kl_ptr + row)
    m_t = tl.load(stats_ptr + row * 4)
    log_z_t = tl.load(stats_ptr + row * 4 + 1)
    m_s = tl.load(stats_ptr + row * 4 + 2)
    log_z_s = tl.load(stats_ptr + row * 4 + 3)
    for k in range(0, C, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        mask = cols < C
        log_p = (_load(t_ptr + row * C, cols, mask, acc_t) - m_t) * inv_t - log_z_t
        log_q = (_load(s_ptr + row * C, cols, mask, acc_t) - m_s) * inv_t - log_z_s
        p = tl.exp(log_p)
        if GRAD_S:
            ds = (tl.exp(log_q) - p) * scale
            tl.store(ds_ptr + row * C + cols, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if GRAD_T:
            dt = tl.where(p <= 0, 0.0, p * (log_p - log_q - kl) * scale)
            tl.store(dt_ptr + row * C + cols, dt.to(dt_ptr.dtype.element_ty), mask=mask)


def _kd_kl_settings(classes):
    """(BLOCK, num_warps): whole small rows in one chunk, 4096-wide chunks (16 fp32 per thread) for long rows."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(classes))
    return block, max(1, min(8, block // 256))


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@define_op("urda_fast::kd_kl_forward_triton", mutates_args=())
def kd_kl_forward_triton(student: torch.Tensor, teacher: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, classes = student.shape
    kl = torch.empty((rows,), dtype=_acc_dtype(student), device=student.device)
    stats = torch.empty((rows, 4), dtype=_acc_dtype(student), device=student.device)
    if rows > 0:
        block, num_warps = _kd_kl_settings(classes)
        launch(_kd_kl_fwd_kernel)[(rows,)](student, teacher, kl, stats, classes, float(temperature), BLOCK=block,
                                           num_warps=num_warps)
    return kl, stats


@define_op("urda_fast::kd_kl_backward_triton", mutates_args=())
def kd_kl_backward_triton(grad_rows: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, kl: torch.Tensor,
                          stats: torch.Tensor, temperature: float, grad_student: bool,
                          grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, classes = student.shape
    d_student = torch.empty_like(student) if grad_student else student.new_empty((0,))
    d_teacher = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    if rows > 0 and (grad_student or grad_teacher):
        block, num_warps = _kd_kl_settings(classes)
        launch(_kd_kl_bwd_kernel)[(rows,)](grad_rows, student, teacher, kl, stats, d_student, d_teacher, classes,
                                           float(temperature), GRAD_S=grad_student, GRAD_T=grad_teacher,
                                           BLOCK=block, num_warps=num_warps)
    return d_student, d_teacher
