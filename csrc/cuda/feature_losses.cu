// CUDA kernels for the feature losses (docs/kernel-contract.md). Every reduction writes per-block partial sums that a
// second, tiny pass adds in a fixed order, so results are bitwise reproducible (no float atomics).
//   mse forward:     grid-stride partial sums of (a - b)^2 -> one block adds them and divides by B*D.
//   mse backward:    elementwise grad * 2 (a - b) / (B*D).
//   cosine forward:  (B, chunks) partial [a.b, a.a, b.b] -> one thread per row: stats and cos.
//   cosine backward: elementwise d_a and d_b in one pass over a and b, per-row coefficients from stats.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cuda_utils.cuh"

namespace urda_fast {
namespace {

using cuda_utils::acc_t;
using cuda_utils::Pack;
using cuda_utils::Vals;

constexpr int kThreads = 256;
constexpr int64_t kMaxMsePartials = 1024;

template <typename scalar_t, int VEC>
__global__ void mse_partial_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                   acc_t<scalar_t>* __restrict__ partial, int64_t n) {
  using acc = acc_t<scalar_t>;
  __shared__ Vals<acc, 1> shared[cuda_utils::kMaxWarps];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_packs = n / VEC;
  Vals<acc, 1> sum = {{acc(0)}};
  for (int64_t p = first; p < num_packs; p += stride) {
    const Pack<scalar_t, VEC> av = cuda_utils::load_pack<VEC>(a, p);
    const Pack<scalar_t, VEC> bv = cuda_utils::load_pack<VEC>(b, p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc d = static_cast<acc>(av.v[j]) - static_cast<acc>(bv.v[j]);
      sum.v[0] += d * d;
    }
  }
  for (int64_t i = num_packs * VEC + first; i < n; i += stride) {
    const acc d = static_cast<acc>(a[i]) - static_cast<acc>(b[i]);
    sum.v[0] += d * d;
  }
  sum = cuda_utils::block_sum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum.v[0];
}

// Single block: out = (sum of partials) / n.
template <typename acc>
__global__ void mse_finish_kernel(const acc* __restrict__ partial, int64_t num_partials, acc* __restrict__ out,
                                  acc n) {
  __shared__ Vals<acc, 1> shared[cuda_utils::kMaxWarps];
  Vals<acc, 1> sum = {{acc(0)}};
  for (int64_t i = threadIdx.x; i < num_partials; i += blockDim.x) sum.v[0] += partial[i];
  sum = cuda_utils::block_sum(sum, shared);
  if (threadIdx.x == 0) out[0] = sum.v[0] / n;
}

template <typename scalar_t, int VEC>
__global__ void mse_backward_kernel(const acc_t<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ a,
                                    const scalar_t* __restrict__ b, scalar_t* __restrict__ out, int64_t n,
                                    acc_t<scalar_t> two_over_n) {
  using acc = acc_t<scalar_t>;
  const acc coef = grad[0] * two_over_n;  // read on the device: no host sync on the 0-d grad
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_packs = n / VEC;
  for (int64_t p = first; p < num_packs; p += stride) {
    const Pack<scalar_t, VEC> av = cuda_utils::load_pack<VEC>(a, p);
    const Pack<scalar_t, VEC> bv = cuda_utils::load_pack<VEC>(b, p);
    Pack<scalar_t, VEC> ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      ov.v[j] = static_cast<scalar_t>(coef * (static_cast<acc>(av.v[j]) - static_cast<acc>(bv.v[j])));
    }
    cuda_utils::store_pack<VEC>(out, p, ov);
  }
  for (int64_t i = num_packs * VEC + first; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(coef * (static_cast<acc>(a[i]) - static_cast<acc>(b[i])));
  }
}

