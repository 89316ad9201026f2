// csrc/cuda/attention_kernels.cuh: CUDA kernels of qlora::causal_attention and its backward (Note [Causal
// attention] in core/attention.h). No ATen here (Note [CUDA kernel rules] in launch.cuh).
//
// Decomposition: one warp per row, kAttentionWarps warps per thread block, grid-stride over rows. The row's own
// vectors (q_i, do_i, or k_j, v_j) sit in the warp's slice of shared memory as float32; lanes take 32 keys (or
// queries) at a time for the dot products, and lane d owns output dimensions d, d + 32, ... (up to
// kAttentionMaxHeadDim). The probabilities of a chunk reach every lane by __shfl_sync.
//   attention_fwd_kernel      rows = (b, h, i): online softmax over keys j <= i, writes out and lse.
//   attention_bwd_dq_kernel   rows = (b, h, i): delta_i = do_i . o_i (kept in `delta` for the next kernel), then
//                             dq_i = scale sum_j p_ij (dp_ij - delta_i) k_j, recomputing p from lse.
//   attention_bwd_dkv_kernel  rows = (b, kv head, j): over the group's query heads and queries i >= j,
//                             dv_j = sum p_ij do_i and dk_j = scale sum ds_ij q_i. No atomics.
// exp and log are expf/logf (not the fast-math intrinsics; within 2 ulp), so results agree with the CPU kernel
// within float32 summation order and the CPU's rounding of p and ds to the input dtype.
#pragma once

#include <cmath>

#include "../core/attention.h"
#include "convert.cuh"
#include "launch.cuh"

namespace qlora::cuda {

inline constexpr int kAttentionWarps = 4;
inline constexpr int kAttentionMaxHeadDim = 256;
inline constexpr int kAttentionDimsPerLane = kAttentionMaxHeadDim / kWarpSize;

// The backward kernels' extra buffer: delta float32 [B, H, T], written by the dq kernel, read by the dk/dv one.
template <typename T> struct AttentionBwdLaunch {
    core::AttentionBwdParams<T> p;
    float* delta;
};

__device__ QLORA_INLINE float warp_max(float v) {
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
    }
    return v;
}

__device__ QLORA_INLINE float warp_sum(float v) {
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(kFullMask, v, offset);
    }
    return v;
}

// Copies row `src` (D elements) into the warp's shared slice as float32; the warp syncs after.
template <typename T> __device__ QLORA_INLINE void load_row(float* dst, const T* src, int64_t D, int lane) {
    for (int64_t d = lane; d < D; d += kWarpSize) {
        dst[d] = to_float(src[d]);
    }
    __syncwarp();
}

// x . y with x in shared memory (float32) and y a row in global memory.
template <typename T> __device__ QLORA_INLINE float dot_row(const float* x, const T* y, int64_t D) {
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
        acc += x[d] * to_float(y[d]);
    }
    return acc;
}

__device__ QLORA_INLINE bool row_visible(const int32_t* seg, int64_t b, int64_t T, int64_t i, int64_t j) {
    return core::attention_visible(
        i, j, seg != nullptr, seg != nullptr ? seg[b * T + i] : 0, seg != nullptr && j < T ? seg[b * T + j] : 0
    );
}

// --------------------------------------------------------------------------------------------------------------
// Forward

template <typename T> __global__ void attention_fwd_kernel(core::AttentionFwdParams<T> p) {
    QLORA_DYNAMIC_SHARED(float, smem);
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int64_t D = p.head_dim, T_ = p.tokens, G = p.heads / p.kv_heads;
    float* q = smem + warp * D;
    const int64_t rows = p.batch * p.heads * T_;
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kAttentionWarps + warp; row < rows;
         row += static_cast<int64_t>(gridDim.x) * kAttentionWarps) {
        const int64_t b = row / (p.heads * T_), h = row / T_ % p.heads, i = row % T_, kh = h / G;
        load_row(q, p.q + b * p.q_stride.batch + h * p.q_stride.head + i * p.q_stride.token, D, lane);
        const T* kb = p.k + b * p.k_stride.batch + kh * p.k_stride.head;
        const T* vb = p.v + b * p.v_stride.batch + kh * p.v_stride.head;
        float m = -INFINITY, l = 0.0f;
        float o[kAttentionDimsPerLane];
        for (int x = 0; x < kAttentionDimsPerLane; ++x) {
            o[x] = 0.0f;
        }
        for (int64_t j0 = 0; j0 <= i; j0 += kWarpSize) {
            const int64_t j = j0 + lane;
            const bool vis = j <= i && row_visible(p.segments, b, T_, i, j);
            const float s = vis ? p.scale * dot_row(q, kb + j * p.k_stride.token, D) : -INFINITY;
            const float m_new = fmaxf(m, warp_max(s));
            if (m_new == -INFINITY) { // nothing visible yet (warp-uniform)
                continue;
            }
            const float alpha = expf(m - m_new);
            const float pj = vis ? expf(s - m_new) : 0.0f;
            l = l * alpha + warp_sum(pj);
            for (int x = 0; x < kAttentionDimsPerLane; ++x) {
                o[x] *= alpha;
            }
            const int64_t n = i - j0 + 1 < kWarpSize ? i - j0 + 1 : kWarpSize;
            for (int jj = 0; jj < kWarpSize; ++jj) {
                const float pjj = __shfl_sync(kFullMask, pj, jj);
                if (jj < n && pjj != 0.0f) { // warp-uniform
                    const T* vrow = vb + (j0 + jj) * p.v_stride.token;
                    for (int x = 0; x < kAttentionDimsPerLane; ++x) {
                        const int64_t d = lane + x * kWarpSize;
                        if (d < D) {
                            o[x] += pjj * to_float(vrow[d]);
                        }
                    }
                }
            }
            m = m_new;
        }
        T* out = p.out + b * p.out_stride.batch + h * p.out_stride.head + i * p.out_stride.token;
        for (int x = 0; x < kAttentionDimsPerLane; ++x) {
            const int64_t d = lane + x * kWarpSize;
            if (d < D) {
                out[d] = from_float<T>(o[x] / l);
            }
        }
        if (lane == 0) {
            p.lse[(b * p.heads + h) * T_ + i] = m + logf(l);
        }
        __syncwarp(); // q is rewritten by the next row
    }
}

