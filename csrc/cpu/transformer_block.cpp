// One pre-LayerNorm transformer block (open_clip's ResidualAttentionBlock: CLIP's image and text towers) on CPU, as
// one op forward and one backward:
//   x1 = x + out_proj(attention(in_proj(ln_1(x))));   y = x1 + c_proj(act(c_fc(ln_2(x1))))
// For the 17 tokens of a small ViT, the block's Python modules, their ~40 autograd nodes and their separate
// elementwise passes (the bias copies of addmm, the residual adds) cost as much as its matmuls. Here the residual and
// the bias go into one pass that the matmul then accumulates into, the attention is the packed kernel
// (attention.cpp), and the backward computes only the gradients asked for: an attack's input gradient skips every
// weight gradient and bias reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common.h"
#include "attention.h"
#include "cpu_math.h"

namespace urda_fast {
namespace {

// The MLP's activation: nn.GELU (erf), nn.GELU(approximate="tanh"), open_clip's QuickGELU (x * sigmoid(1.702 x)).
enum class Activation { kGelu, kGeluTanh, kQuickGelu };

Activation parse_activation(c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(name == "quick_gelu", "urda_fast: transformer_block's activation must be gelu, gelu_tanh or quick_gelu, "
              "got ", std::string(name));
  return Activation::kQuickGelu;
}

constexpr double kQuickGeluScale = 1.702;
// About 16k elements per task of the elementwise passes below.
constexpr int64_t kGrain = 16384;

// h += bias (per column, in place: the backward reads the pre-activation) and out = gelu(h), for a (rows, cols) h
// that a matmul just wrote: one pass instead of addmm's bias copy and torch's GELU pass.
template <typename scalar_t>
URDA_FAST_CLONES void bias_gelu_rows(scalar_t* __restrict__ h, const scalar_t* __restrict__ bias,
                                     scalar_t* __restrict__ out, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* __restrict__ h_row = h + r * cols;
    scalar_t* __restrict__ out_row = out + r * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const scalar_t v = h_row[j] + bias[j];
      scalar_t cdf, pdf;
      normal_cdf_pdf(v, cdf, pdf);
      h_row[j] = v;
      out_row[j] = v * cdf;
    }
  }
}

// grad *= gelu'(h) = Phi(h) + h phi(h), in place.
template <typename scalar_t>
URDA_FAST_CLONES void gelu_backward_inplace(scalar_t* __restrict__ grad, const scalar_t* __restrict__ h, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    scalar_t cdf, pdf;
    normal_cdf_pdf(h[j], cdf, pdf);
    grad[j] *= cdf + h[j] * pdf;
  }
}

// (h, act(h)) with h = in @ weight^T + bias, in (N, E) and weight (F, E).
std::tuple<at::Tensor, at::Tensor> linear_activation(const at::Tensor& in, const at::Tensor& weight,
                                                     const at::Tensor& bias, Activation act) {
  if (act != Activation::kGelu) {
    auto h = at::addmm(bias, in, weight.t());
    if (act == Activation::kGeluTanh) return {h, at::gelu(h, "tanh")};
    return {h, h * at::sigmoid(h * kQuickGeluScale)};
  }
  auto h = at::mm(in, weight.t());
  auto out = at::empty_like(h);
  const int64_t cols = h.size(1);
  // The pass below reads the bias as a dense row: a strided one (a view, a parameter sliced from a larger tensor)
  // would give other columns' values.
  const auto dense_bias = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "urda_fast::bias_gelu", [&] {
    scalar_t* h_data = h.mutable_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const scalar_t* bias_data = dense_bias.const_data_ptr<scalar_t>();
    at::parallel_for(0, h.size(0), std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
                       bias_gelu_rows(h_data + begin * cols, bias_data, out_data + begin * cols, end - begin, cols);
                     });
  });
  return {h, out};
}

