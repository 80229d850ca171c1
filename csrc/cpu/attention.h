// The packed self-attention kernels (attention.cpp), for the ops that run attention inside a larger fused op.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace urda_fast {

// (out (B, T, E), probs (B, heads, T, T)) of a contiguous packed projection qkv (B, T, 3E); see the schema.
std::tuple<at::Tensor, at::Tensor> packed_attention_forward_cpu(const at::Tensor& qkv,
                                                                const std::optional<at::Tensor>& mask, int64_t heads,
                                                                double scale);
// d qkv from a contiguous grad_out (B, T, E) and the forward's probs.
at::Tensor packed_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& probs,
                                         int64_t heads, double scale);

}  // namespace urda_fast
