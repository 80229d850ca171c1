// Eval-mode BatchNorm, optionally followed by ReLU, on contiguous (N, C, *) or channels-last CPU tensors: one pass
// forward, one pass backward. In eval mode a BatchNorm is y = x * scale[c] + shift[c], and an attack differentiates
// it at every step. torch's CPU backward first reduces the gradient and the input per channel (for weight and bias
// gradients the attack does not ask for) and then scales the gradient, two passes over both; a ReLU after it adds a
// pass each way. Here the forward writes relu(fma(x, scale, shift)) and the backward reads the gradient and (with
// ReLU) the output once.
//
// The per-channel constants come from Python, computed with torch's own operations in torch's order, so both
// directions give torch's bits: the forward is the fused multiply-add torch's vectorised kernel does, the backward
// (grad * factor0[c]) * factor1[c], torch's two roundings (its invstd * weight, in that order).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"
#include "cpu_math.h"

namespace urda_fast {
namespace {

// Elements per task, at least: below this a task is too short to pay for waking a thread.
constexpr int64_t kGrain = 16384;

template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t relu_or_identity(scalar_t v, bool relu) {
  // v <= 0 is false for NaN: NaN stays NaN, as in torch.relu.
  return relu && v <= scalar_t(0) ? scalar_t(0) : v;
}

// planes [begin, end) of `plane` elements each, plane i in channel i % channels.
template <typename scalar_t>
URDA_FAST_CLONES void forward_planes(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                     const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                     int64_t channels, int64_t plane, int64_t begin, int64_t end, bool relu) {
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t a = scale[i % channels], b = shift[i % channels];
    const scalar_t* src = x + i * plane;
    scalar_t* dst = out + i * plane;
    if (relu) {
#pragma omp simd
      for (int64_t j = 0; j < plane; ++j) dst[j] = relu_or_identity(std::fma(src[j], a, b), true);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < plane; ++j) dst[j] = std::fma(src[j], a, b);
    }
  }
}

// rows [begin, end) of a (N, C) input: one scale per element of a row.
template <typename scalar_t>
URDA_FAST_CLONES void forward_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                   const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                   int64_t channels, int64_t begin, int64_t end, bool relu) {
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* src = x + i * channels;
    scalar_t* dst = out + i * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) dst[c] = relu_or_identity(std::fma(src[c], scale[c], shift[c]), relu);
  }
}

template <typename scalar_t>
URDA_FAST_CLONES void backward_planes(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                      scalar_t* __restrict__ grad_in, const scalar_t* __restrict__ factor0,
                                      const scalar_t* __restrict__ factor1, int64_t channels, int64_t plane,
                                      int64_t begin, int64_t end, bool relu) {
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t k0 = factor0[i % channels], k1 = factor1[i % channels];
    const scalar_t* g = grad + i * plane;
    scalar_t* dst = grad_in + i * plane;
    if (relu) {
      const scalar_t* y = out + i * plane;
#pragma omp simd
      for (int64_t j = 0; j < plane; ++j) dst[j] = y[j] <= scalar_t(0) ? scalar_t(0) : g[j] * k0 * k1;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < plane; ++j) dst[j] = g[j] * k0 * k1;
    }
  }
}

template <typename scalar_t>
URDA_FAST_CLONES void backward_rows(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                    scalar_t* __restrict__ grad_in, const scalar_t* __restrict__ factor0,
                                    const scalar_t* __restrict__ factor1, int64_t channels, int64_t begin,
                                    int64_t end, bool relu) {
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* g = grad + i * channels;
    scalar_t* dst = grad_in + i * channels;
    if (relu) {
      const scalar_t* y = out + i * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        dst[c] = y[c] <= scalar_t(0) ? scalar_t(0) : g[c] * factor0[c] * factor1[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) dst[c] = g[c] * factor0[c] * factor1[c];
    }
  }
}

void check_channel_vector(const at::Tensor& x, const at::Tensor& v, const char* name) {
  TORCH_CHECK(v.device() == x.device() && v.scalar_type() == x.scalar_type() && v.is_contiguous(),
              "urda_fast: batch_norm_eval's ", name, " must be a contiguous ", x.scalar_type(), " tensor on ",
              x.device());
}

// A channels-last (N, C, H, W) tensor is (N * H * W, C) rows in memory: the (N, C) kernels run it.
bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// How the kernels walk a tensor: `count` rows of C elements ((N, C) inputs and channels-last), else `count` = N * C
// planes of `plane` elements; `grain` items per task at least.
struct Walk {
  bool rows;
  int64_t count, plane, grain;
};

Walk walk_of(const at::Tensor& x) {
  const int64_t channels = x.size(1), plane = x.numel() / (x.size(0) * channels);
  if (plane == 1 || is_channels_last(x)) {
    return {true, x.numel() / channels, 1, std::max<int64_t>(1, kGrain / channels)};
  }
  return {false, x.size(0) * channels, plane, std::max<int64_t>(1, kGrain / plane)};
}