// d act(h) / d h times grad, written over grad (a fresh matmul output).
at::Tensor activation_backward(at::Tensor grad, const at::Tensor& h, Activation act) {
  switch (act) {
    case Activation::kGelu:
      // A direct call's saved h must match, or the pass below would read or write past one of them.
      TORCH_CHECK(h.sizes() == grad.sizes() && h.is_contiguous() && grad.is_contiguous() &&
                      h.scalar_type() == grad.scalar_type(),
                  "urda_fast: transformer_block's saved pre-activation h must be the forward's contiguous ",
                  grad.sizes(), " ", grad.scalar_type(), " tensor, got ", h.sizes(), " ", h.scalar_type());
      AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "urda_fast::gelu_backward", [&] {
        scalar_t* grad_data = grad.mutable_data_ptr<scalar_t>();
        const scalar_t* h_data = h.const_data_ptr<scalar_t>();
        at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) {
          gelu_backward_inplace(grad_data + begin, h_data + begin, end - begin);
        });
      });
      return grad;
    case Activation::kGeluTanh: return at::gelu_backward(grad, h, "tanh");
    default: {
      // d/dh [h s(a h)] = s + a h s (1 - s)
      auto s = at::sigmoid(h * kQuickGeluScale);
      return grad * (s + h * kQuickGeluScale * s * (1 - s));
    }
  }
}

// (N, width) view of a (B, T, width) tensor.
at::Tensor rows(const at::Tensor& t) { return t.view({-1, t.size(-1)}); }

// residual + in @ weight^T + bias, (B, T, E): residual and bias in one pass, which the matmul then accumulates into
// (addmm_ with beta 1 reads its output in place), instead of addmm's bias copy and a separate residual add.
at::Tensor residual_linear(const at::Tensor& residual, const at::Tensor& in, const at::Tensor& weight,
                           const at::Tensor& bias) {
  auto out = at::add(residual, bias);
  rows(out).addmm_(rows(in), weight.t());
  return out;
}

