"""feature_mse_loss / feature_cosine_loss: every backend against the float64 reference, registration and errors."""

import pytest
import torch
from conftest import (
    HALF_TYPES,
    assert_close,
    assert_half_grad_close,
    assert_half_loss_close,
    is_triton,
)

import urda_fast.ops as ops
from urda_fast.ops import reference

SHAPES = [(1, 1), (3, 7), (2, 1023), (2, 4097), (4, 3, 5, 5), (0, 8)]
LOSSES = {"mse": (ops.feature_mse_loss, reference.feature_mse_loss),
          "cosine": (ops.feature_cosine_loss, reference.feature_cosine_loss)}


def loss_and_grads(fn, a, b, **kwargs):
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    loss = fn(a, b, **kwargs)
    if loss.numel() == 0 or not torch.isfinite(loss):
        return (loss,)
    return (loss, *torch.autograd.grad(loss * 1.7, (a, b)))


def check(loss_name, backend_name, a, b, dtype, what):
    ours, ref = LOSSES[loss_name]
    got = loss_and_grads(ours, a, b, backend=backend_name)
    want = loss_and_grads(ref, a.double(), b.double())
    assert got[0].dtype == torch.promote_types(dtype, torch.float32)
    assert len(got) == len(want)
    for label, x, y in zip(("loss", "d_a", "d_b"), got, want):
        if dtype not in HALF_TYPES:
            assert_close(x, y, dtype, f"{loss_name} {what} {label}")
        elif label == "loss":  # float32 from inputs exact in float64: float32's error only
            assert_half_loss_close(x, y, f"{loss_name} {what} {label}")
        else:  # returned in the half dtype: the reference's rounding, within a unit (CUDA rounds twice: two)
            assert_half_grad_close(x, y, dtype, f"{loss_name} {what} {label}",
                                   ulps=2 if backend_name == "cuda" else 1)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feature_loss_matches_reference(backend, loss_name, shape, dtype):
    name, device = backend
    a = torch.randn(shape, dtype=dtype, device=device)
    b = (a * 0.7 + 0.3 * torch.randn_like(a)) if shape[0] else torch.randn_like(a)
    check(loss_name, name, a, b, dtype, "x".join(map(str, shape)))


@pytest.mark.parametrize("cols", [64, 1300])  # 1300: several of the CPU kernel's 512-element narrowing chunks
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_feature_loss_half_types(backend, loss_name, dtype, cols):
    name, device = backend
    a, b = torch.randn(5, cols, device=device).to(dtype), torch.randn(5, cols, device=device).to(dtype)
    check(loss_name, name, a, b, dtype, str(dtype))


def test_feature_cosine_zero_and_tiny_rows(backend):
    """Rows with norm 0 or below eps take the clamped branch: finite values and gradients, as the reference."""
    name, device = backend
    a = torch.randn(4, 9, dtype=torch.float64, device=device)
    b = torch.randn(4, 9, dtype=torch.float64, device=device)
    a[0] = 0
    b[1] = 1e-12
    check("cosine", name, a, b, torch.float64, "zero rows")
    check("cosine", name, a.float(), b.float(), torch.float32, "zero rows f32")


def test_feature_cosine_huge_rows_give_finite_gradients_with_a_finite_loss(backend):
    """Rows of norm ~1e21: the product of two norms overflows float32. A backend whose loss is finite (the CPU
    kernel sums in double) gives the float64 reference's gradients, never NaN behind a finite loss."""
    name, device = backend
    torch.manual_seed(0)
    a, b = torch.randn(3, 7, device=device) * 1e20, torch.randn(3, 7, device=device) * 1e20
    got = loss_and_grads(lambda x, y: ops.feature_cosine_loss(x, y, backend=name), a, b)
    want = loss_and_grads(reference.feature_cosine_loss, a.double(), b.double())
    if name == "cpu":
        assert len(got) == 3
    if torch.isfinite(got[0]):
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=0)
        for x, y in zip(got[1:], want[1:]):  # gradients ~1e-21: compared at the loss's scale
            torch.testing.assert_close(x.double() * 1e21, y * 1e21, rtol=1e-4, atol=1e-5)
    else:
        assert torch.isnan(got[0])


def test_feature_mse_beyond_float_range_is_inf(backend):
    name, device = backend
    a, b = torch.full((1, 2), 3e38, device=device), torch.full((1, 2), -3e38, device=device)
    for x, y in ((a, b), (a.bfloat16(), b.bfloat16())):
        loss = ops.feature_mse_loss(x, y, backend=name)
        assert loss.dtype == torch.float32 and loss.item() == float("inf")
        assert reference.feature_mse_loss(x, y).item() == float("inf")


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feature_loss_nan_in_a_row_makes_the_loss_and_that_rows_gradients_nan(backend, loss_name, dtype):
    """A NaN element: the loss is NaN, the gradients are NaN where the reference's are (the cosine's: its whole row;
    a norm clamp that dropped the NaN gave finite ~1e7 gradients there), and the other rows keep theirs."""
    name, device = backend
    a = torch.randn(3, 6, dtype=dtype, device=device)
    b = torch.randn(3, 6, dtype=dtype, device=device)
    a[0, 2] = float("nan")
    ours, ref = LOSSES[loss_name]
    got, want = [], []
    for fn, out, kwargs in ((ours, got, {"backend": name}), (ref, want, {})):
        x, y = a.detach().requires_grad_(), b.detach().requires_grad_()
        loss = fn(x, y, **kwargs)
        out.extend((loss, *torch.autograd.grad(loss, (x, y))))
    assert torch.isnan(got[0])
    for label, x, y in zip(("d_a", "d_b"), got[1:], want[1:]):
        assert torch.equal(torch.isnan(x), torch.isnan(y)), label
        torch.testing.assert_close(x[1:], y[1:], msg=label)  # the rows without NaN


