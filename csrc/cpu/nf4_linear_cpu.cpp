// csrc/cpu/nf4_linear_cpu.cpp: CPU kernels of qlora::nf4_linear (y = x W^T + b with W an NF4 weight [N, K]) and
// qlora::nf4_linear_grad_input (g W).
//
// Shapes: x [M, K] (leading dims flattened), W [N, K] stored NF4 (flattened row-major, blocks of B), y [M, N].
//
//   small M (decode, M <= kFusedMaxM, float32/bfloat16 input): a fused kernel reads the packed codes of each output
//   row,
//     dequantizes 32 weights at a time in registers (a 16-entry vpermps lookup) and multiplies them into M running
//     sums; it never writes a dequantized weight. Rows are split over threads.
//   otherwise: row tiles of W (about kTileElems weights) are dequantized into one reused buffer in the activation
//     dtype and multiplied with at::mm into the matching columns of y. Peak extra memory: one tile.
//   grad_input: column tiles W[:, k0:k1] (tiles along the input dimension) are dequantized into one buffer and
//     multiplied into the matching columns of grad_x, so every element of grad_x is written once.
// Accumulation is float32 (float64 for float64 input).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../nf4_checks.h"
#include "../nf4_linear_tiled.h"
#include "cpu_isa.h"
#include "nf4_simd.h"
#include "nf4_weight_cpu.h"

#include "simd_x86.h"

namespace qlora::cpu {
namespace {

constexpr int64_t kFusedMaxM = 16;               // largest M handled by the fused kernel
constexpr int64_t kTileElems = int64_t{1} << 19; // weights per dequantized tile (2 MiB as float32)

// Dequantizes rows [n0, n0 + rows) x columns [k0, k0 + cols) of W [N, K] into buf [rows, cols] (contiguous).
template <typename T>
void dequantize_tile(
    const CpuWeight& w, int64_t K, int64_t bs, int64_t n0, int64_t rows, int64_t k0, int64_t cols, T* buf
) {
    const CpuIsa isa = cpu_isa();
    const int64_t grain = std::max<int64_t>(1, 16384 / cols);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            nf4_dequantize_range(isa, w.bytes(), w.am, bs, (n0 + r) * K + k0, cols, buf + r * cols);
        }
    });
}

