"""Throughput (images/s) of one HPT training step in GPD's HPT phase (proxy weight 1, anchor weight 0.001): 5-step
PGD-L-inf on the target (eps 2/255, step 1/255, no random start), the target's forward on x_adv, the frozen proxy
(x_adv) and anchor (x) forwards, the KL loss, backward and an SGD step.

``ours`` is ``HptTask.training_step`` (text features once per step, cached frozen heads, fused PGD and KL) and the
training loop's SGD (``urda_fast.optim.sgd``, torch's fused kernel; the twins step torch's default SGD); ``eager``
is the twin written like the reference code (``urda_fast/hpt/reference_step.py``: every forward re-encodes the class
prompts, the code's ``attack_pgd`` whose ``loss.backward()`` also computes the parameter gradients at every attack
step, ``nn.KLDivLoss(sum)``); ``lean`` is that twin with input-only attack gradients (``torch.autograd.grad``). All
train the same random-init open_clip target (the anchor is a copy of it, the proxy a CLIP of the other
architecture) on the same fixed batch. The twins run it with torch's own layers, as the reference code does
(``urda_fast.models.plain_torch`` for the duration of their forward, as the DART twins: ours has ``FastConv2d``'s
patch-embedding matmul and ``FastMultiheadAttention``'s fused self-attention; same values and gradients).

``trainable``: ``all`` trains every parameter (the code's setting); ``visual`` freezes the text tower -- ours then
caches the class text features for the whole run, eager still re-encodes them in every forward (without gradients).
Both paths freeze it, so each ``trainable`` is a like-for-like comparison; the summary table pairs them through the
variant name.

``ours_amp`` (CUDA only) is ``ours`` under bf16 autocast, the GPU configuration the issue's GPU target names.
``ours_compile`` is ``ours`` with ``compile=True`` (``--compile``: the image towers through ``torch.compile``, in
place); its compilation happens before timing, and the twins paired with it run eagerly
(``torch.compiler.set_stance("force_eager")``), though they call the same, now compiled, modules.

Before timing, the first loss of every path is computed on the same untouched weights and asserted equal to the
eager twin's (``ours_amp``: to bf16 rounding): the step does the same work, or the ratio would mean nothing. Every
round of a non-eager path is paired with an eager step just before it: ``paired vs eager`` survives a busy machine.
"""

import contextlib

import pytest
import torch
from conftest import autocast_bf16

from urda_fast.hpt.reference_step import EagerZeroShot, eager_hpt_loss
from urda_fast.hpt.step_builder import build_hpt_step, load_step_models, step_config
from urda_fast.models import plain_torch

pytestmark = pytest.mark.bench

# Target / proxy architectures: the embedded world's tiny pair (ViT target, ResNet proxy, 32x32) and the code's pair.
PAIRS = {"tiny": ("urda-tiny-vit", "urda-tiny-rn"), "b32-b16": ("ViT-B-32", "ViT-B-16")}
# (pair, batch, image size, classes). 10 classes = the world's training split; 200 = TinyImageNet, the code's
# training set, where the prompts' text work per forward outweighs the tiny models' image work.
SHAPES = {"small": [("tiny", 64, 32, 10), ("tiny", 64, 32, 200)],
          "large": [("tiny", 64, 32, 10), ("tiny", 64, 32, 200), ("b32-b16", 256, 224, 200)]}


@contextlib.contextmanager
def torch_layers(*models):
    """The models with torch's own layer classes (``plain_torch``) inside the block, their own classes after it: the
    twins record their autograd graphs with torch's layers, and ours keeps its modules."""
    classes = [(module, module.__class__) for model in models for module in model.modules()]
    for model in models:
        plain_torch(model)
    try:
        yield
    finally:
        for module, cls in classes:
            module.__class__ = cls


@pytest.fixture(params=["eager", "lean", "ours", "ours_compile", "ours_amp"])
def path(request):
    return request.param


@pytest.mark.parametrize("trainable", ["all", "visual"])
def test_hpt_step(bench, shape, path, trainable):
    if path == "ours_amp" and bench.device.type != "cuda":
        pytest.skip("ours_amp (bf16 autocast) is timed on CUDA only")
    pair, batch, size, classes = shape
    target_arch, proxy_arch = PAIRS[pair]
    cfg = step_config(attack_steps=5, trainable=trainable, compile=path == "ours_compile")
    models = load_step_models(target_arch, proxy_arch, device=bench.device)
    built = build_hpt_step(models, cfg, batch_size=batch, image_size=size, num_classes=classes)
    task, x, y = built.task, built.x, built.y
    proxy_weight, anchor_weight = task.schedule.weights_at(task.scheduler.last_epoch)
    assert (proxy_weight, anchor_weight) == (1.0, 0.001)
    # The eager twin wraps the very same modules (no step has run yet), with each head's own prompt tokens.
    eager_heads = [EagerZeroShot(head.clip, head.tokens, classes, cfg.logits, cfg.preprocess).to(bench.device)
                   for head in (task.head, task.proxy, task.anchor)]

    def eager_loss(style="code"):
        with torch_layers(*(head.clip for head in eager_heads)), torch.compiler.set_stance("force_eager"):
            return eager_hpt_loss(*eager_heads, x, y, cfg, proxy_weight, anchor_weight, style=style)

    loss_fn = {"ours": built.loss, "ours_compile": built.loss, "ours_amp": autocast_bf16(built.loss),
               "eager": eager_loss, "lean": lambda: eager_loss("lean")}[path]
    # KL summed over the batch of near-uniform distributions: a small total of large cancelling terms, so float32
    # round-off is a few 1e-6 absolute (x_adv comes out identical); atol as in bench_dart_step. bf16: to its rounding.
    tolerance = dict(rtol=5e-2, atol=5e-3) if path == "ours_amp" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_fn().float(), eager_loss(), **tolerance)

    # The code's optimizer, torch's default implementation, for the twins; ours is the training loop's (fused).
    trained = [p for group in built.optimizer.param_groups for p in group["params"]]
    reference_optimizer = torch.optim.SGD(trained, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def step_of(loss, optimizer):
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()

        return step

    ours = path.startswith("ours")
    # Non-eager paths pair each timed round with an eager step just before it (the same modules, which just train a
    # step more): the paired ratio survives a busy machine.
    bench.run(step_of(loss_fn, built.optimizer if ours else reference_optimizer), op="hpt_step",
              variant=f"{pair} {classes} classes trainable={trainable}", mode="train", shape=(batch, 3, size, size),
              provider=path, images=batch,
              paired=None if path == "eager" else step_of(eager_loss, reference_optimizer))
