// The input gradient of a 2-D convolution with few input channels (an image model's first layer) on CPU: the one
// gradient every attack step needs and training never does. oneDNN computes it as a transposed convolution with
// 1-4 output channels, which it does slowly: ResNet's 7x7/2 stem on 16x3x32x32 images took 2.0 ms per attack step
// (its forward: 1.0 ms), the digits CNN's first 3x3 layer 0.7 ms; here 0.9 and 0.18 ms.
//
// grad_in[n, c, y, x] = sum over o, ky, kx of grad_out[n, o, oy, ox] * w[o, c, ky, kx], where y = oy * sh - ph + ky
// and x = ox * sw - pw + kx. Per input row y and column phase r (x = m * sw + r), a block of consecutive m is one
// vector: for each (ky, kx) that reaches the phase, ox = m + d for a fixed d, so every output channel o adds one
// contiguous vector of its grad_out row times w[o, c, ky, kx] to each of the C accumulators. Each task takes a band
// of input rows of one sample and first copies the grad_out rows the band reads into a buffer of its own, padded
// with zeros so that these loads never leave a row (the zeros stand for the ox outside the output). A small sample
// is one band, all its rows staged once (bands of 16 rows cost a quarter of the kernel at 32x32: the rows two bands
// share are staged twice). Padding all of grad_out up front cost a third of the kernel at 224x224 (a fresh 55 MB
// buffer per call) and was no faster for small maps (the digits CNN's: 0.22-0.34 ms against 0.21-0.28 staged per
// sample), with a batch-sized buffer zeroed and filled at every call.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "cpu_math.h"

namespace urda_fast {
namespace {

constexpr int64_t kMaxChannels = 4;

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

struct ConvShape {
  int64_t out_channels, out_h, out_w, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  int64_t lead, row;  // zeros before each staged grad_out row, and its padded length
};

// Row y of one sample's grad_in (C, H, W), from its staged grad_out rows (O, staged_rows, row), the first being
// output row first_oy, and the weights as (kh, kw, O, C).
template <int C, typename scalar_t>
URDA_FAST_CLONES void input_grad_row(const scalar_t* __restrict__ staged, int64_t first_oy, int64_t staged_rows,
                                     const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_in, int64_t y,
                                     const ConvShape& g) {
  constexpr int64_t kBlock = 64 / sizeof(scalar_t);  // one AVX-512 vector
  constexpr int kLanes = 4;
  const int64_t plane = staged_rows * g.row;
  for (int64_t r = 0; r < std::min(g.stride_w, g.width); ++r) {
    const int64_t columns = (g.width - r + g.stride_w - 1) / g.stride_w;
    for (int64_t m0 = 0; m0 < columns; m0 += kBlock) {
      // kLanes partial sums per channel, over o = lane mod kLanes: one accumulator per channel made each FMA wait
      // for the last (latency-bound at 3 FMAs per 4 cycles for C = 3).
      alignas(64) scalar_t acc[kLanes][C][kBlock] = {};
      for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
        const int64_t oy_times_stride = y + g.pad_h - ky;
        if (oy_times_stride < 0 || oy_times_stride % g.stride_h != 0 || oy_times_stride / g.stride_h >= g.out_h) {
          continue;
        }
        const scalar_t* rows = staged + (oy_times_stride / g.stride_h - first_oy) * g.row + g.lead + m0;
        for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
          const int64_t ox_times_stride = r + g.pad_w - kx;  // ox = m + ox_times_stride / sw
          if (floor_div(ox_times_stride, g.stride_w) * g.stride_w != ox_times_stride) continue;
          const scalar_t* src = rows + floor_div(ox_times_stride, g.stride_w);
          const scalar_t* w = weight + (ky * g.kernel_w + kx) * g.out_channels * C;
          int64_t o = 0;
          for (; o + kLanes <= g.out_channels; o += kLanes) {
            for (int lane = 0; lane < kLanes; ++lane) {
              const scalar_t* v = src + (o + lane) * plane;
              for (int c = 0; c < C; ++c) {
                const scalar_t wc = w[(o + lane) * C + c];
#pragma omp simd
                for (int64_t l = 0; l < kBlock; ++l) acc[lane][c][l] += v[l] * wc;
              }
            }
          }
          for (; o < g.out_channels; ++o) {
            const scalar_t* v = src + o * plane;
            for (int c = 0; c < C; ++c) {
              const scalar_t wc = w[o * C + c];
#pragma omp simd
              for (int64_t l = 0; l < kBlock; ++l) acc[0][c][l] += v[l] * wc;
            }
          }
        }
      }
      for (int lane = 1; lane < kLanes; ++lane) {
        for (int c = 0; c < C; ++c) {
#pragma omp simd
          for (int64_t l = 0; l < kBlock; ++l) acc[0][c][l] += acc[lane][c][l];
        }
      }
      const int64_t valid = std::min(kBlock, columns - m0);
      for (int c = 0; c < C; ++c) {
        scalar_t* out = grad_in + (c * g.height + y) * g.width + m0 * g.stride_w + r;
        for (int64_t l = 0; l < valid; ++l) out[l * g.stride_w] = acc[0][c][l];
      }
    }
  }
}