// A dequantized tile in the dtype `dt` (float64 tiles are dequantized as float32, then widened exactly).
void dequantize_tile_as(
    const CpuWeight& w, int64_t K, int64_t bs, int64_t n0, int64_t rows, int64_t k0, int64_t cols, at::Tensor& buf
) {
    switch (buf.scalar_type()) {
    case at::kBFloat16:
        dequantize_tile(w, K, bs, n0, rows, k0, cols, buf.data_ptr<c10::BFloat16>());
        break;
    case at::kHalf:
        dequantize_tile(w, K, bs, n0, rows, k0, cols, buf.data_ptr<c10::Half>());
        break;
    default:
        dequantize_tile(w, K, bs, n0, rows, k0, cols, buf.data_ptr<float>());
        break;
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Fused small-M kernel

// y32[m, n] = sum_k x[m, k] * W[n, k] for n in [n0, n1), scalar reference (any ISA).
template <typename TX>
void fused_rows_scalar(
    const TX* x, int64_t M, int64_t K, const CpuWeight& w, int64_t bs, int64_t n0, int64_t n1, float* y32, int64_t N
) {
    const uint8_t* p = w.bytes();
    float acc[kFusedMaxM];
    for (int64_t n = n0; n < n1; ++n) {
        std::fill(acc, acc + M, 0.0f);
        const int64_t row = n * K;
        for (int64_t k = 0; k < K;) {
            const int64_t i = row + k;
            const int64_t b = i / bs;
            const int64_t e = std::min((b + 1) * bs, row + K) - row;
            const float a = w.am.at(b);
            for (; k < e; ++k) {
                const int64_t j = row + k;
                const int code = (j % 2 == 0) ? core::nf4_unpack_even(p[j / 2]) : core::nf4_unpack_odd(p[j / 2]);
                const float wv = core::nf4_decode(code, a);
                for (int64_t m = 0; m < M; ++m) {
                    acc[m] += static_cast<float>(x[m * K + k]) * wv;
                }
            }
        }
        for (int64_t m = 0; m < M; ++m) {
            y32[m * N + n] = acc[m];
        }
    }
}

#if defined(QLORA_X86)
using namespace simd;

// The same with 32 weights per step decoded in registers: codes -> LUT (vpermps) -> * absmax -> FMA into M sums.
template <int M, typename TX>
QLORA_AVX512 void fused_rows_avx512(
    const TX* x, int64_t K, const CpuWeight& w, int64_t bs, int64_t n0, int64_t n1, float* y32, int64_t N
) {
    const uint8_t* p = w.bytes();
    const __m512 lut = _mm512_loadu_ps(core::kNf4Code_host);
    const __m512i perm_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i perm_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i low4 = _mm512_set1_epi32(0x0f);
    for (int64_t n = n0; n < n1; ++n) {
        __m512 acc[M];
        float tail[M];
        for (int m = 0; m < M; ++m) {
            acc[m] = _mm512_setzero_ps();
            tail[m] = 0.0f;
        }
        const int64_t row = n * K;
        for (int64_t k = 0; k < K;) {
            const int64_t b = (row + k) / bs;
            const int64_t e = std::min((b + 1) * bs, row + K) - row; // end of this block within the row
            const float a = w.am.at(b);
            const __m512 av = _mm512_set1_ps(a);
            // Scalar until the element index is even (a byte boundary), then 32 at a time, then scalar.
            auto scalar_step = [&](int64_t kk) {
                const int64_t j = row + kk;
                const int code = (j % 2 == 0) ? core::nf4_unpack_even(p[j / 2]) : core::nf4_unpack_odd(p[j / 2]);
                const float wv = core::nf4_decode(code, a);
                for (int m = 0; m < M; ++m) {
                    tail[m] += static_cast<float>(x[m * K + kk]) * wv;
                }
            };
            if ((row + k) % 2 != 0 && k < e) {
                scalar_step(k++);
            }
            for (; k + 32 <= e; k += 32) {
                const __m512i wb =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (row + k) / 2)));
                const __m512i hi = _mm512_srli_epi32(wb, 4);
                const __m512i lo = _mm512_and_si512(wb, low4);
                const __m512 w0 =
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, perm_lo, lo), lut), av);
                const __m512 w1 =
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, perm_hi, lo), lut), av);
                for (int m = 0; m < M; ++m) {
                    acc[m] = _mm512_fmadd_ps(load16(x + m * K + k), w0, acc[m]);
                    acc[m] = _mm512_fmadd_ps(load16(x + m * K + k + 16), w1, acc[m]);
                }
            }
            for (; k < e; ++k) {
                scalar_step(k);
            }
        }
        for (int m = 0; m < M; ++m) {
            y32[m * N + n] = _mm512_reduce_add_ps(acc[m]) + tail[m];
        }
    }
}

