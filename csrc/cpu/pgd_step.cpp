// PGD step on CPU: one fused pass for L-inf; for L2 a reduction and a fused step per sample, back to back when the
// samples fit in cache or are enough to share out among the threads, else as two passes over the batch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "cpu_math.h"

namespace urda_fast {
namespace {

// Elements per parallel task: large enough to amortise the task, small enough to balance two cores.
constexpr int64_t kGrainElems = 1 << 15;
constexpr double kNormFloor = 1e-12;
// L2 samples whose three input tensors fit this (within a core's L2 cache) are reduced and stepped in one visit; so
// are larger ones when the batch has kSamplesPerThread per thread, the step then reading each from L2 or L3 instead
// of memory (64x3x224x224 float32 in place: 7.2 -> 6.1 ms on this project's 2-core machine). Fewer samples than that
// would leave threads idle or unequally loaded: they are shared out by planes, in two passes over the batch.
constexpr int64_t kCachedSampleBytes = 256 << 10;
constexpr int64_t kSamplesPerThread = 4;

template <typename scalar_t, typename acc_t>
struct PlaneArgs {
  acc_t step, eps, lower, upper;  // L-inf: step size; L2: step / |g|.  L2: eps holds the projection factor.
};

// One (sample, channel) plane. `out` may alias `x` (in-place variant), and `g` or `x0` may be `x` itself
// (pgd_step_(x, x, ...)), so none is __restrict__; each element is read before it is written.
template <typename scalar_t, typename acc_t>
URDA_FAST_CLONES void linf_plane(const scalar_t* x, const scalar_t* g, const scalar_t* x0,
                                 scalar_t* out, int64_t n, PlaneArgs<scalar_t, acc_t> p) {
  write_row<scalar_t, acc_t>(out, n, [&](int64_t k) __attribute__((always_inline)) {
    const acc_t origin = static_cast<acc_t>(x0[k]);
    acc_t y = static_cast<acc_t>(x[k]) + p.step * sign_of(static_cast<acc_t>(g[k]));
    y = clamp_to(y, origin - p.eps, origin + p.eps);  // lets a NaN y through, not a NaN origin's bounds: ...
    y = origin != origin ? origin : y;                  // ... a NaN x_orig gives NaN, as the reference
    return clamp_to(y, p.lower, p.upper);
  });
}

template <typename scalar_t, typename acc_t>
URDA_FAST_CLONES void l2_plane(const scalar_t* x, const scalar_t* g, const scalar_t* x0,
                               scalar_t* out, int64_t n, PlaneArgs<scalar_t, acc_t> p) {
  const acc_t factor = p.eps;
  write_row<scalar_t, acc_t>(out, n, [&](int64_t k) __attribute__((always_inline)) {
    const acc_t origin = static_cast<acc_t>(x0[k]);
    const acc_t delta = static_cast<acc_t>(x[k]) - origin + p.step * static_cast<acc_t>(g[k]);
    return clamp_to(origin + delta * factor, p.lower, p.upper);
  });
}

// Per-sample sums (g.g, d.g, d.d) with d = x - x0, in double: |d + s g|^2 = dd + 2 s dg + s^2 gg gives the
// projected norm without a second read of the tensors.
template <typename scalar_t>
URDA_FAST_CLONES void l2_sums(const scalar_t* x, const scalar_t* g, const scalar_t* x0, int64_t n, double* sums) {
  double gg = 0, dg = 0, dd = 0;
#pragma omp simd reduction(+ : gg, dg, dd)
  for (int64_t k = 0; k < n; ++k) {
    const double gv = static_cast<double>(g[k]);
    const double dv = static_cast<double>(x[k]) - static_cast<double>(x0[k]);
    gg += gv * gv;
    dg += dv * gv;
    dd += dv * dv;
  }
  sums[0] = gg, sums[1] = dg, sums[2] = dd;
}

template <typename scalar_t>
void pgd_step_kernel(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                     const at::Tensor& step_size, const at::Tensor& eps, const at::Tensor& lower,
                     const at::Tensor& upper, PgdNorm norm, PgdShape s, at::Tensor& out) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* x = x_adv.const_data_ptr<scalar_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* x0 = x_orig.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const acc_t* steps = step_size.const_data_ptr<acc_t>();
  const acc_t* budgets = eps.const_data_ptr<acc_t>();
  const acc_t* lo = lower.const_data_ptr<acc_t>();
  const acc_t* hi = upper.const_data_ptr<acc_t>();
  const int64_t sample = s.channels * s.inner;

