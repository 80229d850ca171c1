// CUDA kernels for kd_kl_forward / kd_kl_backward (docs/kernel-contract.md): row-wise KL(softmax(t/T) ||
// softmax(s/T)). One block per row.
//   forward: 1. online (max, sum of exp) of both rows at once, merged across the block;
//            2. log p, log q -> kl terms (block sum); the row's [max_t, log_sum_t, max_s, log_sum_s] are stored.
//   backward: one pass recomputing p and q from those statistics: d_student = g (q - p) / T and
//            d_teacher = g p (log p - log q - kl) / T, g the row's incoming gradient.
//   forward_with_grad: the forward, its second pass also writing d_student (a third, d_teacher), rows of up to 2048
//            16-byte packs kept in registers from the first pass: the logits are read once and the backward is a
//            per-row scale, or nothing when the forward was handed the row gradients (row_scale).
// The recomputing pair keeps nothing logits-sized alive between forward and backward; the with-grad forward reads
// the logits once instead of three times.
// The max is tracked on the raw logits and only differences (x - max) are scaled by 1/T, so log p = (t - max_t) / T
// - log(sum) never forms an unshifted t/T of size ~1e4 whose rounding would swamp the log-probabilities.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cuda_utils.cuh"

namespace urda_fast {
namespace {

using cuda_utils::acc_t;
using cuda_utils::Pack;
using cuda_utils::Vals;

// Running (max m, sum s of exp((x - m) / T)) of one row. -inf entries (masked classes) contribute nothing, and a NaN
// logit makes s NaN so that it reaches every output of its row.
template <typename T>
__device__ __forceinline__ void online_add(T& m, T& s, T x, T inv_t) {
  if (x > m) {
    s = s * cuda_utils::dev_exp((m - x) * inv_t) + T(1);  // m = -inf gives exp(-inf) = 0
    m = x;
  } else if (x != -INFINITY) {
    s += cuda_utils::dev_exp((x - m) * inv_t);
  }
}

template <typename T>
__device__ __forceinline__ void online_merge(T& m, T& s, T m2, T s2, T inv_t) {
  // The two lanes of a butterfly step hold the halves in opposite order; nvcc contracts s * e + s2 * e2 into an FMA
  // whose operand order decides its rounding, so put the larger (max, sum) first: both lanes compute the same bits.
  if (m2 > m || (m2 == m && s2 > s)) {
    const T m_first = m2, s_first = s2;
    m2 = m, s2 = s;
    m = m_first, s = s_first;
  }
  const T mm = m > m2 ? m : m2;
  if (mm == -INFINITY) {  // both halves saw only -inf: avoid exp(-inf - -inf) = NaN
    s = s + s2;
  } else {
    s = s * cuda_utils::dev_exp((m - mm) * inv_t) + s2 * cuda_utils::dev_exp((m2 - mm) * inv_t);
  }
  m = mm;
}

// Merges [max_t, sum_t, max_s, sum_s]; commutative (bitwise), so the butterfly reduction stays deterministic.
template <typename T>
struct SoftmaxMerge {
  T inv_t;
  __device__ __forceinline__ Vals<T, 4> operator()(Vals<T, 4> a, const Vals<T, 4>& b) const {
    online_merge(a.v[0], a.v[1], b.v[0], b.v[1], inv_t);
    online_merge(a.v[2], a.v[3], b.v[2], b.v[3], inv_t);
    return a;
  }
};

// Largest block per row. float64 needs ~70 registers per thread, more than a 1024-thread block can have (64), so
// its blocks stop at 512; the launch bound makes ptxas fit the registers to that size.
template <typename scalar_t>
constexpr int max_row_threads() {
  return sizeof(scalar_t) == 8 ? 512 : cuda_utils::kMaxThreads;
}

// d_student / d_teacher are nullptr when not requested (not both).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(max_row_threads<scalar_t>(), 1)
    kd_kl_backward_kernel(const acc_t<scalar_t>* __restrict__ grad_rows, const scalar_t* __restrict__ student,
                          const scalar_t* __restrict__ teacher, const acc_t<scalar_t>* __restrict__ kl,
                          const acc_t<scalar_t>* __restrict__ stats, scalar_t* __restrict__ d_student,
                          scalar_t* __restrict__ d_teacher, int64_t packs, acc_t<scalar_t> inv_t) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t row = blockIdx.x;
  const acc* row_stats = stats + 4 * row;
  const acc max_t = row_stats[0], log_sum_t = row_stats[1], max_s = row_stats[2], log_sum_s = row_stats[3];
  const acc scale = grad_rows[row] * inv_t, row_kl = kl[row];
  for (int64_t p = row * packs + threadIdx.x; p < (row + 1) * packs; p += blockDim.x) {
    const P tv = cuda_utils::load_pack<VEC>(teacher, p);
    const P sv = cuda_utils::load_pack<VEC>(student, p);
    P ds, dt;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc log_p = (static_cast<acc>(tv.v[j]) - max_t) * inv_t - log_sum_t;
      const acc log_q = (static_cast<acc>(sv.v[j]) - max_s) * inv_t - log_sum_s;
      const acc prob_p = cuda_utils::dev_exp(log_p);
      ds.v[j] = static_cast<scalar_t>((cuda_utils::dev_exp(log_q) - prob_p) * scale);
      dt.v[j] = static_cast<scalar_t>(prob_p <= acc(0) ? acc(0) : prob_p * (log_p - log_q - row_kl) * scale);
    }
    if (d_student != nullptr) cuda_utils::store_pack<VEC>(d_student, p, ds);
    if (d_teacher != nullptr) cuda_utils::store_pack<VEC>(d_teacher, p, dt);
  }
}

