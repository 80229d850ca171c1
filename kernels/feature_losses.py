"""Triton backend of ``feature_mse_*`` and ``feature_cosine_*`` (see docs/kernel-contract.md for the math).

mse forward: chunked partial sums of (a - b)^2 (one program per chunk), then one program sums the partials in a fixed
order (deterministic, no atomics) and divides by B*D. cosine forward: per-row [a.b, a.a, b.b], split over several
programs per row when rows are long and the batch is small, then per-row norms and cos. Both backwards are single
elementwise passes over (B, D) that gather their per-row scalars.
"""

import torch
import triton
import triton.language as tl
from urda_fast.kernels._registry import define_op, launch
from urda_fast.kernels._rounding import div_rn

_BLOCK = 1024  # elementwise and reduction block: 8 elements per thread with 4 warps
_BLOCK_B = 128  # rows per program when finishing per-row partial sums
_TARGET_PROGRAMS = 1024  # enough programs to fill an H100 (132 SMs) several times over
_MAX_I32 = 2**31 - 1


@triton.jit
def _row_of(start, D, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # Row of BLOCK consecutive flat elements from `start`: one 64-bit division per program, 32-bit ones per element
    # (64-bit integer division is emulated on NVIDIA GPUs). WIDE: rows of nearly 2^31 elements or more.
    if WIDE:
        return (start + tl.arange(0, BLOCK)) // D
    else:
        row0 = start // D
        return row0 + ((start - row0 * D).to(tl.int32) + tl.arange(0, BLOCK)) // D


@triton.jit
def _norm_floor(norm, eps):
    # max(norm, eps) that keeps a NaN norm (tl.maximum drops NaN on GPUs): a NaN row's gradients stay NaN, not ~1/eps
    return tl.where(norm <= eps, eps, norm)


@triton.jit
def _cosine_finish(dot, saa, sbb, eps):
    na = tl.sqrt(saa)
    nb = tl.sqrt(sbb)
    return na, nb, dot / (_norm_floor(na, eps) * _norm_floor(nb, eps))


@triton.jit
def _feature_mse_fwd_kernel(a_ptr, b_ptr, part_ptr, out_ptr, N, chunk, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    # Program j sums elements [j*chunk, (j+1)*chunk). A single program (not SPLIT) writes the mean itself.
    acc_t = out_ptr.dtype.element_ty
    j = tl.program_id(0).to(tl.int64)
    lo = j * chunk
    hi = tl.minimum(lo + chunk, N)
    acc = tl.zeros([BLOCK], dtype=acc_t)
    for k in range(lo, hi, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        mask = offs < hi
        d = (tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_t)
             - tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_t))
        acc += d * d
    total = tl.sum(acc, 0)
    if SPLIT:
        tl.store(part_ptr + j, total)
    else:
        tl.store(out_ptr, total / N)


@triton.jit
def _feature_mse_sum_kernel(part_ptr, out_ptr, S, N, BLOCK: tl.constexpr):
    acc_t = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=acc_t)
    for k in range(0, S, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < S, other=0.0)
    tl.store(out_ptr, tl.sum(acc, 0) / N)


