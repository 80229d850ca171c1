// 2-D max pooling of contiguous NCHW tensors on CPU (no dilation, floor mode), with torch's exact semantics: the
// window's max, NaN if it holds one; the gradient goes to the first max in row-major window order (the last NaN), as
// torch's saved index does. torch's own NCHW CPU kernel is scalar, with index arithmetic per element: 14x slower
// than its channels-last kernel on the digits CNN's 64x32x16x16 maps. Here each output row is built by vectorised
// passes over the window's input rows, and the forward saves which window element won as one byte per output
// (torch keeps an int64 index), so the backward reads neither x nor eight bytes per output.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "cpu_math.h"

namespace urda_fast {
namespace {

struct PoolShape {
  int64_t planes, height, width, out_height, out_width;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
};

bool is_2x2(const PoolShape& p) {
  return p.kernel_h == 2 && p.kernel_w == 2 && p.stride_h == 2 && p.stride_w == 2 && p.pad_h == 0 && p.pad_w == 0;
}

// take ? x : y through bit masks: the rows are short (8 outputs for a 16x16 map), so much of the work runs in the
// loop's scalar remainder, where GCC turned the selects into branches that random data mispredicts (3x slower).
template <typename T>
__attribute__((always_inline)) inline T select_bits(bool take, T x, T y) {
  using bits_t = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  bits_t bx, by;
  std::memcpy(&bx, &x, sizeof(T));
  std::memcpy(&by, &y, sizeof(T));
  const bits_t mask = static_cast<bits_t>(bits_t(0) - static_cast<bits_t>(take));
  const bits_t r = static_cast<bits_t>((bx & mask) | (by & static_cast<bits_t>(~mask)));
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// Output columns whose window column kw lands inside the row: ow * stride - pad + kw in [0, width).
inline void column_range(const PoolShape& p, int64_t kw, int64_t& first, int64_t& last) {
  const int64_t shift = p.pad_w - kw;  // ow * stride >= shift
  first = shift > 0 ? (shift + p.stride_w - 1) / p.stride_w : 0;
  last = p.width - 1 + shift < 0 ? 0 : std::min(p.out_width, (p.width - 1 + shift) / p.stride_w + 1);
}

// One output row: the max of each window (torch's rule: take v if v > max or v is NaN, scanning row-major) and which
// window element (kh * kernel_w + kw) won. Loops over the window's (kh, kw) with a vectorised pass over the row each.
template <typename scalar_t, typename acc_t>
URDA_FAST_CLONES_256 void pool_row(const scalar_t* __restrict__ plane, acc_t* __restrict__ row_max,
                                   int32_t* __restrict__ row_arg, int64_t oh, const PoolShape& p) {
  const int64_t h0 = oh * p.stride_h - p.pad_h;
  const int64_t ih_begin = std::max<int64_t>(h0, 0), ih_end = std::min(h0 + p.kernel_h, p.height);
  const int32_t first_row = static_cast<int32_t>((ih_begin - h0) * p.kernel_w);
  for (int64_t ow = 0; ow < p.out_width; ++ow) {
    row_max[ow] = -std::numeric_limits<acc_t>::infinity();
    // torch starts at the window's first in-bounds element: an all -inf window sends its gradient there.
    row_arg[ow] = first_row + static_cast<int32_t>(std::max<int64_t>(p.pad_w - ow * p.stride_w, 0));
  }
  for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
    const scalar_t* in_row = plane + ih * p.width;
    for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
      int64_t first, last;
      column_range(p, kw, first, last);
      const int64_t offset = kw - p.pad_w;  // input column of output column ow: ow * stride + offset
      const int32_t index = static_cast<int32_t>((ih - h0) * p.kernel_w + kw);
#pragma omp simd
      for (int64_t ow = first; ow < last; ++ow) {
        const acc_t v = static_cast<acc_t>(in_row[ow * p.stride_w + offset]);
        const bool take = (v > row_max[ow]) | (v != v);
        row_max[ow] = select_bits(take, v, row_max[ow]);
        row_arg[ow] = select_bits(take, index, row_arg[ow]);
      }
    }
  }
}

template <typename scalar_t>
using BitsOf = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, scalar_t>;

// Which of (r0[0], r0[1], r1[0], r1[1]) torch's scan keeps: v > max or v is NaN, in row-major order.
template <typename acc_t>
__attribute__((always_inline)) inline int32_t window_arg(acc_t a, acc_t b, acc_t c, acc_t d) {
  acc_t m = a;
  int32_t arg = 0;
  bool take = (b > m) | (b != b);
  m = select_bits(take, b, m), arg = select_bits(take, int32_t(1), arg);
  take = (c > m) | (c != c);
  m = select_bits(take, c, m), arg = select_bits(take, int32_t(2), arg);
  take = (d > m) | (d != d);
  return select_bits(take, int32_t(3), arg);
}

// The 2x2, stride 2, no padding case (most CNNs' pooling, the digits CNN's): one vectorised loop per output row
// reads each window's four elements with stride-2 loads. The max is one of the inputs, so it moves as bits (no
// narrowing for half types).
template <typename scalar_t>
URDA_FAST_CLONES_256 void pool2x2_row(const scalar_t* __restrict__ r0, const scalar_t* __restrict__ r1,
                                      scalar_t* __restrict__ out, int32_t* __restrict__ args, int64_t out_width) {
  using acc_t = typename AccType<scalar_t>::type;
  using bits_t = BitsOf<scalar_t>;
  const bits_t* b0 = reinterpret_cast<const bits_t*>(r0);
  const bits_t* b1 = reinterpret_cast<const bits_t*>(r1);
  bits_t* o = reinterpret_cast<bits_t*>(out);
#pragma omp simd
  for (int64_t ow = 0; ow < out_width; ++ow) {
    const int32_t arg = window_arg<acc_t>(static_cast<acc_t>(r0[2 * ow]), static_cast<acc_t>(r0[2 * ow + 1]),
                                          static_cast<acc_t>(r1[2 * ow]), static_cast<acc_t>(r1[2 * ow + 1]));
    args[ow] = arg;
    const bits_t top = select_bits(arg == 0, b0[2 * ow], b0[2 * ow + 1]);
    const bits_t bottom = select_bits(arg == 2, b1[2 * ow], b1[2 * ow + 1]);
    o[ow] = select_bits(arg < 2, top, bottom);
  }
}

// 2x2 backward, one input row (window row `row` of output row args): every element written, no zero-fill, no
// scatter, since the windows do not overlap. int32 window indices: a uint8 row in the same loop would set the
// vector width to 32 lanes, and rows of 4-16 outputs would never reach the vector body.
template <typename scalar_t>
URDA_FAST_CLONES_256 void unpool2x2_row(const int32_t* __restrict__ args, const scalar_t* __restrict__ grad,
                                        scalar_t* __restrict__ d_row, int32_t row, int64_t out_width, int64_t width) {
  using bits_t = BitsOf<scalar_t>;
  const bits_t* g = reinterpret_cast<const bits_t*>(grad);
  bits_t* d = reinterpret_cast<bits_t*>(d_row);
  const bits_t zero{};  // all-zero bits: +0.0 in every floating type
  const int32_t left = 2 * row, right = 2 * row + 1;
#pragma omp simd
  for (int64_t ow = 0; ow < out_width; ++ow) {
    d[2 * ow] = select_bits(args[ow] == left, g[ow], zero);
    d[2 * ow + 1] = select_bits(args[ow] == right, g[ow], zero);
  }
  if (width > 2 * out_width) d[width - 1] = zero;  // odd width: the last column
}

URDA_FAST_CLONES_256 void narrow_indices(const int32_t* __restrict__ from, uint8_t* __restrict__ to, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) to[k] = static_cast<uint8_t>(from[k]);
}

