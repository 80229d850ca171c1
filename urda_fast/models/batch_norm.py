"""``FastSequential``: ``nn.Sequential`` that runs each eval-mode BatchNorm -> ReLU pair as one op on CPU.

An attack runs the model in eval mode, where such a pair is ``relu(x * scale + shift)`` per channel, and
differentiates it at every step: torch's BatchNorm and ReLU take two passes forward and three backward (its BatchNorm
backward reduces the gradient and the input for weight and bias gradients an attack does not need), ours
(:func:`urda_fast.ops.batch_norm_eval`) one each way, with torch's values and gradients. PGD-10 on the digits CNN
(64x1x16x16), paired against the textbook eager loop: 1.17-1.18x -> 1.36-1.47x. Below ``MIN_NUMEL`` elements, on
other devices, in training mode, with hooks on either module and under ``torch.fx`` tracing, the pair runs as the two
modules it is.

torchvision's ResNets call their BatchNorms and ReLUs from ``forward`` rather than through a Sequential:
:func:`use_fast_resnet` retypes the ResNet and its blocks so that each eval-mode BatchNorm -> ReLU pair runs as one op
and each BatchNorm before a residual sum as one pass each way (same modules, same state dict, same rule as above).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import resnet

from urda_fast import ops

from ._hooks import global_hooks, intercepted

# Smaller inputs run torch's modules: the fused op's Python path costs ~50 us a call more than theirs, more than the
# passes it saves below ~128K elements (forward + input gradient, warm caches: 16x64x8x8 0.85x, 32x64x8x8 1.05x,
# 64x32x16x16 2.0x torch's).
MIN_NUMEL = 1 << 17


def _fusable_norm(norm: nn.Module, x) -> bool:
    # x first: under torch.fx tracing it is a Proxy, whose attributes must not be read here. A subclass with a
    # forward of its own (a scaled or otherwise altered BatchNorm) computes something else than the op: it runs.
    return (isinstance(x, torch.Tensor) and isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and type(norm).forward is nn.modules.batchnorm._BatchNorm.forward
            and not norm.training and norm.running_mean is not None and x.device.type == "cpu"
            and x.numel() >= MIN_NUMEL and not (intercepted(norm) or global_hooks()))


def _fusable(norm: nn.Module, relu: nn.Module, x) -> bool:
    return (_fusable_norm(norm, x) and isinstance(relu, nn.ReLU) and type(relu).forward is nn.ReLU.forward
            and not intercepted(relu))


def _fused(norm: nn.Module, x, relu: bool):
    norm._check_input_dim(x)
    return ops.batch_norm_eval(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps, relu=relu)


def norm_relu(norm: nn.Module, relu: nn.Module, x):
    """``relu(norm(x))``, as one op where :func:`_fusable`."""
    return _fused(norm, x, True) if _fusable(norm, relu, x) else relu(norm(x))


def norm_only(norm: nn.Module, x):
    """``norm(x)``, as one pass each way for an eval-mode BatchNorm on a large CPU input."""
    return _fused(norm, x, False) if _fusable_norm(norm, x) else norm(x)


class FastSequential(nn.Sequential):
    """A drop-in ``nn.Sequential`` (same modules, same state dict) whose eval-mode BatchNorm -> ReLU pairs on large
    CPU inputs run as one op; see the module's text."""

    def forward(self, x):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            norm = modules[i]
            if i + 1 < len(modules) and _fusable(norm, modules[i + 1], x):
                x = _fused(norm, x, True)
                i += 2
            else:
                x = norm(x)
                i += 1
        return x


def _has_pair(sequential: nn.Sequential) -> bool:
    modules = list(sequential)
    return any(isinstance(a, nn.modules.batchnorm._BatchNorm) and isinstance(b, nn.ReLU)
               for a, b in zip(modules, modules[1:]))


def use_fast_batch_norm(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Sequential`` of ``model`` that holds a BatchNorm -> ReLU pair into :class:`FastSequential`, in
    place (the class changes, the modules stay); returns the model."""
    for module in model.modules():
        if type(module) is nn.Sequential and _has_pair(module):
            module.__class__ = FastSequential
    return model


def use_torch_batch_norm(model: nn.Module) -> nn.Module:
    """The inverse of :func:`use_fast_batch_norm` and :func:`use_fast_resnet` (benchmarks' plain-PyTorch twins)."""
    for module in model.modules():
        if type(module) is FastSequential:
            module.__class__ = nn.Sequential
        for fast in _RESNET_TYPES.values():
            if type(module) is fast:
                module.__class__ = fast.__bases__[0]
    return model


class FastResNet(resnet.ResNet):
    """torchvision's ResNet with its stem's BatchNorm -> ReLU as one op (see the module's text)."""

    def _forward_impl(self, x):
        x = self.maxpool(norm_relu(self.bn1, self.relu, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class FastBasicBlock(resnet.BasicBlock):
    def forward(self, x):
        out = norm_only(self.bn2, self.conv2(norm_relu(self.bn1, self.relu, self.conv1(x))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class FastBottleneck(resnet.Bottleneck):
    def forward(self, x):
        out = norm_relu(self.bn1, self.relu, self.conv1(x))
        out = norm_only(self.bn3, self.conv3(norm_relu(self.bn2, self.relu, self.conv2(out))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


_RESNET_TYPES = {resnet.ResNet: FastResNet, resnet.BasicBlock: FastBasicBlock, resnet.Bottleneck: FastBottleneck}


def use_fast_resnet(model: nn.Module) -> nn.Module:
    """Retype torchvision's ``ResNet``, ``BasicBlock`` and ``Bottleneck`` modules of ``model`` (exactly those types)
    to subclasses whose eval-mode BatchNorms run :func:`urda_fast.ops.batch_norm_eval` on large CPU inputs, in place
    (same modules and state dict); returns the model."""
    for module in model.modules():
        fast = _RESNET_TYPES.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model