// grid (B, chunks): block (r, k) sums [a.b, a.a, b.b] over its chunk of row r into partial[r][k][0..2].
template <typename scalar_t, int VEC>
__global__ void cosine_partial_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                      acc_t<scalar_t>* __restrict__ partial, int64_t packs_per_row,
                                      int64_t packs_per_chunk) {
  using acc = acc_t<scalar_t>;
  __shared__ Vals<acc, 3> shared[cuda_utils::kMaxWarps];
  const int64_t row = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t chunk_begin = chunk * packs_per_chunk;
  const int64_t chunk_end = chunk_begin + packs_per_chunk;
  const int64_t begin = row * packs_per_row + (chunk_begin < packs_per_row ? chunk_begin : packs_per_row);
  const int64_t end = row * packs_per_row + (chunk_end < packs_per_row ? chunk_end : packs_per_row);
  Vals<acc, 3> sums = {{acc(0), acc(0), acc(0)}};
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    const Pack<scalar_t, VEC> av = cuda_utils::load_pack<VEC>(a, p);
    const Pack<scalar_t, VEC> bv = cuda_utils::load_pack<VEC>(b, p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc x = static_cast<acc>(av.v[j]);
      const acc y = static_cast<acc>(bv.v[j]);
      sums.v[0] += x * y;
      sums.v[1] += x * x;
      sums.v[2] += y * y;
    }
  }
  sums = cuda_utils::block_sum(sums, shared);
  if (threadIdx.x == 0) {
    acc* out = partial + (row * gridDim.y + chunk) * 3;
    out[0] = sums.v[0];
    out[1] = sums.v[1];
    out[2] = sums.v[2];
  }
}

// max(norm, eps), keeping a NaN norm (a NaN row's loss and gradients stay NaN, as the reference's, not ~1/eps).
template <typename acc>
__device__ __forceinline__ acc norm_floor(acc norm, acc eps) {
  return norm <= eps ? eps : norm;
}

// One thread per row: cos[r] = dot / (max(|a|, eps) * max(|b|, eps)), stats[r] = [cos, |a|, |b|].
template <typename acc>
__global__ void cosine_finish_kernel(const acc* __restrict__ partial, int64_t rows, int64_t chunks, acc eps,
                                     acc* __restrict__ cos, acc* __restrict__ stats) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  acc dot = 0, aa = 0, bb = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    const acc* part = partial + (r * chunks + k) * 3;
    dot += part[0];
    aa += part[1];
    bb += part[2];
  }
  const acc na = cuda_utils::dev_sqrt(aa);
  const acc nb = cuda_utils::dev_sqrt(bb);
  const acc c = dot / (norm_floor(na, eps) * norm_floor(nb, eps));
  stats[r * 3 + 0] = c;
  stats[r * 3 + 1] = na;
  stats[r * 3 + 2] = nb;
  cos[r] = c;
}

// Per-row backward coefficients, d_a = v[0] (b v[1] - a v[2]) and d_b = v[3] (a v[4] - b v[5]): d cos / d a =
// (1 / ca) (b / cb - (cos / na) a), ca = max(na, eps), the cos term only where na > eps. In this form no factor
// leaves float32's normal range for rows of large norm (1 / (ca cb) overflows, or falls to a subnormal, past ~1e19).
template <typename acc>
__device__ __forceinline__ Vals<acc, 6> cosine_coefs(const acc* __restrict__ grad, const acc* __restrict__ stats,
                                                     int64_t row, acc eps) {
  const acc cos = stats[row * 3 + 0], na = stats[row * 3 + 1], nb = stats[row * 3 + 2];
  const acc inv_a = acc(1) / norm_floor(na, eps), inv_b = acc(1) / norm_floor(nb, eps), g = grad[row];
  return {{g * inv_a, inv_b, na > eps ? cos / na : acc(0), g * inv_b, inv_a, nb > eps ? cos / nb : acc(0)}};
}

