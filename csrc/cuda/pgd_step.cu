// CUDA kernels for pgd_step / pgd_step_ (docs/kernel-contract.md). L-inf is one elementwise pass. L2 needs two
// per-sample norms: a (B, chunks) partial-sum pass over [sum g^2, sum d^2, sum d*g] (d = x - x0), a tiny per-sample
// pass that sums the chunks in a fixed order (deterministic) into the step scale s and projection factor f, then the
// elementwise pass. dn comes from the same reduction as sqrt(sum d^2 + 2 s sum d*g + (s gn)^2), as the contract allows.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cuda_utils.cuh"

namespace urda_fast {
namespace {

using cuda_utils::acc_t;
using cuda_utils::Pack;
using cuda_utils::Vals;

constexpr int kApplyThreads = 256;
constexpr int kReduceThreads = 256;
constexpr int kCoefThreads = 128;
// Planes (one sample's channel) at least this long take the plane kernel; shorter ones (feature vectors, per-channel
// bounds over (B, D)) would leave most of its threads idle and keep the flat kernel.
constexpr int64_t kMinPlane = 512;

// One output element. Linf: p0 = step[b], p1 = eps[b]. L2: p0 = s[b], p1 = f[b] from pgd_l2_coef_kernel.
template <bool L2, typename T>
__device__ __forceinline__ T pgd_element(T x, T g, T x0, T p0, T p1, T lo, T hi) {
  T y;
  if (L2) {
    y = x0 + (x - x0 + p0 * g) * p1;
  } else {
    // sign(0) = 0 (and sign(NaN) = 0, as torch.sign).
    const T sign = static_cast<T>((g > T(0)) - (g < T(0)));
    y = cuda_utils::clamp_nan(x + p0 * sign, x0 - p1, x0 + p1);
    y = x0 != x0 ? x0 : y;  // clamp_nan lets a NaN y through, not NaN bounds: a NaN x0 gives NaN, as the reference
  }
  return cuda_utils::clamp_nan(y, lo, hi);
}

// out may alias x (the in-place op), so no pointer is __restrict__. Element idx of the (B, C, inner) view has
// b = idx / (C * inner) and c = (idx / inner) % C. When inner % VEC == 0 a pack never straddles a channel, so one
// division serves the whole pack.
template <typename scalar_t, int VEC, bool L2>
__global__ void pgd_apply_kernel(scalar_t* out, const scalar_t* x, const scalar_t* g, const scalar_t* x0,
                                 const acc_t<scalar_t>* p0, const acc_t<scalar_t>* p1,
                                 const acc_t<scalar_t>* lower, const acc_t<scalar_t>* upper, int64_t n,
                                 int64_t channels, int64_t inner, bool pack_shares_channel) {
  using acc = acc_t<scalar_t>;
  const int64_t sample = channels * inner;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_packs = n / VEC;
  for (int64_t p = first; p < num_packs; p += stride) {
    const Pack<scalar_t, VEC> xv = cuda_utils::load_pack<VEC>(x, p);
    const Pack<scalar_t, VEC> gv = cuda_utils::load_pack<VEC>(g, p);
    const Pack<scalar_t, VEC> x0v = cuda_utils::load_pack<VEC>(x0, p);
    Pack<scalar_t, VEC> yv;
    const int64_t base = p * VEC;
    int64_t b = base / sample;
    int64_t c = (base / inner) % channels;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (!pack_shares_channel && j > 0) {
        b = (base + j) / sample;
        c = ((base + j) / inner) % channels;
      }
      yv.v[j] = static_cast<scalar_t>(pgd_element<L2>(static_cast<acc>(xv.v[j]), static_cast<acc>(gv.v[j]),
                                                      static_cast<acc>(x0v.v[j]), p0[b], p1[b], lower[c], upper[c]));
    }
    cuda_utils::store_pack<VEC>(out, p, yv);
  }
  for (int64_t i = num_packs * VEC + first; i < n; i += stride) {
    const int64_t b = i / sample;
    const int64_t c = (i / inner) % channels;
    out[i] = static_cast<scalar_t>(pgd_element<L2>(static_cast<acc>(x[i]), static_cast<acc>(g[i]),
                                                   static_cast<acc>(x0[i]), p0[b], p1[b], lower[c], upper[c]));
  }
}

// grid (planes, blocks per plane): block (plane, k) covers one (sample, channel) plane of `inner` elements, so the
// sample's step/eps and the channel's bounds are read once into registers and no element needs an integer division
// (the flat kernel above spends two or three 64-bit divisions -- emulated on NVIDIA GPUs -- per pack). Packs of VEC
// only when inner % VEC == 0 and the tensors are 16-byte aligned: then every plane starts on a pack boundary.
template <typename scalar_t, int VEC, bool L2>
__global__ void pgd_plane_kernel(scalar_t* out, const scalar_t* x, const scalar_t* g, const scalar_t* x0,
                                 const acc_t<scalar_t>* p0, const acc_t<scalar_t>* p1,
                                 const acc_t<scalar_t>* lower, const acc_t<scalar_t>* upper, int64_t channels,
                                 int64_t packs_per_plane) {
  using acc = acc_t<scalar_t>;
  const int64_t plane = blockIdx.x;
  const int64_t b = plane / channels;
  const int64_t c = plane - b * channels;
  const acc step_or_s = p0[b];
  const acc eps_or_f = p1[b];
  const acc lo = lower[c];
  const acc hi = upper[c];
  const int64_t first_pack = plane * packs_per_plane;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < packs_per_plane; i += stride) {
    const int64_t p = first_pack + i;
    const Pack<scalar_t, VEC> xv = cuda_utils::load_pack<VEC>(x, p);
    const Pack<scalar_t, VEC> gv = cuda_utils::load_pack<VEC>(g, p);
    const Pack<scalar_t, VEC> x0v = cuda_utils::load_pack<VEC>(x0, p);
    Pack<scalar_t, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      yv.v[j] = static_cast<scalar_t>(pgd_element<L2>(static_cast<acc>(xv.v[j]), static_cast<acc>(gv.v[j]),
                                                      static_cast<acc>(x0v.v[j]), step_or_s, eps_or_f, lo, hi));
    }
    cuda_utils::store_pack<VEC>(out, p, yv);
  }
}

