"""urda_fast's fused ops: the only entry points call sites use.

    >>> import urda_fast.ops as ops
    >>> x = ops.pgd_step(x_adv, grad, x_orig, step_size=2/255, eps=8/255, norm="linf")
    >>> loss = ops.kd_kl_loss(student_logits, teacher_logits, temperature=2.0, weight=w)
    >>> y = ops.max_pool2d(x, 2)     # torch's values and gradients; a vectorised kernel for NCHW CPU tensors
    >>> y = ops.conv2d(x, w, b, stride=2, padding=3)   # F.conv2d; fast input gradient for 1-4 channels on CPU
    >>> y = ops.batch_norm_eval(x, mean, var, w, b, relu=True)   # eval BatchNorm (+ ReLU), one pass each way
    >>> out = ops.packed_self_attention(qkv, heads=4)   # short-sequence multi-head attention; CPU kernel
    >>> y = ops.transformer_block(x, weights, heads=4)   # a whole pre-LayerNorm block as one op; CPU kernel
    >>> ops.available_backends()
    ['reference', 'cpu']

Every op has a pure-PyTorch definition in :mod:`urda_fast.ops.reference`.
"""

from . import _backends, attention, batch_norm, conv, feature_losses, kd_kl, pgd, pooling, reference, transformer
from ._backends import BACKENDS, available_backends
from .attention import packed_self_attention
from .batch_norm import batch_norm_eval
from .conv import conv2d
from .feature_losses import feature_cosine_loss, feature_mse_loss
from .kd_kl import kd_kl_loss
from .pgd import pgd_step, pgd_step_
from .pooling import max_pool2d
from .transformer import BlockWeights, transformer_block

__all__ = ["BACKENDS", "BlockWeights", "available_backends", "batch_norm_eval", "conv2d", "feature_cosine_loss",
           "feature_mse_loss", "kd_kl_loss", "load_triton", "max_pool2d", "packed_self_attention", "pgd_step",
           "pgd_step_", "reference", "transformer_block"]

_REGISTRARS = {"pgd_step": pgd.register, "kd_kl": kd_kl.register,
               "feature_losses": feature_losses.register}


def _register_native() -> None:
    # Importing the extensions registers their kernels; the fake kernels and autograd rules are Python's part.
    _backends.load_extensions()
    if _backends.native_cpu_error() is not None:
        return
    for register in _REGISTRARS.values():
        register("", fake=True)
    pooling.register()
    conv.register()
    attention.register()
    batch_norm.register()
    transformer.register()


def load_triton() -> None:
    """Import the Triton kernels now (otherwise on first use); needed before a first Triton call under torch.compile."""
    for module, register in _REGISTRARS.items():
        _backends.triton_ops(module, register)


_register_native()
