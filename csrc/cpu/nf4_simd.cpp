// csrc/cpu/nf4_simd.cpp: scalar, AVX2 and AVX-512 NF4 block kernels (declared in nf4_simd.h).
#include "nf4_simd.h"

#include <algorithm>
#include <cfloat>
#include <cstring>

#include "simd_x86.h"

namespace qlora::cpu {

#if defined(QLORA_X86)
using namespace simd;
#endif

using core::kNf4PadValue;
using core::nf4_encode_scaled;
using core::nf4_pack;

// --------------------------------------------------------------------------------------------------------------
// Scalar reference

template <typename T>
static void
nf4_quantize_blocks_scalar(const T* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * bs;
        const int64_t e = std::min(s + bs, n);
        float m = 0.0f;
        for (int64_t i = s; i < e; ++i) {
            m = core::absmax_update(m, static_cast<float>(x[i]));
        }
        absmax[b] = m;
        if (!core::is_finite(m)) {
            continue;
        }
        const float scale = core::block_scale(m);
        int64_t i = s;
        for (; i + 1 < e; i += 2) {
            packed[i / 2] = nf4_pack(
                nf4_encode_scaled(static_cast<float>(x[i]), scale),
                nf4_encode_scaled(static_cast<float>(x[i + 1]), scale)
            );
        }
        if (i < e) { // odd numel: the last byte pairs the final element with the pad value
            packed[i / 2] =
                nf4_pack(nf4_encode_scaled(static_cast<float>(x[i]), scale), nf4_encode_scaled(kNf4PadValue, scale));
        }
    }
}

// Dequantize elements [s, e) of one block whose absmax is `a` into dst[0, e - s).
template <typename T>
static void nf4_dequantize_span_scalar(const uint8_t* packed, float a, int64_t s, int64_t e, T* dst) {
    for (int64_t i = s; i < e; ++i) {
        const uint8_t byte = packed[i / 2];
        const int code = (i % 2 == 0) ? core::nf4_unpack_even(byte) : core::nf4_unpack_odd(byte);
        dst[i - s] = static_cast<T>(core::nf4_decode(code, a));
    }
}

#if defined(QLORA_X86)

// --------------------------------------------------------------------------------------------------------------
// AVX-512 (F, BW, DQ, VL)

namespace {

// nf4_encode on 16 lanes: the same 4-level search over the threshold table (kNf4Threshold has a +inf pad at 15).
QLORA_AVX512 inline __m512i encode16(__m512 y, __m512 thr) {
    __m512i c = _mm512_setzero_si512();
    const int steps[4] = {8, 4, 2, 1};
    for (int step : steps) {
        const __m512 t = _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), thr);
        const __mmask16 gt = _mm512_cmp_ps_mask(y, t, _CMP_GT_OQ); // ordered: NaN compares false
        c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(step));
    }
    return c;
}

// 16 codes (one per int32 lane) -> 8 packed bytes: lane 2i to the high nibble, lane 2i+1 to the low nibble.
QLORA_AVX512 inline void pack16(uint8_t* dst, __m512i c) {
    const __m512i t = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi64_epi8(t));
}

} // namespace

template <typename T>
QLORA_AVX512 static void
nf4_quantize_blocks_avx512(const T* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
    const __m512 thr = _mm512_loadu_ps(core::kNf4Threshold_host);
    const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 flt_max = _mm512_set1_ps(FLT_MAX);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * bs;
        const int64_t e = std::min(s + bs, n);
        const int64_t ev = s + ((e - s) / 16) * 16; // end of the whole 16-lane vectors
        __m512 mv = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int64_t i = s; i < ev; i += 16) {
            const __m512 a = _mm512_and_ps(load16(x + i), sign_off);
            bad |= _mm512_cmp_ps_mask(a, flt_max, _CMP_NLE_UQ); // NaN or Inf
            mv = _mm512_max_ps(mv, a);
        }
        float m = _mm512_reduce_max_ps(mv);
        for (int64_t i = ev; i < e; ++i) {
            m = core::absmax_update(m, static_cast<float>(x[i]));
        }
        if (bad != 0) {
            m = __builtin_nanf("");
        }
        absmax[b] = m;
        if (!core::is_finite(m)) {
            continue;
        }
        const float scale = core::block_scale(m);
        const __m512 sv = _mm512_set1_ps(scale);
        for (int64_t i = s; i < ev; i += 16) {
            pack16(packed + i / 2, encode16(_mm512_mul_ps(load16(x + i), sv), thr));
        }
        int64_t i = ev;
        for (; i + 1 < e; i += 2) {
            packed[i / 2] = nf4_pack(
                nf4_encode_scaled(static_cast<float>(x[i]), scale),
                nf4_encode_scaled(static_cast<float>(x[i + 1]), scale)
            );
        }
        if (i < e) {
            packed[i / 2] =
                nf4_pack(nf4_encode_scaled(static_cast<float>(x[i]), scale), nf4_encode_scaled(kNf4PadValue, scale));
        }
    }
}