// grid (B, chunks): block (b, k) sums its chunk of sample b into partial[b][k][0..2]. Sizes are in packs of VEC
// elements; the launcher only vectorises when a sample is a whole number of aligned packs.
template <typename scalar_t, int VEC>
__global__ void pgd_l2_partial_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                      const scalar_t* __restrict__ x0, acc_t<scalar_t>* __restrict__ partial,
                                      int64_t packs_per_sample, int64_t packs_per_chunk) {
  using acc = acc_t<scalar_t>;
  __shared__ Vals<acc, 3> shared[cuda_utils::kMaxWarps];
  const int64_t b = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t chunk_begin = chunk * packs_per_chunk;
  const int64_t chunk_end = chunk_begin + packs_per_chunk;
  const int64_t begin = b * packs_per_sample + (chunk_begin < packs_per_sample ? chunk_begin : packs_per_sample);
  const int64_t end = b * packs_per_sample + (chunk_end < packs_per_sample ? chunk_end : packs_per_sample);
  Vals<acc, 3> sums = {{acc(0), acc(0), acc(0)}};  // [g.g, d.d, d.g]
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    const Pack<scalar_t, VEC> xv = cuda_utils::load_pack<VEC>(x, p);
    const Pack<scalar_t, VEC> gv = cuda_utils::load_pack<VEC>(g, p);
    const Pack<scalar_t, VEC> x0v = cuda_utils::load_pack<VEC>(x0, p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc gj = static_cast<acc>(gv.v[j]);
      const acc dj = static_cast<acc>(xv.v[j]) - static_cast<acc>(x0v.v[j]);
      sums.v[0] += gj * gj;
      sums.v[1] += dj * dj;
      sums.v[2] += dj * gj;
    }
  }
  sums = cuda_utils::block_sum(sums, shared);
  if (threadIdx.x == 0) {
    acc* out = partial + (b * gridDim.y + chunk) * 3;
    out[0] = sums.v[0];
    out[1] = sums.v[1];
    out[2] = sums.v[2];
  }
}