URDA_FAST_CLONES_256 void widen_indices(const uint8_t* __restrict__ from, int32_t* __restrict__ to, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) to[k] = from[k];
}

template <typename scalar_t>
URDA_FAST_CLONES_256 void store_row(scalar_t* out, const typename AccType<scalar_t>::type* row, int64_t n) {
  write_row<scalar_t, typename AccType<scalar_t>::type>(out, n, [&](int64_t j) __attribute__((always_inline)) {
    return row[j];
  });
}

PoolShape pool_shape(int64_t planes, int64_t height, int64_t width, at::IntArrayRef kernel, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "urda_fast: max_pool2d takes 2 values each for kernel, stride and padding");
  PoolShape p{planes, height, width, 0, 0, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(p.kernel_h > 0 && p.kernel_w > 0 && p.stride_h > 0 && p.stride_w > 0,
              "urda_fast: max_pool2d's kernel and stride must be positive, got ", kernel, " and ", stride);
  TORCH_CHECK(p.kernel_h * p.kernel_w <= 255, "urda_fast: max_pool2d's CPU kernel takes windows of at most 255 "
              "elements (its index is one byte), got ", kernel);
  TORCH_CHECK(p.pad_h >= 0 && p.pad_w >= 0 && 2 * p.pad_h <= p.kernel_h && 2 * p.pad_w <= p.kernel_w,
              "urda_fast: max_pool2d's padding must be between 0 and half the kernel, got ", padding);
  TORCH_CHECK(height + 2 * p.pad_h >= p.kernel_h && width + 2 * p.pad_w >= p.kernel_w,
              "urda_fast: max_pool2d's input (", height, ", ", width, ") is smaller than its padded kernel ", kernel);
  p.out_height = (height + 2 * p.pad_h - p.kernel_h) / p.stride_h + 1;
  p.out_width = (width + 2 * p.pad_w - p.kernel_w) / p.stride_w + 1;
  return p;
}