template <typename T>
QLORA_AVX512 static void nf4_dequantize_span_avx512(const uint8_t* packed, float a, int64_t s, int64_t e, T* dst) {
    const __m512 lut = _mm512_loadu_ps(core::kNf4Code_host);
    // Interleave the high-nibble codes (even elements) with the low-nibble codes (odd elements).
    const __m512i perm_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i perm_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i low4 = _mm512_set1_epi32(0x0f);
    const __m512 av = _mm512_set1_ps(a);
    int64_t i = s;
    if (i % 2 != 0 && i < e) { // start on a byte boundary
        nf4_dequantize_span_scalar(packed, a, i, i + 1, dst);
        ++i;
    }
    for (; i + 32 <= e; i += 32) {
        const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
        const __m512i hi = _mm512_srli_epi32(w, 4);
        const __m512i lo = _mm512_and_si512(w, low4);
        const __m512i c0 = _mm512_permutex2var_epi32(hi, perm_lo, lo);
        const __m512i c1 = _mm512_permutex2var_epi32(hi, perm_hi, lo);
        store16(dst + (i - s), _mm512_mul_ps(_mm512_permutexvar_ps(c0, lut), av));
        store16(dst + (i - s) + 16, _mm512_mul_ps(_mm512_permutexvar_ps(c1, lut), av));
    }
    nf4_dequantize_span_scalar(packed, a, i, e, dst + (i - s));
}

// --------------------------------------------------------------------------------------------------------------
// AVX2 (+ FMA, F16C)

namespace {

// nf4_encode on 8 lanes: count the thresholds below y (each compare is all-ones where y > t_j, i.e. -1).
QLORA_AVX2 inline __m256i encode8(__m256 y) {
    __m256i c = _mm256_setzero_si256();
    for (int j = 0; j < core::kNf4Codes - 1; ++j) {
        const __m256 gt = _mm256_cmp_ps(y, _mm256_set1_ps(core::kNf4Threshold_host[j]), _CMP_GT_OQ);
        c = _mm256_sub_epi32(c, _mm256_castps_si256(gt));
    }
    return c;
}

// 8 codes -> 4 packed bytes.
QLORA_AVX2 inline void pack8(uint8_t* dst, __m256i c) {
    const __m256i t = _mm256_or_si256(_mm256_slli_epi64(c, 4), _mm256_srli_epi64(c, 32));
    // Byte 0 of each 64-bit lane holds one packed byte; gather bytes 0 and 8 of each 128-bit half.
    const __m256i pick = _mm256_setr_epi8(
        0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1
    );
    const __m256i s = _mm256_shuffle_epi8(t, pick);
    const uint32_t word =
        static_cast<uint32_t>(_mm256_extract_epi16(s, 0)) | (static_cast<uint32_t>(_mm256_extract_epi16(s, 8)) << 16);
    std::memcpy(dst, &word, sizeof(word));
}

QLORA_AVX2 inline float reduce_max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

} // namespace

template <typename T>
QLORA_AVX2 static void
nf4_quantize_blocks_avx2(const T* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
    const __m256 sign_off = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 flt_max = _mm256_set1_ps(FLT_MAX);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * bs;
        const int64_t e = std::min(s + bs, n);
        const int64_t ev = s + ((e - s) / 8) * 8;
        __m256 mv = _mm256_setzero_ps();
        int bad = 0;
        for (int64_t i = s; i < ev; i += 8) {
            const __m256 a = _mm256_and_ps(load8(x + i), sign_off);
            bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, flt_max, _CMP_NLE_UQ));
            mv = _mm256_max_ps(mv, a);
        }
        float m = reduce_max8(mv);
        for (int64_t i = ev; i < e; ++i) {
            m = core::absmax_update(m, static_cast<float>(x[i]));
        }
        if (bad != 0) {
            m = __builtin_nanf("");
        }
        absmax[b] = m;
        if (!core::is_finite(m)) {
            continue;
        }
        const float scale = core::block_scale(m);
        const __m256 sv = _mm256_set1_ps(scale);
        for (int64_t i = s; i < ev; i += 8) {
            pack8(packed + i / 2, encode8(_mm256_mul_ps(load8(x + i), sv)));
        }
        int64_t i = ev;
        for (; i + 1 < e; i += 2) {
            packed[i / 2] = nf4_pack(
                nf4_encode_scaled(static_cast<float>(x[i]), scale),
                nf4_encode_scaled(static_cast<float>(x[i + 1]), scale)
            );
        }
        if (i < e) {
            packed[i / 2] =
                nf4_pack(nf4_encode_scaled(static_cast<float>(x[i]), scale), nf4_encode_scaled(kNf4PadValue, scale));
        }
    }
}

