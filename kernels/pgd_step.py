"""Triton backend of ``pgd_step`` / ``pgd_step_`` (see docs/kernel-contract.md for the math).

The input is viewed as (B, C, inner): per-sample step/eps are indexed by b, per-channel bounds by c.
linf is one elementwise pass. l2 first reduces [sum g^2, sum (x-x0) g, sum (x-x0)^2] per sample (split over several
programs when samples are long and the batch is small), turns them into two per-sample coefficients
(s = step / |g|, f = min(1, eps / |d|)), then runs the same elementwise pass.
"""

import torch
import triton
import triton.language as tl
from urda_fast.kernels._registry import define_op, launch
from urda_fast.kernels._rounding import div_rn, sqrt_rn

L2_NORM_FLOOR = 1e-12  # same floor as urda_fast.ops.reference

_BLOCK = 1024  # elementwise: 8 elements per thread with 4 warps
_RED_BLOCK = 1024  # reductions: one vector accumulator of this many lanes per program
_TARGET_PROGRAMS = 1024  # enough programs to fill an H100 (132 SMs) several times over
_MAX_I32 = 2**31 - 1
_MAX_GRID_Y = 65535
# (sample, channel) planes at least this long take the plane kernel; shorter ones (feature vectors, per-channel
# bounds over (B, D)) keep the flat kernel, whose programs span several planes.
_MIN_PLANE = 512


