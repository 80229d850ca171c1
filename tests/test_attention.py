"""packed_self_attention: the CPU kernel against the float64 reference (values and gradients; odd head sizes, token
counts across the padding blocks, one token, empty inputs, masks, fully masked rows, NaN), through opcheck and
torch.compile; its errors; FastMultiheadAttention against nn.MultiheadAttention, its fallbacks, and the CLIP models
(fused blocks, or this attention inside hooked blocks)."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import urda_fast.ops as ops
from urda_fast.models import FastMultiheadAttention, use_fast_attention, use_torch_attention
from urda_fast.ops import reference

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the CPU extension is not built")

# (batch, tokens, embed, heads): head_dim 16 (the tiny ViT), 8, 4 and 3 (each head-block width of the kernel: 16,
# 8, 1), 24 (8-wide blocks, 3 of them); tokens below, at and across the 16-token padding blocks and the 4-row blocks.
CASES = [(3, 17, 64, 4), (2, 16, 16, 2), (2, 5, 12, 3), (2, 1, 9, 3), (1, 33, 48, 2), (2, 6, 32, 1), (1, 40, 16, 2)]


def causal_mask(tokens, dtype):
    return torch.full((tokens, tokens), float("-inf"), dtype=dtype).triu(1)


def run(fn, qkv, grad):
    """(output, d output . grad / d qkv) of fn(qkv)."""
    qkv = qkv.detach().clone().requires_grad_(True)
    out = fn(qkv)
    (g,) = torch.autograd.grad(out, qkv, grad)
    return out.detach(), g


def compare(qkv, heads, mask=None, scale=None, tolerance=None):
    """Ours (CPU kernel) in qkv's dtype vs the reference in float64, for one random output gradient."""
    batch, tokens, packed = qkv.shape
    grad = torch.randn(batch, tokens, packed // 3, dtype=torch.float64)
    got = run(lambda t: ops.packed_self_attention(t, heads, mask=mask, scale=scale, backend="cpu"), qkv,
              grad.to(qkv.dtype))
    mask64 = None if mask is None else mask.double()
    want = run(lambda t: reference.packed_self_attention(t, heads, mask64, scale), qkv.double(), grad)
    tolerance = tolerance or (dict(rtol=1e-10, atol=1e-12) if qkv.dtype == torch.float64 else dict(rtol=1e-4,
                                                                                                       atol=1e-5))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, equal_nan=True, **tolerance)
    return got


@pytest.mark.parametrize("batch, tokens, embed, heads", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(batch, tokens, embed, heads, dtype):
    torch.manual_seed(0)
    compare(torch.randn(batch, tokens, 3 * embed, dtype=dtype), heads)


@pytest.mark.parametrize("batch, tokens, embed, heads", CASES[:4])
def test_masks_and_scale(batch, tokens, embed, heads):
    torch.manual_seed(1)
    qkv = torch.randn(batch, tokens, 3 * embed, dtype=torch.float64)
    compare(qkv, heads, mask=causal_mask(tokens, torch.float64))
    compare(qkv, heads, mask=torch.randn(tokens, tokens, dtype=torch.float64), scale=0.3)


@pytest.mark.parametrize("row", [2, 5])  # in a block of 4 query rows, and in the rows after the last block
def test_fully_masked_query_gets_zero_output_and_finite_gradients(row):
    """torch's safe softmax: a query that may attend no key outputs 0 and passes no gradient (not NaN)."""
    tokens = 6
    mask = causal_mask(tokens, torch.float32)
    mask[row] = float("-inf")
    qkv = torch.randn(2, tokens, 3 * 8)
    out, grad = compare(qkv, 2, mask=mask)
    assert torch.equal(out[:, row], torch.zeros_like(out[:, row]))
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[:, row, :8], torch.zeros_like(grad[:, row, :8]))  # that query's q gets no gradient