void check_vector(const at::Tensor& x, const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "urda_fast: transformer_block's ", name, " must be a (", size, ",) ", x.scalar_type(), " tensor on ",
              x.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

void check_matrix(const at::Tensor& x, const at::Tensor& t, const char* name, int64_t out, int64_t in) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == out && t.size(1) == in && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              "urda_fast: transformer_block's ", name, " must be a (", out, ", ", in, ") ", x.scalar_type(),
              " tensor on ", x.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

// x (B, T, E) contiguous float32/float64 on CPU, the weights as nn.MultiheadAttention, nn.LayerNorm, nn.Linear keep
// them. Returns the MLP width.
int64_t check_block(const at::Tensor& x, const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
                    const at::Tensor& in_weight, const at::Tensor& in_bias, const at::Tensor& out_weight,
                    const at::Tensor& out_bias, const at::Tensor& ln2_weight, const at::Tensor& ln2_bias,
                    const at::Tensor& fc_weight, const at::Tensor& fc_bias, const at::Tensor& proj_weight,
                    const at::Tensor& proj_bias, int64_t heads) {
  TORCH_CHECK(x.device().is_cpu(), "urda_fast: transformer_block's CPU kernel needs CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "urda_fast: transformer_block's CPU kernel takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "urda_fast: transformer_block needs a contiguous (B, T, E) input, "
              "got shape ", x.sizes());
  const int64_t embed = x.size(2);
  TORCH_CHECK(heads > 0 && embed % heads == 0, "urda_fast: transformer_block's width ", embed,
              " is not a multiple of heads = ", heads);
  TORCH_CHECK(fc_weight.dim() == 2, "urda_fast: transformer_block's fc_weight must be 2-D, got ", fc_weight.sizes());
  const int64_t hidden = fc_weight.size(0);
  check_vector(x, ln1_weight, "ln1_weight", embed);
  check_vector(x, ln1_bias, "ln1_bias", embed);
  check_matrix(x, in_weight, "in_weight", 3 * embed, embed);
  check_vector(x, in_bias, "in_bias", 3 * embed);
  check_matrix(x, out_weight, "out_weight", embed, embed);
  check_vector(x, out_bias, "out_bias", embed);
  check_vector(x, ln2_weight, "ln2_weight", embed);
  check_vector(x, ln2_bias, "ln2_bias", embed);
  check_matrix(x, fc_weight, "fc_weight", hidden, embed);
  check_vector(x, fc_bias, "fc_bias", hidden);
  check_matrix(x, proj_weight, "proj_weight", embed, hidden);
  check_vector(x, proj_bias, "proj_bias", embed);
  return hidden;
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult transformer_block_forward_cpu(
    const at::Tensor& x, const at::Tensor& ln1_weight, const at::Tensor& ln1_bias, const at::Tensor& in_weight,
    const at::Tensor& in_bias, const at::Tensor& out_weight, const at::Tensor& out_bias, const at::Tensor& ln2_weight,
    const at::Tensor& ln2_bias, const at::Tensor& fc_weight, const at::Tensor& fc_bias, const at::Tensor& proj_weight,
    const at::Tensor& proj_bias, const std::optional<at::Tensor>& mask, int64_t heads, double scale, double ln_eps,
    c10::string_view activation) {
  check_block(x, ln1_weight, ln1_bias, in_weight, in_bias, out_weight, out_bias, ln2_weight, ln2_bias, fc_weight,
              fc_bias, proj_weight, proj_bias, heads);
  const Activation act = parse_activation(activation);
  const int64_t embed = x.size(2);
  auto [ln1, ln1_mean, ln1_rstd] = at::native_layer_norm(x, {embed}, ln1_weight, ln1_bias, ln_eps);
  auto qkv = at::addmm(in_bias, rows(ln1), in_weight.t()).view({x.size(0), x.size(1), 3 * embed});
  auto [attn, probs] = packed_attention_forward_cpu(qkv, mask, heads, scale);
  auto x1 = residual_linear(x, attn, out_weight, out_bias);
  auto [ln2, ln2_mean, ln2_rstd] = at::native_layer_norm(x1, {embed}, ln2_weight, ln2_bias, ln_eps);
  auto [h, g] = linear_activation(rows(ln2), fc_weight, fc_bias, act);
  auto y = residual_linear(x1, g, proj_weight, proj_bias);
  return {y, ln1, ln1_mean, ln1_rstd, qkv, attn, probs, x1, ln2, ln2_mean, ln2_rstd, h, g};
}

// Gradients w.r.t. (x, ln1_weight, ln1_bias, in_weight, in_bias, out_weight, out_bias, ln2_weight, ln2_bias,
// fc_weight, fc_bias, proj_weight, proj_bias): those `needs` asks for, an empty (0,) tensor for the others.
enum Input { kX, kLn1W, kLn1B, kInW, kInB, kOutW, kOutB, kLn2W, kLn2B, kFcW, kFcB, kProjW, kProjB, kInputs };

bool any_of(const std::vector<bool>& needs, int first, int last) {
  for (int i = first; i <= last; ++i)
    if (needs[i]) return true;
  return false;
}

std::vector<at::Tensor> transformer_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& ln1_mean,
    const at::Tensor& ln1_rstd, const at::Tensor& qkv, const at::Tensor& attn, const at::Tensor& probs,
    const at::Tensor& x1, const at::Tensor& ln2, const at::Tensor& ln2_mean, const at::Tensor& ln2_rstd,
    const at::Tensor& h, const at::Tensor& g, const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
    const at::Tensor& in_weight, const at::Tensor& out_weight, const at::Tensor& ln2_weight, const at::Tensor& ln2_bias,
    const at::Tensor& fc_weight, const at::Tensor& proj_weight, int64_t heads, double scale,
    c10::string_view activation, at::IntArrayRef needs_mask) {
  TORCH_CHECK(needs_mask.size() == kInputs, "urda_fast: transformer_block_backward's needs has ", kInputs,
              " entries, got ", needs_mask.size());
  std::vector<bool> needs(kInputs);
  for (int i = 0; i < kInputs; ++i) needs[i] = needs_mask[i] != 0;
  const Activation act = parse_activation(activation);
  const int64_t embed = x.size(2);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() && grad_out.device().is_cpu(),
              "urda_fast: transformer_block's grad_out must be a ", x.scalar_type(), " CPU tensor of shape ", x.sizes(),
              ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  std::vector<at::Tensor> grads(kInputs);
  auto gy = grad_out.contiguous();
  // Weight and bias gradients of a linear layer whose output gradient (N, out) is d_out and input (N, in) is in.
  auto linear_grads = [&](const at::Tensor& d_out, const at::Tensor& in, int weight, int bias) {
    if (needs[weight]) grads[weight] = at::mm(d_out.t(), rows(in));
    if (needs[bias]) grads[bias] = at::sum(d_out, 0);
  };
  // The MLP half: y = x1 + c_proj(act(c_fc(ln_2(x1)))).
  linear_grads(rows(gy), g, kProjW, kProjB);
  at::Tensor d_x1;
  if (any_of(needs, kX, kFcB)) {
    auto d_h = activation_backward(at::mm(rows(gy), proj_weight), h, act);
    linear_grads(d_h, ln2, kFcW, kFcB);
    if (any_of(needs, kX, kLn2B)) {
      const bool through = any_of(needs, kX, kOutB);
      auto [d_ln, d_ln2_w, d_ln2_b] = at::native_layer_norm_backward(
          at::mm(d_h, fc_weight).view_as(x), x1, {embed}, ln2_mean, ln2_rstd, ln2_weight, ln2_bias,
          {through, needs[kLn2W], needs[kLn2B]});
      grads[kLn2W] = d_ln2_w;
      grads[kLn2B] = d_ln2_b;
      if (through) d_x1 = d_ln.add_(gy);
    }
  }
  // The attention half: x1 = x + out_proj(attention(in_proj(ln_1(x)))).
  if (d_x1.defined()) {
    linear_grads(rows(d_x1), attn, kOutW, kOutB);
    if (any_of(needs, kX, kInB)) {
      auto d_attn = at::mm(rows(d_x1), out_weight).view_as(x);
      auto d_qkv = rows(packed_attention_backward_cpu(d_attn, qkv, probs, heads, scale));
      linear_grads(d_qkv, ln1, kInW, kInB);
      if (any_of(needs, kX, kLn1B)) {
        auto [d_ln, d_ln1_w, d_ln1_b] = at::native_layer_norm_backward(
            at::mm(d_qkv, in_weight).view_as(x), x, {embed}, ln1_mean, ln1_rstd, ln1_weight, ln1_bias,
            {needs[kX], needs[kLn1W], needs[kLn1B]});
        grads[kLn1W] = d_ln1_w;
        grads[kLn1B] = d_ln1_b;
        if (needs[kX]) grads[kX] = d_ln.add_(d_x1);
      }
    }
  }
  for (auto& grad : grads)
    if (!grad.defined()) grad = at::empty({0}, x.options());
  return grads;
}

// Autograd in C++: a Python autograd rule (torch.library.register_autograd) cost ~0.37 ms per forward + backward
// of the block, as much as the block's own work at one image, and an HPT step runs it 18 times.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

auto forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("urda_fast::transformer_block_forward", "")
                       .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double,
                                            double, c10::string_view)>();
  return op;
}

