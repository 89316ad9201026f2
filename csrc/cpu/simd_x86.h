// csrc/cpu/simd_x86.h: the x86 SIMD building blocks the CPU kernels share: target attributes for functions compiled
// for AVX-512 or AVX2 without global -m flags (cpu_isa.h picks one at run time), 16- and 8-lane loads and stores of
// float32 / bfloat16 / float16 with the rounding of the scalar path (c10::BFloat16, c10::Half: nearest even), and the
// 16-entry table lookup on AVX2. QLORA_X86 is defined when they are available.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
// GCC 12's AVX-512 headers build some results from _mm512_undefined_*() and then warn about them
// (-W[maybe-]uninitialized inside avx512fintrin.h); the warning is about the header, not the code including this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define QLORA_X86 1
#define QLORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))
#define QLORA_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX-512 plus VBMI (byte permutes across a whole register): Ice Lake and Zen 4 on; check cpu_has_avx512_vbmi().
#define QLORA_AVX512_VBMI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,fma,f16c")))
// AVX-512 plus BF16 (VDPBF16PS: bfloat16 pair products summed into float32): Cooper Lake, Sapphire Rapids, Zen 4 on;
// check cpu_has_avx512_bf16().
#define QLORA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,f16c")))

namespace qlora::cpu::simd {

// --------------------------------------------------------------------------------------------------------------
// AVX-512: 16 lanes

QLORA_AVX512 inline __m512 load16(const float* p) {
    return _mm512_loadu_ps(p);
}
QLORA_AVX512 inline __m512 load16(const c10::BFloat16* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
QLORA_AVX512 inline __m512 load16(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

QLORA_AVX512 inline void store16(float* p, __m512 v) {
    _mm512_storeu_ps(p, v);
}
// bfloat16 bit patterns of 16 floats: round to nearest even, NaN -> 0x7fc0, the same rule as c10::BFloat16(float),
// which the scalar path uses.
QLORA_AVX512 inline __m256i bf16_bits16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
}
QLORA_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits16(v));
}
// IEEE round to nearest even, as c10::Half(float).
QLORA_AVX512 inline void store16(c10::Half* p, __m512 v) {
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
    );
}

// Masked stores: only lanes set in k are written, with the same rounding as store16.
QLORA_AVX512 inline void store16_mask(float* p, __mmask16 k, __m512 v) {
    _mm512_mask_storeu_ps(p, k, v);
}
QLORA_AVX512 inline void store16_mask(c10::BFloat16* p, __mmask16 k, __m512 v) {
    _mm256_mask_storeu_epi16(p, k, bf16_bits16(v));
}
QLORA_AVX512 inline void store16_mask(c10::Half* p, __mmask16 k, __m512 v) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// v rounded to T's precision and widened back to float32 (the value store16 would write, still in a register).
QLORA_AVX512 inline __m512 round16(__m512 v, const float*) {
    return v;
}
QLORA_AVX512 inline __m512 round16(__m512 v, const c10::BFloat16*) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16(v)), 16));
}
QLORA_AVX512 inline __m512 round16(__m512 v, const c10::Half*) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// e^x on 16 lanes, within 2 ulp of the correctly rounded value for x in [-87, 88]; below about -103.9 it is +0
// (also for -inf), above 88.7 +inf, NaN stays NaN. x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2 is
// exact), e^r by its degree-7 Taylor polynomial (truncation below 2^-27 relative), then scaled by 2^n.
QLORA_AVX512 inline __m512 exp16(__m512 x) {
    // Keeps r finite for x = -inf. MAXPS returns its second operand when either is NaN, so x goes second: a NaN
    // score stays NaN instead of becoming a probability of 0.
    const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const __m512 n = _mm512_roundscale_ps(
        _mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC
    );
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc); // ln2 high part: 16 significant bits
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// --------------------------------------------------------------------------------------------------------------
// AVX2: 8 lanes

QLORA_AVX2 inline __m256 load8(const float* p) {
    return _mm256_loadu_ps(p);
}
QLORA_AVX2 inline __m256 load8(const c10::BFloat16* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
QLORA_AVX2 inline __m256 load8(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

QLORA_AVX2 inline void store8(float* p, __m256 v) {
    _mm256_storeu_ps(p, v);
}
QLORA_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan)
    );
    // r holds values <= 0xffff, so the unsigned saturation of packus never changes them.
    const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(p16));
}
QLORA_AVX2 inline void store8(c10::Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 16-entry table lookup on 8 lanes from two 8-entry halves.
QLORA_AVX2 inline __m256 lookup16(__m256i idx, __m256 lut_lo, __m256 lut_hi) {
    const __m256 lo = _mm256_permutevar8x32_ps(lut_lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(lut_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
}

} // namespace qlora::cpu::simd

#endif
