// csrc/cpu/adamw_simd.cpp: see adamw_simd.h. Note [AdamW8 update order] (core/adamw.h) is the algorithm.
#include "adamw_simd.h"

#include <algorithm>
#include <atomic>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "simd_x86.h"

namespace qlora::cpu {
namespace {

using core::kAdamw8BlockSize;

// --------------------------------------------------------------------------------------------------------------
// Scalar reference

template <typename T> void adamw_store_param(T* p, float delta, const core::AdamwScalars& s) {
    const auto round = [](float x) {
        return static_cast<float>(static_cast<T>(x));
    };
    *p = static_cast<T>(core::adamw_new_param(static_cast<float>(*p), delta, s, round));
}

template <typename T>
void adamw8_block_scalar(const core::Adamw8Params<T>& P, const Dynamic8Lut* lut1, const Dynamic8Lut* lut2, int64_t b) {
    const core::AdamwScalars& s = P.scalars;
    const int64_t s0 = b * kAdamw8BlockSize;
    const int len = static_cast<int>(std::min<int64_t>(kAdamw8BlockSize, P.n - s0));
    float m[kAdamw8BlockSize];
    float v[kAdamw8BlockSize];
    bool finite[kAdamw8BlockSize];
    const float a1_old = P.absmax1[b];
    const float a2_old = P.absmax2[b];
    float a1 = 0.0f;
    float a2 = 0.0f;
    for (int j = 0; j < len; ++j) {
        const int64_t i = s0 + j;
        m[j] = core::dynamic8_decode(P.qmap1, P.state1[i], a1_old);
        v[j] = core::dynamic8_decode(P.qmap2, P.state2[i], a2_old);
        finite[j] = core::adamw_update_moments(static_cast<float>(P.grad[i]), &m[j], &v[j], s);
        a1 = core::absmax_update(a1, m[j]);
        a2 = core::absmax_update(a2, v[j]);
    }
    if (len < kAdamw8BlockSize) {
        a1 = core::absmax_merge(a1, core::adamw8_padding_m(P.qmap1, a1_old, s));
    }
    P.absmax1[b] = a1;
    P.absmax2[b] = a2;
    const float scale1 = core::block_scale(a1);
    const float scale2 = core::block_scale(a2);
    for (int j = 0; j < len; ++j) {
        const int64_t i = s0 + j;
        if (finite[j]) {
            adamw_store_param(P.param + i, core::adamw_delta(m[j], v[j], s), s);
        }
        if (lut1 != nullptr) {
            const uint8_t c1 = dynamic8_lut_encode(*lut1, core::fmul_rn(m[j], scale1));
            P.state1[i] = core::adamw8_sign_fix(P.qmap1, c1, m[j]);
        } else {
            P.state1[i] = core::adamw8_encode_m(P.qmap1, m[j], scale1);
        }
        P.state2[i] = lut2 != nullptr ? dynamic8_lut_encode(*lut2, core::fmul_rn(v[j], scale2))
                                      : core::adamw8_encode_v(P.qmap2, v[j], scale2);
    }
}

template <typename T> void adamw32_range_scalar(const core::Adamw32Params<T>& P, int64_t i0, int64_t i1) {
    const core::AdamwScalars& s = P.scalars;
    for (int64_t i = i0; i < i1; ++i) {
        float m = P.exp_avg[i];
        float v = P.exp_avg_sq[i];
        const bool finite = core::adamw_update_moments(static_cast<float>(P.grad[i]), &m, &v, s);
        P.exp_avg[i] = m;
        P.exp_avg_sq[i] = v;
        if (finite) {
            adamw_store_param(P.param + i, core::adamw_delta(m, v, s), s);
        }
    }
}

#if defined(QLORA_X86)

// --------------------------------------------------------------------------------------------------------------
// AVX-512

// Note [AdamW8 AVX-512 encoding]
// The vector kernel handles blocks whose new absmax values are positive, finite and have a finite reciprocal, so
// every scaled state y = m · scale1 or v · scale2 is finite (|y| <= about 1), and v is never negative (+0 at
// least); other blocks (all-zero moments, overflow) take the scalar path. Under these conditions the table lookup needs
// no NaN lane, and bitsandbytes' first-moment sign fix (core::adamw8_sign_fix) reduces to one case: for the
// mirror-symmetric signed map a code is negative exactly below 127, a positive m never gets a negative code, and a
// negative m (or -0) gets a non-negative code only as 127 (+0), which the fix turns into 126. So a negative lane's
// code is 254 - min(max(r, 128), 254), r being the code of |y|; the kernel applies that to the packed bytes.

// Code of |y| in the positive half-table (dynamic8_lut_encode before mirroring): one gather per 16 values.
QLORA_AVX512 inline __m512i lut_code_abs16(const Dynamic8Lut& lut, __m512i abits) {
    const __m512i low16 = _mm512_set1_epi32(0xffff);
    __m512i key = _mm512_srli_epi32(abits, Dynamic8Lut::kShift);
    key = _mm512_min_epu32(
        _mm512_max_epu32(key, _mm512_set1_epi32(Dynamic8Lut::kKeyMin)), _mm512_set1_epi32(Dynamic8Lut::kKeyMax)
    );
    key = _mm512_sub_epi32(key, _mm512_set1_epi32(Dynamic8Lut::kKeyMin));
    const __m512i e = _mm512_i32gather_epi32(key, lut.entry, 4);
    const __mmask16 up = _mm512_cmpgt_epu32_mask(_mm512_and_si512(abits, low16), _mm512_and_si512(e, low16));
    const __m512i r = _mm512_srli_epi32(e, 16);
    return _mm512_mask_add_epi32(r, up, r, _mm512_set1_epi32(1));
}

// The affine tables of one map (Note [Segment-affine nearest code]) held in registers for a block: 32 entries each
// as two halves; `on` is false for a map without them, which then takes the bucketed table alone.
struct AffineRegs {
    __m512 boundary0, boundary1, a0, a1, b0, b1;
    __m512i hi0, hi1;
    bool on;
};

QLORA_AVX512 inline AffineRegs affine_regs(const Dynamic8Lut& lut) {
    const Dynamic8Affine& A = lut.affine;
    return {
        _mm512_load_ps(A.boundary),
        _mm512_load_ps(A.boundary + 16),
        _mm512_load_ps(A.a),
        _mm512_load_ps(A.a + 16),
        _mm512_load_ps(A.b),
        _mm512_load_ps(A.b + 16),
        _mm512_load_si512(A.hi),
        _mm512_load_si512(A.hi + 16),
        lut.has_affine};
}

// Codes of 16 values |y| (|y| < 2) in the low byte of each lane, the rest of the lane unspecified. The affine rule:
// |y| raised to 2^-31 at least (all values up to it share the lowest code), so its exponent modulo 32 is the binade
// (the permutes read the low five bits of the index); one compare with the binade's boundary; u = |y| · a + b; near if
// bits 4-14 of bits(u) are zero, else code = min(bits(u) >> 15, hi). 16 values of which one is near take the table.
QLORA_AVX512 inline __m512i code_abs16(const Dynamic8Lut& lut, const AffineRegs& A, __m512 y) {
    // VRANGEPS imm 0b1011: the operand of larger magnitude with the sign cleared, here max(|y|, 2^-31).
    const __m512 ay =
        _mm512_range_ps(y, _mm512_castsi512_ps(_mm512_set1_epi32(Dynamic8Affine::kExponentBase << 23)), 0b1011);
    // The table may take the raised value too: its lowest bucket, [0, 2^-24), holds one code (dynamic8_lut's build).
    if (!A.on) {
        return lut_code_abs16(lut, _mm512_castps_si512(ay));
    }
    __m512i e = _mm512_srli_epi32(_mm512_castps_si512(ay), 23);
    const __m512 boundary = _mm512_permutex2var_ps(A.boundary0, e, A.boundary1);
    e = _mm512_mask_add_epi32(e, _mm512_cmp_ps_mask(ay, boundary, _CMP_GE_OQ), e, _mm512_set1_epi32(1));
    const __m512 a = _mm512_permutex2var_ps(A.a0, e, A.a1);
    const __m512 b = _mm512_permutex2var_ps(A.b0, e, A.b1);
    const __m512i hi = _mm512_permutex2var_epi32(A.hi0, e, A.hi1);
    const __m512i u = _mm512_castps_si512(_mm512_fmadd_ps(ay, a, b));
    if (__builtin_expect(_mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7ff0)) != 0, 0)) {
        return lut_code_abs16(lut, _mm512_castps_si512(ay));
    }
    return _mm512_min_epi32(_mm512_srli_epi32(u, 15), hi);
}

