// Scalar helpers written so GCC auto-vectorises the loops that call them (no libm calls, no branches).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Hot loops are compiled for AVX-512, for AVX2+FMA and for the baseline ISA; the loader picks one at run time, so
// one wheel is fast on current CPUs and still runs on old ones. Put it on the function that holds the loop (templates
// included: each instantiation gets its clones; the inline helpers below are inlined into each). The ISA levels
// (x86-64-v3/v4) are chosen by CPU features; "arch=haswell" would be chosen by CPU model, so AMD and post-Haswell
// Intel chips would fall back to SSE2. Older GCCs build the baseline only.
// URDA_FAST_CLONES_256 stops at AVX2: for loops over short rows (pooling's 4-16 outputs), where a 16-wide AVX-512
// loop never runs its vector body.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define URDA_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define URDA_FAST_CLONES_256 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define URDA_FAST_CLONES
#define URDA_FAST_CLONES_256
#endif

namespace urda_fast {

// exp(x) for float: Cody-Waite range reduction and the Cephes degree-6 polynomial (max error ~2 ulp). Inputs below
// ln(FLT_MIN) return exactly 0, so a masked logit (-inf) gives a probability of exactly 0. glibc's expf is a
// library call that blocks vectorisation; this is plain arithmetic, so an 8-wide AVX2 loop comes out of it.
// always_inline: left to GCC's heuristics, a loop with two calls kept one as a call, and the loop went scalar.
__attribute__((always_inline)) inline float vexp(float x) {
  constexpr float kHi = 88.3762626647949f;
  constexpr float kLo = -87.3365447504019f;
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  // Round-to-nearest by the 1.5 * 2^23 trick: exact while |x * log2(e)| < 2^22, which the clamp guarantees. The
  // bias also carries the exponent's 127, so shifted's low mantissa bits are 2^k's biased exponent, k + 127 in
  // [1, 254]: shifted left by 23 they are 2^k's bits (one shift instead of a convert, an add and a shift).
  constexpr float kBias = 12582912.0f + 127.0f;
  const float shifted = xc * 1.44269504088896341f + kBias;
  const float k = shifted - kBias;
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float y = poly * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kLo ? 0.0f : y * scale;
}

inline double vexp(double x) { return std::exp(x); }

// The standard normal CDF Phi(x) and density phi(x), for GELU (x Phi(x)) and its derivative (Phi(x) + x phi(x)).
// float: erfc by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7; ATen's vectorised erf is the same formula, so
// GELU agrees with torch's CPU kernel to ~1e-7), taken from the tail for either sign: Phi of a large negative x keeps
// its relative precision instead of coming out as 1 - (1 - tiny). phi shares its exponential.
__attribute__((always_inline)) inline void normal_cdf_pdf(float x, float& cdf, float& pdf) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const float e = vexp(-z * z);  // exp(-x^2 / 2)
  const float tail = 0.5f * poly * t * e;  // Phi(-|x|) = erfc(|x| / sqrt 2) / 2
  cdf = x < 0.0f ? tail : 1.0f - tail;
  pdf = e * 0.398942280401432678f;
}

inline void normal_cdf_pdf(double x, double& cdf, double& pdf) {
  cdf = 0.5 * std::erfc(-x * 0.70710678118654752440);
  pdf = std::exp(-0.5 * x * x) * 0.398942280401432678;
}

// float -> bfloat16 / half bits, round to nearest even, NaN kept: the same bits as c10's conversions, written with
// selects instead of branches so that a loop of them vectorises (c10's, in the same loop as the math, kept it scalar:
// a bfloat16 KL backward ran 10x slower than float32).
__attribute__((always_inline)) inline uint16_t narrow_bits(float v, c10::BFloat16*) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// c10::detail::fp16_ieee_from_fp32_value's arithmetic, with its one branch as a select.
__attribute__((always_inline)) inline uint16_t narrow_bits(float v, c10::Half*) {
  constexpr uint32_t kScaleToInfBits = 239u << 23, kScaleToZeroBits = 17u << 23;
  float scale_to_inf, scale_to_zero;
  std::memcpy(&scale_to_inf, &kScaleToInfBits, sizeof(float));
  std::memcpy(&scale_to_zero, &kScaleToZeroBits, sizeof(float));
  float base = (std::fabs(v) * scale_to_inf) * scale_to_zero;
  uint32_t w;
  std::memcpy(&w, &v, sizeof(w));
  const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  const uint32_t offset_bits = (bias >> 1) + 0x07800000u;
  float offset;
  std::memcpy(&offset, &offset_bits, sizeof(float));
  base = offset + base;
  uint32_t bits;
  std::memcpy(&bits, &base, sizeof(bits));
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// out[j] = value(j) for j < n. For bfloat16 / half the values go through a float chunk on the stack and are narrowed
// in a loop of their own, so both loops vectorise. Inline into the (cloned) caller: the loops take its ISA. `out`
// may alias what value(j) reads at index j (in-place PGD step): each chunk is read before it is written.
template <typename scalar_t, typename acc_t, typename Value>
__attribute__((always_inline)) inline void write_row(scalar_t* out, int64_t n, Value&& value) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = value(j);
  } else {
    static_assert(sizeof(scalar_t) == sizeof(uint16_t) && std::is_same_v<acc_t, float>);
    constexpr int64_t kChunk = 512;
    alignas(64) float chunk[kChunk];
    uint16_t* bits = reinterpret_cast<uint16_t*>(out);
    for (int64_t start = 0; start < n; start += kChunk) {
      const int64_t m = std::min(kChunk, n - start);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) chunk[j] = value(start + j);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) bits[start + j] = narrow_bits(chunk[j], static_cast<scalar_t*>(nullptr));
    }
  }
}

template <typename T>
inline T sign_of(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

template <typename T>
inline T clamp_to(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

}  // namespace urda_fast