// d_a / d_b are nullptr when not requested. When dim % VEC == 0 a pack never straddles two rows, so the row's
// coefficients are computed once per pack.
template <typename scalar_t, int VEC>
__global__ void cosine_backward_kernel(const acc_t<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ a,
                                       const scalar_t* __restrict__ b, const acc_t<scalar_t>* __restrict__ stats,
                                       scalar_t* __restrict__ d_a, scalar_t* __restrict__ d_b, int64_t n,
                                       int64_t dim, acc_t<scalar_t> eps, bool pack_shares_row) {
  using acc = acc_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_packs = n / VEC;
  for (int64_t p = first; p < num_packs; p += stride) {
    const Pack<scalar_t, VEC> av = cuda_utils::load_pack<VEC>(a, p);
    const Pack<scalar_t, VEC> bv = cuda_utils::load_pack<VEC>(b, p);
    Pack<scalar_t, VEC> dav, dbv;
    const int64_t base = p * VEC;
    Vals<acc, 6> k = cosine_coefs(grad, stats, base / dim, eps);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (!pack_shares_row && j > 0) k = cosine_coefs(grad, stats, (base + j) / dim, eps);
      const acc x = static_cast<acc>(av.v[j]);
      const acc y = static_cast<acc>(bv.v[j]);
      dav.v[j] = static_cast<scalar_t>(k.v[0] * (y * k.v[1] - x * k.v[2]));
      dbv.v[j] = static_cast<scalar_t>(k.v[3] * (x * k.v[4] - y * k.v[5]));
    }
    if (d_a != nullptr) cuda_utils::store_pack<VEC>(d_a, p, dav);
    if (d_b != nullptr) cuda_utils::store_pack<VEC>(d_b, p, dbv);
  }
  for (int64_t i = num_packs * VEC + first; i < n; i += stride) {
    const Vals<acc, 6> k = cosine_coefs(grad, stats, i / dim, eps);
    const acc x = static_cast<acc>(a[i]);
    const acc y = static_cast<acc>(b[i]);
    if (d_a != nullptr) d_a[i] = static_cast<scalar_t>(k.v[0] * (y * k.v[1] - x * k.v[2]));
    if (d_b != nullptr) d_b[i] = static_cast<scalar_t>(k.v[3] * (x * k.v[4] - y * k.v[5]));
  }
}

}  // namespace