// state1 codes of 16 first moments m (y = m · scale1), signed table, sign fix included.
QLORA_AVX512 inline __m128i adamw8_encode_m16(const Dynamic8Lut& lut1, const AffineRegs& A1, __m512 m, __m512 scale1) {
    const __m128i r = _mm512_cvtepi32_epi8(code_abs16(lut1, A1, _mm512_mul_ps(m, scale1)));
    // The sign of m decides (m and y have the same sign bit: scale1 > 0).
    const __mmask16 neg = _mm512_cmplt_epi32_mask(_mm512_castps_si512(m), _mm512_setzero_si512());
    __m128i q = _mm_mask_max_epu8(r, neg, r, _mm_set1_epi8(static_cast<char>(128)));
    q = _mm_mask_min_epu8(q, neg, q, _mm_set1_epi8(static_cast<char>(254)));
    return _mm_mask_sub_epi8(q, neg, _mm_set1_epi8(static_cast<char>(254)), q);
}

// state2 codes of 16 second moments v >= +0 (y = v · scale2), unsigned table.
QLORA_AVX512 inline __m128i adamw8_encode_v16(const Dynamic8Lut& lut2, const AffineRegs& A2, __m512 v, __m512 scale2) {
    return _mm512_cvtepi32_epi8(code_abs16(lut2, A2, _mm512_mul_ps(v, scale2)));
}

