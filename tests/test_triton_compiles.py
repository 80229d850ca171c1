"""Every Triton kernel variant the ops launch compiles for a real GPU (sm_90, PTX and cubin), without a GPU.

The other Triton tests run the kernels under ``TRITON_INTERPRET=1``, which executes them as NumPy and accepts what the
compiler refuses (a loop-carried value changing type, a scalar/block mix-up, an unsupported op). Here the ops run
under the interpreter once more, a recorder notes each launch's kernel, argument types and constexprs, and a child
Python without the interpreter compiles exactly those variants for ``GPUTarget("cuda", 90, 32)``.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import urda_fast.ops as ops

triton = pytest.importorskip("triton")

KERNEL_MODULES = ("urda_fast.kernels.kd_kl", "urda_fast.kernels.pgd_step", "urda_fast.kernels.feature_losses")
TORCH_TO_TRITON = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
                   torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def _describe(kernel, args, kwargs):
    """(module, name, signature, constexprs, options) of one launch, in the form triton.compile takes."""
    fn = kernel.fn
    params = inspect.signature(fn).parameters
    bound = dict(zip(kernel.arg_names, args), **{k: v for k, v in kwargs.items() if k in params})
    signature, constexprs = {}, {}
    for name, param in params.items():
        value, annotation = bound[name], param.annotation
        if annotation is triton.language.constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TORCH_TO_TRITON[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp64" if annotation is triton.language.float64 else "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no Triton type for argument {name}={value!r}")
    options = {k: v for k, v in kwargs.items() if k not in params}
    return [fn.__module__, fn.__name__, signature, constexprs, options]


def _record_launches(monkeypatch):
    variants = []

    def recording_launch(kernel):
        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    variant = _describe(kernel, args, kwargs)
                    if variant not in variants:
                        variants.append(variant)
                    return kernel[grid](*args, **kwargs)
                return call
        return Grid()

    for module in KERNEL_MODULES:
        monkeypatch.setattr(sys.modules[module], "launch", recording_launch)
    return variants


def _exercise_every_path():
    """Each op forward and backward, in every dtype, at sizes that take each launcher branch."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for classes in (33, 5000):  # one chunk; two
            s = torch.randn(3, classes, dtype=dtype, requires_grad=True)
            t = torch.randn(3, classes, dtype=dtype, requires_grad=True)
            ops.kd_kl_loss(s, t, temperature=2.0, backend="triton").backward()
        for shape in ((2, 3, 5, 5), (2, 3, 700), (1, 3, 60, 60)):  # flat; planes; L2 sums split over programs
            x = torch.rand(shape, dtype=dtype)
            g = torch.randn(shape, dtype=dtype)
            for norm in ("linf", "l2"):
                ops.pgd_step(x, g, x, step_size=0.01, eps=0.03, norm=norm, backend="triton")
                ops.pgd_step_(x.clone(), g, x, step_size=0.01, eps=0.03, norm=norm, backend="triton")
        for shape in ((4, 16), (2, 20000)):  # one program; split
            a = torch.randn(shape, dtype=dtype, requires_grad=True)
            b = torch.randn(shape, dtype=dtype, requires_grad=True)
            (ops.feature_mse_loss(a, b, backend="triton") + ops.feature_cosine_loss(a, b, backend="triton")).backward()


def test_every_launched_triton_kernel_compiles_for_sm90(monkeypatch, tmp_path):
    from urda_fast.ops import _backends

    reason = _backends.triton_error("cpu")
    if reason is not None:
        pytest.skip(reason)
    ops.load_triton()
    variants = _record_launches(monkeypatch)
    _exercise_every_path()
    names = {v[1] for v in variants}
    assert {"_kd_kl_fwd_kernel", "_kd_kl_bwd_kernel", "_pgd_step_fwd_kernel", "_pgd_step_plane_kernel",
            "_pgd_step_l2_stats_kernel", "_pgd_step_l2_coef_kernel"} <= names, names
    assert sum(n.startswith("_feature") for n in names) >= 5, names
    spec = tmp_path / "variants.json"
    spec.write_text(json.dumps(variants))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier run's cache
    done = subprocess.run([sys.executable, __file__, str(spec)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"compiled {len(variants)} variants" in done.stdout, done.stdout


def _compile_all(spec_path):
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    failures = []
    variants = json.loads(open(spec_path).read())
    for module, name, signature, constexprs, options in variants:
        kernel = getattr(importlib.import_module(module), name)
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=target, options=options)
            assert compiled.asm.get("cubin"), "no cubin"
        except Exception as error:  # report every failing variant, not only the first
            failures.append(f"{name} {signature} {constexprs} {options}: {type(error).__name__}: {error}")
    if failures:
        print("\n\n".join(failures))
        sys.exit(1)
    print(f"compiled {len(variants)} variants")


if __name__ == "__main__":
    _compile_all(sys.argv[1])