// Fast path when every quantization block lies inside one row (K % blocksize == 0), so every row is cut into chunks
// of 32 at the same offsets. x has been rearranged once per call into xd (float32): within each chunk of 32, the 16
// even-index elements, then the 16 odd-index elements. The packed bytes then line up directly: high nibbles (even
// elements) against the first half, low nibbles against the second, with no interleaving shuffle. Products are summed
// unscaled within a block and multiplied by the block absmax once per block; two independent accumulators per row
// of x keep the FMA dependency chains short.
// R output rows are processed together so each load of x feeds R rows (x can exceed L1 for long rows).
template <int M, int R>
QLORA_AVX512 void fused_rows_avx512_aligned(
    const float* xd, int64_t K, const CpuWeight& w, int64_t bs, int64_t n0, int64_t n1, float* y32, int64_t N
) {
    const uint8_t* p = w.bytes();
    const __m512 lut = _mm512_loadu_ps(core::kNf4Code_host);
    const __m512i low4 = _mm512_set1_epi32(0x0f);
    const int64_t blocks_per_row = K / bs;
    for (int64_t n = n0; n + R <= n1; n += R) {
        __m512 acc0[R][M], acc1[R][M];
        for (int r = 0; r < R; ++r) {
            for (int m = 0; m < M; ++m) {
                acc0[r][m] = _mm512_setzero_ps();
                acc1[r][m] = _mm512_setzero_ps();
            }
        }
        for (int64_t bi = 0; bi < blocks_per_row; ++bi) {
            __m512 blk[R][M];
            for (int r = 0; r < R; ++r) {
                for (int m = 0; m < M; ++m) {
                    blk[r][m] = _mm512_setzero_ps();
                }
            }
            for (int64_t k = bi * bs; k < (bi + 1) * bs; k += 32) {
                __m512 xe[M], xo[M];
                for (int m = 0; m < M; ++m) {
                    xe[m] = _mm512_loadu_ps(xd + m * K + k);
                    xo[m] = _mm512_loadu_ps(xd + m * K + k + 16);
                }
                for (int r = 0; r < R; ++r) {
                    const uint8_t* row = p + (n + r) * K / 2;
                    const __m512i wb =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
                    const __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(wb, 4), lut);
                    const __m512 w_odd = _mm512_permutexvar_ps(_mm512_and_si512(wb, low4), lut);
                    for (int m = 0; m < M; ++m) {
                        blk[r][m] = _mm512_fmadd_ps(xe[m], w_even, blk[r][m]);
                        blk[r][m] = _mm512_fmadd_ps(xo[m], w_odd, blk[r][m]);
                    }
                }
            }
            for (int r = 0; r < R; ++r) {
                const __m512 av = _mm512_set1_ps(w.am.at((n + r) * blocks_per_row + bi));
                for (int m = 0; m < M; ++m) {
                    if (bi % 2 == 0) {
                        acc0[r][m] = _mm512_fmadd_ps(blk[r][m], av, acc0[r][m]);
                    } else {
                        acc1[r][m] = _mm512_fmadd_ps(blk[r][m], av, acc1[r][m]);
                    }
                }
            }
        }
        for (int r = 0; r < R; ++r) {
            for (int m = 0; m < M; ++m) {
                y32[m * N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r][m], acc1[r][m]));
            }
        }
    }
}

// Rows in groups of R (4 for M <= 2, where the accumulators fit in registers), the remainder one at a time.
template <int M>
void fused_rows_avx512_aligned_grouped(
    const float* xd, int64_t K, const CpuWeight& w, int64_t bs, int64_t n0, int64_t n1, float* y32, int64_t N
) {
    constexpr int R = M <= 2 ? 4 : 1;
    const int64_t grouped_end = n0 + (n1 - n0) / R * R;
    fused_rows_avx512_aligned<M, R>(xd, K, w, bs, n0, grouped_end, y32, N);
    if constexpr (R > 1) {
        fused_rows_avx512_aligned<M, 1>(xd, K, w, bs, grouped_end, n1, y32, N);
    }
}

template <int M = 1>
void fused_rows_avx512_aligned_dispatch(
    int64_t m, const float* xd, int64_t K, const CpuWeight& w, int64_t bs, int64_t n0, int64_t n1, float* y32, int64_t N
) {
    if constexpr (M <= kFusedMaxM) {
        if (m == M) {
            fused_rows_avx512_aligned_grouped<M>(xd, K, w, bs, n0, n1, y32, N);
        } else {
            fused_rows_avx512_aligned_dispatch<M + 1>(m, xd, K, w, bs, n0, n1, y32, N);
        }
    }
}