// Encodes the multiple-of-16 prefix of x (see adamw8_encode_run); returns its length.
QLORA_AVX512 int64_t
adamw8_encode_run_avx512(const Dynamic8Lut& lut, const float* x, float scale, int64_t n, uint8_t* q) {
    const __m512 sv = _mm512_set1_ps(scale);
    const AffineRegs A = affine_regs(lut);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        const __m128i c = lut.is_signed ? adamw8_encode_m16(lut, A, xv, sv) : adamw8_encode_v16(lut, A, xv, sv);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), c);
    }
    return i;
}

// table[idx] for a 256-entry float table and 16 indices in [0, 255] without a gather (gathers dominate the
// profile otherwise): eight two-register permutes (32 entries each, index bits 0-4) and a selection tree on index
// bits 5-7.
QLORA_AVX512 inline __m512 lookup256(const float* table, __m512i idx) {
    __m512 r[8];
    for (int k = 0; k < 8; ++k) {
        r[k] = _mm512_permutex2var_ps(_mm512_loadu_ps(table + 32 * k), idx, _mm512_loadu_ps(table + 32 * k + 16));
    }
    const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    const __m512 s0 = _mm512_mask_mov_ps(r[0], b5, r[1]);
    const __m512 s1 = _mm512_mask_mov_ps(r[2], b5, r[3]);
    const __m512 s2 = _mm512_mask_mov_ps(r[4], b5, r[5]);
    const __m512 s3 = _mm512_mask_mov_ps(r[6], b5, r[7]);
    const __m512 t0 = _mm512_mask_mov_ps(s0, b6, s1);
    const __m512 t1 = _mm512_mask_mov_ps(s2, b6, s3);
    return _mm512_mask_mov_ps(t0, b7, t1);
}

// Note [Byte-plane decode]
// map[q] for 64 codes at once with AVX-512 VBMI: byte k of every map entry forms a 256-byte plane (four registers),
// and two 128-entry byte permutes plus a select on bit 7 look up 64 bytes of one plane. Interleaving the four planes'
// bytes (unpack 8 then 16 bits) yields the floats, but the unpacks work inside 128-bit lanes: output register j gets,
// from lane L, the four floats of byte positions 16L + 4j .. 16L + 4j + 3. Permuting the codes first so that
// position 16L + 4j + r holds element 16j + 4L + r (a 4x4 transpose of 4-byte groups, its own inverse) puts elements
// 16j .. 16j + 15 in register j in order. 22 instructions per 64 values against 60 for lookup256.
alignas(64) constexpr uint8_t kPlaneOrder[64] = {
    0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4,  5,  6,  7,  20, 21,
    22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43,
    56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63,
};

QLORA_AVX512_VBMI inline void lookup256_bytes64(const uint8_t (&planes)[4][256], const uint8_t* codes, float* out) {
    const __m512i idx = _mm512_permutexvar_epi8(_mm512_load_si512(kPlaneOrder), _mm512_loadu_si512(codes));
    const __mmask64 top = _mm512_movepi8_mask(idx);
    __m512i b[4];
    for (int k = 0; k < 4; ++k) {
        const __m512i lo =
            _mm512_permutex2var_epi8(_mm512_load_si512(planes[k]), idx, _mm512_load_si512(planes[k] + 64));
        const __m512i hi =
            _mm512_permutex2var_epi8(_mm512_load_si512(planes[k] + 128), idx, _mm512_load_si512(planes[k] + 192));
        b[k] = _mm512_mask_mov_epi8(lo, top, hi);
    }
    const __m512i w01lo = _mm512_unpacklo_epi8(b[0], b[1]);
    const __m512i w01hi = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i w23lo = _mm512_unpacklo_epi8(b[2], b[3]);
    const __m512i w23hi = _mm512_unpackhi_epi8(b[2], b[3]);
    _mm512_storeu_si512(out, _mm512_unpacklo_epi16(w01lo, w23lo));
    _mm512_storeu_si512(out + 16, _mm512_unpackhi_epi16(w01lo, w23lo));
    _mm512_storeu_si512(out + 32, _mm512_unpacklo_epi16(w01hi, w23hi));
    _mm512_storeu_si512(out + 48, _mm512_unpackhi_epi16(w01hi, w23hi));
}

// The map values of one block's codes (q1 into lut1's map, q2 into lut2's) into d1, d2 [256]. Not inlined: the
// block kernel it serves is compiled without VBMI so that it also runs where VBMI is missing.
__attribute__((noinline)) QLORA_AVX512_VBMI void adamw8_decode_block_vbmi(
    const Dynamic8Lut& lut1, const Dynamic8Lut& lut2, const uint8_t* q1, const uint8_t* q2, float* d1, float* d2
) {
    for (int j = 0; j < kAdamw8BlockSize; j += 64) {
        lookup256_bytes64(lut1.value_bytes, q1 + j, d1 + j);
        lookup256_bytes64(lut2.value_bytes, q2 + j, d2 + j);
    }
}

