// tests/simt/simt.h: run qlora's CUDA kernels on the CPU, from the same source nvcc compiles.
//
// Include this header first, then a kernel header (csrc/cuda/*_kernels.cuh), in a translation unit compiled by the
// host C++ compiler. It provides what the kernels use: __global__/__device__/__host__/__forceinline__/__shared__,
// threadIdx/blockIdx/blockDim/gridDim, __syncthreads, the warp intrinsics (__shfl_sync, __shfl_xor_sync,
// __shfl_up_sync, __shfl_down_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp), atomics, vector types,
// __nv_bfloat16/__half with CUDA's conversions, and the float intrinsics with CUDA's rounding. QLORA_LAUNCH (in
// csrc/cuda/launch.cuh) then calls simt::launch instead of a triple-chevron launch.
//
// Execution model (see Note [SIMT harness scheduling] in simt.cpp): the blocks of a grid run one after another, in
// a seeded random order. The threads of a block are cooperative user-space threads (ucontext) that switch only at
// __syncthreads and warp intrinsics; whenever several threads can run, the scheduler picks one at random (seeded),
// so code that needs a barrier it lacks reads stale or half-written shared memory and gives a wrong result instead of
// passing by luck. A barrier that some threads never reach, or a warp intrinsic whose mask names a lane that does
// not take part, is reported as an error (simt::Error), never a hang.
//
// Static __shared__ arrays become function-local statics: one instance shared by the threads of the running block
// (blocks never overlap). Dynamic shared memory is QLORA_DYNAMIC_SHARED(type, name) (launch.cuh).
#pragma once

#define QLORA_SIMT_HARNESS 1

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>

// ------------------------------------------------------------------------------------------------------------------
// Qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__

// ------------------------------------------------------------------------------------------------------------------
// Built-in types

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
using cudaError_t = int;
inline constexpr cudaError_t cudaSuccess = 0;

struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct int2 {
    int x, y;
};
struct int4 {
    int x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) {
    return {x, y};
}
inline float4 make_float4(float x, float y, float z, float w) {
    return {x, y, z, w};
}
inline int4 make_int4(int x, int y, int z, int w) {
    return {x, y, z, w};
}
inline uint2 make_uint2(unsigned x, unsigned y) {
    return {x, y};
}
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return {x, y, z, w};
}

