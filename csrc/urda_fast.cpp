// The urda_fast operator library: every schema is defined here, once. Backends register their kernels in their own
// files (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA) with TORCH_LIBRARY_IMPL; the Triton backend registers
// separate `*_triton` ops from Python (urda_fast/kernels). Autograd and fake kernels live in urda_fast/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing urda_fast._C runs the static TORCH_LIBRARY initialisers below; no Python bindings are needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(urda_fast, m) {
  // x_adv, grad, x_orig: same shape (B, ...) and dtype, contiguous. step_size, eps: (B,) in the accumulation dtype.
  // lower, upper: (C,) in the accumulation dtype, C = x.size(1) (1 for 1-D x). norm: "linf" or "l2".
  m.def("pgd_step(Tensor x_adv, Tensor grad, Tensor x_orig, Tensor step_size, Tensor eps, Tensor lower, "
        "Tensor upper, str norm) -> Tensor");
  m.def("pgd_step_(Tensor(a!) x_adv, Tensor grad, Tensor x_orig, Tensor step_size, Tensor eps, Tensor lower, "
        "Tensor upper, str norm) -> ()");
  // Row-wise KL(softmax(t/T) || softmax(s/T)) of (B, C) logits: (kl (B,), stats (B, 4) = [max_t, log_sum_t, max_s,
  // log_sum_s]). The backward recomputes the softmaxes from stats, so nothing logits-sized is kept in between; it
  // returns d kl_i / d s_i and d kl_i / d t_i, each scaled by grad_rows[i], or an empty (0,) tensor if not asked for.
  m.def("kd_kl_forward(Tensor student, Tensor teacher, float temperature) -> (Tensor, Tensor)");
  // CPU and CUDA: kd_kl_forward that also writes d kl_i / d s_i and d kl_i / d t_i ((0,) when not asked for) from
  // what it computes anyway, so the backward is a per-row scale (CPU: float32 / float64). row_scale (B,), in the
  // accumulation dtype (the logits' for float32 / float64): the gradients come out multiplied by row_scale[i] (after
  // the unscaled value is rounded), so a backward whose row gradients equal row_scale has nothing left to do.
  m.def("kd_kl_forward_with_grad(Tensor student, Tensor teacher, float temperature, bool grad_student, "
        "bool grad_teacher, Tensor? row_scale=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kd_kl_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor kl, Tensor stats, float temperature, "
        "bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
  // mean((a - b)^2) over all elements of (B, D) inputs, and its gradient w.r.t. a scaled by grad (0-d).
  m.def("feature_mse_forward(Tensor a, Tensor b) -> Tensor");
  m.def("feature_mse_backward(Tensor grad, Tensor a, Tensor b) -> Tensor");
  // Mean row-wise cosine distance of (B, D) inputs: (loss (0-d), stats (B, 3) = [cos, |a|, |b|]; cos, not the
  // dot product, which overflows float32 for rows of norm above ~1e19), and the gradients
  // w.r.t. a and b scaled by grad (0-d).
  m.def("feature_cosine_forward(Tensor a, Tensor b, float eps) -> (Tensor, Tensor)");
  m.def("feature_cosine_backward(Tensor grad, Tensor a, Tensor b, Tensor stats, float eps, bool grad_a, "
        "bool grad_b) -> (Tensor, Tensor)");
  // F.conv2d(x, weight, bias, stride, padding) (no dilation, one group), whose input gradient (registered in Python)
  // is conv2d_input_grad: the gradient w.r.t. the input of a convolution with 1-4 input channels (weight (O, C, kh,
  // kw)), grad_out (N, O, Ho, Wo) contiguous, as a (N, C, input_size) tensor. CPU only: an image model's first layer,
  // which attacks differentiate and oneDNN's transposed convolution handles slowly.
  m.def("conv2d_image_forward(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding) -> Tensor");
  m.def("conv2d_input_grad(Tensor grad_out, Tensor weight, int[2] input_size, int[2] stride, int[2] padding) "
        "-> Tensor");
  // 2-D max pooling of a contiguous (N, C, H, W) tensor, no dilation, floor mode, torch's values and gradients:
  // (out, window_index) where window_index (uint8, out's shape) = kh * kernel_w + kw of the element each window kept.
  // The backward puts grad_out there in a (N, C, input_size) tensor. CPU only: on GPUs torch's pooling is fast.
  m.def("max_pool2d_forward(Tensor x, int[2] kernel, int[2] stride, int[2] padding) -> (Tensor, Tensor)");
  m.def("max_pool2d_backward(Tensor grad_out, Tensor window_index, int[2] input_size, int[2] kernel, int[2] stride, "
        "int[2] padding) -> Tensor");
  // Eval-mode BatchNorm of a contiguous (N, C, *) or channels-last tensor, optionally followed by ReLU: out =
  // relu?(fma(x, scale[c], shift[c])), in x's layout. The backward returns (grad_out * grad_factors[0, c]) *
  // grad_factors[1, c], zero where out <= 0 with ReLU (out, in grad_out's layout, is read only then). CPU only
  // (float32 / float64): torch's eval backward makes two passes over the gradient and the input, and an attack runs
  // it at every step.
  m.def("batch_norm_eval_forward(Tensor x, Tensor scale, Tensor shift, Tensor grad_factors, bool relu) -> Tensor");
  m.def("batch_norm_eval_backward(Tensor grad_out, Tensor out, Tensor grad_factors, bool relu) -> Tensor");
  // Multi-head self-attention from the packed input projection qkv (B, T, 3E) = [q | k | v], E = heads * head_dim (head
  // h at columns h * head_dim of each third, as nn.MultiheadAttention): (out (B, T, E), probs (B, heads, T, T)), out
  // = softmax(q k^T * scale + mask) v per head, heads side by side; mask: an additive (T, T) tensor; a row whose keys
  // are all masked gives probabilities and output 0. The backward returns the gradient w.r.t. qkv (B, T, 3E). CPU
  // only (float32 / float64): for short sequences, where torch's path around the two small matmuls dominates.
  m.def("packed_attention_forward(Tensor qkv, Tensor? mask, int heads, float scale) -> (Tensor, Tensor)");
  m.def("packed_attention_backward(Tensor grad_out, Tensor qkv, Tensor probs, int heads, float scale) -> Tensor");
  // One pre-LayerNorm transformer block (open_clip's ResidualAttentionBlock, batch first): x1 = x + out_proj(attention(
  // in_proj(ln_1(x)))), y = x1 + c_proj(act(c_fc(ln_2(x1)))), weights as torch's modules keep them; activation "gelu",
  // "gelu_tanh" or "quick_gelu". Returns y and what the backward reads: (y, ln1, ln1_mean, ln1_rstd, qkv, attn, probs,
  // x1, ln2, ln2_mean, ln2_rstd, h, act(h)). The backward returns the gradients w.r.t. x and the 12 weights (in the
  // forward's order) where needs[i] != 0, an empty (0,) tensor elsewhere. CPU only (float32 / float64).
  m.def("transformer_block_forward(Tensor x, Tensor ln1_weight, Tensor ln1_bias, Tensor in_weight, Tensor in_bias, "
        "Tensor out_weight, Tensor out_bias, Tensor ln2_weight, Tensor ln2_bias, Tensor fc_weight, Tensor fc_bias, "
        "Tensor proj_weight, Tensor proj_bias, Tensor? mask, int heads, float scale, float ln_eps, str activation) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("transformer_block_backward(Tensor grad_out, Tensor x, Tensor ln1, Tensor ln1_mean, Tensor ln1_rstd, "
        "Tensor qkv, Tensor attn, Tensor probs, Tensor x1, Tensor ln2, Tensor ln2_mean, Tensor ln2_rstd, Tensor h, "
        "Tensor g, Tensor ln1_weight, Tensor ln1_bias, Tensor in_weight, Tensor out_weight, Tensor ln2_weight, "
        "Tensor ln2_bias, Tensor fc_weight, Tensor proj_weight, int heads, float scale, str activation, int[] needs) "
        "-> Tensor[]");
}
