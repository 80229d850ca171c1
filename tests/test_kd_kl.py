"""kd_kl_loss: every backend against the float64 reference, values and both gradients, registration and errors."""

import functools

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

SHAPES = [(1, 1), (3, 7), (2, 1023), (1, 4097), (0, 5)]


def logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def loss_and_grads(fn, student, teacher, **kwargs):
    s = student.detach().requires_grad_()
    t = teacher.detach().requires_grad_()
    loss = fn(s, t, **kwargs)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    d_s, d_t = torch.autograd.grad(loss, (s, t), grad_out)
    return loss, d_s, d_t


def check_against_reference(name, student, teacher, dtype, what, scale=1.0, **kwargs):
    got = loss_and_grads(ops.kd_kl_loss, student, teacher, backend=name, **kwargs)
    want = loss_and_grads(reference.kd_kl_loss, student.double(), teacher.double(), **kwargs)
    assert got[0].dtype == torch.promote_types(dtype, torch.float32)
    for label, a, b in zip(("loss", "d_student", "d_teacher"), got, want):
        assert a.shape == b.shape, label
        if dtype not in HALF_TYPES:
            assert_close(a, b, dtype, f"{what} {label}", scale)
        elif label == "loss":  # float32 from inputs exact in float64: float32's error only
            assert_half_loss_close(a, b, f"{what} {label}")
        else:  # returned in the half dtype: the reference's rounding, within a unit (CUDA rounds twice: two)
            assert_half_grad_close(a, b, dtype, f"{what} {label}",
                                   ulps=2 if name == "cuda" else 1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_kl_matches_reference(backend, shape, dtype):
    name, device = backend
    student, teacher = logits(shape, dtype, device), logits(shape, dtype, device)
    weight = torch.rand(shape[0], dtype=dtype, device=device)
    for temperature in (0.5, 1.0, 4.0):
        for reduction in ("batchmean", "sum", "none"):
            if shape[0] == 0 and reduction == "batchmean":
                continue  # 0/0: NaN on every backend, checked in test_kd_kl_empty_batch
            check_against_reference(name, student, teacher, dtype, f"T={temperature} {reduction}",
                                    temperature=temperature, weight=weight, reduction=reduction,
                                    t2_scale=temperature != 1.0)
    check_against_reference(name, student, teacher, dtype, "unweighted", temperature=2.0)


def test_kd_kl_empty_batch(backend):
    name, device = backend
    empty = torch.zeros(0, 4, device=device)
    assert torch.isnan(ops.kd_kl_loss(empty, empty, backend=name))
    assert ops.kd_kl_loss(empty, empty, reduction="none", backend=name).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kd_kl_half_types(backend, dtype):
    name, device = backend
    student, teacher = logits((4, 37), dtype, device), logits((4, 37), dtype, device)
    check_against_reference(name, student, teacher, dtype, str(dtype), temperature=2.0)
    weight = torch.rand(4, device=device)  # per-row losses and incoming gradients
    check_against_reference(name, student, teacher, dtype, f"{dtype} weighted none", temperature=4.0, weight=weight,
                            reduction="none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kd_kl_cpu_half_gradients_round_like_torch(dtype):
    """The CPU backward narrows its float gradients chunk by chunk (rows longer than a chunk here) with its own
    branch-free conversions: they must round as torch's .to(dtype) does, overflow to inf, keep subnormals and NaN."""
    if "cpu" not in ops.available_backends():
        pytest.skip("the CPU extension is not built")
    student, teacher = logits((3, 1100), dtype, "cpu"), logits((3, 1100), dtype, "cpu")
    student[1, 5] = float("nan")  # one NaN row: its gradients are NaN
    kl, stats = torch.ops.urda_fast.kd_kl_forward(student, teacher, 2.0)
    kl32, stats32 = torch.ops.urda_fast.kd_kl_forward(student.float(), teacher.float(), 2.0)
    torch.testing.assert_close(kl, kl32, equal_nan=True)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    for scale in (1.0, 1e-3, 3e6):  # plain, half subnormals, half overflow
        grad_rows = torch.full((3,), scale)
        got = torch.ops.urda_fast.kd_kl_backward(grad_rows, student, teacher, kl, stats, 2.0, True, True)
        want = torch.ops.urda_fast.kd_kl_backward(grad_rows, student.float(), teacher.float(), kl32, stats32, 2.0,
                                                  True, True)
        for a, b in zip(got, want):
            b = b.to(dtype)
            assert a.dtype == dtype
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
            finite = b.isfinite()
            # The float math is the same; only a value within an ulp of a rounding boundary may round the other way.
            torch.testing.assert_close(a[finite].float(), b[finite].float(), rtol=ulp, atol=1e-7 * scale)
            assert (a[finite] == b[finite]).float().mean() > 0.99


def test_kd_kl_extreme_logits_and_masks(backend):
    """Logits of size 1e4, and teacher classes masked with -inf (and masked on both sides): finite and exact."""
    name, device = backend
    student = logits((4, 33), torch.float32, device, scale=1e4)
    teacher = logits((4, 33), torch.float32, device, scale=1e4)
    check_against_reference(name, student, teacher, torch.float32, "huge logits", scale=10.0, temperature=1.0)
    check_against_reference(name, student, teacher, torch.float32, "huge logits, tiny T", scale=10.0,
                            temperature=0.05)
    teacher = logits((4, 33), torch.float32, device)
    teacher[:, ::3] = float("-inf")
    student = logits((4, 33), torch.float32, device)
    student[0, ::3] = float("-inf")  # masked on both sides: contributes 0
    got = loss_and_grads(ops.kd_kl_loss, student, teacher, backend=name, temperature=2.0)
    assert all(bool(torch.isfinite(g).all()) for g in got)
    check_against_reference(name, student, teacher, torch.float32, "masked", temperature=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_kl_long_rows_whose_max_comes_late(backend, dtype):
    """Rows of 9000 classes (three of Triton's 4096-class chunks) whose maxima rise chunk after chunk, so a one-pass
    kernel must rescale what it has summed; a student that is its teacher shifted by 40 (KL ~ 0 only if the shifts
    cancel exactly); classes masked with -inf in the middle chunk and in a whole first chunk."""
    name, device = backend
    classes = 9000
    ramp = torch.linspace(-30.0, 30.0, classes, dtype=torch.float64, device=device)
    teacher = (logits((4, classes), torch.float64, device) + ramp).to(dtype)
    student = (logits((4, classes), torch.float64, device) - ramp).to(dtype)
    student[1] = teacher[1] + 40.0
    teacher[2, 4000:6000] = float("-inf")
    teacher[3, :4096] = float("-inf")
    student[3, :4096] = float("-inf")
    for temperature in (0.5, 4.0):
        check_against_reference(name, student, teacher, dtype, f"T={temperature}", scale=5.0,
                                temperature=temperature, reduction="none")
    shifted = ops.kd_kl_loss(student[1:2], teacher[1:2], temperature=2.0, reduction="none", backend=name)
    assert abs(float(shifted)) < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype, rise", [(torch.float32, 200.0), (torch.float64, 800.0)])
def test_kd_kl_student_mask_whose_teacher_mass_underflows_later(backend, dtype, rise):
    """A student-masked class in the first chunk makes the running KL +inf; a teacher max 200 (float32) / 800
    (float64) higher in the next chunk then gives that class p == 0 in the dtype: the row is finite, as the
    reference computed in the same dtype says (a one-pass kernel must not form 0 * inf = NaN there)."""
    name, device = backend
    student = torch.zeros(2, 4100, dtype=dtype, device=device)
    teacher = torch.zeros(2, 4100, dtype=dtype, device=device)
    student[:, 0] = float("-inf")
    teacher[0, -1] = rise  # row 1 keeps the teacher's mass on the masked class: +inf
    for temperature in (0.5, 1.0):  # rise / T past the dtype's exp underflow (~103 float32, ~745 float64)
        got = loss_and_grads(ops.kd_kl_loss, student, teacher, backend=name, temperature=temperature,
                             reduction="none")
        want = loss_and_grads(reference.kd_kl_loss, student, teacher, temperature=temperature, reduction="none")
        assert torch.isfinite(want[0][0]) and want[0][1] == float("inf")
        for label, a, b in zip(("loss", "d_student", "d_teacher"), got, want):
            torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6, msg=f"T={temperature} {label}")
        assert got[0][1] == float("inf")


def test_kd_kl_student_mask_under_teacher_mass_is_inf(backend):
    name, device = backend
    student, teacher = logits((2, 5), torch.float32, device), logits((2, 5), torch.float32, device)
    student[0, 2] = float("-inf")
    rows = ops.kd_kl_loss(student, teacher, reduction="none", backend=name)
    assert rows[0] == float("inf") and torch.isfinite(rows[1])


@pytest.mark.parametrize("prescale_from", [None, 0], ids=["default", "prescaled"])
def test_kd_kl_nan_in_a_row_makes_the_row_and_both_its_gradients_nan(backend, prescale_from, monkeypatch):
    """A NaN logit on either side, or a +inf teacher logit, poisons its row on every backend alike (a finite loss
    would hide it from the training loop's NaN check); the other rows are untouched."""
    from urda_fast.ops import kd_kl as kd_kl_module

    name, device = backend
    if prescale_from is not None:
        if name != "cpu":
            pytest.skip("the prescaled-gradient path is the cpu backend's")
        monkeypatch.setattr(kd_kl_module, "PRESCALE_FROM", prescale_from)
    student, teacher = logits((4, 7), torch.float32, device), logits((4, 7), torch.float32, device)
    teacher[0, 1], student[1, 3], teacher[2, 5] = float("nan"), float("nan"), float("inf")
    for backend_name in ("reference", name):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        rows = ops.kd_kl_loss(s, t, reduction="none", backend=backend_name)
        d_s, d_t = torch.autograd.grad(rows.sum(), (s, t))
        assert rows[:3].isnan().all() and torch.isfinite(rows[3]), backend_name
        assert d_s[:3].isnan().all() and d_t[:3].isnan().all(), backend_name
        assert torch.isfinite(d_s[3]).all() and torch.isfinite(d_t[3]).all(), backend_name
    assert ops.kd_kl_loss(student, teacher, backend=name).isnan()


def test_kd_kl_non_contiguous_broadcast_and_mixed_dtypes(backend):
    name, device = backend
    student = logits((9, 6), torch.float32, device).t()  # (6, 9), transposed view
    teacher = logits((1, 9), torch.float32, device).expand(6, 9)
    check_against_reference(name, student, teacher, torch.float32, "strided", temperature=2.0)
    got = ops.kd_kl_loss(student.double(), teacher, temperature=2.0, backend=name)
    assert got.dtype == torch.float64
    for backend_name in (name, "reference"):  # the promoted dtype whichever side is the wider one
        assert ops.kd_kl_loss(student, teacher.double(), backend=backend_name).dtype == torch.float64
    assert_close(got, reference.kd_kl_loss(student.double(), teacher.double(), temperature=2.0), torch.float32,
                 "mixed dtypes")


def test_kd_kl_gradcheck(backend):
    name, device = backend
    student = logits((3, 5), torch.float64, device).requires_grad_()
    teacher = logits((3, 5), torch.float64, device).requires_grad_()
    weight = torch.rand(3, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(
        lambda s, t: ops.kd_kl_loss(s, t, temperature=1.7, weight=weight, reduction="none", backend=name),
        (student, teacher))


def test_kd_kl_ops_opcheck(backend):
    name, device = backend
    student, teacher = logits((3, 11), torch.float32, device), logits((3, 11), torch.float32, device)
    ops.kd_kl_loss(student, teacher, backend=name)  # registers the Triton op
    suffix = "_triton" if is_triton(backend) else ""
    forward = getattr(torch.ops.urda_fast, f"kd_kl_forward{suffix}")
    backward = getattr(torch.ops.urda_fast, f"kd_kl_backward{suffix}")
    for flags in ((True, True), (True, False), (False, False)):
        torch.library.opcheck(forward, (student.clone().requires_grad_(flags[0]),
                                        teacher.clone().requires_grad_(flags[1]), 2.0))
    kl, stats = forward(student, teacher, 2.0)
    grad_rows = torch.rand(3, device=device)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (grad_rows, student, teacher, kl, stats, 2.0, *flags))


def test_kd_kl_compiles_fullgraph(backend):
    name, device = backend
    student, teacher = logits((4, 10), torch.float32, device), logits((4, 10), torch.float32, device)
    weight = torch.rand(4, device=device)

    def loss_fn(s, t):
        return ops.kd_kl_loss(s, t, temperature=2.0, weight=weight, backend=name)

    eager = loss_and_grads(loss_fn, student, teacher)
    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True), student, teacher)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_kd_kl_prescaled_cpu_gradients_compile_fullgraph(monkeypatch):
    """The CPU forward's prescaled gradients (forced on small logits) under torch.compile: the traced backward takes
    the general scaling path, and loss weights other than 1 come out right."""
    from urda_fast.ops import kd_kl as kd_kl_module

    monkeypatch.setattr(kd_kl_module, "PRESCALE_FROM", 0)
    student, teacher = logits((4, 10), torch.float32, "cpu"), logits((4, 10), torch.float32, "cpu")
    weight = torch.rand(4)

    def loss_fn(s, t):
        return 0.3 * ops.kd_kl_loss(s, t, temperature=2.0, weight=weight, backend="cpu", t2_scale=True)

    eager = loss_and_grads(loss_fn, student, teacher)
    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True), student, teacher)
    reference_grads = loss_and_grads(lambda s, t: 0.3 * reference.kd_kl_loss(s, t, temperature=2.0, weight=weight,
                                                                             t2_scale=True), student, teacher)
    for a, b, c in zip(compiled, eager, reference_grads):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