auto backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("urda_fast::transformer_block_backward", "")
                       .typed<std::vector<at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, int64_t, double, c10::string_view, at::IntArrayRef)>();
  return op;
}

// The forward op's arguments after the 13 differentiable tensors: mask, heads, scale, ln_eps, activation.
constexpr int kArguments = kInputs + 5;

class TransformerBlockFunction : public torch::autograd::Function<TransformerBlockFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& ln1_weight,
                               const at::Tensor& ln1_bias, const at::Tensor& in_weight, const at::Tensor& in_bias,
                               const at::Tensor& out_weight, const at::Tensor& out_bias, const at::Tensor& ln2_weight,
                               const at::Tensor& ln2_bias, const at::Tensor& fc_weight, const at::Tensor& fc_bias,
                               const at::Tensor& proj_weight, const at::Tensor& proj_bias,
                               const std::optional<at::Tensor>& mask, int64_t heads, double scale, double ln_eps,
                               const std::string& activation) {
    ForwardResult out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = forward_op().call(x, ln1_weight, ln1_bias, in_weight, in_bias, out_weight, out_bias, ln2_weight, ln2_bias,
                              fc_weight, fc_bias, proj_weight, proj_bias, mask, heads, scale, ln_eps, activation);
    }
    auto& [y, ln1, ln1_mean, ln1_rstd, qkv, attn, probs, x1, ln2, ln2_mean, ln2_rstd, h, g] = out;
    ctx->save_for_backward({x, ln1, ln1_mean, ln1_rstd, qkv, attn, probs, x1, ln2, ln2_mean, ln2_rstd, h, g,
                            ln1_weight, ln1_bias, in_weight, out_weight, ln2_weight, ln2_bias, fc_weight,
                            proj_weight});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["activation"] = activation;
    variable_list outputs = {y, ln1, ln1_mean, ln1_rstd, qkv, attn, probs, x1, ln2, ln2_mean, ln2_rstd, h, g};
    // Everything but y is the backward's, not a differentiable output; an unused output gets no zero-filled grad.
    ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(kArguments);
    std::vector<int64_t> needs(kInputs);
    bool any = false;
    for (int i = 0; i < kInputs; ++i) any |= (needs[i] = ctx->needs_input_grad(i));
    if (!grad_outputs[0].defined() || !any) return grads;
    const auto s = ctx->get_saved_variables();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    std::vector<at::Tensor> computed;
    {
      // A plain backward skips the backward op's autograd kernel; create_graph=True reaches it, and it refuses.
      std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
      if (!at::GradMode::is_enabled()) guard.emplace();
      computed = backward_op().call(grad_outputs[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9],
                                    s[10], s[11], s[12], s[13], s[14], s[15], s[16], s[17], s[18], s[19], s[20],
                                    ctx->saved_data["heads"].toInt(), ctx->saved_data["scale"].toDouble(), activation,
                                    needs);
    }
    for (int i = 0; i < kInputs; ++i)
      if (needs[i]) grads[i] = computed[i];
    return grads;
  }
};

