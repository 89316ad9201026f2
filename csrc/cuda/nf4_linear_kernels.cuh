// csrc/cuda/nf4_linear_kernels.cuh: CUDA kernels of the NF4 linear (qlora::nf4_linear, nf4_linear_grad_input).
//
// Shapes: x [M, K], W NF4 [N, K] (flattened row-major, blocks of B), y [M, N].
//   nf4_linear_gemv_kernel   small M (M <= kGemvMaxM): one warp per output row n; lanes stride over k, decode each
//                            weight in registers (core::nf4_decode) and keep M partial sums, reduced with
//                            __shfl_xor_sync at the end. Never writes a dequantized weight.
//   nf4_dequantize_tile_kernel  large M and the input gradient: dequantizes W[n0:n0+R, k0:k0+C] into a contiguous
//                            [R, C] scratch tile that cuBLAS (at::mm) then multiplies; tiles along N for the forward,
//                            along K for grad_input.
// No ATen (Note [CUDA kernel rules] in launch.cuh).
#pragma once

#include "convert.cuh"
#include "launch.cuh"
#include "nf4_weight.cuh"

namespace qlora::cuda {

inline constexpr int kGemvMaxM = 16;
inline constexpr int kGemvThreads = 256; // 8 warps = 8 output rows per block

// --------------------------------------------------------------------------------------------------------------
// Small-M fused kernel

struct Nf4GemvParams {
    Nf4WeightView w;
    const void* x; // [M, K] of T
    int64_t M, N, K;
    float* y; // [M, N] float32 (the ATen layer adds the bias and converts)
};

template <typename T> __global__ void nf4_linear_gemv_kernel(Nf4GemvParams p) {
    const T* x = static_cast<const T*>(p.x);
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int64_t warps_per_block = blockDim.x / kWarpSize;
    for (int64_t n = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; n < p.N;
         n += static_cast<int64_t>(gridDim.x) * warps_per_block) {
        float acc[kGemvMaxM];
        for (int m = 0; m < kGemvMaxM; ++m) {
            acc[m] = 0.0f;
        }
        const int64_t row = n * p.K;
        for (int64_t k = lane; k < p.K; k += kWarpSize) {
            const float wv = weight_at(p.w, row + k);
            for (int m = 0; m < kGemvMaxM; ++m) {
                if (m < p.M) {
                    acc[m] += to_float(x[m * p.K + k]) * wv;
                }
            }
        }
        for (int m = 0; m < kGemvMaxM; ++m) {
            if (m < p.M) { // warp-uniform condition
                float v = acc[m];
                for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
                    v += __shfl_xor_sync(kFullMask, v, offset);
                }
                if (lane == 0) {
                    p.y[m * p.N + n] = v;
                }
            }
        }
    }
}

template <typename T> void nf4_linear_gemv_launch(const Nf4GemvParams& p, cudaStream_t stream, int64_t max_blocks = 0) {
    const unsigned grid = grid_for(p.N, kGemvThreads / kWarpSize, max_blocks);
    QLORA_LAUNCH(nf4_linear_gemv_kernel<T>, grid, kGemvThreads, 0, stream, p);
}

// --------------------------------------------------------------------------------------------------------------
// Dequantized tile

struct Nf4TileParams {
    Nf4WeightView w;
    int64_t K;      // row length of W
    int64_t n0, k0; // tile origin in W
    int64_t rows, cols;
    void* out; // [rows, cols] of T
};

inline constexpr int kTileThreads = 256;

template <typename T> __global__ void nf4_dequantize_tile_kernel(Nf4TileParams p) {
    T* out = static_cast<T*>(p.out);
    const int64_t total = p.rows * p.cols;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = j / p.cols;
        const int64_t c = j - r * p.cols;
        out[j] = from_float<T>(weight_at(p.w, (p.n0 + r) * p.K + p.k0 + c));
    }
}

template <typename T>
void nf4_dequantize_tile_launch(const Nf4TileParams& p, cudaStream_t stream, int64_t max_blocks = 0) {
    const unsigned grid = grid_for(p.rows * p.cols, kTileThreads, max_blocks);
    QLORA_LAUNCH(nf4_dequantize_tile_kernel<T>, grid, kTileThreads, 0, stream, p);
}

} // namespace qlora::cuda
