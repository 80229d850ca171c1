"""How the Triton ops are defined: ``triton_op`` where Triton compiles (traceable into torch.compile graphs), an
opaque ``custom_op`` under ``TRITON_INTERPRET=1``.

The interpreter's kernels can only run on real memory, and ``wrap_triton`` hands them back unwrapped, so a
``triton_op`` traced with fake tensors (torch.compile, opcheck) would either crash or drop the launch and return
uninitialised memory. As an opaque op it is never traced: urda_fast.ops registers its fake kernel instead.
"""

import os

import torch
from torch.library import wrap_triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def define_op(name: str, mutates_args):
    """Decorator defining ``name`` (e.g. ``urda_fast::pgd_step_triton``) from a Python function that launches kernels."""
    if INTERPRETING:
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return torch.library.triton_op(name, mutates_args=mutates_args)


def launch(kernel):
    """The kernel to index with a grid: wrapped for tracing when compiled, as is under the interpreter."""
    return kernel if INTERPRETING else wrap_triton(kernel)
