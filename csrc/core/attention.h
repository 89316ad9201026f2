// csrc/core/attention.h: the rules of qlora::causal_attention, shared by its CPU and CUDA kernels.
//
// defines: which keys a query sees (causal, optionally within its segment), the log-sum-exp a forward pass keeps
// for backward, the score gradient, and the params structs the kernels take (raw pointers and element strides, no
// ATen).
//
// Note [Causal attention]
// For one batch row b and query head h (key/value head h / (H / KVH), HF's repeat_kv grouping):
//   s_ij = scale · q_i · k_j            (float32 accumulation of the input dtype's products)
//   query i sees key j iff j <= i and, when segment ids are given, seg_j == seg_i (packed rows: causal within
//   each segment). Query i always sees itself, so no row is empty.
//   m_i = max_j s_ij, l_i = sum_j exp(s_ij - m_i), p_ij = exp(s_ij - m_i) / l_i, o_i = sum_j p_ij v_j
//   lse_i = m_i + log(l_i)  (float32, kept for backward: p_ij = exp(s_ij - lse_i))
// Backward, with do_i = dL/do_i and delta_i = do_i · o_i (o as stored, in the input dtype):
//   dp_ij = do_i · v_j,  ds_ij = p_ij (dp_ij - delta_i)
//   dq_i = scale · sum_j ds_ij k_j,  dk_j = scale · sum_i ds_ij q_i,  dv_j = sum_i p_ij do_i
// summed over the query heads of a group for dk and dv. The kernels differ in summation order and in how exp is
// evaluated (the CPU one blocks the products and may round p and ds to the input dtype before a product, as
// FlashAttention does), so they agree with each other and with PyTorch's SDPA within the input dtype's rounding,
// not bit for bit.
#pragma once

#include "macros.h"

namespace qlora::core {

// Whether query i sees key j (Note [Causal attention]); seg_i/seg_j are ignored when has_segments is false.
QLORA_HD QLORA_INLINE bool attention_visible(int64_t i, int64_t j, bool has_segments, int32_t seg_i, int32_t seg_j) {
    return j <= i && (!has_segments || seg_i == seg_j);
}

// ds_ij from p_ij, dp_ij and delta_i.
QLORA_HD QLORA_INLINE float attention_grad_score(float p, float dp, float delta) {
    return p * (dp - delta);
}

// Element strides of a [B, heads, T, D] tensor whose last dimension is contiguous.
struct AttentionStrides {
    int64_t batch;
    int64_t head;
    int64_t token;
};

// Forward: out [B, H, T, D] and lse float32 [B, H, T] (contiguous) from q [B, H, T, D], k and v [B, KVH, T, D].
template <typename T> struct AttentionFwdParams {
    const T* q;
    const T* k;
    const T* v;
    T* out;
    float* lse;
    const int32_t* segments; // [B, T] contiguous, or null
    AttentionStrides q_stride, k_stride, v_stride, out_stride;
    int64_t batch, heads, kv_heads, tokens, head_dim;
    float scale;
};

// Backward: dq (q's strides), dk and dv [B, KVH, T, D] from grad_out, q, k, v, out and lse.
template <typename T> struct AttentionBwdParams {
    const T* grad_out;
    const T* q;
    const T* k;
    const T* v;
    const T* out;
    const float* lse;
    const int32_t* segments;
    T* dq;
    T* dk;
    T* dv;
    AttentionStrides grad_out_stride, q_stride, k_stride, v_stride, out_stride, dq_stride, dk_stride, dv_stride;
    int64_t batch, heads, kv_heads, tokens, head_dim;
    float scale;
};

} // namespace qlora::core
