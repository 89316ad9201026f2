// csrc/cuda/nf4_kernels.cuh: CUDA kernels of the NF4 storage ops and of blockwise dynamic-8-bit quantization.
//
// Three tiers (llm.c): core math from csrc/core, thin __global__ kernels that only compute offsets, and launchers
// taking a params struct and a stream. No ATen here (Note [CUDA kernel rules] in launch.cuh), so the CPU test
// harness can run these kernels.
//
// Decomposition:
//   nf4_quantize_kernel     one warp per quantization block (B = 32..4096): lanes stride over the block for the
//                           absmax, reduce it with __shfl_xor_sync, then each lane packs whole bytes.
//   dynamic8_quantize_kernel one thread block of 256 threads per 256-element block: warp + shared-memory max
//                           reduction, then each thread encodes its element against a shared-memory copy of the map.
//   nf4_dequantize_kernel   grid-stride, one packed byte (two elements) per thread per step.
#pragma once

#include "../core/dynamic8.h"
#include "../core/nf4.h"
#include "convert.cuh"
#include "launch.cuh"
#include "nf4_weight.cuh"

namespace qlora::cuda {

// --------------------------------------------------------------------------------------------------------------
// NF4 quantize

struct Nf4QuantizeParams {
    const void* weight; // [n] of T, contiguous
    int64_t n;
    int64_t blocksize;
    uint8_t* packed; // [(n + 1) / 2]
    float* absmax;   // [ceil(n / blocksize)]; non-finite for a block holding NaN/Inf (then no codes are written)
};

inline constexpr int kNf4QuantizeThreads = 256; // 8 warps, one quantization block each

template <typename T> __global__ void nf4_quantize_kernel(Nf4QuantizeParams p) {
    const T* x = static_cast<const T*>(p.weight);
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int64_t warps_per_block = blockDim.x / kWarpSize;
    const int64_t nblocks = ceil_div(p.n, p.blocksize);
    for (int64_t b = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; b < nblocks;
         b += static_cast<int64_t>(gridDim.x) * warps_per_block) {
        const int64_t s = b * p.blocksize;
        const int64_t e = (s + p.blocksize < p.n) ? s + p.blocksize : p.n;
        float m = 0.0f;
        for (int64_t i = s + lane; i < e; i += kWarpSize) {
            m = core::absmax_update(m, to_float(x[i]));
        }
        for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
            m = core::absmax_merge(m, __shfl_xor_sync(kFullMask, m, offset));
        }
        if (lane == 0) {
            p.absmax[b] = m;
        }
        if (!core::is_finite(m)) { // the butterfly leaves the same class of value in every lane: warp-uniform
            continue;
        }
        const float scale = core::block_scale(m);
        for (int64_t byte = s / 2 + lane; byte < (e + 1) / 2; byte += kWarpSize) {
            const int64_t i = 2 * byte;
            const float x0 = to_float(x[i]);
            const float x1 = (i + 1 < e) ? to_float(x[i + 1]) : core::kNf4PadValue;
            p.packed[byte] = core::nf4_pack(core::nf4_encode_scaled(x0, scale), core::nf4_encode_scaled(x1, scale));
        }
    }
}

template <typename T>
void nf4_quantize_launch(const Nf4QuantizeParams& p, cudaStream_t stream, int64_t max_blocks = 0) {
    const int64_t nblocks = ceil_div(p.n, p.blocksize);
    const unsigned grid = grid_for(nblocks, kNf4QuantizeThreads / kWarpSize, max_blocks);
    QLORA_LAUNCH(nf4_quantize_kernel<T>, grid, kNf4QuantizeThreads, 0, stream, p);
}

// --------------------------------------------------------------------------------------------------------------
// Dynamic 8-bit blockwise quantize (blocksize = blockDim.x = 256)

struct Dynamic8QuantizeParams {
    const float* x; // [n]
    int64_t n;
    const float* code; // [256] sorted map, device memory
    uint8_t* q;        // [n]
    float* absmax;     // [ceil(n / 256)]
};

inline constexpr int kDynamic8Threads = 256;

__global__ void dynamic8_quantize_kernel(Dynamic8QuantizeParams p) {
    __shared__ float code[core::kDynamic8Codes];
    __shared__ float warp_max[kDynamic8Threads / kWarpSize];
    const int t = static_cast<int>(threadIdx.x);
    const int lane = t % kWarpSize;
    const int warp = t / kWarpSize;
    code[t] = p.code[t];
    const int64_t nblocks = ceil_div(p.n, kDynamic8Threads);
    for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const int64_t i = b * kDynamic8Threads + t;
        const float v = (i < p.n) ? p.x[i] : 0.0f;
        float m = core::absmax_update(0.0f, v);
        for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
            m = core::absmax_merge(m, __shfl_xor_sync(kFullMask, m, offset));
        }
        if (lane == 0) {
            warp_max[warp] = m;
        }
        __syncthreads(); // warp_max (and, on the first pass, code) complete
        m = warp_max[0];
        for (int w = 1; w < kDynamic8Threads / kWarpSize; ++w) {
            m = core::absmax_merge(m, warp_max[w]);
        }
        if (t == 0) {
            p.absmax[b] = m;
        }
        if (i < p.n) {
            p.q[i] = core::dynamic8_encode(code, core::fmul_rn(v, core::block_scale(m)));
        }
        __syncthreads(); // everyone has read warp_max before the next block overwrites it
    }
}

inline void dynamic8_quantize_launch(const Dynamic8QuantizeParams& p, cudaStream_t stream, int64_t max_blocks = 0) {
    const unsigned grid = grid_for(ceil_div(p.n, kDynamic8Threads), 1, max_blocks);
    QLORA_LAUNCH(dynamic8_quantize_kernel, grid, kDynamic8Threads, 0, stream, p);
}

// --------------------------------------------------------------------------------------------------------------
// NF4 dequantize

struct Nf4DequantizeParams {
    Nf4WeightView w; // the NF4 tensor
    int64_t n;       // elements
    void* out;       // [n] of T
};

inline constexpr int kNf4DequantizeThreads = 256;

template <typename T> __global__ void nf4_dequantize_kernel(Nf4DequantizeParams p) {
    T* out = static_cast<T*>(p.out);
    const int64_t nbytes = core::nf4_packed_bytes(p.n);
    for (int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; byte < nbytes;
         byte += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t i = 2 * byte;
        const float a = weight_block_absmax(p.w, i / p.w.blocksize);
        const uint8_t v = p.w.packed[byte];
        out[i] = from_float<T>(core::nf4_decode(core::nf4_unpack_even(v), a));
        if (i + 1 < p.n) {
            out[i + 1] = from_float<T>(core::nf4_decode(core::nf4_unpack_odd(v), a));
        }
    }
}

template <typename T>
void nf4_dequantize_launch(const Nf4DequantizeParams& p, cudaStream_t stream, int64_t max_blocks = 0) {
    const unsigned grid = grid_for(core::nf4_packed_bytes(p.n), kNf4DequantizeThreads, max_blocks);
    QLORA_LAUNCH(nf4_dequantize_kernel<T>, grid, kNf4DequantizeThreads, 0, stream, p);
}

} // namespace qlora::cuda
