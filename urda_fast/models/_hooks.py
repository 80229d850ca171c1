"""Whether something stands between a module's call and its forward: hooks, or a forward set on the instance. A fused
op, or a traced graph, that computes a module's forward without calling it would skip either, so it must not stand
in for such a module (the fused BatchNorm -> ReLU and transformer blocks, the attacks' BatchNorm folding)."""

from __future__ import annotations

import torch.nn as nn

# A module's own hook dicts; ``intercepted`` reads the same four directly (it runs at every fused forward).
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def intercepted(module: nn.Module) -> bool:
    """Hooks on ``module``, or a forward replaced on the instance."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def global_hooks() -> bool:
    """Hooks registered for every module (``nn.modules.module.register_module_forward_hook`` and the like)."""
    return bool(nn.modules.module._has_any_global_hook())
