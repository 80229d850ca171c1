"""Backend selection, packaging and the command line."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import urda_fast
import urda_fast.ops as ops
from urda_fast.ops import _backends


def test_available_backends_lists_the_built_ones():
    names = ops.available_backends()
    assert names[0] == "reference" and "cpu" in names
    assert ("cuda" in names) == (torch.cuda.is_available() and _backends.native_cuda_error() is None)


def test_default_backend_is_by_device():
    assert _backends.resolve_backend(None, torch.device("cpu")) == "cpu"


def test_torch_func_transforms_take_the_reference_and_the_models_fall_back():
    """The fused ops' autograd rules (Python's register_autograd, C++ autograd Functions) do not run under torch.func:
    there the default is the reference, and every fast model's gradient is its plain twin's."""
    import copy

    from urda_fast.hpt.clip_models import load_clip
    from urda_fast.models import create_backbone, plain_torch

    seen = []
    torch.func.grad(lambda t: seen.append(_backends.resolve_backend(None, t.device)) or t.sum())(torch.ones(2))
    assert seen == ["reference"] and _backends.resolve_backend(None, torch.device("cpu")) == "cpu"
    student, teacher = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(lambda s, t: ops.kd_kl_loss(s[None], t[None], temperature=2.0)))
    want = torch.func.vmap(torch.func.grad(
        lambda s, t: ops.reference.kd_kl_loss(s[None], t[None], temperature=2.0)))(student, teacher)
    torch.testing.assert_close(per_sample(student, teacher), want)
    torch.manual_seed(0)
    models = [(create_backbone("digits_cnn"), torch.rand(2, 1, 16, 16)),
              (create_backbone("resnet18"), torch.rand(2, 3, 32, 32)),
              (load_clip("urda-tiny-vit", None)[0].visual, torch.rand(2, 3, 32, 32))]
    for model, x in models:
        model.eval()
        twin = plain_torch(copy.deepcopy(model))
        got = torch.func.grad(lambda t: model(t).square().sum())(x)
        torch.testing.assert_close(got, torch.func.grad(lambda t: twin(t).square().sum())(x))


def test_a_fused_backend_asked_for_under_torch_func_is_a_clear_error(monkeypatch):
    x = torch.randn(3, 5, dtype=torch.float64)
    loss_calls = (lambda t, b: ops.kd_kl_loss(t, x, backend=b), lambda t, b: ops.feature_cosine_loss(t, x, backend=b),
                  lambda t, b: ops.max_pool2d(t[None, None], 2, backend=b).sum())
    for call in loss_calls:
        with pytest.raises(ValueError, match="backend='cpu' cannot run inside a torch.func transform"):
            torch.func.grad(lambda t: call(t, "cpu"))(x)
        torch.testing.assert_close(torch.func.grad(lambda t: call(t, "reference"))(x),
                                   torch.autograd.grad(call(x.requires_grad_(), "reference"), x)[0])
        x = x.detach()
    monkeypatch.setenv("URDA_FAST_BACKEND", "cpu")  # the environment's preference yields, as the default does
    torch.testing.assert_close(torch.func.grad(lambda t: ops.kd_kl_loss(t, x))(x), torch.zeros_like(x))


def test_compiled_graphs_call_the_fused_ops_by_default():
    """torch.compile keeps the device's backend: the fused op is in the graph, not the reference's composite."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch.manual_seed(0)
    x, s, t = torch.rand(2, 3, 4, 4), torch.randn(4, 10), torch.randn(4, 10)
    calls = ((lambda x: ops.pgd_step(x, x.sin(), x, step_size=0.1, eps=0.2), (x,), "pgd_step"),
             (lambda s, t: ops.kd_kl_loss(s, t, temperature=2.0), (s, t), "kd_kl"),
             (lambda s, t: ops.feature_cosine_loss(s, t), (s, t), "feature_cosine"),
             (lambda s, t: ops.feature_mse_loss(s, t), (s, t), "feature_mse"))
    for fn, args, op in calls:
        torch._dynamo.reset()
        graphs = EagerAndRecordGraphs()
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend=graphs)(*args), fn(*args))
        assert f"urda_fast.{op}" in graphs.graphs[0].code, graphs.graphs[0].code