def test_large_logits_are_stable_and_nan_propagates():
    torch.manual_seed(2)
    qkv = torch.randn(2, 9, 3 * 16) * 40  # scores of several hundred: exp would overflow without the max shift
    out, grad = compare(qkv, 2, tolerance=dict(rtol=1e-3, atol=1e-3))
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    for query in (3, 4):  # the last row of a block of 4 query rows; the row after it
        qkv = torch.randn(1, 5, 3 * 8)
        qkv[0, query, 0] = float("nan")  # a query of head 0
        out = ops.packed_self_attention(qkv, 2, backend="cpu")
        others = [t for t in range(5) if t != query]
        assert torch.isnan(out[0, query, :4]).all() and torch.isfinite(out[0, others]).all()
        assert torch.isfinite(out[0, query, 4:]).all()
    qkv = torch.randn(1, 5, 3 * 8)
    qkv[0, 1, 8 + 4] = float("nan")  # key 1 of head 1: every query of head 1 sees it
    out = ops.packed_self_attention(qkv, 2, backend="cpu")
    assert torch.isnan(out[0, :, 4:]).all() and torch.isfinite(out[0, :, :4]).all()


@pytest.mark.parametrize("tokens", [3, 16, 17])  # padded to 16 / exact / padded to 32
def test_an_infinite_query_whose_scores_are_all_minus_inf_gets_zero(tokens):
    """q = (inf, 0) against keys whose first channel is negative: every real score is -inf, a fully masked row (0,
    as torch's safe softmax). The padding columns scored q . 0 = inf * 0 = NaN, which made the row NaN."""
    qkv = torch.randn(1, tokens, 3 * 2, dtype=torch.float64)
    qkv[0, 0, 0], qkv[0, 0, 1] = float("inf"), 0.0
    qkv[0, :, 2] = -1.0  # k channel 0
    out = ops.packed_self_attention(qkv, 1, backend="cpu")
    want = reference.packed_self_attention(qkv, 1)
    assert torch.equal(want[0, 0], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_empty_and_non_contiguous_inputs():
    for shape in [(0, 5, 24), (3, 0, 24)]:
        qkv = torch.randn(shape, requires_grad=True)
        out = ops.packed_self_attention(qkv, 2, backend="cpu")
        assert out.shape == (shape[0], shape[1], 8)
        out.sum().backward()
        assert qkv.grad.shape == shape
    torch.manual_seed(3)
    base = torch.randn(7, 4, 3 * 16, dtype=torch.float64)
    compare(base.transpose(0, 1), 4)  # (4, 7, 48), not contiguous
    compare(torch.randn(2, 5, 3 * 32, dtype=torch.float64)[:, :, ::2], 2)  # strided last dimension


def test_opcheck_and_compile():
    torch.manual_seed(4)
    qkv = torch.randn(2, 17, 3 * 16, requires_grad=True)
    mask = causal_mask(17, torch.float32)
    out, probs = torch.ops.urda_fast.packed_attention_forward(qkv.detach(), mask, 2, 0.25)
    torch.library.opcheck(torch.ops.urda_fast.packed_attention_forward, (qkv, mask, 2, 0.25))
    torch.library.opcheck(torch.ops.urda_fast.packed_attention_forward, (qkv, None, 4, 0.5))
    torch.library.opcheck(torch.ops.urda_fast.packed_attention_backward,
                          (torch.randn(2, 17, 16), qkv.detach(), probs, 2, 0.25))

    def loss(t):
        return ops.packed_self_attention(t, 2, mask=mask).square().sum()

    eager = torch.autograd.grad(loss(qkv), qkv)[0]
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(qkv), qkv)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_the_kept_probabilities_are_not_differentiable():
    """The op's second output is the backward's: it carries no gradient (and autograd fills none for it)."""
    qkv = torch.randn(2, 5, 3 * 8, requires_grad=True)
    out, probs = torch.ops.urda_fast.packed_attention_forward(qkv, None, 2, 0.5)
    assert out.requires_grad and not probs.requires_grad
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))


