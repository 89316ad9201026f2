// csrc/cpu/attention_cpu.cpp: CPU kernels of qlora::causal_attention and qlora::causal_attention_backward
// (Note [Causal attention] in core/attention.h).
//
// Note [CPU attention blocking]
// FlashAttention-2's schedule on the small GEMM of attention_gemm.h. Keys and values are packed once per key/value
// head (shared by the heads of its group). Forward: one task per (batch, head, block of kQueryBlock queries), over
// chunks of kKeyChunk keys up to the block's last query (blocks above the diagonal are never computed; with segment
// ids, keys before the first segment of the block are skipped too), with the online softmax: scores S = Q K^T in
// float32, a row pass (mask, running max m and sum l, p = exp(scale s - m) rounded to the input dtype), O += P V.
// Only o and lse = m + log(l) are stored. Backward: one task per (batch, head) over its query blocks, recomputing
// P = exp(scale S - lse); dP = dO V^T; dS = scale P (dP - delta); dQ = dS K directly, and dK^T += Q^T dS,
// dV^T += dO^T P into float32 accumulators of that head (transposed, so that P and dS are the packed operands),
// summed over each group at the end. Peak extra memory: the packed K and V, and 2 float32 [B, H, T, D]
// accumulators in backward.
#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../attention_checks.h"
#include "attention_gemm.h"
#include "cpu_isa.h"
#include "simd_x86.h"