def test_feature_losses_non_contiguous_and_mixed(backend):
    name, device = backend
    a = torch.randn(6, 10, device=device).t()  # (10, 6) strided
    b = torch.randn(1, 6, device=device).expand(10, 6)
    for loss_name in LOSSES:
        check(loss_name, name, a, b, torch.float32, "strided")
        ours, ref = LOSSES[loss_name]
        assert_close(ours(a.double(), b, backend=name), ref(a.double(), b.double()), torch.float64, "mixed dtypes")


def test_feature_losses_gradcheck(backend):
    name, device = backend
    a = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    for ours, _ in LOSSES.values():
        assert torch.autograd.gradcheck(lambda x, y: ours(x, y, backend=name), (a, b))


def test_feature_losses_opcheck(backend):
    name, device = backend
    a, b = torch.randn(3, 17, device=device), torch.randn(3, 17, device=device)
    ops.feature_mse_loss(a, b, backend=name)  # registers the Triton ops
    ns, suffix = torch.ops.urda_fast, "_triton" if is_triton(backend) else ""
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    torch.library.opcheck(getattr(ns, f"feature_mse_forward{suffix}"), (ar, br))
    torch.library.opcheck(getattr(ns, f"feature_mse_backward{suffix}"), (torch.tensor(0.5, device=device), a, b))
    torch.library.opcheck(getattr(ns, f"feature_cosine_forward{suffix}"), (ar, br, 1e-8))
    loss, stats = getattr(ns, f"feature_cosine_forward{suffix}")(a, b, 1e-8)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(getattr(ns, f"feature_cosine_backward{suffix}"), (torch.full_like(loss, 0.5), a, b,
                                                                                 stats, 1e-8, *flags))


@pytest.mark.parametrize("dynamic", [False, True])
def test_feature_losses_compile_fullgraph(backend, dynamic):
    """dynamic: a symbolic batch size (the cosine backward's 1 / rows was a symbolic float, which Inductor's Triton
    launcher types as an int: GPU only; here it checks the other backends' graphs with a symbolic batch)."""
    name, device = backend

    def loss_fn(x, y):
        return ops.feature_mse_loss(x, y, backend=name) + 0.5 * ops.feature_cosine_loss(x, y, backend=name)

    compiled_fn = torch.compile(loss_fn, fullgraph=True, dynamic=dynamic)
    for rows in (4, 5) if dynamic else (4,):
        a, b = torch.randn(rows, 3, 6, device=device), torch.randn(rows, 3, 6, device=device)
        eager = loss_and_grads(loss_fn, a, b)
        compiled = loss_and_grads(compiled_fn, a, b)
        for x, y in zip(compiled, eager):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize(
    "a, b, error, match",
    [
        (torch.randn(2, 3), torch.randn(2, 4), ValueError, "b has shape"),
        (torch.randn(2, 3), torch.randn(2, 3, device="meta"), ValueError, "b is on meta"),
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), TypeError, "floating-point"),
        (torch.tensor(1.0), torch.tensor(1.0), ValueError, "batch dimension"),
    ],
)
def test_feature_losses_reject_bad_input(loss_name, a, b, error, match):
    with pytest.raises(error, match=match):
        LOSSES[loss_name][0](a, b, backend="cpu")


def test_feature_cosine_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps must be a positive finite"):
        ops.feature_cosine_loss(torch.randn(2, 3), torch.randn(2, 3), eps=-1.0)


@pytest.mark.parametrize("loss_name", ["feature_mse_loss", "feature_cosine_loss"])
def test_feature_losses_refuse_double_backward(backend, loss_name):
    """A second-order backward through the fused kernel is a clear error, not a silently missing derivative."""
    name, device = backend
    a = torch.randn(3, 6, device=device, requires_grad=True)
    b = torch.randn(3, 6, device=device)
    (grad,) = torch.autograd.grad(getattr(ops, loss_name)(a, b, backend=name), a, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{loss_name} has no second derivative on the fused backends"):
        grad.square().sum().backward()


def test_feature_cosine_cpu_loss_has_the_same_bits_for_any_thread_count():
    """The CPU kernel sums the per-row distances in row order after its parallel pass: one thread or two (each
    taking a different share of the 64 rows) give one bit pattern."""
    a, b = torch.randn(64, 1024), torch.randn(64, 1024)
    threads = torch.get_num_threads()
    try:
        losses = []
        for count in (1, 2):
            torch.set_num_threads(count)
            losses.append(ops.feature_cosine_loss(a, b, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    assert_close(losses[0], reference.feature_cosine_loss(a.double(), b.double()), torch.float32, "64x1024")