def test_no_second_derivative_on_the_kernel_says_so():
    qkv = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ops.packed_self_attention(qkv, 2).sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative.*backend='reference'"):
        g.sum().backward()
    (g,) = torch.autograd.grad(ops.packed_self_attention(qkv, 2, backend="reference").sum(), qkv, create_graph=True)
    g.square().sum().backward()  # the reference is differentiable twice
    assert torch.isfinite(qkv.grad).all()


def test_dispatch():
    qkv = torch.randn(2, 3, 12)
    assert "packed_attention" in type(ops.packed_self_attention(qkv.requires_grad_(), 2).grad_fn).__name__
    half = ops.packed_self_attention(qkv.detach().bfloat16(), 2)  # no kernel for bfloat16: the reference
    torch.testing.assert_close(half.float(), reference.packed_self_attention(qkv.detach(), 2), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("call, error, match", [
    (lambda q: ops.packed_self_attention(q, 5), ValueError, r"3 \* heads \* head_dim"),
    (lambda q: ops.packed_self_attention(q[..., :0], 2), ValueError, r"3 \* heads \* head_dim"),
    (lambda q: ops.packed_self_attention(q, 0), ValueError, "positive int"),
    (lambda q: ops.packed_self_attention(q[0], 2), ValueError, r"\(B, T, 3 \* heads"),
    (lambda q: ops.packed_self_attention(q.long(), 2), TypeError, "floating-point"),
    (lambda q: ops.packed_self_attention(q, 2, scale=float("nan")), ValueError, "scale must be finite"),
    (lambda q: ops.packed_self_attention(q, 2, mask=torch.zeros(3, 3, dtype=torch.bool)), TypeError, "additive"),
    (lambda q: ops.packed_self_attention(q, 2, mask=torch.zeros(4, 4)), ValueError, r"\(3, 3\)"),
    (lambda q: ops.packed_self_attention(q, 2, mask=torch.zeros(3, 3, requires_grad=True)), ValueError,
     "mask.detach"),
    (lambda q: ops.packed_self_attention(q, 2, backend="cuda"), ValueError, "no 'cuda' kernel"),
    (lambda q: ops.packed_self_attention(q.bfloat16(), 2, backend="cpu"), TypeError, "float32 or float64"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 12))


def test_the_kernel_checks_direct_calls():
    with pytest.raises(RuntimeError, match="3 \\* heads \\* head_dim"):
        torch.ops.urda_fast.packed_attention_forward(torch.randn(2, 3, 12), None, 5, 1.0)
    with pytest.raises(RuntimeError, match="mask must be a contiguous"):
        torch.ops.urda_fast.packed_attention_forward(torch.randn(2, 3, 12), torch.zeros(2, 2), 2, 1.0)
    with pytest.raises(RuntimeError, match="probs must be"):
        torch.ops.urda_fast.packed_attention_backward(torch.randn(2, 3, 4), torch.randn(2, 3, 12),
                                                      torch.randn(2, 2, 3), 2, 1.0)


# ---- FastMultiheadAttention ----

def twins(embed=32, heads=4, batch_first=True, **kwargs):
    torch.manual_seed(5)
    torch_mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first, **kwargs).double()
    return torch_mha, use_fast_attention(copy.deepcopy(torch_mha))


def forward_and_grads(module, x, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out, weights = module(x, x, x, **kwargs)
    grads = torch.autograd.grad(out.square().sum(), [x] + list(module.parameters()))
    return out, weights, grads


def fused_calls(fn):
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "urda_fast::packed_attention_forward")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_module_matches_torch(batch_first, mask):
    torch_mha, fast = twins(batch_first=batch_first)
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    attn_mask = {None: None, "bool": torch.ones(9, 9, dtype=torch.bool).triu(1),
                 "float": torch.randn(9, 9, dtype=torch.float64)}[mask]
    want = forward_and_grads(torch_mha, x, need_weights=False, attn_mask=attn_mask)
    assert fused_calls(lambda: forward_and_grads(fast, x, need_weights=False, attn_mask=attn_mask)) == 1
    got = forward_and_grads(fast, x, need_weights=False, attn_mask=attn_mask)
    assert got[1] is None
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("case", ["need_weights", "key_padding_mask", "cross_attention", "dropout", "bfloat16",
                                  "autocast", "too_long", "too_much_memory", "is_causal"])
def test_module_falls_back_to_torch(case, monkeypatch):
    torch_mha, fast = twins(dropout=0.5 if case == "dropout" else 0.0)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    query, kwargs = x, {"need_weights": case == "need_weights"}
    if case == "key_padding_mask":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 4 + [True]] * 2)
    if case == "is_causal":
        kwargs["is_causal"] = True
    if case == "too_long":
        monkeypatch.setattr("urda_fast.models.attention.MAX_FUSED_TOKENS", 4)
    if case == "too_much_memory":  # 2 samples x 4 heads x 5 x 5 float64 probabilities: 1600 bytes
        monkeypatch.setattr("urda_fast.models.attention.MAX_PROBS_BYTES", 1599)
    if case == "bfloat16":
        torch_mha, fast, x = torch_mha.bfloat16(), fast.bfloat16(), x.bfloat16()
        query = x
    if case == "cross_attention":
        query = x[:, :3].clone()
    torch_mha.train(case == "dropout")
    fast.train(case == "dropout")
    if case == "is_causal":  # torch's module needs the mask itself with is_causal: both fail alike
        for module in (torch_mha, fast):
            with pytest.raises(RuntimeError, match="attn_mask"):
                module(query, x, x, **kwargs)
        return
    if case == "autocast":
        torch_mha, fast, x = torch_mha.float(), fast.float(), x.float()
        query = x
    context = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else contextlib.nullcontext()
    with context:
        torch.manual_seed(0)
        want = torch_mha(query, x, x, **kwargs)
        torch.manual_seed(0)
        assert fused_calls(lambda: fast(query, x, x, **kwargs)) == 0
        torch.manual_seed(0)
        got = fast(query, x, x, **kwargs)
    torch.testing.assert_close(got[0], want[0])
    assert (got[1] is None) == (want[1] is None)