namespace qlora::cpu {
namespace {

using attn::kPanel;

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyChunk = 256; // a multiple of kPanel
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// For each (b, i): the first key any query of i's segment can see, i.e. the first position of segment seg[b, i]
// (0 without segments).
std::vector<int64_t> first_visible(const int32_t* seg, int64_t B, int64_t T) {
    std::vector<int64_t> first(static_cast<size_t>(B * T), 0);
    if (seg == nullptr) {
        return first;
    }
    for (int64_t b = 0; b < B; ++b) {
        std::unordered_map<int32_t, int64_t> start;
        for (int64_t i = 0; i < T; ++i) {
            const auto it = start.emplace(seg[b * T + i], i).first;
            first[b * T + i] = it->second;
        }
    }
    return first;
}

// Key window [begin, end) of queries i0 .. i0 + M - 1: begin aligned down to a panel.
inline int64_t window_begin(const std::vector<int64_t>& first, int64_t b, int64_t T, int64_t i0, int64_t M) {
    int64_t kb = i0;
    for (int64_t r = 0; r < M; ++r) {
        kb = std::min(kb, first[b * T + i0 + r]);
    }
    return kb / kPanel * kPanel;
}

// --------------------------------------------------------------------------------------------------------------
// Row passes. Row r of a score block holds keys j0 .. j0 + n - 1 for query i; `seg` points at the batch row's segment
// ids (null without segments).

struct RowCtx {
    int64_t j0;
    int64_t n;
    int64_t i;
    const int32_t* seg;
    int32_t seg_i;
    float scale;
};

inline bool visible(const RowCtx& c, int64_t k) {
    const int64_t j = c.j0 + k;
    return core::attention_visible(c.i, j, c.seg != nullptr, c.seg_i, c.seg != nullptr ? c.seg[j] : 0);
}

float row_max_scalar(const float* s, const RowCtx& c) {
    float mx = kNegInf;
    for (int64_t k = 0; k < c.n; ++k) {
        if (visible(c, k)) {
            mx = std::max(mx, s[k] * c.scale);
        }
    }
    return mx;
}

// p_k = exp(scale s_k - m) for visible keys, else 0, stored to p as T; returns the float32 sum.
template <typename T> float row_exp_scalar(const float* s, const RowCtx& c, float m, T* p) {
    float sum = 0.0f;
    for (int64_t k = 0; k < c.n; ++k) {
        const float e = visible(c, k) ? std::exp(s[k] * c.scale - m) : 0.0f;
        p[k] = static_cast<T>(e);
        sum += e;
    }
    return sum;
}

// In place: s -> p = exp(scale s - lse), dp -> scale p (dp - delta).
void row_grad_scalar(float* s, float* dp, const RowCtx& c, float lse, float delta) {
    for (int64_t k = 0; k < c.n; ++k) {
        const float p = visible(c, k) ? std::exp(s[k] * c.scale - lse) : 0.0f;
        s[k] = p;
        dp[k] = c.scale * core::attention_grad_score(p, dp[k], delta);
    }
}

#if defined(QLORA_X86)

// Lanes of keys k .. k + 15 that exist and that query i sees.
QLORA_AVX512 inline __mmask16 visible16(const RowCtx& c, int64_t k) {
    const int64_t lim = std::min<int64_t>({16, c.n - k, c.i - (c.j0 + k) + 1});
    if (lim <= 0) {
        return 0;
    }
    __mmask16 m = lim >= 16 ? __mmask16(0xffff) : __mmask16((1u << lim) - 1);
    if (c.seg != nullptr) {
        const __m512i sj = _mm512_maskz_loadu_epi32(m, c.seg + c.j0 + k);
        m = _mm512_mask_cmpeq_epi32_mask(m, sj, _mm512_set1_epi32(c.seg_i));
    }
    return m;
}

QLORA_AVX512 inline __mmask16 exists16(const RowCtx& c, int64_t k) {
    const int64_t lim = std::min<int64_t>(16, c.n - k);
    return lim >= 16 ? __mmask16(0xffff) : __mmask16((1u << lim) - 1);
}

QLORA_AVX512 float row_max_avx512(const float* s, const RowCtx& c) {
    const __m512 scale = _mm512_set1_ps(c.scale);
    __m512 mx = _mm512_set1_ps(kNegInf);
    for (int64_t k = 0; k < c.n; k += 16) {
        const __mmask16 v = visible16(c, k);
        mx = _mm512_mask_max_ps(mx, v, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(v, s + k), scale));
    }
    return _mm512_reduce_max_ps(mx);
}

template <typename T> QLORA_AVX512 float row_exp_avx512(const float* s, const RowCtx& c, float m, T* p) {
    const __m512 scale = _mm512_set1_ps(c.scale);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < c.n; k += 16) {
        const __mmask16 v = visible16(c, k);
        const __m512 x = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(v, s + k), scale), mv);
        const __m512 e = _mm512_maskz_mov_ps(v, simd::exp16(x));
        sum = _mm512_add_ps(sum, e);
        simd::store16_mask(p + k, exists16(c, k), e);
    }
    return _mm512_reduce_add_ps(sum);
}

QLORA_AVX512 void row_grad_avx512(float* s, float* dp, const RowCtx& c, float lse, float delta) {
    const __m512 scale = _mm512_set1_ps(c.scale);
    const __m512 lv = _mm512_set1_ps(lse);
    const __m512 dv = _mm512_set1_ps(delta);
    for (int64_t k = 0; k < c.n; k += 16) {
        const __mmask16 v = visible16(c, k);
        const __mmask16 e = exists16(c, k);
        const __m512 x = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(v, s + k), scale), lv);
        const __m512 p = _mm512_maskz_mov_ps(v, simd::exp16(x));
        const __m512 g = _mm512_mul_ps(scale, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(e, dp + k), dv)));
        _mm512_mask_storeu_ps(s + k, e, p);
        _mm512_mask_storeu_ps(dp + k, e, g);
    }
}