// Decodes the multiple-of-64 prefix of q into out (adamw8_decode_run); returns its length.
__attribute__((noinline)) QLORA_AVX512_VBMI int64_t
adamw8_decode_run_vbmi(const Dynamic8Lut& lut, const uint8_t* q, int64_t n, float* out) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        lookup256_bytes64(lut.value_bytes, q + i, out + i);
    }
    return i;
}

// The same without VBMI.
QLORA_AVX512 inline void adamw8_decode_block_permute(
    const float* qmap1, const float* qmap2, const uint8_t* q1, const uint8_t* q2, float* d1, float* d2
) {
    for (int j = 0; j < kAdamw8BlockSize; j += 16) {
        const __m512i c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q1 + j)));
        const __m512i c2 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q2 + j)));
        _mm512_store_ps(d1 + j, lookup256(qmap1, c1));
        _mm512_store_ps(d2 + j, lookup256(qmap2, c2));
    }
}

// Decodes the multiple-of-16 prefix of q into out without VBMI; returns its length.
QLORA_AVX512 int64_t adamw8_decode_run_permute(const float* map, const uint8_t* q, int64_t n, float* out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
        _mm512_storeu_ps(out + i, lookup256(map, c));
    }
    return i;
}

// Lanes of g that are finite (not NaN, not ±Inf).
QLORA_AVX512 inline __mmask16 finite16(__m512 g) {
    return _knot_mask16(_mm512_fpclass_ps_mask(g, 0x01 | 0x80 | 0x08 | 0x10)); // QNaN, SNaN, +Inf, -Inf
}

// p = T(p + delta), then T(p * decay), written only in lanes k.
template <typename T>
QLORA_AVX512 inline void adamw_store_param16(T* p, __mmask16 k, __m512 delta, const core::AdamwScalars& s) {
    __m512 x = simd::round16(_mm512_add_ps(simd::load16(p), delta), p);
    if (s.has_decay) {
        x = _mm512_mul_ps(x, _mm512_set1_ps(s.decay));
    }
    simd::store16_mask(p, k, x);
}

QLORA_AVX512 inline __m512 adamw_delta16(__m512 m, __m512 v, const core::AdamwScalars& s) {
    const __m512 denom = _mm512_add_ps(_mm512_sqrt_ps(v), _mm512_set1_ps(s.eps_hat));
    return _mm512_mul_ps(_mm512_set1_ps(s.step_size), _mm512_div_ps(m, denom));
}

// A block absmax the vector encoder accepts (Note [AdamW8 AVX-512 encoding]).
inline bool adamw8_vector_absmax(float a) {
    return a > 0.0f && core::is_finite(a) && core::is_finite(core::block_scale(a));
}

constexpr int64_t kPrefetchBlocks = 2;