// One thread per sample: coef[b] = s (step scale), coef[B + b] = f (projection factor).
template <typename acc>
__global__ void pgd_l2_coef_kernel(const acc* __restrict__ partial, const acc* __restrict__ step,
                                   const acc* __restrict__ eps, acc* __restrict__ coef, int64_t batch,
                                   int64_t chunks) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  acc gg = 0, dd = 0, dg = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    const acc* part = partial + (b * chunks + k) * 3;
    gg += part[0];
    dd += part[1];
    dg += part[2];
  }
  // A NaN/inf in the sample: all NaN, as the reference. Not dg: |dg| <= sqrt(gg dd) is finite when they are, yet
  // adding it could overflow a finite sum.
  if (!isfinite(gg + dd)) {
    coef[b] = coef[batch + b] = acc(NAN);
    return;
  }
  const acc kFloor = acc(1e-12);  // reference.L2_NORM_FLOOR
  const acc gn = cuda_utils::dev_sqrt(gg);
  const acc s = step[b] / (gn > kFloor ? gn : kFloor);
  // (s * gn) rather than s^2 * gg: s reaches step * 1e12 for a zero gradient and s^2 would overflow in float.
  const acc sgn = s * gn;
  const acc dn2 = dd + acc(2) * s * dg + sgn * sgn;
  const acc dn = cuda_utils::dev_sqrt(dn2 > acc(0) ? dn2 : acc(0));
  const acc ratio = eps[b] / (dn > kFloor ? dn : kFloor);
  coef[b] = s;
  coef[batch + b] = ratio < acc(1) ? ratio : acc(1);
}