// Rows k, k + 1 of a float32 matrix (16 columns, `cols` of them valid) as 16 bfloat16 pairs (VDPBF16PS layout).
QLORA_AVX512 inline __m512i pair_rows16(const float* r0, const float* r1, __mmask16 cols) {
    const __m512i lo = _mm512_cvtepu16_epi32(simd::bf16_bits16(_mm512_maskz_loadu_ps(cols, r0)));
    const __m512i hi = r1 != nullptr ? _mm512_cvtepu16_epi32(simd::bf16_bits16(_mm512_maskz_loadu_ps(cols, r1)))
                                     : _mm512_setzero_si512();
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

QLORA_AVX512 void pack_f32_bf16_avx512(const float* src, int64_t ld, int64_t K, int64_t N, uint16_t* out) {
    const int64_t ps = attn::panel_stride<c10::BFloat16>(K);
    for (int64_t p = 0; p * kPanel < N; ++p) {
        for (int64_t k = 0; k < K; k += 2) {
            const float* r0 = src + k * ld + p * kPanel;
            const float* r1 = k + 1 < K ? r0 + ld : nullptr;
            for (int64_t h = 0; h < 2; ++h) {
                const int64_t cols = std::min<int64_t>(16, N - p * kPanel - 16 * h);
                const __mmask16 m =
                    cols <= 0 ? __mmask16(0) : (cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1));
                const __m512i pairs = pair_rows16(r0 + 16 * h, r1 != nullptr ? r1 + 16 * h : nullptr, m);
                _mm512_storeu_si512(out + p * ps + k * kPanel + 32 * h, pairs);
            }
        }
    }
}

template <typename T>
QLORA_AVX512 void
round_rows_avx512(const float* src, int64_t ld_src, int64_t M, int64_t N, T* dst, int64_t ld_dst, float mul) {
    const __m512 mv = _mm512_set1_ps(mul);
    for (int64_t r = 0; r < M; ++r) {
        for (int64_t c = 0; c < N; c += 16) {
            const int64_t lim = std::min<int64_t>(16, N - c);
            const __mmask16 k = lim >= 16 ? __mmask16(0xffff) : __mmask16((1u << lim) - 1);
            simd::store16_mask(
                dst + r * ld_dst + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + r * ld_src + c), mv)
            );
        }
    }
}

template <typename T> QLORA_AVX512 float dot_avx512(const T* a, const T* b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        acc = _mm512_fmadd_ps(simd::load16(a + k), simd::load16(b + k), acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; k < n; ++k) {
        sum += static_cast<float>(a[k]) * static_cast<float>(b[k]);
    }
    return sum;
}

#endif

// sum_k a_k b_k in float32 (delta_i of Note [Causal attention]).
template <typename T> float dot(CpuIsa isa, const T* a, const T* b, int64_t n) {
#if defined(QLORA_X86)
    if (isa == CpuIsa::kAvx512) {
        return dot_avx512(a, b, n);
    }
#endif
    float sum = 0.0f;
    for (int64_t k = 0; k < n; ++k) {
        sum += static_cast<float>(a[k]) * static_cast<float>(b[k]);
    }
    return sum;
}

float row_max(CpuIsa isa, const float* s, const RowCtx& c) {
#if defined(QLORA_X86)
    if (isa == CpuIsa::kAvx512) {
        return row_max_avx512(s, c);
    }
#endif
    return row_max_scalar(s, c);
}

template <typename T> float row_exp(CpuIsa isa, const float* s, const RowCtx& c, float m, T* p) {
#if defined(QLORA_X86)
    if (isa == CpuIsa::kAvx512) {
        return row_exp_avx512(s, c, m, p);
    }
#endif
    return row_exp_scalar(s, c, m, p);
}

void row_grad(CpuIsa isa, float* s, float* dp, const RowCtx& c, float lse, float delta) {
#if defined(QLORA_X86)
    if (isa == CpuIsa::kAvx512) {
        row_grad_avx512(s, dp, c, lse, delta);
        return;
    }
#endif
    row_grad_scalar(s, dp, c, lse, delta);
}

// Packs a float32 [K, N] matrix (row stride ld) as the B operand of gemm<T>, rounding to T.
template <typename T> void pack_f32(CpuIsa isa, const float* src, int64_t ld, int64_t K, int64_t N, T* dst) {
#if defined(QLORA_X86)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (isa == CpuIsa::kAvx512) {
            pack_f32_bf16_avx512(src, ld, K, N, reinterpret_cast<uint16_t*>(dst));
            return;
        }
    }
