// Multi-head self-attention over short sequences on CPU, from the packed input projection (B, T, 3E) that
// nn.MultiheadAttention computes with one matmul. For the 17 tokens of a small ViT, torch's path around the two
// attention matmuls costs more than they do: splitting the heads out of the projection (copies), batched matmuls of
// 17x16 matrices, a masked "safe" softmax, and the same again backwards. Here one task per (sample, head) reads its
// q, k, v rows in place, keeps k and v transposed in a small buffer, and writes the output where out_proj reads it
// (heads side by side), in one pass; the probabilities are kept for the backward, which writes q, k and v's gradients
// straight into the packed layout the projection's backward reads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "attention.h"
#include "cpu_math.h"

namespace urda_fast {
namespace {

struct AttentionShape {
  int64_t batch, tokens, heads, head_dim, embed;
};

AttentionShape check_qkv(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu(), "urda_fast: packed attention's CPU kernel needs CPU tensors, got ", qkv.device());
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "urda_fast: packed attention needs a contiguous (B, T, 3E) qkv "
              "tensor, got shape ", qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble,
              "urda_fast: packed attention's CPU kernel takes float32 or float64, got ", qkv.scalar_type());
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0, "urda_fast: packed attention's last dimension (",
              qkv.size(2), ") must be 3 * heads * head_dim with heads = ", heads);
  const int64_t embed = qkv.size(2) / 3;
  return {qkv.size(0), qkv.size(1), heads, embed / heads, embed};
}

int64_t head_grain(const AttentionShape& s) {
  // About 32k multiply-adds per task: one (sample, head) of the tiny ViT is ~10k.
  const int64_t work = std::max<int64_t>(1, 2 * s.tokens * s.tokens * s.head_dim);
  return std::max<int64_t>(1, 32768 / work);
}

// Loops over 17 tokens or 16 head channels are too short for a vectorised loop's prologue and epilogue (a first
// version, written that way, ran at scalar speed), and GCC's auto-vectoriser picked the wrong dimension of the
// blocked loops below. So they use GCC's vector types (one AVX-512 register of floats per 16 elements; two AVX2 ones
// or four SSE ones in the other clones): rows of tokens padded to blocks of kTokenBlock (zeros), head channels walked
// in blocks of kDim (16 or 8 when head_dim allows, else 1), and query rows kRows at a time, so that each loaded block
// of k or v feeds kRows independent accumulators (one accumulator is a chain of dependent FMAs, bound by latency).
constexpr int64_t kTokenBlock = 16;
constexpr int kRows = 4;

inline int64_t padded_tokens(int64_t tokens) { return (tokens + kTokenBlock - 1) / kTokenBlock * kTokenBlock; }

template <typename scalar_t, int kWidth>
struct VectorOf {
  typedef scalar_t type __attribute__((vector_size(kWidth * sizeof(scalar_t))));
};
template <typename scalar_t, int kWidth>
using vec_t = typename VectorOf<scalar_t, kWidth>::type;

