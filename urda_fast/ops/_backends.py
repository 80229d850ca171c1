"""Which backends exist in this process, and which one runs a given call.

``reference`` (pure PyTorch) always exists. ``cpu`` needs the C++ extension ``urda_fast._C``; ``cuda`` needs
``urda_fast._C_cuda`` and a GPU; ``triton`` needs Triton and a GPU, or ``TRITON_INTERPRET=1`` for CPU tensors.
A call picks, in order: its ``backend=`` argument, the ``URDA_FAST_BACKEND`` environment variable, the device's
default (CPU tensors -> cpu; CUDA tensors -> cuda, else triton).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "URDA_FAST_BACKEND"

_BUILD_HINT = "build it with `pip install -e . --no-build-isolation` (or `python setup.py develop`) in the repository"


# Filled once, at import of urda_fast.ops, by load_extensions(): later lookups are plain dict reads, which
# torch.compile traces without graph breaks (it would inline an import or an lru_cache wrapper instead).
_EXTENSIONS: dict[str, object] = {}
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def load_extensions() -> None:
    """Import the compiled extensions that exist; importing one registers its kernels with the dispatcher."""
    for name in ("_C", "_C_cuda"):
        if name in _EXTENSIONS:
            continue
        try:
            _EXTENSIONS[name] = importlib.import_module(f"urda_fast.{name}")
        except ImportError as err:
            _EXTENSIONS[name] = err
        if isinstance(_EXTENSIONS[name], ImportError):
            break  # _C_cuda registers kernels for schemas that _C defines


def _load_extension(name: str):
    return _EXTENSIONS.get(name, ImportError(f"urda_fast.{name} was not loaded"))


def native_cpu_error() -> str | None:
    ext = _load_extension("_C")
    return None if not isinstance(ext, ImportError) else f"the C++ extension urda_fast._C is not importable ({ext})"


def native_cuda_error() -> str | None:
    cpu = native_cpu_error()
    if cpu is not None:
        return cpu
    ext = _load_extension("_C_cuda")
    if isinstance(ext, ImportError):
        return (f"the CUDA extension urda_fast._C_cuda is not importable ({ext}); it is built when torch has CUDA and "
                "nvcc is found (URDA_FAST_BUILD_CUDA=1 forces it)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(distribution: str) -> tuple[int, int] | None:
    try:
        parts = importlib.metadata.version(distribution).split(".")
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (importlib.metadata.PackageNotFoundError, IndexError, ValueError):
        return None


def _triton_interpreter_error() -> str | None:
    """Triton 3.6 and older convert a 1-element array to an int in their interpreter in a way that NumPy 2.4 refuses
    (triton-lang/triton#9171, fixed upstream since): every kernel whose loop bound comes from the program id fails
    with "only 0-dimensional arrays can be converted to Python scalars". Seen with torch 2.11's Triton 3.6."""
    triton_version, numpy_version = _major_minor("triton"), _major_minor("numpy")
    if triton_version is None or numpy_version is None or triton_version > (3, 6) or numpy_version < (2, 4):
        return None
    return (f"Triton {'.'.join(map(str, triton_version))}'s CPU interpreter fails with NumPy "
            f"{'.'.join(map(str, numpy_version))} (triton-lang/triton#9171): install 'numpy<2.4' or Triton >= 3.8 to "
            "run Triton kernels on CPU tensors (GPUs are not affected)")


# Read once here (package metadata, ~5 ms): triton_error runs on every call that names a backend, traced ones too.
_TRITON_INTERPRETER_ERROR = _triton_interpreter_error() if _TRITON_INSTALLED else None


def triton_error(device_type: str | None = None) -> str | None:
    if not _TRITON_INSTALLED:
        return "Triton is not installed (`pip install triton`)"
    if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
        if not triton_interpreting():
            return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before starting Python"
        return _TRITON_INTERPRETER_ERROR
    return None


def _unavailable_reason(name: str, device_type: str | None) -> str | None:
    if name == "reference":
        return None
    if name == "cpu":
        return native_cpu_error()
    if name == "cuda":
        return native_cuda_error()
    return triton_error(device_type)


def available_backends() -> list[str]:
    """The backends usable in this process, e.g. ``["reference", "cpu", "triton"]``."""
    return [name for name in BACKENDS if _unavailable_reason(name, None) is None]


def _default_backend(device_type: str) -> str:
    if device_type == "cpu":
        if native_cpu_error() is None:
            return "cpu"
        _warn_fallback(native_cpu_error())
        return "reference"
    if device_type == "cuda":
        if native_cuda_error() is None:
            return "cuda"
        if triton_error("cuda") is None:
            return "triton"
    return "reference"


_WARNED: set[str] = set()


def _warn_fallback(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"urda_fast: using the slow pure-PyTorch reference ops because {reason}; {_BUILD_HINT}.",
                  stacklevel=3)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev...) is running: the fused ops' autograd rules (Python's
    ``register_autograd`` and C++ autograd Functions alike) do not work under them, so the default is the reference.
    False while torch.compile traces: Dynamo answers the interpreter-stack query with a non-None value there, which
    had put the reference, not the fused op, into every compiled graph."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def _functorch_refusal(name: str) -> str:
    return (f"urda_fast: backend={name!r} cannot run inside a torch.func transform (grad, vmap, jacrev, ...): the "
            "fused kernels' autograd rules do not support them (torch's own limit for custom ops); leave backend "
            "unset there (the reference runs) or pass backend='reference'")


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend that runs a call on ``device``; raises a clear error for an unknown or unusable choice."""
    name = requested if requested is not None else os.environ.get(ENV_VAR) or None
    if name is None:
        return "reference" if functorch_active() else _default_backend(device.type)
    source = "backend=" if requested is not None else f"{ENV_VAR}="
    if name not in BACKENDS:
        raise ValueError(f"urda_fast: unknown backend {source}{name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "reference" and functorch_active():
        if requested is None:  # the environment's preference yields to torch.func, as the device's default does
            return "reference"
        raise ValueError(_functorch_refusal(name))
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"urda_fast: {source}'cpu' runs CPU tensors only, but the inputs are on {device}; "
                         "use 'cuda', 'triton' or 'reference' for them")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"urda_fast: {source}'cuda' runs CUDA tensors only, but the inputs are on {device}")
    reason = _unavailable_reason(name, device.type)
    if reason is not None:
        hint = _BUILD_HINT if name in ("cpu", "cuda") else "see the triton row of the README's Backends table"
        raise RuntimeError(f"urda_fast: backend {name!r} is not available: {reason}. Available here: "
                           f"{', '.join(available_backends())}. To get {name!r}: {hint}.")
    return name


def cpu_only_choice(op_name: str, backend: str | None, gpu_note: str) -> str | None:
    """The backend asked of an op that has a CPU kernel and the reference only (``max_pool2d``, ``conv2d``):
    ``"cpu"`` or ``"reference"`` from ``backend=``, ``"reference"`` from the environment or under ``torch.func``, None
    for the op's default.
    ``backend="cuda"``/``"triton"`` is a clear error; the environment's GPU backends are a global preference, so
    they leave the default."""
    if backend is None:
        env = os.environ.get(ENV_VAR) or None
        if env is not None and env not in BACKENDS:  # a typo is the same error here as in the other ops
            raise ValueError(f"urda_fast: unknown backend {ENV_VAR}={env!r}; choose one of {', '.join(BACKENDS)}")
        return "reference" if env == "reference" or functorch_active() else None
    if backend == "cpu" and functorch_active():
        raise ValueError(_functorch_refusal(backend))
    if backend in ("cpu", "reference"):
        return backend
    if backend in BACKENDS:
        raise ValueError(f"urda_fast: {op_name} has no {backend!r} kernel ({gpu_note}); use backend='reference' for "
                         "GPU tensors")
    return resolve_backend(backend, torch.device("cpu"))  # an unknown name: raises resolve_backend's error


def float_cpu_kernel(op_name: str, backend: str | None, x: torch.Tensor, gpu_note: str) -> bool:
    """Whether a CPU-only op whose kernel takes float32 / float64 (``packed_self_attention``, ``transformer_block``)
    runs it for ``x``: by default for such CPU tensors when the extension is built; ``backend="cpu"`` insists (a clear
    error for another dtype or device), ``"reference"`` declines."""
    choice = cpu_only_choice(op_name, backend, gpu_note)
    if choice == "reference":
        return False
    usable = x.dtype in (torch.float32, torch.float64)
    if choice == "cpu":
        require_cpu_kernel(op_name, x.device)
        if not usable:
            raise TypeError(f"urda_fast: {op_name}'s CPU kernel takes float32 or float64, got {x.dtype}; use "
                            "backend='reference'")
        return True
    return usable and x.device.type == "cpu" and native_cpu_error() is None


def require_cpu_kernel(op_name: str, device: torch.device) -> None:
    """``backend="cpu"`` asked of a CPU-only op: a clear error for a GPU tensor (its way out is the reference, not
    another backend) or a missing extension."""
    if device.type != "cpu":
        raise ValueError(f"urda_fast: {op_name}'s CPU kernel runs CPU tensors only, got {device}; leave backend unset "
                         "(or pass 'reference') for GPU tensors")
    resolve_backend("cpu", device)


_TRITON_READY: set[str] = set()


def triton_ops(module: str, register):
    """``torch.ops.urda_fast`` after importing ``urda_fast.kernels.<module>`` (which defines its ``*_triton`` ops)
    and registering their autograd. Done on first use, because importing Triton is slow; ``load_triton()`` does it
    up front (needed before a first Triton call inside ``torch.compile``)."""
    if module not in _TRITON_READY:
        importlib.import_module(f"urda_fast.kernels.{module}")
        # Under the interpreter the Triton ops are opaque custom ops (see kernels/_registry.py) and need our fakes.
        register("_triton", fake=triton_interpreting())
        _TRITON_READY.add(module)
    return torch.ops.urda_fast


def op_for(backend: str, module: str, op_name: str, register):
    """The low-level op that runs ``backend``: ``urda_fast::<op_name>`` (C++ dispatcher picks CPU or CUDA) or the
    Triton twin ``urda_fast::<op_name>_triton``."""
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.urda_fast, op_name)
    return getattr(triton_ops(module, register), op_name.rstrip("_") + "_triton" + ("_" if op_name.endswith("_") else ""))


def forbid_double_backward(qualname: str, loss_name: str) -> None:
    """Register an autograd for a backward kernel that fails a second-order backward clearly: without one, torch
    only warns and silently drops the second derivative."""

    def backward(ctx, *grads):
        raise RuntimeError(f"urda_fast: {loss_name} has no second derivative on the fused backends "
                           f"(create_graph=True reached {qualname}); for double backward use backend='reference', "
                           f"or for urda_fast's models (whose layers take no backend argument) "
                           f"{ENV_VAR}=reference or urda_fast.models.plain_torch(model)")

    torch.library.register_autograd(qualname, backward, setup_context=lambda ctx, inputs, output: None)