#endif
    attn::pack_b<T, float>(src, ld, 1, K, N, dst);
}

// dst[r * ld_dst + c] = T(src[r * ld_src + c] * mul) for an [M, N] block.
template <typename T>
void round_rows(
    CpuIsa isa, const float* src, int64_t ld_src, int64_t M, int64_t N, T* dst, int64_t ld_dst, float mul = 1.0f
) {
#if defined(QLORA_X86)
    if (isa == CpuIsa::kAvx512) {
        round_rows_avx512(src, ld_src, M, N, dst, ld_dst, mul);
        return;
    }
#endif
    for (int64_t r = 0; r < M; ++r) {
        for (int64_t c = 0; c < N; ++c) {
            dst[r * ld_dst + c] = static_cast<T>(src[r * ld_src + c] * mul);
        }
    }
}

// dst[d * T + t] = src[t * token_stride + d]: one head's [T, D] rows transposed to [D, T].
template <typename T> void transpose_head(const T* src, int64_t token_stride, int64_t T_, int64_t D, T* dst) {
    constexpr int64_t kTile = 16;
    for (int64_t t0 = 0; t0 < T_; t0 += kTile) {
        for (int64_t d0 = 0; d0 < D; d0 += kTile) {
            for (int64_t d = d0; d < std::min(D, d0 + kTile); ++d) {
                for (int64_t t = t0; t < std::min(T_, t0 + kTile); ++t) {
                    dst[d * T_ + t] = src[t * token_stride + d];
                }
            }
        }
    }
}

// Packed K^T (B[d][key], for S = Q K^T) and, if `rows` is given, packed K (B[key][d], for P V or dS K) of every
// (batch, kv head), in parallel.
template <typename T>
void pack_kv(
    const T* base, core::AttentionStrides st, int64_t B, int64_t KVH, int64_t T_, int64_t D, std::vector<T>* transposed,
    std::vector<T>* rows
) {
    const int64_t t_size = attn::packed_size<T>(D, T_);
    const int64_t r_size = attn::packed_size<T>(T_, D);
    if (transposed != nullptr) {
        transposed->resize(static_cast<size_t>(B * KVH * t_size));
    }
    if (rows != nullptr) {
        rows->resize(static_cast<size_t>(B * KVH * r_size));
    }
    at::parallel_for(0, B * KVH, 1, [&](int64_t a, int64_t e) {
        for (int64_t bk = a; bk < e; ++bk) {
            const T* src = base + (bk / KVH) * st.batch + (bk % KVH) * st.head;
            if (transposed != nullptr) {
                attn::pack_b<T>(src, 1, st.token, D, T_, transposed->data() + bk * t_size);
            }
            if (rows != nullptr) {
                attn::pack_b<T>(src, st.token, 1, T_, D, rows->data() + bk * r_size);
            }
        }
    });
}

// --------------------------------------------------------------------------------------------------------------
// Forward

