// CUDA kernels for kd_kl_forward / kd_kl_backward (docs/kernel-contract.md): row-wise KL(softmax(t/T) ||
// softmax(s/T)). One block per row.
//   forward: 1. online (max, sum of exp) of both rows at once, merged across the block;
//            2. log p, log q -> kl terms (block sum); the row's [max_t, log_sum_t, max_s, log_sum_s] are stored.
//   backward: one pass recomputing p and q from those statistics: d_student = g (q - p) / T and
//            d_teacher = g p (log p - log q - kl) / T, g the row's incoming gradient.
// Reading the logits again in the backward costs the same traffic as writing a gradient in the forward and scaling
// it in the backward, and keeps nothing logits-sized alive in between.
// The max is tracked on the raw logits and only differences (x - max) are scaled by 1/T, so log p = (t - max_t) / T
// - log(sum) never forms an unshifted t/T of size ~1e4 whose rounding would swamp the log-probabilities.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

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

// blockDim.x: a multiple of 32, at most max_row_threads. Row r spans packs [r * packs, (r + 1) * packs).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(max_row_threads<scalar_t>(), 1)
    kd_kl_forward_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                         acc_t<scalar_t>* __restrict__ kl, acc_t<scalar_t>* __restrict__ stats, int64_t packs,
                         acc_t<scalar_t> inv_t) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ Vals<acc, 4> shared_softmax[cuda_utils::kMaxWarps];
  __shared__ Vals<acc, 1> shared_kl[cuda_utils::kMaxWarps];
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * packs;
  const int64_t row_end = row_begin + packs;

  // Pass 1: [max_t, sum_t, max_s, sum_s]; (-inf, 0) is the identity of the merge.
  Vals<acc, 4> st = {{-INFINITY, acc(0), -INFINITY, acc(0)}};
  for (int64_t p = row_begin + threadIdx.x; p < row_end; p += blockDim.x) {
    const P tv = cuda_utils::load_pack<VEC>(teacher, p);
    const P sv = cuda_utils::load_pack<VEC>(student, p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      online_add(st.v[0], st.v[1], static_cast<acc>(tv.v[j]), inv_t);
      online_add(st.v[2], st.v[3], static_cast<acc>(sv.v[j]), inv_t);
    }
  }
  const Vals<acc, 4> identity = {{-INFINITY, acc(0), -INFINITY, acc(0)}};
  st = cuda_utils::block_allreduce(st, SoftmaxMerge<acc>{inv_t}, identity, shared_softmax);
  const acc max_t = st.v[0], log_sum_t = cuda_utils::dev_log(st.v[1]);
  const acc max_s = st.v[2], log_sum_s = cuda_utils::dev_log(st.v[3]);

  // Pass 2: kl = sum over p_j > 0 of p_j (log p_j - log q_j).
  Vals<acc, 1> kl_sum = {{acc(0)}};
  for (int64_t p = row_begin + threadIdx.x; p < row_end; p += blockDim.x) {
    const P tv = cuda_utils::load_pack<VEC>(teacher, p);
    const P sv = cuda_utils::load_pack<VEC>(student, p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc log_p = (static_cast<acc>(tv.v[j]) - max_t) * inv_t - log_sum_t;
      const acc log_q = (static_cast<acc>(sv.v[j]) - max_s) * inv_t - log_sum_s;
      const acc prob_p = cuda_utils::dev_exp(log_p);
      // p_j == 0 (teacher masked with -inf, or underflow) contributes 0, never 0 * (-inf - x) = NaN.
      if (!(prob_p <= acc(0))) kl_sum.v[0] += prob_p * (log_p - log_q);  // a NaN p keeps its NaN
    }
  }
  kl_sum = cuda_utils::block_sum(kl_sum, shared_kl);
  if (threadIdx.x == 0) {
    kl[blockIdx.x] = kl_sum.v[0];
    acc* row_stats = stats + 4 * static_cast<int64_t>(blockIdx.x);
    row_stats[0] = max_t;
    row_stats[1] = log_sum_t;
    row_stats[2] = max_s;
    row_stats[3] = log_sum_s;
  }
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
  TORCH_CHECK(temperature > 0.0, "urda_fast: temperature must be > 0, got ", temperature);
  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(student));
  const int64_t rows = student.size(0);
  const auto acc_options = student.options().dtype(acc_scalar_type(student.scalar_type()));
  at::Tensor stats = at::empty({rows, 4}, acc_options);
  if (rows == 0 || student.size(1) == 0) {  // no classes: an empty sum, kl = 0 (the contract asks for C >= 1 anyway)
    return {at::zeros({rows}, acc_options), stats.fill_(0)};
  }
  at::Tensor kl = at::empty({rows}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_kl_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const RowLaunch l = row_launch<scalar_t>(student, {student.data_ptr(), teacher.data_ptr()});
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc inv_t = static_cast<acc>(1.0 / temperature);
    cuda_utils::dispatch_vec<cuda_utils::max_vec<scalar_t>()>(l.vectorise, [&](auto vec) {
      kd_kl_forward_kernel<scalar_t, decltype(vec)::value><<<l.grid, l.threads, 0, stream>>>(
          student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), kl.data_ptr<acc>(),
          stats.data_ptr<acc>(), l.packs, inv_t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {kl, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_kl_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& student,
                                                       const at::Tensor& teacher, const at::Tensor& kl,
                                                       const at::Tensor& stats, double temperature,
                                                       bool grad_student, bool grad_teacher) {
  check_pair_2d(student, "student", teacher, "teacher", c10::DeviceType::CUDA);
  TORCH_CHECK(temperature > 0.0, "urda_fast: temperature must be > 0, got ", temperature);
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
  m.impl("kd_kl_backward", &urda_fast::kd_kl_backward_cuda);
}
