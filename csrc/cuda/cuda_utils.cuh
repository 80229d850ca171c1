// Device and host helpers shared by the urda_fast CUDA kernels (csrc/cuda/*.cu).
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"  // ATen, the host-side argument checks and acc_scalar_type

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace urda_fast {
namespace cuda_utils {

// float for half/bfloat16/float, double for double: the contract's "acc" (and "loss") dtype.
template <typename scalar_t>
using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;

constexpr int kWarpSize = 32;
// Every block reduction below keeps one slot per warp; launchers never exceed this many threads.
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// ---------------------------------------------------------------------------------------------------------------
// Vectorised memory access: VEC elements moved as one 16-byte (or narrower) transaction. Callers only use the
// VEC > 1 instantiation when every pointer is aligned to sizeof(Pack) (see all_aligned16) and handle the tail.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Elements per 16-byte pack: 8 for half/bfloat16, 4 for float, 2 for double.
template <typename scalar_t>
constexpr int max_vec() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p, int64_t pack_index) {
  return reinterpret_cast<const Pack<scalar_t, VEC>*>(p)[pack_index];
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, int64_t pack_index, const Pack<scalar_t, VEC>& v) {
  reinterpret_cast<Pack<scalar_t, VEC>*>(p)[pack_index] = v;
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// True when every non-null pointer allows 16-byte packs.
inline bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned(p, 16)) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions. A fixed value array travels through the shuffles so one pass reduces several sums at once.
template <typename T, int N>
struct Vals {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T shfl_xor(T x, int offset) {
  return __shfl_xor_sync(0xffffffffu, x, offset);
}

template <typename T, int N>
__device__ __forceinline__ Vals<T, N> shfl_xor(const Vals<T, N>& x, int offset) {
  Vals<T, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = __shfl_xor_sync(0xffffffffu, x.v[i], offset);
  return r;
}

// Butterfly reduction: with a commutative op every lane ends with the bitwise-identical result.
template <typename S, typename Op>
__device__ __forceinline__ S warp_allreduce(S val, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) val = op(val, shfl_xor(val, offset));
  return val;
}

// All-reduce over the block; every thread gets the same (deterministic) result. Requires blockDim.x to be a multiple
// of 32 and <= kMaxThreads, `shared` to hold kMaxWarps entries, and every thread of the block to call it. The
// trailing barrier lets the caller reuse `shared` for the next reduction straight away.
template <typename S, typename Op>
__device__ __forceinline__ S block_allreduce(S val, Op op, S identity, S* shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  val = warp_allreduce(val, op);
  if (lane == 0) shared[warp] = val;
  __syncthreads();
  // Every warp re-reduces the per-warp partials in the same order, which broadcasts without another barrier.
  val = lane < num_warps ? shared[lane] : identity;
  val = warp_allreduce(val, op);
  __syncthreads();
  return val;
}

template <typename T, int N>
struct SumOp {
  __device__ __forceinline__ Vals<T, N> operator()(const Vals<T, N>& a, const Vals<T, N>& b) const {
    Vals<T, N> r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
};

template <typename T, int N>
__device__ __forceinline__ Vals<T, N> block_sum(const Vals<T, N>& val, Vals<T, N>* shared) {
  Vals<T, N> zero;
#pragma unroll
  for (int i = 0; i < N; ++i) zero.v[i] = T(0);
  return block_allreduce(val, SumOp<T, N>(), zero, shared);
}

// Explicit float/double overloads so that float math never silently promotes to double.
__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return ::log(x); }
__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return ::sqrt(x); }

// min(max(v, lo), hi) that lets a NaN v through, as torch.minimum/maximum do.
template <typename T>
__device__ __forceinline__ T clamp_nan(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// ---------------------------------------------------------------------------------------------------------------
// Launch helpers.
constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Grid for a grid-stride loop over `work` items: enough blocks to fill the device, never zero.
inline int64_t grid_for(int64_t work, int threads) {
  const int64_t wanted = ceil_div(work, threads);
  return std::max<int64_t>(1, std::min<int64_t>(wanted, sm_count() * 32));
}

// Chunks per sample for a (B, chunks) per-sample reduction of `units` loads each: about four blocks per SM in all,
// at least ~4 loads per thread per chunk, and few enough chunks that a sequential second pass over them stays cheap.
inline int64_t chunks_per_sample(int64_t batch, int64_t units, int threads) {
  constexpr int64_t kMaxChunks = 1024;
  const int64_t by_device = ceil_div(sm_count() * 4, std::max<int64_t>(batch, 1));
  const int64_t by_work = ceil_div(units, static_cast<int64_t>(threads) * 4);
  return std::max<int64_t>(1, std::min({by_device, by_work, kMaxChunks}));
}

// Calls launch(std::integral_constant<int, VEC>{}) with VEC = V when `vectorise`, else VEC = 1, so one call site
// instantiates both the packed kernel and its scalar fallback.
template <int V, typename Launch>
void dispatch_vec(bool vectorise, Launch&& launch) {
  if (vectorise) {
    launch(std::integral_constant<int, V>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// Split for a (B, chunks) grid in which block (b, k) reduces units [k * per_chunk, (k + 1) * per_chunk) of row b.
// Never zero chunks (an empty row still gets one block, which writes zero partials) and no chunk past the row's end.
struct RowChunks {
  int64_t chunks;
  int64_t per_chunk;
};

inline RowChunks plan_row_chunks(int64_t batch, int64_t units, int threads) {
  const int64_t wanted = chunks_per_sample(batch, units, threads);
  const int64_t per_chunk = std::max<int64_t>(1, ceil_div(units, wanted));
  return {std::max<int64_t>(1, ceil_div(units, per_chunk)), per_chunk};
}

// ---------------------------------------------------------------------------------------------------------------
// Host-side check for the auxiliary inputs that common.h's helpers do not cover ((B, 3) stats, a 0-d grad): a
// contiguous tensor on `ref`'s device with the acc dtype of `ref` and exactly the given shape.
inline void check_acc_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref, at::IntArrayRef shape) {
  const at::ScalarType dtype = acc_scalar_type(ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "urda_fast: ", name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "urda_fast: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "urda_fast: ", name, " must have dtype ", dtype, " for ", ref.scalar_type(),
              " inputs, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "urda_fast: ", name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace cuda_utils
}  // namespace urda_fast
