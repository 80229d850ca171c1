// Distillation KL on CPU: per row, a max pass, one exp pass for both log-sum-exps (the exps kept in a row-sized
// scratch), a KL pass and the gradient passes (only those asked for) that reuse the stored exps. A row stays in L1/L2
// cache between passes, so the gradient costs compute, not memory traffic, and backward is a scale of what the forward
// wrote.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "cpu_math.h"

namespace urda_fast {
namespace {

template <typename scalar_t>
struct KlRow {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* s;
  const scalar_t* t;
  scalar_t* grad_s;  // nullptr when not requested
  scalar_t* grad_t;  // nullptr when not requested
  acc_t* exp_t;      // row-sized scratch: exp(t/T - max), so the KL pass needs no second exp
  acc_t* exp_s;      // row-sized scratch: exp(s/T - max)
  int64_t n;
  acc_t inv_t;
};

// always_inline: the body must be compiled inside each target clone below, or the AVX2 clone would just call the
// baseline (SSE2) code.
template <typename scalar_t>
__attribute__((always_inline)) inline typename AccType<scalar_t>::type kl_row(const KlRow<scalar_t>& r) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const scalar_t* __restrict__ s = r.s;
  const scalar_t* __restrict__ t = r.t;
  acc_t* __restrict__ exp_t = r.exp_t;
  acc_t* __restrict__ exp_s = r.exp_s;
  const acc_t inv_t = r.inv_t;
  const int64_t n = r.n;
  acc_t max_a = kNegInf, max_b = kNegInf;
#pragma omp simd reduction(max : max_a, max_b)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t a = static_cast<acc_t>(t[j]) * inv_t, b = static_cast<acc_t>(s[j]) * inv_t;
    max_a = a > max_a ? a : max_a;
    max_b = b > max_b ? b : max_b;
  }
  acc_t sum_a = 0, sum_b = 0;
#pragma omp simd reduction(+ : sum_a, sum_b)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t ea = vexp(static_cast<acc_t>(t[j]) * inv_t - max_a);
    const acc_t eb = vexp(static_cast<acc_t>(s[j]) * inv_t - max_b);
    exp_t[j] = ea;
    exp_s[j] = eb;
    sum_a += ea;
    sum_b += eb;
  }
  const acc_t lse_a = max_a + std::log(sum_a), lse_b = max_b + std::log(sum_b);
  const acc_t inv_sum_a = acc_t(1) / sum_a, inv_sum_b = acc_t(1) / sum_b;
  acc_t kl = 0;
#pragma omp simd reduction(+ : kl)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t p = exp_t[j] * inv_sum_a;
    const acc_t log_ratio = (static_cast<acc_t>(t[j]) - static_cast<acc_t>(s[j])) * inv_t - lse_a + lse_b;
    // p == 0 covers teacher-masked classes: 0 * log 0 = 0, and it keeps -inf - -inf out of the sum.
    kl += p > 0 ? p * log_ratio : acc_t(0);
  }
  if (r.grad_s) {
    scalar_t* __restrict__ grad_s = r.grad_s;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      grad_s[j] = static_cast<scalar_t>((exp_s[j] * inv_sum_b - exp_t[j] * inv_sum_a) * inv_t);
  }
  if (r.grad_t) {
    scalar_t* __restrict__ grad_t = r.grad_t;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = exp_t[j] * inv_sum_a;
      const acc_t log_ratio = (static_cast<acc_t>(t[j]) - static_cast<acc_t>(s[j])) * inv_t - lse_a + lse_b;
      // Both sides computed, then a select (a branch would block vectorisation): masked classes get exactly 0.
      const acc_t grad = p * (log_ratio - kl) * inv_t;
      grad_t[j] = static_cast<scalar_t>(p > 0 ? grad : acc_t(0));
    }
  }
  return kl;
}

// The float-compute rows get AVX2+FMA clones (vexp is the hot spot); double uses libm's exp and needs none.
URDA_FAST_CLONES float kl_row_f32(const KlRow<float>& r) { return kl_row(r); }
URDA_FAST_CLONES float kl_row_f16(const KlRow<c10::Half>& r) { return kl_row(r); }
URDA_FAST_CLONES float kl_row_bf16(const KlRow<c10::BFloat16>& r) { return kl_row(r); }
double kl_row_dispatch(const KlRow<double>& r) { return kl_row(r); }
float kl_row_dispatch(const KlRow<float>& r) { return kl_row_f32(r); }
float kl_row_dispatch(const KlRow<c10::Half>& r) { return kl_row_f16(r); }
float kl_row_dispatch(const KlRow<c10::BFloat16>& r) { return kl_row_bf16(r); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                 double temperature, bool grad_student,
                                                                 bool grad_teacher) {
  check_pair_2d(student, "student", teacher, "teacher", c10::DeviceType::CPU);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "urda_fast: temperature must be positive and finite, got ",
              temperature);
  const int64_t rows = student.size(0), cols = student.size(1);
  TORCH_CHECK(rows == 0 || cols > 0, "urda_fast: logits need at least one class, got shape ", student.sizes());
  at::Tensor kl = at::empty({rows}, student.options().dtype(acc_scalar_type(student.scalar_type())));
  at::Tensor d_student = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor d_teacher = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (rows == 0) return {kl, d_student, d_teacher};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "urda_fast::kd_kl_forward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    scalar_t* gs = grad_student ? d_student.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = grad_teacher ? d_teacher.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* out = kl.mutable_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / cols), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(2 * cols);  // per chunk, not per row: one allocation for many rows
      for (int64_t i = begin; i < end; ++i) {
        const int64_t off = i * cols;
        out[i] = kl_row_dispatch(KlRow<scalar_t>{s + off, t + off, gs ? gs + off : nullptr, gt ? gt + off : nullptr,
                                                 scratch.data(), scratch.data() + cols, cols, inv_t});
      }
    });
  });
  return {kl, d_student, d_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) { m.impl("kd_kl_forward", &kd_kl_forward_cpu); }

}  // namespace urda_fast