template <typename T>
void attention_fwd_launch(const core::AttentionFwdParams<T>& p, cudaStream_t stream, int64_t max_blocks = 0) {
    const unsigned grid = grid_for(p.batch * p.heads * p.tokens, kAttentionWarps, max_blocks);
    const size_t smem = static_cast<size_t>(kAttentionWarps * p.head_dim) * sizeof(float);
    QLORA_LAUNCH(attention_fwd_kernel<T>, grid, kAttentionWarps * kWarpSize, smem, stream, p);
}

// --------------------------------------------------------------------------------------------------------------
// Backward

template <typename T> __global__ void attention_bwd_dq_kernel(AttentionBwdLaunch<T> a) {
    QLORA_DYNAMIC_SHARED(float, smem);
    const core::AttentionBwdParams<T>& p = a.p;
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int64_t D = p.head_dim, T_ = p.tokens, G = p.heads / p.kv_heads;
    float* q = smem + warp * 2 * D;
    float* g = q + D;
    const int64_t rows = p.batch * p.heads * T_;
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kAttentionWarps + warp; row < rows;
         row += static_cast<int64_t>(gridDim.x) * kAttentionWarps) {
        const int64_t b = row / (p.heads * T_), h = row / T_ % p.heads, i = row % T_, kh = h / G;
        load_row(q, p.q + b * p.q_stride.batch + h * p.q_stride.head + i * p.q_stride.token, D, lane);
        load_row(
            g, p.grad_out + b * p.grad_out_stride.batch + h * p.grad_out_stride.head + i * p.grad_out_stride.token, D,
            lane
        );
        const T* orow = p.out + b * p.out_stride.batch + h * p.out_stride.head + i * p.out_stride.token;
        float part = 0.0f;
        for (int64_t d = lane; d < D; d += kWarpSize) {
            part += g[d] * to_float(orow[d]);
        }
        const float delta = warp_sum(part);
        const float lse = p.lse[(b * p.heads + h) * T_ + i];
        if (lane == 0) {
            a.delta[(b * p.heads + h) * T_ + i] = delta;
        }
        const T* kb = p.k + b * p.k_stride.batch + kh * p.k_stride.head;
        const T* vb = p.v + b * p.v_stride.batch + kh * p.v_stride.head;
        float dq[kAttentionDimsPerLane];
        for (int x = 0; x < kAttentionDimsPerLane; ++x) {
            dq[x] = 0.0f;
        }
        for (int64_t j0 = 0; j0 <= i; j0 += kWarpSize) {
            const int64_t j = j0 + lane;
            float ds = 0.0f;
            if (j <= i && row_visible(p.segments, b, T_, i, j)) {
                const float pj = expf(p.scale * dot_row(q, kb + j * p.k_stride.token, D) - lse);
                const float dp = dot_row(g, vb + j * p.v_stride.token, D);
                ds = p.scale * core::attention_grad_score(pj, dp, delta);
            }
            const int64_t n = i - j0 + 1 < kWarpSize ? i - j0 + 1 : kWarpSize;
            for (int jj = 0; jj < kWarpSize; ++jj) {
                const float dsj = __shfl_sync(kFullMask, ds, jj);
                if (jj < n && dsj != 0.0f) {
                    const T* krow = kb + (j0 + jj) * p.k_stride.token;
                    for (int x = 0; x < kAttentionDimsPerLane; ++x) {
                        const int64_t d = lane + x * kWarpSize;
                        if (d < D) {
                            dq[x] += dsj * to_float(krow[d]);
                        }
                    }
                }
            }
        }
        T* out = p.dq + b * p.dq_stride.batch + h * p.dq_stride.head + i * p.dq_stride.token;
        for (int x = 0; x < kAttentionDimsPerLane; ++x) {
            const int64_t d = lane + x * kWarpSize;
            if (d < D) {
                out[d] = from_float<T>(dq[x]);
            }
        }
        __syncwarp();
    }
}

