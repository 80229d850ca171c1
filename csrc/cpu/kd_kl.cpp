// Distillation KL on CPU (docs/kernel-contract.md). Forward: per row a max pass and one exp pass that gathers both
// softmax sums and the KL numerator, so the KL needs no third pass; it returns the row's softmax statistics.
// Backward: one pass per row that recomputes p and q from those statistics and writes only the gradients asked for.
// Training calls (float32/float64) take kd_kl_forward_with_grad instead: the exp pass also keeps the row's
// exponentials in a row scratch, and a third pass writes the gradients from them, so each exponential is computed
// once (recomputing them in the backward cost as much as the forward: on a CPU this kernel is bound by its exps, not
// by memory). Either way forward + backward allocates one (B, C) buffer per gradient, the least it can: the
// autograd scales the forward's buffer in place (urda_fast/ops/kd_kl.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "cpu_math.h"

namespace urda_fast {
namespace {

// Rows per parallel task: about 8k elements, so small batches of long rows still split across threads.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(cols, 1)); }

// The row's statistics, in the contract's form: max_t, log_sum_t, max_s, log_sum_s, with
// log p_j = (t_j - max_t) / T - log_sum_t. Shifting the raw logit by its max before scaling keeps log p exact
// for |logits| ~ 1e4, where t / T alone would already be rounded to ~1e-3.
template <typename acc_t>
struct RowStats {
  acc_t max_t, log_sum_t, max_s, log_sum_s;
};
// The (B, 4) stats tensor is read and written through this struct.
static_assert(sizeof(RowStats<float>) == 4 * sizeof(float) && sizeof(RowStats<double>) == 4 * sizeof(double));

// The next row's logits and gradient rows (null where absent), fetched into the cache while this row computes its
// exponentials. Without it a row's max pass waits on memory and its exp pass on arithmetic, one after the other: for
// 4096 x 1000 logits from a cold cache (bench/bench_kd_kl.py), forward + backward took 4.3 ms; with it, 3.5.
struct NextRow {
  const void* s = nullptr;
  const void* t = nullptr;
  void* grad_s = nullptr;
  void* grad_t = nullptr;
  int64_t elem_bytes = 0, bytes = 0;  // of one value, of a row
};

template <typename scalar_t>
NextRow next_row(const scalar_t* s, const scalar_t* t, scalar_t* grad_s, scalar_t* grad_t, int64_t i, int64_t end,
                 int64_t cols) {
  if (i + 1 >= end) return {};  // the next row is another task's
  const int64_t off = (i + 1) * cols;
  constexpr int64_t kElemBytes = sizeof(scalar_t);
  return {s + off, t + off, grad_s ? grad_s + off : nullptr, grad_t ? grad_t + off : nullptr, kElemBytes,
          cols * kElemBytes};
}

// Bytes [begin, end) of p, one cache line at a time (kWrite: for writing, so the lines come in owned).
template <int kWrite>
__attribute__((always_inline)) inline void prefetch_lines(const void* p, int64_t begin, int64_t end) {
  if (!p) return;
  const char* base = static_cast<const char*>(p);
  for (int64_t off = begin; off < end; off += 64) __builtin_prefetch(base + off, kWrite, 3);
}

// The row's KL and statistics over n logits. With kGrad (float32/float64 only) its gradients are written too, from
// the exponentials kept in `scratch` (2n values): the backward is then a per-row scale, and the exponentials are
// computed once instead of again in a recomputing backward (on a CPU the exps, not the memory traffic, bound this
// kernel). Only the first n_out gradients are written (the rest of the row is kl_row_forward's -inf padding).
template <bool kGrad, typename in_t, typename acc_t>
__attribute__((always_inline)) inline acc_t kl_row(const in_t* __restrict__ s, const in_t* __restrict__ t, int64_t n,
                                                   int64_t n_out, acc_t inv_t, RowStats<acc_t>& stats,
                                                   acc_t* __restrict__ scratch, acc_t* __restrict__ grad_s,
                                                   acc_t* __restrict__ grad_t, acc_t row_scale, const NextRow& next) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t max_t = kNegInf, max_s = kNegInf;
#pragma omp simd reduction(max : max_t, max_s)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t a = static_cast<acc_t>(t[j]), b = static_cast<acc_t>(s[j]);
    max_t = a > max_t ? a : max_t;
    max_s = b > max_s ? b : max_s;
  }
  // A row that is all -inf shifts by 0: -inf - -inf would be NaN.
  const acc_t shift_t = max_t == kNegInf ? acc_t(0) : max_t, shift_s = max_s == kNegInf ? acc_t(0) : max_s;
  // kl = sum_j p_j (log p_j - log q_j) = (sum_j e_j (a_j - b_j)) / sum_t - log sum_t + log sum_s with
  // a = (t - max_t) / T, b = (s - max_s) / T and e = exp(a); classes with e == 0 (teacher-masked) add nothing.
  acc_t sum_t = 0, sum_s = 0, weighted = 0;
  acc_t* __restrict__ exp_t = scratch;
  acc_t* __restrict__ exp_s = kGrad ? scratch + n : nullptr;
  // In chunks of 128 elements, each followed by the next row's lines at the same place: spread over the row, the
  // fetches overlap the arithmetic (chunks of 512, or all of them before the loop, overlapped less).
  constexpr int64_t kChunk = 128;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t stop = std::min(n, start + kChunk);
#pragma omp simd reduction(+ : sum_t, sum_s, weighted)
    for (int64_t j = start; j < stop; ++j) {
      const acc_t a = (static_cast<acc_t>(t[j]) - shift_t) * inv_t;
      const acc_t b = (static_cast<acc_t>(s[j]) - shift_s) * inv_t;
      const acc_t ea = vexp(a), eb = vexp(b);
      if constexpr (kGrad) {
        exp_t[j] = ea;
        exp_s[j] = eb;
      }
      sum_t += ea;
      sum_s += eb;
      weighted += ea <= 0 ? acc_t(0) : ea * (a - b);  // NaN kept
    }
    // In the next row's own values (a half row's padded copy here is float; the next row is still half).
    const int64_t lo = start * next.elem_bytes, hi = std::min(next.bytes, stop * next.elem_bytes);
    prefetch_lines<0>(next.s, lo, hi);
    prefetch_lines<0>(next.t, lo, hi);
    prefetch_lines<1>(next.grad_s, lo, hi);
    prefetch_lines<1>(next.grad_t, lo, hi);
  }
  stats = {max_t, std::log(sum_t), max_s, std::log(sum_s)};
  const acc_t kl = weighted / sum_t - stats.log_sum_t + stats.log_sum_s;
  if constexpr (kGrad) {
    // The backward's formulas (below), with p = e_t / sum_t and q = e_s / sum_s from the kept exponentials. A student
    // that equals its teacher must get exactly zero gradients, as from the recomputing backward.
    if (!grad_t) {
      // Student only (the usual call): q - p = (e_s - e_t * sum_s / sum_t) / sum_s, one pass over the exponentials.
      // Contracted into an FMA or not, it is exactly 0 for equal rows: their sums are equal, so the ratio is 1.
      const acc_t ratio = sum_s / sum_t, scale = inv_t / sum_s;
      if (grad_s) {
#pragma omp simd
        for (int64_t j = 0; j < n_out; ++j) {
          const acc_t grad = (exp_s[j] - exp_t[j] * ratio) * scale;  // rounded, then scaled: the backward's mul_
          grad_s[j] = grad * row_scale;
        }
      }
      return kl;
    }
    // p and q are rounded (stored) before q - p: contracted into an FMA, q - p would not be exactly 0 where equal.
    const acc_t inv_sum_t = acc_t(1) / sum_t, inv_sum_s = acc_t(1) / sum_s;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      exp_t[j] *= inv_sum_t;
      exp_s[j] *= inv_sum_s;
    }
    if (grad_s) {
#pragma omp simd
      for (int64_t j = 0; j < n_out; ++j) {
        const acc_t grad = (exp_s[j] - exp_t[j]) * inv_t;  // rounded, then scaled: the backward's mul_ bit for bit
        grad_s[j] = grad * row_scale;
      }
    }
    if (grad_t) {
      const acc_t log_sum_t = stats.log_sum_t, log_sum_s = stats.log_sum_s;
#pragma omp simd
      for (int64_t j = 0; j < n_out; ++j) {
        const acc_t p = exp_t[j];
        const acc_t log_p = (static_cast<acc_t>(t[j]) - shift_t) * inv_t - log_sum_t;
        const acc_t log_q = (static_cast<acc_t>(s[j]) - shift_s) * inv_t - log_sum_s;
        const acc_t grad = p * (log_p - log_q - kl) * inv_t;
        grad_t[j] = (p <= 0 ? acc_t(0) : grad) * row_scale;
      }
    }
  }
  return kl;
}