// Input rows per task: a band of this many rows reads about band / stride_h + kernel_h / stride_h output rows.
constexpr int64_t kBand = 16;
// A sample whose staged grad_out fits this is one task (all its rows staged once, no overlap between bands), when
// there are enough samples to go round the threads.
constexpr int64_t kWholeSampleBytes = int64_t(256) << 10;

template <int C, typename scalar_t>
void input_grad(const at::Tensor& grad_out, const at::Tensor& weight_t, at::Tensor& grad_in, const ConvShape& g) {
  const scalar_t* w = weight_t.const_data_ptr<scalar_t>();
  scalar_t* out = grad_in.mutable_data_ptr<scalar_t>();
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const int64_t samples = grad_in.size(0), sample_in = C * g.height * g.width;
  const int64_t sample_out = g.out_channels * g.out_h * g.out_w;
  const bool whole = g.out_channels * g.out_h * g.row * int64_t(sizeof(scalar_t)) <= kWholeSampleBytes &&
                     samples >= 2 * at::get_num_threads();
  const int64_t band = whole ? g.height : kBand, bands = (g.height + band - 1) / band;
  const int64_t max_rows = std::min(g.out_h, (band - 1 + g.kernel_h - 1) / g.stride_h + 2);
  at::parallel_for(0, samples * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> staged(g.out_channels * max_rows * g.row);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, y0 = task % bands * band, y1 = std::min(g.height, y0 + band);
      // Output rows oy with y = oy * sh - ph + ky for some y in [y0, y1) and ky in [0, kh).
      const int64_t first_oy = std::max<int64_t>(0, -floor_div(-(y0 + g.pad_h - g.kernel_h + 1), g.stride_h));
      const int64_t last_oy = std::min(g.out_h - 1, floor_div(y1 - 1 + g.pad_h, g.stride_h));
      const int64_t rows = std::max<int64_t>(0, last_oy - first_oy + 1);
      // Row (o, i) of the band sits at (o * max_rows + i) * row in every task, so the zeros around each row, written
      // once with the buffer, stay in place and a task copies only the rows themselves (zeroing them row by row made
      // GCC call memset twice per row, an eighth of the kernel at 16x16).
      for (int64_t o = 0; o < g.out_channels; ++o) {
        for (int64_t i = 0; i < rows; ++i) {
          scalar_t* __restrict__ dst = staged.data() + (o * max_rows + i) * g.row + g.lead;
          const scalar_t* __restrict__ src = go + n * sample_out + (o * g.out_h + first_oy + i) * g.out_w;
#pragma omp simd
          for (int64_t l = 0; l < g.out_w; ++l) dst[l] = src[l];
        }
      }
      for (int64_t y = y0; y < y1; ++y) {
        input_grad_row<C, scalar_t>(staged.data(), first_oy, max_rows, w, out + n * sample_in, y, g);
      }
    }
  });
}