void check_input(const at::Tensor& x, const at::Tensor& factors, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "urda_fast: batch_norm_eval runs CPU tensors, got ", name, " on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "urda_fast: batch_norm_eval takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2 && (x.is_contiguous() || is_channels_last(x)), "urda_fast: batch_norm_eval needs a "
              "contiguous (N, C, *) or channels-last ", name, ", got shape ", x.sizes(), " and strides ", x.strides());
  check_channel_vector(x, factors, "grad_factors");
  TORCH_CHECK(factors.dim() == 2 && factors.size(0) == 2 && factors.size(1) == x.size(1),
              "urda_fast: batch_norm_eval's grad_factors must have shape (2, ", x.size(1), "), got ", factors.sizes());
}

at::Tensor batch_norm_eval_forward_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                       const at::Tensor& grad_factors, bool relu) {
  check_input(x, grad_factors, "x");
  check_channel_vector(x, scale, "scale");
  check_channel_vector(x, shift, "shift");
  const int64_t channels = x.size(1);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == channels && shift.dim() == 1 && shift.size(0) == channels,
              "urda_fast: batch_norm_eval's scale and shift must have shape (", channels, "), got ", scale.sizes(),
              " and ", shift.sizes());
  at::Tensor out = at::empty_like(x);  // x's layout
  if (x.numel() == 0) return out;
  const Walk walk = walk_of(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "urda_fast::batch_norm_eval_forward_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t* a = scale.const_data_ptr<scalar_t>();
    const scalar_t* b = shift.const_data_ptr<scalar_t>();
    at::parallel_for(0, walk.count, walk.grain, [&](int64_t begin, int64_t end) {
      if (walk.rows) {
        forward_rows<scalar_t>(src, dst, a, b, channels, begin, end, relu);
      } else {
        forward_planes<scalar_t>(src, dst, a, b, channels, walk.plane, begin, end, relu);
      }
    });
  });
  return out;
}

at::Tensor batch_norm_eval_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                        const at::Tensor& grad_factors, bool relu) {
  check_input(grad_out, grad_factors, "grad_out");
  if (relu) {
    const bool same_layout = out.is_contiguous() ? grad_out.is_contiguous()
                                                 : is_channels_last(out) && is_channels_last(grad_out);
    TORCH_CHECK(out.device() == grad_out.device() && out.scalar_type() == grad_out.scalar_type() &&
                    out.sizes() == grad_out.sizes() && same_layout,
                "urda_fast: batch_norm_eval_backward's out must match grad_out's dtype, shape and layout");
  }
  at::Tensor grad_in = at::empty_like(grad_out);
  if (grad_out.numel() == 0) return grad_in;
  const int64_t channels = grad_out.size(1);
  const Walk walk = walk_of(grad_out);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "urda_fast::batch_norm_eval_backward_cpu", [&] {
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* y = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = grad_in.mutable_data_ptr<scalar_t>();
    const scalar_t* k0 = grad_factors.const_data_ptr<scalar_t>();
    const scalar_t* k1 = k0 + channels;
    at::parallel_for(0, walk.count, walk.grain, [&](int64_t begin, int64_t end) {
      if (walk.rows) {
        backward_rows<scalar_t>(g, y, dst, k0, k1, channels, begin, end, relu);
      } else {
        backward_planes<scalar_t>(g, y, dst, k0, k1, channels, walk.plane, begin, end, relu);
      }
    });
  });
  return grad_in;
}

// Autograd in C++: the op runs at every attack step, and a Python rule (torch.library.register_autograd) cost more
// than the kernel below ~1 MB of activations.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class BatchNormEvalFunction : public torch::autograd::Function<BatchNormEvalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& grad_factors, bool relu) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("urda_fast::batch_norm_eval_forward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, bool)>();
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(x, scale, shift, grad_factors, relu);
    }
    ctx->save_for_backward({grad_factors, relu ? out : at::Tensor()});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["channels_last"] = !x.is_contiguous();  // the kernel took it: channels-last
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(5);
    at::Tensor grad = grad_outputs[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return grads;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& factors = saved[0];
    const bool relu = ctx->saved_data["relu"].toBool();
    if (at::GradMode::is_enabled()) {
      // create_graph=True (or tracing): torch operations, differentiable again, the kernel's rounding.
      std::vector<int64_t> shape(grad.dim(), 1);
      shape[1] = -1;
      at::Tensor grad_in = grad * factors[0].reshape(shape) * factors[1].reshape(shape);
      grads[0] = relu ? at::where(saved[1] <= 0, at::zeros({}, grad.options()), grad_in) : grad_in;
      return grads;
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("urda_fast::batch_norm_eval_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
    // The gradient in the output's layout (autograd may hand over another).
    grad = grad.contiguous(ctx->saved_data["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous);
    at::AutoDispatchBelowADInplaceOrView guard;
    grads[0] = op.call(grad, relu ? saved[1] : grad, factors, relu);
    return grads;
  }
};

at::Tensor batch_norm_eval_forward_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                            const at::Tensor& grad_factors, bool relu) {
  return BatchNormEvalFunction::apply(x, scale, shift, grad_factors, relu)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) {
  m.impl("batch_norm_eval_forward", &batch_norm_eval_forward_cpu);
  m.impl("batch_norm_eval_backward", &batch_norm_eval_backward_cpu);
}

TORCH_LIBRARY_IMPL(urda_fast, Autograd, m) {
  m.impl("batch_norm_eval_forward", &batch_norm_eval_forward_autograd);
}

}  // namespace urda_fast