QLORA_AVX2 inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// fused_rows_avx512_aligned on 8 lanes: the same de-interleaved x, the same per-block scaling. Each 16-byte group of
// a chunk is read as two halves of 8 bytes: their high nibbles meet x's even half, their low nibbles the odd half.
template <int M>
QLORA_AVX2 void fused_rows_avx2_aligned(
    const float* xd, int64_t K, const CpuWeight& w, int64_t bs, int64_t n0, int64_t n1, float* y32, int64_t N
) {
    const uint8_t* p = w.bytes();
    const __m256 lut_lo = _mm256_loadu_ps(core::kNf4Code_host);
    const __m256 lut_hi = _mm256_loadu_ps(core::kNf4Code_host + 8);
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    const int64_t blocks_per_row = K / bs;
    for (int64_t n = n0; n < n1; ++n) {
        __m256 acc[M];
        for (int m = 0; m < M; ++m) {
            acc[m] = _mm256_setzero_ps();
        }
        const uint8_t* row = p + n * K / 2;
        const int64_t b0 = n * blocks_per_row;
        for (int64_t bi = 0; bi < blocks_per_row; ++bi) {
            __m256 blk[M];
            for (int m = 0; m < M; ++m) {
                blk[m] = _mm256_setzero_ps();
            }
            for (int64_t k = bi * bs; k < (bi + 1) * bs; k += 32) {
                for (int half = 0; half < 2; ++half) {
                    const __m256i wb =
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2 + 8 * half)));
                    const __m256 w_even = lookup16(_mm256_srli_epi32(wb, 4), lut_lo, lut_hi);
                    const __m256 w_odd = lookup16(_mm256_and_si256(wb, low4), lut_lo, lut_hi);
                    for (int m = 0; m < M; ++m) {
                        blk[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xd + m * K + k + 8 * half), w_even, blk[m]);
                        blk[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xd + m * K + k + 16 + 8 * half), w_odd, blk[m]);
                    }
                }
            }
            const __m256 av = _mm256_set1_ps(w.am.at(b0 + bi));
            for (int m = 0; m < M; ++m) {
                acc[m] = _mm256_fmadd_ps(blk[m], av, acc[m]);
            }
        }
        for (int m = 0; m < M; ++m) {
            y32[m * N + n] = hsum8(acc[m]);
        }
    }
}

template <int M = 1>
void fused_rows_avx2_aligned_dispatch(
    int64_t m, const float* xd, int64_t K, const CpuWeight& w, int64_t bs, int64_t n0, int64_t n1, float* y32, int64_t N
) {
    if constexpr (M <= kFusedMaxM) {
        if (m == M) {
            fused_rows_avx2_aligned<M>(xd, K, w, bs, n0, n1, y32, N);
        } else {
            fused_rows_avx2_aligned_dispatch<M + 1>(m, xd, K, w, bs, n0, n1, y32, N);
        }
    }
}

template <typename TX, int M = 1>
void fused_rows_avx512_dispatch(
    int64_t m, const TX* x, int64_t K, const CpuWeight& w, int64_t bs, int64_t n0, int64_t n1, float* y32, int64_t N
) {
    if constexpr (M <= kFusedMaxM) {
        if (m == M) {
            fused_rows_avx512<M>(x, K, w, bs, n0, n1, y32, N);
        } else {
            fused_rows_avx512_dispatch<TX, M + 1>(m, x, K, w, bs, n0, n1, y32, N);
        }
    }
}
#endif

// x rearranged for fused_rows_avx512_aligned: per chunk of 32, even-index elements then odd-index ones (float32).
template <typename TX> std::vector<float> deinterleave_chunks(const TX* x, int64_t M, int64_t K) {
    std::vector<float> xd(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t c = 0; c < K; c += 32) {
            for (int64_t j = 0; j < 16; ++j) {
                xd[m * K + c + j] = static_cast<float>(x[m * K + c + 2 * j]);
                xd[m * K + c + 16 + j] = static_cast<float>(x[m * K + c + 2 * j + 1]);
            }
        }
    }
    return xd;
}