ForwardResult transformer_block_forward_autograd(
    const at::Tensor& x, const at::Tensor& ln1_weight, const at::Tensor& ln1_bias, const at::Tensor& in_weight,
    const at::Tensor& in_bias, const at::Tensor& out_weight, const at::Tensor& out_bias, const at::Tensor& ln2_weight,
    const at::Tensor& ln2_bias, const at::Tensor& fc_weight, const at::Tensor& fc_bias, const at::Tensor& proj_weight,
    const at::Tensor& proj_bias, const std::optional<at::Tensor>& mask, int64_t heads, double scale, double ln_eps,
    c10::string_view activation) {
  auto o = TransformerBlockFunction::apply(x, ln1_weight, ln1_bias, in_weight, in_bias, out_weight, out_bias,
                                           ln2_weight, ln2_bias, fc_weight, fc_bias, proj_weight, proj_bias, mask,
                                           heads, scale, ln_eps, std::string(activation));
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10], o[11], o[12]};
}

}  // namespace

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) {
  m.impl("transformer_block_forward", &transformer_block_forward_cpu);
  m.impl("transformer_block_backward", &transformer_block_backward_cpu);
}

TORCH_LIBRARY_IMPL(urda_fast, Autograd, m) {
  m.impl("transformer_block_forward", &transformer_block_forward_autograd);
}

}  // namespace urda_fast
