// csrc/cpu/attention_gemm.h: the small float32-accumulating GEMM the CPU attention kernels are built from.
//
//   C[M, N] (float32, row stride ldc) = (accumulate ? C : 0) + A[M, K] B[K, N]
//
// A is T row-major with row stride lda (its K elements contiguous). B is packed once into panels of kPanel = 32
// columns (pack_b), so the kernel streams it with aligned loads and reuses it for every row of A:
//   float:    panel p holds B[k][32p .. 32p + 31] for k = 0 .. K-1, contiguous ([K][32])
//   bfloat16: panel p holds the pairs (B[k][n], B[k+1][n]) for k = 0, 2, ..., n in the panel ([ceil(K/2)][32][2]),
//             the layout of AVX-512 BF16's VDPBF16PS (two products summed into each float32 lane)
// Columns past N and the odd row past K are zero. Panels are `panel_stride` elements apart, so a caller can pack a
// whole [K_total, N] operand once and multiply by a window of it: rows k0.. of every panel (k0 even for bfloat16)
// start at `packed + panel_offset(k0)`.
//
// Kernels: AVX-512 FMA for float32, AVX-512 BF16 for bfloat16 (cpu_has_avx512_bf16()), and a scalar loop for
// everything else (float16, other ISAs). Products are exact in float32 for bfloat16 inputs; sums round in a
// blocked order, so results match a float64 reference within K float32 roundings.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_isa.h"

namespace qlora::cpu::attn {

inline constexpr int64_t kPanel = 32;

template <typename T> struct PackTraits {
    static constexpr int64_t kRowGroup = 1; // rows of B interleaved per packed row
};
template <> struct PackTraits<c10::BFloat16> { static constexpr int64_t kRowGroup = 2; };

// Elements of one packed panel of a K-row operand.
template <typename T> constexpr int64_t panel_stride(int64_t K) {
    constexpr int64_t g = PackTraits<T>::kRowGroup;
    return (K + g - 1) / g * g * kPanel;
}
// Offset of packed row k0 inside a panel (k0 a multiple of kRowGroup).
template <typename T> constexpr int64_t panel_offset(int64_t k0) {
    return k0 * kPanel;
}
// Elements of a packed [K, N] operand.
template <typename T> constexpr int64_t packed_size(int64_t K, int64_t N) {
    return (N + kPanel - 1) / kPanel * panel_stride<T>(K);
}

// Packs B[k][n] = T(src[k * row_stride + n * col_stride]) (k < K, n < N; S is T, or float rounded to T) into `dst`
// (packed_size(K, N) elements, panels panel_stride<T>(K) apart).
template <typename T, typename S = T>
void pack_b(const S* src, int64_t row_stride, int64_t col_stride, int64_t K, int64_t N, T* dst);

// C = (accumulate ? C : 0) + A B, B packed as above with panels `b_panel_stride` elements apart.
template <typename T>
void gemm(
    CpuIsa isa, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t b_panel_stride, float* C,
    int64_t ldc, bool accumulate
);

// Whether gemm<c10::BFloat16> uses AVX-512 BF16 on this CPU at `isa`.
bool bf16_dot_available(CpuIsa isa);

} // namespace qlora::cpu::attn
