// csrc/cpu/attention_gemm.cpp: see attention_gemm.h.
#include "attention_gemm.h"

#include <algorithm>
#include <cstring>

#include "simd_x86.h"

namespace qlora::cpu::attn {
namespace {

// Index of B[k][n] (n < kPanel, the column inside its panel) in a packed panel.
template <typename T> constexpr int64_t packed_index(int64_t k, int64_t n) {
    constexpr int64_t g = PackTraits<T>::kRowGroup;
    return (k / g) * g * kPanel + n * g + k % g;
}

template <typename T>
void gemm_scalar(
    int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ps, float* C, int64_t ldc,
    bool accumulate
) {
    for (int64_t i = 0; i < M; ++i) {
        for (int64_t n = 0; n < N; ++n) {
            const T* panel = B + (n / kPanel) * ps;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k) {
                acc += static_cast<float>(A[i * lda + k]) * static_cast<float>(panel[packed_index<T>(k, n % kPanel)]);
            }
            C[i * ldc + n] = accumulate ? C[i * ldc + n] + acc : acc;
        }
    }
}

#if defined(QLORA_X86)

constexpr int kRows = 8; // rows of A per micro-tile: 8 x 2 accumulators + 2 B registers + 1 broadcast

QLORA_AVX512 inline void panel_masks(int64_t ncols, __mmask16* m0, __mmask16* m1) {
    *m0 = ncols >= 16 ? __mmask16(0xffff) : __mmask16((1u << ncols) - 1);
    *m1 = ncols >= 32 ? __mmask16(0xffff) : (ncols > 16 ? __mmask16((1u << (ncols - 16)) - 1) : __mmask16(0));
}

template <int R>
QLORA_AVX512 inline void
store_tile(__m512 (&c)[kRows][2], float* C, int64_t ldc, __mmask16 m0, __mmask16 m1, bool accumulate) {
    for (int r = 0; r < R; ++r) {
        float* row = C + r * ldc;
        if (accumulate) {
            c[r][0] = _mm512_add_ps(c[r][0], _mm512_maskz_loadu_ps(m0, row));
            c[r][1] = _mm512_add_ps(c[r][1], _mm512_maskz_loadu_ps(m1, row + 16));
        }
        _mm512_mask_storeu_ps(row, m0, c[r][0]);
        _mm512_mask_storeu_ps(row + 16, m1, c[r][1]);
    }
}

// R rows of A times one float32 panel: per k, two panel loads and R broadcast FMAs pairs.
template <int R>
QLORA_AVX512 void tile_f32(
    int64_t K, const float* A, int64_t lda, const float* panel, float* C, int64_t ldc, int64_t ncols, bool accumulate
) {
    __m512 c[kRows][2];
    for (int r = 0; r < R; ++r) {
        c[r][0] = _mm512_setzero_ps();
        c[r][1] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; ++k) {
        const __m512 b0 = _mm512_loadu_ps(panel + k * kPanel);
        const __m512 b1 = _mm512_loadu_ps(panel + k * kPanel + 16);
        for (int r = 0; r < R; ++r) {
            const __m512 a = _mm512_set1_ps(A[r * lda + k]);
            c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
            c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
        }
    }
    __mmask16 m0, m1;
    panel_masks(ncols, &m0, &m1);
    store_tile<R>(c, C, ldc, m0, m1, accumulate);
}

// The same for bfloat16: per pair of k, VDPBF16PS adds a[2l]·b[2l] + a[2l+1]·b[2l+1] into lane l, with the pair
// (A[r][k], A[r][k+1]) broadcast as one 32-bit value. An odd last k pairs A[r][K-1] with zero (the panel's pad row
// is zero too).
template <int R>
QLORA_AVX512_BF16 void tile_bf16(
    int64_t K, const uint16_t* A, int64_t lda, const uint16_t* panel, float* C, int64_t ldc, int64_t ncols,
    bool accumulate
) {
    __m512 c[kRows][2];
    for (int r = 0; r < R; ++r) {
        c[r][0] = _mm512_setzero_ps();
        c[r][1] = _mm512_setzero_ps();
    }
    const int64_t pairs = K / 2;
    for (int64_t kp = 0; kp <= pairs; ++kp) {
        if (kp == pairs && K % 2 == 0) {
            break;
        }
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + kp * 2 * kPanel);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + kp * 2 * kPanel + kPanel);
        for (int r = 0; r < R; ++r) {
            uint32_t pair = A[r * lda + 2 * kp];
            if (kp < pairs) {
                std::memcpy(&pair, A + r * lda + 2 * kp, sizeof(pair));
            }
            const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            c[r][0] = _mm512_dpbf16_ps(c[r][0], a, b0);
            c[r][1] = _mm512_dpbf16_ps(c[r][1], a, b1);
        }
    }
    __mmask16 m0, m1;
    panel_masks(ncols, &m0, &m1);
    store_tile<R>(c, C, ldc, m0, m1, accumulate);
}

template <typename Tile>
inline void for_tiles(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ps, int64_t ldc, const Tile& tile) {
    for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
        const int64_t ncols = std::min(kPanel, N - n0);
        for (int64_t i0 = 0; i0 < M; i0 += kRows) {
            tile(static_cast<int>(std::min<int64_t>(kRows, M - i0)), i0, n0 / kPanel, ncols);
        }
    }
}

