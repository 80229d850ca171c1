"""transformer_block: the CPU kernel against the float64 reference (values and every gradient, for each activation,
with and without a causal mask, odd widths and head sizes, one token, empty and non-contiguous inputs, gradients
asked of any subset of the inputs, NaN), through opcheck and torch.compile; its errors; FastResidualAttentionBlock
against open_clip's block, its fallbacks, and the CLIP models that use it."""

import contextlib
import functools
import copy

import pytest
import torch
import torch.nn as nn

from open_clip.transformer import LayerNormFp32, QuickGELU, ResidualAttentionBlock

import urda_fast.ops as ops
from urda_fast.models import plain_torch, use_fast_attention
from urda_fast.models.transformer import FastResidualAttentionBlock, use_fast_blocks
from urda_fast.ops import BlockWeights, reference

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the CPU extension is not built")

# (batch, tokens, embed, heads, mlp width): the tiny ViT's block (17 tokens, head_dim 16), odd head sizes (5, 3),
# one token, a token count across the attention kernel's 16-token blocks, a single head.
CASES = [(3, 17, 64, 4, 256), (2, 7, 15, 3, 20), (2, 1, 9, 3, 11), (1, 33, 24, 8, 40), (2, 5, 8, 1, 16)]
ACTIVATIONS = ["gelu", "gelu_tanh", "quick_gelu"]


def make_weights(embed, hidden, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    return BlockWeights(rand(embed, scale=0.1, shift=1.0), rand(embed, scale=0.1),
                        rand(3 * embed, embed, scale=embed ** -0.5), rand(3 * embed, scale=0.1),
                        rand(embed, embed, scale=embed ** -0.5), rand(embed, scale=0.1),
                        rand(embed, scale=0.1, shift=1.0), rand(embed, scale=0.1),
                        rand(hidden, embed, scale=embed ** -0.5), rand(hidden, scale=0.5),
                        rand(embed, hidden, scale=hidden ** -0.5), rand(embed, scale=0.1))


def causal_mask(tokens, dtype):
    return torch.full((tokens, tokens), float("-inf"), dtype=dtype).triu(1)


def run(fn, x, weights, grad, needs=None):
    """(output, gradients of output . grad w.r.t. x and the weights that ``needs`` marks; None for the others)."""
    needs = needs or [True] * 13
    inputs = [t.detach().clone().requires_grad_(need) for t, need in zip([x, *weights], needs)]
    out = fn(inputs[0], BlockWeights(*inputs[1:]))
    asked = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(out, asked, grad)) if asked else iter(())
    return out.detach(), [next(grads) if t.requires_grad else None for t in inputs]