template <typename T>
QLORA_AVX2 static void nf4_dequantize_span_avx2(const uint8_t* packed, float a, int64_t s, int64_t e, T* dst) {
    const __m256 lut_lo = _mm256_loadu_ps(core::kNf4Code_host);
    const __m256 lut_hi = _mm256_loadu_ps(core::kNf4Code_host + 8);
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = s;
    if (i % 2 != 0 && i < e) {
        nf4_dequantize_span_scalar(packed, a, i, i + 1, dst);
        ++i;
    }
    for (; i + 16 <= e; i += 16) {
        const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2)));
        const __m256i hi = _mm256_srli_epi32(w, 4);
        const __m256i lo = _mm256_and_si256(w, low4);
        const __m256i u0 = _mm256_unpacklo_epi32(hi, lo); // h0 l0 h1 l1 | h4 l4 h5 l5
        const __m256i u1 = _mm256_unpackhi_epi32(hi, lo); // h2 l2 h3 l3 | h6 l6 h7 l7
        const __m256i c0 = _mm256_permute2x128_si256(u0, u1, 0x20);
        const __m256i c1 = _mm256_permute2x128_si256(u0, u1, 0x31);
        store8(dst + (i - s), _mm256_mul_ps(lookup16(c0, lut_lo, lut_hi), av));
        store8(dst + (i - s) + 8, _mm256_mul_ps(lookup16(c1, lut_lo, lut_hi), av));
    }
    nf4_dequantize_span_scalar(packed, a, i, e, dst + (i - s));
}

#else // not x86: the SIMD entry points fall back to the scalar reference (cpu_isa() never selects them).

template <typename T>
static void
nf4_quantize_blocks_avx512(const T* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
    nf4_quantize_blocks_scalar(x, n, bs, b0, b1, packed, absmax);
}
template <typename T>
static void
nf4_quantize_blocks_avx2(const T* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
    nf4_quantize_blocks_scalar(x, n, bs, b0, b1, packed, absmax);
}
template <typename T>
static void nf4_dequantize_span_avx512(const uint8_t* packed, float a, int64_t s, int64_t e, T* dst) {
    nf4_dequantize_span_scalar(packed, a, s, e, dst);
}
template <typename T>
static void nf4_dequantize_span_avx2(const uint8_t* packed, float a, int64_t s, int64_t e, T* dst) {
    nf4_dequantize_span_scalar(packed, a, s, e, dst);
}

#endif

// --------------------------------------------------------------------------------------------------------------
// Entry points

template <typename T>
void nf4_quantize_blocks(
    CpuIsa isa, const T* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, uint8_t* packed, float* absmax
) {
    switch (isa) {
    case CpuIsa::kAvx512:
        nf4_quantize_blocks_avx512(x, n, bs, b0, b1, packed, absmax);
        return;
    case CpuIsa::kAvx2:
        nf4_quantize_blocks_avx2(x, n, bs, b0, b1, packed, absmax);
        return;
    case CpuIsa::kScalar:
        break;
    }
    nf4_quantize_blocks_scalar(x, n, bs, b0, b1, packed, absmax);
}

template <typename T>
static void nf4_dequantize_span(CpuIsa isa, const uint8_t* packed, float a, int64_t s, int64_t e, T* dst) {
    switch (isa) {
    case CpuIsa::kAvx512:
        nf4_dequantize_span_avx512(packed, a, s, e, dst);
        return;
    case CpuIsa::kAvx2:
        nf4_dequantize_span_avx2(packed, a, s, e, dst);
        return;
    case CpuIsa::kScalar:
        break;
    }
    nf4_dequantize_span_scalar(packed, a, s, e, dst);
}

template <typename T>
void nf4_dequantize_blocks(
    CpuIsa isa, const uint8_t* packed, const Nf4BlockAbsmax& am, int64_t n, int64_t bs, int64_t b0, int64_t b1, T* out
) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * bs;
        nf4_dequantize_span(isa, packed, am.at(b), s, std::min(s + bs, n), out + s);
    }
}

template <typename T>
void nf4_dequantize_range(
    CpuIsa isa, const uint8_t* packed, const Nf4BlockAbsmax& am, int64_t bs, int64_t start, int64_t count, T* out
) {
    const int64_t end = start + count;
    for (int64_t i = start; i < end;) {
        const int64_t b = i / bs;
        const int64_t e = std::min((b + 1) * bs, end);
        nf4_dequantize_span(isa, packed, am.at(b), i, e, out + (i - start));
        i = e;
    }
}

#define QLORA_INSTANTIATE_NF4_BLOCKS(T)                                                                                \
    template void nf4_quantize_blocks<T>(CpuIsa, const T*, int64_t, int64_t, int64_t, int64_t, uint8_t*, float*);      \
    template void                                                                                                      \
    nf4_dequantize_blocks<T>(CpuIsa, const uint8_t*, const Nf4BlockAbsmax&, int64_t, int64_t, int64_t, int64_t, T*);   \
    template void nf4_dequantize_range<T>(CpuIsa, const uint8_t*, const Nf4BlockAbsmax&, int64_t, int64_t, int64_t, T*)

QLORA_INSTANTIATE_NF4_BLOCKS(float);
QLORA_INSTANTIATE_NF4_BLOCKS(c10::BFloat16);
QLORA_INSTANTIATE_NF4_BLOCKS(c10::Half);

} // namespace qlora::cpu