template <typename T> void attention_forward_cpu(const core::AttentionFwdParams<T>& P) {
    const CpuIsa isa = cpu_isa();
    const int64_t B = P.batch, H = P.heads, KVH = P.kv_heads, T_ = P.tokens, D = P.head_dim, G = H / KVH;
    std::vector<T> kt, vr;
    pack_kv<T>(P.k, P.k_stride, B, KVH, T_, D, &kt, nullptr);
    pack_kv<T>(P.v, P.v_stride, B, KVH, T_, D, nullptr, &vr);
    const int64_t kt_size = attn::packed_size<T>(D, T_), kt_ps = attn::panel_stride<T>(D);
    const int64_t vr_size = attn::packed_size<T>(T_, D), vr_ps = attn::panel_stride<T>(T_);
    const std::vector<int64_t> first = first_visible(P.segments, B, T_);
    const int64_t blocks = (T_ + kQueryBlock - 1) / kQueryBlock;

    at::parallel_for(0, B * H * blocks, 1, [&](int64_t a, int64_t e) {
        std::vector<float> S(static_cast<size_t>(kQueryBlock * kKeyChunk));
        std::vector<T> Pb(static_cast<size_t>(kQueryBlock * kKeyChunk));
        std::vector<float> O(static_cast<size_t>(kQueryBlock * D));
        float m[kQueryBlock], l[kQueryBlock];
        for (int64_t item = a; item < e; ++item) {
            const int64_t b = item / (H * blocks), h = item / blocks % H, qb = item % blocks;
            const int64_t bk = b * KVH + h / G;
            const int64_t i0 = qb * kQueryBlock, M = std::min(kQueryBlock, T_ - i0);
            const int64_t kbeg = window_begin(first, b, T_, i0, M), kend = i0 + M;
            const T* Q = P.q + b * P.q_stride.batch + h * P.q_stride.head + i0 * P.q_stride.token;
            const int32_t* seg = P.segments != nullptr ? P.segments + b * T_ : nullptr;
            std::fill(m, m + M, kNegInf);
            std::fill(l, l + M, 0.0f);
            std::fill(O.begin(), O.end(), 0.0f);
            for (int64_t c0 = kbeg; c0 < kend; c0 += kKeyChunk) {
                const int64_t N = std::min(kKeyChunk, kend - c0);
                attn::gemm(
                    isa, M, N, D, Q, P.q_stride.token, kt.data() + bk * kt_size + (c0 / kPanel) * kt_ps, kt_ps,
                    S.data(), kKeyChunk, false
                );
                for (int64_t r = 0; r < M; ++r) {
                    const int64_t i = i0 + r;
                    const RowCtx c{c0, N, i, seg, seg != nullptr ? seg[i] : 0, P.scale};
                    const float* srow = S.data() + r * kKeyChunk;
                    const float mx = row_max(isa, srow, c);
                    const float m_new = std::max(m[r], mx);
                    if (m_new == kNegInf) { // nothing visible yet: p = 0 for this chunk, state unchanged
                        std::fill(Pb.data() + r * kKeyChunk, Pb.data() + r * kKeyChunk + N, T(0.0f));
                        continue;
                    }
                    const float alpha = std::exp(m[r] - m_new);
                    const float sum = row_exp(isa, srow, c, m_new, Pb.data() + r * kKeyChunk);
                    l[r] = l[r] * alpha + sum;
                    if (alpha != 1.0f) {
                        float* orow = O.data() + r * D;
                        for (int64_t d = 0; d < D; ++d) {
                            orow[d] *= alpha;
                        }
                    }
                    m[r] = m_new;
                }
                attn::gemm(
                    isa, M, D, N, Pb.data(), kKeyChunk, vr.data() + bk * vr_size + attn::panel_offset<T>(c0), vr_ps,
                    O.data(), D, true
                );
            }
            T* out = P.out + b * P.out_stride.batch + h * P.out_stride.head + i0 * P.out_stride.token;
            float* lse = P.lse + (b * H + h) * T_ + i0;
            for (int64_t r = 0; r < M; ++r) {
                round_rows(isa, O.data() + r * D, D, 1, D, out + r * P.out_stride.token, 0, 1.0f / l[r]);
                lse[r] = m[r] + std::log(l[r]);
            }
        }
    });
}

// --------------------------------------------------------------------------------------------------------------
// Backward