// Unaligned loads and stores through references (vectors passed or returned by value change the ABI between clones).
template <typename V, typename scalar_t>
__attribute__((always_inline)) inline void load(V& v, const scalar_t* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <typename V, typename scalar_t>
__attribute__((always_inline)) inline void store(scalar_t* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// out[r * row_out + n] = sum_{k < depth} a[r * row_a + k] * b[k * row_b + n] for r < kR, n < width (a multiple of
// kWidth): kR rows of a small matmul, kWidth output columns at a time in vector registers. Scores are q rows times the
// transposed, zero-padded k (depth head_dim, width padded); outputs are probability rows times v rows (depth tokens,
// width head_dim); the backward's dP and dQ are the same two products.
template <int kR, int kWidth, typename scalar_t>
__attribute__((always_inline)) inline void small_matmul(const scalar_t* __restrict__ a, int64_t row_a,
                                                        const scalar_t* __restrict__ b, int64_t row_b,
                                                        scalar_t* __restrict__ out, int64_t row_out, int64_t depth,
                                                        int64_t width) {
  using V = vec_t<scalar_t, kWidth>;
  for (int64_t n0 = 0; n0 < width; n0 += kWidth) {
    V acc[kR] = {};
    for (int64_t k = 0; k < depth; ++k) {
      V x;
      load(x, b + k * row_b + n0);
      for (int r = 0; r < kR; ++r) acc[r] += a[r * row_a + k] * x;
    }
    for (int r = 0; r < kR; ++r) store(out + r * row_out + n0, acc[r]);
  }
}

// acc[j * head_dim + 0:head_dim] += sum_{r < kR} w[r * row_w + j] * x[r * row_x + 0:head_dim] for j < tokens: kR
// rank-one updates of a (tokens, head_dim) accumulator, each of its blocks loaded and stored once.
template <int kR, int kDim, typename scalar_t>
__attribute__((always_inline)) inline void add_outer_products(scalar_t* __restrict__ acc,
                                                              const scalar_t* __restrict__ w, int64_t row_w,
                                                              const scalar_t* __restrict__ x, int64_t row_x,
                                                              int64_t tokens, int64_t head_dim) {
  using V = vec_t<scalar_t, kDim>;
  for (int64_t db = 0; db < head_dim; db += kDim) {
    V xs[kR];
    for (int r = 0; r < kR; ++r) load(xs[r], x + r * row_x + db);
    for (int64_t j = 0; j < tokens; ++j) {
      V block;
      load(block, acc + j * head_dim + db);
      for (int r = 0; r < kR; ++r) block += w[r * row_w + j] * xs[r];
      store(acc + j * head_dim + db, block);
    }
  }
}

// small_matmul and add_outer_products over a block of `rows` query rows (at most kRows): the kRows-wide kernels for a
// full block, one row at a time for the last, shorter one.
template <int kWidth, typename scalar_t>
__attribute__((always_inline)) inline void block_matmul(int64_t rows, const scalar_t* __restrict__ a, int64_t row_a,
                                                        const scalar_t* __restrict__ b, int64_t row_b,
                                                        scalar_t* __restrict__ out, int64_t row_out, int64_t depth,
                                                        int64_t width) {
  if (rows == kRows) {
    small_matmul<kRows, kWidth>(a, row_a, b, row_b, out, row_out, depth, width);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    small_matmul<1, kWidth>(a + r * row_a, row_a, b, row_b, out + r * row_out, row_out, depth, width);
}

template <int kDim, typename scalar_t>
__attribute__((always_inline)) inline void block_outer_products(int64_t rows, scalar_t* __restrict__ acc,
                                                                const scalar_t* __restrict__ w, int64_t row_w,
                                                                const scalar_t* __restrict__ x, int64_t row_x,
                                                                int64_t tokens, int64_t head_dim) {
  if (rows == kRows) {
    add_outer_products<kRows, kDim>(acc, w, row_w, x, row_x, tokens, head_dim);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    add_outer_products<1, kDim>(acc, w + r * row_w, row_w, x + r * row_x, row_x, tokens, head_dim);
}

// (head_dim, padded) transposed copy of `tokens` rows (stride `row`); the padding columns stay as they are (zero).
template <typename scalar_t>
inline void transpose_rows(const scalar_t* __restrict__ rows, scalar_t* __restrict__ out, int64_t tokens,
                           int64_t head_dim, int64_t row, int64_t padded) {
  for (int64_t j = 0; j < tokens; ++j)
    for (int64_t d = 0; d < head_dim; ++d) out[d * padded + j] = rows[j * row + d];
}

// In-place operations on vectors or scalars: acc = op(acc, x). Functors with an always-inlined call, vectors by
// reference (a lambda taking vectors by value stayed a call, its arguments went through memory, -Wpsabi), one
// comparison per select (GCC lowered a select on two ORed vector comparisons lane by lane, in scalar code).
struct Max {
  template <typename T>
  __attribute__((always_inline)) void operator()(T& acc, const T& x) const {
    acc = x > acc ? x : acc;
  }
};
struct Or {
  template <typename T>
  __attribute__((always_inline)) void operator()(T& acc, const T& x) const {
    acc |= x;
  }
};
struct Plus {
  template <typename T>
  __attribute__((always_inline)) void operator()(T& acc, const T& x) const {
    acc += x;
  }
};

// op over the lanes of a vector of kWidth lanes, by halving (op of the two halves, repeated): log2(kWidth) dependent
// steps instead of a chain of kWidth - 1.
template <int kWidth, typename V, typename Op>
__attribute__((always_inline)) inline auto reduce_lanes(const V& v, const Op& op) {
  using Lane = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (kWidth == 2) {
    Lane acc = v[0];
    op(acc, static_cast<Lane>(v[1]));
    return acc;
  } else {
    typedef Lane Half __attribute__((vector_size(kWidth / 2 * sizeof(Lane))));
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    op(low, high);
    return reduce_lanes<kWidth / 2>(low, op);
  }
}

// p[r][0:tokens] = softmax(scores[r] * scale + mask[r]) for kR padded rows of scores (stride padded); mask rows
// (stride mask_row, 0: one row for all) hold -inf in the padding columns. Fixed-width blocks throughout, with the max
// and the sum kept per lane and reduced by halving, and kR rows side by side: a row's reductions are chains of
// dependent operations, so one row at a time left the core waiting (the forward took 1.6x the backward's time). A
// row whose keys are all masked gives 0, as torch's safe softmax in scaled_dot_product_attention; a NaN score makes
// its row NaN.
template <int kR, typename scalar_t>
__attribute__((always_inline)) inline void softmax_rows(scalar_t* __restrict__ scores,
                                                        const scalar_t* __restrict__ mask, int64_t mask_row,
                                                        scalar_t* __restrict__ p, int64_t tokens, int64_t padded,
                                                        scalar_t scale) {
  using V = vec_t<scalar_t, kTokenBlock>;
  using Mask = decltype(V{} != V{});
  constexpr scalar_t kMinusInf = -std::numeric_limits<scalar_t>::infinity();
  V lanes[kR];
  Mask nan_lanes[kR];  // a NaN score must make its row NaN (as torch's), not pass for a masked key
  for (int r = 0; r < kR; ++r) {
    lanes[r] = V{} + kMinusInf;
    nan_lanes[r] = Mask{};
  }
  for (int64_t jb = 0; jb < padded; jb += kTokenBlock)
    for (int r = 0; r < kR; ++r) {
      V x, m;
      load(x, scores + r * padded + jb);
      load(m, mask + r * mask_row + jb);
      x = x * scale + m;
      store(scores + r * padded + jb, x);
      Max{}(lanes[r], x);
      nan_lanes[r] |= x != x;
    }
  scalar_t shift[kR];
  for (int r = 0; r < kR; ++r) {
    const scalar_t row_max = reduce_lanes<kTokenBlock>(lanes[r], Max{});
    const bool has_nan = reduce_lanes<kTokenBlock>(nan_lanes[r], Or{}) != 0;
    // All masked: every exponential is exactly 0. NaN: every exponential is NaN.
    shift[r] = has_nan ? std::numeric_limits<scalar_t>::quiet_NaN() : row_max == kMinusInf ? scalar_t(0) : row_max;
  }
  scalar_t sums[kR][kTokenBlock] = {};
  for (int64_t jb = 0; jb < padded; jb += kTokenBlock)
    for (int r = 0; r < kR; ++r)
      for (int64_t l = 0; l < kTokenBlock; ++l) {
        const scalar_t e = vexp(scores[r * padded + jb + l] - shift[r]);  // exactly 0 in the padding
        scores[r * padded + jb + l] = e;
        sums[r][l] += e;
      }
  for (int r = 0; r < kR; ++r) {
    V lane_sums;
    load(lane_sums, sums[r]);
    const scalar_t sum = reduce_lanes<kTokenBlock>(lane_sums, Plus{});
    // sum is at least 1 (the max's exponential) but for a fully masked row (0) or a NaN one (its exponentials are
    // NaN, and stay so times 0).
    const scalar_t inv = sum > 0 ? scalar_t(1) / sum : scalar_t(0);
    for (int64_t j = 0; j < tokens; ++j) p[r * tokens + j] = scores[r * padded + j] * inv;
  }
}

// One (sample, head): probs (T, T) and out rows (T, head_dim, stride `row_out`) from q, k, v rows (stride `row_in`).
// mask: (T, padded) additive, -inf in the padding columns (mask_row = 0: one row for all); k_t: a zeroed (head_dim,
// padded) buffer; scores: kRows * padded elements.
template <int kDim, typename scalar_t>
URDA_FAST_CLONES void attend_head(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                  const scalar_t* __restrict__ v, const scalar_t* __restrict__ mask, int64_t mask_row,
                                  scalar_t* __restrict__ probs, scalar_t* __restrict__ out, int64_t tokens,
                                  int64_t head_dim, int64_t row_in, int64_t row_out, scalar_t scale,
                                  scalar_t* __restrict__ k_t, scalar_t* __restrict__ scores) {
  const int64_t padded = padded_tokens(tokens);
  transpose_rows(k, k_t, tokens, head_dim, row_in, padded);
  for (int64_t i0 = 0; i0 < tokens; i0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, tokens - i0);
    const scalar_t* q_rows = q + i0 * row_in;
    scalar_t* p_rows = probs + i0 * tokens;
    scalar_t* out_rows = out + i0 * row_out;
    block_matmul<kTokenBlock>(rows, q_rows, row_in, k_t, padded, scores, padded, head_dim, padded);
    // A padding column scores q . 0, NaN for an infinite q (which would make the row NaN): 0, so that the mask's
    // -inf makes it -inf whatever the scale.
    for (int64_t r = 0; padded > tokens && r < rows; ++r)
      std::fill(scores + r * padded + tokens, scores + (r + 1) * padded, scalar_t(0));
    if (rows == kRows) {
      softmax_rows<kRows>(scores, mask + i0 * mask_row, mask_row, p_rows, tokens, padded, scale);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        softmax_rows<1>(scores + r * padded, mask + (i0 + r) * mask_row, mask_row, p_rows + r * tokens, tokens,
                        padded, scale);
    }
    block_matmul<kDim>(rows, p_rows, tokens, v, row_in, out_rows, row_out, tokens, head_dim);
  }
}

// fn(std::integral_constant<int, kDim>) with the widest head-channel block that divides head_dim.
template <typename Fn>
void with_head_block(int64_t head_dim, Fn&& fn) {
  if (head_dim % 16 == 0) {
    fn(std::integral_constant<int, 16>{});
  } else if (head_dim % 8 == 0) {
    fn(std::integral_constant<int, 8>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> packed_attention_forward_cpu(const at::Tensor& qkv,
                                                                const std::optional<at::Tensor>& mask, int64_t heads,
                                                                double scale) {
  const AttentionShape s = check_qkv(qkv, heads);
  const bool masked = mask.has_value() && mask->defined();
  if (masked) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == qkv.scalar_type() && mask->is_contiguous() &&
                    mask->dim() == 2 && mask->size(0) == s.tokens && mask->size(1) == s.tokens,
                "urda_fast: packed attention's mask must be a contiguous (T, T) = (", s.tokens, ", ", s.tokens, ") ",
                qkv.scalar_type(), " CPU tensor, got ", mask->sizes(), " ", mask->scalar_type());
  }
  auto out = at::empty({s.batch, s.tokens, s.embed}, qkv.options());
  auto probs = at::empty({s.batch, s.heads, s.tokens, s.tokens}, qkv.options());
  if (qkv.numel() == 0) return {out, probs};
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "urda_fast::packed_attention_forward_cpu", [&] {
    const scalar_t* base = qkv.const_data_ptr<scalar_t>();
    // The additive mask padded to whole blocks of tokens with -inf, so the softmax runs over fixed-width blocks.
    const int64_t padded = padded_tokens(s.tokens);
    const int64_t mask_row = masked ? padded : 0;
    std::vector<scalar_t> padded_mask((masked ? s.tokens : 1) * padded, -std::numeric_limits<scalar_t>::infinity());
    for (int64_t i = 0; i < (masked ? s.tokens : 1); ++i)
      for (int64_t j = 0; j < s.tokens; ++j)
        padded_mask[i * padded + j] = masked ? mask->const_data_ptr<scalar_t>()[i * s.tokens + j] : scalar_t(0);
    scalar_t* probs_data = probs.mutable_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * s.heads, head_grain(s), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffers(s.head_dim * padded + kRows * padded, scalar_t(0));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / s.heads, h = task % s.heads;
        const scalar_t* q = base + b * s.tokens * 3 * s.embed + h * s.head_dim;
        with_head_block(s.head_dim, [&](auto width) {
          attend_head<decltype(width)::value, scalar_t>(
              q, q + s.embed, q + 2 * s.embed, padded_mask.data(), mask_row, probs_data + task * s.tokens * s.tokens,
              out_data + b * s.tokens * s.embed + h * s.head_dim, s.tokens, s.head_dim, 3 * s.embed, s.embed,
              static_cast<scalar_t>(scale), buffers.data(), buffers.data() + s.head_dim * padded);
        });
      }
    });
  });
  return {out, probs};
}