template <typename scalar_t, bool L2>
void launch_apply(const at::Tensor& out, const at::Tensor& x, const at::Tensor& g, const at::Tensor& x0,
                  const acc_t<scalar_t>* p0, const acc_t<scalar_t>* p1, const at::Tensor& lower,
                  const at::Tensor& upper, int64_t channels, int64_t inner) {
  constexpr int V = cuda_utils::max_vec<scalar_t>();
  const int64_t n = x.numel();
  const bool aligned = cuda_utils::all_aligned16({out.data_ptr(), x.data_ptr(), g.data_ptr(), x0.data_ptr()});
  const auto stream = at::cuda::getCurrentCUDAStream();
  using acc = acc_t<scalar_t>;
  auto* out_ptr = out.data_ptr<scalar_t>();
  const auto* x_ptr = x.const_data_ptr<scalar_t>();
  const auto* g_ptr = g.const_data_ptr<scalar_t>();
  const auto* x0_ptr = x0.const_data_ptr<scalar_t>();
  const auto* lo_ptr = lower.const_data_ptr<acc>();
  const auto* hi_ptr = upper.const_data_ptr<acc>();
  const int64_t planes = n / inner;
  if (inner >= kMinPlane && planes <= INT32_MAX) {
    const bool packed = aligned && inner % V == 0;
    cuda_utils::dispatch_vec<V>(packed, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t packs = inner / VEC;
      // Enough blocks per plane for ~4 packs a thread, within gridDim.y's limit; the loop covers the rest.
      const int64_t per_plane = std::min<int64_t>(cuda_utils::ceil_div(packs, kApplyThreads * 4), 65535);
      const dim3 grid(static_cast<unsigned>(planes), static_cast<unsigned>(std::max<int64_t>(per_plane, 1)));
      pgd_plane_kernel<scalar_t, VEC, L2><<<grid, kApplyThreads, 0, stream>>>(
          out_ptr, x_ptr, g_ptr, x0_ptr, p0, p1, lo_ptr, hi_ptr, channels, packs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const auto grid = static_cast<unsigned>(cuda_utils::grid_for(aligned ? n / V + 1 : n, kApplyThreads));
  cuda_utils::dispatch_vec<V>(aligned, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    pgd_apply_kernel<scalar_t, VEC, L2><<<grid, kApplyThreads, 0, stream>>>(
        out_ptr, x_ptr, g_ptr, x0_ptr, p0, p1, lo_ptr, hi_ptr, n, channels, inner, inner % VEC == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_l2(const at::Tensor& out, const at::Tensor& x, const at::Tensor& g, const at::Tensor& x0,
               const at::Tensor& step, const at::Tensor& eps, const at::Tensor& lower, const at::Tensor& upper,
               int64_t batch, int64_t channels, int64_t inner) {
  using acc = acc_t<scalar_t>;
  constexpr int V = cuda_utils::max_vec<scalar_t>();
  const int64_t sample = channels * inner;
  const bool vectorise = sample % V == 0 && cuda_utils::all_aligned16({x.data_ptr(), g.data_ptr(), x0.data_ptr()});
  const int64_t packs_per_sample = vectorise ? sample / V : sample;
  const auto [chunks, packs_per_chunk] = cuda_utils::plan_row_chunks(batch, packs_per_sample, kReduceThreads);
  TORCH_CHECK(batch <= INT32_MAX, "urda_fast: an L2 pgd_step on CUDA takes at most 2^31 - 1 samples, got ", batch);
  TORCH_INTERNAL_ASSERT(chunks <= 65535, "pgd_step: reduction grid out of range");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_options = x.options().dtype(acc_scalar_type(x.scalar_type()));
  at::Tensor partial = at::empty({batch, chunks, 3}, acc_options);
  at::Tensor coef = at::empty({2, batch}, acc_options);

  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(chunks));
  cuda_utils::dispatch_vec<V>(vectorise, [&](auto vec) {
    pgd_l2_partial_kernel<scalar_t, decltype(vec)::value><<<grid, kReduceThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(),
        partial.data_ptr<acc>(), packs_per_sample, packs_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto coef_grid = static_cast<unsigned>(cuda_utils::ceil_div(batch, kCoefThreads));
  pgd_l2_coef_kernel<acc><<<coef_grid, kCoefThreads, 0, stream>>>(
      partial.const_data_ptr<acc>(), step.const_data_ptr<acc>(), eps.const_data_ptr<acc>(), coef.data_ptr<acc>(),
      batch, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const acc* coef_ptr = coef.const_data_ptr<acc>();
  launch_apply<scalar_t, true>(out, x, g, x0, coef_ptr, coef_ptr + batch, lower, upper, channels, inner);
}

// Shared by both ops; out is a fresh tensor (pgd_step) or x_adv itself (pgd_step_).
void pgd_step_into(const at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                   const at::Tensor& step_size, const at::Tensor& eps, const at::Tensor& lower,
                   const at::Tensor& upper, c10::string_view norm) {
  const bool l2 = parse_norm(norm) == PgdNorm::L2;
  const PgdShape shape = check_pgd_args(x_adv, grad, x_orig, step_size, eps, lower, upper, c10::DeviceType::CUDA);
  const int64_t n = x_adv.numel();
  if (n == 0) return;
  TORCH_INTERNAL_ASSERT(shape.batch * shape.channels * shape.inner == n);

  const at::cuda::OptionalCUDAGuard device_guard(at::device_of(x_adv));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cuda", [&] {
    using acc = acc_t<scalar_t>;
    if (l2) {
      launch_l2<scalar_t>(out, x_adv, grad, x_orig, step_size, eps, lower, upper, shape.batch, shape.channels,
                          shape.inner);
    } else {
      launch_apply<scalar_t, false>(out, x_adv, grad, x_orig, step_size.const_data_ptr<acc>(),
                                    eps.const_data_ptr<acc>(), lower, upper, shape.channels, shape.inner);
    }
  });
}

}  // namespace

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                         const at::Tensor& step_size, const at::Tensor& eps, const at::Tensor& lower,
                         const at::Tensor& upper, c10::string_view norm) {
  at::Tensor out = at::empty_like(x_adv, at::MemoryFormat::Contiguous);
  pgd_step_into(out, x_adv, grad, x_orig, step_size, eps, lower, upper, norm);
  return out;
}

void pgd_step_inplace_cuda(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                           const at::Tensor& step_size, const at::Tensor& eps, const at::Tensor& lower,
                           const at::Tensor& upper, c10::string_view norm) {
  pgd_step_into(x_adv, x_adv, grad, x_orig, step_size, eps, lower, upper, norm);
}

}  // namespace urda_fast

TORCH_LIBRARY_IMPL(urda_fast, CUDA, m) {
  m.impl("pgd_step", &urda_fast::pgd_step_cuda);
  m.impl("pgd_step_", &urda_fast::pgd_step_inplace_cuda);
}
