"""How the Triton ops are defined: ``triton_op`` where Triton compiles (traceable into torch.compile graphs), an
opaque ``custom_op`` under ``TRITON_INTERPRET=1``.

The interpreter's kernels can only run on real memory, and ``wrap_triton`` hands them back unwrapped, so a
``triton_op`` traced with fake tensors (torch.compile, opcheck) would either crash or drop the launch and return
uninitialised memory. As an opaque op it is never traced: urda_fast.ops registers its fake kernel instead.
"""

import functools
import os

import torch
from torch.library import wrap_triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def define_op(name: str, mutates_args):
    """Decorator defining ``name`` (e.g. ``urda_fast::pgd_step_triton``) from a Python function that launches kernels,
    on its first tensor argument's GPU."""
    define = torch.library.custom_op if INTERPRETING else torch.library.triton_op

    def decorate(fn):
        @functools.wraps(fn)  # the op's schema comes from fn's signature
        def on_the_inputs_gpu(*args, **kwargs):
            # Triton launches on the current GPU, not the tensors': cuda:1 tensors with cuda:0 current would fault
            # (or, with peer access, race cuda:1's stream). Compiled graphs set the device themselves.
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
            if device is None or device.type != "cuda" or torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            with torch.cuda.device(device):
                return fn(*args, **kwargs)

        return define(name, mutates_args=mutates_args)(on_the_inputs_gpu)

    return decorate


def launch(kernel):
    """The kernel to index with a grid: wrapped for tracing when compiled, as is under the interpreter."""
    return kernel if INTERPRETING else wrap_triton(kernel)
