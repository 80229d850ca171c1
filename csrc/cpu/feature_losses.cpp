// Feature-distillation losses on CPU: MSE (one reduction pass, one elementwise backward pass) and the mean per-sample
// cosine distance (one pass for dot and both norms, one elementwise backward pass). Reductions accumulate in double.
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

constexpr int64_t kGrainElems = 1 << 15;

// Rows per parallel_for task: about kGrainElems elements.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(cols, 1)); }

// `#pragma omp simd` cannot sit inside AT_DISPATCH's macro argument, so every loop lives in a function of its own
// (with its ISA clones).
template <typename scalar_t>
URDA_FAST_CLONES double squared_distance(const scalar_t* a, const scalar_t* b, int64_t begin, int64_t end) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = begin; k < end; ++k) {
    const double d = static_cast<double>(a[k]) - static_cast<double>(b[k]);
    acc += d * d;
  }
  return acc;
}

template <typename scalar_t, typename acc_t>
URDA_FAST_CLONES void scaled_difference(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t begin,
                                        int64_t end, acc_t c) {
  a += begin, b += begin;
  write_row<scalar_t, acc_t>(out + begin, end - begin, [&](int64_t k) __attribute__((always_inline)) {
    return c * (static_cast<acc_t>(a[k]) - static_cast<acc_t>(b[k]));
  });
}

// Row sums (a.b, a.a, b.b) in double.
template <typename scalar_t>
URDA_FAST_CLONES void dot_and_norms(const scalar_t* a, const scalar_t* b, int64_t n, double* out) {
  double dot = 0, aa = 0, bb = 0;
#pragma omp simd reduction(+ : dot, aa, bb)
  for (int64_t k = 0; k < n; ++k) {
    const double va = static_cast<double>(a[k]), vb = static_cast<double>(b[k]);
    dot += va * vb;
    aa += va * va;
    bb += vb * vb;
  }
  out[0] = dot, out[1] = aa, out[2] = bb;
}

at::Tensor feature_mse_forward_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_pair_2d(a, "a", b, "b", c10::DeviceType::CPU);
  const int64_t n = a.numel();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "urda_fast::feature_mse_forward_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    total = at::parallel_reduce(
        0, n, kGrainElems, 0.0,
        [&](int64_t begin, int64_t end, double acc) { return acc + squared_distance(pa, pb, begin, end); },
        std::plus<double>());
  });
  // 0 / 0 = NaN for an empty input, as torch's mean gives. A mean beyond float's range is inf, as torch's is
  // (at::scalar_tensor refuses to narrow it).
  double mean = total / static_cast<double>(n);
  const auto acc_type = acc_scalar_type(a.scalar_type());
  if (acc_type == at::kFloat && std::isfinite(mean) && std::abs(mean) > std::numeric_limits<float>::max()) {
    mean = std::copysign(std::numeric_limits<double>::infinity(), mean);
  }
  return at::scalar_tensor(mean, a.options().dtype(acc_type));
}

at::Tensor feature_mse_backward_cpu(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b) {
  check_pair_2d(a, "a", b, "b", c10::DeviceType::CPU);
  TORCH_CHECK(grad.numel() == 1, "urda_fast: grad of feature_mse must be a scalar, got shape ", grad.sizes());
  at::Tensor out = at::empty_like(a);
  const int64_t n = a.numel();
  if (n == 0) return out;
  const double coef = 2.0 * grad.item<double>() / static_cast<double>(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "urda_fast::feature_mse_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const acc_t c = static_cast<acc_t>(coef);
    at::parallel_for(0, n, kGrainElems,
                     [&](int64_t begin, int64_t end) { scaled_difference(pa, pb, po, begin, end, c); });
  });
  return out;
}