// One full block of 256 elements; lut1 is the signed table, lut2 the unsigned one.
template <typename T>
QLORA_AVX512 void adamw8_block_avx512(
    const core::Adamw8Params<T>& P, const Dynamic8Lut& lut1, const Dynamic8Lut& lut2, bool vbmi, int64_t b
) {
    const core::AdamwScalars& s = P.scalars;
    const int64_t s0 = b * kAdamw8BlockSize;
    constexpr int kVecs = kAdamw8BlockSize / 16;
    alignas(64) float m[kAdamw8BlockSize];
    alignas(64) float v[kAdamw8BlockSize];
    __mmask16 finite[kVecs];
    const __m512 a1_old = _mm512_set1_ps(P.absmax1[b]);
    const __m512 a2_old = _mm512_set1_ps(P.absmax2[b]);
    const __m512 beta1 = _mm512_set1_ps(s.beta1);
    const __m512 one_minus_beta1 = _mm512_set1_ps(s.one_minus_beta1);
    const __m512 beta2 = _mm512_set1_ps(s.beta2);
    const __m512 one_minus_beta2 = _mm512_set1_ps(s.one_minus_beta2);
    __m512 max1 = _mm512_setzero_ps();     // max |m|
    __m512i max2 = _mm512_setzero_si512(); // max v as bits: v >= +0 (Note [AdamW8 AVX-512 encoding])
    // Software prefetch of a block a few blocks ahead, one cache line of each stream per iteration.
    const int64_t ahead = s0 + kPrefetchBlocks * kAdamw8BlockSize;
    const bool prefetch = ahead + kAdamw8BlockSize <= P.n;
    alignas(64) float d1[kAdamw8BlockSize]; // qmap1[state1], qmap2[state2]
    alignas(64) float d2[kAdamw8BlockSize];
    if (vbmi) {
        adamw8_decode_block_vbmi(lut1, lut2, P.state1 + s0, P.state2 + s0, d1, d2);
    } else {
        adamw8_decode_block_permute(P.qmap1, P.qmap2, P.state1 + s0, P.state2 + s0, d1, d2);
    }
    for (int j = 0; j < kVecs; ++j) {
        const int64_t i = s0 + 16 * j;
        if (prefetch) {
            _mm_prefetch(reinterpret_cast<const char*>(P.grad + ahead + 16 * j), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(P.param + ahead + 16 * j), _MM_HINT_T0);
            if (j < 4) {
                _mm_prefetch(reinterpret_cast<const char*>(P.state1 + ahead + 64 * j), _MM_HINT_T0);
                _mm_prefetch(reinterpret_cast<const char*>(P.state2 + ahead + 64 * j), _MM_HINT_T0);
            }
        }
        const __m512 g = simd::load16(P.grad + i);
        const __m512 m_old = _mm512_mul_ps(_mm512_load_ps(d1 + 16 * j), a1_old);
        const __m512 v_old = _mm512_mul_ps(_mm512_load_ps(d2 + 16 * j), a2_old);
        const __mmask16 ok = finite16(g);
        // Non-finite lanes end as +0 (Note [Non-finite gradients]).
        const __m512 mj = _mm512_maskz_add_ps(ok, _mm512_mul_ps(m_old, beta1), _mm512_mul_ps(one_minus_beta1, g));
        const __m512 vj =
            _mm512_maskz_add_ps(ok, _mm512_mul_ps(v_old, beta2), _mm512_mul_ps(_mm512_mul_ps(one_minus_beta2, g), g));
        _mm512_store_ps(m + 16 * j, mj);
        _mm512_store_ps(v + 16 * j, vj);
        finite[j] = ok;
        // VRANGEPS imm 0b1011: the operand of larger magnitude, sign cleared; it ignores a quiet NaN operand. With a
        // finite old absmax, m and v are never NaN (g is finite or masked to +0), and an overflow to ±inf makes the
        // block's absmax infinite. A NaN m needs an old absmax1 of +inf or NaN, which makes every unmasked lane of
        // the block ±inf or NaN, so max |m| is +inf or +0, and both send the block to the scalar path. A NaN v has
        // the largest bits (as unsigned) and sends it there too.
        max1 = _mm512_range_ps(max1, mj, 0b1011);
        max2 = _mm512_max_epu32(max2, _mm512_castps_si512(vj));
    }
    const float a1 = _mm512_reduce_max_ps(max1);
    // A negative v (only from a negative absmax2 loaded from outside) has the largest bits and fails the check below.
    const float a2 = core::float_from_bits(static_cast<uint32_t>(_mm512_reduce_max_epu32(max2)));
    if (!adamw8_vector_absmax(a1) || !adamw8_vector_absmax(a2)) {
        adamw8_block_scalar(P, &lut1, &lut2, b); // nothing has been written yet
        return;
    }
    P.absmax1[b] = a1;
    P.absmax2[b] = a2;
    const __m512 scale1 = _mm512_set1_ps(core::block_scale(a1));
    const __m512 scale2 = _mm512_set1_ps(core::block_scale(a2));
    const AffineRegs A1 = affine_regs(lut1);
    const AffineRegs A2 = affine_regs(lut2);
    for (int j = 0; j < kVecs; ++j) {
        const int64_t i = s0 + 16 * j;
        const __m512 mj = _mm512_load_ps(m + 16 * j);
        const __m512 vj = _mm512_load_ps(v + 16 * j);
        adamw_store_param16(P.param + i, finite[j], adamw_delta16(mj, vj, s), s);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(P.state1 + i), adamw8_encode_m16(lut1, A1, mj, scale1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(P.state2 + i), adamw8_encode_v16(lut2, A2, vj, scale2));
    }
}

template <typename T> QLORA_AVX512 void adamw32_range_avx512(const core::Adamw32Params<T>& P, int64_t i0, int64_t i1) {
    const core::AdamwScalars& s = P.scalars;
    const __m512 beta1 = _mm512_set1_ps(s.beta1);
    const __m512 one_minus_beta1 = _mm512_set1_ps(s.one_minus_beta1);
    const __m512 beta2 = _mm512_set1_ps(s.beta2);
    const __m512 one_minus_beta2 = _mm512_set1_ps(s.one_minus_beta2);
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
        const __m512 g = simd::load16(P.grad + i);
        const __mmask16 ok = finite16(g);
        const __m512 mj = _mm512_maskz_mov_ps(
            ok, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(P.exp_avg + i), beta1), _mm512_mul_ps(one_minus_beta1, g))
        );
        const __m512 vj = _mm512_maskz_mov_ps(
            ok, _mm512_add_ps(
                    _mm512_mul_ps(_mm512_loadu_ps(P.exp_avg_sq + i), beta2),
                    _mm512_mul_ps(_mm512_mul_ps(one_minus_beta2, g), g)
                )
        );
        _mm512_storeu_ps(P.exp_avg + i, mj);
        _mm512_storeu_ps(P.exp_avg_sq + i, vj);
        adamw_store_param16(P.param + i, ok, adamw_delta16(mj, vj, s), s);
    }
    adamw32_range_scalar(P, i, i1);
}

