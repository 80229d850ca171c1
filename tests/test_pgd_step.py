"""pgd_step / pgd_step_: every backend against the float64 reference, invariants, registration and errors."""

import numpy as np
import pytest
import torch
from conftest import assert_close, is_triton
from hypothesis import given, settings
from hypothesis import strategies as st

import urda_fast.ops as ops
from urda_fast.ops import reference

SHAPES = [(1, 1), (5,), (3, 7), (2, 3, 5, 7), (3, 1023), (2, 4097), (0, 3, 4, 4)]
# (sample, channel) planes of 512+ elements take the GPU backends' plane kernels (one program per plane and block, the
# sample's step/eps and the channel's bounds read once): a partial block, two blocks, a whole one.
LONG_PLANES = [(3, 2, 23, 29), (2, 3, 1100), (1, 2, 1024)]


def make_batch(shape, dtype, device, eps=8 / 255, zero_grad_rows=True):
    """x_orig in [0, 1], x_adv inside the eps-ball and the box, a gradient with exact zeros (sign 0) and, for
    batches of 2+, one all-zero sample (the L2 step must skip it)."""
    x_orig = torch.rand(shape, dtype=torch.float64, device=device)
    x_adv = (x_orig + (torch.rand_like(x_orig) * 2 - 1) * eps).clamp(0, 1)
    grad = torch.randn_like(x_orig)
    grad[torch.rand_like(grad) < 0.1] = 0
    if zero_grad_rows and shape[0] >= 2:
        grad[1] = 0
    return x_adv.to(dtype), grad.to(dtype), x_orig.to(dtype)


def param_sets(shape):
    batch = shape[0]
    channels = shape[1] if len(shape) >= 2 else 1
    bound_shape = (1, channels) + (1,) * (len(shape) - 2) if len(shape) >= 2 else (1,)
    yield "scalars", dict(step_size=2 / 255, eps=8 / 255, lower=0.0, upper=1.0)
    yield "per-sample-and-channel", dict(
        step_size=torch.linspace(0.001, 0.02, batch, dtype=torch.float64),
        eps=torch.linspace(0.0, 0.05, batch, dtype=torch.float64),
        lower=torch.linspace(0.05, 0.2, channels).reshape(bound_shape),
        upper=torch.linspace(0.7, 0.95, channels).reshape(bound_shape),
    )


def expected(x_adv, grad, x_orig, norm, kwargs):
    return reference.pgd_step(x_adv, grad, x_orig, norm=norm, upcast=True, **kwargs)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES + LONG_PLANES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_step_matches_reference(backend, shape, dtype, norm):
    name, device = backend
    x_adv, grad, x_orig = make_batch(shape, dtype, device)
    for label, kwargs in param_sets(shape):
        if norm == "l2":
            kwargs = dict(kwargs, eps=kwargs["eps"] * 20 if isinstance(kwargs["eps"], torch.Tensor) else 0.3)
        out = ops.pgd_step(x_adv, grad, x_orig, norm=norm, backend=name, **kwargs)
        assert out.shape == x_adv.shape and out.dtype == dtype
        assert_close(out, expected(x_adv, grad, x_orig, norm, kwargs), dtype, f"{norm} {label}")
        inplace = x_adv.clone()
        returned = ops.pgd_step_(inplace, grad, x_orig, norm=norm, backend=name, **kwargs)
        assert returned is inplace
        torch.testing.assert_close(inplace, out, atol=0, rtol=0)


@pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the CPU extension is not built")
@pytest.mark.parametrize("shape", [(5, 3, 32, 32), (3, 3, 100, 100), (9, 3, 100, 100)],
                         ids=["cached_samples", "large_samples", "many_large_samples"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_l2_both_paths(shape, dtype):
    """The CPU kernel reduces and steps a sample in one visit when its three tensors fit in 256 KiB (CIFAR-sized
    images) or the batch holds 4 samples per thread, and in two passes over the batch otherwise (3 samples of
    3x100x100 float32, 360 KiB each, on 2 threads): all match the reference."""
    x_adv, grad, x_orig = make_batch(shape, dtype, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the path depends on the thread count
    try:
        for label, kwargs in param_sets(shape):
            kwargs = dict(kwargs, eps=kwargs["eps"] * 20 if isinstance(kwargs["eps"], torch.Tensor) else 0.3)
            out = ops.pgd_step(x_adv, grad, x_orig, norm="l2", backend="cpu", **kwargs)
            assert_close(out, expected(x_adv, grad, x_orig, "l2", kwargs), dtype, f"l2 {label}")
            inplace = x_adv.clone()
            ops.pgd_step_(inplace, grad, x_orig, norm="l2", backend="cpu", **kwargs)
            torch.testing.assert_close(inplace, out, atol=0, rtol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(3, 3, 9, 11), (2, 1, 40, 33)], ids=["small", "planes_of_1320"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_half_types(backend, dtype, norm, shape):
    """Within one unit in the last place of the float64 step rounded to the dtype (the kernels compute in float and
    round once more). Steps far larger than a unit: a bfloat16 unit near 1 is 2/255, the attacks' usual step, so a
    half-type tolerance at that step size let a missing or reversed step pass."""
    # planes_of_1320: the CPU kernel narrows to half types in 512-element chunks; this takes several and a remainder.
    name, device = backend
    x_adv, grad, x_orig = make_batch(shape, dtype, device)
    kwargs = dict(step_size=0.1, eps=0.3) if norm == "linf" else dict(step_size=1.0, eps=3.0)
    out = ops.pgd_step(x_adv, grad, x_orig, norm=norm, backend=name, **kwargs)
    want = expected(x_adv, grad, x_orig, norm, kwargs)
    unit = (torch.nextafter(want, torch.full_like(want, 2.0)).double() - want.double()).abs()
    assert bool(((out.double() - want.double()).abs() <= unit).all()), f"{norm} {dtype}"
    moved = (want != x_adv).double().mean()
    assert moved > 0.3  # the comparison sees steps, not points the box or a zero gradient (a whole sample) hold
    inplace = x_adv.clone()
    ops.pgd_step_(inplace, grad, x_orig, norm=norm, backend=name, **kwargs)
    assert torch.equal(inplace, out)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_non_contiguous_and_broadcast(backend, norm):
    name, device = backend
    x_adv, grad, x_orig = make_batch((4, 3, 8, 6), torch.float32, device)
    cases = {
        "channels_last": (x_adv.contiguous(memory_format=torch.channels_last), grad.transpose(2, 3).contiguous()
                          .transpose(2, 3), x_orig),
        "sliced": (torch.cat([x_adv, x_adv], 3)[..., ::2], grad, x_orig),
        "broadcast_origin": (x_adv, grad, x_orig[:1].expand_as(x_orig)),
    }
    kwargs = dict(step_size=0.01, eps=0.03 if norm == "linf" else 0.4)
    for label, (xa, g, xo) in cases.items():
        want = expected(xa, g, xo, norm, kwargs)
        assert_close(ops.pgd_step(xa, g, xo, norm=norm, backend=name, **kwargs), want, torch.float32, label)
        target = xa.clone() if label != "sliced" else torch.cat([x_adv, x_adv], 3)[..., ::2]
        ops.pgd_step_(target, g, xo, norm=norm, backend=name, **kwargs)
        assert_close(target, want, torch.float32, f"in-place {label}")


def test_pgd_step_extremes(backend):
    """Zero step, zero eps, huge step: the projection and box must hold exactly."""
    name, device = backend
    x_adv, grad, x_orig = make_batch((3, 2, 5), torch.float32, device)
    same = ops.pgd_step(x_adv, grad, x_orig, step_size=0.0, eps=1.0, backend=name)
    torch.testing.assert_close(same, x_adv, atol=0, rtol=0)
    for norm in ("linf", "l2"):
        pinned = ops.pgd_step(x_adv, grad, x_orig, step_size=1.0, eps=0.0, norm=norm, backend=name)
        torch.testing.assert_close(pinned, x_orig, atol=0, rtol=0)
        far = ops.pgd_step(x_adv, grad, x_orig, step_size=1e6, eps=0.1, norm=norm, backend=name)
        assert_close(far, expected(x_adv, grad, x_orig, norm, dict(step_size=1e6, eps=0.1)), torch.float32, norm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pgd_step_l2_half_sums_are_taken_in_float(backend, dtype):
    """A float16 gradient of unit entries over 3x224x224 has a sum of squares past float16's 65504: every backend
    sums in float (the reference summed in float16 and made the sample NaN)."""
    name, device = backend
    x_orig = torch.rand(2, 3, 224, 224, device=device).to(dtype)
    grad = torch.ones_like(x_orig)
    kwargs = dict(step_size=1.0, eps=3.0, norm="l2")
    want = reference.pgd_step(x_orig, grad, x_orig, upcast=True, **kwargs)
    for got in (ops.pgd_step(x_orig, grad, x_orig, backend=name, **kwargs),
                reference.pgd_step(x_orig, grad, x_orig, **kwargs)):
        assert torch.isfinite(got).all()
        assert_close(got, want, dtype, "l2")


@pytest.mark.parametrize("side", [3, 24], ids=["small_planes", "long_planes"])
def test_pgd_step_l2_huge_finite_sample_stays_finite(backend, side):
    """|g|^2 + |x - x0|^2 just below float32's limit is finite, as the reference says, even though adding the cross
    term <x - x0, g> would overflow: the sample takes a step, it does not turn NaN."""
    name, device = backend
    x_orig = torch.zeros(2, 1, side, side, device=device)
    x_adv, grad = x_orig.clone(), torch.zeros_like(x_orig)
    x_adv[0, 0, 0, 0] = grad[0, 0, 0, 0] = 1.3e19  # squares 1.69e38 each: sum 3.4e38 < 3.403e38
    x_adv[1], grad[1] = 0.5, -1.0
    kwargs = dict(step_size=0.5, eps=0.25, norm="l2", lower=-1e30, upper=1e30)
    want = reference.pgd_step(x_adv, grad, x_orig, upcast=True, **kwargs)
    got = ops.pgd_step(x_adv, grad, x_orig, backend=name, **kwargs)
    assert torch.isfinite(want).all()
    assert_close(got, want, torch.float32, "l2")


@pytest.mark.parametrize("side", [3, 24], ids=["small_planes", "long_planes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pgd_step_non_finite_inputs_give_nan_as_the_reference(backend, dtype, side):
    """NaN in, NaN out, on every backend alike: L-inf per element from x_adv or x_orig (a NaN gradient is no step,
    as sign(NaN) = 0); L2 for the whole sample from any NaN/inf in it. Never a finite point outside the budget.
    Planes of 24x24 take the GPU backends' one-program-per-plane kernels, 3x3 their flat ones."""
    name, device = backend
    x_adv, grad, x_orig = make_batch((6, 2, side, side), torch.float32, device, zero_grad_rows=False)
    x_adv, grad, x_orig = x_adv.to(dtype), grad.to(dtype), x_orig.to(dtype)
    x_adv[0, 0, 0, 0] = grad[1, 1, 2, 2] = x_orig[2, 0, 1, 1] = float("nan")
    grad[3, 0, 0, 1], x_adv[4, 1, 0, 0] = float("inf"), float("-inf")  # sample 5 stays finite
    for norm in ("linf", "l2"):
        kwargs = dict(step_size=0.5, eps=0.03, norm=norm)
        want = reference.pgd_step(x_adv, grad, x_orig, upcast=True, **kwargs)
        got = ops.pgd_step(x_adv, grad, x_orig, backend=name, **kwargs)
        assert torch.equal(got.isnan(), want.isnan()), norm
        finite = ~want.isnan()
        assert_close(got[finite], want[finite], dtype, norm)
        if norm == "l2":
            assert want[:5].isnan().all() and not want[5].isnan().any()
        else:
            assert want[0, 0, 0, 0].isnan() and want[2, 0, 1, 1].isnan() and want.isnan().sum() == 2


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4), channels=st.integers(1, 3), inner=st.integers(1, 40),
    eps=st.floats(0.0, 2.0), step=st.floats(0.0, 3.0), norm=st.sampled_from(["linf", "l2"]),
    low=st.floats(-1.0, 0.4), width=st.floats(0.0, 2.0), seed=st.integers(0, 2**31 - 1),
)
def test_pgd_step_invariants_hold(batch, channels, inner, eps, step, norm, low, width, seed):
    """After a step every element is inside [lower, upper] and the perturbation inside the eps-ball (float64, so the
    bound is exact up to 1e-6 relative)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, inner)
    lower, upper = low, low + width
    x_orig = lower + torch.rand(shape, generator=gen, dtype=torch.float64) * width
    x_adv = (x_orig + torch.randn(shape, generator=gen, dtype=torch.float64) * eps).clamp(lower, upper)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** torch.randint(-6, 6, (1,), generator=gen)
    out = ops.pgd_step(x_adv, grad, x_orig, step_size=step, eps=eps, norm=norm, lower=lower, upper=upper,
                       backend="cpu")
    assert bool((out >= lower).all()) and bool((out <= upper).all())
    delta = (out - x_orig).reshape(batch, -1)
    if norm == "linf":
        assert float(delta.abs().max()) <= eps * (1 + 1e-6) + 1e-12
    else:
        assert float(delta.norm(dim=1).max()) <= eps * (1 + 1e-6) + 1e-12


def test_pgd_step_opcheck(backend):
    name, device = backend
    x_adv, grad, x_orig = make_batch((2, 3, 4, 5), torch.float32, device)
    ops.pgd_step(x_adv, grad, x_orig, step_size=0.01, eps=0.03, backend=name)  # registers the Triton ops
    suffix = "_triton" if is_triton(backend) else ""
    params = [torch.full((2,), 0.01, device=device), torch.full((2,), 0.03, device=device),
              torch.zeros(3, device=device), torch.ones(3, device=device)]
    for norm in ("linf", "l2"):
        torch.library.opcheck(getattr(torch.ops.urda_fast, f"pgd_step{suffix}"), (x_adv, grad, x_orig, *params, norm))
        torch.library.opcheck(getattr(torch.ops.urda_fast, f"pgd_step{suffix}_"),
                              (x_adv.clone(), grad, x_orig, *params, norm))


def test_pgd_step_compiles_fullgraph(backend):
    name, device = backend
    x_adv, grad, x_orig = make_batch((2, 3, 4, 5), torch.float32, device)

    lower, upper = torch.full((3,), -0.5, device=device), torch.full((3,), 0.9, device=device)  # normalised space

    def attack_step(xa, g, xo, lo, hi):
        out = ops.pgd_step(xa, g, xo, step_size=0.01, eps=0.03, norm="linf", backend=name)
        out = ops.pgd_step(out, g, xo, step_size=0.01, eps=0.03, norm="linf", lower=lo, upper=hi, backend=name)
        return ops.pgd_step_(out, g, xo, step_size=0.01, eps=0.5, norm="l2", backend=name)

    eager = attack_step(x_adv, grad, x_orig, lower, upper)
    compiled = torch.compile(attack_step, fullgraph=True)(x_adv, grad, x_orig, lower, upper)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("name", ["cpu", "reference"])
def test_pgd_step_is_not_differentiable(name):
    x_adv, grad, x_orig = make_batch((2, 3), torch.float32, "cpu")
    for requires_grad in (x_adv, grad):
        out = ops.pgd_step(x_adv, grad, x_orig, step_size=0.1, eps=0.2, backend=name)
        assert not out.requires_grad  # nothing asks for a gradient: a plain tensor
        out = ops.pgd_step(requires_grad.requires_grad_(), grad, x_orig, step_size=0.1, eps=0.2, backend=name)
        with pytest.raises(RuntimeError, match="optimizer step and is not differentiable"):
            out.sum().backward()
        requires_grad.requires_grad_(False)
    with pytest.raises(RuntimeError, match="x_adv.detach"):
        ops.pgd_step_(x_adv.requires_grad_(), grad, x_orig, step_size=0.1, eps=0.2, backend=name)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(grad=torch.zeros(2, 4)), ValueError, "grad has shape"),
        (dict(x_orig=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "x_orig has dtype"),
        (dict(x_adv=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(x_orig=torch.zeros(2, 3, device="meta")), ValueError, "x_orig is on meta"),
        (dict(eps=-0.1), ValueError, "eps must be >= 0"),
        (dict(step_size=float("nan")), ValueError, "step_size is NaN"),
        (dict(step_size=float("inf")), ValueError, "step_size must be finite, got inf"),
        (dict(step_size=torch.tensor([0.1, float("inf")])), ValueError, "step_size must be finite"),
        (dict(eps=torch.tensor([0.1, float("nan")])), ValueError, "eps contains NaN"),
        (dict(eps=torch.full((2,), 0.1, device="meta")), ValueError, "eps is a meta tensor .* x_adv is on cpu"),
        (dict(lower=torch.zeros(3, device="meta")), ValueError, "lower is a meta tensor"),
        (dict(eps=torch.tensor([0.1, 0.2, 0.3])), ValueError, r"shape \(\) or \(2,\)"),
        (dict(lower=0.6, upper=0.5), ValueError, "lower must be <= upper"),
        (dict(lower=float("nan")), ValueError, "lower/upper contain NaN"),
        (dict(lower=torch.tensor(0.6), upper=0.5), ValueError, "lower must be <= upper"),
        (dict(upper=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "lower/upper contain NaN"),
        (dict(lower=torch.zeros(2)), ValueError, "lower must be a float or a tensor of 1 or 3 elements"),
        (dict(norm="l1"), ValueError, "norm must be one of"),
        (dict(x_adv=[[0.0]]), TypeError, "x_adv must be a torch.Tensor"),
    ],
)
def test_pgd_step_rejects_bad_input(change, error, match):
    args = dict(x_adv=torch.rand(2, 3), grad=torch.randn(2, 3), x_orig=torch.rand(2, 3), step_size=0.1, eps=0.2,
                norm="linf", lower=0.0, upper=1.0)
    args.update(change)
    with pytest.raises(error, match=match):
        ops.pgd_step(args.pop("x_adv"), args.pop("grad"), args.pop("x_orig"), backend="cpu", **args)


def test_float_parameters_are_made_once_and_stay_unchanged():
    """Float step/eps/bounds become (count,) tensors cached per value: the same tensor every step, still holding its
    value after in-place steps, a normal tensor even when first made under inference_mode, and -0.0 apart from 0.0."""
    from urda_fast.ops import pgd

    x_orig = torch.rand(4, 3, 5, 5)
    with torch.inference_mode():
        first = pgd._param_vector(0.0625, 4, x_orig)
    assert not first.is_inference()
    assert pgd._param_vector(0.0625, 4, x_orig) is first
    x = x_orig.clone()
    for _ in range(3):
        ops.pgd_step_(x, torch.randn_like(x), x_orig, step_size=0.0625, eps=0.0625, backend="cpu")
    torch.testing.assert_close(first, torch.full((4,), 0.0625))
    assert pgd._param_vector(0.0625, 3, x_orig).shape == (3,)
    assert pgd._param_vector(0.0625, 4, x_orig.double()).dtype == torch.float64
    assert torch.signbit(pgd._param_vector(-0.0, 4, x_orig)).all()
    assert not torch.signbit(pgd._param_vector(0.0, 4, x_orig)).any()


def test_a_call_under_fake_tensor_mode_leaves_no_fake_parameters_behind():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.rand(2, 3, 4, 4)
        assert ops.pgd_step(x, torch.randn_like(x), x, step_size=0.1234, eps=0.2, backend="cpu").shape == x.shape
    x = torch.rand(2, 3, 4, 4)
    want = ops.pgd_step(x, torch.ones_like(x), x, step_size=0.1234, eps=0.2, backend="reference")
    torch.testing.assert_close(ops.pgd_step(x, torch.ones_like(x), x, step_size=0.1234, eps=0.2, backend="cpu"), want)


def test_bound_tensors_checked_once_are_checked_again_after_a_change():
    """Bound tensors that passed are not read again (a host sync per attack step on a GPU) until they change."""
    x_orig = torch.rand(2, 3, 4, 4)
    lower, upper = torch.zeros(3), torch.ones(3)
    step = dict(step_size=0.1, eps=0.2, lower=lower, upper=upper, backend="cpu")
    ops.pgd_step(x_orig, torch.randn_like(x_orig), x_orig, **step)
    upper[1] = float("nan")  # in place: a new version of the same tensor
    with pytest.raises(ValueError, match="lower/upper contain NaN"):
        ops.pgd_step(x_orig, torch.randn_like(x_orig), x_orig, **step)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        ops.pgd_step(x_orig, torch.randn_like(x_orig), x_orig, step_size=0.1, eps=0.2, lower=torch.full((3,), 2.0),
                     upper=torch.ones(3), backend="cpu")
    with torch.inference_mode():  # inference tensors have no version counter: checked every call, and they work
        lower, upper = torch.zeros(3), torch.ones(3)
        for _ in range(2):
            ops.pgd_step(x_orig, torch.randn_like(x_orig), x_orig, step_size=0.1, eps=0.2, lower=lower, upper=upper,
                         backend="cpu")
        upper[0] = -1.0
        with pytest.raises(ValueError, match="lower must be <= upper"):
            ops.pgd_step(x_orig, torch.randn_like(x_orig), x_orig, step_size=0.1, eps=0.2, lower=lower, upper=upper,
                         backend="cpu")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_in_place_step_on_x_adv_that_partly_overlaps_x_orig_or_grad(backend, norm):
    """x_adv sharing memory with x_orig or grad at other offsets: the kernels would read elements already written,
    so the step runs out of place and is copied back. The very same view (x_adv is x_orig) stays in place."""
    name, device = backend
    x_adv, grad, x_orig = make_batch((4, 2, 3, 3), torch.float32, device)
    kwargs = dict(step_size=0.01, eps=0.03, norm=norm)
    for shared in ("x_orig", "grad"):
        buf = torch.cat([x_orig, x_orig[-1:]]) if shared == "x_orig" else torch.cat([grad, grad[-1:]])
        target, other = buf[1:], buf[:-1]
        args = (target, grad, other) if shared == "x_orig" else (target, other, x_orig)
        want = reference.pgd_step(*(a.clone() for a in args), upcast=True, **kwargs)
        ops.pgd_step_(*args, backend=name, **kwargs)
        assert_close(target, want, torch.float32, shared)
    same = x_orig.clone()
    want = reference.pgd_step(same.clone(), grad, same.clone(), upcast=True, **kwargs)
    assert_close(ops.pgd_step_(same, grad, same, backend=name, **kwargs), want, torch.float32, "x_adv is x_orig")


def test_in_place_step_sees_overlap_between_two_storages_of_one_buffer():
    """torch.from_numpy of two overlapping numpy views: two storages, one memory."""
    buffer = np.random.default_rng(0).random((5, 2, 3, 3), dtype=np.float32)
    target, other = torch.from_numpy(buffer[1:]), torch.from_numpy(buffer[:4])
    grad = torch.randn(4, 2, 3, 3)
    kwargs = dict(step_size=0.01, eps=0.03)
    want = reference.pgd_step(target.clone(), grad, other.clone(), upcast=True, **kwargs)
    ops.pgd_step_(target, grad, other, **kwargs)
    assert_close(target, want, torch.float32, "overlapping storages")


def test_in_place_step_refuses_an_inference_tensor_outside_inference_mode():
    with torch.inference_mode():
        x = torch.rand(2, 3)
    for backend in ("cpu", "reference"):
        with pytest.raises(RuntimeError, match="inference tensor"):
            ops.pgd_step_(x, torch.randn(2, 3), x.clone(), step_size=0.1, eps=0.1, backend=backend)
    with torch.inference_mode():
        want = x.clamp(0, 1) + 0
        ops.pgd_step_(x, torch.zeros(2, 3), x.clone(), step_size=0.1, eps=0.1)
        torch.testing.assert_close(x, want)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_channels_last_inputs_step_in_their_own_layout(backend, norm):
    """NHWC batches (channels_last models' inputs and input gradients) are stepped as they lie: the result keeps
    the layout (in place: the same storage) with the contiguous path's values; per-channel bounds take copies."""
    name, device = backend
    x_adv, grad, x_orig = make_batch((3, 4, 5, 6), torch.float32, device)
    nhwc = [t.to(memory_format=torch.channels_last) for t in (x_adv, grad, x_orig)]
    kwargs = dict(step_size=0.05, eps=0.1)
    want = expected(x_adv, grad, x_orig, norm, kwargs)
    got = ops.pgd_step(*nhwc, norm=norm, backend=name, **kwargs)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert_close(got, want, torch.float32, norm)
    in_place = nhwc[0].clone(memory_format=torch.channels_last)
    storage = in_place.data_ptr()
    assert ops.pgd_step_(in_place, nhwc[1], nhwc[2], norm=norm, backend=name, **kwargs) is in_place
    assert in_place.data_ptr() == storage and in_place.is_contiguous(memory_format=torch.channels_last)
    assert_close(in_place, want, torch.float32, norm)
    per_channel = dict(kwargs, lower=torch.tensor([0.0, 0.1, 0.2, 0.3]), upper=torch.tensor([1.0, 0.9, 0.8, 0.7]))
    per_channel = {k: v.to(device) if torch.is_tensor(v) else v for k, v in per_channel.items()}
    assert_close(ops.pgd_step(*nhwc, norm=norm, backend=name, **per_channel),
                 expected(x_adv, grad, x_orig, norm, per_channel), torch.float32, norm)
