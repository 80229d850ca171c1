// Scalar helpers written so GCC auto-vectorises the loops that call them (no libm calls, no branches).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Hot loops are compiled for AVX-512, for AVX2+FMA and for the baseline ISA; the loader picks one at run time, so
// one wheel is fast on current CPUs and still runs on old ones. Put it on the function that holds the loop (templates
// included: each instantiation gets its clones; the inline helpers below are inlined into each). The ISA levels
// (x86-64-v3/v4) are chosen by CPU features; "arch=haswell" would be chosen by CPU model, so AMD and post-Haswell
// Intel chips would fall back to SSE2. Older GCCs build the baseline only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define URDA_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define URDA_FAST_CLONES
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
  // Round-to-nearest by the 1.5 * 2^23 trick: exact while |x * log2(e)| < 2^22, which the clamp guarantees.
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;
  const float k = shifted - 12582912.0f;
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float y = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kLo ? 0.0f : y * scale;
}

inline double vexp(double x) { return std::exp(x); }

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
