"""Shared test setup: seeds, the backends under test, tolerances and a verbose assert_close."""

import os

import torch

# Triton runs CPU tensors only in its interpreter, and reads this variable when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import urda_fast.ops as ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# (atol, rtol) against a float64 ground truth, per dtype of the inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def backend_params():
    """Every non-reference backend, as (backend, device) params; unbuilt/unavailable ones are skipped with a reason
    (except cpu: the test suite builds it, so its absence is a failure)."""
    params = [pytest.param(("cpu", "cpu"), id="cpu")]
    params.append(pytest.param(("triton", "cuda" if HAS_CUDA else "cpu"), id="triton"))
    params.append(pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU")))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=backend_params())
def backend(request):
    name, device = request.param
    if name == "triton":
        from urda_fast.ops import _backends

        reason = _backends.triton_error(device)
        if reason is not None:
            pytest.skip(reason)
        ops.load_triton()
    return name, torch.device(device)


def is_triton(backend):
    return backend[0] == "triton"


def assert_close(actual, expected, dtype, what, scale=1.0):
    """assert_close with the dtype's tolerance (times ``scale``) and a message naming the tensor compared."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol * scale, rtol=rtol * scale,
                               equal_nan=True, msg=lambda m: f"[{what}] {m}")


HALF_TYPES = (torch.float16, torch.bfloat16)

# (atol, rtol) of a float32 loss from float16/bfloat16 inputs against the float64 reference of the same inputs upcast
# (exact): the kernels compute in float32, so float32 rounding is the only error. Measured on the cpu and triton
# (interpreter) backends, kd_kl and the feature losses over 15 seeds: at most 7% of this (per-row kd_kl losses near
# zero: 8.5e-7 absolute, 1.1e-6 relative); a kd_kl temperature 0.3% off is 6e-3 relative.
HALF_LOSS_TOLERANCE = (1e-6, 1e-5)


def assert_half_loss_close(actual, expected, what):
    """A fused loss of half-precision inputs: float32, within HALF_LOSS_TOLERANCE of the float64 reference."""
    assert actual.dtype == torch.float32, f"[{what}] the loss is {actual.dtype}, not float32"
    atol, rtol = HALF_LOSS_TOLERANCE
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"[{what}] {m}")


def assert_half_grad_close(actual, expected, dtype, what, ulps=1):
    """A gradient returned in the half dtype ``dtype``: within ``ulps`` units in the last place of the float64
    reference rounded to ``dtype`` (a unit: the larger spacing of the dtype at either value, so a binade edge between
    them counts as one), plus 2**-20 of the reference's largest magnitude for entries that cancel to near zero, where
    float32's own error is that size. The kernels round a float32 value once (the Triton interpreter truncates to
    bfloat16 instead of rounding: one unit); a scale or temperature off by 1% moves most entries several units."""
    assert actual.dtype == dtype, f"[{what}] the gradient is {actual.dtype}, not {dtype}"
    want = expected.to(dtype)
    assert torch.equal(actual.isnan(), want.isnan()) and torch.equal(actual.isinf(), want.isinf()), what
    finite = want.isfinite()
    got, want = actual[finite], want[finite]
    inf = torch.full_like(want, float("inf"))
    unit = torch.maximum(torch.nextafter(want.abs(), inf).double() - want.abs().double(),
                         torch.nextafter(got.abs(), inf).double() - got.abs().double())
    atol = 2.0**-20 * float(expected[finite].abs().max()) if got.numel() else 0.0
    err = (got.double() - want.double()).abs()
    bad = err > ulps * unit + atol
    if bool(bad.any()):
        i = int((err / (unit + atol)).argmax())
        raise AssertionError(f"[{what}] {int(bad.sum())} of {got.numel()} entries more than {ulps} unit(s) from the "
                             f"float64 reference rounded to {dtype}; worst: {float(got[i])} vs {float(want[i])} "
                             f"({float(err[i] / unit[i]):.1f} units)")


def hpt_train_config(world_, out, **overrides):
    """A few-step `hpt train` config on the test world ``world_`` (``world=`` may be overridden): CPU, no progress
    bars, no TensorBoard."""
    from urda_fast.hpt import TrainConfig

    options = dict(target=world_.model_arg("target"), proxy=world_.model_arg("proxy"), train_data="world",
                   world=world_.folder, out=str(out), iterations=4, batch_size=8, warmup_steps=2, lr=0.01,
                   attack_steps=2, eval_every=4, eval_steps=2, eval_max_batches=1, progress=False, device="cpu",
                   tensorboard=False)
    return TrainConfig(**{**options, **overrides})


class ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of tensor values into Python (bool(t), t.item(), int(t)): each one is a host sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def digits_uda_checkpoint(folder, bottleneck_dim: int, steps: int):
    """(path, model in eval mode): a digits-CNN classifier briefly trained on the embedded digits' source domain,
    saved in the `dart pretrain` checkpoint format."""
    import torch.nn.functional as F

    from urda_fast.dart.config import RunConfig
    from urda_fast.dart.data import task_data
    from urda_fast.models import ModelSpec

    x, y = task_data(RunConfig(data="digits"), splits=("source_train",)).source_train.tensors
    torch.manual_seed(0)
    spec = ModelSpec(backbone="digits_cnn", num_classes=10, bottleneck_dim=bottleneck_dim)
    model = spec.build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    path = folder / "best.pt"
    torch.save({"spec": spec.to_dict(), "kind": "uda", "config": {"method": "dann", "data": "digits"},
                "modules": {"method": {f"model.{k}": v for k, v in model.state_dict().items()}}}, path)
    return str(path), model.eval()