// The forward, one block per row: pass 1 the row's softmax statistics, pass 2 its kl terms and, for
// kd_kl_forward_with_grad, d_student = (q - p) / T, a pass 3 d_teacher = p (log p - log q - kl) / T (the row's kl is
// known only after pass 2); null gradient pointers skip them (kd_kl_forward). Each gradient is rounded, then times
// row_scale[row] when given (scaled_gradient). With CACHED > 0 each thread keeps its (at most CACHED) packs of both
// rows in registers from pass 1, so the logits are read from memory once; the host picks it for rows of up to
// CACHED * kCachedThreads packs, and CACHED == 0 (longer rows, and kd_kl_forward) reads them again.
// blockDim.x: a multiple of 32, at most the launch bound. Row r spans packs [r * packs, (r + 1) * packs).
constexpr int kCached = 4, kCachedThreads = 512;

// The gradient rounded to the logits' dtype, then times the row's scale and rounded again: bit for bit what
// multiplying an unscaled buffer by row_scale (autograd's in-place mul_) gives, for half types too.
template <typename scalar_t>
__device__ __forceinline__ scalar_t scaled_gradient(acc_t<scalar_t> grad, acc_t<scalar_t> scale) {
  return static_cast<scalar_t>(static_cast<acc_t<scalar_t>>(static_cast<scalar_t>(grad)) * scale);
}

// f(slot, pack) over this thread's packs of [row_begin, row_end), in the forward kernel's order; slot < CACHED.
template <int CACHED, typename F>
__device__ __forceinline__ void for_row_packs(int64_t row_begin, int64_t row_end, F&& f) {
  if constexpr (CACHED > 0) {
#pragma unroll
    for (int slot = 0; slot < CACHED; ++slot) {
      const int64_t p = row_begin + threadIdx.x + static_cast<int64_t>(slot) * blockDim.x;
      if (p < row_end) f(slot, p);
    }
  } else {
    for (int64_t p = row_begin + threadIdx.x; p < row_end; p += blockDim.x) f(0, p);
  }
}