// The loss, mean_i (1 - cos_i), is summed in row order after the parallel pass: the same bits for any thread count.
std::tuple<at::Tensor, at::Tensor> feature_cosine_forward_cpu(const at::Tensor& a, const at::Tensor& b, double eps) {
  check_pair_2d(a, "a", b, "b", c10::DeviceType::CPU);
  const int64_t rows = a.size(0), cols = a.size(1);
  const auto acc_options = a.options().dtype(acc_scalar_type(a.scalar_type()));
  at::Tensor stats = at::empty({rows, 3}, acc_options);
  std::vector<double> distance(rows);
  const auto dtype = a.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "urda_fast::feature_cosine_forward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    acc_t* ps = stats.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double sums[3];
        dot_and_norms(pa + i * cols, pb + i * cols, cols, sums);
        const double dot = sums[0], na = std::sqrt(sums[1]), nb = std::sqrt(sums[2]);
        const double cos = dot / (std::max(na, eps) * std::max(nb, eps));
        distance[i] = 1.0 - cos;
        ps[3 * i] = static_cast<acc_t>(cos);
        ps[3 * i + 1] = static_cast<acc_t>(na);
        ps[3 * i + 2] = static_cast<acc_t>(nb);
      }
    });
  });
  double total = 0;
  for (const double d : distance) total += d;
  // 0 / 0 = NaN for an empty batch, as torch's mean gives.
  return {at::scalar_tensor(total / static_cast<double>(rows), acc_options), stats};
}

// d cos / d a = b / (ca cb) - cos a / na^2 = (1 / ca) (b / cb - (cos / na) a), ca = max(na, eps), the cos term only
// where |a| > eps (below it the norm is clamped). In this form no factor leaves float32's normal range for rows of
// any norm the forward gives a finite cosine for: 1 / (ca cb) overflows, or falls to a subnormal, past norms ~1e19.
template <typename scalar_t, typename acc_t>
URDA_FAST_CLONES void cosine_grad_row(const scalar_t* x, const scalar_t* other, scalar_t* out, int64_t n, acc_t outer,
                                      acc_t inv_other, acc_t self_coef) {
  write_row<scalar_t, acc_t>(out, n, [&](int64_t k) __attribute__((always_inline)) {
    return outer * (static_cast<acc_t>(other[k]) * inv_other - self_coef * static_cast<acc_t>(x[k]));
  });
}

std::tuple<at::Tensor, at::Tensor> feature_cosine_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                               const at::Tensor& b, const at::Tensor& stats,
                                                               double eps, bool grad_a, bool grad_b) {
  check_pair_2d(a, "a", b, "b", c10::DeviceType::CPU);
  const int64_t rows = a.size(0), cols = a.size(1);
  const auto acc_type = acc_scalar_type(a.scalar_type());
  TORCH_CHECK(grad.numel() == 1, "urda_fast: grad of feature_cosine must be a scalar, got shape ", grad.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 3 && stats.scalar_type() == acc_type &&
                  stats.is_contiguous(),
              "urda_fast: stats must be the contiguous (", rows, ", 3) tensor from feature_cosine_forward");
  at::Tensor da = grad_a ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor db = grad_b ? at::empty_like(b) : at::empty({0}, b.options());
  if (rows == 0 || (!grad_a && !grad_b)) return {da, db};
  // Every row's cosine gets the same gradient: d mean_i (1 - cos_i) / d cos_i = -1 / rows.
  const double row_grad = -grad.item<double>() / static_cast<double>(rows);
  const auto dtype = a.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "urda_fast::feature_cosine_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const acc_t g = static_cast<acc_t>(row_grad);
    const acc_t* ps = stats.const_data_ptr<acc_t>();
    scalar_t* pda = grad_a ? da.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pdb = grad_b ? db.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t cos = ps[3 * i], na = ps[3 * i + 1], nb = ps[3 * i + 2];
        const acc_t e = static_cast<acc_t>(eps);
        const acc_t inv_a = acc_t(1) / std::max(na, e), inv_b = acc_t(1) / std::max(nb, e);
        const int64_t off = i * cols;
        const acc_t coef_a = na > e ? cos / na : acc_t(0), coef_b = nb > e ? cos / nb : acc_t(0);
        if (pda) cosine_grad_row(pa + off, pb + off, pda + off, cols, g * inv_a, inv_b, coef_a);
        if (pdb) cosine_grad_row(pb + off, pa + off, pdb + off, cols, g * inv_b, inv_a, coef_b);
      }
    });
  });
  return {da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) {
  m.impl("feature_mse_forward", &feature_mse_forward_cpu);
  m.impl("feature_mse_backward", &feature_mse_backward_cpu);
  m.impl("feature_cosine_forward", &feature_cosine_forward_cpu);
  m.impl("feature_cosine_backward", &feature_cosine_backward_cpu);
}

}  // namespace urda_fast