// --------------------------------------------------------------------------------------------------------------
// AVX2: the AVX-512 kernels on 8 lanes (Note [AdamW8 AVX-512 encoding] applies unchanged). Compare results are
// all-ones lanes, so masked moves become blends and ANDs; stores of 16-bit parameters write whole vectors, blending
// the old value back into lanes that keep it (an old value is already representable, so storing it again is exact).

QLORA_AVX2 inline __m256i lut_code_abs8(const Dynamic8Lut& lut, __m256i abits) {
    const __m256i low16 = _mm256_set1_epi32(0xffff);
    __m256i key = _mm256_srli_epi32(abits, Dynamic8Lut::kShift);
    key = _mm256_min_epu32(
        _mm256_max_epu32(key, _mm256_set1_epi32(Dynamic8Lut::kKeyMin)), _mm256_set1_epi32(Dynamic8Lut::kKeyMax)
    );
    key = _mm256_sub_epi32(key, _mm256_set1_epi32(Dynamic8Lut::kKeyMin));
    const __m256i e = _mm256_i32gather_epi32(reinterpret_cast<const int*>(lut.entry), key, 4);
    // Both sides are below 2^16, so the signed compare is the unsigned one; "up" lanes are -1.
    const __m256i up = _mm256_cmpgt_epi32(_mm256_and_si256(abits, low16), _mm256_and_si256(e, low16));
    return _mm256_sub_epi32(_mm256_srli_epi32(e, 16), up);
}

QLORA_AVX2 inline __m256i adamw8_encode_m8(const Dynamic8Lut& lut1, __m256 m, __m256 scale1) {
    const __m256i bits = _mm256_castps_si256(_mm256_mul_ps(m, scale1));
    const __m256i r = lut_code_abs8(lut1, _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)));
    const __m256i mirrored = _mm256_min_epi32(
        _mm256_max_epi32(_mm256_sub_epi32(_mm256_set1_epi32(254), r), _mm256_setzero_si256()), _mm256_set1_epi32(126)
    );
    return _mm256_blendv_epi8(r, mirrored, _mm256_srai_epi32(_mm256_castps_si256(m), 31));
}

QLORA_AVX2 inline __m256i adamw8_encode_v8(const Dynamic8Lut& lut2, __m256 v, __m256 scale2) {
    return lut_code_abs8(lut2, _mm256_castps_si256(_mm256_mul_ps(v, scale2)));
}

QLORA_AVX2 inline void store_codes8(uint8_t* q, __m256i c) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), c);
    for (int k = 0; k < 8; ++k) {
        q[k] = static_cast<uint8_t>(lanes[k]);
    }
}

QLORA_AVX2 int64_t adamw8_encode_run_avx2(const Dynamic8Lut& lut, const float* x, float scale, int64_t n, uint8_t* q) {
    const __m256 sv = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        store_codes8(q + i, lut.is_signed ? adamw8_encode_m8(lut, xv, sv) : adamw8_encode_v8(lut, xv, sv));
    }
    return i;
}

// All-ones lanes where g is finite.
QLORA_AVX2 inline __m256 finite8(__m256 g) {
    const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
    const __m256i inf = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(g), exp_mask), exp_mask);
    return _mm256_castsi256_ps(_mm256_xor_si256(inf, _mm256_set1_epi32(-1)));
}

QLORA_AVX2 inline __m256 round8(__m256 v, const float*) {
    return v;
}
QLORA_AVX2 inline __m256 round8(__m256 v, const c10::BFloat16*) {
    alignas(32) c10::BFloat16 tmp[8];
    simd::store8(tmp, v);
    return simd::load8(tmp);
}
QLORA_AVX2 inline __m256 round8(__m256 v, const c10::Half*) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T>
QLORA_AVX2 inline void adamw_store_param8(T* p, __m256 keep_new, __m256 delta, const core::AdamwScalars& s) {
    const __m256 old = simd::load8(p);
    __m256 x = round8(_mm256_add_ps(old, delta), p);
    if (s.has_decay) {
        x = _mm256_mul_ps(x, _mm256_set1_ps(s.decay));
    }
    simd::store8(p, _mm256_blendv_ps(old, x, keep_new));
}

QLORA_AVX2 inline __m256 adamw_delta8(__m256 m, __m256 v, const core::AdamwScalars& s) {
    const __m256 denom = _mm256_add_ps(_mm256_sqrt_ps(v), _mm256_set1_ps(s.eps_hat));
    return _mm256_mul_ps(_mm256_set1_ps(s.step_size), _mm256_div_ps(m, denom));
}