#define QLORA_TILE_SWITCH(fn, rows, ...)                                                                               \
    switch (rows) {                                                                                                    \
    case 8:                                                                                                            \
        fn<8>(__VA_ARGS__);                                                                                            \
        break;                                                                                                         \
    case 7:                                                                                                            \
        fn<7>(__VA_ARGS__);                                                                                            \
        break;                                                                                                         \
    case 6:                                                                                                            \
        fn<6>(__VA_ARGS__);                                                                                            \
        break;                                                                                                         \
    case 5:                                                                                                            \
        fn<5>(__VA_ARGS__);                                                                                            \
        break;                                                                                                         \
    case 4:                                                                                                            \
        fn<4>(__VA_ARGS__);                                                                                            \
        break;                                                                                                         \
    case 3:                                                                                                            \
        fn<3>(__VA_ARGS__);                                                                                            \
        break;                                                                                                         \
    case 2:                                                                                                            \
        fn<2>(__VA_ARGS__);                                                                                            \
        break;                                                                                                         \
    default:                                                                                                           \
        fn<1>(__VA_ARGS__);                                                                                            \
    }

void gemm_f32_avx512(
    int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ps, float* C, int64_t ldc,
    bool accumulate
) {
    for_tiles(M, N, K, lda, ps, ldc, [&](int rows, int64_t i0, int64_t p, int64_t ncols) {
        QLORA_TILE_SWITCH(
            tile_f32, rows, K, A + i0 * lda, lda, B + p * ps, C + i0 * ldc + p * kPanel, ldc, ncols, accumulate
        );
    });
}

void gemm_bf16_avx512(
    int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ps, float* C,
    int64_t ldc, bool accumulate
) {
    for_tiles(M, N, K, lda, ps, ldc, [&](int rows, int64_t i0, int64_t p, int64_t ncols) {
        QLORA_TILE_SWITCH(
            tile_bf16, rows, K, A + i0 * lda, lda, B + p * ps, C + i0 * ldc + p * kPanel, ldc, ncols, accumulate
        );
    });
}

#undef QLORA_TILE_SWITCH

#endif

} // namespace

bool bf16_dot_available(CpuIsa isa) {
    return isa == CpuIsa::kAvx512 && cpu_has_avx512_bf16();
}

template <typename T, typename S>
void pack_b(const S* src, int64_t row_stride, int64_t col_stride, int64_t K, int64_t N, T* dst) {
    constexpr int64_t g = PackTraits<T>::kRowGroup;
    const int64_t ps = panel_stride<T>(K);
    const T zero(0.0f);
    for (int64_t p = 0; p * kPanel < N; ++p) {
        const int64_t n1 = std::min(kPanel, N - p * kPanel);
        const S* cols = src + p * kPanel * col_stride;
        for (int64_t k0 = 0; k0 < K; k0 += g) { // one packed row: g rows of B, interleaved per column
            T* out = dst + p * ps + k0 * kPanel;
            for (int64_t n = 0; n < n1; ++n) {
                for (int64_t e = 0; e < g; ++e) {
                    out[n * g + e] = k0 + e < K ? static_cast<T>(cols[(k0 + e) * row_stride + n * col_stride]) : zero;
                }
            }
            std::fill(out + n1 * g, out + kPanel * g, zero);
        }
    }
}

template <typename T>
void gemm(
    CpuIsa isa, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ps, float* C, int64_t ldc,
    bool accumulate
) {
    if (M <= 0 || N <= 0) {
        return;
    }
#if defined(QLORA_X86)
    if constexpr (std::is_same_v<T, float>) {
        if (isa == CpuIsa::kAvx512) {
            gemm_f32_avx512(M, N, K, A, lda, B, ps, C, ldc, accumulate);
            return;
        }
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (bf16_dot_available(isa)) {
            gemm_bf16_avx512(
                M, N, K, reinterpret_cast<const uint16_t*>(A), lda, reinterpret_cast<const uint16_t*>(B), ps, C, ldc,
                accumulate
            );
            return;
        }
    }
#endif
    gemm_scalar(M, N, K, A, lda, B, ps, C, ldc, accumulate);
}

#define QLORA_INSTANTIATE_ATTN_GEMM(T)                                                                                 \
    template void pack_b<T, T>(const T*, int64_t, int64_t, int64_t, int64_t, T*);                                      \
    template void gemm<T>(                                                                                             \
        CpuIsa, int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, float*, int64_t, bool                 \
    );
QLORA_INSTANTIATE_ATTN_GEMM(float)
QLORA_INSTANTIATE_ATTN_GEMM(c10::BFloat16)
QLORA_INSTANTIATE_ATTN_GEMM(c10::Half)
#undef QLORA_INSTANTIATE_ATTN_GEMM
template void pack_b<c10::BFloat16, float>(const float*, int64_t, int64_t, int64_t, int64_t, c10::BFloat16*);
template void pack_b<c10::Half, float>(const float*, int64_t, int64_t, int64_t, int64_t, c10::Half*);

} // namespace qlora::cpu::attn