namespace {

// One (sample, head)'s gradients: grad rows of q, k, v (stride `row_in`, inside the packed (T, 3E) gradient) from the
// output's gradient (stride `row_out`) and the saved probabilities. dS = P * (dP - rowsum(P * dP)) * scale with
// dP = dO V^T; dQ = dS K, dK = dS^T Q, dV = P^T dO. v_t: a zeroed (head_dim, padded) buffer; d_s: kRows * padded;
// acc_k, acc_v: (T, head_dim) each.
template <int kDim, typename scalar_t>
URDA_FAST_CLONES void attend_head_backward(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                           const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                           const scalar_t* __restrict__ probs, scalar_t* __restrict__ grad_q,
                                           scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v,
                                           int64_t tokens, int64_t head_dim, int64_t row_in, int64_t row_out,
                                           scalar_t scale, scalar_t* __restrict__ v_t, scalar_t* __restrict__ d_s,
                                           scalar_t* __restrict__ acc_k, scalar_t* __restrict__ acc_v) {
  const int64_t padded = padded_tokens(tokens);
  transpose_rows(v, v_t, tokens, head_dim, row_in, padded);
  for (int64_t e = 0; e < tokens * head_dim; ++e) acc_k[e] = acc_v[e] = 0;
  for (int64_t i0 = 0; i0 < tokens; i0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, tokens - i0);
    const scalar_t* p_rows = probs + i0 * tokens;
    const scalar_t* g_rows = grad_out + i0 * row_out;
    const scalar_t* q_rows = q + i0 * row_in;
    block_outer_products<kDim>(rows, acc_v, p_rows, tokens, g_rows, row_out, tokens, head_dim);
    block_matmul<kTokenBlock>(rows, g_rows, row_out, v_t, padded, d_s, padded, head_dim, padded);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* __restrict__ p = p_rows + r * tokens;
      scalar_t* __restrict__ d = d_s + r * padded;
      scalar_t weighted = 0;
      for (int64_t j = 0; j < tokens; ++j) weighted += p[j] * d[j];
      for (int64_t j = 0; j < tokens; ++j) d[j] = p[j] * (d[j] - weighted) * scale;
    }
    block_matmul<kDim>(rows, d_s, padded, k, row_in, grad_q + i0 * row_in, row_in, tokens, head_dim);
    block_outer_products<kDim>(rows, acc_k, d_s, padded, q_rows, row_in, tokens, head_dim);
  }
  for (int64_t j = 0; j < tokens; ++j)
    for (int64_t d = 0; d < head_dim; ++d) {
      grad_k[j * row_in + d] = acc_k[j * head_dim + d];
      grad_v[j * row_in + d] = acc_v[j * head_dim + d];
    }
}

}  // namespace