// Short rows whose length leaves 4 or more elements past the last full 16-wide vector run on a copy padded with -inf
// (exp(-inf) = 0 adds nothing to any sum): the scalar epilogue of a 16-wide loop made 31 classes (Office-31) cost
// 2.4x 32 (53 vs 22 us for 256 rows); padded, 29 us. Below 4 leftover elements the epilogue is cheaper than the copy.
constexpr int64_t kPadBelow = 512, kVector = 16, kPadFrom = 4;
int64_t padded_length(int64_t n) {
  return n % kVector >= kPadFrom && n < kPadBelow ? (n + kVector - 1) / kVector * kVector : n;
}

// One row per call; each has ISA clones (vexp is the hot spot), picked once per process, so a row pays one indirect
// call. `scratch` holds 2 * padded_length(n) values when kGrad.
template <bool kGrad, typename scalar_t>
URDA_FAST_CLONES typename AccType<scalar_t>::type kl_row_forward(
    const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t n, typename AccType<scalar_t>::type inv_t,
    RowStats<typename AccType<scalar_t>::type>& stats, typename AccType<scalar_t>::type* __restrict__ scratch,
    typename AccType<scalar_t>::type* __restrict__ grad_s, typename AccType<scalar_t>::type* __restrict__ grad_t,
    typename AccType<scalar_t>::type row_scale, const NextRow& next) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t padded = padded_length(n);
  if (padded == n) return kl_row<kGrad>(s, t, n, n, inv_t, stats, scratch, grad_s, grad_t, row_scale, next);
  alignas(64) acc_t s_pad[kPadBelow], t_pad[kPadBelow];
  for (int64_t j = 0; j < n; ++j) {
    s_pad[j] = static_cast<acc_t>(s[j]);
    t_pad[j] = static_cast<acc_t>(t[j]);
  }
  for (int64_t j = n; j < padded; ++j) s_pad[j] = t_pad[j] = -std::numeric_limits<acc_t>::infinity();
  return kl_row<kGrad>(s_pad, t_pad, padded, n, inv_t, stats, scratch, grad_s, grad_t, row_scale, next);
}

