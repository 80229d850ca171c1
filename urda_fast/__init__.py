"""urda_fast: fused kernels and fast training methods for adversarially robust transfer learning."""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers the custom ops' autograd and fake kernels)

__all__ = ["ops", "__version__"]