template <typename T> __global__ void attention_bwd_dkv_kernel(AttentionBwdLaunch<T> a) {
    QLORA_DYNAMIC_SHARED(float, smem);
    const core::AttentionBwdParams<T>& p = a.p;
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int64_t D = p.head_dim, T_ = p.tokens, G = p.heads / p.kv_heads;
    float* k = smem + warp * 2 * D;
    float* v = k + D;
    const int64_t rows = p.batch * p.kv_heads * T_;
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kAttentionWarps + warp; row < rows;
         row += static_cast<int64_t>(gridDim.x) * kAttentionWarps) {
        const int64_t b = row / (p.kv_heads * T_), kh = row / T_ % p.kv_heads, j = row % T_;
        load_row(k, p.k + b * p.k_stride.batch + kh * p.k_stride.head + j * p.k_stride.token, D, lane);
        load_row(v, p.v + b * p.v_stride.batch + kh * p.v_stride.head + j * p.v_stride.token, D, lane);
        float dk[kAttentionDimsPerLane], dv[kAttentionDimsPerLane];
        for (int x = 0; x < kAttentionDimsPerLane; ++x) {
            dk[x] = 0.0f;
            dv[x] = 0.0f;
        }
        for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
            const T* qb = p.q + b * p.q_stride.batch + h * p.q_stride.head;
            const T* gb = p.grad_out + b * p.grad_out_stride.batch + h * p.grad_out_stride.head;
            for (int64_t i0 = j; i0 < T_; i0 += kWarpSize) {
                const int64_t i = i0 + lane;
                float pi = 0.0f, ds = 0.0f;
                if (i < T_ && row_visible(p.segments, b, T_, i, j)) {
                    const int64_t r = (b * p.heads + h) * T_ + i;
                    pi = expf(p.scale * dot_row(k, qb + i * p.q_stride.token, D) - p.lse[r]);
                    const float dp = dot_row(v, gb + i * p.grad_out_stride.token, D);
                    ds = p.scale * core::attention_grad_score(pi, dp, a.delta[r]);
                }
                const int64_t n = T_ - i0 < kWarpSize ? T_ - i0 : kWarpSize;
                for (int ii = 0; ii < kWarpSize; ++ii) {
                    const float pii = __shfl_sync(kFullMask, pi, ii);
                    const float dsi = __shfl_sync(kFullMask, ds, ii);
                    if (ii < n && (pii != 0.0f || dsi != 0.0f)) {
                        const T* qrow = qb + (i0 + ii) * p.q_stride.token;
                        const T* grow = gb + (i0 + ii) * p.grad_out_stride.token;
                        for (int x = 0; x < kAttentionDimsPerLane; ++x) {
                            const int64_t d = lane + x * kWarpSize;
                            if (d < D) {
                                dv[x] += pii * to_float(grow[d]);
                                dk[x] += dsi * to_float(qrow[d]);
                            }
                        }
                    }
                }
            }
        }
        T* dko = p.dk + b * p.dk_stride.batch + kh * p.dk_stride.head + j * p.dk_stride.token;
        T* dvo = p.dv + b * p.dv_stride.batch + kh * p.dv_stride.head + j * p.dv_stride.token;
        for (int x = 0; x < kAttentionDimsPerLane; ++x) {
            const int64_t d = lane + x * kWarpSize;
            if (d < D) {
                dko[d] = from_float<T>(dk[x]);
                dvo[d] = from_float<T>(dv[x]);
            }
        }
        __syncwarp();
    }
}

template <typename T>
void attention_bwd_dq_launch(const AttentionBwdLaunch<T>& a, cudaStream_t stream, int64_t max_blocks = 0) {
    const core::AttentionBwdParams<T>& p = a.p;
    const size_t smem = static_cast<size_t>(kAttentionWarps * 2 * p.head_dim) * sizeof(float);
    const unsigned grid = grid_for(p.batch * p.heads * p.tokens, kAttentionWarps, max_blocks);
    QLORA_LAUNCH(attention_bwd_dq_kernel<T>, grid, kAttentionWarps * kWarpSize, smem, stream, a);
}

template <typename T>
void attention_bwd_dkv_launch(const AttentionBwdLaunch<T>& a, cudaStream_t stream, int64_t max_blocks = 0) {
    const core::AttentionBwdParams<T>& p = a.p;
    const size_t smem = static_cast<size_t>(kAttentionWarps * 2 * p.head_dim) * sizeof(float);
    const unsigned grid = grid_for(p.batch * p.kv_heads * p.tokens, kAttentionWarps, max_blocks);
    QLORA_LAUNCH(attention_bwd_dkv_kernel<T>, grid, kAttentionWarps * kWarpSize, smem, stream, a);
}

// Both backward kernels, in order on one stream (the second reads the first's delta).
template <typename T>
void attention_bwd_launch(const AttentionBwdLaunch<T>& a, cudaStream_t stream, int64_t max_blocks = 0) {
    attention_bwd_dq_launch(a, stream, max_blocks);
    attention_bwd_dkv_launch(a, stream, max_blocks);
}

} // namespace qlora::cuda