at::Tensor packed_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& probs,
                                         int64_t heads, double scale) {
  const AttentionShape s = check_qkv(qkv, heads);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == qkv.scalar_type() && grad_out.device().is_cpu() &&
                  grad_out.sizes() == at::IntArrayRef({s.batch, s.tokens, s.embed}),
              "urda_fast: packed attention's grad_out must be a contiguous (B, T, E) CPU tensor of qkv's dtype, got ",
              grad_out.sizes());
  TORCH_CHECK(probs.is_contiguous() && probs.scalar_type() == qkv.scalar_type() && probs.device().is_cpu() &&
                  probs.sizes() == at::IntArrayRef({s.batch, s.heads, s.tokens, s.tokens}),
              "urda_fast: packed attention's probs must be the forward's contiguous (B, heads, T, T) tensor, got ",
              probs.sizes());
  auto grad_qkv = at::empty_like(qkv);
  if (qkv.numel() == 0) return grad_qkv;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "urda_fast::packed_attention_backward_cpu", [&] {
    const scalar_t* base = qkv.const_data_ptr<scalar_t>();
    const scalar_t* grad_data = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* probs_data = probs.const_data_ptr<scalar_t>();
    scalar_t* grad_base = grad_qkv.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * s.heads, head_grain(s), [&](int64_t begin, int64_t end) {
      const int64_t padded = padded_tokens(s.tokens), block = s.tokens * s.head_dim;
      // v_t (head_dim, padded; its padding stays zero), d_s (kRows, padded), acc_k and acc_v (tokens, head_dim).
      std::vector<scalar_t> buffers(s.head_dim * padded + kRows * padded + 2 * block, scalar_t(0));
      scalar_t* v_t = buffers.data();
      scalar_t* d_s = v_t + s.head_dim * padded;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / s.heads, h = task % s.heads;
        const int64_t in_offset = b * s.tokens * 3 * s.embed + h * s.head_dim;
        const scalar_t* q = base + in_offset;
        scalar_t* grad_q = grad_base + in_offset;
        with_head_block(s.head_dim, [&](auto width) {
          attend_head_backward<decltype(width)::value, scalar_t>(
              grad_data + b * s.tokens * s.embed + h * s.head_dim, q, q + s.embed, q + 2 * s.embed,
              probs_data + task * s.tokens * s.tokens, grad_q, grad_q + s.embed, grad_q + 2 * s.embed, s.tokens,
              s.head_dim, 3 * s.embed, s.embed, static_cast<scalar_t>(scale), v_t, d_s, d_s + kRows * padded,
              d_s + kRows * padded + block);
        });
      }
    });
  });
  return grad_qkv;
}

TORCH_LIBRARY_IMPL(urda_fast, CPU, m) {
  m.impl("packed_attention_forward", &packed_attention_forward_cpu);
  m.impl("packed_attention_backward", &packed_attention_backward_cpu);
}

}  // namespace urda_fast