template <typename scalar_t, int VEC, int CACHED>
__global__ void __launch_bounds__(CACHED > 0 ? kCachedThreads : max_row_threads<scalar_t>(), 1)
    kd_kl_forward_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                                   acc_t<scalar_t>* __restrict__ kl, acc_t<scalar_t>* __restrict__ stats,
                                   scalar_t* __restrict__ d_student, scalar_t* __restrict__ d_teacher,
                                   const acc_t<scalar_t>* __restrict__ row_scale, int64_t packs,
                                   acc_t<scalar_t> inv_t) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ Vals<acc, 4> shared_softmax[cuda_utils::kMaxWarps];
  __shared__ Vals<acc, 1> shared_kl[cuda_utils::kMaxWarps];
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * packs;
  const int64_t row_end = row_begin + packs;
  P teacher_cache[CACHED > 0 ? CACHED : 1] = {}, student_cache[CACHED > 0 ? CACHED : 1] = {};
  auto packs_at = [&](int slot, int64_t p, P& tv, P& sv) {
    if constexpr (CACHED > 0) {
      tv = teacher_cache[slot];
      sv = student_cache[slot];
    } else {
      tv = cuda_utils::load_pack<VEC>(teacher, p);
      sv = cuda_utils::load_pack<VEC>(student, p);
    }
  };

  // Pass 1: [max_t, sum_t, max_s, sum_s]; (-inf, 0) is the identity of the merge.
  Vals<acc, 4> st = {{-INFINITY, acc(0), -INFINITY, acc(0)}};
  for_row_packs<CACHED>(row_begin, row_end, [&](int slot, int64_t p) {
    const P tv = cuda_utils::load_pack<VEC>(teacher, p);
    const P sv = cuda_utils::load_pack<VEC>(student, p);
    if constexpr (CACHED > 0) {
      teacher_cache[slot] = tv;
      student_cache[slot] = sv;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      online_add(st.v[0], st.v[1], static_cast<acc>(tv.v[j]), inv_t);
      online_add(st.v[2], st.v[3], static_cast<acc>(sv.v[j]), inv_t);
    }
  });
  const Vals<acc, 4> identity = {{-INFINITY, acc(0), -INFINITY, acc(0)}};
  st = cuda_utils::block_allreduce(st, SoftmaxMerge<acc>{inv_t}, identity, shared_softmax);
  const acc max_t = st.v[0], log_sum_t = cuda_utils::dev_log(st.v[1]);
  const acc max_s = st.v[2], log_sum_s = cuda_utils::dev_log(st.v[3]);
  const acc scale = row_scale != nullptr ? row_scale[blockIdx.x] : acc(1);

  // Pass 2: kl = sum over p_j > 0 of p_j (log p_j - log q_j), and d_student. Equal rows give equal log p and log q,
  // so exactly zero gradients.
  Vals<acc, 1> kl_sum = {{acc(0)}};
  for_row_packs<CACHED>(row_begin, row_end, [&](int slot, int64_t p) {
    P tv, sv, ds;
    packs_at(slot, p, tv, sv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc log_p = (static_cast<acc>(tv.v[j]) - max_t) * inv_t - log_sum_t;
      const acc log_q = (static_cast<acc>(sv.v[j]) - max_s) * inv_t - log_sum_s;
      const acc prob_p = cuda_utils::dev_exp(log_p);
      // p_j == 0 (teacher masked with -inf, or underflow) contributes 0, never 0 * (-inf - x) = NaN.
      if (!(prob_p <= acc(0))) kl_sum.v[0] += prob_p * (log_p - log_q);  // a NaN p keeps its NaN
      if (d_student != nullptr) {
        ds.v[j] = scaled_gradient<scalar_t>((cuda_utils::dev_exp(log_q) - prob_p) * inv_t, scale);
      }
    }
    if (d_student != nullptr) cuda_utils::store_pack<VEC>(d_student, p, ds);
  });
  kl_sum = cuda_utils::block_sum(kl_sum, shared_kl);
  const acc row_kl = kl_sum.v[0];
  if (threadIdx.x == 0) {
    kl[blockIdx.x] = row_kl;
    acc* row_stats = stats + 4 * static_cast<int64_t>(blockIdx.x);
    row_stats[0] = max_t;
    row_stats[1] = log_sum_t;
    row_stats[2] = max_s;
    row_stats[3] = log_sum_s;
  }
  if (d_teacher == nullptr) return;

  // Pass 3: d_teacher, 0 where p == 0 (masked classes).
  for_row_packs<CACHED>(row_begin, row_end, [&](int slot, int64_t p) {
    P tv, sv, dt;
    packs_at(slot, p, tv, sv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc log_p = (static_cast<acc>(tv.v[j]) - max_t) * inv_t - log_sum_t;
      const acc log_q = (static_cast<acc>(sv.v[j]) - max_s) * inv_t - log_sum_s;
      const acc prob_p = cuda_utils::dev_exp(log_p);
      const acc grad = prob_p <= acc(0) ? acc(0) : prob_p * (log_p - log_q - row_kl) * inv_t;
      dt.v[j] = scaled_gradient<scalar_t>(grad, scale);
    }
    cuda_utils::store_pack<VEC>(d_teacher, p, dt);
  });
}

