// Host-side checks and shape helpers shared by the CPU and CUDA backends.
//
// The Python layer (urda_fast/ops) validates user input and gives friendly errors; these checks guard the kernels
// against direct torch.ops.urda_fast.* calls, so a bad call fails with a message instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <string_view>

namespace urda_fast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation / loss dtype: float64 for float64 inputs, float32 for everything else.
inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// The KL's temperature: its reciprocal scales every logit, so 0, a negative, inf or NaN gives no softmax.
inline void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "urda_fast: temperature must be positive and finite, got ",
              temperature);
}

// `t` must live on `device_type`, be contiguous, and share dtype and shape with `ref`.
inline void check_like(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name,
                       c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, "urda_fast: ", name, " must be on ", device_type, ", got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "urda_fast: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), "urda_fast: ", name, " must be contiguous");
  TORCH_CHECK(is_supported_float(t.scalar_type()), "urda_fast: ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "urda_fast: ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "urda_fast: ", name, " has shape ", t.sizes(), " but ", ref_name, " has ",
              ref.sizes());
}

// Per-row values of a (B, ...) input `x`: (B,) when width == 1, else (B, width); contiguous, on x's device, in the
// acc dtype of `x`.
inline void check_rows(const at::Tensor& x, const at::Tensor& v, const char* name, int64_t width) {
  const bool shape_ok = width == 1 ? (v.dim() == 1 && v.size(0) == x.size(0))
                                   : (v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == width);
  TORCH_CHECK(shape_ok, "urda_fast: ", name, " has shape ", v.sizes(), ", expected (", x.size(0),
              width == 1 ? ")" : ", " + std::to_string(width) + ")");
  TORCH_CHECK(v.device() == x.device() && v.is_contiguous(), "urda_fast: ", name, " must be contiguous on ",
              x.device());
  TORCH_CHECK(v.scalar_type() == acc_scalar_type(x.scalar_type()), "urda_fast: ", name, " must have dtype ",
              acc_scalar_type(x.scalar_type()), " for ", x.scalar_type(), " logits, got ", v.scalar_type());
}

// A small parameter vector (per-sample step/eps, per-channel bounds): 1-D, `n` elements, acc dtype of `x`.
inline void check_param(const at::Tensor& x, const at::Tensor& p, const char* name, int64_t n) {
  TORCH_CHECK(p.device() == x.device(), "urda_fast: ", name, " must be on ", x.device(), ", got ", p.device());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == n && p.is_contiguous(), "urda_fast: ", name,
              " must be a contiguous 1-D tensor of ", n, " elements, got shape ", p.sizes());
  TORCH_CHECK(p.scalar_type() == acc_scalar_type(x.scalar_type()), "urda_fast: ", name, " must have dtype ",
              acc_scalar_type(x.scalar_type()), " for ", x.scalar_type(), " inputs, got ", p.scalar_type());
}

// x viewed as (batch, channels, inner): channels is dim 1 (1 for 1-D inputs), inner the rest.
struct PgdShape {
  int64_t batch;
  int64_t channels;
  int64_t inner;
};

enum class PgdNorm { Linf, L2 };

// The schema's `str` arrives as std::string_view (c10::string_view is an alias of it since torch 2.6).
inline PgdNorm parse_norm(std::string_view norm) {
  if (norm == "linf") return PgdNorm::Linf;
  if (norm == "l2") return PgdNorm::L2;
  TORCH_CHECK(false, "urda_fast: norm must be 'linf' or 'l2', got '", std::string(norm), "'");
}

inline PgdShape check_pgd_args(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                               const at::Tensor& step_size, const at::Tensor& eps, const at::Tensor& lower,
                               const at::Tensor& upper, c10::DeviceType device_type) {
  TORCH_CHECK(x_adv.dim() >= 1, "urda_fast: x_adv must have a batch dimension, got a 0-d tensor");
  check_like(x_adv, "x_adv", x_adv, "x_adv", device_type);
  check_like(x_adv, "x_adv", grad, "grad", device_type);
  check_like(x_adv, "x_adv", x_orig, "x_orig", device_type);
  PgdShape s{x_adv.size(0), x_adv.dim() >= 2 ? x_adv.size(1) : 1, 1};
  s.inner = s.batch * s.channels == 0 ? 0 : x_adv.numel() / (s.batch * s.channels);
  check_param(x_adv, step_size, "step_size", s.batch);
  check_param(x_adv, eps, "eps", s.batch);
  check_param(x_adv, lower, "lower", s.channels);
  check_param(x_adv, upper, "upper", s.channels);
  return s;
}

// Two (B, D) matrices of one dtype, as the loss kernels take them.
inline void check_pair_2d(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                          c10::DeviceType device_type) {
  TORCH_CHECK(a.dim() == 2, "urda_fast: ", a_name, " must be 2-D (B, D), got shape ", a.sizes());
  check_like(a, a_name, a, a_name, device_type);
  check_like(a, a_name, b, b_name, device_type);
}

}  // namespace urda_fast
