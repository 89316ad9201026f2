// csrc/cpu/dynamic8_simd.cpp: see dynamic8_simd.h.
#include "dynamic8_simd.h"

#include "../core/dynamic8.h"

#include "simd_x86.h"

namespace qlora::cpu {
namespace {

void encode_run_scalar(const float* code, const float* x, float scale, int64_t n, uint8_t* q) {
    for (int64_t i = 0; i < n; ++i) {
        q[i] = core::dynamic8_encode(code, core::fmul_rn(x[i], scale));
    }
}

#if defined(QLORA_X86)

// core::dynamic8_encode on 16 lanes. Every scalar branch becomes a masked move; map entries are gathered.
QLORA_AVX512 void encode_run_avx512(const float* code, const float* x, float scale, int64_t n, uint8_t* q) {
    const __m512 sv = _mm512_set1_ps(scale);
    const __m512 half = _mm512_set1_ps(0.5f);
    const __m512 code0 = _mm512_set1_ps(code[0]);
    const __m512 code255 = _mm512_set1_ps(code[255]);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(x + i), sv);
        __m512i pivot = _mm512_set1_epi32(127);
        __m512i upper_pivot = _mm512_set1_epi32(255);
        __m512i lower_pivot = _mm512_setzero_si512();
        __m512 lower = _mm512_set1_ps(-1.0f);
        __m512 upper = _mm512_set1_ps(1.0f);
        __m512 val = _mm512_set1_ps(code[127]);
        for (int step = 64; step > 0; step >>= 1) {
            const __mmask16 gt = _mm512_cmp_ps_mask(y, val, _CMP_GT_OQ);
            lower_pivot = _mm512_mask_mov_epi32(lower_pivot, gt, pivot);
            lower = _mm512_mask_mov_ps(lower, gt, val);
            upper_pivot = _mm512_mask_mov_epi32(upper_pivot, static_cast<__mmask16>(~gt), pivot);
            upper = _mm512_mask_mov_ps(upper, static_cast<__mmask16>(~gt), val);
            const __m512i s = _mm512_set1_epi32(step);
            pivot = _mm512_mask_add_epi32(_mm512_sub_epi32(pivot, s), gt, pivot, s);
            val = _mm512_i32gather_ps(pivot, code, 4);
        }
        upper = _mm512_mask_mov_ps(upper, _mm512_cmpeq_epi32_mask(upper_pivot, _mm512_set1_epi32(255)), code255);
        lower = _mm512_mask_mov_ps(lower, _mm512_cmpeq_epi32_mask(lower_pivot, _mm512_setzero_si512()), code0);
        const __mmask16 gt = _mm512_cmp_ps_mask(y, val, _CMP_GT_OQ);
        const __m512 mid_up = _mm512_mul_ps(_mm512_add_ps(upper, val), half);
        const __m512 mid_lo = _mm512_mul_ps(_mm512_add_ps(lower, val), half);
        const __m512i r_up = _mm512_mask_mov_epi32(pivot, _mm512_cmp_ps_mask(y, mid_up, _CMP_GT_OQ), upper_pivot);
        const __m512i r_lo = _mm512_mask_mov_epi32(pivot, _mm512_cmp_ps_mask(y, mid_lo, _CMP_LT_OQ), lower_pivot);
        _mm_storeu_si128(
            reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(_mm512_mask_mov_epi32(r_lo, gt, r_up))
        );
    }
    encode_run_scalar(code, x + i, scale, n - i, q + i);
}

QLORA_AVX2 inline __m256i blend_i(__m256i a, __m256i b, __m256 mask) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), mask));
}

// The same on 8 lanes; AVX2 compares give all-ones lanes, so masked moves are blends.
QLORA_AVX2 void encode_run_avx2(const float* code, const float* x, float scale, int64_t n, uint8_t* q) {
    const __m256 sv = _mm256_set1_ps(scale);
    const __m256 half = _mm256_set1_ps(0.5f);
    const __m256 code0 = _mm256_set1_ps(code[0]);
    const __m256 code255 = _mm256_set1_ps(code[255]);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + i), sv);
        __m256i pivot = _mm256_set1_epi32(127);
        __m256i upper_pivot = _mm256_set1_epi32(255);
        __m256i lower_pivot = _mm256_setzero_si256();
        __m256 lower = _mm256_set1_ps(-1.0f);
        __m256 upper = _mm256_set1_ps(1.0f);
        __m256 val = _mm256_set1_ps(code[127]);
        for (int step = 64; step > 0; step >>= 1) {
            const __m256 gt = _mm256_cmp_ps(y, val, _CMP_GT_OQ);
            lower_pivot = blend_i(lower_pivot, pivot, gt);
            lower = _mm256_blendv_ps(lower, val, gt);
            upper_pivot = blend_i(pivot, upper_pivot, gt);
            upper = _mm256_blendv_ps(val, upper, gt);
            const __m256i s = _mm256_set1_epi32(step);
            pivot = blend_i(_mm256_sub_epi32(pivot, s), _mm256_add_epi32(pivot, s), gt);
            val = _mm256_i32gather_ps(code, pivot, 4);
        }
        upper = _mm256_blendv_ps(
            upper, code255, _mm256_castsi256_ps(_mm256_cmpeq_epi32(upper_pivot, _mm256_set1_epi32(255)))
        );
        lower = _mm256_blendv_ps(
            lower, code0, _mm256_castsi256_ps(_mm256_cmpeq_epi32(lower_pivot, _mm256_setzero_si256()))
        );
        const __m256 gt = _mm256_cmp_ps(y, val, _CMP_GT_OQ);
        const __m256 mid_up = _mm256_mul_ps(_mm256_add_ps(upper, val), half);
        const __m256 mid_lo = _mm256_mul_ps(_mm256_add_ps(lower, val), half);
        const __m256i r_up = blend_i(pivot, upper_pivot, _mm256_cmp_ps(y, mid_up, _CMP_GT_OQ));
        const __m256i r_lo = blend_i(pivot, lower_pivot, _mm256_cmp_ps(y, mid_lo, _CMP_LT_OQ));
        alignas(32) int32_t r[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(r), blend_i(r_lo, r_up, gt));
        for (int k = 0; k < 8; ++k) {
            q[i + k] = static_cast<uint8_t>(r[k]);
        }
    }
    encode_run_scalar(code, x + i, scale, n - i, q + i);
}

#endif

} // namespace

void dynamic8_encode_run(CpuIsa isa, const float* code, const float* x, float scale, int64_t n, uint8_t* q) {
#if defined(QLORA_X86)
    switch (isa) {
    case CpuIsa::kAvx512:
        encode_run_avx512(code, x, scale, n, q);
        return;
    case CpuIsa::kAvx2:
        encode_run_avx2(code, x, scale, n, q);
        return;
    case CpuIsa::kScalar:
        break;
    }
#endif
    encode_run_scalar(code, x, scale, n, q);
}

} // namespace qlora::cpu