// Enough threads that each loads a handful of packs per pass, at least 4 warps.
int threads_for_row(int64_t packs, int max_threads) {
  if (packs <= 512) return 128;
  if (packs <= 2048) return 256;
  if (packs <= 8192) return 512;
  return max_threads;
}

struct RowLaunch {
  bool vectorise;
  int64_t packs;
  int threads;
  unsigned grid;
};

template <typename scalar_t>
RowLaunch row_launch(const at::Tensor& student, std::initializer_list<const void*> ptrs) {
  constexpr int V = cuda_utils::max_vec<scalar_t>();
  const int64_t rows = student.size(0);
  const int64_t cols = student.size(1);
  const bool vectorise = cols % V == 0 && cuda_utils::all_aligned16(ptrs);
  const int64_t packs = vectorise ? cols / V : cols;
  const int threads = threads_for_row(packs, max_row_threads<scalar_t>());
  TORCH_INTERNAL_ASSERT(threads % cuda_utils::kWarpSize == 0 && threads <= cuda_utils::kMaxThreads);
  TORCH_CHECK(rows <= INT32_MAX, "urda_fast: kd_kl: too many rows (", rows, ") for one grid");
  return {vectorise, packs, threads, static_cast<unsigned>(rows)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_kl_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                      double temperature) {
  check_pair_2d(student, "student", teacher, "teacher", c10::DeviceType::CUDA);
  check_temperature(temperature);
  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(student));
  const int64_t rows = student.size(0);
  TORCH_CHECK(rows == 0 || student.size(1) > 0, "urda_fast: logits need at least one class, got shape ",
              student.sizes());  // as the CPU's and the with-grad op's
  const auto acc_options = student.options().dtype(acc_scalar_type(student.scalar_type()));
  at::Tensor stats = at::empty({rows, 4}, acc_options);
  if (rows == 0) {
    return {at::zeros({rows}, acc_options), stats};
  }
  at::Tensor kl = at::empty({rows}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_kl_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const RowLaunch l = row_launch<scalar_t>(student, {student.data_ptr(), teacher.data_ptr()});
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc inv_t = static_cast<acc>(1.0 / temperature);
    cuda_utils::dispatch_vec<cuda_utils::max_vec<scalar_t>()>(l.vectorise, [&](auto vec) {
      kd_kl_forward_kernel<scalar_t, decltype(vec)::value, 0><<<l.grid, l.threads, 0, stream>>>(
          student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), kl.data_ptr<acc>(),
          stats.data_ptr<acc>(), nullptr, nullptr, nullptr, l.packs, inv_t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {kl, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_kl_forward_with_grad_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, bool grad_student, bool grad_teacher,
    const std::optional<at::Tensor>& row_scale) {
  check_pair_2d(student, "student", teacher, "teacher", c10::DeviceType::CUDA);
  check_temperature(temperature);
  const int64_t rows = student.size(0);
  TORCH_CHECK(rows == 0 || student.size(1) > 0, "urda_fast: logits need at least one class, got shape ",
              student.sizes());
  const auto acc_type = acc_scalar_type(student.scalar_type());
  const bool scaled = row_scale.has_value() && row_scale->defined();
  if (scaled) {
    TORCH_CHECK(row_scale->device() == student.device() && row_scale->scalar_type() == acc_type &&
                    row_scale->dim() == 1 && row_scale->size(0) == rows && row_scale->is_contiguous(),
                "urda_fast: kd_kl_forward_with_grad's row_scale must be a contiguous (", rows, ",) tensor of dtype ",
                acc_type, " on ", student.device(), ", got ", row_scale->sizes(), " ", row_scale->scalar_type(),
                " on ", row_scale->device());
  }
  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(student));
  const auto acc_options = student.options().dtype(acc_type);
  at::Tensor kl = at::empty({rows}, acc_options), stats = at::empty({rows, 4}, acc_options);
  at::Tensor d_student = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor d_teacher = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (rows == 0) return {kl, stats, d_student, d_teacher};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_kl_forward_with_grad_cuda", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* ds_ptr = grad_student ? d_student.data_ptr<scalar_t>() : nullptr;
    scalar_t* dt_ptr = grad_teacher ? d_teacher.data_ptr<scalar_t>() : nullptr;
    RowLaunch l = row_launch<scalar_t>(student, {student.data_ptr(), teacher.data_ptr(), ds_ptr, dt_ptr});
    const bool cached = l.packs <= static_cast<int64_t>(kCached) * kCachedThreads;
    if (cached) {  // enough threads for kCached packs each, and never fewer than the forward's
      const int64_t needed = cuda_utils::ceil_div(l.packs, kCached);
      const int64_t warps = cuda_utils::ceil_div(needed, cuda_utils::kWarpSize);
      l.threads = std::max<int>(std::min<int>(l.threads, kCachedThreads), warps * cuda_utils::kWarpSize);
    }
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc inv_t = static_cast<acc>(1.0 / temperature);
    const acc* scale_ptr = scaled ? row_scale->const_data_ptr<acc>() : nullptr;
    cuda_utils::dispatch_vec<cuda_utils::max_vec<scalar_t>()>(l.vectorise, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      auto kernel = cached ? kd_kl_forward_kernel<scalar_t, V, kCached> : kd_kl_forward_kernel<scalar_t, V, 0>;
      kernel<<<l.grid, l.threads, 0, stream>>>(student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
                                               kl.data_ptr<acc>(), stats.data_ptr<acc>(), ds_ptr, dt_ptr, scale_ptr,
                                               l.packs, inv_t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {kl, stats, d_student, d_teacher};
}

std::tuple<at::Tensor, at::Tensor> kd_kl_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& student,
                                                       const at::Tensor& teacher, const at::Tensor& kl,
                                                       const at::Tensor& stats, double temperature,
                                                       bool grad_student, bool grad_teacher) {
  check_pair_2d(student, "student", teacher, "teacher", c10::DeviceType::CUDA);
  check_temperature(temperature);  // positive and finite (an inf gave zero gradients; the CPU refuses it)
  check_rows(student, grad_rows, "grad_rows", 1);
  check_rows(student, kl, "kl", 1);
  check_rows(student, stats, "stats", 4);
  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(student));
  at::Tensor d_student = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor d_teacher = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (student.size(0) == 0 || student.size(1) == 0 || !(grad_student || grad_teacher)) return {d_student, d_teacher};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_kl_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* ds_ptr = grad_student ? d_student.data_ptr<scalar_t>() : nullptr;
    scalar_t* dt_ptr = grad_teacher ? d_teacher.data_ptr<scalar_t>() : nullptr;
    const RowLaunch l = row_launch<scalar_t>(student, {student.data_ptr(), teacher.data_ptr(), ds_ptr, dt_ptr});
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc inv_t = static_cast<acc>(1.0 / temperature);
    cuda_utils::dispatch_vec<cuda_utils::max_vec<scalar_t>()>(l.vectorise, [&](auto vec) {
      kd_kl_backward_kernel<scalar_t, decltype(vec)::value><<<l.grid, l.threads, 0, stream>>>(
          grad_rows.const_data_ptr<acc>(), student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
          kl.const_data_ptr<acc>(), stats.const_data_ptr<acc>(), ds_ptr, dt_ptr, l.packs, inv_t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {d_student, d_teacher};
}

}  // namespace urda_fast

TORCH_LIBRARY_IMPL(urda_fast, CUDA, m) {
  m.impl("kd_kl_forward", &urda_fast::kd_kl_forward_cuda);
  m.impl("kd_kl_forward_with_grad", &urda_fast::kd_kl_forward_with_grad_cuda);
  m.impl("kd_kl_backward", &urda_fast::kd_kl_backward_cuda);
}