QLORA_AVX2 inline uint32_t max_epu32_8(__m256i x) {
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), x);
    uint32_t r = 0;
    for (uint32_t u : lanes) {
        r = u > r ? u : r;
    }
    return r;
}

template <typename T>
QLORA_AVX2 void
adamw8_block_avx2(const core::Adamw8Params<T>& P, const Dynamic8Lut& lut1, const Dynamic8Lut& lut2, int64_t b) {
    const core::AdamwScalars& s = P.scalars;
    const int64_t s0 = b * kAdamw8BlockSize;
    constexpr int kVecs = kAdamw8BlockSize / 8;
    alignas(32) float m[kAdamw8BlockSize];
    alignas(32) float v[kAdamw8BlockSize];
    __m256 finite[kVecs];
    const __m256 a1_old = _mm256_set1_ps(P.absmax1[b]);
    const __m256 a2_old = _mm256_set1_ps(P.absmax2[b]);
    const __m256 beta1 = _mm256_set1_ps(s.beta1);
    const __m256 one_minus_beta1 = _mm256_set1_ps(s.one_minus_beta1);
    const __m256 beta2 = _mm256_set1_ps(s.beta2);
    const __m256 one_minus_beta2 = _mm256_set1_ps(s.one_minus_beta2);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
    __m256i max1 = _mm256_setzero_si256();
    __m256i max2 = _mm256_setzero_si256();
    for (int j = 0; j < kVecs; ++j) {
        const int64_t i = s0 + 8 * j;
        const __m256 g = simd::load8(P.grad + i);
        const __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(P.state1 + i)));
        const __m256i q2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(P.state2 + i)));
        const __m256 m_old = _mm256_mul_ps(_mm256_i32gather_ps(P.qmap1, q1, 4), a1_old);
        const __m256 v_old = _mm256_mul_ps(_mm256_i32gather_ps(P.qmap2, q2, 4), a2_old);
        const __m256 ok = finite8(g);
        const __m256 mj =
            _mm256_and_ps(ok, _mm256_add_ps(_mm256_mul_ps(m_old, beta1), _mm256_mul_ps(one_minus_beta1, g)));
        const __m256 vj = _mm256_and_ps(
            ok, _mm256_add_ps(_mm256_mul_ps(v_old, beta2), _mm256_mul_ps(_mm256_mul_ps(one_minus_beta2, g), g))
        );
        _mm256_store_ps(m + 8 * j, mj);
        _mm256_store_ps(v + 8 * j, vj);
        finite[j] = ok;
        max1 = _mm256_max_epu32(max1, _mm256_and_si256(_mm256_castps_si256(mj), abs_mask));
        max2 = _mm256_max_epu32(max2, _mm256_and_si256(_mm256_castps_si256(vj), abs_mask));
    }
    const float a1 = core::float_from_bits(max_epu32_8(max1));
    const float a2 = core::float_from_bits(max_epu32_8(max2));
    if (!adamw8_vector_absmax(a1) || !adamw8_vector_absmax(a2)) {
        adamw8_block_scalar(P, &lut1, &lut2, b);
        return;
    }
    P.absmax1[b] = a1;
    P.absmax2[b] = a2;
    const __m256 scale1 = _mm256_set1_ps(core::block_scale(a1));
    const __m256 scale2 = _mm256_set1_ps(core::block_scale(a2));
    for (int j = 0; j < kVecs; ++j) {
        const int64_t i = s0 + 8 * j;
        const __m256 mj = _mm256_load_ps(m + 8 * j);
        const __m256 vj = _mm256_load_ps(v + 8 * j);
        adamw_store_param8(P.param + i, finite[j], adamw_delta8(mj, vj, s), s);
        store_codes8(P.state1 + i, adamw8_encode_m8(lut1, mj, scale1));
        store_codes8(P.state2 + i, adamw8_encode_v8(lut2, vj, scale2));
    }
}

template <typename T> QLORA_AVX2 void adamw32_range_avx2(const core::Adamw32Params<T>& P, int64_t i0, int64_t i1) {
    const core::AdamwScalars& s = P.scalars;
    const __m256 beta1 = _mm256_set1_ps(s.beta1);
    const __m256 one_minus_beta1 = _mm256_set1_ps(s.one_minus_beta1);
    const __m256 beta2 = _mm256_set1_ps(s.beta2);
    const __m256 one_minus_beta2 = _mm256_set1_ps(s.one_minus_beta2);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        const __m256 g = simd::load8(P.grad + i);
        const __m256 ok = finite8(g);
        const __m256 mj = _mm256_and_ps(
            ok, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(P.exp_avg + i), beta1), _mm256_mul_ps(one_minus_beta1, g))
        );
        const __m256 vj = _mm256_and_ps(
            ok, _mm256_add_ps(
                    _mm256_mul_ps(_mm256_loadu_ps(P.exp_avg_sq + i), beta2),
                    _mm256_mul_ps(_mm256_mul_ps(one_minus_beta2, g), g)
                )
        );
        _mm256_storeu_ps(P.exp_avg + i, mj);
        _mm256_storeu_ps(P.exp_avg_sq + i, vj);
        adamw_store_param8(P.param + i, ok, adamw_delta8(mj, vj, s), s);
    }
    adamw32_range_scalar(P, i, i1);
}