int64_t plane_grain(const PoolShape& p) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(p.height * p.width, 1)); }

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cpu(const at::Tensor& x, at::IntArrayRef kernel,
                                                          at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(x.device().is_cpu(), "urda_fast: max_pool2d's CPU kernel needs a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "urda_fast: max_pool2d needs a contiguous (N, C, H, W) tensor, got ",
              x.sizes(), x.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "urda_fast: max_pool2d needs a floating tensor, got ",
              x.scalar_type());
  const PoolShape p = pool_shape(x.size(0) * x.size(1), x.size(2), x.size(3), kernel, stride, padding);
  at::Tensor out = at::empty({x.size(0), x.size(1), p.out_height, p.out_width}, x.options());
  at::Tensor window_index = at::empty(out.sizes(), x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, window_index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "urda_fast::max_pool2d_forward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    uint8_t* idx = window_index.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, p.planes, plane_grain(p), [&](int64_t begin, int64_t end) {
      const int64_t plane_out = p.out_height * p.out_width;
      std::vector<acc_t> row_max(p.out_width);
      std::vector<int32_t> plane_arg(plane_out);  // narrowed to bytes once per plane: short rows stay vectorised
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* in_plane = in + plane * p.height * p.width;
        for (int64_t oh = 0; oh < p.out_height; ++oh) {
          scalar_t* out_row = o + plane * plane_out + oh * p.out_width;
          int32_t* arg_row = plane_arg.data() + oh * p.out_width;
          if (is_2x2(p)) {
            const scalar_t* r0 = in_plane + 2 * oh * p.width;
            pool2x2_row<scalar_t>(r0, r0 + p.width, out_row, arg_row, p.out_width);
          } else {
            pool_row<scalar_t, acc_t>(in_plane, row_max.data(), arg_row, oh, p);
            store_row<scalar_t>(out_row, row_max.data(), p.out_width);
          }
        }
        narrow_indices(plane_arg.data(), idx + plane * plane_out, plane_out);
      }
    });
  });
  return {out, window_index};
}