def test_module_swap_keeps_state_and_reverts():
    torch_mha, fast = twins()
    assert type(fast) is FastMultiheadAttention and fast.state_dict().keys() == torch_mha.state_dict().keys()
    for a, b in zip(fast.state_dict().values(), torch_mha.state_dict().values()):
        assert torch.equal(a, b)
    assert type(use_torch_attention(fast)) is nn.MultiheadAttention


def op_calls(fn, *names):
    with torch.profiler.profile() as prof:
        fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return [counts.get(f"urda_fast::{name}", 0) for name in names]


@pytest.mark.parametrize("path", ["fused-blocks", "hooked-blocks"])
@pytest.mark.parametrize("arch", ["urda-tiny-vit", "urda-tiny-rn"])
def test_clip_models_run_fused_blocks_or_this_attention_and_compute_the_same(arch, path):
    """load_clip's models run each transformer block (ViT image tower, text tower) as one transformer_block op that
    computes the attention itself, so this module's fused op runs in none of them (the ResNet's attention pool is
    open_clip's F.multi_head_attention_forward, not an nn.MultiheadAttention). A block with a hook on a submodule
    runs open_clip's forward, whose attention is this module's fused op: one call per block (the text tower's causal
    mask included). Either way the values and input gradients are the plain-PyTorch twin's."""
    pytest.importorskip("open_clip")
    from urda_fast.hpt.clip_models import load_clip
    from urda_fast.models import plain_torch
    from urda_fast.models.transformer import FastResidualAttentionBlock

    clip, tokenizer = load_clip(arch, None, torch.device("cpu"))
    clip = clip.double()
    twin = plain_torch(copy.deepcopy(clip))
    blocks = [m for m in clip.modules() if isinstance(m, FastResidualAttentionBlock)]
    assert len(blocks) == {"urda-tiny-vit": 5, "urda-tiny-rn": 2}[arch]  # (3 image +) 2 text blocks
    assert sum(isinstance(m, FastMultiheadAttention) for m in clip.modules()) == len(blocks)
    assert all(isinstance(b.attn, FastMultiheadAttention) for b in blocks)
    assert not any(isinstance(m, FastMultiheadAttention) for m in twin.modules())
    if path == "hooked-blocks":  # a feature extractor's hook, say: the block's op would skip it
        for block in blocks:
            block.mlp.register_forward_hook(lambda module, args, out: None)
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    tokens = tokenizer(["a photo of the number seven", "two"])
    results = []

    def forward_and_grad(model):
        x = images.clone().requires_grad_(True)
        features = model.encode_image(x)
        text = model.encode_text(tokens)
        results.append((features, text, *torch.autograd.grad(features.square().sum(), x)))

    blocks_run, attention_run = op_calls(lambda: forward_and_grad(clip), "transformer_block_forward",
                                         "packed_attention_forward")
    assert (blocks_run, attention_run) == ((len(blocks), 0) if path == "fused-blocks" else (0, len(blocks)))
    assert op_calls(lambda: forward_and_grad(twin), "transformer_block_forward", "packed_attention_forward") == [0, 0]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_module_compiles_fullgraph():
    _, fast = twins()
    fast.float().requires_grad_(False)
    x = torch.randn(2, 9, 32, requires_grad=True)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)

    def loss(t):
        return fast(t, t, t, need_weights=False, attn_mask=mask)[0].square().sum()

    (want,) = torch.autograd.grad(loss(x), x)
    (got,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_fx_traces_it_as_a_leaf_like_torchs_module(monkeypatch):
    """torch.fx (feature extractors, quantisation) records the module as one call_module node, as it does torch's
    own (a leaf by its torch.nn namespace); traced through, its checks failed on the tracer's Proxy. The traced graph
    runs the module, fast path included."""
    import torch.fx

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    torch_model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4, batch_first=True), "mlp": block})

    class Model(nn.Module):
        def __init__(self, parts):
            super().__init__()
            self.parts = parts

        def forward(self, x):
            return self.parts["mlp"](self.parts["attn"](x, x, x, need_weights=False)[0])

    model = Model(use_fast_attention(copy.deepcopy(torch_model)))
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["parts.attn", "parts.mlp.0",
                                                                             "parts.mlp.1"]
    calls, fused = [], ops.packed_self_attention
    monkeypatch.setattr(ops, "packed_self_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(traced(x), Model(torch_model)(x), rtol=1e-5, atol=1e-6)
    assert calls == [1]  # the fused path ran inside the traced graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tensors_take_torch_attention():
    """No GPU kernel: the op runs its reference on CUDA tensors (backend='cpu' says why not), and the module runs
    torch's own attention there."""
    torch.manual_seed(6)
    qkv = torch.randn(2, 9, 3 * 32, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(ops.packed_self_attention(qkv, 4), reference.packed_self_attention(qkv, 4))
    with pytest.raises(ValueError, match="CPU tensors only"):
        ops.packed_self_attention(qkv, 4, backend="cpu")
    torch_mha, fast = (m.cuda() for m in twins())
    x = torch.randn(3, 9, 32, dtype=torch.float64, device="cuda")
    assert fused_calls(lambda: fast(x, x, x, need_weights=False)) == 0
    torch.testing.assert_close(fast(x, x, x, need_weights=False)[0], torch_mha(x, x, x, need_weights=False)[0])