template <typename T> void attention_backward_cpu(const core::AttentionBwdParams<T>& P) {
    const CpuIsa isa = cpu_isa();
    const int64_t B = P.batch, H = P.heads, KVH = P.kv_heads, T_ = P.tokens, D = P.head_dim, G = H / KVH;
    std::vector<T> kt, kr, vt;
    pack_kv<T>(P.k, P.k_stride, B, KVH, T_, D, &kt, &kr);
    pack_kv<T>(P.v, P.v_stride, B, KVH, T_, D, &vt, nullptr);
    const int64_t t_size = attn::packed_size<T>(D, T_), t_ps = attn::panel_stride<T>(D);
    const int64_t r_size = attn::packed_size<T>(T_, D), r_ps = attn::panel_stride<T>(T_);
    const std::vector<int64_t> first = first_visible(P.segments, B, T_);
    const int64_t blocks = (T_ + kQueryBlock - 1) / kQueryBlock;
    const int64_t Tp = (T_ + kPanel - 1) / kPanel * kPanel; // row stride of the score buffers
    // dK^T and dV^T per query head, float32 [B * H][D][T].
    std::vector<float> dkt(static_cast<size_t>(B * H * D * T_), 0.0f), dvt(static_cast<size_t>(B * H * D * T_), 0.0f);

    at::parallel_for(0, B * H, 1, [&](int64_t a, int64_t e) {
        std::vector<float> S(static_cast<size_t>(kQueryBlock * Tp)), dP(static_cast<size_t>(kQueryBlock * Tp));
        std::vector<T> dSr(static_cast<size_t>(kQueryBlock * Tp));
        std::vector<T> Pp(static_cast<size_t>(attn::packed_size<T>(kQueryBlock, Tp)));
        std::vector<T> dSp(static_cast<size_t>(attn::packed_size<T>(kQueryBlock, Tp)));
        std::vector<T> Qt(static_cast<size_t>(D * T_)), dOt(static_cast<size_t>(D * T_));
        std::vector<float> dQ(static_cast<size_t>(kQueryBlock * D));
        for (int64_t bh = a; bh < e; ++bh) {
            const int64_t b = bh / H, h = bh % H, bk = b * KVH + h / G;
            const T* Qh = P.q + b * P.q_stride.batch + h * P.q_stride.head;
            const T* dOh = P.grad_out + b * P.grad_out_stride.batch + h * P.grad_out_stride.head;
            const T* Oh = P.out + b * P.out_stride.batch + h * P.out_stride.head;
            T* dQh = P.dq + b * P.dq_stride.batch + h * P.dq_stride.head;
            const float* lse = P.lse + bh * T_;
            const int32_t* seg = P.segments != nullptr ? P.segments + b * T_ : nullptr;
            transpose_head(Qh, P.q_stride.token, T_, D, Qt.data());
            transpose_head(dOh, P.grad_out_stride.token, T_, D, dOt.data());
            float* dK = dkt.data() + bh * D * T_;
            float* dV = dvt.data() + bh * D * T_;
            for (int64_t qb = 0; qb < blocks; ++qb) {
                const int64_t i0 = qb * kQueryBlock, M = std::min(kQueryBlock, T_ - i0);
                const int64_t kbeg = window_begin(first, b, T_, i0, M), N = i0 + M - kbeg;
                const T* Q = Qh + i0 * P.q_stride.token;
                const T* dO = dOh + i0 * P.grad_out_stride.token;
                attn::gemm(
                    isa, M, N, D, Q, P.q_stride.token, kt.data() + bk * t_size + (kbeg / kPanel) * t_ps, t_ps, S.data(),
                    Tp, false
                );
                attn::gemm(
                    isa, M, N, D, dO, P.grad_out_stride.token, vt.data() + bk * t_size + (kbeg / kPanel) * t_ps, t_ps,
                    dP.data(), Tp, false
                );
                for (int64_t r = 0; r < M; ++r) {
                    const int64_t i = i0 + r;
                    const float delta = dot(isa, dO + r * P.grad_out_stride.token, Oh + i * P.out_stride.token, D);
                    const RowCtx c{kbeg, N, i, seg, seg != nullptr ? seg[i] : 0, P.scale};
                    row_grad(isa, S.data() + r * Tp, dP.data() + r * Tp, c, lse[i], delta);
                }
                pack_f32(isa, S.data(), Tp, M, N, Pp.data());
                pack_f32(isa, dP.data(), Tp, M, N, dSp.data());
                round_rows(isa, dP.data(), Tp, M, N, dSr.data(), Tp);
                const int64_t ps_m = attn::panel_stride<T>(M);
                attn::gemm(isa, D, N, M, dOt.data() + i0, T_, Pp.data(), ps_m, dV + kbeg, T_, true);
                attn::gemm(isa, D, N, M, Qt.data() + i0, T_, dSp.data(), ps_m, dK + kbeg, T_, true);
                attn::gemm(
                    isa, M, D, N, dSr.data(), Tp, kr.data() + bk * r_size + attn::panel_offset<T>(kbeg), r_ps,
                    dQ.data(), D, false
                );
                round_rows(isa, dQ.data(), D, M, D, dQh + i0 * P.dq_stride.token, P.dq_stride.token);
            }
        }
    });

    // dk, dv [b, kv head, t, d] = sum over the group's query heads of dK^T, dV^T [d, t]: the sum into the first head
    // of the group (contiguous rows), then a tiled transpose with the rounding to T.
    at::parallel_for(0, B * KVH * 2, 1, [&](int64_t a, int64_t e) {
        for (int64_t item = a; item < e; ++item) {
            const int64_t bk = item / 2, b = bk / KVH, kh = bk % KVH;
            const bool is_k = item % 2 == 0;
            float* sum = (is_k ? dkt : dvt).data() + (b * H + kh * G) * D * T_;
            for (int64_t g = 1; g < G; ++g) {
                const float* head = sum + g * D * T_;
                for (int64_t x = 0; x < D * T_; ++x) {
                    sum[x] += head[x];
                }
            }
            T* dst = is_k ? P.dk + b * P.dk_stride.batch + kh * P.dk_stride.head
                          : P.dv + b * P.dv_stride.batch + kh * P.dv_stride.head;
            const int64_t tok = is_k ? P.dk_stride.token : P.dv_stride.token;
            constexpr int64_t kTile = 16;
            for (int64_t t0 = 0; t0 < T_; t0 += kTile) {
                for (int64_t d0 = 0; d0 < D; d0 += kTile) {
                    for (int64_t t = t0; t < std::min(T_, t0 + kTile); ++t) {
                        for (int64_t d = d0; d < std::min(D, d0 + kTile); ++d) {
                            dst[t * tok + d] = static_cast<T>(sum[d * T_ + t]);
                        }
                    }
                }
            }
        }
    });
}