#endif

std::atomic<bool>& vbmi_decode_flag() {
    static std::atomic<bool> flag{cpu_has_avx512_vbmi()};
    return flag;
}

} // namespace

bool adamw8_vbmi_decode() {
    return vbmi_decode_flag().load(std::memory_order_relaxed);
}

void set_adamw8_vbmi_decode(bool enabled) {
    TORCH_CHECK(!enabled || cpu_has_avx512_vbmi(), "set_adamw8_vbmi_decode: this CPU has no AVX-512 VBMI");
    vbmi_decode_flag().store(enabled, std::memory_order_relaxed);
}

template <typename T>
void adamw8_blocks(
    CpuIsa isa, const core::Adamw8Params<T>& params, const Dynamic8Lut* lut1, const Dynamic8Lut* lut2, int64_t b0,
    int64_t b1
) {
#if defined(QLORA_X86)
    if (isa != CpuIsa::kScalar && lut1 != nullptr && lut2 != nullptr && lut1->is_signed && !lut2->is_signed) {
        const int64_t full_blocks = params.n / kAdamw8BlockSize;
        const bool vbmi = adamw8_vbmi_decode();
        int64_t b = b0;
        for (; b < std::min(b1, full_blocks); ++b) {
            if (isa == CpuIsa::kAvx512) {
                adamw8_block_avx512(params, *lut1, *lut2, vbmi, b);
            } else {
                adamw8_block_avx2(params, *lut1, *lut2, b);
            }
        }
        for (; b < b1; ++b) {
            adamw8_block_scalar(params, lut1, lut2, b);
        }
        return;
    }
#endif
    for (int64_t b = b0; b < b1; ++b) {
        adamw8_block_scalar(params, lut1, lut2, b);
    }
}

template <typename T> void adamw32_range(CpuIsa isa, const core::Adamw32Params<T>& params, int64_t i0, int64_t i1) {
#if defined(QLORA_X86)
    if (isa == CpuIsa::kAvx512) {
        adamw32_range_avx512(params, i0, i1);
        return;
    }
    if (isa == CpuIsa::kAvx2) {
        adamw32_range_avx2(params, i0, i1);
        return;
    }
#endif
    adamw32_range_scalar(params, i0, i1);
}

void adamw8_decode_run(CpuIsa isa, const Dynamic8Lut& lut, const uint8_t* q, int64_t n, float* out) {
    float map[256]; // the table's map, from its byte planes
    for (int c = 0; c < 256; ++c) {
        uint32_t bits = 0;
        for (int k = 0; k < 4; ++k) {
            bits |= static_cast<uint32_t>(lut.value_bytes[k][c]) << (8 * k);
        }
        map[c] = core::float_from_bits(bits);
    }
    int64_t i = 0;
#if defined(QLORA_X86)
    if (isa == CpuIsa::kAvx512) {
        i = adamw8_vbmi_decode() ? adamw8_decode_run_vbmi(lut, q, n, out) : adamw8_decode_run_permute(map, q, n, out);
    }
#endif
    for (; i < n; ++i) {
        out[i] = map[q[i]];
    }
}

void adamw8_encode_run(CpuIsa isa, const Dynamic8Lut& lut, const float* x, float scale, int64_t n, uint8_t* q) {
    int64_t i = 0;
#if defined(QLORA_X86)
    if (isa == CpuIsa::kAvx512) {
        i = adamw8_encode_run_avx512(lut, x, scale, n, q);
    } else if (isa == CpuIsa::kAvx2) {
        i = adamw8_encode_run_avx2(lut, x, scale, n, q);
    }
#endif
    for (; i < n; ++i) {
        const uint8_t c = dynamic8_lut_encode(lut, core::fmul_rn(x[i], scale));
        q[i] = lut.is_signed ? (c == 127 && (core::bits_from_float(x[i]) >> 31) != 0 ? 126 : c) : c;
    }
}

#define QLORA_INSTANTIATE_ADAMW(T)                                                                                     \
    template void adamw8_blocks<T>(                                                                                    \
        CpuIsa, const core::Adamw8Params<T>&, const Dynamic8Lut*, const Dynamic8Lut*, int64_t, int64_t                 \
    );                                                                                                                 \
    template void adamw32_range<T>(CpuIsa, const core::Adamw32Params<T>&, int64_t, int64_t);
QLORA_INSTANTIATE_ADAMW(float)
QLORA_INSTANTIATE_ADAMW(c10::BFloat16)
QLORA_INSTANTIATE_ADAMW(c10::Half)
#undef QLORA_INSTANTIATE_ADAMW

} // namespace qlora::cpu
