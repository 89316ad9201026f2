// csrc/cuda/adamw_kernels.cuh: CUDA kernels of the AdamW optimizer steps (qlora::adamw8bit_step, adamw32bit_step).
//
// Every rounding comes from csrc/core/adamw.h (Note [AdamW8 update order]), composed in the order of the CPU scalar
// kernels (csrc/cpu/adamw_simd.cpp), so both backends write the same bytes. No ATen here (Note [CUDA kernel rules] in
// launch.cuh), so the CPU test harness can run these kernels.
//
// Decomposition:
//   adamw8_kernel   one thread block of 256 threads per 256-element state block, grid-stride over blocks. Each thread
//                   decodes its element's moments against shared-memory copies of qmap1/qmap2 and updates them; the
//                   block's new absmax1/absmax2 come from a warp + shared-memory max reduction (inactive lanes of a
//                   tail block add 0, and the padding term core::adamw8_padding_m is merged into absmax1 as on the
//                   CPU); then each thread updates its parameter and encodes its two states.
//   adamw32_kernel  grid-stride, one element per thread per step.
#pragma once

#include "../core/adamw.h"
#include "convert.cuh"
#include "launch.cuh"

namespace qlora::cuda {

// *p = the new parameter of core::adamw_new_param in T.
template <typename T> __device__ QLORA_INLINE void adamw_store_param(T* p, float delta, const core::AdamwScalars& s) {
    const auto round = [](float x) {
        return to_float(from_float<T>(x));
    };
    *p = from_float<T>(core::adamw_new_param(to_float(*p), delta, s, round));
}

// --------------------------------------------------------------------------------------------------------------
// 8-bit blockwise states (blocksize = blockDim.x = 256)

inline constexpr int kAdamw8Threads = core::kAdamw8BlockSize;
static_assert(kAdamw8Threads == core::kDynamic8Codes, "each thread copies one entry of each map");

template <typename T> __global__ void adamw8_kernel(core::Adamw8Params<T> p) {
    __shared__ float map1[core::kDynamic8Codes];
    __shared__ float map2[core::kDynamic8Codes];
    __shared__ float warp_max1[kAdamw8Threads / kWarpSize];
    __shared__ float warp_max2[kAdamw8Threads / kWarpSize];
    const core::AdamwScalars& s = p.scalars;
    const int t = static_cast<int>(threadIdx.x);
    const int lane = t % kWarpSize;
    const int warp = t / kWarpSize;
    map1[t] = p.qmap1[t];
    map2[t] = p.qmap2[t];
    __syncthreads(); // maps complete (the decode below reads them before any barrier of the loop)
    const int64_t nblocks = ceil_div(p.n, kAdamw8Threads);
    for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const int64_t i = b * kAdamw8Threads + t;
        const bool active = i < p.n;
        // Old block absmax: every thread reads it here, thread 0 overwrites it only after the barrier below.
        const float a1_old = p.absmax1[b];
        const float a2_old = p.absmax2[b];
        float m = 0.0f;
        float v = 0.0f;
        bool finite = false;
        if (active) {
            m = core::dynamic8_decode(map1, p.state1[i], a1_old);
            v = core::dynamic8_decode(map2, p.state2[i], a2_old);
            finite = core::adamw_update_moments(to_float(p.grad[i]), &m, &v, s);
        }
        float a1 = core::absmax_update(0.0f, m); // an inactive lane adds |0|, which never changes the max
        float a2 = core::absmax_update(0.0f, v);
        for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
            a1 = core::absmax_merge(a1, __shfl_xor_sync(kFullMask, a1, offset));
            a2 = core::absmax_merge(a2, __shfl_xor_sync(kFullMask, a2, offset));
        }
        if (lane == 0) {
            warp_max1[warp] = a1;
            warp_max2[warp] = a2;
        }
        __syncthreads(); // warp maxima complete; every thread has read the old absmax
        a1 = warp_max1[0];
        a2 = warp_max2[0];
        for (int w = 1; w < kAdamw8Threads / kWarpSize; ++w) {
            a1 = core::absmax_merge(a1, warp_max1[w]);
            a2 = core::absmax_merge(a2, warp_max2[w]);
        }
        if ((b + 1) * kAdamw8Threads > p.n) { // tail block: the padding lanes' first moment (block-uniform branch)
            a1 = core::absmax_merge(a1, core::adamw8_padding_m(map1, a1_old, s));
        }
        if (t == 0) {
            p.absmax1[b] = a1;
            p.absmax2[b] = a2;
        }
        if (active) {
            if (finite) {
                adamw_store_param(p.param + i, core::adamw_delta(m, v, s), s);
            }
            p.state1[i] = core::adamw8_encode_m(map1, m, core::block_scale(a1));
            p.state2[i] = core::adamw8_encode_v(map2, v, core::block_scale(a2));
        }
        __syncthreads(); // everyone has read warp_max1/2 before the next block overwrites them
    }
}

template <typename T> void adamw8_launch(const core::Adamw8Params<T>& p, cudaStream_t stream, int64_t max_blocks = 0) {
    const unsigned grid = grid_for(ceil_div(p.n, kAdamw8Threads), 1, max_blocks);
    QLORA_LAUNCH(adamw8_kernel<T>, grid, kAdamw8Threads, 0, stream, p);
}

// --------------------------------------------------------------------------------------------------------------
// float32 states

inline constexpr int kAdamw32Threads = 256;

template <typename T> __global__ void adamw32_kernel(core::Adamw32Params<T> p) {
    const core::AdamwScalars& s = p.scalars;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        float m = p.exp_avg[i];
        float v = p.exp_avg_sq[i];
        const bool finite = core::adamw_update_moments(to_float(p.grad[i]), &m, &v, s);
        p.exp_avg[i] = m;
        p.exp_avg_sq[i] = v;
        if (finite) {
            adamw_store_param(p.param + i, core::adamw_delta(m, v, s), s);
        }
    }
}

template <typename T>
void adamw32_launch(const core::Adamw32Params<T>& p, cudaStream_t stream, int64_t max_blocks = 0) {
    const unsigned grid = grid_for(p.n, kAdamw32Threads, max_blocks);
    QLORA_LAUNCH(adamw32_kernel<T>, grid, kAdamw32Threads, 0, stream, p);
}

} // namespace qlora::cuda
