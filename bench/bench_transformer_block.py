"""Throughput of one open_clip transformer block (``ResidualAttentionBlock``), forward + backward: ``cpu`` is
``FastResidualAttentionBlock`` (``urda_fast.ops.transformer_block``: the block as one op), ``eager`` open_clip's block
with torch's own layers (``plain_torch``), ``compile`` that block through ``torch.compile``. ``input`` asks for the
input's gradient only (frozen weights: an attack step), ``all`` for every weight's too (a training step). Shapes: the
tiny CLIP's image block (64 images x 17 tokens, width 64, the HPT step's), its text block (10 classes x 64 prompts x
16 tokens, causal mask, trained with the text tower), and ViT-B-32's at 224 (8 images x 50 tokens, width 768). A CPU
op: GPUs run torch's layers (the module skips there)."""

import copy

import pytest
import torch

pytestmark = pytest.mark.bench

# (batch, tokens, width, heads, causal, grads)
CASES = [(64, 17, 64, 4, False, "input"), (64, 17, 64, 4, False, "all"), (640, 16, 64, 4, True, "all"),
         (8, 50, 768, 12, False, "input")]


def pytest_generate_tests(metafunc):
    # Own parameter names: conftest's hook parametrizes "shape"/"provider" with the fused ops' values.
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[f"{b}x{t}x{w}h{h}{'c' if c else ''}-{g}" for b, t, w, h, c, g in CASES])
        metafunc.parametrize("impl", ["eager", "compile", "cpu"])


def test_transformer_block(bench, case, impl):
    if bench.device.type != "cpu":
        pytest.skip("transformer_block has a CPU kernel only; GPUs run torch's layers")
    open_clip = pytest.importorskip("open_clip")
    from urda_fast.models import plain_torch, use_fast_attention
    from urda_fast.models.transformer import use_fast_blocks

    batch, tokens, width, heads, causal, grads = case
    torch.manual_seed(0)
    block = open_clip.transformer.ResidualAttentionBlock(width, heads).to(bench.dtype)
    block.requires_grad_(grads == "all")
    if impl == "cpu":
        block = use_fast_blocks(use_fast_attention(block))
    else:
        block = plain_torch(copy.deepcopy(block))
    if impl == "compile":
        torch._dynamo.reset()
        block = torch.compile(block, fullgraph=True, dynamic=False)
    x = torch.randn(batch, tokens, width, dtype=bench.dtype, requires_grad=True)
    grad = torch.randn_like(x)
    mask = torch.full((tokens, tokens), float("-inf"), dtype=bench.dtype).triu(1) if causal else None
    inputs = [x] + [p for p in block.parameters() if p.requires_grad]

    def fn():
        torch.autograd.grad(block(x, attn_mask=mask), inputs, grad)

    bench.run(fn, op="transformer_block", variant=f"{heads} heads{' causal' if causal else ''} grads={grads}",
              mode="full", shape=(batch, tokens, width), provider=impl)
