"""Eval-mode BatchNorm folding for the attack's forward and backward passes.

An attack runs the model in eval mode, where every BatchNorm is a fixed per-channel affine map, so a convolution or
linear layer followed by one is a single layer with a rescaled weight and a shifted bias: the same function, one
elementwise pass fewer forward and one fewer backward per BatchNorm. On this machine's CPU (2 cores) a PGD-10 attack
is 1.3x faster on the digits CNN and 1.06-1.09x on ResNet-18 (``bench/bench_attacks.py``, ``ours_fold``).

The model is traced once with ``torch.fx`` (the traced graph shares every module and parameter with the model); each
attack call then recomputes the folded weights from the live layers and running statistics, so a model that trains
between attacks (DART's student) is folded as it is now. What tracing cannot see is Python control flow that depends
on state other than the inputs: a model whose forward changes with such state between calls must not be folded.
During a call the folded weights are a second copy of the folded layers' weights (ResNet-18: 45 MB); they are
dropped when the call returns.
"""

from __future__ import annotations

import inspect
import itertools

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from urda_fast.models._hooks import HOOK_DICTS, global_hooks, intercepted

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LEAVES = _LAYERS + _NORMS + (nn.MaxPool2d,)
# Forwards the fold reproduces: torch's (FastConv2d only overrides _conv_forward, which the folded layer calls). A
# subclass with a forward of its own (weight standardisation, timm's Conv2dSame or BatchNormAct2d) is left alone.
_PLAIN_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward,
                   nn.modules.batchnorm._BatchNorm.forward)


class _FoldedLayer(nn.Module):
    """``norm(layer(x))`` in eval mode as one layer; ``FoldedModel.refresh`` sets its weight and bias."""

    def __init__(self, layer: nn.Module, norm: nn.Module):
        super().__init__()
        self._pair = (layer, norm)  # a tuple, so not registered: the folded copy owns no parameters
        self.weight = self.bias = None

    def forward(self, x):
        layer, norm = self._pair
        if isinstance(layer, nn.Linear):
            if x.dim() != 2:  # BatchNorm1d then normalises dim 1, not the linear layer's output features
                return norm(layer(x))
            return F.linear(x, self.weight, self.bias)
        return layer._conv_forward(x, self.weight, self.bias)  # a FastConv2d's fast paths included


@torch.no_grad()
def _refresh(folded: list) -> None:
    """Every folded layer's weight and bias from its layer and BatchNorm as they are now, for layers of one weight
    dtype and device: scale = weight_bn / sqrt(var + eps), shift = (bias - mean) * scale + bias_bn, weight * scale,
    computed in float32 at least (half-precision models fold in float32). Batched with torch._foreach ops, so that a
    ResNet-50's 53 folds cost a dozen dispatcher calls per attack instead of ~500: on a GPU, where DART's step is
    bound by host time per op, each of those was a kernel launch."""
    pairs = [layer._pair for layer in folded]
    weight_dtype = pairs[0][0].weight.dtype
    dtype = torch.promote_types(weight_dtype, torch.float32)

    def cast(tensors):
        return [t if t.dtype == dtype else t.to(dtype) for t in tensors]  # float32 models: no call at all

    def where(has):
        return [i for i, pair in enumerate(pairs) if has(*pair)]

    scales = torch._foreach_add(cast([norm.running_var for _, norm in pairs]), [float(norm.eps) for _, norm in pairs])
    torch._foreach_rsqrt_(scales)
    affine = where(lambda layer, norm: norm.weight is not None)
    if affine:
        torch._foreach_mul_([scales[i] for i in affine], cast([pairs[i][1].weight for i in affine]))
    shifts = torch._foreach_mul(torch._foreach_neg(cast([norm.running_mean for _, norm in pairs])), scales)
    biased = where(lambda layer, norm: layer.bias is not None)
    if biased:
        torch._foreach_add_([shifts[i] for i in biased],
                            torch._foreach_mul(cast([pairs[i][0].bias for i in biased]), [scales[i] for i in biased]))
    shifted = where(lambda layer, norm: norm.bias is not None)
    if shifted:
        torch._foreach_add_([shifts[i] for i in shifted], cast([pairs[i][1].bias for i in shifted]))
    weights = torch._foreach_mul(cast([layer.weight for layer, _ in pairs]),
                                 [scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1))
                                  for scale, (layer, _) in zip(scales, pairs)])
    if dtype != weight_dtype:
        weights, shifts = [w.to(weight_dtype) for w in weights], [b.to(weight_dtype) for b in shifts]
    for layer, weight, shift in zip(folded, weights, shifts):
        layer.weight, layer.bias = weight, shift


def _foldable(norm: nn.Module, producer, modules: dict) -> bool:
    if norm.running_mean is None:  # track_running_stats=False: batch statistics even in eval mode
        return False
    if not (isinstance(producer, fx.Node) and producer.op == "call_module" and len(producer.users) == 1):
        return False
    layer = modules.get(producer.target)  # None: a layer folded already (conv -> BatchNorm -> BatchNorm)
    return (isinstance(layer, _LAYERS) and layer.weight.shape[0] == norm.num_features
            # hooks: old-style weight_norm / spectral_norm recompute the weight in one, the fold would read a stale one
            and all(type(m).forward in _PLAIN_FORWARDS and not intercepted(m) for m in (layer, norm)))


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with subclasses of torch's layers (urda_fast's FastConv2d, MaxPool2d) kept as leaves: their
    forwards branch on the input's shape and device, which tracing cannot follow."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return isinstance(module, _LEAVES) or super().is_leaf_module(module, qualname)