namespace qlora::simt {

class Error : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// Per-thread coordinates of the running CUDA thread, and the launch's dimensions.
struct ThreadCoords {
    dim3 thread_idx;
    dim3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
const ThreadCoords& coords();

// Runs fn (a call of the kernel) for every thread of every block. Throws simt::Error on a deadlock (a barrier not
// every live thread reaches, a warp intrinsic a named lane never joins) or a bad launch configuration.
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& fn);
inline void launch(unsigned grid, unsigned block, size_t smem, const std::function<void()>& fn) {
    launch(dim3(grid), dim3(block), smem, fn);
}

// Seed of the scheduler's random choices (default 1); tests run kernels under several seeds.
void set_seed(uint64_t seed);

// How the scheduler picks the next thread among the runnable ones (see Note [SIMT harness scheduling]):
//   kUniform        any runnable thread, uniformly at random;
//   kWarpPriority   each warp gets a random priority, redrawn whenever the block passes a barrier; a runnable thread
//                   of the highest-priority warp runs first. One warp then races ahead through its shuffles and
//                   grid-stride iterations while the others lag, which exposes a missing barrier between loop
//                   iterations that uniform interleaving almost never shows.
enum class Schedule { kUniform, kWarpPriority };
void set_schedule(Schedule schedule);

// The running block's dynamic shared memory (dynamic_shared_bytes of the launch, 16-byte aligned).
void* dynamic_shared();

// Barriers and warp exchange (implemented in simt.cpp).
void syncthreads();
void syncwarp(unsigned mask);
uint32_t warp_exchange(unsigned mask, uint32_t value, int op, int arg); // see simt.cpp for `op`
uint64_t warp_exchange64(unsigned mask, uint64_t value, int op, int arg);

enum WarpOp : int { kShflIdx = 0, kShflXor = 1, kShflUp = 2, kShflDown = 3, kBallot = 4, kAny = 5, kAll = 6 };

template <typename T> uint32_t to_bits32(T v) {
    static_assert(sizeof(T) <= 4, "32-bit shuffle");
    uint32_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> T from_bits32(uint32_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

template <typename T> T shfl(unsigned mask, T v, int op, int arg) {
    if constexpr (sizeof(T) == 8) {
        uint64_t u;
        std::memcpy(&u, &v, 8);
        u = warp_exchange64(mask, u, op, arg);
        std::memcpy(&v, &u, 8);
        return v;
    } else {
        return from_bits32<T>(warp_exchange(mask, to_bits32(v), op, arg));
    }
}

} // namespace qlora::simt

#define threadIdx (::qlora::simt::coords().thread_idx)
#define blockIdx (::qlora::simt::coords().block_idx)
#define blockDim (::qlora::simt::coords().block_dim)
#define gridDim (::qlora::simt::coords().grid_dim)
inline constexpr int warpSize = 32;

inline void __syncthreads() {
    ::qlora::simt::syncthreads();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::qlora::simt::syncwarp(mask);
}

// Warp shuffles: width is the segment size (a power of two <= 32), as in CUDA.
template <typename T> T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return ::qlora::simt::shfl(mask, v, ::qlora::simt::kShflIdx, (width << 8) | (src_lane & 0xff));
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return ::qlora::simt::shfl(mask, v, ::qlora::simt::kShflXor, (width << 8) | (lane_mask & 0xff));
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::qlora::simt::shfl(mask, v, ::qlora::simt::kShflUp, (width << 8) | static_cast<int>(delta & 0xff));
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::qlora::simt::shfl(mask, v, ::qlora::simt::kShflDown, (width << 8) | static_cast<int>(delta & 0xff));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return ::qlora::simt::warp_exchange(mask, pred != 0, ::qlora::simt::kBallot, 0);
}
inline int __any_sync(unsigned mask, int pred) {
    return static_cast<int>(::qlora::simt::warp_exchange(mask, pred != 0, ::qlora::simt::kAny, 0));
}
inline int __all_sync(unsigned mask, int pred) {
    return static_cast<int>(::qlora::simt::warp_exchange(mask, pred != 0, ::qlora::simt::kAll, 0));
}
inline unsigned __activemask() {
    return 0xffffffffu;
}

// Atomics. Threads switch only at barriers and warp intrinsics, so a plain read-modify-write is atomic here.
template <typename T> T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <typename T> T atomicMax(T* p, T v) {
    T old = *p;
    *p = old < v ? v : old;
    return old;
}
template <typename T> T atomicMin(T* p, T v) {
    T old = *p;
    *p = v < old ? v : old;
    return old;
}
template <typename T> T atomicExch(T* p, T v) {
    T old = *p;
    *p = v;
    return old;
}
template <typename T> T atomicCAS(T* p, T compare, T v) {
    T old = *p;
    if (old == compare) {
        *p = v;
    }
    return old;
}

// ------------------------------------------------------------------------------------------------------------------
// Float intrinsics. The *_rn forms are IEEE round-to-nearest-even, as on the GPU (host code is built with
// -ffp-contract=off, so nothing is fused). The fast-math forms are computed exactly here; on the GPU they are
// approximate (__fdividef, __frcp... within 2 ulp; rsqrtf within 2 ulp), so results that use them are compared
// within a stated bound, never bit for bit.

inline float __fmul_rn(float a, float b) {
    return a * b;
}
inline float __fadd_rn(float a, float b) {
    return a + b;
}
inline float __fsub_rn(float a, float b) {
    return a - b;
}
inline float __fdiv_rn(float a, float b) {
    return a / b;
}
inline float __frcp_rn(float a) {
    return 1.0f / a;
}
inline float __fsqrt_rn(float a) {
    return std::sqrt(a);
}
inline float __fmaf_rn(float a, float b, float c) {
    return std::fma(a, b, c);
}
inline float __fdividef(float a, float b) {
    return a / b;
}
inline float __powf(float a, float b) {
    return std::pow(a, b);
}
inline float __expf(float a) {
    return std::exp(a);
}
inline float rsqrtf(float a) {
    return 1.0f / std::sqrt(a);
}
inline float __uint_as_float(unsigned u) {
    return ::qlora::simt::from_bits32<float>(u);
}
inline unsigned __float_as_uint(float f) {
    return ::qlora::simt::to_bits32(f);
}
inline int __float_as_int(float f) {
    return static_cast<int>(::qlora::simt::to_bits32(f));
}
inline float __int_as_float(int i) {
    return ::qlora::simt::from_bits32<float>(static_cast<uint32_t>(i));
}

// ------------------------------------------------------------------------------------------------------------------
// __nv_bfloat16 and __half: storage types with CUDA's conversions (round to nearest even; NaN stays NaN).

struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    return __uint_as_float(static_cast<uint32_t>(h.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t u = __float_as_uint(f);
    if (std::isnan(f)) {
        return {0x7fff}; // CUDA's canonical bf16 NaN
    }
    const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(rounded >> 16)};
}

float __half2float(__half h);
__half __float2half_rn(float f);