// --------------------------------------------------------------------------------------------------------------
// Ops

std::tuple<at::Tensor, at::Tensor> causal_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& segment_ids,
    std::optional<double> scale
) {
    const AttentionArgs a = attention_prepare("qlora::causal_attention", q, k, v, segment_ids, scale);
    auto [out, lse] = attention_empty_outputs(a.q);
    if (a.q.numel() == 0) {
        return {out, lse};
    }
    visit_float_dtype(a.q.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        attention_forward_cpu(attention_fwd_params<T>(a.q, a.k, a.v, a.segments32, out, lse, a.scale));
    });
    return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& segment_ids, std::optional<double> scale
) {
    const AttentionArgs a =
        attention_prepare_backward("qlora::causal_attention_backward", grad_out, q, k, v, out, lse, segment_ids, scale);
    at::Tensor dq = at::empty_like(a.q), dk = at::empty_like(a.k), dv = at::empty_like(a.v);
    if (a.q.numel() == 0) {
        return {dq, dk.zero_(), dv.zero_()};
    }
    visit_float_dtype(a.q.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        attention_backward_cpu(
            attention_bwd_params<T>(a.grad_out, a.q, a.k, a.v, a.out, a.lse, a.segments32, dq, dk, dv, a.scale)
        );
    });
    return {dq, dk, dv};
}

} // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
    m.impl("causal_attention", &causal_attention_cpu);
    m.impl("causal_attention_backward", &causal_attention_backward_cpu);
}

} // namespace qlora::cpu