@triton.jit
def _feature_mse_bwd_kernel(grad_ptr, a_ptr, b_ptr, out_ptr, N, BLOCK: tl.constexpr):
    acc_t = grad_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    scale = tl.load(grad_ptr) * 2.0 / N
    d = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_t) - tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_t)
    tl.store(out_ptr + offs, (scale * d).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _feature_cosine_fwd_kernel(a_ptr, b_ptr, part_ptr, stats_ptr, cos_ptr, D, chunk, eps: tl.float64,
                               SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    # grid (B, S): program (r, j) reduces columns [j*chunk, (j+1)*chunk) of row r. With S == 1 (not SPLIT) it
    # finishes the row; otherwise it writes [a.b, a.a, b.b] partials to part[r, j, :].
    acc_t = stats_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    base = row * D
    lo = j * chunk
    hi = tl.minimum(lo + chunk, D)
    sab = tl.zeros([BLOCK], dtype=acc_t)
    saa = tl.zeros([BLOCK], dtype=acc_t)
    sbb = tl.zeros([BLOCK], dtype=acc_t)
    for k in range(lo, hi, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        mask = offs < hi
        a = tl.load(a_ptr + base + offs, mask=mask, other=0.0).to(acc_t)
        b = tl.load(b_ptr + base + offs, mask=mask, other=0.0).to(acc_t)
        sab += a * b
        saa += a * a
        sbb += b * b
    dot = tl.sum(sab, 0)
    if SPLIT:
        out = part_ptr + (row * tl.num_programs(1).to(tl.int64) + j) * 3
        tl.store(out, dot)
        tl.store(out + 1, tl.sum(saa, 0))
        tl.store(out + 2, tl.sum(sbb, 0))
    else:
        na, nb, cos = _cosine_finish(dot, tl.sum(saa, 0), tl.sum(sbb, 0), tl.full([], eps, acc_t))
        tl.store(stats_ptr + row * 3, cos)
        tl.store(stats_ptr + row * 3 + 1, na)
        tl.store(stats_ptr + row * 3 + 2, nb)
        tl.store(cos_ptr + row, cos)


@triton.jit
def _feature_cosine_finish_kernel(part_ptr, stats_ptr, cos_ptr, B, S, eps: tl.float64, BLOCK_B: tl.constexpr):
    # Sums the S partials of BLOCK_B rows in a fixed order (deterministic) and writes stats and cos.
    acc_t = stats_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < B
    dot = tl.zeros([BLOCK_B], dtype=acc_t)
    saa = tl.zeros([BLOCK_B], dtype=acc_t)
    sbb = tl.zeros([BLOCK_B], dtype=acc_t)
    for j in range(0, S):
        p = part_ptr + (rows * S + j) * 3
        dot += tl.load(p, mask=mask, other=0.0)
        saa += tl.load(p + 1, mask=mask, other=0.0)
        sbb += tl.load(p + 2, mask=mask, other=0.0)
    na, nb, cos = _cosine_finish(dot, saa, sbb, tl.full([], eps, acc_t))
    tl.store(stats_ptr + rows * 3, cos, mask=mask)
    tl.store(stats_ptr + rows * 3 + 1, na, mask=mask)
    tl.store(stats_ptr + rows * 3 + 2, nb, mask=mask)
    tl.store(cos_ptr + rows, cos, mask=mask)


@triton.jit
def _feature_cosine_bwd_kernel(grad_ptr, a_ptr, b_ptr, stats_ptr, da_ptr, db_ptr, N, D, eps: tl.float64, ROWS,
                               GRAD_A: tl.constexpr, GRAD_B: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    acc_t = stats_ptr.dtype.element_ty
    eps_c = tl.full([], eps, acc_t)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    row = _row_of(start, D, BLOCK, WIDE)
    # d loss / d cos_i, the same for every row: -grad / ROWS (d mean_i (1 - cos_i) / d cos_i). The row count comes as
    # an int, not as the float -1 / rows: under a compile with a dynamic batch that float is symbolic, which
    # Inductor's launcher would type as an int.
    g = div_rn(-tl.load(grad_ptr).to(acc_t), tl.full([], ROWS, acc_t))
    # Per-row scalars: every element of a row gathers the same few addresses (cache hits).
    cos = tl.load(stats_ptr + row * 3, mask=mask, other=0.0)
    na = tl.load(stats_ptr + row * 3 + 1, mask=mask, other=1.0)
    nb = tl.load(stats_ptr + row * 3 + 2, mask=mask, other=1.0)
    # d cos / d a = (1 / ca) (b / cb - (cos / na) a), ca = max(na, eps): no factor leaves float32's normal range
    # for rows of large norm (1 / (ca cb) overflows, or falls to a subnormal, past ~1e19). A norm at or below eps is
    # clamped to a constant, so it contributes no cos term of its own.
    inv_a = 1.0 / _norm_floor(na, eps_c)
    inv_b = 1.0 / _norm_floor(nb, eps_c)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_t)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if GRAD_A:
        ka = tl.where(na > eps_c, cos / na, 0.0)
        tl.store(da_ptr + offs, ((g * inv_a) * (b * inv_b - ka * a)).to(da_ptr.dtype.element_ty), mask=mask)
    if GRAD_B:
        kb = tl.where(nb > eps_c, cos / nb, 0.0)
        tl.store(db_ptr + offs, ((g * inv_b) * (a * inv_a - kb * b)).to(db_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split(rows, length, block):
    """(programs per row, elements per program) so that a small batch of long rows still fills the GPU."""
    per_row = max(1, min(triton.cdiv(length, 8 * block), triton.cdiv(_TARGET_PROGRAMS, max(rows, 1))))
    chunk = max(1, triton.cdiv(triton.cdiv(length, per_row), block)) * block
    return max(1, triton.cdiv(length, chunk)), chunk


@define_op("urda_fast::feature_mse_forward_triton", mutates_args=())
def feature_mse_forward_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = a.numel()
    if n == 0:  # mean of nothing, as torch.mean
        return torch.full((), float("nan"), dtype=_acc_dtype(a.dtype), device=a.device)
    out = torch.empty((), dtype=_acc_dtype(a.dtype), device=a.device)
    nsplit, chunk = _split(1, n, _BLOCK)
    part = torch.empty((nsplit,) if nsplit > 1 else (0,), dtype=out.dtype, device=a.device)
    launch(_feature_mse_fwd_kernel)[(nsplit,)](a, b, part, out, n, chunk, SPLIT=nsplit > 1, BLOCK=_BLOCK,
                                               num_warps=4)
    if nsplit > 1:
        launch(_feature_mse_sum_kernel)[(1,)](part, out, nsplit, n, BLOCK=_BLOCK, num_warps=4)
    return out


@define_op("urda_fast::feature_mse_backward_triton", mutates_args=())
def feature_mse_backward_triton(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(a)
    n = a.numel()
    if n > 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        launch(_feature_mse_bwd_kernel)[grid](grad, a, b, out, n, BLOCK=_BLOCK, num_warps=4)
    return out


@define_op("urda_fast::feature_cosine_forward_triton", mutates_args=())
def feature_cosine_forward_triton(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, dim = a.shape
    acc_dtype = _acc_dtype(a.dtype)
    cos = torch.empty((rows,), dtype=acc_dtype, device=a.device)
    stats = torch.empty((rows, 3), dtype=acc_dtype, device=a.device)
    if rows == 0:  # mean of nothing, as torch.mean
        return torch.full((), float("nan"), dtype=acc_dtype, device=a.device), stats
    nsplit, chunk = _split(rows, dim, _BLOCK)
    part = torch.empty((rows, nsplit, 3) if nsplit > 1 else (0,), dtype=acc_dtype, device=a.device)
    launch(_feature_cosine_fwd_kernel)[(rows, nsplit)](a, b, part, stats, cos, dim, chunk, float(eps),
                                                       SPLIT=nsplit > 1, BLOCK=_BLOCK, num_warps=4)
    if nsplit > 1:
        launch(_feature_cosine_finish_kernel)[(triton.cdiv(rows, _BLOCK_B),)](
            part, stats, cos, rows, nsplit, float(eps), BLOCK_B=_BLOCK_B, num_warps=4)
    return (1.0 - cos).mean(), stats


@define_op("urda_fast::feature_cosine_backward_triton", mutates_args=())
def feature_cosine_backward_triton(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stats: torch.Tensor,
                                   eps: float, grad_a: bool, grad_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d_a = torch.empty_like(a) if grad_a else a.new_empty((0,))
    d_b = torch.empty_like(b) if grad_b else a.new_empty((0,))
    n = a.numel()
    if n > 0 and (grad_a or grad_b):
        rows, dim = a.shape
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        launch(_feature_cosine_bwd_kernel)[grid](
            grad, a, b, stats, d_a, d_b, n, dim, float(eps), rows, GRAD_A=grad_a, GRAD_B=grad_b,
            WIDE=dim + _BLOCK > _MAX_I32, BLOCK=_BLOCK, num_warps=4)
    return d_a, d_b