def compare(x, weights, heads, mask=None, activation="gelu", needs=None, tolerance=None):
    """Ours (CPU kernel) in x's dtype vs the reference in float64, for one random output gradient."""
    grad = torch.randn(x.shape, dtype=torch.float64)
    got = run(lambda t, w: ops.transformer_block(t, w, heads, mask=mask, activation=activation, backend="cpu"),
              x, weights, grad.to(x.dtype), needs)
    mask64 = None if mask is None else mask.double()
    want = run(lambda t, w: reference.transformer_block(t, w, heads, mask64, 1e-5, activation), x.double(),
               [w.double() for w in weights], grad, needs)
    tolerance = tolerance or (dict(rtol=1e-9, atol=1e-11) if x.dtype == torch.float64 else dict(rtol=1e-4,
                                                                                                   atol=2e-5))
    torch.testing.assert_close(got[0].double(), want[0], equal_nan=True, **tolerance)
    for a, b in zip(got[1], want[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.double(), b, equal_nan=True, **tolerance)
    return got


@pytest.mark.parametrize("batch, tokens, embed, heads, hidden", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(batch, tokens, embed, heads, hidden, dtype, activation):
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, embed, dtype=dtype)
    compare(x, make_weights(embed, hidden, dtype), heads, activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_mask(activation, dtype):
    torch.manual_seed(1)
    x = torch.randn(4, 16, 32, dtype=dtype)  # the text tower's case: a causal mask
    compare(x, make_weights(32, 128, dtype), 4, mask=causal_mask(16, dtype), activation=activation)


@pytest.mark.parametrize("asked", [[0], [11, 12], [7, 8], [1, 2, 3, 4], [5, 6, 9, 10], [0, 12], [3]])
def test_only_the_gradients_asked_for(asked):
    """An attack asks for x's gradient only, a frozen text tower for none, a partly frozen model for some: each
    subset gets the reference's values for what it asked and nothing else."""
    torch.manual_seed(2)
    needs = [i in asked for i in range(13)]
    compare(torch.randn(2, 6, 16, dtype=torch.float64), make_weights(16, 24), 2, needs=needs)


def test_empty_non_contiguous_and_nan_inputs():
    torch.manual_seed(3)
    weights = make_weights(16, 32)
    compare(torch.randn(0, 5, 16, dtype=torch.float64), weights, 4)  # an empty batch
    compare(torch.randn(5, 3, 16, dtype=torch.float64).transpose(0, 1), weights, 4)  # (3, 5, 16), not contiguous
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    x[0, 2, 3] = float("nan")
    out = ops.transformer_block(x, weights, 4, backend="cpu")
    assert out[0].isnan().all()  # the NaN token reaches every token of its sample through the attention...
    torch.testing.assert_close(out[1], reference.transformer_block(x[1:], weights, 4)[0])  # ...and no other sample


def test_float32_gelu_matches_torch_across_its_range():
    """The kernel's own float32 erf against torch's GELU and its derivative, from the far negative tail (where Phi is
    tiny) through 0 to large values: a block of zero input and zero attention whose MLP reads one unit set by the
    bias, so y = gelu(bias) and dy/dbias = gelu'(bias)."""
    for value in torch.linspace(-12, 12, 97).tolist():
        fc_bias = torch.tensor([value], requires_grad=True)
        weights = BlockWeights(torch.ones(2), torch.zeros(2), torch.zeros(6, 2), torch.zeros(6), torch.zeros(2, 2),
                               torch.zeros(2), torch.ones(2), torch.zeros(2), torch.zeros(1, 2), fc_bias,
                               torch.ones(2, 1), torch.zeros(2))
        out = ops.transformer_block(torch.zeros(1, 1, 2), weights, 1, backend="cpu")[0, 0, 0]
        (slope,) = torch.autograd.grad(out, fc_bias)
        h = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        want = torch.nn.functional.gelu(h)
        (want_slope,) = torch.autograd.grad(want, h)
        torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=3e-7)
        torch.testing.assert_close(slope[0].double(), want_slope, rtol=1e-5, atol=3e-7)


def test_opcheck_and_compile():
    torch.manual_seed(4)
    weights = [w.float().requires_grad_(True) for w in make_weights(16, 24)]
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = causal_mask(5, torch.float32)
    for args in [(x, *weights, mask, 2, 0.125, 1e-5, "gelu"), (x, *weights, None, 4, 0.5, 1e-6, "quick_gelu"),
                 (x.detach(), *[w.detach() for w in weights], None, 1, 0.25, 1e-5, "gelu_tanh")]:
        torch.library.opcheck(torch.ops.urda_fast.transformer_block_forward, args)
    saved = torch.ops.urda_fast.transformer_block_forward(x.detach(), *[w.detach() for w in weights], mask, 2, 0.125,
                                                          1e-5, "gelu")
    w = [t.detach() for t in weights]
    backward_args = (torch.randn(2, 5, 16), x.detach(), *saved[1:], w[0], w[1], w[2], w[4], w[6], w[7], w[8], w[10],
                     2, 0.125, "gelu")
    for needs in ([1] * 13, [1] + [0] * 12, [0, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1]):
        torch.library.opcheck(torch.ops.urda_fast.transformer_block_backward, (*backward_args, needs))

    def loss(t, *ws):
        return ops.transformer_block(t, ws, 2, mask=mask).square().sum()

    eager = torch.autograd.grad(loss(x, *weights), [x, *weights])
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, *weights), [x, *weights])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_saved_outputs_are_not_differentiable_and_no_second_derivative():
    weights = [w.requires_grad_(True) for w in make_weights(8, 8)]
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    out = torch.ops.urda_fast.transformer_block_forward(x, *weights, None, 2, 0.5, 1e-5, "gelu")
    assert out[0].requires_grad and not any(t.requires_grad for t in out[1:])
    (grad,) = torch.autograd.grad(out[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad.sum().backward()
    y = ops.transformer_block(x, weights, 2, backend="reference")  # the reference has one
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    grad.sum().backward()


def test_dispatch(monkeypatch):
    weights = make_weights(8, 8, torch.float32)
    x = torch.randn(2, 3, 8)
    want = reference.transformer_block(x, weights, 2)
    for backend in (None, "cpu", "reference"):
        torch.testing.assert_close(ops.transformer_block(x, weights, 2, backend=backend), want)
    half = ops.transformer_block(x.bfloat16(), [w.bfloat16() for w in weights], 2)  # the reference's
    torch.testing.assert_close(half.float(), want, rtol=0.05, atol=0.05)
    monkeypatch.setenv("URDA_FAST_BACKEND", "reference")
    torch.testing.assert_close(ops.transformer_block(x, weights, 2), want)
    monkeypatch.setenv("URDA_FAST_BACKEND", "cpuu")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.transformer_block(x, weights, 2)


def _weights_with(name, value):
    weights = make_weights(8, 12, torch.float32)
    return weights._replace(**{name: value})


@pytest.mark.parametrize("call, error, match", [
    (lambda x, w: ops.transformer_block(x[0], w, 2), ValueError, r"\(B, T, E\)"),
    (lambda x, w: ops.transformer_block(x, w, 3), ValueError, "heads must be a positive int dividing"),
    (lambda x, w: ops.transformer_block(x, w, True), ValueError, "heads"),
    (lambda x, w: ops.transformer_block(x, w[:11], 2), ValueError, "takes 12 weights"),
    (lambda x, w: ops.transformer_block(x, _weights_with("in_weight", torch.zeros(8, 8)), 2), ValueError,
     r"in_weight must have shape \(24, 8\)"),
    (lambda x, w: ops.transformer_block(x, _weights_with("proj_weight", torch.zeros(8, 11)), 2), ValueError,
     r"proj_weight must have shape \(8, 12\)"),
    (lambda x, w: ops.transformer_block(x, _weights_with("fc_bias", torch.zeros(12).double()), 2), TypeError,
     "fc_bias is torch.float64"),
    (lambda x, w: ops.transformer_block(x.long(), w, 2), TypeError, "floating-point"),
    (lambda x, w: ops.transformer_block(x, w, 2, mask=torch.zeros(3, 4)), ValueError, r"mask must be \(3, 3\)"),
    (lambda x, w: ops.transformer_block(x, w, 2, mask=torch.zeros(3, 3, requires_grad=True)), ValueError,
     "requires grad"),
    (lambda x, w: ops.transformer_block(x, w, 2, ln_eps=0.0), ValueError, "ln_eps must be a positive"),
    (lambda x, w: ops.transformer_block(x, w, 2, activation="relu"), ValueError, "activation must be one of"),
    (lambda x, w: ops.transformer_block(x.half(), [t.half() for t in w], 2, backend="cpu"), TypeError,
     "float32 or float64"),
    (lambda x, w: ops.transformer_block(x, w, 2, backend="cuda"), ValueError, "no 'cuda' kernel"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 8), make_weights(8, 12, torch.float32))


def test_the_kernel_checks_direct_calls():
    w = make_weights(8, 12, torch.float32)
    with pytest.raises(RuntimeError, match="fc_bias must be a \\(12,\\)"):
        torch.ops.urda_fast.transformer_block_forward(torch.randn(2, 3, 8), *w[:9], torch.zeros(5), *w[10:], None, 2,
                                                      0.5, 1e-5, "gelu")
    with pytest.raises(RuntimeError, match="activation must be gelu"):
        torch.ops.urda_fast.transformer_block_forward(torch.randn(2, 3, 8), *w, None, 2, 0.5, 1e-5, "relu")
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.urda_fast.transformer_block_forward(torch.randn(3, 2, 8).transpose(0, 1), *w, None, 2, 0.5, 1e-5,
                                                      "gelu")


# FastResidualAttentionBlock ------------------------------------------------------------------------------------------


def block_twins(width=32, heads=4, **kwargs):
    torch.manual_seed(6)
    block = ResidualAttentionBlock(width, heads, **kwargs).double()
    for p in block.parameters():  # LayerNorm's ones/zeros and zero biases would hide mistakes
        p.data.add_(torch.randn_like(p) * 0.1)
    return block, use_fast_blocks(use_fast_attention(copy.deepcopy(block)))


def block_forward_and_grads(block, x, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out = block(x, **kwargs)
    return out, torch.autograd.grad(out.square().sum(), [x] + list(block.parameters()))


def fused_block_calls(fn):
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "urda_fast::transformer_block_forward")


def assert_fused_block_matches(block, fast, x, attn_mask):
    """The fast block runs the fused op once and gives open_clip's block's output and gradients."""
    want = block_forward_and_grads(block, x, attn_mask=attn_mask)
    assert fused_block_calls(lambda: block_forward_and_grads(fast, x, attn_mask=attn_mask)) == 1
    got = block_forward_and_grads(fast, x, attn_mask=attn_mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("act_layer, mask", [(nn.GELU, None), (nn.GELU, "causal"), (QuickGELU, None),
                                             (lambda: nn.GELU(approximate="tanh"), "causal")])
def test_block_matches_open_clip(act_layer, mask):
    block, fast = block_twins(act_layer=act_layer)
    assert type(fast) is FastResidualAttentionBlock
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    attn_mask = causal_mask(9, torch.float64) if mask else None
    assert_fused_block_matches(block, fast, x, attn_mask)


@pytest.mark.parametrize("case", ["layer_scale", "hook", "global_hook", "autocast", "fp32_norm", "bfloat16",
                                  "batch_second", "torch_attention", "eps", "dropout", "cross_attention",
                                  "no_in_proj_bias", "instance_forward"])
def test_block_falls_back_to_open_clip(case):
    kwargs = {"ls_init_value": 0.5} if case == "layer_scale" else {}
    if case == "fp32_norm":  # float32 input: LayerNormFp32 of float64 fails in open_clip's own block
        kwargs["norm_layer"] = LayerNormFp32
    if case == "batch_second":
        kwargs["batch_first"] = False
    if case == "cross_attention":
        kwargs["is_cross_attention"] = True
    block, fast = block_twins(**kwargs)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    call = {}
    seen = []
    if case == "hook":
        for module in (block, fast):
            module.mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    if case == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    if case == "torch_attention":
        fast.attn.__class__ = nn.MultiheadAttention
    if case == "eps":
        fast.ln_2.eps = block.ln_2.eps = 1e-6
    if case == "instance_forward":  # a forward replaced on one submodule: the fused op would skip it
        for module in (block, fast):
            module.mlp.c_fc.forward = functools.partial(lambda lin, t: nn.functional.linear(t, lin.weight) * 0.5,
                                                        module.mlp.c_fc)
    if case == "no_in_proj_bias":  # torch's attention takes it; the op has no bias-free input projection
        fast.attn.in_proj_bias = block.attn.in_proj_bias = None
    if case == "dropout":
        fast.attn.dropout = block.attn.dropout = 0.1
        fast.train()
        block.train()
    if case == "cross_attention":
        call = {"k_x": x.clone(), "v_x": x.clone()}
    if case == "batch_second":
        x = x.transpose(0, 1).contiguous()
    if case in ("autocast", "bfloat16", "fp32_norm"):
        block, fast, x = block.float(), fast.float(), x.float()
    if case == "bfloat16":
        block, fast, x = block.bfloat16(), fast.bfloat16(), x.bfloat16()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else contextlib.nullcontext()
    try:
        with context:
            torch.manual_seed(0)
            want = block(x, **call)
            torch.manual_seed(0)
            assert fused_block_calls(lambda: fast(x, **call)) == 0
            torch.manual_seed(0)
            got = fast(x, **call)
    finally:
        if case == "global_hook":
            handle.remove()
    torch.testing.assert_close(got, want)
    if case == "hook":
        assert len(seen) == 3  # block once, fast twice (under the profiler, then plain): the hook ran every time


def test_block_swap_keeps_state_reverts_and_compiles():
    block, fast = block_twins()
    assert fast.state_dict().keys() == block.state_dict().keys()
    for a, b in zip(fast.state_dict().values(), block.state_dict().values()):
        assert torch.equal(a, b)
    assert type(plain_torch(copy.deepcopy(fast))) is ResidualAttentionBlock
    fast.float().requires_grad_(False)
    x = torch.randn(2, 9, 32, requires_grad=True)
    (want,) = torch.autograd.grad(fast(x).square().sum(), x)
    (got,) = torch.autograd.grad(torch.compile(lambda t: fast(t).square().sum(), fullgraph=True)(x), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Traced through open_clip's forward: its modules as nodes (the optional inputs fixed, as open_clip's own block
    # needs them).
    traced = torch.fx.symbolic_trace(fast, concrete_args={"k_x": None, "v_x": None, "attn_mask": None})
    assert any(node.op == "call_module" and node.target == "mlp.c_fc" for node in traced.graph.nodes)
    torch.testing.assert_close(traced(x.detach()), fast(x.detach()))


def test_block_under_torch_func_and_gradient_checkpointing():
    block, fast = block_twins()
    x = torch.randn(3, 4, 32, dtype=torch.float64)
    want = torch.func.grad(lambda t: block(t).square().sum())(x)  # torch.func runs open_clip's forward
    torch.testing.assert_close(torch.func.grad(lambda t: fast(t).square().sum())(x), want)
    x = x.requires_grad_(True)
    out = torch.utils.checkpoint.checkpoint(fast, x, use_reentrant=False)  # the op recomputed in the backward
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0], want)


def test_clip_models_fuse_their_blocks_and_compute_the_same():
    from urda_fast.hpt.clip_models import load_clip

    clip, tokenizer = load_clip("urda-tiny-vit", None, torch.device("cpu"))
    clip = clip.double()
    twin = plain_torch(copy.deepcopy(clip))
    assert sum(type(m) is FastResidualAttentionBlock for m in clip.modules()) == 5  # 3 image + 2 text blocks
    assert not any(type(m) is FastResidualAttentionBlock for m in twin.modules())
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    tokens = tokenizer(["a photo of the number seven", "two"])
    results = []
    for model in (clip, twin):
        x = images.clone().requires_grad_(True)
        features, text = model.encode_image(x), model.encode_text(tokens)
        loss = features.square().sum() + (features @ text.T).sum()
        # allow_unused: logit_scale is not part of either encoding
        results.append((features, text, *torch.autograd.grad(loss, [x, *model.parameters()], allow_unused=True)))
    assert fused_block_calls(lambda: (clip.encode_image(images), clip.encode_text(tokens))) == 5
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_the_backward_kernel_checks_the_saved_pre_activation():
    w = make_weights(8, 12, torch.float32)
    x = torch.randn(2, 3, 8)
    saved = list(torch.ops.urda_fast.transformer_block_forward(x, *w, None, 2, 0.5, 1e-5, "gelu")[1:])
    saved[10] = saved[10][:4]  # h: 4 of its 6 rows
    with pytest.raises(RuntimeError, match="saved pre-activation h"):
        torch.ops.urda_fast.transformer_block_backward(torch.randn(2, 3, 8), x, *saved, w[0], w[1], w[2], w[4], w[6],
                                                       w[7], w[8], w[10], 2, 0.5, "gelu", [1] + [0] * 12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_strided_mlp_bias(activation):
    """A c_fc bias that is a strided view (a parameter sliced out of a larger tensor): the GELU pass read it as a
    dense row and took other columns' values, silently."""
    torch.manual_seed(7)
    weights = list(make_weights(16, 24))
    weights[9] = weights[9].repeat_interleave(2)[::2].requires_grad_(True)  # same values, stride 2
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    got = ops.transformer_block(x, weights, 4, activation=activation, backend="cpu")
    got_grads = torch.autograd.grad(got.square().sum(), [x, weights[9]])
    dense = [w.detach().contiguous().requires_grad_(True) for w in weights]
    want = reference.transformer_block(x, dense, 4, None, 1e-5, activation)
    want_grads = torch.autograd.grad(want.square().sum(), [x, dense[9]])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_strided_mask():
    """A mask sliced out of a longer causal mask (open_clip's text tower keeps one for its full context): it failed
    inside the attention kernel, which reads a dense (T, T) block."""
    torch.manual_seed(8)
    mask = causal_mask(9, torch.float64)[:6, :6]
    assert not mask.is_contiguous()
    compare(torch.randn(2, 6, 16, dtype=torch.float64), make_weights(16, 24), 4, mask=mask)


@pytest.mark.parametrize("mask", ["bool", "sliced", "transposed"])
def test_block_takes_masks_as_open_clip_does(mask):
    """open_clip's block casts attn_mask to the input's dtype before its attention: a bool mask is an additive 0 / 1
    there, not torch's True = masked (the fused block masked those keys out: other values); and a mask that is a view
    of another (a slice of a longer causal mask) works there (the fused block failed inside the kernel)."""
    block, fast = block_twins()
    x = torch.randn(3, 6, 32, dtype=torch.float64)
    attn_mask = {"bool": lambda: torch.ones(6, 6, dtype=torch.bool).triu(1),
                 "sliced": lambda: causal_mask(9, torch.float64)[:6, :6],
                 "transposed": lambda: torch.randn(6, 6, dtype=torch.float64).t()}[mask]()
    assert_fused_block_matches(block, fast, x, attn_mask)