// d x: each output's gradient at the window element its index names (added: windows may overlap).
at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& window_index,
                                   at::IntArrayRef input_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                                   at::IntArrayRef padding) {
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.dim() == 4 && grad_out.is_contiguous() &&
                  at::isFloatingType(grad_out.scalar_type()),
              "urda_fast: max_pool2d's grad_out must be a contiguous floating (N, C, H_out, W_out) CPU tensor");
  TORCH_CHECK(window_index.scalar_type() == at::kByte && window_index.sizes() == grad_out.sizes() &&
                  window_index.is_contiguous() && window_index.device().is_cpu(),
              "urda_fast: max_pool2d's window_index must be the forward's uint8 tensor, shaped like grad_out");
  TORCH_CHECK(input_size.size() == 2, "urda_fast: max_pool2d's input_size is (H, W)");
  const PoolShape p = pool_shape(grad_out.size(0) * grad_out.size(1), input_size[0], input_size[1], kernel, stride,
                                 padding);
  TORCH_CHECK(grad_out.size(2) == p.out_height && grad_out.size(3) == p.out_width, "urda_fast: max_pool2d's grad_out ",
              grad_out.sizes(), " does not match an input of ", input_size, " pooled with kernel ", kernel);
  const bool fills_all = is_2x2(p);  // the 2x2 path writes every element; the others add into zeros
  at::Tensor d_x = at::empty({grad_out.size(0), grad_out.size(1), p.height, p.width}, grad_out.options());
  if (!fills_all || d_x.numel() == 0 || grad_out.numel() == 0) d_x.zero_();
  if (grad_out.numel() == 0) return d_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "urda_fast::max_pool2d_backward_cpu", [&] {
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const uint8_t* idx = window_index.const_data_ptr<uint8_t>();
    scalar_t* dx = d_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.planes, plane_grain(p), [&](int64_t begin, int64_t end) {
      const int64_t plane_out = p.out_height * p.out_width;
      std::vector<int32_t> plane_arg(plane_out);
      for (int64_t plane = begin; plane < end; ++plane) {
        scalar_t* dx_plane = dx + plane * p.height * p.width;
        const scalar_t* g_plane = g + plane * plane_out;
        if (fills_all) {
          widen_indices(idx + plane * plane_out, plane_arg.data(), plane_out);
          for (int64_t oh = 0; oh < p.out_height; ++oh) {
            for (int32_t r = 0; r < 2; ++r) {
              unpool2x2_row<scalar_t>(plane_arg.data() + oh * p.out_width, g_plane + oh * p.out_width,
                                      dx_plane + (2 * oh + r) * p.width, r, p.out_width, p.width);
            }
          }
          if (p.height > 2 * p.out_height) {  // odd height: the last row
            std::fill_n(dx_plane + 2 * p.out_height * p.width, p.width, scalar_t(0));
          }
          continue;
        }
        const uint8_t* idx_plane = idx + plane * plane_out;
        for (int64_t oh = 0; oh < p.out_height; ++oh) {
          const int64_t h0 = oh * p.stride_h - p.pad_h;
          for (int64_t ow = 0; ow < p.out_width; ++ow) {
            const int64_t a = idx_plane[oh * p.out_width + ow];
            const int64_t ih = h0 + a / p.kernel_w, iw = ow * p.stride_w - p.pad_w + a % p.kernel_w;
            dx_plane[ih * p.width + iw] += g_plane[oh * p.out_width + ow];
          }
        }
      }
    });
  });
  return d_x;
}

// Autograd in C++: an attack pools at every step, and a Python rule (torch.library.register_autograd) cost ~0.1 ms a
// call, as much as the kernel on the digits CNN's maps.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("urda_fast::max_pool2d_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef,
                                                                   at::IntArrayRef, at::IntArrayRef)>();
    std::tuple<at::Tensor, at::Tensor> result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(x, kernel, stride, padding);
    }
    auto& [out, window_index] = result;
    ctx->save_for_backward({window_index});  // one byte per output: which window element won
    ctx->saved_data["input_size"] = std::vector<int64_t>{x.size(2), x.size(3)};
    ctx->saved_data["kernel"] = kernel.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->mark_non_differentiable({window_index});
    ctx->set_materialize_grads(false);
    return {out, window_index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(4);
    if (!grad_outputs[0].defined() || !ctx->needs_input_grad(0)) return grads;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("urda_fast::max_pool2d_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                           at::IntArrayRef, at::IntArrayRef)>();
    // A plain backward skips the backward op's autograd kernel; create_graph=True reaches it, and it refuses.
    std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
    if (!at::GradMode::is_enabled()) guard.emplace();
    auto& data = ctx->saved_data;
    grads[0] = op.call(grad_outputs[0].contiguous(), ctx->get_saved_variables()[0], data["input_size"].toIntVector(),
                       data["kernel"].toIntVector(), data["stride"].toIntVector(), data["padding"].toIntVector());
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_autograd(const at::Tensor& x, at::IntArrayRef kernel,
                                                               at::IntArrayRef stride, at::IntArrayRef padding) {
  auto outputs = MaxPool2dFunction::apply(x, kernel, stride, padding);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) {
  m.impl("max_pool2d_forward", &max_pool2d_forward_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

TORCH_LIBRARY_IMPL(urda_fast, Autograd, m) {
  m.impl("max_pool2d_forward", &max_pool2d_forward_autograd);
}

}  // namespace urda_fast
