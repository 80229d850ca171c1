"""Throughput of ``packed_self_attention`` (forward + backward to the packed projection) against the same attention
written with torch's ``scaled_dot_product_attention`` -- eager with its default kernel, eager with its ``math``
kernel (what ``short_sequence_attention`` picks), and torch.compile of the default -- each from the packed (B, T, 3E)
projection to the merged (B, T, E) heads, as ``nn.MultiheadAttention`` runs it. A CPU op: GPUs keep torch's kernels
(the module skips there). Shapes: the tiny CLIP's image tower (17 tokens) and text tower (16 tokens x 10 prompts x
64), ViT-B-32 at 224 (50 tokens) and CLIP's text (77 tokens)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import urda_fast.ops as ops

pytestmark = pytest.mark.bench

# (batch, tokens, embed, heads)
SHAPES = {"small": [(64, 17, 64, 4), (640, 16, 64, 4), (32, 50, 768, 12), (16, 77, 512, 8)]}
SHAPES["large"] = SHAPES["small"]


def pytest_generate_tests(metafunc):
    # Own parameter names: conftest's hook parametrizes "shape"/"provider" with the fused ops' values.
    if "case" in metafunc.fixturenames:
        cases = SHAPES["small"]
        metafunc.parametrize("case", cases, ids=[f"{b}x{t}x{e}h{h}" for b, t, e, h in cases])
        metafunc.parametrize("impl", ["eager", "eager_math", "compile", "cpu"])


def sdpa_attention(qkv, heads):
    """The attention of ``nn.MultiheadAttention`` between its two projections: split heads, SDPA, merge heads."""
    batch, tokens, packed = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, heads, packed // (3 * heads))).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, packed // 3)


def math_attention(qkv, heads):
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_attention(qkv, heads)


def test_packed_attention(bench, case, impl):
    if bench.device.type != "cpu":
        pytest.skip("packed_self_attention has a CPU kernel only; GPUs run torch's attention")
    batch, tokens, embed, heads = case
    qkv = torch.randn(batch, tokens, 3 * embed, dtype=bench.dtype, requires_grad=True)
    grad = torch.randn(batch, tokens, embed, dtype=bench.dtype)
    eager_impl = math_attention if impl == "eager_math" else sdpa_attention
    attention = bench.provider_fn("eager" if impl == "eager_math" else impl, eager_impl,
                                  ops.packed_self_attention)

    def fn():
        torch.autograd.grad(attention(qkv, heads), qkv, grad)

    # Compulsory traffic: forward reads qkv and writes the output; backward reads qkv and the output gradient and
    # writes qkv's gradient (the probabilities are a by-product of each provider's own choosing).
    nbytes = qkv.numel() * qkv.element_size()
    bench.run(fn, op="packed_attention", variant=f"{heads} heads", mode="full", shape=(batch, tokens, 3 * embed),
              provider=impl, bytes_moved=3 * nbytes + 2 * grad.numel() * grad.element_size(), copy_numel=qkv.numel())