def test_float_arguments_left_at_their_defaults_compile_with_dynamic_shapes():
    """torch.compile(dynamic=True) traces float arguments as symbolic floats, which math.isnan / isfinite refuse."""
    torch.manual_seed(0)
    x, s, t, qkv = torch.rand(4, 3, 5, 5), torch.randn(6, 10), torch.randn(6, 10), torch.randn(2, 5, 24)
    grad = torch.randn_like(x)
    calls = ((lambda x, g: ops.pgd_step(x, g, x, step_size=2 / 255, eps=8 / 255), (x, grad)),
             (lambda s, t: ops.kd_kl_loss(s, t), (s, t)), (lambda s, t: ops.feature_cosine_loss(s, t), (s, t)),
             (lambda qkv: ops.packed_self_attention(qkv, 2), (qkv,)))
    for fn, args in calls:
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, dynamic=True)(*args), fn(*args))


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("URDA_FAST_BACKEND", "reference")
    assert _backends.resolve_backend(None, torch.device("cpu")) == "reference"
    x0 = torch.rand(2, 3)
    g = torch.randn(2, 3)

    def step_and_kernel_calls():  # the values agree either way: which code ran is what the variable decides
        with torch.profiler.profile() as prof:
            out = ops.pgd_step(x0, g, x0, step_size=0.1, eps=0.05)
        return out, sum(e.count for e in prof.key_averages() if e.key == "urda_fast::pgd_step")

    forced, kernel_calls = step_and_kernel_calls()
    assert kernel_calls == 0
    monkeypatch.delenv("URDA_FAST_BACKEND")
    default, kernel_calls = step_and_kernel_calls()
    assert kernel_calls == 1
    torch.testing.assert_close(forced, default)
    monkeypatch.setenv("URDA_FAST_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend URDA_FAST_BACKEND='tpu'"):
        ops.kd_kl_loss(torch.randn(2, 3), torch.randn(2, 3))
    monkeypatch.setenv("URDA_FAST_BACKEND", "CPU")  # a typo is an error in the CPU-only model ops too
    for call in (lambda: ops.max_pool2d(torch.rand(1, 2, 4, 4), 2),
                 lambda: ops.packed_self_attention(torch.rand(1, 3, 12), 2),
                 lambda: ops.batch_norm_eval(torch.rand(2, 3), torch.zeros(3), torch.ones(3))):
        with pytest.raises(ValueError, match="unknown backend URDA_FAST_BACKEND='CPU'"):
            call()


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("URDA_FAST_BACKEND", "tpu")
    assert _backends.resolve_backend("cpu", torch.device("cpu")) == "cpu"


def test_wrong_device_or_unavailable_backend_is_a_clear_error(monkeypatch):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="runs CUDA tensors only"):
        ops.feature_mse_loss(x, x, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend backend='fast'"):
        ops.feature_mse_loss(x, x, backend="fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*Available here: reference, cpu"):
        ops.feature_mse_loss(x, x, backend="triton")


@pytest.mark.parametrize("versions, broken", [({"triton": (3, 6), "numpy": (2, 4)}, True),
                                              ({"triton": (3, 5), "numpy": (2, 5)}, True),
                                              ({"triton": (3, 6), "numpy": (2, 3)}, False),
                                              ({"triton": (3, 8), "numpy": (2, 4)}, False),
                                              ({"triton": None, "numpy": (2, 4)}, False)])
def test_triton_interpreter_known_to_fail_is_unavailable_with_the_fix(monkeypatch, versions, broken):
    """Triton <= 3.6's interpreter breaks on NumPy >= 2.4 (triton-lang/triton#9171): say so instead of failing in
    every kernel."""
    monkeypatch.setattr(_backends, "_major_minor", versions.get)
    reason = _backends._triton_interpreter_error()
    assert (reason is not None) == broken
    if broken:
        monkeypatch.setattr(_backends, "_TRITON_INTERPRETER_ERROR", reason)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        x = torch.randn(2, 3)
        with pytest.raises(RuntimeError, match=r"install 'numpy<2.4' or Triton >= 3.8.*Available here: reference, cpu"):
            ops.feature_mse_loss(x, x, backend="triton")


def test_missing_extension_names_the_build_command(monkeypatch):
    monkeypatch.setitem(_backends._EXTENSIONS, "_C", ImportError("not built"))
    with pytest.raises(RuntimeError, match="pip install -e . --no-build-isolation"):
        _backends.resolve_backend("cpu", torch.device("cpu"))


def test_triton_kernels_ship_inside_the_package():
    """kernels/ is importable as urda_fast.kernels, and no top-level `kernels` package of ours is installed."""
    spec = importlib.util.find_spec("urda_fast.kernels")
    assert spec is not None and spec.submodule_search_locations
    kernels_dir = os.path.realpath(list(spec.submodule_search_locations)[0])
    assert {"pgd_step.py", "kd_kl.py", "feature_losses.py"} <= set(os.listdir(kernels_dir))
    assert not os.path.exists(os.path.join(kernels_dir, "__init__.py")), "kernels/ must stay a namespace folder"


def test_cli_info_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "urda_fast.cli", "info", "--json"], capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout)
    assert info["urda_fast"] == urda_fast.__version__
    assert info["torch"] == torch.__version__
    assert info["backends"] == ops.available_backends()