at::Tensor conv2d_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(grad_out.dim() == 4 && weight.dim() == 4, "urda_fast: conv2d_input_grad needs a 4-D grad_out (N, O, Ho, "
              "Wo) and weight (O, C, kh, kw), got ", grad_out.sizes(), " and ", weight.sizes());
  TORCH_CHECK(input_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "urda_fast: input_size, stride and padding are pairs");
  TORCH_CHECK(grad_out.device().is_cpu() && weight.device().is_cpu(), "urda_fast: conv2d_input_grad runs CPU tensors");
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble),
              "urda_fast: conv2d_input_grad takes float32 or float64 grad_out and weight of one dtype, got ",
              grad_out.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(grad_out.is_contiguous(), "urda_fast: grad_out must be contiguous (NCHW)");
  const int64_t channels = weight.size(1);
  TORCH_CHECK(channels >= 1 && channels <= kMaxChannels, "urda_fast: conv2d_input_grad handles 1-", kMaxChannels,
              " input channels (an image model's first layer), got ", channels, "; use torch's convolution_backward");
  ConvShape g{weight.size(0), grad_out.size(2), grad_out.size(3), input_size[0], input_size[1], weight.size(2),
              weight.size(3), stride[0], stride[1], padding[0], padding[1], 0, 0};
  TORCH_CHECK(g.stride_h >= 1 && g.stride_w >= 1 && g.pad_h >= 0 && g.pad_w >= 0 && g.height >= 1 && g.width >= 1,
              "urda_fast: conv2d_input_grad needs stride >= 1, padding >= 0 and a non-empty input");
  TORCH_CHECK(grad_out.size(1) == g.out_channels &&
                  g.out_h == (g.height + 2 * g.pad_h - g.kernel_h) / g.stride_h + 1 &&
                  g.out_w == (g.width + 2 * g.pad_w - g.kernel_w) / g.stride_w + 1 && g.out_h >= 1 && g.out_w >= 1,
              "urda_fast: grad_out ", grad_out.sizes(), " is not the output of weight ", weight.sizes(),
              " on a ", g.height, "x", g.width, " input with stride ", stride, " and padding ", padding);
  at::Tensor grad_in = at::empty({grad_out.size(0), channels, g.height, g.width}, grad_out.options());
  if (grad_out.size(0) == 0) return grad_in;
  // Loads reach ox = m0 + d + l for l < kBlock, with d between floor((pw - kw + 1) / sw) and floor((sw - 1 + pw) / sw)
  // and m0 + kBlock up to the phase's columns rounded up to a block: pad each row to cover them.
  const int64_t block = 64 / weight.element_size();
  const int64_t columns = (g.width + g.stride_w - 1) / g.stride_w;
  const int64_t d_min = floor_div(g.pad_w - g.kernel_w + 1, g.stride_w);
  const int64_t d_max = floor_div(g.stride_w - 1 + g.pad_w, g.stride_w);
  g.lead = std::max<int64_t>(0, -d_min);
  const int64_t trail = std::max<int64_t>(0, (columns + block - 1) / block * block + d_max - g.out_w);
  g.row = g.lead + g.out_w + trail;
  const at::Tensor weight_t = weight.permute({2, 3, 0, 1}).contiguous();  // (kh, kw, O, C)
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "urda_fast::conv2d_input_grad_cpu", [&] {
    switch (channels) {
      case 1: input_grad<1, scalar_t>(grad_out, weight_t, grad_in, g); break;
      case 2: input_grad<2, scalar_t>(grad_out, weight_t, grad_in, g); break;
      case 3: input_grad<3, scalar_t>(grad_out, weight_t, grad_in, g); break;
      default: input_grad<4, scalar_t>(grad_out, weight_t, grad_in, g); break;
    }
  });
  return grad_in;
}

at::Tensor conv2d_image_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding) {
  return at::conv2d(x, weight, bias, stride, padding);
}

}  // namespace

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) {
  m.impl("conv2d_input_grad", &conv2d_input_grad_cpu);
  m.impl("conv2d_image_forward", &conv2d_image_forward_cpu);
}

}  // namespace urda_fast