template <typename TX>
void fused_linear(const TX* x, int64_t M, int64_t K, const CpuWeight& w, int64_t bs, int64_t N, float* y32) {
    const CpuIsa isa = cpu_isa();
#if defined(QLORA_X86)
    // The aligned AVX-512 kernel keeps 3 accumulators per row of x; past M = 4 they no longer fit in 32 registers and
    // the unaligned kernel (one accumulator per row, weights scaled before the FMA) is faster.
    if (isa != CpuIsa::kScalar && K % bs == 0 && (isa == CpuIsa::kAvx2 || M <= 4)) {
        const std::vector<float> xd = deinterleave_chunks(x, M, K);
        at::parallel_for(0, N, std::max<int64_t>(1, 65536 / K), [&](int64_t n0, int64_t n1) {
            if (isa == CpuIsa::kAvx512) {
                fused_rows_avx512_aligned_dispatch(M, xd.data(), K, w, bs, n0, n1, y32, N);
            } else {
                fused_rows_avx2_aligned_dispatch(M, xd.data(), K, w, bs, n0, n1, y32, N);
            }
        });
        return;
    }
#endif
    // Rows per task: enough weights (~64 Ki) to amortise scheduling.
    const int64_t grain = std::max<int64_t>(1, 65536 / K);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#if defined(QLORA_X86)
        if (isa == CpuIsa::kAvx512) {
            fused_rows_avx512_dispatch<TX>(M, x, K, w, bs, n0, n1, y32, N);
            return;
        }
#endif
        fused_rows_scalar(x, M, K, w, bs, n0, n1, y32, N);
    });
}

} // namespace

at::Tensor nf4_linear_cpu(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t out_features, int64_t blocksize,
    const std::optional<at::Tensor>& bias
) {
    const int64_t K =
        nf4_check_linear_args(
            "qlora::nf4_linear", x, packed, absmax, nested_absmax, nested_code, offset, out_features, blocksize, bias
        )
            .expect_int();
    const int64_t N = out_features;
    const std::vector<int64_t> out_shape = nf4_shape_with_last(x.sizes(), N);
    const at::Tensor x2 = x.reshape({-1, K}).contiguous();
    const int64_t M = x2.size(0);
    if (M == 0) {
        return at::empty(out_shape, x.options());
    }
    const CpuWeight w(packed, absmax, nested_absmax, nested_code, offset);
    at::Tensor y;
    if (M <= kFusedMaxM && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16)) {
        at::Tensor y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
        if (x.scalar_type() == at::kFloat) {
            fused_linear(x2.const_data_ptr<float>(), M, K, w, blocksize, N, y32.data_ptr<float>());
        } else {
            fused_linear(x2.const_data_ptr<c10::BFloat16>(), M, K, w, blocksize, N, y32.data_ptr<float>());
        }
        y = nf4_finish_fused(y32, bias, x.scalar_type());
    } else {
        y = at::empty({M, N}, x.options());
        nf4_linear_tiled(
            x2, y, N, K, kTileElems,
            [&](int64_t n0, int64_t rows, int64_t k0, int64_t cols, at::Tensor& t) {
                dequantize_tile_as(w, K, blocksize, n0, rows, k0, cols, t);
            }
        );
        if (bias.has_value()) {
            y.add_(*bias);
        }
    }
    return y.view(out_shape);
}

at::Tensor nf4_linear_grad_input_cpu(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t in_features, int64_t blocksize
) {
    const int64_t N = grad_out.size(-1);
    const int64_t K = in_features;
    nf4_check_linear_grad_input_args(grad_out, packed, absmax, nested_absmax, nested_code, offset, K, blocksize);
    const std::vector<int64_t> out_shape = nf4_shape_with_last(grad_out.sizes(), K);
    const at::Tensor g2 = grad_out.reshape({-1, N}).contiguous();
    at::Tensor gx = at::empty({g2.size(0), K}, grad_out.options());
    if (g2.size(0) > 0) {
        const CpuWeight w(packed, absmax, nested_absmax, nested_code, offset);
        nf4_grad_input_tiled(
            g2, gx, N, K, kTileElems,
            [&](int64_t n0, int64_t rows, int64_t k0, int64_t cols, at::Tensor& t) {
                dequantize_tile_as(w, K, blocksize, n0, rows, k0, cols, t);
            }
        );
    }
    return gx.view(out_shape);
}

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
    m.impl("nf4_linear", &nf4_linear_cpu);
    m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
}

} // namespace qlora::cpu