@triton.jit
def _batch_channel(start, C, inner, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # (b, c) of BLOCK consecutive flat elements from `start`. The 64-bit divisions are done once per program on the
    # scalar start; per element only 32-bit divisions of small block-local offsets remain (64-bit integer division is
    # emulated on NVIDIA GPUs and would make this memory-bound pass compute-bound). WIDE: C or inner near 2^31.
    if WIDE:
        plane = (start + tl.arange(0, BLOCK)) // inner
        return plane // C, plane % C
    else:
        plane0 = start // inner
        local = (start - plane0 * inner).to(tl.int32) + tl.arange(0, BLOCK)
        c = (plane0 % C).to(tl.int32) + local // inner
        return plane0 // C + c // C, c % C


@triton.jit
def _l2_coef(sgg, sdg, sdd, step, eps, FLOOR: tl.constexpr):
    # One-pass |d|^2 with d = (x - x0) + s g: |x-x0|^2 + 2 s <x-x0, g> + (s |g|)^2 (s |g| <= step, no overflow).
    gn = sqrt_rn(sgg)
    s = div_rn(step, tl.maximum(gn, FLOOR))
    sg = s * gn
    dn = sqrt_rn(tl.maximum(sdd + 2.0 * s * sdg + sg * sg, 0.0))
    f = tl.minimum(div_rn(eps, tl.maximum(dn, FLOOR)), 1.0)
    # A NaN/inf in the sample makes it all NaN, as the reference (min/max above may drop NaN: hardware semantics).
    # Not the cross term: |sdg| <= sqrt(sgg sdd), finite when they are, yet adding it could overflow a finite sum.
    total = sgg + sdd
    finite = (total == total) & (tl.abs(total) < float("inf"))
    return tl.where(finite, s, float("nan")), tl.where(finite, f, float("nan"))


@triton.jit
def _step_values(x, g, x0, p0, p1, lo, hi, L2: tl.constexpr):
    # One step of each element. L-inf: p0 = step, p1 = eps; L2: p0 = s, p1 = f from the per-sample coefficients.
    if L2:
        y = x0 + ((x - x0) + p0 * g) * p1
    else:
        sign = (g > 0).to(x.dtype) - (g < 0).to(x.dtype)
        y = tl.minimum(tl.maximum(x + p0 * sign, x0 - p1), x0 + p1)
        y = tl.where((x == x) & (x0 == x0), y, x + x0)  # a NaN x or x0 gives NaN, whatever min/max do with it
    return tl.where(y == y, tl.minimum(tl.maximum(y, lo), hi), y)


@triton.jit
def _pgd_step_fwd_kernel(x_ptr, g_ptr, x0_ptr, step_ptr, eps_ptr, coef_ptr, lo_ptr, hi_ptr, out_ptr, N, C, inner,
                         L2: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    acc_t = step_ptr.dtype.element_ty
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    b, c = _batch_channel(start, C, inner, BLOCK, WIDE)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_t)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if L2:
        p0 = tl.load(coef_ptr + 2 * b, mask=mask, other=0.0)
        p1 = tl.load(coef_ptr + 2 * b + 1, mask=mask, other=0.0)
    else:
        p0 = tl.load(step_ptr + b, mask=mask, other=0.0)
        p1 = tl.load(eps_ptr + b, mask=mask, other=0.0)
    lo = tl.load(lo_ptr + c, mask=mask, other=0.0)
    hi = tl.load(hi_ptr + c, mask=mask, other=0.0)
    y = _step_values(x, g, x0, p0, p1, lo, hi, L2)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_step_plane_kernel(x_ptr, g_ptr, x0_ptr, step_ptr, eps_ptr, coef_ptr, lo_ptr, hi_ptr, out_ptr, C, inner,
                           L2: tl.constexpr, BLOCK: tl.constexpr):
    # grid (B * C planes, blocks per plane): the sample's step/eps and the channel's bounds are scalars of the
    # program, so no element needs an index division or a gathered load.
    acc_t = step_ptr.dtype.element_ty
    plane = tl.program_id(0).to(tl.int64)
    b = plane // C
    c = plane - b * C
    local = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < inner
    offs = plane * inner + local
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_t)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if L2:
        p0 = tl.load(coef_ptr + 2 * b)
        p1 = tl.load(coef_ptr + 2 * b + 1)
    else:
        p0 = tl.load(step_ptr + b)
        p1 = tl.load(eps_ptr + b)
    y = _step_values(x, g, x0, p0, p1, tl.load(lo_ptr + c), tl.load(hi_ptr + c), L2)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_step_l2_stats_kernel(x_ptr, g_ptr, x0_ptr, step_ptr, eps_ptr, part_ptr, coef_ptr, M, chunk,
                              SPLIT: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    # grid (B, S): program (b, j) reduces elements [j*chunk, (j+1)*chunk) of sample b. With S == 1 (not SPLIT) it
    # finishes the sample itself; otherwise it writes its three partial sums to part[b, j, :].
    acc_t = step_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    base = row * M
    lo = j * chunk
    hi = tl.minimum(lo + chunk, M)
    sgg = tl.zeros([BLOCK], dtype=acc_t)
    sdg = tl.zeros([BLOCK], dtype=acc_t)
    sdd = tl.zeros([BLOCK], dtype=acc_t)
    for k in range(lo, hi, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        mask = offs < hi
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(acc_t)
        d = (tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(acc_t)
             - tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(acc_t))
        sgg += g * g
        sdg += d * g
        sdd += d * d
    if SPLIT:
        nsplit = tl.num_programs(1).to(tl.int64)
        out = part_ptr + (row * nsplit + j) * 3
        tl.store(out, tl.sum(sgg, 0))
        tl.store(out + 1, tl.sum(sdg, 0))
        tl.store(out + 2, tl.sum(sdd, 0))
    else:
        s, f = _l2_coef(tl.sum(sgg, 0), tl.sum(sdg, 0), tl.sum(sdd, 0), tl.load(step_ptr + row),
                        tl.load(eps_ptr + row), FLOOR)
        tl.store(coef_ptr + 2 * row, s)
        tl.store(coef_ptr + 2 * row + 1, f)


@triton.jit
def _pgd_step_l2_coef_kernel(part_ptr, step_ptr, eps_ptr, coef_ptr, B, S, FLOOR: tl.constexpr,
                             BLOCK_B: tl.constexpr):
    # Sums the S partials of BLOCK_B samples (in a fixed order: deterministic) and writes their (s, f).
    acc_t = step_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < B
    sgg = tl.zeros([BLOCK_B], dtype=acc_t)
    sdg = tl.zeros([BLOCK_B], dtype=acc_t)
    sdd = tl.zeros([BLOCK_B], dtype=acc_t)
    for j in range(0, S):
        p = part_ptr + (rows * S + j) * 3
        sgg += tl.load(p, mask=mask, other=0.0)
        sdg += tl.load(p + 1, mask=mask, other=0.0)
        sdd += tl.load(p + 2, mask=mask, other=0.0)
    step = tl.load(step_ptr + rows, mask=mask, other=0.0)
    eps = tl.load(eps_ptr + rows, mask=mask, other=0.0)
    s, f = _l2_coef(sgg, sdg, sdd, step, eps, FLOOR)
    tl.store(coef_ptr + 2 * rows, s, mask=mask)
    tl.store(coef_ptr + 2 * rows + 1, f, mask=mask)


def _split(rows, length, block):
    """(programs per row, elements per program) so that a small batch of long rows still fills the GPU."""
    per_row = max(1, min(triton.cdiv(length, 8 * block), triton.cdiv(_TARGET_PROGRAMS, max(rows, 1))))
    chunk = max(1, triton.cdiv(triton.cdiv(length, per_row), block)) * block
    return max(1, triton.cdiv(length, chunk)), chunk


def _l2_coefficients(x_adv, grad, x_orig, step_size, eps):
    """(B, 2) acc-dtype [s, f] per sample."""
    batch = x_adv.shape[0]
    per_sample = x_adv.numel() // batch
    nsplit, chunk = _split(batch, per_sample, _RED_BLOCK)
    coef = torch.empty((batch, 2), dtype=step_size.dtype, device=x_adv.device)
    part = torch.empty((batch, nsplit, 3) if nsplit > 1 else (0,), dtype=step_size.dtype, device=x_adv.device)
    launch(_pgd_step_l2_stats_kernel)[(batch, nsplit)](
        x_adv, grad, x_orig, step_size, eps, part, coef, per_sample, chunk,
        SPLIT=nsplit > 1, FLOOR=L2_NORM_FLOOR, BLOCK=_RED_BLOCK, num_warps=4)
    if nsplit > 1:
        launch(_pgd_step_l2_coef_kernel)[(triton.cdiv(batch, 128),)](
            part, step_size, eps, coef, batch, nsplit, FLOOR=L2_NORM_FLOOR, BLOCK_B=128, num_warps=4)
    return coef


def _pgd_step_launch(x_adv, grad, x_orig, step_size, eps, lower, upper, norm, out):
    """Writes the step into ``out`` (which may be ``x_adv`` itself: each element is read before it is written)."""
    torch._check(norm in ("linf", "l2"), lambda: f"norm must be 'linf' or 'l2', got {norm!r}")
    n = x_adv.numel()
    if n == 0:
        return
    channels = x_adv.shape[1] if x_adv.dim() >= 2 else 1
    inner = n // (x_adv.shape[0] * channels)
    # l2 stats are complete before the elementwise pass starts (separate launches), so in-place is safe there too.
    coef = _l2_coefficients(x_adv, grad, x_orig, step_size, eps) if norm == "l2" else step_size
    if inner >= _MIN_PLANE and triton.cdiv(inner, _BLOCK) <= _MAX_GRID_Y:
        block = min(_BLOCK, triton.next_power_of_2(inner))
        launch(_pgd_step_plane_kernel)[(n // inner, triton.cdiv(inner, block))](
            x_adv, grad, x_orig, step_size, eps, coef, lower, upper, out, channels, inner,
            L2=norm == "l2", BLOCK=block, num_warps=4)
        return
    wide = max(inner, channels) + _BLOCK > _MAX_I32
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    launch(_pgd_step_fwd_kernel)[grid](
        x_adv, grad, x_orig, step_size, eps, coef, lower, upper, out, n, channels, inner,
        L2=norm == "l2", WIDE=wide, BLOCK=_BLOCK, num_warps=4)


@define_op("urda_fast::pgd_step_triton", mutates_args=())
def pgd_step_triton(x_adv: torch.Tensor, grad: torch.Tensor, x_orig: torch.Tensor, step_size: torch.Tensor,
                    eps: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, norm: str) -> torch.Tensor:
    out = torch.empty_like(x_adv)
    _pgd_step_launch(x_adv, grad, x_orig, step_size, eps, lower, upper, norm, out)
    return out


@define_op("urda_fast::pgd_step_triton_", mutates_args={"x_adv"})
def pgd_step_triton_(x_adv: torch.Tensor, grad: torch.Tensor, x_orig: torch.Tensor, step_size: torch.Tensor,
                     eps: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, norm: str) -> None:
    _pgd_step_launch(x_adv, grad, x_orig, step_size, eps, lower, upper, norm, x_adv)
