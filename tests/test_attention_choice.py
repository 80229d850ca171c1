"""The attention-kernel choice for short sequences on CPU (urda_fast.models.attention): which kernel runs, and that
the zero-shot heads give the same logits and input gradients as with torch's own choice."""

import pytest
import torch

import urda_fast.models.attention as attention
from urda_fast.models import use_torch_attention
from urda_fast.models.attention import image_tokens, short_sequence_attention

open_clip = pytest.importorskip("open_clip")


def attention_kernels(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_short_cpu_sequences_run_the_math_kernel():
    q = k = v = torch.randn(2, 4, 17, 16, requires_grad=True)
    with short_sequence_attention(torch.device("cpu"), 17):
        kernels = attention_kernels(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert "aten::_scaled_dot_product_attention_math" in kernels
    with short_sequence_attention(torch.device("cpu"), attention.MAX_MATH_TOKENS + 1):
        kernels = attention_kernels(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert "aten::_scaled_dot_product_attention_math" not in kernels
    with short_sequence_attention(torch.device("cpu"), None):
        pass
    assert torch.backends.cuda.flash_sdp_enabled()  # the context restores torch's choice


def test_image_tokens_of_the_world_models():
    from urda_fast.hpt.clip_models import load_clip

    vit, _ = load_clip("urda-tiny-vit", None, torch.device("cpu"))
    resnet, _ = load_clip("urda-tiny-rn", None, torch.device("cpu"))
    assert image_tokens(vit.visual) == 4 * 4 + 1  # 32x32 images, 8x8 patches, class token
    assert image_tokens(resnet.visual) == 1 * 1 + 1  # 32x32 images, /32 -> 1x1 map, mean token
    assert image_tokens(torch.nn.Identity()) is None


def test_zero_shot_head_same_logits_and_gradients_with_either_kernel(monkeypatch):
    from urda_fast.hpt.clip_models import load_clip
    from urda_fast.hpt.zero_shot import ZeroShotClassifier

    torch.manual_seed(0)
    clip, tokenizer = load_clip("urda-tiny-vit", None, torch.device("cpu"))
    clip = use_torch_attention(clip.double())  # torch's attention module: the kernel choice applies to it
    head = ZeroShotClassifier(clip, tokenizer, ["zero", "one", "two"], cache_text=False)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    results = []
    for limit in (attention.MAX_MATH_TOKENS, 0):  # math kernel, then torch's own choice
        monkeypatch.setattr(attention, "MAX_MATH_TOKENS", limit)
        logits = head(x)
        results.append((logits, *torch.autograd.grad(logits.logsumexp(1).sum(), x)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