def test_cli_demo_runs_the_ops(tmp_path):
    out = subprocess.run([sys.executable, "-m", "urda_fast.cli", "demo", "--size", "small"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pgd_step" in out.stdout and "kd_kl_loss" in out.stdout and "max |ours - reference|" in out.stdout
    backends = {line.split()[-5] for line in out.stdout.splitlines()[2:]}
    want = {"cuda", "triton"} & set(ops.available_backends()) if torch.cuda.is_available() else {"cpu"}
    assert backends == want, out.stdout


_CHECK_WITH_NUMBERS = """
import torch, urda_fast.ops as ops
ops.available_backends()
s, t = torch.randn(3, 5), torch.randn(3, 5)
rows, stats = torch.ops.urda_fast.kd_kl_forward(s, t, 1.0)
try:
    torch.ops.urda_fast.kd_kl_backward(torch.ones(3), s, t, rows, stats[:2], 1.0, True, False)
except RuntimeError as err:
    print(str(err).splitlines()[0])
"""


def test_a_failed_kernel_check_raises_in_a_fresh_process():
    """A C++ check whose message formats numbers must raise. With a private static libstdc++ in the extension (a
    toolchain that links it statically: setup.py now prevents it) this segfaulted, in a fresh process after importing
    torch; run in a subprocess so a crash fails this test with a reason instead of killing the test run."""
    out = subprocess.run([sys.executable, "-c", _CHECK_WITH_NUMBERS], capture_output=True, text=True)
    assert out.returncode == 0, (f"the extension crashed (exit {out.returncode}) formatting a TORCH_CHECK message; "
                                 f"is libstdc++ linked into it statically? (setup.py: shared_cxx_runtime_link_args)\n"
                                 + out.stderr[-2000:])
    assert "stats has shape [2, 4], expected (3, 4)" in out.stdout


@pytest.mark.skipif(os.environ.get("URDA_FAST_EXPECT_CUDA_BUILD") != "1",
                    reason="set URDA_FAST_EXPECT_CUDA_BUILD=1 where nvcc is present (CI does) to require the CUDA build")
def test_cuda_extension_was_compiled():
    """CI compiles every .cu file with nvcc even without a GPU, so a CUDA compile error fails CI."""
    ext = _backends._load_extension("_C_cuda")
    assert not isinstance(ext, ImportError), f"urda_fast._C_cuda did not build or import: {ext}"


def test_the_reference_environment_runs_the_models_for_double_backward_and_forward_ad(monkeypatch):
    """The models' fused layers have C++ autograd (no second derivative, no forward-mode AD); the README's way out,
    URDA_FAST_BACKEND=reference, must reach every one of them (the CLIP block had not read it)."""
    import torch.autograd.forward_ad as fwAD

    from urda_fast.hpt.clip_models import load_clip
    from urda_fast.models import create_backbone

    monkeypatch.setenv("URDA_FAST_BACKEND", "reference")
    torch.manual_seed(0)
    for model, x in ((create_backbone("resnet18").eval(), torch.rand(2, 3, 32, 32)),
                     (load_clip("urda-tiny-vit", None)[0].visual, torch.rand(2, 3, 32, 32))):
        x = x.requires_grad_()
        (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        grad.square().sum().backward()  # an input-gradient penalty
        assert model.parameters().__next__().grad is not None
        with fwAD.dual_level():
            out = model(fwAD.make_dual(x.detach(), torch.ones_like(x)))
            assert fwAD.unpack_dual(out).tangent is not None