def _defaults_after_input(model: nn.Module) -> dict:
    """The attack calls ``model(x)``: every later argument takes its default, so tracing fixes them to it."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _structure(model: nn.Module) -> tuple:
    """What a traced graph depends on besides tensor values: the modules and their classes, hooks and instance
    forwards, and the tensor objects (the graph holds those it reads directly; one reassigned, as by
    ``load_state_dict(assign=True)``, or a running_mean set to None, would not be seen)."""
    modules = tuple((id(m), type(m), tuple(key for hooks in HOOK_DICTS for key in getattr(m, hooks)),
                     m.__dict__.get("forward")) for m in model.modules())
    tensors = tuple((name, id(t)) for name, t in itertools.chain(model.named_parameters(), model.named_buffers()))
    return modules, tensors


def _refuse_skipped_hooks(model: nn.Module, graph: fx.Graph, modules: dict) -> None:
    """A ValueError for hooks the traced graph would not run: those of modules tracing inlined (the model itself
    included; the leaves it calls keep theirs) and global ones."""
    if global_hooks():
        raise ValueError("urda_fast.attacks: global module hooks are registered, which a BatchNorm-folded graph "
                         "would not run; pass fold_batchnorm=False")
    called = {id(modules[node.target]) for node in graph.nodes if node.op == "call_module"}
    for name, module in model.named_modules():
        if intercepted(module) and id(module) not in called:
            raise ValueError(f"urda_fast.attacks: {name or type(model).__name__} has hooks or a forward set on the "
                             "instance, which a BatchNorm-folded graph would not run; pass fold_batchnorm=False")


class FoldedModel:
    """``model`` in eval mode with each (conv | linear) -> BatchNorm pair folded into one layer.

    Build it with the model in eval mode. Call :meth:`refresh` after the model's parameters or statistics change
    (an attack does at every call); :meth:`stale` says whether the model's modules, hooks or tensor objects changed
    since tracing (then build a new one).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._structure = _structure(model)
        self.layers: list[_FoldedLayer] = []
        if not any(isinstance(m, _NORMS) and m.running_mean is not None for m in model.modules()):
            self.graph_module = model  # nothing to fold
            return
        training = [name or type(model).__name__ for name, m in model.named_modules()
                    if isinstance(m, _NORMS) and m.training]
        if training:  # folded with running statistics, they would compute another function than the model does
            raise ValueError(f"urda_fast.attacks: FoldedModel needs the model's BatchNorms in eval mode; in "
                             f"training mode: {', '.join(training[:3])}{' ...' * (len(training) > 3)}; call "
                             "model.eval() first (the attacks do)")
        try:
            graph = _Tracer().trace(model, concrete_args=_defaults_after_input(model))
            graph_module = fx.GraphModule(model, graph, type(model).__name__)
        except Exception as err:
            raise ValueError(
                f"urda_fast.attacks: fold_batchnorm=True needs a model torch.fx can trace, and tracing "
                f"{type(model).__name__} failed ({type(err).__name__}: {err}); pass fold_batchnorm=False") from err
        modules = dict(graph_module.named_modules())
        graph = graph_module.graph
        _refuse_skipped_hooks(model, graph, modules)
        for node in list(graph.nodes):
            if node.op != "call_module" or not isinstance(modules[node.target], _NORMS) or not node.args:
                continue
            producer = node.args[0]
            if not _foldable(modules[node.target], producer, modules):
                continue
            folded = _FoldedLayer(modules[producer.target], modules[node.target])
            name = f"urda_fast_folded_{len(self.layers)}"
            graph_module.add_submodule(name, folded)
            with graph.inserting_after(producer):
                replacement = graph.call_module(name, producer.args, producer.kwargs)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            graph.erase_node(producer)
            self.layers.append(folded)
        graph.lint()
        graph_module.recompile()
        self.graph_module = graph_module if self.layers else model  # nothing folded: the model itself, untraced

    def stale(self) -> bool:
        return _structure(self.model) != self._structure

    def refresh(self):
        """Recompute the folded weights from the model's layers and statistics as they are now."""
        groups: dict[tuple, list] = {}
        for layer in self.layers:
            weight = layer._pair[0].weight
            groups.setdefault((weight.dtype, weight.device), []).append(layer)
        for folded in groups.values():
            _refresh(folded)

    def release(self):
        """Drop the folded weights (a copy the size of the folded layers' weights) until the next refresh."""
        for layer in self.layers:
            layer.weight = layer.bias = None

    @torch.no_grad()
    def check(self, x: torch.Tensor):
        """Compare the folded model's output with the model's on ``x``: a graph that tracing got wrong (control
        flow on other state than the inputs) fails here with a clear error instead of giving a different attack."""
        if not self.layers:
            return
        with torch.autocast(x.device.type, enabled=False):
            expected, got = self.model(x), self.graph_module(x)
        expected = expected[0] if isinstance(expected, (tuple, list)) else expected
        got = got[0] if isinstance(got, (tuple, list)) else got
        low_precision = expected.dtype in (torch.float16, torch.bfloat16)
        tolerance = (5e-2 if low_precision else 1e-3) * max(1.0, float(expected.abs().max()))
        if got.shape != expected.shape or not bool(((got - expected).abs() <= tolerance).all()):
            raise ValueError(
                f"urda_fast.attacks: the BatchNorm-folded {type(self.model).__name__} does not compute what the "
                "model computes (its forward depends on state torch.fx cannot trace); pass fold_batchnorm=False")

    def __call__(self, x):
        return self.graph_module(x)