// d kl / d s_j = (q_j - p_j) / T and d kl / d t_j = p_j (log p_j - log q_j - kl) / T (0 where p_j == 0), each times
// the row's incoming gradient g.
template <typename scalar_t>
URDA_FAST_CLONES void kl_row_backward(
    const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, scalar_t* __restrict__ grad_s,
    scalar_t* __restrict__ grad_t, int64_t n, typename AccType<scalar_t>::type inv_t,
    const RowStats<typename AccType<scalar_t>::type>& stats, typename AccType<scalar_t>::type kl,
    typename AccType<scalar_t>::type g) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t max_t = stats.max_t, max_s = stats.max_s, log_sum_t = stats.log_sum_t, log_sum_s = stats.log_sum_s;
  const acc_t scale = g * inv_t;
  if (grad_s) {
    write_row<scalar_t, acc_t>(grad_s, n, [&](int64_t j) __attribute__((always_inline)) {
      const acc_t p = vexp((static_cast<acc_t>(t[j]) - max_t) * inv_t - log_sum_t);
      const acc_t q = vexp((static_cast<acc_t>(s[j]) - max_s) * inv_t - log_sum_s);
      return (q - p) * scale;
    });
  }
  if (grad_t) {
    write_row<scalar_t, acc_t>(grad_t, n, [&](int64_t j) __attribute__((always_inline)) {
      const acc_t log_p = (static_cast<acc_t>(t[j]) - max_t) * inv_t - log_sum_t;
      const acc_t log_q = (static_cast<acc_t>(s[j]) - max_s) * inv_t - log_sum_s;
      const acc_t p = vexp(log_p);
      // Both sides computed, then a select (a branch would block vectorisation): masked classes get exactly 0.
      const acc_t grad = p * (log_p - log_q - kl) * scale;
      return p <= 0 ? acc_t(0) : grad;  // p <= 0, not !(p > 0): a NaN p keeps its NaN
    });
  }
}

// Both forwards' argument checks, and their kl (B,) and stats (B, 4) outputs in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> checked_forward_outputs(const at::Tensor& student, const at::Tensor& teacher,
                                                           double temperature) {
  check_pair_2d(student, "student", teacher, "teacher", c10::DeviceType::CPU);
  check_temperature(temperature);
  const int64_t rows = student.size(0);
  TORCH_CHECK(rows == 0 || student.size(1) > 0, "urda_fast: logits need at least one class, got shape ",
              student.sizes());
  const auto acc_options = student.options().dtype(acc_scalar_type(student.scalar_type()));
  return {at::empty({rows}, acc_options), at::empty({rows, 4}, acc_options)};
}