def test_kd_kl_keeps_no_logits_sized_buffer():
    """Forward saves only the (B, 4) softmax statistics besides its inputs; backward writes only what is asked for."""
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    rows, stats = torch.ops.urda_fast.kd_kl_forward(s, t, 1.0)
    assert rows.shape == (3,) and stats.shape == (3, 4)
    d_s, d_t = torch.ops.urda_fast.kd_kl_backward(torch.ones(3), s, t, rows, stats, 1.0, True, False)
    assert d_s.shape == (3, 5) and d_t.shape == (0,)
    expected = torch.softmax(s, 1) - torch.softmax(t, 1)
    torch.testing.assert_close(d_s, expected)


def test_kd_kl_refuses_double_backward(backend):
    """A second-order backward through the fused kernel is a clear error, not a silently missing derivative."""
    name, device = backend
    student = logits((3, 7), torch.float32, device).requires_grad_()
    teacher = logits((3, 7), torch.float32, device)
    (grad,) = torch.autograd.grad(ops.kd_kl_loss(student, teacher, temperature=2.0, backend=name), student,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="kd_kl_loss has no second derivative on the fused backends"):
        grad.square().sum().backward()


def test_kd_kl_saves_no_logits_sized_tensor_beyond_its_inputs(backend):
    """What autograd saves between forward and backward is the logits themselves (by reference) and per-row values
    (the CPU backend's gradient buffer is not a saved tensor: it becomes the gradient, see the allocation test)."""
    name, device = backend
    student = logits((8, 33), torch.float32, device).requires_grad_()
    teacher = logits((8, 33), torch.float32, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = ops.kd_kl_loss(student, teacher, temperature=2.0, weight=torch.rand(8, device=device), backend=name)
    inputs = (student.data_ptr(), teacher.data_ptr())
    assert saved and all(x.numel() <= 4 * 8 or x.data_ptr() in inputs for x in saved), [x.shape for x in saved]
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.shape == student.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_kl_cpu_forward_only_matches_reference(dtype):
    """Without gradients the CPU backend runs kd_kl_forward (test_kd_kl_matches_reference, which takes gradients, runs
    kd_kl_forward_with_grad)."""
    for shape in SHAPES[:-1]:
        student, teacher = logits(shape, dtype, "cpu"), logits(shape, dtype, "cpu")
        teacher[:, 0] = float("-inf")
        with torch.no_grad():
            got = ops.kd_kl_loss(student, teacher, temperature=2.0, reduction="none", backend="cpu")
        want = reference.kd_kl_loss(student.double(), teacher.double(), temperature=2.0, reduction="none")
        assert_close(got, want, dtype, f"{shape} no_grad")


@pytest.mark.parametrize("classes", [31, 1023], ids=["31-padded", "1023"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_kl_cpu_gradients_in_forward_equal_the_recomputing_backward(dtype, classes):
    """kd_kl_forward_with_grad's buffers = kd_kl_backward with unit row gradients, masked classes and large logits
    included, and its kl / stats are kd_kl_forward's (31 classes: rows run on a -inf-padded copy)."""
    student, teacher = logits((6, classes), dtype, "cpu", 30.0), logits((6, classes), dtype, "cpu", 30.0)
    teacher[1, ::3] = float("-inf")
    student[2, 5] = 1e4
    teacher[3] = float("-inf")  # no teacher mass at all: NaN, as the reference
    kl, stats, d_s, d_t = torch.ops.urda_fast.kd_kl_forward_with_grad(student, teacher, 1.5, True, True)
    kl_ref, stats_ref = torch.ops.urda_fast.kd_kl_forward(student, teacher, 1.5)
    torch.testing.assert_close(kl, kl_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(stats, stats_ref, rtol=0, atol=0, equal_nan=True)
    assert kl[3].isnan() and not kl[[0, 1, 2, 4, 5]].isnan().any()
    want_s, want_t = torch.ops.urda_fast.kd_kl_backward(torch.ones(6, dtype=dtype), student, teacher, kl, stats, 1.5,
                                                        True, True)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(d_s, want_s, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(d_t, want_t, rtol=tol, atol=tol, equal_nan=True)
    assert (d_t[1, ::3] == 0).all()
    with torch.no_grad():
        want_kl = reference.kd_kl_loss(student.double(), teacher.double(), temperature=1.5, reduction="none")
    keep = [0, 1, 2, 4, 5]
    assert_close(kl[keep], want_kl[keep], dtype, "kl")
    only_teacher = torch.ops.urda_fast.kd_kl_forward_with_grad(student, teacher, 1.5, False, True)
    assert only_teacher[2].shape == (0,) and torch.equal(only_teacher[3].nan_to_num(), d_t.nan_to_num())
    # The student alone takes its own one-pass formula.
    only_student = torch.ops.urda_fast.kd_kl_forward_with_grad(student, teacher, 1.5, True, False)
    assert only_student[3].shape == (0,)
    torch.testing.assert_close(only_student[0], kl, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(only_student[2], want_s, rtol=tol, atol=tol, equal_nan=True)
    # A student equal to its teacher gets exactly zero gradients (attacks on a KL loss rely on it).
    for flags in ((True, True), (True, False)):
        same = torch.ops.urda_fast.kd_kl_forward_with_grad(teacher[keep], teacher[keep], 1.5, *flags)
        assert not same[2].any() and not same[3].any()


@pytest.mark.parametrize("prescale_from", [None, 0], ids=["default", "prescaled"])
@pytest.mark.parametrize("loss_weight", [1.0, 0.3])
def test_kd_kl_backward_twice_gives_the_same_bits(backend, loss_weight, prescale_from, monkeypatch):
    """retain_graph=True: a second backward (the CPU backend's in-place buffers are spent by then) equals the first,
    with the CPU forward's gradients prescaled or not, and loss gradients of 1 and other."""
    from urda_fast.ops import kd_kl as kd_kl_module

    if prescale_from is not None:
        monkeypatch.setattr(kd_kl_module, "PRESCALE_FROM", prescale_from)
    name, device = backend
    student = logits((5, 37), torch.float32, device).requires_grad_()
    teacher = logits((5, 37), torch.float32, device).requires_grad_()
    loss = loss_weight * ops.kd_kl_loss(student, teacher, temperature=2.0, weight=torch.rand(5, device=device),
                                        backend=name)
    first = torch.autograd.grad(loss, (student, teacher), retain_graph=True)
    second = torch.autograd.grad(loss, (student, teacher), retain_graph=True)
    student_only = torch.autograd.grad(loss, student)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(first[0], student_only[0])


def test_kd_kl_gradient_for_one_side_only(backend):
    """Both logits require grad, autograd asks for one of them: that one is right, and nothing breaks."""
    name, device = backend
    student, teacher = logits((4, 9), torch.float64, device), logits((4, 9), torch.float64, device)
    for index in (0, 1):
        grads = []
        for fn in (functools.partial(ops.kd_kl_loss, backend=name), reference.kd_kl_loss):
            s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
            grads += torch.autograd.grad(fn(s, t, temperature=2.0), (s, t)[index])
        torch.testing.assert_close(*grads)


def test_kd_kl_cpu_with_grad_opcheck():
    student, teacher = logits((3, 11), torch.float32, "cpu"), logits((3, 11), torch.float32, "cpu")
    op = torch.ops.urda_fast.kd_kl_forward_with_grad
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(op, (student.clone().requires_grad_(flags[0]), teacher.clone().requires_grad_(flags[1]),
                                   2.0, *flags))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(student.bfloat16(), teacher.bfloat16(), 2.0, True, False)


@pytest.mark.parametrize("reduction, t2_scale, weighted", [("batchmean", False, True), ("sum", True, True),
                                                          ("batchmean", True, False)])
@pytest.mark.parametrize("prescale_from", [0, None], ids=["prescaled", "default-size-rule"])
def test_kd_kl_cpu_prescaled_gradients_match_a_scaled_buffer_bit_for_bit(reduction, t2_scale, weighted,
                                                                          prescale_from, monkeypatch):
    """The forward writes its gradients times the row gradients of a unit loss gradient (unit_row_gradients; for
    logits of PRESCALE_FROM elements or more, 0 here to run it on small ones): loss.backward() then hands them on
    untouched, bit for bit what scaling the unscaled buffer gives; any other loss gradient (a loss weight) and a
    zero sample weight still give the reference's gradients."""
    from urda_fast.ops import kd_kl as kd_kl_module
    from urda_fast.ops.kd_kl import unit_row_gradients

    if prescale_from is not None:
        monkeypatch.setattr(kd_kl_module, "PRESCALE_FROM", prescale_from)

    student, teacher = logits((7, 130), torch.float32, "cpu", 5.0), logits((7, 130), torch.float32, "cpu", 5.0)
    weight = torch.rand(7) if weighted else None
    if weighted:
        weight[2] = 0.0
    kwargs = dict(temperature=2.0, weight=weight, reduction=reduction, t2_scale=t2_scale)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = ops.kd_kl_loss(s, t, **kwargs, backend="cpu")
    got = torch.autograd.grad(loss, (s, t))
    # The row gradients autograd computes for a unit loss gradient, through the reference's reduction.
    rows = torch.zeros(7, requires_grad=True)
    (unit,) = torch.autograd.grad(reference.reduce_kd_rows(rows, weight, reduction, t2_scale, 2.0), rows)
    assert torch.equal(unit_row_gradients(7, weight, reduction, t2_scale, 2.0, torch.float32), unit)
    unscaled = torch.ops.urda_fast.kd_kl_forward_with_grad(student, teacher, 2.0, True, True)[2:]
    for g, buffer in zip(got, unscaled):
        assert torch.equal(g, buffer * unit.unsqueeze(1))
    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    want = torch.autograd.grad(0.37 * reference.kd_kl_loss(s64, t64, **{**kwargs, "weight": None if weight is None
                                                                          else weight.double()}), (s64, t64))
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    got = torch.autograd.grad(0.37 * ops.kd_kl_loss(s, t, **kwargs, backend="cpu"), (s, t))  # loss gradient 0.37
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)
    if weighted:
        assert not got[0][2].any() and not got[1][2].any()


def test_kd_kl_cpu_row_scale_scales_the_gradients_and_is_checked():
    student, teacher = logits((3, 11), torch.float32, "cpu"), logits((3, 11), torch.float32, "cpu")
    op = torch.ops.urda_fast.kd_kl_forward_with_grad
    scale = torch.rand(3)
    scaled, unscaled = op(student, teacher, 2.0, True, True, scale), op(student, teacher, 2.0, True, True)
    for got, want in zip(scaled, unscaled[:2] + tuple(g * scale.unsqueeze(1) for g in unscaled[2:])):
        assert torch.equal(got, want)
    # Unit row gradients: opcheck's backward hands the buffers on as they are. (Any other scale makes the first
    # backward scale them in place: they are the op's outputs too, and opcheck, which keeps and compares those,
    # would see that; kd_kl_loss never returns them.)
    torch.library.opcheck(op, (student.clone().requires_grad_(), teacher, 2.0, True, False, torch.ones(3)))
    for bad in (torch.rand(4), torch.rand(3, dtype=torch.float64), torch.rand(6)[::2]):
        with pytest.raises(RuntimeError, match="row_scale must be a contiguous"):
            op(student, teacher, 2.0, True, False, bad)


def _allocations(fn):
    """Sizes of the tensor storages c10's CPU allocator hands out during fn() (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_kl_cpu_forward_and_backward_allocate_one_logits_sized_buffer(dtype):
    """float32: the gradient is written in the forward and scaled in place; bfloat16: recomputed in the backward.
    Either way one (B, C) buffer, which becomes the gradient."""
    student, teacher = logits((64, 500), dtype, "cpu").requires_grad_(), logits((64, 500), dtype, "cpu")
    weight = torch.rand(64)
    grads = []
    sizes = _allocations(lambda: grads.extend(torch.autograd.grad(
        ops.kd_kl_loss(student, teacher, temperature=2.0, weight=weight, backend="cpu"), student)))
    logits_bytes = student.numel() * student.element_size()
    assert sum(size >= logits_bytes for size in sizes) == 1, sizes
    reference_student = student.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.kd_kl_loss(reference_student, teacher.double(), temperature=2.0,
                                                       weight=weight.double()), reference_student)
    assert_close(grads[0], want, dtype, "gradient")


def test_kd_kl_backward_rejects_mismatched_statistics():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    rows, stats = torch.ops.urda_fast.kd_kl_forward(s, t, 1.0)
    with pytest.raises(RuntimeError, match=r"stats has shape \[2, 4\], expected \(3, 4\)"):
        torch.ops.urda_fast.kd_kl_backward(torch.ones(3), s, t, rows, stats[:2], 1.0, True, False)
    with pytest.raises(RuntimeError, match="grad_rows must have dtype Float"):
        torch.ops.urda_fast.kd_kl_backward(torch.ones(3, dtype=torch.float64), s, t, rows, stats, 1.0, True, False)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(student=torch.randn(2, 3, 4), teacher=torch.randn(2, 3, 4)), ValueError, "must be 2-D"),
        (dict(teacher=torch.randn(2, 4)), ValueError, "teacher_logits has shape"),
        (dict(student=torch.zeros(2, 0), teacher=torch.zeros(2, 0)), ValueError, "at least one class"),
        (dict(temperature=0.0), ValueError, "temperature must be a positive finite"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a positive finite"),
        (dict(temperature=1e300), ValueError, r"temperature must be in \[1e-06, 1e\+06\], got 1e\+300"),
        (dict(temperature=1e-7), ValueError, r"temperature must be in \[1e-06, 1e\+06\]"),
        (dict(weight=torch.ones(3)), ValueError, r"weight must have shape \(2,\)"),
        (dict(weight=torch.ones(2, dtype=torch.int64)), TypeError, "weight must be a floating-point"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
        (dict(student=torch.ones(2, 3, dtype=torch.int32)), TypeError, "floating-point"),
    ],
)
def test_kd_kl_rejects_bad_input(change, error, match):
    args = dict(student=torch.randn(2, 3), teacher=torch.randn(2, 3), temperature=1.0, weight=None,
                reduction="batchmean")
    args.update(change)
    with pytest.raises(error, match=match):
        ops.kd_kl_loss(args.pop("student"), args.pop("teacher"), backend="cpu", **args)


@pytest.mark.parametrize("temperature", [1e-6, 1e6])
def test_kd_kl_temperature_range_ends_are_finite(backend, temperature):
    """The ends of the accepted temperature range give a finite float32 loss and gradients with t2_scale (T^2 = 1e12;
    1e300 gave NaN); at 1e-6 they match the float64 reference. At large T the float32 *value* is rounding (the KL is
    ~1/T^2 below log-sums of ~1: 2% off at T = 1000, as torch's kl_div), so there the reference is float64 inputs."""
    name, device = backend
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64) if name != "triton" else (torch.float32,):
        student = torch.randn(5, 7, device=device, dtype=dtype, requires_grad=True)
        teacher = torch.randn(5, 7, device=device, dtype=dtype)
        loss = ops.kd_kl_loss(student, teacher, temperature=temperature, t2_scale=True, backend=name)
        grad, = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        if dtype == torch.float32 and temperature > 1:
            continue
        exact_student = student.detach().double().requires_grad_()
        exact = reference.kd_kl_loss(exact_student, teacher.double(), temperature=temperature, t2_scale=True)
        exact_grad, = torch.autograd.grad(exact, exact_student)
        torch.testing.assert_close(loss.double(), exact, rtol=1e-3, atol=0)
        torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-3, atol=1e-3 * exact_grad.abs().max().item())


# The CUDA with-grad forward (csrc/cuda/kd_kl.cu), on by URDA_FAST_CUDA_KL_WITH_GRAD=1 until these pass on a GPU.
# Rows of 16-byte packs (4 float32, 2 float64, 8 half values): 250 and 2000 kept in registers (128 and 512 threads),
# 2048 the most kept, 2049 and 3000 read again; 31 and 1023 classes take no packs (one value at a time).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
CUDA_WITH_GRAD_CLASSES = [31, 1000, 1023, 12000]
CUDA_ROW_SHAPES = {"31": lambda vec: 31, "1023": lambda vec: 1023, **{f"{packs}packs": (lambda vec, p=packs: p * vec)
                                                                    for packs in (250, 2000, 2048, 2049, 3000)}}


@needs_cuda
@pytest.mark.parametrize("row", CUDA_ROW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kd_kl_cuda_gradients_in_forward_equal_the_recomputing_backward(dtype, row):
    op = torch.ops.urda_fast
    classes = CUDA_ROW_SHAPES[row](16 // torch.empty((), dtype=dtype).element_size())
    student, teacher = logits((6, classes), dtype, "cuda", 30.0), logits((6, classes), dtype, "cuda", 30.0)
    teacher[1, ::3] = float("-inf")
    student[2, 5] = 1e4 if dtype != torch.float16 else 6e4
    teacher[3] = float("-inf")  # no teacher mass: NaN, as the reference
    kl, stats, d_s, d_t = op.kd_kl_forward_with_grad(student, teacher, 1.5, True, True)
    kl_ref, stats_ref = op.kd_kl_forward(student, teacher, 1.5)
    acc = torch.promote_types(dtype, torch.float32)
    assert kl.dtype == stats.dtype == acc and d_s.dtype == d_t.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 1e-5)
    torch.testing.assert_close(kl, kl_ref, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(stats, stats_ref, rtol=tol, atol=tol, equal_nan=True)
    want_s, want_t = op.kd_kl_backward(torch.ones(6, dtype=acc, device="cuda"), student, teacher, kl_ref, stats_ref,
                                       1.5, True, True)
    grad_tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, tol)
    torch.testing.assert_close(d_s, want_s, rtol=grad_tol, atol=grad_tol, equal_nan=True)
    torch.testing.assert_close(d_t, want_t, rtol=grad_tol, atol=grad_tol, equal_nan=True)
    assert (d_t[1, ::3] == 0).all() and d_s[3].isnan().all() and not d_s[[0, 1, 2, 4, 5]].isnan().any()
    keep = [0, 1, 2, 4, 5]
    with torch.no_grad():
        want_kl = reference.kd_kl_loss(student.double(), teacher.double(), temperature=1.5, reduction="none")
    assert_close(kl[keep], want_kl[keep], dtype, "kl")
    for flags in ((True, False), (False, True)):
        one = op.kd_kl_forward_with_grad(student, teacher, 1.5, *flags)
        for asked, got, full in zip(flags, one[2:], (d_s, d_t)):
            assert torch.equal(got.nan_to_num(), full.nan_to_num()) if asked else got.shape == (0,)
    same = op.kd_kl_forward_with_grad(teacher[keep], teacher[keep], 1.5, True, True)
    assert not same[2].any() and not same[3].any()
    # Row gradients written scaled: bit for bit the unscaled buffer times the scale (autograd's mul_).
    scale = torch.rand(6, dtype=acc, device="cuda")
    scaled = op.kd_kl_forward_with_grad(student, teacher, 1.5, True, True, scale)
    for got, unscaled in zip(scaled[2:], (d_s, d_t)):
        assert torch.equal(got.nan_to_num(), (unscaled * scale.unsqueeze(1)).to(dtype).nan_to_num())
    with pytest.raises(RuntimeError, match="row_scale must be a contiguous"):
        op.kd_kl_forward_with_grad(student, teacher, 1.5, True, False, scale.cpu())


@needs_cuda
def test_kd_kl_cuda_loss_with_gradients_in_forward(monkeypatch):
    """kd_kl_loss through the CUDA with-grad forward: the reference's values and gradients over reductions, weights,
    half types and a loss gradient other than 1; a second backward; opcheck; torch.compile(fullgraph=True); no host
    sync (the CPU's prescaled buffers are not used on a GPU: their backward compares on the host)."""
    from conftest import ScalarReads

    from urda_fast.ops import kd_kl as kd_kl_module

    monkeypatch.setattr(kd_kl_module, "CUDA_WITH_GRAD", True)
    monkeypatch.setattr(kd_kl_module, "PRESCALE_FROM", 0)  # would prescale every call on a CPU
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for classes in CUDA_WITH_GRAD_CLASSES:
            student, teacher = logits((5, classes), dtype, "cuda"), logits((5, classes), dtype, "cuda")
            weight = torch.rand(5, device="cuda")
            for kwargs in (dict(reduction="batchmean", weight=weight), dict(reduction="sum", t2_scale=True),
                           dict(reduction="none")):
                check_against_reference("cuda", student, teacher, dtype, f"{dtype} {classes} {kwargs}",
                                        temperature=2.0, **kwargs)
    student, teacher = logits((4, 37), torch.float32, "cuda"), logits((4, 37), torch.float32, "cuda")
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    with ScalarReads() as reads:
        torch.autograd.grad(ops.kd_kl_loss(s, t, temperature=2.0, backend="cuda"), (s, t))
    assert reads.count == 0, reads.count
    loss = 0.3 * ops.kd_kl_loss(s, t, temperature=2.0, weight=torch.rand(4, device="cuda"), backend="cuda")
    first = torch.autograd.grad(loss, (s, t), retain_graph=True)
    second = torch.autograd.grad(loss, (s, t))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    op = torch.ops.urda_fast.kd_kl_forward_with_grad
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(op, (student.clone().requires_grad_(flags[0]), teacher.clone().requires_grad_(flags[1]),
                                   2.0, *flags))

    def loss_fn(s, t):
        return ops.kd_kl_loss(s, t, temperature=2.0, backend="cuda")

    eager = loss_and_grads(loss_fn, student, teacher)
    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True), student, teacher)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