at::Tensor feature_mse_forward_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_pair_2d(a, "a", b, "b", c10::DeviceType::CUDA);
  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(a));
  const auto acc_options = a.options().dtype(acc_scalar_type(a.scalar_type()));
  const int64_t n = a.numel();
  if (n == 0) return at::full({}, std::numeric_limits<double>::quiet_NaN(), acc_options);  // as torch's mean
  at::Tensor out = at::empty({}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "feature_mse_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int V = cuda_utils::max_vec<scalar_t>();
    const bool vectorise = cuda_utils::all_aligned16({a.data_ptr(), b.data_ptr()});
    const int64_t blocks = std::min(cuda_utils::grid_for(vectorise ? n / V + 1 : n, kThreads * 4), kMaxMsePartials);
    at::Tensor partial = at::empty({blocks}, acc_options);
    const auto stream = at::cuda::getCurrentCUDAStream();
    cuda_utils::dispatch_vec<V>(vectorise, [&](auto vec) {
      mse_partial_kernel<scalar_t, decltype(vec)::value><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), partial.data_ptr<acc>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    mse_finish_kernel<acc><<<1, kThreads, 0, stream>>>(partial.const_data_ptr<acc>(), blocks, out.data_ptr<acc>(),
                                                       static_cast<acc>(n));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor feature_mse_backward_cuda(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b) {
  check_pair_2d(a, "a", b, "b", c10::DeviceType::CUDA);
  cuda_utils::check_acc_tensor(grad, "grad", a, {});
  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(a));
  at::Tensor out = at::empty_like(a, at::MemoryFormat::Contiguous);
  const int64_t n = a.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "feature_mse_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int V = cuda_utils::max_vec<scalar_t>();
    const bool vectorise = cuda_utils::all_aligned16({a.data_ptr(), b.data_ptr(), out.data_ptr()});
    const auto grid = static_cast<unsigned>(cuda_utils::grid_for(vectorise ? n / V + 1 : n, kThreads));
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc two_over_n = static_cast<acc>(2.0 / static_cast<double>(n));
    cuda_utils::dispatch_vec<V>(vectorise, [&](auto vec) {
      mse_backward_kernel<scalar_t, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(
          grad.const_data_ptr<acc>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), n, two_over_n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> feature_cosine_forward_cuda(const at::Tensor& a, const at::Tensor& b, double eps) {
  check_pair_2d(a, "a", b, "b", c10::DeviceType::CUDA);
  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(a));
  const int64_t rows = a.size(0);
  const auto acc_options = a.options().dtype(acc_scalar_type(a.scalar_type()));
  at::Tensor cos = at::empty({rows}, acc_options);
  at::Tensor stats = at::empty({rows, 3}, acc_options);
  if (rows == 0) return {at::full({}, std::numeric_limits<double>::quiet_NaN(), acc_options), stats};  // torch's mean
  const int64_t dim = a.numel() / rows;
  TORCH_CHECK(rows <= INT32_MAX, "urda_fast: feature_cosine on CUDA takes at most 2^31 - 1 rows, got ", rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "feature_cosine_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int V = cuda_utils::max_vec<scalar_t>();
    const bool vectorise = dim % V == 0 && cuda_utils::all_aligned16({a.data_ptr(), b.data_ptr()});
    const int64_t packs_per_row = vectorise ? dim / V : dim;
    // An empty row (dim == 0) still gets one block, which writes zero partials.
    const auto [chunks, packs_per_chunk] = cuda_utils::plan_row_chunks(rows, packs_per_row, kThreads);
    TORCH_INTERNAL_ASSERT(chunks <= 65535);
    at::Tensor partial = at::empty({rows, chunks, 3}, acc_options);
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
    const auto stream = at::cuda::getCurrentCUDAStream();
    cuda_utils::dispatch_vec<V>(vectorise, [&](auto vec) {
      cosine_partial_kernel<scalar_t, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), partial.data_ptr<acc>(), packs_per_row,
          packs_per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const auto finish_grid = static_cast<unsigned>(cuda_utils::ceil_div(rows, kThreads));
    cosine_finish_kernel<acc><<<finish_grid, kThreads, 0, stream>>>(partial.const_data_ptr<acc>(), rows, chunks,
                                                                    static_cast<acc>(eps), cos.data_ptr<acc>(),
                                                                    stats.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cos.neg_().add_(1).mean(), stats};  // mean_i (1 - cos_i)
}

std::tuple<at::Tensor, at::Tensor> feature_cosine_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                                const at::Tensor& b, const at::Tensor& stats,
                                                                double eps, bool grad_a, bool grad_b) {
  check_pair_2d(a, "a", b, "b", c10::DeviceType::CUDA);
  const int64_t rows = a.size(0);
  cuda_utils::check_acc_tensor(grad, "grad", a, {});
  cuda_utils::check_acc_tensor(stats, "stats", a, {rows, 3});
  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(a));
  at::Tensor d_a = grad_a ? at::empty_like(a, at::MemoryFormat::Contiguous) : at::empty({0}, a.options());
  at::Tensor d_b = grad_b ? at::empty_like(a, at::MemoryFormat::Contiguous) : at::empty({0}, a.options());
  const int64_t n = a.numel();
  if (n == 0 || !(grad_a || grad_b)) return {d_a, d_b};
  const int64_t dim = n / rows;
  // Every row's cosine gets the same gradient, d mean_i (1 - cos_i) / d cos_i = -1 / rows: the kernel reads it per
  // row, so it gets a (rows,) copy (a device op: no host read of grad).
  const at::Tensor grad_cos = grad.mul(-1.0 / static_cast<double>(rows)).expand({rows}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "feature_cosine_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int V = cuda_utils::max_vec<scalar_t>();
    scalar_t* da_ptr = grad_a ? d_a.data_ptr<scalar_t>() : nullptr;
    scalar_t* db_ptr = grad_b ? d_b.data_ptr<scalar_t>() : nullptr;
    const bool vectorise = cuda_utils::all_aligned16({a.data_ptr(), b.data_ptr(), da_ptr, db_ptr});
    const auto grid = static_cast<unsigned>(cuda_utils::grid_for(vectorise ? n / V + 1 : n, kThreads));
    const auto stream = at::cuda::getCurrentCUDAStream();
    cuda_utils::dispatch_vec<V>(vectorise, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      cosine_backward_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
          grad_cos.const_data_ptr<acc>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
          stats.const_data_ptr<acc>(), da_ptr, db_ptr, n, dim, static_cast<acc>(eps), dim % VEC == 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {d_a, d_b};
}

}  // namespace urda_fast

TORCH_LIBRARY_IMPL(urda_fast, CUDA, m) {
  m.impl("feature_mse_forward", &urda_fast::feature_mse_forward_cuda);
  m.impl("feature_mse_backward", &urda_fast::feature_mse_backward_cuda);
  m.impl("feature_cosine_forward", &urda_fast::feature_cosine_forward_cuda);
  m.impl("feature_cosine_backward", &urda_fast::feature_cosine_backward_cuda);
}