std::tuple<at::Tensor, at::Tensor> kd_kl_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     double temperature) {
  at::Tensor kl, stats;  // not a structured binding: the kernels' lambdas capture them (C++20 before clang 16)
  std::tie(kl, stats) = checked_forward_outputs(student, teacher, temperature);
  const int64_t rows = student.size(0), cols = student.size(1);
  if (rows == 0) return {kl, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "urda_fast::kd_kl_forward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    acc_t* out = kl.mutable_data_ptr<acc_t>();
    auto* row_stats = reinterpret_cast<RowStats<acc_t>*>(stats.mutable_data_ptr<acc_t>());
    const auto inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = kl_row_forward<false, scalar_t>(s + i * cols, t + i * cols, cols, inv_t, row_stats[i], nullptr,
                                                 nullptr, nullptr, 1,
                                                 next_row<scalar_t>(s, t, nullptr, nullptr, i, end, cols));
      }
    });
  });
  return {kl, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_kl_forward_with_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, bool grad_student, bool grad_teacher,
    const std::optional<at::Tensor>& row_scale) {
  at::Tensor kl, stats;  // not a structured binding: the kernels' lambdas capture them (C++20 before clang 16)
  std::tie(kl, stats) = checked_forward_outputs(student, teacher, temperature);
  TORCH_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kDouble,
              "urda_fast: kd_kl_forward_with_grad takes float32 or float64 logits, got ", student.scalar_type(),
              "; use kd_kl_forward + kd_kl_backward for half types");
  const int64_t rows = student.size(0), cols = student.size(1);
  const bool scaled = row_scale.has_value() && row_scale->defined();
  if (scaled) {
    TORCH_CHECK(row_scale->device().is_cpu() && row_scale->scalar_type() == student.scalar_type() &&
                    row_scale->dim() == 1 && row_scale->size(0) == rows && row_scale->is_contiguous(),
                "urda_fast: kd_kl_forward_with_grad's row_scale must be a contiguous (", rows, ",) CPU tensor of the "
                "logits' dtype ", student.scalar_type(), ", got ", row_scale->sizes(), " ", row_scale->scalar_type(),
                " on ", row_scale->device());
  }
  at::Tensor d_student = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor d_teacher = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (rows == 0) return {kl, stats, d_student, d_teacher};
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "urda_fast::kd_kl_forward_with_grad_cpu", [&] {
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    scalar_t* gs = grad_student ? d_student.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = grad_teacher ? d_teacher.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = kl.mutable_data_ptr<scalar_t>();
    auto* row_stats = reinterpret_cast<RowStats<scalar_t>*>(stats.mutable_data_ptr<scalar_t>());
    const auto inv_t = static_cast<scalar_t>(1.0 / temperature);
    const scalar_t* scale = scaled ? row_scale->const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      // The row's exponentials: 8 KB for 1000 float32 classes, in L1 when the gradients are written from them.
      std::vector<scalar_t> scratch(2 * padded_length(cols));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t off = i * cols;
        out[i] = kl_row_forward<true, scalar_t>(s + off, t + off, cols, inv_t, row_stats[i], scratch.data(),
                                                gs ? gs + off : nullptr, gt ? gt + off : nullptr,
                                                scale ? scale[i] : scalar_t(1),
                                                next_row(s, t, gs, gt, i, end, cols));
      }
    });
  });
  return {kl, stats, d_student, d_teacher};
}

std::tuple<at::Tensor, at::Tensor> kd_kl_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& student,
                                                      const at::Tensor& teacher, const at::Tensor& kl,
                                                      const at::Tensor& stats, double temperature, bool grad_student,
                                                      bool grad_teacher) {
  check_pair_2d(student, "student", teacher, "teacher", c10::DeviceType::CPU);
  check_temperature(temperature);
  check_rows(student, grad_rows, "grad_rows", 1);
  check_rows(student, kl, "kl", 1);
  check_rows(student, stats, "stats", 4);
  const int64_t rows = student.size(0), cols = student.size(1);
  at::Tensor d_student = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor d_teacher = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (rows == 0 || cols == 0 || !(grad_student || grad_teacher)) return {d_student, d_teacher};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "urda_fast::kd_kl_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    scalar_t* gs = grad_student ? d_student.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = grad_teacher ? d_teacher.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* row_kl = kl.const_data_ptr<acc_t>();
    const auto* row_stats = reinterpret_cast<const RowStats<acc_t>*>(stats.const_data_ptr<acc_t>());
    const acc_t* g = grad_rows.const_data_ptr<acc_t>();
    const auto inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t off = i * cols;
        kl_row_backward(s + off, t + off, gs ? gs + off : nullptr, gt ? gt + off : nullptr, cols, inv_t, row_stats[i],
                        row_kl[i], g[i]);
      }
    });
  });
  return {d_student, d_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) {
  m.impl("kd_kl_forward", &kd_kl_forward_cpu);
  m.impl("kd_kl_forward_with_grad", &kd_kl_forward_with_grad_cpu);
  m.impl("kd_kl_backward", &kd_kl_backward_cpu);
}

}  // namespace urda_fast