  // L2: each sample's (step, eps) become (step / |g|, projection factor) from one reduction over the sample.
  const auto l2_args = [&](int64_t b, acc_t& scale, acc_t& factor) {
    double sums[3];
    const int64_t off = b * sample;
    l2_sums(x + off, g + off, x0 + off, sample, sums);
    // A NaN/inf in the sample: all NaN, as the reference (|g|^2 + |x - x0|^2; the cross term is bounded by them).
    if (!std::isfinite(sums[0] + sums[2])) {
      scale = factor = std::numeric_limits<acc_t>::quiet_NaN();
      return;
    }
    const double st = static_cast<double>(steps[b]) / std::max(std::sqrt(sums[0]), kNormFloor);
    const double dn2 = std::max(0.0, sums[2] + 2.0 * st * sums[1] + st * st * sums[0]);
    scale = static_cast<acc_t>(st);
    factor = static_cast<acc_t>(std::min(1.0, static_cast<double>(budgets[b]) / std::max(std::sqrt(dn2), kNormFloor)));
  };
  const bool cached_sample = 3 * sample * static_cast<int64_t>(sizeof(scalar_t)) <= kCachedSampleBytes;
  if (norm == PgdNorm::L2 && (cached_sample || s.batch >= kSamplesPerThread * at::get_num_threads())) {
    // Reduce and step one sample at a time, so the step reads the three tensors from cache instead of a second time
    // from memory.
    at::parallel_for(0, s.batch, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(sample, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t b = begin; b < end; ++b) {
                         acc_t scale, factor;
                         l2_args(b, scale, factor);
                         for (int64_t c = 0; c < s.channels; ++c) {
                           const int64_t off = b * sample + c * s.inner;
                           l2_plane<scalar_t, acc_t>(x + off, g + off, x0 + off, y + off, s.inner,
                                                     {scale, factor, lo[c], hi[c]});
                         }
                       }
                     });
    return;
  }
  std::vector<acc_t> scale(s.batch), factor(s.batch);
  if (norm == PgdNorm::L2) {
    at::parallel_for(0, s.batch, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(sample, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t b = begin; b < end; ++b) l2_args(b, scale[b], factor[b]);
                     });
  }
  const int64_t planes = s.batch * s.channels;
  at::parallel_for(0, planes, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(s.inner, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t plane = begin; plane < end; ++plane) {
                       const int64_t b = plane / s.channels, c = plane % s.channels, off = plane * s.inner;
                       if (norm == PgdNorm::Linf) {
                         linf_plane<scalar_t, acc_t>(x + off, g + off, x0 + off, y + off, s.inner,
                                                     {steps[b], budgets[b], lo[c], hi[c]});
                       } else {
                         l2_plane<scalar_t, acc_t>(x + off, g + off, x0 + off, y + off, s.inner,
                                                   {scale[b], factor[b], lo[c], hi[c]});
                       }
                     }
                   });
}

void run_pgd_step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                  const at::Tensor& step_size, const at::Tensor& eps, const at::Tensor& lower,
                  const at::Tensor& upper, std::string_view norm, at::Tensor& out) {
  const PgdShape s = check_pgd_args(x_adv, grad, x_orig, step_size, eps, lower, upper, c10::DeviceType::CPU);
  const PgdNorm kind = parse_norm(norm);
  if (x_adv.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "urda_fast::pgd_step_cpu", [&] {
    pgd_step_kernel<scalar_t>(x_adv, grad, x_orig, step_size, eps, lower, upper, kind, s, out);
  });
}

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                        const at::Tensor& step_size, const at::Tensor& eps, const at::Tensor& lower,
                        const at::Tensor& upper, std::string_view norm) {
  at::Tensor out = at::empty_like(x_adv);
  run_pgd_step(x_adv, grad, x_orig, step_size, eps, lower, upper, norm, out);
  return out;
}

void pgd_step_inplace_cpu(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                          const at::Tensor& step_size, const at::Tensor& eps, const at::Tensor& lower,
                          const at::Tensor& upper, std::string_view norm) {
  run_pgd_step(x_adv, grad, x_orig, step_size, eps, lower, upper, norm, x_adv);
}

}  // namespace

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) {
  m.impl("pgd_step", &pgd_step_cpu);
  m.impl("pgd_step_", &pgd_step_inplace_cpu);
}

}  // namespace urda_fast
